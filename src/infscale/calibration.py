"""Hardware profiles: the `sim` model's efficiency constants measured on a machine (and engine) instead of taken
from datasheets and assumptions.

A profile is a YAML file naming the catalog hardware it refines, the engine it describes, each constant it sets
with how it was obtained, the raw files it came from (with their SHA-256) and the measured cells a fit used.
Constants come from two kinds of evidence:

- microbenchmarks (`benchmarks/gpu_microbench.py`, `benchmarks/torch_decode_roofline.py`): the HBM bandwidth that
  decode steps reach, the largest bf16 GEMM throughput, the all-reduce bus bandwidth of large messages, and the
  all-reduce latency inside a CUDA-graph decode step (the step with and without its per-layer all-reduces);
- a fit on measured cells of chosen models (`fit_engine_constants`): the constants no microbenchmark isolates yet
  — the engine's prefill GEMM efficiency and its fixed cost per iteration — chosen to minimise the squared log
  errors of throughput, TPOT p50 and TTFT p50. Cells of other models are then a held-out check.
"""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from infscale.campaign import Campaign
from infscale.campaign.plan import PlannedCell
from infscale.catalog import Efficiency, Hardware
from infscale.results.io import write_text_atomic
from infscale.yamlfile import YamlFileError, read_yaml

if TYPE_CHECKING:
    import polars as pl


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the problem."""


class HardwareProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    hardware: str                       # catalog name it refines, e.g. h100-sxm
    engine: str                         # whose iterations the fitted constants describe (torch, trtllm)
    created_at: str
    efficiency: dict[str, float]        # Efficiency fields it sets
    sources: dict[str, str]             # "efficiency.<field>" -> how the value was obtained
    inputs: dict[str, str] = {}         # raw measurement file name -> sha256
    fitted_on: list[str] = []           # cell ids of the fit (the rest of a campaign is held out)

    @field_validator("efficiency")
    @classmethod
    def _known_fields(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(Efficiency.model_fields))
        if unknown:
            raise ValueError(f"unknown efficiency field(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(Efficiency.model_fields)}")
        return value

    def apply(self, hardware: Hardware) -> Hardware:
        """The catalog hardware with this profile's constants (and their sources) in place."""
        if hardware.name != self.hardware:
            raise ProfileError(f"profile {self.name!r} is for {self.hardware}, not {hardware.name}")
        sources = {**hardware.sources, **{k: f"profile {self.name}: {v}" for k, v in self.sources.items()}}
        return with_efficiency(hardware, self.efficiency).model_copy(update={"sources": sources})


def load_profile(path: str | Path) -> HardwareProfile:
    path = Path(path)
    try:
        exists = path.exists()
    except OSError as err:  # a name the OS refuses (too long)
        raise ProfileError(f"{str(path)[:200]}: not a usable profile path ({err.strerror or err})") from None
    if not exists:
        raise ProfileError(f"{path}: no such profile file")
    try:
        raw = read_yaml(path, "hardware profile")
        if not isinstance(raw, dict) or not all(isinstance(key, str) for key in raw):
            raise ProfileError(f"{path}: not a profile mapping of named keys (name, hardware, efficiency, ...)")
        return HardwareProfile(**raw)
    except YamlFileError as err:
        raise ProfileError(str(err)) from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ProfileError(f"{path}: {problems}") from None


def write_profile(profile: HardwareProfile, path: str | Path) -> Path:
    return write_text_atomic(Path(path), yaml.safe_dump(profile.model_dump(), sort_keys=False, width=120))


def with_efficiency(hardware: Hardware, values: dict[str, float]) -> Hardware:
    """The hardware with some efficiency constants replaced (validated as the catalog's are)."""
    return hardware.model_copy(update={"efficiency": Efficiency(**{**hardware.efficiency.model_dump(), **values})})


def campaign_with_profile(campaign: Campaign, path: str | Path) -> tuple[Campaign, HardwareProfile]:
    """The campaign predicting with the profile at `path` (ProfileError when it is unusable or for other hardware)."""
    profile = load_profile(path)
    return with_hardware(campaign, profile.apply(campaign.hardware)), profile


def with_hardware(campaign: Campaign, hardware: Hardware) -> Campaign:
    """A shallow copy of the campaign that plans and predicts with other hardware constants."""
    patched = copy.copy(campaign)
    patched.hardware = hardware
    return patched


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------- microbenchmarks


