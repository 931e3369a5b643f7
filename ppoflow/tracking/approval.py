"""A person's sign-off between the promotion gate and the alias (`tracking.promotion.approval: required`).

When the gate's numbers pass, the version does not take the alias yet: `hold` marks it `pending`
(tag `ppoflow.approval`, with its deadline) and the flow asks a person (`ppoflow.flows.approval`).
The answer, or its absence by the deadline, is `settle`d exactly once, recorded on the version and
its run (`ppoflow.approval`: `approved`, `rejected` or `timed out`, with the approver, the comment
and the time) and, for an approval, moves the alias.

Approvals can arrive in any order: two nights awaiting at once may be approved newest first. The
alias never goes back to an older version: an approval points it at the newest approved version
(or leaves the current holder, when that one is newer), then reads the registry again and repeats
while a newer approval appeared meanwhile. MLflow has no compare-and-set on aliases; the approval
tag is written before the alias is read, so of two approvals racing, the later reader always sees
the other's tag, and the last write is the newest approved version.

`expire_overdue` records the timeouts of versions whose flow run will not come back (a suspended
deployment run that Prefect failed at its deadline): every flow run calls it before its stages.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from ppoflow.config import PromotionConfig
from ppoflow.tracking.release import alias_holder, set_alias
from ppoflow.tracking.run import TrackingRun

_LOGGER = logging.getLogger(__name__)

APPROVAL_TAG = "ppoflow.approval"  # pending | approved | rejected | timed out
APPROVER_TAG = "ppoflow.approval.approver"
COMMENT_TAG = "ppoflow.approval.comment"
DECIDED_AT_TAG = "ppoflow.approval.decided_at"
DEADLINE_TAG = "ppoflow.approval.deadline"
PENDING = "pending"
ROUNDS = 5  # alias writes before an approval gives up on a registry that keeps changing under it

# written here and read by ppoflow.tracking.promotion (which imports this module)
PROMOTION_TAG = "ppoflow.promotion"
AGAINST_TAG = "ppoflow.promotion.against"
DETAIL_TAG = "ppoflow.promotion.detail"


@dataclass(frozen=True)
class Answer:
    """A person's decision on one version."""

    decision: Literal["approve", "reject"]
    approver: str
    comment: str = ""


def hold(
    run: TrackingRun, promotion: PromotionConfig, name: str, version: str, passed: dict[str, Any]
) -> dict[str, Any]:
    """The gate's passing decision turned into `awaiting approval`, the version marked `pending` with
    its deadline (`approval_timeout_hours` from now). The caller records the decision."""
    deadline = datetime.now(timezone.utc) + timedelta(hours=promotion.approval_timeout_hours)
    numbers = passed["decision"].removeprefix("promoted: ")
    run.client.set_model_version_tag(name, version, DEADLINE_TAG, deadline.isoformat(timespec="seconds"))
    run.client.set_model_version_tag(name, version, APPROVAL_TAG, PENDING)
    return {
        **passed,
        "promoted": False,
        "awaiting_approval": True,
        "deadline": deadline.isoformat(timespec="seconds"),
        "decision": f"awaiting approval: {numbers}",
    }


