"""A person's sign-off (`tracking.promotion.approval: required`) against a real SQLite MLflow registry,
and through the flow on the toy world: `ppoflow run` waits in the foreground, `ppoflow approve` answers
it from outside the flow, and a deadline that passes is a rejection. The deployment's suspension, the
API and the UI form are in tests/integration/test_deployments.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ppoflow.config import PromotionConfig
from ppoflow.tracking import open_run
from ppoflow.tracking.approval import APPROVAL_TAG, DEADLINE_TAG, Answer, expire_overdue, settle, settled
from ppoflow.tracking.promotion import gate
from ppoflow.tracking.release import alias_holder

pytestmark = pytest.mark.flow

EVAL = {"reward_policy": 1.5, "reward_ref": 0.5, "win_rate": 0.75, "kl": 2.0, "eos_rate": 1.0}
REQUIRED = PromotionConfig(approval="required", approval_timeout_hours=24)


@pytest.fixture
def registry(store, policy_dir, make_plan, request):
    """A registered model of its own (named after the test) with versions 1-3 of one run; returns the run."""
    name = request.node.name.replace("_", "-")[:60]
    run = open_run(make_plan(name), request.node.name.ljust(64, "x")[:64], tracking_uri=store)
    run.client.create_registered_model(name)
    run.client.log_artifacts(run.run_id, str(policy_dir), "plain")
    source = f"{run.client.get_run(run.run_id).info.artifact_uri}/plain"
    for _ in range(3):
        run.client.create_model_version(name, source=source, run_id=run.run_id)
    return name, run


def held(run, name: str, version: str, promotion: PromotionConfig = REQUIRED) -> dict:
    """The gate on `version` with approval required, its numbers passing (against the reference, or the
    same numbers head to head against @champion's holder)."""
    return gate(
        run,
        promotion,
        name=name,
        version=version,
        eval_metrics=EVAL,
        evaluate=lambda baseline: EVAL,
        fetch_root=run.output_dir / "registry",
    )


def test_a_version_that_passes_the_numbers_waits_without_the_alias(registry):
    name, run = registry
    before = datetime.now(timezone.utc)
    pending = held(run, name, "1")
    assert pending["promoted"] is False and pending["awaiting_approval"] is True
    assert pending["decision"] == "awaiting approval: win rate 0.75 >= 0.55 against the reference"
    deadline = datetime.fromisoformat(pending["deadline"])
    assert timedelta(hours=24) - timedelta(seconds=2) <= deadline - before <= timedelta(hours=24, seconds=2)
    assert alias_holder(run, name, "champion") is None
    tags = run.client.get_model_version(name, "1").tags
    assert tags[APPROVAL_TAG] == "pending" and tags[DEADLINE_TAG] == pending["deadline"]
    assert tags["ppoflow.promotion"] == pending["decision"]
    assert run.client.get_run(run.run_id).data.tags[APPROVAL_TAG] == "pending"
    assert settled(run, name, "1") is None
    assert held(run, name, "1") == pending  # a retried stage 6 finds it held: no second deadline

    # numbers that fail never ask anyone
    rejected = held(run, name, "2", PromotionConfig(approval="required", min_win_rate=0.9))
    assert rejected["decision"].startswith("rejected: win rate 0.75 < 0.9") and "awaiting_approval" not in rejected
    assert APPROVAL_TAG not in run.client.get_model_version(name, "2").tags


def test_approvals_out_of_order_never_leave_the_alias_on_the_older_version(registry):
    name, run = registry
    older, newer = held(run, name, "1"), held(run, name, "2")

    approved = settle(run, name, "2", newer, Answer("approve", "alice", "reads well"))
    assert approved["promoted"] is True and alias_holder(run, name, "champion") == "2"
    assert approved["decision"] == "promoted: approved by alice; win rate 0.75 >= 0.55 against the reference"

    late = settle(run, name, "1", older, Answer("approve", "bob"))
    assert late["promoted"] is False and alias_holder(run, name, "champion") == "2"
    assert late["decision"].startswith("rejected: approved by bob, but @champion holds version 2, which is newer")
    version = run.client.get_model_version(name, "1")
    assert version.tags[APPROVAL_TAG] == "approved" and version.tags["ppoflow.approval.approver"] == "bob"
    assert json.loads(version.tags["ppoflow.promotion.detail"]) == late

    # an answer to a settled version changes nothing: its first decision stays
    assert settle(run, name, "2", newer, Answer("reject", "mallory")) == approved
    assert alias_holder(run, name, "champion") == "2"
    described = run.client.get_model_version(name, "2").description
    assert described.startswith("**Approved** by alice at ") and described.endswith(": reads well\n\n")


def test_a_rejection_and_a_timeout_leave_the_alias_and_say_why(registry):
    name, run = registry
    held(run, name, "1")
    settle(run, name, "1", held(run, name, "1"), Answer("approve", "alice"))
    rejected = settle(run, name, "2", held(run, name, "2"), Answer("reject", "bob", "too terse"))
    assert rejected["decision"] == f"rejected: by bob (too terse); win rate 0.75 >= 0.55 against models:/{name}/1"
    assert alias_holder(run, name, "champion") == "1"
    tags = run.client.get_model_version(name, "2").tags
    assert (tags[APPROVAL_TAG], tags["ppoflow.approval.comment"]) == ("rejected", "too terse")
    assert run.client.get_model_version(name, "2").description.startswith("**Rejected** by bob at ")

    # a deadline that passed with no answer: the next flow run's sweep records it, once
    quick = PromotionConfig(approval="required", approval_timeout_hours=0.0005)  # 1.8 s
    waiting = held(run, name, "3", quick)
    assert expire_overdue(run.tracking_uri, name) == []  # not yet
    time.sleep(max(0.0, (datetime.fromisoformat(waiting["deadline"]) - datetime.now(timezone.utc)).total_seconds()))
    time.sleep(1.1)  # the deadline has whole seconds
    (expired,) = expire_overdue(run.tracking_uri, name)
    assert expired["version"] == "3" and expired["promoted"] is False
    assert expired["decision"] == (
        f"rejected: approval timed out at {waiting['deadline']} (no decision); "
        f"win rate 0.75 >= 0.55 against models:/{name}/1"
    )
    assert run.client.get_model_version(name, "3").tags[APPROVAL_TAG] == "timed out"
    assert alias_holder(run, name, "champion") == "1"
    assert expire_overdue(run.tracking_uri, name) == []


def paused_run_id(timeout: float = 240.0) -> str:
    """The id of the flow run that is paused awaiting approval (the test harness's API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            paused = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                )
            )
            if paused:
                return str(paused[0].id)
            time.sleep(0.5)
    raise AssertionError("no flow run paused for approval")


def cli(*argv: str) -> subprocess.CompletedProcess:
    """`ppoflow ARGV` from another shell, against this test's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    return subprocess.run(
        [str(Path(sys.executable).with_name("ppoflow")), *argv],
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ppoflow_run_waits_in_the_foreground_until_ppoflow_approve_answers(flow_env, make_flow_config, capsys):
    """The embedded flow pauses after stage 6 with its form; `ppoflow approve` (the CLI, against the same
    Prefect API) resumes it; the alias moves and the decision is on the version, the run and the summary.
    A second night whose deadline passes first is rejected as timed out, and completes."""
    import mlflow

    from ppoflow.flows.rlhf_ppo import rlhf_ppo

    model = "approval-flow-policy"
    approval = [
        "ppo.total_episodes=16",
        "tracking.promotion.approval=required",
        "tracking.promotion.min_win_rate=0",
        f"tracking.registered_model_name={model}",
    ]
    answered: dict[str, subprocess.CompletedProcess] = {}

    def approve() -> None:
        answered["approve"] = cli("approve", paused_run_id(), "--by", "alice", "--comment", "ship it")

    approver = threading.Thread(target=approve)
    approver.start()
    state = rlhf_ppo(config=make_flow_config("approval-1", *approval), return_state=True)
    approver.join(timeout=60)
    summary = state.result()
    assert answered["approve"].returncode == 0, answered["approve"].stderr
    assert summary["promotion"]["decision"].startswith("promoted: approved by alice; win rate ")
    version = summary["registered_model"]["version"]
    client = mlflow.MlflowClient(tracking_uri=flow_env)
    assert str(client.get_model_version_by_alias(model, "champion").version) == version
    tags = client.get_model_version(model, version).tags
    assert (tags["ppoflow.approval"], tags["ppoflow.approval.comment"]) == ("approved", "ship it")
    assert client.get_run(summary["mlflow_run_id"]).data.tags["ppoflow.approval.approver"] == "alice"
    review = Path(client.download_artifacts(summary["mlflow_run_id"], "approval/review.md")).read_text()
    assert review.startswith(f"# {model} version {version} awaits approval for @champion")
    assert "## Answers to the same held-out prompts (candidate | the reference)" in review

    # a CLI answer to a run that waits for nothing is refused in one line
    refused = cli("reject", str(state.state_details.flow_run_id), "--by", "bob")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"error: flow run {state.state_details.flow_run_id} is Completed, not awaiting approval — nothing to "
        "answer (a timed-out or decided version keeps its decision)"
    )

    # nobody answers night 2 (against the champion, head to head): rejected as timed out, the alias stays
    quick = make_flow_config("approval-2", *approval, "tracking.promotion.approval_timeout_hours=0.001")
    second = rlhf_ppo(config=quick, return_state=True)
    assert second.is_completed(), second.message
    decision = second.result()["promotion"]
    assert decision["decision"].startswith("rejected: approval timed out at ") and decision["against"].endswith(
        f"{model}/{version}"
    )
    assert str(client.get_model_version_by_alias(model, "champion").version) == version
