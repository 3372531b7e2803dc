"""A cell's requests as a `trtllm-bench` dataset (JSON Lines), written by infscale itself.

Format (trtllm-bench's `InferenceRequest`): one object per line with `task_id`, `input_ids` and `output_tokens`,
serialised with `separators=(",", ":")` as `prepare_dataset` does. Token ids are drawn uniformly from the
vocabulary with the EOS id replaced, like `prepare_dataset`'s synthetic generator, but seeded per (seed, request)
so the file is the same on every node and rerun. Run with `--eos_id -1` (the default) so every request decodes
exactly `output_tokens` tokens (random or dummy weights produce arbitrary tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from infscale.results.io import write_text_atomic
from infscale.serving.workload import Requests


def dataset_lines(requests: Requests, vocab_size: int, eos_token_id: int | None, seed: int) -> list[str]:
    lines = []
    for task_id, (isl, osl) in enumerate(zip(requests.isl.tolist(), requests.osl.tolist())):
        tokens = np.random.default_rng([seed, task_id]).integers(0, vocab_size, int(isl))
        if eos_token_id is not None:
            tokens[tokens == eos_token_id] = (eos_token_id + 1) % vocab_size
        lines.append(json.dumps({"task_id": task_id, "input_ids": tokens.tolist(), "output_tokens": int(osl)},
                                separators=(",", ":")))
    return lines


def write_dataset(path: Path, requests: Requests, vocab_size: int, eos_token_id: int | None, seed: int) -> Path:
    """Write atomically (a job on another node may read the same shared path)."""
    return write_text_atomic(Path(path), "\n".join(dataset_lines(requests, vocab_size, eos_token_id, seed)) + "\n")