def moe_layer_latency(moe_block: dict[str, Any]) -> tuple[float, str]:
    """The fixed cost of one MoE layer from benchmarks/gpu_fastpath_checks.py's MoE block rows: a least-squares
    line of the graphed block's time against the expert bytes it reads; its intercept is what the layer costs
    beyond reading its experts (its slope, the bandwidth, is reported for comparison with η_HBM)."""
    rows = moe_block.get("moe_block", [])
    if len(rows) < 2:
        raise ProfileError("the MoE block benchmark needs at least 2 batch sizes (moe_block rows)")
    gbytes = np.array([r["expert_bytes_read"] for r in rows], dtype=float)
    seconds = np.array([r["graph_ms"] for r in rows], dtype=float) / 1e3
    slope, intercept = np.polyfit(gbytes, seconds, 1)
    if intercept <= 0 or slope <= 0:
        raise ProfileError(f"the MoE block times do not fit a positive fixed cost + bytes/bandwidth "
                           f"(intercept {intercept * 1e6:.1f} us, slope {slope:.3g} s/B)")
    model = moe_block.get("moe_model")
    source = (f"MoE block{f' (one layer of {model})' if model else ''}: router, routing, two grouped GEMMs, captured "
              f"in a CUDA graph on {moe_block.get('gpu', '?')}, batches {', '.join(str(r['batch']) for r in rows)}: "
              f"time = {intercept * 1e6:.0f} us + expert bytes / {1 / slope / 1e12:.2f} TB/s (least squares)")
    return float(intercept), source


# What an engine's iterations are, by construction (not measured): set in every profile of that engine.
ENGINE_STRUCTURE = {
    "torch": ({"pp_microbatches": 1}, "unless a cell sets the engine knob pp_microbatches, the torch engine runs "
                                      "an iteration's whole batch through its PP stages in turn, one micro-batch "
                                      "(backends/torch/executor.py); stages do not overlap"),
}


def check_measured_on(hardware: Hardware, microbench: dict[str, Any]) -> str:
    """The GPU name the microbenchmarks ran on; ProfileError unless it is the catalog hardware's GPU."""
    environment = microbench.get("environment", {})
    gpu = str(environment.get("gpu_name", "?"))
    if environment.get("device") == "cpu" or gpu == "cpu":
        raise ProfileError(f"the microbenchmarks were measured on the CPU (host {environment.get('host', '?')}), "
                           f"not on {hardware.name}: run them on a {hardware.name} node (no profile written)")
    family = hardware.name.split("-")[0].upper()  # h100-sxm -> H100
    if family not in gpu.upper():
        raise ProfileError(f"the microbenchmarks ran on {gpu!r}, not on {hardware.name} ({hardware.description})")
    return gpu


