"""A person's sign-off in Prefect (`tracking.promotion.approval: required`): the review, the wait, the answer.

After stage 6 held a version `awaiting approval` (`ppoflow.tracking.approval`), the flow run
publishes the review (the gate's numbers against the alias's holder, the two policies' answers to
the same held-out prompts side by side, links to both MLflow runs and the version) as Prefect
artifacts and in MLflow (`approval/review.md`), emits `ppoflow.promotion.awaiting_approval`, and waits
for `Approval`, a form in the flow run's page of the Prefect UI:

- a deployment's flow run suspends (`suspend_flow_run`): its process exits and the worker is free.
  Resumed with the form's answer, the flow runs again from the top; stages 1-6 come back `Cached`
  and the suspension's key (one per version) hands the answer back here. Prefect fails a suspended
  run at its deadline; the next flow run records the timeout (`approval.expire_overdue`).
- `ppoflow run` pauses in the foreground (`pause_flow_run`), printing the flow run's id and how to
  answer: `ppoflow approve|reject FLOW_RUN_ID --by NAME [--comment TEXT]` from another shell (the
  same Prefect API: a server's, or the ephemeral one's database), or the form in the UI. At the
  deadline the wait ends as a timeout.

The answer goes to `approval.settle` (once per version: a re-run finds it settled and asks nobody).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from typing import Any, Literal
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput, keyset_from_base_key
from prefect.input.actions import read_flow_run_input
from prefect.runtime import deployment, flow_run
from prefect.states import Running
from pydantic import Field

from ppoflow.errors import PpoflowError
from ppoflow.flows import alerts
from ppoflow.manifests import Release, RunPlan
from ppoflow.redaction import redact
from ppoflow.tracking import TrackingRun
from ppoflow.tracking import approval as records
from ppoflow.workspace import HEAD_TO_HEAD_FILE, SAMPLES_FILE, read_jsonl

log = logging.getLogger("ppoflow.flows.approval")

FLOW_RUN_TAG = "ppoflow.approval.flow_run"  # on the version: the flow run that waits for its decision
SHOWN_ANSWERS = 8  # side-by-side rows in the review
WORKER_RELEASE_SECONDS = 10.0  # a suspended run's worker lets go of it within this (its process has exited)


class Approval(RunInput):
    """The form a reviewer fills in on the flow run's page (and what `ppoflow approve|reject` sends)."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: the version takes the alias; reject: the alias stays where it is"
    )
    approver: str = Field(min_length=1, description="Who decides (recorded on the version and its run)")
    comment: str = Field("", description="Why (recorded beside the decision)")


def await_approval(plan: RunPlan, release: Release, run: TrackingRun) -> Release:
    """The release with its final decision: unchanged unless stage 6 held it awaiting approval; else
    the recorded decision of an earlier flow run, or the one a person (or the deadline) makes now."""
    pending = release.promotion
    if not pending or not pending.get("awaiting_approval"):
        return release
    name, version = release.registered_model, release.registered_version
    decision = records.settled(run, name, version)
    if decision is None:
        decision = records.settle(run, name, version, pending, ask(plan, release, run, pending))
    return release.model_copy(update={"promotion": decision})


def ask(plan: RunPlan, release: Release, run: TrackingRun, pending: dict[str, Any]) -> records.Answer | None:
    """Publish the review and wait for the answer; None when the deadline passes first."""
    name, version = release.registered_model, release.registered_version
    key = f"ppoflow-approval-{name}-v{version}"  # one per version: a re-run of this flow run gets the answer back
    given = _given(key)
    if given is not None:  # resumed with an answer: this is the flow run's re-run
        return given
    remaining = (records.deadline_of(pending) - datetime.now(timezone.utc)).total_seconds()
    if remaining <= 0:
        return None
    rows = side_by_side(plan, pending)
    review = review_markdown(release, run, pending, rows)
    run.client.set_model_version_tag(name, version, FLOW_RUN_TAG, str(flow_run.id))
    run.client.log_text(run.run_id, review, "approval/review.md")
    create_markdown_artifact(key="approval-review", markdown=review, description="What the reviewer decides on")
    if rows:
        create_table_artifact(
            key="approval-answers", table=rows, description="Candidate and holder answers to held-out prompts"
        )
    alerts.emit_promotion(
        flow_run.name,
        pending,
        name,
        version,
        alerts.flow_run_page(flow_run.id),
        alerts.mlflow_page(run.tracking_uri, run.experiment_id, run.run_id),
    )
    form = Approval.with_initial_data(description=review)
    if deployment.id:
        answer = suspend_flow_run(wait_for_input=form, timeout=math.ceil(remaining), key=key)
    else:
        log.info(
            "%s version %s awaits approval for @%s until %s: answer with the Resume form of %s, or from another "
            "shell with `ppoflow approve %s --by NAME [--comment TEXT]` (or `ppoflow reject ...`)",
            name,
            version,
            pending["alias"],
            pending["deadline"],
            flow_run.ui_url or "the flow run's page in the Prefect UI",
            flow_run.id,
        )
        try:
            answer = pause_flow_run(wait_for_input=form, timeout=math.ceil(remaining), key=key, poll_interval=2)
        except FlowPauseTimeout:  # the run is still Paused (expired): back to Running, so it can complete
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run.id, Running(message="approval timed out"), force=True)
            return None
    return records.Answer(answer.decision, answer.approver, answer.comment)


