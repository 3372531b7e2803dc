"""infscale: inference-scaling campaigns for LLMs on HPC clusters."""

__version__ = "0.1.0"
