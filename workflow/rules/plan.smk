rule plan:
    input:
        CAMPAIGN.campaign_file,
    output:
        CAMPAIGN.plan_file,
    shell:
        "{INFSCALE} plan {COMMON} --write --quiet"
