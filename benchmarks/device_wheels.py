"""The wheels the GPU check needs beyond the device machine's own packages (`make device-wheels`).

The lent GPU machine (benchmarks/device_check.sh runs there) has Python 3.12 and a fixed image of
packages, and reaches no package registry: whatever else the check imports travels as wheels, pinned
here and installed there with `pip install --no-index --no-deps --target DIR`. The list is checked, not
guessed: `closure()` reads the third-party imports of everything the check runs (gpu_check.py, the two
throughput sides, `python -m ppoflow.cli`, following ppoflow's own imports), maps them to distributions,
walks the pinned wheels' `Requires-Dist` (markers evaluated for Linux x86-64, CPython 3.12; extras only
where a requirement asks for them) and reports whatever is neither on the device nor pinned here, every
pin nothing needs, and every version a requirement refuses.

    python benchmarks/device_wheels.py report               # the closure; exit 1 naming what is missing
    python benchmarks/device_wheels.py download DEST        # the pinned wheels for the device (cp312, manylinux x86-64)
    python benchmarks/device_wheels.py download --host DEST # the same versions for this interpreter (the CPU rehearsal)
    python benchmarks/device_wheels.py check --out FILE     # on the device, wheels installed: the versions really there
    python benchmarks/device_wheels.py repository-metadata DIR  # ppoflow's own metadata beside the wheels (see below)
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import importlib.metadata
import json
import platform
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# The device image ('cuda') as /work/.library/device/KINDS.md records it: the package names from its
# "Python packages already there" (read on a machine on 2026-11-17) and the versions its "pip list, as a
# session saw it" row gives (2026-11). A version not recorded there is None: requirements on it are
# reported as unverified until device_check.sh's `check` reads the machine itself.
DEVICE_PYTHON = "3.12.3"
DEVICE_PACKAGES = frozenset(
    canonicalize_name(name)
    for name in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split()
)
DEVICE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
# Markers of a requirement are evaluated for the device, not for the machine that runs this.
DEVICE_MARKERS = {
    "python_version": "3.12",
    "python_full_version": DEVICE_PYTHON,
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}

# The wheels, at the main venv's versions (the versions the test suite runs): the unit test fails when they
# drift apart. `make device-wheels` downloads exactly these and nothing else.
WHEELS = {
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0",
    "datasets": "5.2.0",
    "dill": "0.4.1",
    "multiprocess": "0.70.19",
    "trl": "1.12.0",
}
# A pin the device has too replaces the device's copy (the --target folder comes first on PYTHONPATH): why each.
CARRIED_OVER_THE_DEVICE = {
    "typing-extensions": "pydantic 2.14 needs >= 4.16.0 and the device's version is not recorded; a newer "
    "typing_extensions only adds names, so torch and the rest keep working",
}
# Pins that are not in the main venv (TRL lives in .venv-bench): their import names and Requires-Dist as
# their wheel's METADATA gives them (extras left out). `download` checks them against the wheel.
NOT_IN_THE_MAIN_VENV = {
    "trl": {
        "modules": ("trl",),
        "requires": ("accelerate>=1.4.0", "datasets>=4.7.0", "jinja2", "packaging>20.0", "transformers>=4.56.2"),
    },
}
# Imports the check survives without, each with what happens then: nothing needs to carry them.
OPTIONAL_IMPORTS = {
    "deepspeed": "ZeRO only (a DeepSpeed accelerate config); gpu_check's two_processes tries it and skips its ZeRO-3 "
    "variant without it, and on one GPU two_processes is skipped altogether",
}
# What the device runs: these scripts, and `python -m ppoflow.cli` (train and toy), started as processes.
ENTRY_POINTS = ("benchmarks/gpu_check.py", "benchmarks/ppoflow_side.py", "benchmarks/trl_baseline.py", "ppoflow/cli.py")
# Repository packages that what the device runs imports only on paths the check never takes: not followed.
NOT_FOLLOWED = {
    "ppoflow.tracking": (
        "MLflow: only `ppoflow stage --mlflow-run-id` (the Prefect flow) and `models:/` registry URIs load it"
    ),
    "ppoflow.smol": (
        "`ppoflow smol` builds the SmolLM2 world (its GGUF wheel is 93 MB: built on a CPU machine, not carried)"
    ),
}
# Requirement files whose versions the device must meet: the engine's dependencies, the TRL baseline's pin.
ROOT_REQUIREMENTS = ("pyproject.toml", "benchmarks/requirements-trl.txt")
# The wheels and what travels beside them (the repository, the toy world) share a device call's 64 MiB.
SIZE_LIMIT_MIB = 32
DEVICE_PLATFORM = [
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
]


@dataclass
class Need:
    """One distribution the check needs: where it comes from, at which version, and who asks for it."""

    source: str  # "device" or "wheel"
    version: str | None
    wanted_by: list[str] = field(default_factory=list)


@dataclass
class Report:
    needed: dict[str, Need] = field(default_factory=dict)
    # missing, conflicting, unneeded or drifted: the wheel set is wrong
    problems: list[str] = field(default_factory=list)
    # a requirement on a device package whose version is not recorded
    unverified: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "needed": {name: vars(need) for name, need in sorted(self.needed.items())},
            "problems": self.problems,
            "unverified": self.unverified,
        }


# ------------------------------------------------------------------------------------- imports
def _local_module_file(name: str) -> Path | None:
    """The file of a module of this repository (a package of the root, or a script beside this one)."""
    for root in (REPO, HERE):
        base = root.joinpath(*name.split("."))
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
    return None


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """Every module name an import statement of `tree` may load, outside `if TYPE_CHECKING:` blocks."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def _not_followed(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in NOT_FOLLOWED)


