# The dmd2 pipeline for Snakemake. Rules only call `dmd2 <stage>`; the logic lives in src/dmd2.
# Run:   snakemake --cores all                              (local)
#        snakemake --profile slurm                          (cluster; `slurm` links to workflow/profiles/slurm)
# Every rule passes its params.yaml block through `params:`, so editing params.yaml reruns exactly
# the affected stages and what depends on them. dvc.yaml describes the same DAG (tests/test_dag.py).

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/launch.smk"
include: "workflow/rules/regression.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"


onsuccess:
    record_in_dvc_lock()


rule all:
    default_target: True
    input:
        f"results/{EXP}/report.html",
        f"results/{EXP}/metrics.json",
