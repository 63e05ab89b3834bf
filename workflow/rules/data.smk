rule prepare_data:
    message:
        "Building the LMDB datasets of {EXP} (progress: tail -f {log})"
    input:
        code=code("prepare_data"),
        settings=settings_stamp("prepare_data"),
    output:
        # the whole folder: train.lmdb, heldout.lmdb and stage.json; for a text-to-image teacher also
        # latents.lmdb, prompts.lmdb and eval_prompts.lmdb
        data=directory(f"data/{EXP}"),
    params:
        **stage_params("prepare_data"),
    threads: heavy_threads("prepare_data")
    resources:
        **slurm("prepare_data"),
    log:
        f"logs/{EXP}/prepare_data.log",
    shell:
        logged("dmd2 prepare-data --experiment {EXP}")
