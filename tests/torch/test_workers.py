"""Rank processes of a multi-GPU cell (gloo on CPU): a rank's error reaches the driver with the rank named, no
rank is left waiting, and the same processes run the next cell."""

from __future__ import annotations

import numpy as np
import pytest

from infscale.backends.torch.backend import assemble
from infscale.backends.torch.workers import CellWork, RankFailure, SpawnedRanks
from infscale.campaign.spec import Arrival
from infscale.serving.cluster import ReplicaConfig, static_routes
from infscale.serving.workload import Requests

pytestmark = pytest.mark.torch


def cell_work(model, tp: int, dp: int, requests: int = 4, osl: int = 5) -> CellWork:
    reqs = Requests(np.full(requests, 12), np.full(requests, osl), np.zeros(requests))
    arrival = Arrival()
    return CellWork(arch=model, tp=tp, pp=1, dp=dp, requests=reqs,
                    routes=static_routes(reqs, dp, arrival, "round_robin"), arrival=arrival,
                    config=ReplicaConfig(64, 4, 8, 64), dtype="float32", seed=3)


def test_a_rank_error_is_reported_and_the_ranks_run_the_next_cell(arch) -> None:
    ranks = SpawnedRanks(2)
    try:
        # 3 KV heads cannot be split over 2 TP ranks: every rank fails while building, none hangs
        with pytest.raises(RankFailure, match=r"rank \d on .*does not divide the 3 KV heads"):
            ranks.run(cell_work(arch(num_attention_heads=6, num_kv_heads=3), tp=2, dp=1))
        assert ranks.alive
        work = cell_work(arch(), tp=2, dp=1)
        result = assemble(work, ranks.run(work), gpus=2)
        assert result.summary["output_tokens"] == 4 * 5 and result.summary["engine_path"] == "eager"
        dp_work = cell_work(arch(), tp=1, dp=2, requests=6)
        dp_result = assemble(dp_work, ranks.run(dp_work), gpus=2)
        assert sorted(np.bincount(dp_result.requests["replica"]).tolist()) == [3, 3]
    finally:
        ranks.close()
    assert not ranks.alive
