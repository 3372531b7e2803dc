rule merge:
    input:
        plan=CAMPAIGN.plan_file,
        jobs=[CAMPAIGN.job_summary(job) for job in CAMPAIGN.jobs()],
    output:
        cells=CAMPAIGN.merged_file,
        summary=CAMPAIGN.summary_file,
    shell:
        "{INFSCALE} merge {COMMON}"


rule fit:
    input:
        cells=CAMPAIGN.merged_file,
    output:
        fits=CAMPAIGN.fits_file,
    shell:
        "{INFSCALE} fit {COMMON}"


rule claims:
    input:
        cells=CAMPAIGN.merged_file,
        fits=CAMPAIGN.fits_file,
    output:
        claims=CAMPAIGN.claims_file,
    shell:
        "{INFSCALE} claims {COMMON}"


# figures does not wait for fit (it fits its USL curves itself): on two cores the two run side by side
rule figures:
    input:
        cells=CAMPAIGN.merged_file,
        validation=CAMPAIGN.validation_files(),  # optional: `infscale validate` writes them, not this workflow
    output:
        manifest=CAMPAIGN.figures_manifest,
    shell:
        "{INFSCALE} figures {COMMON}"


rule report:
    input:
        cells=CAMPAIGN.merged_file,
        summary=CAMPAIGN.summary_file,
        fits=CAMPAIGN.fits_file,
        claims=CAMPAIGN.claims_file,
        figures=CAMPAIGN.figures_manifest,
    output:
        report=CAMPAIGN.report_file,
    shell:
        "{INFSCALE} report {COMMON}"
