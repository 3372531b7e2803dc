"""Artifact evaluation: bundle a campaign for reviewers (`bundle`, `manifest`, `artifact`), regenerate its derived
files from the bundle alone (`regenerate`, `images`), derive reduced-scale reproduction profiles (`reduce`) and hold
a rerun against a reference within a tolerance band (`compare`). docs/artifact-evaluation.md describes the flow."""
