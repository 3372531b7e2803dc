"""Optional dependencies: a missing one is named with the command that installs it, never a bare
ModuleNotFoundError."""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (the extra that brings it, what it is)
EXTRAS = {
    "torch": ("torch", "PyTorch"),
    "triton": ("torch", "Triton"),
    "pynvml": ("torch", "nvidia-ml-py (pynvml)"),
}


class MissingDependencyError(ImportError):
    """An optional package that a command needs is not installed; the message says how to install it."""


def install_command(extra: str) -> str:
    return (f"`scripts/setup-venv.sh {extra}` in the infscale checkout (or `pip install -c constraints.txt "
            f"-e '.[{extra}]'`; on a GPU machine with its own CUDA build of PyTorch, `pip install -e '.[{extra}]'`)")


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` for `purpose` (e.g. "the calibration microbenchmarks"), or raise MissingDependencyError
    naming the package and the command that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there but something it imports is not: its own error says more
        extra, package = EXTRAS.get(module.split(".")[0], (module, module))
        raise MissingDependencyError(f"{purpose} needs {package}, which is not installed; install it with "
                                     f"{install_command(extra)}") from None
