rule teacher:
    message:
        "Training the {EXP} teacher (rerun to resume from work/{EXP}/teacher)"
    input:
        train=rules.prepare_data.output.train,
    output:
        model=directory(f"models/{EXP}/teacher"),
    params:
        teacher=block("teacher"),
    threads: heavy_threads()
    log:
        f"logs/{EXP}/teacher.log",
    shell:
        "dmd2 teacher > {log} 2>&1"
