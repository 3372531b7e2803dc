# The two commands of the README, and a few helpers. Everything runs in .venv (created on first use).
.PHONY: demo test test-quick bench slurm-up slurm-down clean-demo

demo:  ## set up .venv and run the demo campaign (sim backend, local executor); prints the summary
	scripts/setup-venv.sh
	.venv/bin/snakemake --profile profiles/local --config campaign=config/demo.yaml

test:  ## set up .venv (with torch's CPU build), chromium and a private local Slurm cluster, then run every test (none may skip)
	scripts/setup-venv.sh test,torch
	bash scripts/install-chromium.sh
	bash scripts/local-slurm.sh up
	INFSCALE_REQUIRE_SLURM=1 INFSCALE_REQUIRE_TORCH=1 INFSCALE_REQUIRE_TRITON=1 INFSCALE_REQUIRE_CHROMIUM=1 \
		.venv/bin/python -m pytest -q

test-quick:  ## the tests that need no Slurm cluster
	scripts/setup-venv.sh test,torch
	.venv/bin/python -m pytest -q -m "not slurm"

bench:  ## the CPU benchmarks of BENCHMARKS.md
	scripts/setup-venv.sh test
	.venv/bin/python benchmarks/run_cpu_benchmarks.py

slurm-up:
	bash scripts/local-slurm.sh up

slurm-down:
	bash scripts/local-slurm.sh down

clean-demo:  ## remove the demo's results (measured data elsewhere is untouched)
	rm -rf results/demo
