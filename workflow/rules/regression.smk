rule regression:
    message:
        "Regression pre-training of the {EXP} one-step generator (rerun to resume from work/{EXP}/regression)"
    input:
        teacher=rules.teacher.output.model,
        data=rules.prepare_data.output.data,
        code=code("regression"),
    output:
        # the pre-trained generator; with regression.enabled: false only a stage.json that says so
        model=directory(f"models/{EXP}/regression"),
    params:
        regression=block("regression"),
    threads: heavy_threads()
    log:
        f"logs/{EXP}/regression.log",
    shell:
        "dmd2 regression --experiment {EXP} > {log:q} 2>&1"
