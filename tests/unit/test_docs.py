"""The README and the docs site: the site builds with `mkdocs build --strict` (a broken link, a
missing anchor or a page left out of the nav fails it, and CI's `make test` runs this), the README
stays short and links every page, every config field is documented, and every shell command shown
in a fenced block is accounted for: run by a test or by CI, or listed here with why it is not."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README = REPO / "README.md"
PAGES_WITH_COMMANDS = [
    README,
    *sorted(DOCS.glob("*.md")),
    REPO / "deployments" / "README.md",
    REPO / "mlflow_server" / "README.md",
    REPO / "benchmarks" / "README.md",
]
README_MAX_LINES = 200

# A shown command is matched to the longest key below that it starts with (whole words). Leading
# `VAR=value` assignments are left out of the match; `export` lines and bare assignments are not
# commands. Each key names the file that runs it and a text in that file that shows it.

# The command itself runs: in a test, in CI's script, or in code a test runs (deployments/serve.py
# runs under tests/integration/conftest.py's served stack).
RUN_BY_A_TEST = {
    "make test": (".ci/run", "make test"),  # CI's one command
    "make install": ("Makefile", "test: install system-packages"),  # first thing CI's `make test` does
    "pip install -e": ("Makefile", "-e '.[dev,server,deepspeed,real]'"),  # make install: the server extra too
    "ppoflow init": ("tests/flow/test_wheel.py", 'run(installed, work, "init")'),
    # tests/flow/test_wheel.py: `ppoflow init`'s toy.yaml, a copy of configs/toy.yaml, shortened with --set
    "ppoflow run --config configs/toy.yaml": ("tests/flow/test_wheel.py", '"run", "--config", "toy.yaml"'),
    "ppoflow join": ("tests/flow/test_distributed_flow.py", '"join", "--output-dir"'),
    "prefect flow-run retry": ("tests/integration/test_deployments.py", '"flow-run", "retry"'),
    "prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml": (
        "deployments/serve.py",
        '"deploy", "--all", "--prefect-file"',
    ),
    "prefect worker start --pool ppoflow --limit 1": ("deployments/serve.py", '"worker", "start", "--pool"'),
    "python -m ppoflow.mlflow_server.server status": ("tests/integration/test_mlflow_server.py", 'main(["status"'),
    "python -m ppoflow.mlflow_server.server stop": ("tests/integration/test_mlflow_server.py", 'main(["stop"'),
    # --device cpu
    "bash benchmarks/device_check.sh": ("tests/engine/test_device_check.py", '"benchmarks" / "device_check.sh"'),
    # The suite's own files, which CI's `make test` runs; _check_pytest_command checks the paths and variables.
    ".venv/bin/python -m pytest": (".ci/run", "make test"),
}

# What the command does runs in a test, through the function or the API call the command makes.
RUN_AS_CODE_BY_A_TEST = {
    "make serve": ("tests/integration/conftest.py", "alert_webhook=alert_receiver.url"),
    "make serve-stop": ("tests/integration/conftest.py", "serve.stop(home)"),
    "prefect deployment run": ("tests/integration/test_deployments.py", "client.create_flow_run_from_deployment("),
    "prefect work-pool create ppoflow --type process": (
        "deployments/serve.py",
        "client.create_work_pool(WorkPoolCreate(",
    ),
    "prefect work-pool set-concurrency-limit ppoflow 1": (
        "deployments/serve.py",
        "WorkPoolUpdate(concurrency_limit=concurrency_limit)",
    ),
    "python -m ppoflow.mlflow_server.server start": (
        "tests/integration/test_mlflow_server.py",
        "start_server(home, port=0",
    ),
    "python -m ppoflow.mlflow_server.server start --port 0 --auth": (
        "tests/integration/test_mlflow_server.py",
        "start_server(home, port=0, auth=True",
    ),
    'curl -u "$ADMIN" "$URL/api/2.0/mlflow/experiments/get-by-name': (
        "tests/integration/test_deployments.py",
        "/api/2.0/mlflow/experiments/get-by-name?",
    ),
    'curl -u "$ADMIN" -X POST "$URL/api/2.0/mlflow/users/create"': (
        "tests/integration/test_mlflow_server.py",
        "auth_client.create_user(",
    ),
    'curl -u "$ADMIN" -X POST "$URL/api/3.0/mlflow/users/permissions/grant"': (
        "tests/integration/test_mlflow_server.py",
        "auth_client.grant_user_permission(",
    ),
}

# Not runnable on this project's machines: no GPU, no Hub, no internet beyond the package registries.
NOT_RUNNABLE_HERE = {
    "make install TORCH=": (
        "fetches torch's CUDA build from download.pytorch.org (no internet here but the package registries) for a GPU"
    ),
    "ppoflow train --config my-model.yaml": (
        "the starter config names Hub models (my-org/...) and wants a GPU; "
        "on toy.yaml the same command runs in tests/flow/test_wheel.py"
    ),
    "ppoflow run --config my-model.yaml": "as above; `ppoflow run --config toy.yaml` runs in tests/flow/test_wheel.py",
}

# Runnable here, and run by hand rather than by a test: each says why.
RUN_BY_HAND = {
    "make demo": (
        "install, the toy world and 32 updates; no test runs the target, but tests/flow/test_wheel.py "
        "runs its two commands (`ppoflow toy`, then `ppoflow run` on the toy config, cut to one update)"
    ),
    "make test-fast": "a subset of `make test`, which CI runs",
    "make device-wheels": (
        "downloads the GPU machine's wheels from the registry; "
        "tests/engine/test_device_check.py downloads the same versions for this interpreter"
    ),
    "make smol": "about 30 min (the real-model world); tests/engine/test_smol.py builds a small one",
    "make demo-smol": "about 45 min of training on 2 cores; its figures are in docs/REAL_MODEL.md",
    "make bench-smol": "make demo-smol, then the independent check; its figures are in docs/REAL_MODEL.md",
    "make bench": "15-20 min against TRL in .venv-bench (--quick: 4 min); its figures are in docs/PERFORMANCE.md",
    "make bench-smol-speed": (
        "about 10 min against TRL in .venv-bench on SmolLM2-135M, and it needs `make smol`'s world (about 30 min); "
        "its figures are in docs/PERFORMANCE.md"
    ),
    "make bench-commits": (
        "about 2 min a commit on a quiet machine, in git worktrees; its figures are in docs/PERFORMANCE.md"
    ),
    "make bench-venv": "builds .venv-bench from the package registry (about 1.5 min); only the benchmark needs it",
    "make bench-trl": "needs .venv-bench (TRL 1.12), which the test suite does not build",
    ".venv-bench/bin/python benchmarks/trl_baseline.py": (
        "needs .venv-bench (TRL 1.12), which the test suite does not build"
    ),
    'curl -u "$ADMIN" "$URL/api/3.0/mlflow/users/permissions/list': (
        "no test lists permissions; the grant it shows is tested"
    ),
    "sqlite3": "backups of a live store: no test yet",
    "pg_dump": "backups of a live store: no test yet",
}

ACCOUNTED = {
    "run by a test": RUN_BY_A_TEST,
    "run as code by a test": RUN_AS_CODE_BY_A_TEST,
    "not runnable here": NOT_RUNNABLE_HERE,
    "run by hand": RUN_BY_HAND,
}

# In a fenced block without a language (a diagram, a layout, or commands), a line is a command when
# its first word is one of these.
COMMAND_WORDS = {
    "make",
    "ppoflow",
    "python",
    "python3",
    "bash",
    "prefect",
    "pip",
    "accelerate",
    "mlflow",
    "curl",
    "sqlite3",
    "pg_dump",
    "createdb",
    "rsync",
    "srun",
}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*```(\S*)\s*$")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _words(line: str, stop: tuple[str, ...]) -> tuple[str, str]:
    """The start of `line` up to the first of `stop` outside quotes and $(...), and the rest from it."""
    quote, depth, i = None, 0, 0
    while i < len(line):
        char = line[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif line.startswith("$(", i):
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif depth == 0 and line.startswith(stop, i):
            return line[:i], line[i:]
        i += 1
    return line, ""


def _split_commands(line: str) -> list[str]:
    """`a && b; c` -> [a, b, c]."""
    parts = []
    while line:
        part, line = _words(line, ("&&", "||", ";"))
        parts.append(part.strip())
        line = line[1:] if line.startswith(";") else line[2:]
    return [part for part in parts if part]


def _without_assignments(command: str) -> tuple[list[str], str]:
    """The names of the leading `VAR=value` assignments, and the command after them."""
    names = []
    while NAME.match(command):
        assignment, command = _words(command, (" ", "\t"))
        names.append(assignment.split("=", 1)[0])
        command = command.strip()
    return names, command


def shown_commands(page: Path) -> list[tuple[str, str]]:
    """(command as written, command without its leading assignments) for each command in the page's
    fenced shell blocks and in its unlabelled blocks' command lines."""
    found, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        i += 1
        if not opening:
            continue
        language, block = opening.group(1), []
        while i < len(lines) and not FENCE.match(lines[i]):
            block.append(lines[i].strip())
            i += 1
        i += 1
        if language not in SHELL_LANGUAGES | {""}:
            continue
        joined, pending = [], ""
        for line in block:
            if language == "console" and not pending and not line.startswith("$ "):
                continue  # output
            line = line[2:] if line.startswith("$ ") else line
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            joined.append(pending + line)
            pending = ""
        for line in joined:
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            for command in _split_commands(line):
                _, bare = _without_assignments(command)
                if not bare or bare.startswith("export "):
                    continue  # variables for the commands after it
                first = bare.split()[0]
                if language == "" and first not in COMMAND_WORDS and not re.match(r"^\.venv[\w-]*/bin/", first):
                    continue
                found.append((command, bare))
    return found


