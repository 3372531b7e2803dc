"""DP replicas behind a router: feeds a cell's requests to replicas in arrival order and runs them.

Offline: every request is routed at t=0 and each replica then runs on its own. Poisson: replicas are advanced
to each arrival time before the request is routed, so least-loaded routing sees the load of that moment. Closed
loop (fixed concurrency): the N clients are spread over the replicas by the router at the start and each client
stays with its replica; a client's next request arrives when its previous one finishes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from infscale.campaign.spec import Arrival
from infscale.serving.executor import Executor
from infscale.serving.scheduler import Replica, RequestState
from infscale.serving.workload import Requests


@dataclass
class ReplicaConfig:
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_tokens: int


def route(router: str, replicas: list[Replica], counter: int, pending_tokens: np.ndarray) -> int:
    """Index of the replica that takes the next request."""
    if router == "round_robin":
        return counter % len(replicas)
    if router == "least_loaded":
        return int(np.argmin(pending_tokens))
    raise ValueError(f"unknown router '{router}'; allowed: round_robin, least_loaded")


def serve(requests: Requests, dp: int, config: ReplicaConfig, arrival: Arrival, router: str,
          make_executor: Callable[[int], Executor]) -> tuple[RequestState, list[Replica]]:
    """Run every request to completion on `dp` replicas; return the request timelines and the replicas."""
    state = RequestState(requests.isl.copy(), requests.osl.copy(), requests.arrival.copy())
    replicas = [
        Replica(i, state, make_executor(i), config.num_blocks, config.block_size, config.max_num_seqs,
                config.max_num_tokens)
        for i in range(dp)
    ]
    work = (requests.isl + requests.osl).astype(np.float64)
    if arrival.mode == "offline":
        _route_all_at_start(state, replicas, np.arange(len(requests)), work, router)
        _run_independent(state, replicas)
    elif arrival.mode == "concurrency":
        _start_clients(state, replicas, work, router, arrival.concurrency or 1)
        _run_independent(state, replicas)
    else:
        _run_open_loop(state, replicas, requests.arrival, work, router)
    return state, replicas


def _route_all_at_start(state: RequestState, replicas: list[Replica], ids: np.ndarray, work: np.ndarray,
                        router: str) -> None:
    if router == "round_robin":
        for index, replica in enumerate(replicas):
            replica.submit_all(ids[index::len(replicas)], 0.0)
        return
    load = np.zeros(len(replicas))
    targets = np.empty(len(ids), dtype=np.int64)
    for counter, request in enumerate(ids):
        target = route(router, replicas, counter, load)
        load[target] += work[request]
        targets[counter] = target
    for index, replica in enumerate(replicas):
        replica.submit_all(ids[targets == index], 0.0)


def _start_clients(state: RequestState, replicas: list[Replica], work: np.ndarray, router: str,
                   clients: int) -> None:
    """Client c sends requests c, c+N, c+2N, … one after another, all to one replica."""
    total = len(state.isl)
    load = np.zeros(len(replicas))
    for client in range(min(clients, total)):
        chain = list(range(client, total, clients))
        target = route(router, replicas, client, load)
        load[target] += work[chain].sum()
        replicas[target].submit_chain(chain, 0.0)


def _run_independent(state: RequestState, replicas: list[Replica]) -> None:
    """Replicas share nothing once routed. Replicas given identical work produce identical timelines, so each
    distinct workload is simulated once and its timeline copied (exact, and a DP8 cell costs one replica)."""
    done: dict[bytes, Replica] = {}
    for replica in replicas:
        key = _work_signature(state, replica)
        twin = done.get(key) if getattr(replica.executor, "deterministic", False) else None
        if twin is None:
            replica.run()
            done[key] = replica
        else:
            replica.copy_timeline_from(twin)


def _work_signature(state: RequestState, replica: Replica) -> bytes:
    ids = np.asarray(replica.planned, dtype=np.int64)
    lengths = np.asarray(replica.chain_lengths, dtype=np.int64)
    return b"|".join(a.tobytes() for a in (state.isl[ids], state.osl[ids], lengths))


def _run_open_loop(state: RequestState, replicas: list[Replica], times: np.ndarray, work: np.ndarray,
                   router: str) -> None:
    order = np.argsort(times, kind="stable")
    for counter, request in enumerate(order):
        at = float(times[request])
        for replica in replicas:
            replica.run(until=at)
        load = np.array([r.outstanding_tokens() for r in replicas], dtype=np.float64)
        replicas[route(router, replicas, counter, load)].submit(int(request), at)
    for replica in replicas:
        replica.run()
