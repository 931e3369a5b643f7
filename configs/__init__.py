"""The starter configs, shipped in the wheel as `ppoflow.configs`: `ppoflow init` copies them."""