def _key_of(bare: str) -> tuple[str, str] | None:
    """(group, key) of the longest key the command starts with, at a word boundary."""
    matches = [
        (len(key), group, key)
        for group, table in ACCOUNTED.items()
        for key in table
        if bare.startswith(key) and not re.match(r"[\w-]", bare[len(key) : len(key) + 1])
    ]
    return max(matches)[1:] if matches else None


def _all_shown() -> list[tuple[Path, str, str]]:
    return [(page, command, bare) for page in PAGES_WITH_COMMANDS for command, bare in shown_commands(page)]


def _make_targets() -> set[str]:
    targets: set[str] = set()
    for makefile in (REPO / "Makefile", REPO / "benchmarks" / "bench.mk"):
        for line in makefile.read_text().splitlines():
            rule = re.match(r"^([A-Za-z0-9_.-][A-Za-z0-9_. -]*):(?![=])", line)
            if rule:
                targets.update(rule.group(1).split())
            if line.startswith(".PHONY:"):
                targets.update(line.split(":", 1)[1].split())
    return targets - {".PHONY"}


# --------------------------------------------------------------------------- the site


def test_the_site_builds_strictly(tmp_path):
    """What `make docs` and CI build: any mkdocs warning (a link to a missing page or anchor, a link
    out of docs/, a page not in the nav) fails the build."""
    site = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(REPO / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (
        f"mkdocs build --strict failed (mkdocs is in the dev extra):\n{done.stdout}{done.stderr}"
    )
    pages = sorted(page.stem for page in DOCS.glob("*.md"))
    assert sorted(path.stem for path in site.glob("*.html") if path.stem not in ("404", "search")) == pages


def test_the_makefile_builds_the_site_strictly_outside_the_tree():
    recipe = (REPO / "Makefile").read_text().split("\ndocs:", 1)[1].split("\n\n", 1)[0]
    assert "mkdocs build --strict" in recipe
    site_dir = re.search(r"^site_dir:\s*(\S+)", (REPO / "mkdocs.yml").read_text(), re.M).group(1)
    assert site_dir.startswith(".ppoflow/"), "the site is built into .ppoflow/ (git-ignored), never committed"


# --------------------------------------------------------------------------- the README and the index


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; move detail into docs/ (at most {README_MAX_LINES})"
    )