def from_microbenchmarks(hardware: Hardware, microbench: dict[str, Any], roofline: dict[str, Any] | None = None,
                         moe_block: dict[str, Any] | None = None,
                         engine: str = "torch") -> tuple[dict[str, float], dict[str, str]]:
    """Efficiency constants measured by the GPU benchmarks, each with how it was obtained, plus the engine's
    structural constants (ENGINE_STRUCTURE)."""
    gpu = check_measured_on(hardware, microbench)
    efficiency: dict[str, float] = {}
    sources: dict[str, str] = {}
    if engine in ENGINE_STRUCTURE:
        values, why = ENGINE_STRUCTURE[engine]
        efficiency.update(values)
        sources.update({f"efficiency.{name}": why for name in values})
    if moe_block is not None:
        efficiency["moe_layer_latency_s"], sources["efficiency.moe_layer_latency_s"] = moe_layer_latency(moe_block)

    tp1 = [r for r in roofline["rows"] if r["tp"] == 1] if roofline else []
    memory = microbench.get("memory", {})
    if not tp1 and memory.get("hbm_read_bytes_per_s"):
        read = memory["hbm_read_bytes_per_s"]
        efficiency["hbm_bandwidth"] = min(1.0, read / hardware.hbm_bandwidth)
        sources["efficiency.hbm_bandwidth"] = (
            f"HBM read of a {memory.get('buffer_bytes', 0) / 2**30:.0f} GiB reduction: {read / 1e12:.2f} TB/s on "
            f"{gpu}, over the {hardware.hbm_bandwidth / 1e12:.2f} TB/s peak (no decode-step roofline given: an "
            "upper bound on what decode kernels reach)")
    if tp1:
        # bytes a decode step must read over its measured time: what decode kernels reach, over the peak
        achieved = [r["bytes_per_step"] / r["step_seconds_median"] for r in tp1]
        efficiency["hbm_bandwidth"] = float(np.median(achieved)) / hardware.hbm_bandwidth
        sources["efficiency.hbm_bandwidth"] = (
            f"decode steps of the torch engine (CUDA graph, TP1, {', '.join(r['label'] for r in tp1)}) read "
            f"{', '.join(f'{a / 1e12:.2f}' for a in achieved)} TB/s on {gpu}; median over the "
            f"{hardware.hbm_bandwidth / 1e12:.2f} TB/s peak")

    gemms = [g for g in microbench.get("gemm", []) if g["dtype"] == "bf16"]
    if gemms:
        best = max(gemms, key=lambda g: g["tflops"])
        efficiency["matmul"] = best["tflops"] / hardware.dense_tflops["bf16"]
        sources["efficiency.matmul"] = (
            f"best bf16 GEMM of the microbenchmark: {best['tflops']:.0f} TFLOP/s at m={best['m']} n={best['n']} "
            f"k={best['k']} on {gpu}, over the {hardware.dense_tflops['bf16']:.0f} TFLOP/s peak")

    curves = microbench.get("allreduce", [])
    if curves:
        widest = max(curves, key=lambda c: c["world"])
        largest = max(widest["sizes"], key=lambda s: s["bytes"])
        efficiency["allreduce_bus_bandwidth"] = largest["bus_bytes_per_s"]
        sources["efficiency.allreduce_bus_bandwidth"] = (
            f"NCCL all-reduce of {largest['bytes'] / 2**20:.0f} MiB on {widest['world']} GPUs: "
            f"{largest['bus_bytes_per_s'] / 1e9:.0f} GB/s bus bandwidth ({gpu})")

    overhead = microbench.get("engine_overhead", {}).get("rows", [])
    if overhead:
        per_iteration = float(np.median([r["seconds_per_iteration"] for r in overhead]))
        efficiency["iteration_overhead_s"] = per_iteration
        each = ", ".join(f"batch {r['batch']} {r['seconds_per_iteration'] * 1e6:.0f} us" for r in overhead)
        sources["efficiency.iteration_overhead_s"] = (
            f"the torch engine's cost per iteration for a model that does next to no work (2 layers, hidden 64; "
            f"{each}; median) on {gpu}")
    handoff, handoff_source = graphed_small_message(microbench, "pp_handoff")
    if handoff is not None:
        efficiency["p2p_latency_s"] = handoff
        sources["efficiency.p2p_latency_s"] = (f"PP hand-off (a broadcast in a 2-rank NCCL group) {handoff_source} "
                                               f"({gpu})")
    allreduce_graphed, allreduce_source = graphed_small_message(microbench, "all_reduce")
    if allreduce_graphed is not None and not roofline:
        efficiency["allreduce_latency_s"] = allreduce_graphed
        sources["efficiency.allreduce_latency_s"] = f"NCCL all-reduce {allreduce_source} ({gpu})"

    alphas = []
    for row in (roofline or {}).get("rows", []):
        without = row.get("without_layer_allreduce")
        if row["tp"] > 1 and without and row.get("layer_allreduces_per_step"):
            per_call = (row["step_seconds_median"] - without["step_seconds_median"]) / row["layer_allreduces_per_step"]
            bandwidth = efficiency.get("allreduce_bus_bandwidth", hardware.efficiency.allreduce_bus_bandwidth)
            transfer = 2 * (row["tp"] - 1) / row["tp"] * row["allreduce_bytes_each"] / bandwidth
            alphas.append((row["tp"], per_call, max(per_call - transfer, 0.0)))
    if alphas:
        by_tp = {}
        for tp, per_call, alpha in alphas:
            by_tp.setdefault(tp, []).append((per_call, alpha))
        efficiency["allreduce_latency_s"] = float(np.median([a for _, _, a in alphas]))
        sources["efficiency.allreduce_latency_s"] = (
            "all-reduce inside a CUDA-graph decode step (step time with and without the per-layer all-reduces, "
            "Llama-3.1-8B batch 64): " + ", ".join(
                f"TP{tp} {np.median([p for p, _ in v]) * 1e6:.1f} us per call" for tp, v in sorted(by_tp.items()))
            + "; latency = per call − transfer at the bus bandwidth, median over ranks"
            + (f" (the microbenchmark's {allreduce_source}: {allreduce_graphed * 1e6:.1f} us)"
               if allreduce_graphed is not None else ""))
    return efficiency, sources


