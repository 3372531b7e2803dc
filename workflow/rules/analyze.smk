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
