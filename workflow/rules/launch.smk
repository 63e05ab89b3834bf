# The accelerate launch configuration that the stages running `launch:`'s processes (regression, distill) read.

rule launch_config:
    message:
        "Writing the accelerate launch configuration of {EXP}"
    input:
        code=code("launch_config"),
    output:
        config=f"configs/{EXP}/accelerate.yaml",
    params:
        **stage_params("launch_config"),
    resources:
        **slurm("launch_config"),
    log:
        f"logs/{EXP}/launch_config.log",
    shell:
        logged("dmd2 launch-config --experiment {EXP}")
