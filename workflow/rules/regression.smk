rule regression:
    message:
        (
            "Regression pre-training of the {EXP} one-step generator (progress: tail -f {log}; rerun to resume from "
            "work/{EXP}/regression)"
            if PARAMS.current(EXP).regression.enabled
            else "Regression pre-training is off for {EXP} (regression.enabled: false)"
        )
    input:
        teacher=rules.teacher.output.model,
        data=rules.prepare_data.output.data,
        launch=rules.launch_config.output.config,
        code=code("regression"),
        settings=settings_stamp("regression"),
    output:
        # the pre-trained generator; with regression.enabled: false only a stage.json that says so
        model=directory(f"models/{EXP}/regression"),
    params:
        **stage_params("regression"),
    threads: heavy_threads("regression")
    # switched off, the stage only writes its stage.json: run it on the submit host, not as a cluster job
    localrule: not PARAMS.current(EXP).regression.enabled
    resources:
        **slurm("regression"),
    log:
        f"logs/{EXP}/regression.log",
    shell:
        # like distill, `dmd2 regression` starts launch:'s processes itself (see workflow/rules/distill.smk)
        logged("dmd2 regression --experiment {EXP}")
