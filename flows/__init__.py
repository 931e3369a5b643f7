"""The Prefect layer: the `rlhf_ppo` flow and the `ppoflow` command that runs it."""