def deadline_of(pending: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(pending["deadline"])


def settled(run: TrackingRun, name: str, version: str) -> dict[str, Any] | None:
    """The recorded final decision of a version that awaited approval, or None while it awaits."""
    tags = run.client.get_model_version(name, version).tags
    if tags.get(APPROVAL_TAG, PENDING) == PENDING:
        return None
    return json.loads(tags[DETAIL_TAG])


def settle(run: TrackingRun, name: str, version: str, pending: dict[str, Any], answer: Answer | None) -> dict[str, Any]:
    """Apply a person's answer (None: the deadline passed) to a pending version, once: a version
    already settled keeps its first decision. Returns the final decision, as the gate's are shaped."""
    already = settled(run, name, version)
    if already is not None:
        return already
    alias = pending["alias"]
    numbers = pending["decision"].removeprefix("awaiting approval: ")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if answer is None:
        status, approver, comment = "timed out", None, None
        text = f"rejected: approval timed out at {pending['deadline']} (no decision); {numbers}"
    elif answer.decision == "reject":
        status, approver, comment = "rejected", answer.approver, answer.comment
        text = f"rejected: by {answer.approver}" + (f" ({answer.comment})" if answer.comment else "") + f"; {numbers}"
    else:
        status, approver, comment = "approved", answer.approver, answer.comment
        text = f"promoted: approved by {answer.approver}; {numbers}"
    tags = {APPROVAL_TAG: status, APPROVER_TAG: approver, COMMENT_TAG: comment, DECIDED_AT_TAG: now}
    for key, value in tags.items():  # the status first is what the newest-approved search reads
        if value is not None:
            run.client.set_model_version_tag(name, version, key, value)
    promoted = False
    if status == "approved":
        holder = _point_at_newest_approved(run, name, alias)
        promoted = holder == version
        if not promoted:
            text = (
                f"rejected: approved by {answer.approver}, but @{alias} holds version {holder}, which is "
                f"newer; {numbers}"
            )
    decision = {
        **pending,
        "promoted": promoted,
        "awaiting_approval": False,
        "approval": {"status": status, "approver": approver, "comment": comment, "decided_at": now},
        "decision": text,
    }
    record(run, name, version, decision)
    _describe(run, name, version, status, approver, comment, now)
    _LOGGER.info("approval: version %s %s", version, text)
    return decision


def record(run: TrackingRun, name: str, version: str, decision: dict[str, Any]) -> None:
    """The decision on the version and its run (`ppoflow.promotion`, `ppoflow.approval`); the
    version's detail tag last: its presence means "decided" to a retried gate."""
    for key, value in ((PROMOTION_TAG, decision["decision"]), (AGAINST_TAG, decision["against"])):
        run.client.set_model_version_tag(name, version, key, value)
    run.client.set_model_version_tag(name, version, DETAIL_TAG, json.dumps(decision, sort_keys=True))
    approval = decision.get("approval") or {}
    run.set_tags(
        {
            PROMOTION_TAG: decision["decision"],
            AGAINST_TAG: decision["against"],
            APPROVAL_TAG: approval.get("status", PENDING if decision.get("awaiting_approval") else None),
            APPROVER_TAG: approval.get("approver"),
            COMMENT_TAG: approval.get("comment"),
            DECIDED_AT_TAG: approval.get("decided_at"),
            DEADLINE_TAG: decision.get("deadline"),
        }
    )


def _point_at_newest_approved(run: TrackingRun, name: str, alias: str) -> str:
    """Point `alias` at the newest approved version, or leave it on a newer holder; return the holder."""
    for _ in range(ROUNDS):
        approved = [
            int(found.version)
            for found in run.client.search_model_versions(f"name='{name}'")
            if found.tags.get(APPROVAL_TAG) == "approved"
        ]
        holder = alias_holder(run, name, alias)
        target = str(max([*approved, int(holder) if holder else 0]))
        if target == holder:
            return holder
        set_alias(run, "tracking.promotion.alias", name, alias, target)
    return alias_holder(run, name, alias) or ""


def _describe(
    run: TrackingRun, name: str, version: str, status: str, approver: str | None, comment: str | None, when: str
) -> None:
    """The decision on top of the version's description, where the registry UI shows it first."""
    line = f"**{status.capitalize()}**" + (f" by {approver}" if approver else "") + f" at {when}"
    line += f": {comment}" if comment else "."
    current = run.client.get_model_version(name, version).description or ""
    run.client.update_model_version(name, version, description=f"{line}\n\n{current}"[:5000])


def expire_overdue(tracking_uri: str, name: str) -> list[dict[str, Any]]:
    """Settle as timed out every version of `name` still pending past its deadline (its flow run
    was failed by Prefect at the deadline and will not settle it); return their decisions."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    now = datetime.now(timezone.utc)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # no such registered model yet: nothing pending
        return []
    expired = []
    for found in versions:
        if found.tags.get(APPROVAL_TAG) != PENDING or DEADLINE_TAG not in found.tags or DETAIL_TAG not in found.tags:
            continue
        if datetime.fromisoformat(found.tags[DEADLINE_TAG]) > now:
            continue
        run = TrackingRun(client, found.run_id, client.get_run(found.run_id).info.experiment_id, Path())
        decision = settle(run, name, str(found.version), json.loads(found.tags[DETAIL_TAG]), None)
        expired.append({"version": str(found.version), "run": run, **decision})
    return expired
