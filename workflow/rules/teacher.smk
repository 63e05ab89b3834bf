rule teacher:
    message:
        "Training the {EXP} teacher (progress: tail -f {log}; rerun to resume from work/{EXP}/teacher)"
    input:
        data=rules.prepare_data.output.data,
        code=code("teacher"),
        settings=settings_stamp("teacher"),
    output:
        model=directory(f"models/{EXP}/teacher"),
    params:
        **stage_params("teacher"),
    threads: heavy_threads("teacher")
    resources:
        **slurm("teacher"),
    log:
        f"logs/{EXP}/teacher.log",
    shell:
        logged("dmd2 teacher --experiment {EXP}")