def third_party_imports(reached: set[str] | None = None) -> dict[str, set[str]]:
    """Top-level third-party modules imported by what the device runs, each with the repository files that
    import it (imports inside functions count: the check calls them). The NOT_FOLLOWED packages met on
    the way are added to `reached`."""
    queue = [
        (path.removesuffix(".py").removesuffix("/__init__").replace("/", "."), REPO / path) for path in ENTRY_POINTS
    ]
    seen: set[Path] = set()
    found: dict[str, set[str]] = {}
    while queue:
        module, path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            parts = name.split(".")
            if parts[0] in sys.stdlib_module_names or parts[0] == "__future__":
                continue
            if _local_module_file(parts[0]) is None:
                found.setdefault(parts[0], set()).add(str(path.relative_to(REPO)))
                continue
            for depth in range(1, len(parts) + 1):  # a package's __init__ runs before its submodules
                prefix = ".".join(parts[:depth])
                if _not_followed(prefix):
                    if reached is not None:
                        reached.add(prefix)
                    break
                if (file := _local_module_file(prefix)) is not None:
                    queue.append((prefix, file))
    return found


def _distributions_of_modules() -> dict[str, list[str]]:
    mapping = {
        module: [canonicalize_name(d) for d in dists]
        for module, dists in importlib.metadata.packages_distributions().items()
    }
    for name, recorded in NOT_IN_THE_MAIN_VENV.items():
        for module in recorded["modules"]:
            mapping.setdefault(module, [name])
    return mapping


# ------------------------------------------------------------------------------- requirements
def _applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**DEVICE_MARKERS, "extra": extra}) for extra in ("", *extras))


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _wheel_requires(name: str, *, live: bool) -> tuple[list[str], str | None]:
    """A pinned distribution's Requires-Dist, and a problem when they cannot be read at the pinned version."""
    installed = _installed_version(name)
    if installed == WHEELS[name]:
        return importlib.metadata.requires(name) or [], None
    if not live and installed is None and name in NOT_IN_THE_MAIN_VENV:
        return list(NOT_IN_THE_MAIN_VENV[name]["requires"]), None
    if live:
        return (
            [],
            f"{name}: the wheel pins {WHEELS[name]}, this python imports "
            f"{installed or 'nothing'} (is the --target folder first on PYTHONPATH?)",
        )
    return [], (
        f"{name}: pinned at {WHEELS[name]}, the main venv has {installed or 'none'} (the version the tests run): "
        f"pin {installed} in WHEELS and run make device-wheels"
        if installed
        else f"{name}: pinned and not in the main venv: record its modules and Requires-Dist in NOT_IN_THE_MAIN_VENV"
    )


