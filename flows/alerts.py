"""Alerts: the Prefect events ppoflow emits, and the automations that turn them into notifications.

Events (custom Prefect events, so anyone can build their own automations on them):

- `ppoflow.night.failed`: a flow run of `rlhf-ppo` failed; payload `stage` (the stage that failed,
  or "start-up checks"), `reason` (the error line), `flow_run_url`, `mlflow_run_url`, `message`.
- `ppoflow.promotion.promoted` / `ppoflow.promotion.rejected`: the promotion gate's decision on a
  registered version (with `approval: required`, the person's, or the timeout's); payload `model`,
  `version`, `alias`, `decision` (the gate's line, with its numbers), `flow_run_url`,
  `mlflow_run_url`, `message`.
- `ppoflow.promotion.awaiting_approval`: a version passed the gate's numbers and waits for a person
  (`tracking.promotion.approval: required`); the same payload, `decision` with its deadline.

Each event's resource is the night (`ppoflow.night.<flow run id>`) or the model version
(`ppoflow.model.<name>.<version>`); Prefect relates it to the flow run, the flow and the deployment.

`install(api_url, webhook_url)` (what `make serve ALERT_WEBHOOK=...` does) saves a Custom Webhook
notification block, `ppoflow-alerts`, which POSTs `{"subject": ..., "body": ...}` as JSON to the
URL, and four automations that send through it: a failed night, a crashed night (Prefect's own
`prefect.flow-run.Crashed`: a process killed outright runs no hook), a rejected candidate, a
candidate that awaits a person's approval (its message links the flow run with the Resume form). Another
notification block (Slack, e-mail) works the same way: point the automations at it in the UI.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ppoflow import tracking
from ppoflow.redaction import redact

log = logging.getLogger(__name__)

FLOW_NAME = "rlhf-ppo"
FAILED = "ppoflow.night.failed"
PROMOTED = "ppoflow.promotion.promoted"
REJECTED = "ppoflow.promotion.rejected"
AWAITING = "ppoflow.promotion.awaiting_approval"
BLOCK_NAME = "ppoflow-alerts"
AUTOMATIONS = (
    "ppoflow: a night failed",
    "ppoflow: a night crashed",
    "ppoflow: a candidate was rejected",
    "ppoflow: a candidate awaits approval",
)


def mlflow_page(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow run's page on its tracking server, without a login in the URL (the browser asks for
    it); None for a local store, which has no server to link to."""
    uri = redact(tracking_uri)
    if not uri.startswith(("http://", "https://")):
        return None
    parts = urlsplit(uri)
    server = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))
    return tracking.mlflow_ui_run_url(experiment_id, run_id, base=server)


def flow_run_page(flow_run_id: Any) -> str | None:
    """The flow run's page in the Prefect UI (`PREFECT_UI_URL`, which `make serve` gives its worker), or None."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/flow-runs/flow-run/{flow_run_id}" if ui else None


def _links(flow_run_url: str | None, mlflow_run_url: str | None) -> str:
    lines = [
        f"Flow run: {flow_run_url}" if flow_run_url else "",
        f"MLflow run: {mlflow_run_url}" if mlflow_run_url else "",
    ]
    return "\n".join(line for line in lines if line)


def _emit(event: str, resource: Mapping[str, str], payload: dict[str, Any]) -> None:
    """Emit `event`, related to the flow run, flow and deployment it runs in; an event that cannot be
    sent is logged, never raised (an alert must not fail the night)."""
    from prefect.events import emit_event

    try:
        emit_event(event=event, resource=dict(resource), payload=payload)
    except Exception as exc:  # noqa: BLE001 - the night's result stands whatever the event system does
        log.warning("the %s event was not sent: %s", event, exc)


def emit_failure(
    night: str, flow_run_id: str, stage: str | None, reason: str, flow_run_url: str | None, mlflow_run_url: str | None
) -> None:
    where = stage or "start-up checks"
    message = f"ppoflow night {night} failed in {where}: {reason}\n{_links(flow_run_url, mlflow_run_url)}".strip()
    _emit(
        FAILED,
        {"prefect.resource.id": f"ppoflow.night.{flow_run_id}", "prefect.resource.name": night},
        {
            "night": night,
            "stage": where,
            "reason": reason,
            "flow_run_url": flow_run_url,
            "mlflow_run_url": mlflow_run_url,
            "message": message,
        },
    )


def emit_promotion(
    night: str,
    decision: Mapping[str, Any],
    model: str,
    version: str,
    flow_run_url: str | None,
    mlflow_run_url: str | None,
) -> None:
    promoted = bool(decision.get("promoted"))
    awaiting = bool(decision.get("awaiting_approval"))
    what = "awaits approval for" if awaiting else "took" if promoted else "did not take"
    message = (
        f"ppoflow night {night}: {model} version {version} {what} @{decision['alias']} — {decision['decision']}\n"
        f"{_links(flow_run_url, mlflow_run_url)}"
    ).strip()
    _emit(
        AWAITING if awaiting else PROMOTED if promoted else REJECTED,
        {
            "prefect.resource.id": f"ppoflow.model.{model}.{version}",
            "prefect.resource.name": f"{model} version {version}",
        },
        {
            "night": night,
            "model": model,
            "version": version,
            "alias": decision["alias"],
            "decision": decision["decision"],
            "flow_run_url": flow_run_url,
            "mlflow_run_url": mlflow_run_url,
            "message": message,
        },
    )


def install(api_url: str, webhook_url: str) -> list[str]:
    """The notification block and the four automations on the Prefect server at `api_url` (made
    again when they exist: the URL may have changed). Returns the automations' names."""
    from prefect.automations import AutomationCore, EventTrigger, Posture, SendNotification
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        block = CustomWebhookNotificationBlock(
            name=BLOCK_NAME, url=webhook_url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
        )
        block_id = block.save(BLOCK_NAME, overwrite=True)
    ours = {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}

    def automation(name: str, expect: str, subject: str, body: str) -> AutomationCore:
        return AutomationCore(
            name=name,
            description="ppoflow alerts (make serve ALERT_WEBHOOK=...)",
            trigger=EventTrigger(expect={expect}, match_related=ours, posture=Posture.Reactive, threshold=1),
            actions=[SendNotification(block_document_id=block_id, subject=subject, body=body)],
        )

    wanted = [
        automation(
            AUTOMATIONS[0], FAILED, "ppoflow: night {{ event.payload.night }} failed", "{{ event.payload.message }}"
        ),
        automation(
            AUTOMATIONS[1],
            "prefect.flow-run.Crashed",
            "ppoflow: night {{ flow_run.name }} crashed",
            "ppoflow night {{ flow_run.name }} crashed: {{ flow_run.state.message }}\nFlow run: {{ flow_run|ui_url }}",
        ),
        automation(
            AUTOMATIONS[2],
            REJECTED,
            "ppoflow: {{ event.payload.model }} version {{ event.payload.version }} rejected",
            "{{ event.payload.message }}",
        ),
        automation(
            AUTOMATIONS[3],
            AWAITING,
            "ppoflow: {{ event.payload.model }} version {{ event.payload.version }} awaits approval",
            "{{ event.payload.message }}",
        ),
    ]
    with SyncPrefectClient(api_url) as client:
        for existing in client.read_automations():
            if existing.name in AUTOMATIONS:
                client.delete_automation(existing.id)
        for each in wanted:
            client.create_automation(each)
    log.info("alerts: %s to %s", ", ".join(AUTOMATIONS), redact(webhook_url))
    return list(AUTOMATIONS)
