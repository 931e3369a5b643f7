"""Start and stop a real MLflow tracking server (SQLite or PostgreSQL) for ppoflow.

CLI: ``python -m ppoflow.mlflow_server.server start|stop|status``; see mlflow_server/README.md.
Library: ``from mlflow_server import start_server, stop_server``.
"""

from typing import Any

__all__ = [
    "ServerError",
    "ServerInfo",
    "is_healthy",
    "read_info",
    "redact_uri",
    "server_status",
    "start_server",
    "stop_server",
]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m ppoflow.mlflow_server.server` does not import the module twice.
    if name in __all__:
        from ppoflow.mlflow_server import server

        return getattr(server, name)
    raise AttributeError(f"module 'mlflow_server' has no attribute {name!r}")
