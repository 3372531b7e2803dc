# Artifact evaluation: `snakemake ... ae_bundle` packs the campaign for reviewers (docs/artifact-evaluation.md).
# Not part of `rule all`. Its inputs are the analysis outputs, so it runs after merge, fit and claims; with
# `--config ae_existing=true` it bundles what is on disk without asking for them (committed results such as
# results/reference/gpu-node have no bench job summaries, which would otherwise make Snakemake rerun the bench).

AE_OUT = Path(config.get("ae_out", "artifacts"))
AE_EXISTING = str(config.get("ae_existing", "false")).lower() in ("1", "true", "yes")


rule ae_bundle:
    input:
        [] if AE_EXISTING else [CAMPAIGN.merged_file, CAMPAIGN.summary_file, CAMPAIGN.fits_file, CAMPAIGN.claims_file],
    output:
        tarball=AE_OUT / f"{CAMPAIGN.campaign.name}-ae.tar.gz",
    params:
        # the bundle directory beside the tarball; not a declared output, since Snakemake would add its own
        # timestamp file to it (a file the manifest does not list). A rerun replaces both.
        bundle=AE_OUT / f"{CAMPAIGN.campaign.name}-ae",
    shell:
        "rm -rf {params.bundle:q} && {INFSCALE} ae bundle {COMMON} --out={AE_OUT:q}"