def graphed_small_message(microbench: dict[str, Any], op: str) -> tuple[float | None, str]:
    """Latency of one call of a collective issued inside a CUDA graph (as decode steps issue them): the smallest
    message's per-call time, median over the measured GPU counts; (None, "") for microbenchmark files without it."""
    found = []
    for curve in microbench.get("collectives", []):
        rows = [r for r in curve.get("ops", {}).get(op, []) if "graph_seconds" in r]
        if rows:
            smallest = min(rows, key=lambda r: r["bytes"])
            found.append((curve["world"], smallest["bytes"], smallest["graph_seconds"]))
    if not found:
        return None, ""
    latency = float(np.median([seconds for _, _, seconds in found]))
    detail = ", ".join(f"{world} GPUs {seconds * 1e6:.1f} us" for world, _, seconds in found)
    return latency, (f"of {found[0][1]} B inside a CUDA graph (per call of 20 captured): {detail}; median "
                     f"{latency * 1e6:.1f} us")


# ---------------------------------------------------------------------------------------- fit on cells

FIT_METRICS = ("output_tok_s", "tpot_ms_p50", "ttft_ms_p50")
FITTED = {  # field -> (lower, upper) bounds of the search
    "matmul": (0.02, 0.9),
    "iteration_overhead_s": (0.0, 5e-3),
}


def fit_engine_constants(campaign: Campaign, planned: list[PlannedCell], merged: pl.DataFrame,
                         hardware: Hardware, train_models: list[str]) -> tuple[dict[str, float], dict[str, str],
                                                                               list[str], float]:
    """Fit the constants in FITTED on the measured CUDA-graph cells of `train_models` (the others stay fixed at
    `hardware`'s values); returns the constants, their sources, the cells used and the final RMS log error."""
    import polars as pl  # here, not at the top: loading a profile (a campaign's hardware.profile) needs no polars
    from scipy.optimize import minimize

    from infscale.analysis.validate import measured_cells, predict_cells

    train = measured_cells(merged).filter(pl.col("model").is_in(train_models)
                                          & (pl.col("engine_path") != "eager"))
    if train.is_empty():
        raise ProfileError(f"no measured CUDA-graph cell of {', '.join(train_models)} to fit on")
    names = list(FITTED)
    low = np.array([FITTED[n][0] for n in names])
    high = np.array([FITTED[n][1] for n in names])

    def hardware_for(x: np.ndarray) -> Hardware:
        return with_efficiency(hardware, {n: float(v) for n, v in zip(names, np.clip(x, low, high))})

    def loss(x: np.ndarray) -> float:
        predicted = predict_cells(with_hardware(campaign, hardware_for(x)), planned, train)
        errors = [np.log(p[m] / row[m]) for row, p in zip(train.iter_rows(named=True), predicted) if p
                  for m in FIT_METRICS if row.get(m) and p.get(m)]
        return float(np.mean(np.square(errors))) if errors else 1e9

    start = np.array([getattr(hardware.efficiency, n) for n in names])
    result = minimize(loss, np.clip(start, low, high), method="Nelder-Mead", bounds=list(zip(low, high)),
                      options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 200})
    fitted = {n: float(v) for n, v in zip(names, np.clip(result.x, low, high))}
    cells = train.get_column("cell_id").to_list()
    rms = float(np.sqrt(result.fun))
    sources = {f"efficiency.{n}": (f"fitted (Nelder-Mead, squared log errors of {', '.join(FIT_METRICS)}) on "
                                   f"{len(cells)} measured cells of {', '.join(train_models)}; RMS log error "
                                   f"{rms:.3f}") for n in names}
    return fitted, sources, cells, rms


def make_profile(name: str, hardware: Hardware, engine: str, efficiency: dict[str, float], sources: dict[str, str],
                 inputs: list[Path], fitted_on: list[str] = ()) -> HardwareProfile:
    return HardwareProfile(
        name=name, hardware=hardware.name, engine=engine,
        created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        efficiency=efficiency, sources=sources, inputs={Path(p).name: sha256_of(p) for p in inputs},
        fitted_on=list(fitted_on))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ProfileError(f"{path}: cannot read the benchmark output ({err})") from None
