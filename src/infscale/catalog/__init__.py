"""Facts about model architectures and GPU hardware, each with its source.

Models come from ``data/models.yaml`` (numbers copied from the models' config.json files) or straight from a
Hugging Face config.json; GPUs and the analytical model's efficiency parameters come from ``data/hardware.yaml``.
"""

from infscale.catalog.hardware import Efficiency, Hardware, get_hardware, load_hardware
from infscale.catalog.hf_config import model_from_hf_config
from infscale.catalog.models import (
    CatalogError,
    ModelArch,
    ParamCounts,
    get_model,
    load_models,
    model_aliases,
    resolve_model,
)

__all__ = [
    "CatalogError",
    "Efficiency",
    "Hardware",
    "ModelArch",
    "ParamCounts",
    "get_hardware",
    "get_model",
    "load_hardware",
    "load_models",
    "model_aliases",
    "model_from_hf_config",
    "resolve_model",
]