def root_requirements() -> dict[str, Requirement]:
    """The version ranges the repository asks for: pyproject's dependencies and the TRL baseline's pin."""
    lines = list(tomllib.loads((REPO / ROOT_REQUIREMENTS[0]).read_text())["project"]["dependencies"])
    lines += [line.split("#")[0].strip() for line in (REPO / ROOT_REQUIREMENTS[1]).read_text().splitlines()]
    return {canonicalize_name(r.name): r for r in map(Requirement, filter(None, lines))}


def closure(*, live: bool = False) -> Report:
    """What the check needs, where each piece comes from, and what is wrong with the wheel set.

    live=False (here): device versions are DEVICE_VERSIONS; a pin's requirements come from the main venv.
    live=True (on the device, the wheels installed and first on sys.path): every version is read off the
    running interpreter, and each pin must be the version imported."""
    report = Report()
    reached: set[str] = set()
    imports = third_party_imports(reached)
    owners = _distributions_of_modules()
    roots = root_requirements()
    queue: list[tuple[str, Requirement | None, frozenset[str], str]] = []
    for module, files in sorted(imports.items()):
        if module in OPTIONAL_IMPORTS:
            continue
        if module not in owners:
            report.problems.append(
                f"import {module} ({', '.join(sorted(files))}): no installed distribution provides it"
            )
            continue
        for name in owners[module]:
            queue.append((name, roots.get(name), frozenset(), f"import {module} ({', '.join(sorted(files))})"))
    report.problems += [
        f"OPTIONAL_IMPORTS names {module}, which nothing imports any more"
        for module in OPTIONAL_IMPORTS
        if module not in imports
    ]
    report.problems += [
        f"NOT_FOLLOWED names {name}, which nothing the device runs imports any more"
        for name in NOT_FOLLOWED
        if not any(r == name or r.startswith(name + ".") for r in reached)
    ]

    walked: set[tuple[str, str]] = set()
    while queue:
        name, requirement, extras, wanted_by = queue.pop(0)
        if name in WHEELS:
            source, version = "wheel", _installed_version(name) if live else WHEELS[name]
        elif (live and _installed_version(name)) or (not live and name in DEVICE_PACKAGES):
            source, version = "device", _installed_version(name) if live else DEVICE_VERSIONS.get(name)
        else:
            report.problems.append(f"missing: {name} ({wanted_by}) is neither on the device nor among the wheels")
            continue
        need = report.needed.setdefault(name, Need(source, version))
        need.wanted_by.append(wanted_by)
        if requirement is not None and requirement.specifier:
            if version is None:
                report.unverified.append(
                    f"{name}{requirement.specifier} ({wanted_by}): the device's version is not recorded"
                )
            elif not requirement.specifier.contains(Version(version), prereleases=True):
                report.problems.append(
                    f"conflict: {wanted_by} needs {name}{requirement.specifier}; the {source} has {version}"
                )
        if source != "wheel":
            continue
        for extra in ("", *extras):
            if (name, extra) in walked:
                continue
            walked.add((name, extra))
            requires, problem = _wheel_requires(name, live=live)
            if problem:
                report.problems.append(problem)
            for line in requires:
                child = Requirement(line)
                without_extras = _applies(child, frozenset())
                if (not extra and without_extras) or (
                    extra and not without_extras and _applies(child, frozenset({extra}))
                ):
                    queue.append((canonicalize_name(child.name), child, frozenset(child.extras), f"{name} {version}"))

    for name in sorted(set(WHEELS) - set(report.needed)):
        report.problems.append(f"unneeded: {name} is pinned and nothing needs it")
    for name in sorted(set(WHEELS) & DEVICE_PACKAGES):
        if name not in CARRIED_OVER_THE_DEVICE:
            report.problems.append(
                f"{name} is on the device and pinned too: drop the pin or say why in CARRIED_OVER_THE_DEVICE"
            )
    return report


# ----------------------------------------------------------------------------------- wheels
def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, Requires-Dist) read from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        message = email.parser.Parser().parsestr(archive.read(metadata).decode())
    return canonicalize_name(message["Name"]), message["Version"], message.get_all("Requires-Dist") or []


def _unconditional(requires: list[str]) -> list[str]:
    """Requirements that hold without any extra, normalized."""
    parsed = map(Requirement, requires)
    return sorted(str(r) for r in parsed if r.marker is None or "extra" not in str(r.marker))


