"""Prefect deployments of the rlhf-ppo flow (prefect.yaml) and `make serve` (serve.py)."""
