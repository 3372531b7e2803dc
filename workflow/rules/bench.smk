# One job per bench group. `cells` changes exactly when the group's set of cells changes (ids carry the spec
# hash), which makes Snakemake rerun the group; the job then measures only the cells not yet on disk.
# Measured cell files are not outputs of this rule, so Snakemake never deletes them.

wildcard_constraints:
    job=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    engine=r"[A-Za-z0-9][A-Za-z0-9._-]*",


rule engine:
    output:
        RESULTS / "engines" / "{engine}.json",
    log:
        RESULTS / "logs" / "engines" / "{engine}.log",
    shell:
        "{INFSCALE} engine {COMMON} --engine={wildcards.engine:q} --launcher={LAUNCHER_FILE:q} > {log:q} 2>&1"


rule bench:
    input:
        # the trtllm engine flow: the engines this job runs on are built first, once each (launch/engines.py)
        engines=lambda wildcards: [RESULTS / "engines" / f"{label}.json"
                                   for label in engines_of_job(CAMPAIGN, wildcards.job)] if ENGINE_FLOW else [],
    output:
        RESULTS / "bench" / "{job}.parquet",
    params:
        cells=lambda wildcards: CAMPAIGN.job_signature(wildcards.job),
    log:
        RESULTS / "logs" / "bench" / "{job}.log",
    shell:
        "{INFSCALE} bench {COMMON} --job={wildcards.job:q} --launcher={LAUNCHER_FILE:q} > {log:q} 2>&1"