@pytest.mark.parametrize("index", [README, DOCS / "index.md"], ids=["README", "index"])
def test_the_readme_and_the_index_link_every_page(index):
    prefix = "docs/" if index == README else ""
    text = index.read_text()
    missing = [
        page.name
        for page in sorted(DOCS.glob("*.md"))
        if page.name != "index.md" and f"]({prefix}{page.name}" not in text
    ]
    assert not missing, f"{index.name} does not link {missing}"
    if index == README:
        assert "](docs/index.md)" in text


def _slug(heading: str) -> str:
    """The anchor GitHub and mkdocs give a heading (for the headings these pages use)."""
    text = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


@pytest.mark.parametrize(
    "page",
    [
        README,
        REPO / "deployments" / "README.md",
        REPO / "mlflow_server" / "README.md",
        REPO / "benchmarks" / "README.md",
    ],
    ids=lambda page: str(page.relative_to(REPO)),
)
def test_links_outside_the_site_resolve(page):
    """The READMEs are not part of the site: their relative links and anchors are checked here."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+\s+(.*)$", file.read_text(), re.M)
            if anchor not in {_slug(heading) for heading in headings}:
                broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


# --------------------------------------------------------------------------- the config reference


def _field_rows() -> list[tuple[str, str]]:
    """(dotted field, default as docs/CONFIG.md writes it) for every field of RunConfig."""
    from pydantic import BaseModel

    from ppoflow.config import RewardFunctionConfig, RunConfig

    def shown(value) -> str:
        if isinstance(value, BaseModel):
            return "(section)"
        if value is None:
            return "`null`"
        if isinstance(value, bool):
            return f"`{str(value).lower()}`"
        if isinstance(value, (list, dict)):
            return f"`{json.dumps(value)}`"
        return f"`{value}`"

    rows: list[tuple[str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            default = "required" if field.is_required() else shown(field.get_default(call_default_factory=True))
            if name == "reward_functions":
                rows.append((name, default))
                rows.extend(
                    (f"{name}[].{sub}", "required" if f.is_required() else shown(f.get_default()))
                    for sub, f in RewardFunctionConfig.model_fields.items()
                )
                continue
            section = [
                c
                for c in (field.annotation, *typing.get_args(field.annotation))
                if isinstance(c, type) and issubclass(c, BaseModel)
            ]
            if section:
                if prefix:
                    rows.append((prefix + name, default))
                walk(section[0], prefix + name + ".")
            else:
                rows.append((prefix + name, default))

    walk(RunConfig, "")
    return rows


def test_config_md_lists_every_field_with_its_default():
    text = (DOCS / "CONFIG.md").read_text()
    missing = [
        f"{name} (default {default})" for name, default in _field_rows() if f"| `{name}` | {default} |" not in text
    ]
    assert not missing, f"docs/CONFIG.md, 'Every field', lacks or has another default for: {missing}"


# --------------------------------------------------------------------------- the commands shown


def test_every_command_shown_is_accounted_for():
    unaccounted = [
        f"{page.relative_to(REPO)}: {command}" for page, command, bare in _all_shown() if _key_of(bare) is None
    ]
    assert not unaccounted, (
        "commands shown but neither run by a test nor listed with a reason in "
        "tests/unit/test_docs.py:\n" + "\n".join(unaccounted)
    )


def test_no_entry_is_stale():
    used = {_key_of(bare) for _, _, bare in _all_shown()}
    stale = [f"{group}: {key}" for group, table in ACCOUNTED.items() for key in table if (group, key) not in used]
    assert not stale, f"entries no page shows any more: {stale}"


def test_the_tests_that_run_the_commands_still_do():
    for table in (RUN_BY_A_TEST, RUN_AS_CODE_BY_A_TEST):
        for key, (path, evidence) in table.items():
            file = REPO / path
            assert file.is_file(), f"{key}: {path} does not exist"
            # Whitespace aside: the formatter (ruff format) puts a long call's arguments one per line.
            assert _squeezed(evidence) in _squeezed(file.read_text()), f"{key}: {path} no longer contains {evidence!r}"


def _squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_the_pytest_commands_name_files_and_variables_the_suite_has():
    suite = "\n".join(path.read_text() for path in (REPO / "tests").rglob("*.py"))
    for page, command, bare in _all_shown():
        if _key_of(bare) != ("run by a test", ".venv/bin/python -m pytest"):
            continue
        variables, _ = _without_assignments(command)
        assert all(name in suite for name in variables), f"{page.name}: {command}: a variable no test reads"
        paths = [word for word in bare.split() if word.startswith("tests/")]
        assert paths and all((REPO / path).exists() for path in paths), f"{page.name}: {command}: no such test file"


def test_every_make_target_shown_exists():
    """In fenced blocks and in `inline code` alike."""
    targets = _make_targets()
    shown = set()
    for page in PAGES_WITH_COMMANDS:
        for code in re.findall(r"`([^`\n]+)`", page.read_text()) + [bare for _, bare in shown_commands(page)]:
            for match in re.finditer(r"(?:^|[\s(])make((?:\s+[A-Za-z][\w-]*(?![\w=]))+)", code):
                shown.update(match.group(1).split())
    assert {"demo", "test", "docs", "serve", "serve-stop"} <= shown
    assert not shown - targets, f"make targets shown that the Makefile lacks: {sorted(shown - targets)}"