def _given(key: str) -> records.Answer | None:
    """The answer this flow run was resumed with, for the suspension or pause of `key`, if any."""
    for state_name in ("suspended", "paused"):
        value = read_flow_run_input(keyset_from_base_key(f"{state_name}-{key}")["response"], flow_run_id=flow_run.id)
        if value:
            given = Approval(**value)
            return records.Answer(given.decision, given.approver, given.comment)
    return None


def side_by_side(plan: RunPlan, pending: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidate's and the holder's answers to the same held-out prompts (the gate's head-to-head
    samples; against the reference, stage 6's own)."""
    against_version = str(pending.get("against", "")).startswith("models:/")
    path = plan.output_dir / (HEAD_TO_HEAD_FILE if against_version else SAMPLES_FILE)
    other = pending["against"]
    rows = read_jsonl(path) if path.is_file() else []
    return [
        {
            "prompt": row["prompt"],
            "candidate": row["policy_completion"],
            other: row["ref_completion"],
            "candidate score": round(float(row["policy_score"]), 4),
            f"{other} score": round(float(row["ref_score"]), 4),
        }
        for row in rows[:SHOWN_ANSWERS]
    ]


def review_markdown(release: Release, run: TrackingRun, pending: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The reviewer's page: what waits, until when, the gate's numbers, the links, the answers
    (`rows`, from `side_by_side`)."""
    name, version = release.registered_model, release.registered_version
    alias, against = pending["alias"], pending["against"]
    lines = [
        f"# {name} version {version} awaits approval for @{alias}",
        "",
        f"Its numbers passed the gate against {against}; a person decides whether it ships. "
        f"With no decision by **{pending['deadline']}** it is rejected (timed out).",
        "",
        "| check | value | bound | passed |",
        "|---|---|---|---|",
    ]
    for what, check in pending.get("bounds", {}).items():
        lines.append(f"| {what} | {check['value']:.4g} | {check['bound']:.4g} | {'yes' if check['passed'] else 'no'} |")
    if "reward_policy" in pending:
        lines += [
            "",
            f"Mean reward on the held-out prompts: candidate {pending['reward_policy']:.4g}, "
            f"{against} {pending['reward_against']:.4g}; KL to the reference {pending['kl']:.4g}.",
        ]
    page = alerts.mlflow_page(run.tracking_uri, run.experiment_id, run.run_id)
    links = [("this candidate's MLflow run", page)]
    if against.startswith("models:/"):
        holder = run.client.get_model_version(name, against.rsplit("/", 1)[-1])
        if holder.run_id:
            experiment = run.client.get_run(holder.run_id).info.experiment_id
            links.append((f"{against}'s MLflow run", alerts.mlflow_page(run.tracking_uri, experiment, holder.run_id)))
    if page is not None:
        links.append(("the version", page.split("/#/")[0] + f"/#/models/{name}/versions/{version}"))
    lines += ["", "## Links", ""]
    lines += [f"- {what}: {url}" for what, url in links if url] or [
        f"- MLflow run `{run.run_id}` in `{redact(run.tracking_uri)}` (browse it with `mlflow ui`)"
    ]
    if rows:
        lines += ["", f"## Answers to the same held-out prompts (candidate | {against})", ""]
        for row in rows:
            lines += [
                f"**Prompt:** {_one_line(row['prompt'])}",
                "",
                f"- candidate ({row['candidate score']}): {_one_line(row['candidate'])}",
                f"- {against} ({row[f'{against} score']}): {_one_line(row[against])}",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(empty)"


def answer(flow_run_id: str, decision: Literal["approve", "reject"], approver: str, comment: str) -> str:
    """`ppoflow approve|reject`: resume a flow run that awaits approval with the form's answer."""
    from prefect.exceptions import ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        raise PpoflowError(f"{flow_run_id!r} is not a flow run id — pass the id `ppoflow run` printed") from None
    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(run_id).state
        except ObjectNotFound:
            raise PpoflowError(
                f"no flow run {flow_run_id} on this Prefect API — point PREFECT_API_URL at the server it runs on"
            ) from None
    if state is None or not state.is_paused():
        raise PpoflowError(
            f"flow run {flow_run_id} is {state.name if state else 'unknown'}, not awaiting approval — "
            "nothing to answer (a timed-out or decided version keeps its decision)"
        )
    if state.name == "Suspended":
        wait_for_the_worker_to_let_go(state)
    resume_flow_run(run_id, run_input={"decision": decision, "approver": approver, "comment": comment})
    return f"flow run {flow_run_id}: {decision} sent by {approver}"


def wait_for_the_worker_to_let_go(suspended: Any) -> None:
    """Sleep until `WORKER_RELEASE_SECONDS` after the `suspended` state began: a Prefect 3.8 process
    worker that still holds the run's slot crashes when the run is resumed."""
    elapsed = (datetime.now(timezone.utc) - suspended.timestamp).total_seconds()
    time.sleep(max(0.0, WORKER_RELEASE_SECONDS - elapsed))


def record_expired(tracking_uri: str, name: str) -> None:
    """Timeouts of versions whose suspended flow runs Prefect failed at their deadline, recorded now
    (with the rejection event each): `approval.expire_overdue`."""
    for expired in records.expire_overdue(tracking_uri, name):
        run = expired.pop("run")
        waiting = run.client.get_model_version(name, expired["version"]).tags.get(FLOW_RUN_TAG)
        alerts.emit_promotion(
            f"{waiting or 'unknown'}",
            expired,
            name,
            expired["version"],
            alerts.flow_run_page(waiting) if waiting else None,
            alerts.mlflow_page(run.tracking_uri, run.experiment_id, run.run_id),
        )
        log.info("%s version %s: %s", name, expired["version"], expired["decision"])
