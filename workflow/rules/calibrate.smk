# Calibration (not part of `rule all`): `snakemake ... calibration` measures the campaign's hardware once with the
# microbenchmarks (a job like the bench jobs, through the launcher settings) and writes a hardware profile from
# them. The measurement is never replaced: `infscale microbench` leaves one on disk alone (it says so, exits 0), and
# the output is flagged `update` so Snakemake does not delete it before a rerun (e.g. after this rule's code
# changes) or after a failed one. Move it away to measure again. See docs/slurm.md.

CALIBRATION = RESULTS / "calibration"


wildcard_constraints:
    hardware=re.escape(CAMPAIGN.campaign.hardware.name),  # the campaign's target; its microbench knows no other


rule microbench:
    output:
        update(CALIBRATION / "{hardware}" / "microbench.json"),
    log:
        RESULTS / "logs" / "calibration" / "{hardware}.microbench.log",
    shell:
        "{INFSCALE} microbench {COMMON} --launcher={LAUNCHER_FILE:q} > {log:q} 2>&1"


rule calibrate:
    input:
        CALIBRATION / "{hardware}" / "microbench.json",
    output:
        CALIBRATION / "{hardware}" / "profile.yaml",
    params:
        name=lambda wildcards: f"{CAMPAIGN.campaign.name}.{wildcards.hardware}.microbench",
    log:
        RESULTS / "logs" / "calibration" / "{hardware}.calibrate.log",
    shell:
        "{INFSCALE} calibrate --hardware={wildcards.hardware:q} --microbench={input:q} --name={params.name:q} "
        "--out={output:q} > {log:q} 2>&1"


rule calibration:
    input:
        CALIBRATION / CAMPAIGN.campaign.hardware.name / "profile.yaml",