def _pinned_file(dest: Path, name: str) -> Path | None:
    for wheel in dest.glob("*.whl"):
        wheel_name, version, _, _ = parse_wheel_filename(wheel.name)
        if wheel_name == name and str(version) == WHEELS[name]:
            return wheel
    return None


def download(dest: Path, *, host: bool = False) -> list[Path]:
    """The pinned wheels into `dest` (for the device, or with host=True for this interpreter), each checked
    against what `closure()` assumed of it; files already there are kept, other wheels removed."""
    dest.mkdir(parents=True, exist_ok=True)
    platform_flags = [] if host else DEVICE_PLATFORM
    for name, version in WHEELS.items():
        if _pinned_file(dest, name) is None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--disable-pip-version-check",
                    "--no-deps",
                    "--only-binary=:all:",
                    *platform_flags,
                    "--dest",
                    str(dest),
                    f"{name}=={version}",
                ],
                check=True,
            )
    wheels = [_pinned_file(dest, name) for name in WHEELS]
    for stale in set(dest.glob("*.whl")) - set(wheels):  # two versions of one package stop the whole install
        stale.unlink()
    for wheel in wheels:
        name, version, requires = wheel_metadata(wheel)
        assumed, problem = _wheel_requires(name, live=False)
        if problem or _unconditional(requires) != _unconditional(assumed):
            raise SystemExit(
                f"{wheel.name}: its Requires-Dist differ from what device_wheels.py assumed ({problem or assumed})"
            )
    return wheels


def write_repository_metadata(target: Path) -> Path:
    """ppoflow's distribution metadata (name and version from pyproject.toml) in `target`, the wheels'
    folder on PYTHONPATH. The working tree travels to the device uninstalled, and the engine reads its own
    version through importlib.metadata (the toy build, run provenance, the throughput RESULT)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    info = target / f"{project['name']}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
        f"Summary: the working tree at {REPO}, not installed (benchmarks/device_check.sh)\n"
    )
    (info / "INSTALLER").write_text("benchmarks/device_check.sh\n")
    return info


def size_mib(paths: list[Path]) -> float:
    return sum(path.stat().st_size for path in paths) / 2**20


def _print_report(report: Report) -> None:
    for name, need in sorted(report.needed.items()):
        print(f"  {need.source:6} {name} {need.version or '(version not recorded)'}  <- {'; '.join(need.wanted_by)}")
    for line in report.unverified:
        print(f"  unverified: {line}")
    for line in report.problems:
        print(f"  PROBLEM: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("report", help="the closure of what the check needs; exit 1 when the wheel set is wrong")
    fetch = commands.add_parser("download", help="the pinned wheels into DEST")
    fetch.add_argument("dest", type=Path)
    fetch.add_argument("--host", action="store_true", help="for this interpreter instead of the device's CPython 3.12")
    check = commands.add_parser("check", help="on the device: the closure with the versions really installed")
    check.add_argument("--out", type=Path, required=True)
    metadata = commands.add_parser(
        "repository-metadata", help="ppoflow's metadata into DIR, for the uninstalled working tree"
    )
    metadata.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "repository-metadata":
        print(f"wrote {write_repository_metadata(args.target)}")
        return 0

    report = closure(live=args.command == "check")
    if args.command == "check":
        found = {"python": platform.python_version(), **report.as_dict()}
        args.out.write_text(json.dumps(found, indent=2) + "\n")
        _print_report(report)
        return 1 if report.problems else 0
    print(
        f"the GPU check needs {len(report.needed)} distributions: "
        f"{sum(n.source == 'wheel' for n in report.needed.values())} as wheels, the rest on the device"
    )
    _print_report(report)
    if report.problems:
        return 1
    if args.command == "download":
        wheels = download(args.dest, host=args.host)
        total = size_mib(wheels)
        print(
            f"{len(wheels)} wheels for {'this interpreter' if args.host else 'CPython 3.12, manylinux x86-64'} "
            f"in {args.dest}: {total:.1f} MiB"
        )
        if total > SIZE_LIMIT_MIB:
            print(
                f"more than {SIZE_LIMIT_MIB} MiB: with the repository and "
                "the toy world they may not fit a device call's 64 MiB"
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
