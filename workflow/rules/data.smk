rule prepare_data:
    message:
        "Building the LMDB datasets of {EXP}"
    input:
        code=code("prepare_data"),
    output:
        train=directory(f"data/{EXP}/train.lmdb"),
        heldout=directory(f"data/{EXP}/heldout.lmdb"),
        record=f"data/{EXP}/stage.json",
    params:
        data=block("data"),
    log:
        f"logs/{EXP}/prepare_data.log",
    shell:
        "dmd2 prepare-data --experiment {EXP} > {log:q} 2>&1"
