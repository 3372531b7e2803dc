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
    capacity_policy: str = "max_utilization"   # or guaranteed_no_evict (TensorRT-LLM's default)


def route(router: str, dp: int, counter: int, pending_tokens: np.ndarray) -> int:
    """Index of the replica (of `dp`) that takes the next request."""
    if router == "round_robin":
        return counter % dp
    if router == "least_loaded":
        return int(np.argmin(pending_tokens))
    raise ValueError(f"unknown router '{router}'; allowed: round_robin, least_loaded")


@dataclass
class Route:
    """The requests one replica gets when routing does not depend on timing: offline requests (all at t=0),
    closed-loop client chains, or open-loop arrivals routed round-robin."""

    offline: np.ndarray | None = None          # request ids, all arrived at t=0
    chains: list[list[int]] | None = None      # closed loop: one chain per client
    arrivals: np.ndarray | None = None         # open loop: request ids in arrival order
    starts: list[float] | None = None          # closed loop: when each chain's client starts (None: all at 0)

    def ids(self) -> np.ndarray:
        """Every request of the route."""
        if self.offline is not None:
            return self.offline
        if self.arrivals is not None:
            return self.arrivals
        return np.asarray([r for chain in self.chains or [] for r in chain], dtype=np.int64)


def static_routes(requests: Requests, dp: int, arrival: Arrival, router: str) -> list[Route] | None:
    """Each replica's requests, decided before anything runs; None when the router needs the replicas' live
    load (least-loaded routing of Poisson arrivals), so the replicas must run interleaved in one process."""
    work = (requests.isl + requests.osl).astype(np.float64)
    ids = np.arange(len(requests))
    if arrival.mode == "offline":
        if router == "round_robin":
            return [Route(offline=ids[index::dp]) for index in range(dp)]
        load = np.zeros(dp)
        targets = np.empty(len(ids), dtype=np.int64)
        for counter, request in enumerate(ids):
            targets[counter] = target = route(router, dp, counter, load)
            load[target] += work[request]
        return [Route(offline=ids[targets == index]) for index in range(dp)]
    if arrival.mode == "concurrency":
        # client c sends requests c, c+N, c+2N, … one after another, all to one replica
        clients = arrival.concurrency or 1
        routes = [Route(chains=[]) for _ in range(dp)]
        load = np.zeros(dp)
        for client in range(min(clients, len(ids))):
            chain = list(range(client, len(ids), clients))
            target = route(router, dp, client, load)
            load[target] += work[chain].sum()
            routes[target].chains.append(chain)
        return routes
    if router == "round_robin":
        order = np.argsort(requests.arrival, kind="stable")
        return [Route(arrivals=order[index::dp]) for index in range(dp)]
    return None


def submit_route(replica: Replica, route_: Route) -> None:
    """Queue the offline requests or client chains of `route_` (open-loop arrivals are fed by `run_route`)."""
    if route_.offline is not None:
        replica.submit_all(route_.offline, 0.0)
    chains = route_.chains or []
    for chain, start in zip(chains, route_.starts or [0.0] * len(chains)):
        replica.submit_chain(chain, start)


def stagger_starts(routes: list[Route], state: RequestState) -> None:
    """Spread each replica's closed-loop clients evenly over one request's mean latency (from a run where they all
    started at once): the steady state a long benchmark settles into, where prompts arrive one by one."""
    for route_ in routes:
        ids = route_.ids()
        if not route_.chains or not len(ids):
            continue
        latency = float(np.nanmean(state.finish[ids] - state.arrival[ids]))
        clients = len(route_.chains)
        route_.starts = [k * latency / clients for k in range(clients)]


def run_route(replica: Replica, route_: Route, times: np.ndarray) -> None:
    """Run one replica on its own through its route (arrival times from `times`)."""
    submit_route(replica, route_)
    for request in route_.arrivals if route_.arrivals is not None else ():
        at = float(times[request])
        replica.run(until=at)
        replica.submit(int(request), at)
    replica.run()


def serve(requests: Requests, dp: int, config: ReplicaConfig, arrival: Arrival, router: str,
          make_executor: Callable[[int], Executor]) -> tuple[RequestState, list[Replica]]:
    """Run every request to completion on `dp` replicas; return the request timelines and the replicas."""
    state = RequestState(requests.isl.copy(), requests.osl.copy(), requests.arrival.copy())
    replicas = [
        Replica(i, state, make_executor(i), config.num_blocks, config.block_size, config.max_num_seqs,
                config.max_num_tokens, config.capacity_policy)
        for i in range(dp)
    ]
    if arrival.mode in ("offline", "concurrency"):
        routes = static_routes(requests, dp, arrival, router)
        if arrival.stagger:
            together, _ = serve(requests, dp, config, arrival.model_copy(update={"stagger": False}), router,
                                make_executor)
            stagger_starts(routes, together)
        for replica, route_ in zip(replicas, routes):
            submit_route(replica, route_)
        _run_independent(state, replicas, routes)
    else:
        work = (requests.isl + requests.osl).astype(np.float64)
        _run_open_loop(state, replicas, requests.arrival, work, router)
    return state, replicas


def _run_independent(state: RequestState, replicas: list[Replica], routes: list[Route]) -> None:
    """Replicas share nothing once routed. Replicas given identical work produce identical timelines, so each
    distinct workload is simulated once and its timeline copied (exact, and a DP8 cell costs one replica)."""
    done: dict[bytes, Replica] = {}
    for replica, route_ in zip(replicas, routes):
        key = _work_signature(state, replica) + np.asarray(route_.starts or [], dtype=np.float64).tobytes()
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
        replicas[route(router, len(replicas), counter, load)].submit(int(request), at)
    for replica in replicas:
        replica.run()
