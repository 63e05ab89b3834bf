rule distill:
    message:
        "DMD2 distillation of {EXP} (progress: tail -f {log}; rerun to resume from work/{EXP}/distill)"
    input:
        teacher=rules.teacher.output.model,
        regression=rules.regression.output.model,
        data=rules.prepare_data.output.data,
        launch=rules.launch_config.output.config,
        code=code("distill"),
        settings=settings_stamp("distill"),
    output:
        student=directory(f"models/{EXP}/student"),
    params:
        **stage_params("distill"),
    threads: heavy_threads("distill")
    resources:
        **slurm("distill"),
    log:
        f"logs/{EXP}/distill.log",
    shell:
        # `dmd2 distill` starts launch.num_machines × processes_per_machine processes itself: through
        # `accelerate launch` locally, or one srun task per machine inside a Slurm job (the `mpi` resource
        # makes the Slurm executor run this command directly in the allocation, so that srun works).
        logged("dmd2 distill --experiment {EXP}")
