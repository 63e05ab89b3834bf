rule fid_reference:
    message:
        "Feature classifier and cached FID reference statistics for {EXP} (progress: tail -f {log})"
    input:
        data=rules.prepare_data.output.data,
        code=code("fid_reference"),
        settings=settings_stamp("fid_reference"),
    output:
        reference=directory(f"models/{EXP}/fid_reference"),
    params:
        **stage_params("fid_reference"),
    threads: heavy_threads("fid_reference")
    resources:
        **slurm("fid_reference"),
    log:
        f"logs/{EXP}/fid_reference.log",
    shell:
        logged("dmd2 fid-reference --experiment {EXP}")


rule evaluate:
    message:
        "Scoring teacher and student of {EXP} (progress: tail -f {log})"
    input:
        teacher=rules.teacher.output.model,
        student=rules.distill.output.student,
        reference=rules.fid_reference.output.reference,
        data=rules.prepare_data.output.data,
        code=code("evaluate"),
        settings=settings_stamp("evaluate"),
    output:
        evaluation=report(f"results/{EXP}/evaluation.json", category="Metrics"),
        metrics=f"results/{EXP}/metrics.json",
        samples=report(directory(f"results/{EXP}/samples"), patterns=["{name}.png"], category="Samples"),
        plots=directory(f"results/{EXP}/plots"),
        record=f"results/{EXP}/stage.json",
    params:
        **stage_params("evaluate"),
    threads: heavy_threads("evaluate")
    resources:
        **slurm("evaluate"),
    log:
        f"logs/{EXP}/evaluate.log",
    shell:
        logged("dmd2 evaluate --experiment {EXP}")


rule report:
    message:
        "Writing results/{EXP}/report.html"
    input:
        evaluation=rules.evaluate.output.evaluation,
        samples=rules.evaluate.output.samples,
        plots=rules.evaluate.output.plots,
        record=rules.evaluate.output.record,
        teacher=rules.teacher.output.model,
        regression=rules.regression.output.model,
        student=rules.distill.output.student,
        data=rules.prepare_data.output.data,
        reference=rules.fid_reference.output.reference,
        code=code("report"),
    output:
        html=report(f"results/{EXP}/report.html", category="Report"),
        figures=directory(f"results/{EXP}/figures"),  # the charts as PNGs: `dvc plots show` draws them offline
    params:
        **stage_params("report"),
    resources:
        **slurm("report"),
    log:
        f"logs/{EXP}/report.log",
    shell:
        logged("dmd2 report --experiment {EXP}")
