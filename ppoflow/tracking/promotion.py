"""The promotion gate: a new registered version takes the promotion alias only when it is better.

After stage 6 registered the new version (alias `tracking.alias`, `candidate` by default), the gate
compares it with the version holding `tracking.promotion.alias` (`champion`) on the eval prompts,
head to head: both sample the same prompts with the same seed and the reward model scores both
(`evaluate`); with no holder yet, the stage's own evaluation against the reference decides. The
alias moves only when every bound holds: `min_win_rate`, `max_kl` (KL to the reference),
`min_reward_functions`. The decision, with its numbers, goes on the version and the run as tags
(`ppoflow.promotion`: `promoted: ...` or `rejected: ...`) and into the stage's release.

Nothing is lost: a rejected or failed run leaves the alias where it was. MLflow has no
compare-and-set on aliases, so the move is checked on both sides: just before it, the alias must
still point where the gate read it, and just after, it must point at the new version; when another
run moved it meanwhile, the gate evaluates again against the new holder (a few rounds at most), so
two runs finishing at once never overwrite each other unseen. A retried stage finds the decision
already on its version and does not decide twice.

With `approval: required`, a version whose numbers pass is held `awaiting approval` instead
(`ppoflow.tracking.approval`): a person's decision moves the alias later.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ppoflow.config import PromotionConfig
from ppoflow.tracking import approval
from ppoflow.tracking.approval import DETAIL_TAG
from ppoflow.tracking.registry import RegistryVersion, fetch
from ppoflow.tracking.release import alias_holder, set_alias
from ppoflow.tracking.run import TrackingRun

_LOGGER = logging.getLogger(__name__)

ROUNDS = 3  # evaluations against successive holders before the gate gives up (the alias kept moving)

Evaluate = Callable[[Path], Mapping[str, float]]  # baseline directory -> head-to-head eval metrics


def decide(
    promotion: PromotionConfig, against: str, head_to_head: Mapping[str, float], eval_metrics: Mapping[str, float]
) -> dict[str, Any]:
    """The gate's decision from the head-to-head numbers (win rate, rewards) and the stage's own eval
    against the reference (KL, reward-function means). Pure: the same numbers, the same decision."""
    checks = [("win rate", head_to_head["win_rate"], ">=", promotion.min_win_rate)]
    if promotion.max_kl is not None:
        checks.append(("KL to the reference", eval_metrics["kl"], "<=", promotion.max_kl))
    checks += [
        (f"{name} mean", eval_metrics[f"{name}_policy"], ">=", bound)
        for name, bound in promotion.min_reward_functions.items()
    ]
    results = [
        (what, value, op, bound, value >= bound if op == ">=" else value <= bound) for what, value, op, bound in checks
    ]
    failed = [result for result in results if not result[4]]
    shown = "; ".join(
        f"{what} {value:.4g} {op if ok else ('<' if op == '>=' else '>')} {bound:.4g}"
        for what, value, op, bound, ok in failed or results
    )
    promoted = not failed
    return {
        "promoted": promoted,
        "decision": f"{'promoted' if promoted else 'rejected'}: {shown} against {against}",
        "alias": promotion.alias,
        "against": against,
        "win_rate": float(head_to_head["win_rate"]),
        "reward_policy": float(head_to_head["reward_policy"]),
        "reward_against": float(head_to_head["reward_ref"]),
        "kl": float(eval_metrics["kl"]),
        "bounds": {
            what: {"value": float(value), "bound": float(bound), "passed": ok} for what, value, _, bound, ok in results
        },
    }


def gate(
    run: TrackingRun,
    promotion: PromotionConfig,
    *,
    name: str,
    version: str,
    eval_metrics: Mapping[str, float],
    evaluate: Evaluate,
    fetch_root: Path,
    reference_uri: str | None = None,
) -> dict[str, Any]:
    """Decide whether `version` of `name` takes `promotion.alias`, move it if so, and record why.
    `reference_uri`: the registry version the run's reference is; when it holds the alias, the
    stage's eval against the reference is already the head-to-head one."""
    recorded = run.client.get_model_version(name, version).tags.get(DETAIL_TAG)
    if recorded:  # a retried stage: decided before
        return json.loads(recorded)
    decision: dict[str, Any] | None = None
    for _ in range(ROUNDS):
        holder = alias_holder(run, name, promotion.alias)
        if holder == version:  # moved by this stage's earlier attempt, which died before recording why
            break
        against = "the reference" if holder is None else f"models:/{name}/{holder}"
        if holder is None or against == reference_uri:
            head_to_head = eval_metrics
        else:
            _LOGGER.info("promotion gate: version %s against %s (holder of @%s)", version, against, promotion.alias)
            holder_dir = fetch(
                f"tracking.promotion.alias ({against})",
                RegistryVersion(name, holder, None),
                fetch_root,
                run.tracking_uri,
            )
            head_to_head = evaluate(holder_dir)
        decision = decide(promotion, against, head_to_head, eval_metrics)
        if not decision["promoted"]:
            break
        if promotion.approval == "required":  # a person decides; the alias waits (`approval`)
            decision = approval.hold(run, promotion, name, version, decision)
            break
        if alias_holder(run, name, promotion.alias) != holder:
            continue  # another run moved it while this one evaluated: compare with the new holder
        set_alias(run, "tracking.promotion.alias", name, promotion.alias, version)
        if alias_holder(run, name, promotion.alias) == version:
            break
        # another run moved it right over this one: evaluate against that one in the next round
    else:
        decision = {
            "promoted": False,
            "alias": promotion.alias,
            "against": "a moving alias",
            "decision": (
                f"rejected: @{promotion.alias} moved during each of "
                f"{ROUNDS} evaluations (concurrent runs); left where it is"
            ),
        }
    if decision is None:
        decision = {
            "promoted": True,
            "alias": promotion.alias,
            "against": "unrecorded",
            "decision": f"promoted: @{promotion.alias} already pointed at this version",
        }
    approval.record(run, name, version, decision)
    _LOGGER.info("promotion gate: version %s %s", version, decision["decision"])
    return decision
