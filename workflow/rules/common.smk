# Shared helpers: the experiment picked by `experiment:` in params.yaml and its per-stage blocks.

EXP = config["experiment"]


def block(stage):
    """The params.yaml block of one stage of the current experiment (a rerun trigger via `params:`)."""
    return config[EXP][stage]
