"""Failure taxonomy: what went wrong, and what the launcher does about it."""

from __future__ import annotations

import re
from enum import Enum


class Failure(str, Enum):
    INFEASIBLE = "infeasible"          # the cell cannot run on this hardware: record, never retry
    REQUEUE = "requeue"                # time limit or preemption: resume where it stopped
    RETRY_ELSEWHERE = "retry_elsewhere"  # a sick node or fabric: retry, excluding the node
    CANCELLED = "cancelled"            # a person cancelled it: leave it
    FAILED = "failed"                  # a bug or bad input: record the reason, retry on the next run


_INFEASIBLE = re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|"
                         r"engine build failed|Engine build failed|cannot fit|exceeds the GPU memory", re.I)
_NODE = re.compile(r"\bNCCL\b|\bXid\b|ECC error|uncorrectable|CUDA error: an illegal memory access|"
                   r"unspecified launch failure|GPU is lost|fell off the bus", re.I)


def classify_error(text: str) -> Failure:
    """Classify an exception message raised while measuring a cell."""
    if _INFEASIBLE.search(text):
        return Failure.INFEASIBLE
    if _NODE.search(text):
        return Failure.RETRY_ELSEWHERE
    return Failure.FAILED


def classify_state(state: str) -> Failure | None:
    """Classify a terminal Slurm job state (None: it finished normally)."""
    state = state.split()[0].upper() if state else "UNKNOWN"
    if state == "COMPLETED":
        return None
    if state in ("TIMEOUT", "DEADLINE", "PREEMPTED"):
        return Failure.REQUEUE
    if state in ("NODE_FAIL", "BOOT_FAIL"):
        return Failure.RETRY_ELSEWHERE
    if state == "CANCELLED":
        return Failure.CANCELLED
    return Failure.FAILED
