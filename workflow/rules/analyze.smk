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
