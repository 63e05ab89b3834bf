rule distill:
    message:
        "DMD2 distillation of {EXP} (rerun to resume from work/{EXP}/distill)"
    input:
        teacher=rules.teacher.output.model,
        train=rules.prepare_data.output.train,
    output:
        student=directory(f"models/{EXP}/student"),
    params:
        distill=block("distill"),
    threads: workflow.cores  # torch uses every core; two such jobs side by side thrash
    log:
        f"logs/{EXP}/distill.log",
    shell:
        "dmd2 distill > {log} 2>&1"
