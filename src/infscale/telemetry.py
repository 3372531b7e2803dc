"""GPU telemetry during a measurement: an NVML sampler (`pynvml`, from the `nvidia-ml-py` package).

A background thread samples power, SM/memory utilisation, SM clock, memory used and clock-event (throttle)
reasons of the cell's GPUs every `interval_s`; energy comes from NVML's total-energy counter (mJ since driver
load) read at start and stop, or from integrating the power samples on GPUs without that counter. Devices are
found by UUID, because NVML numbers every GPU of the node and ignores CUDA_VISIBLE_DEVICES.

Telemetry never fails a run: without NVML, or when a query fails, the result says why (`error`) and carries
whatever was read.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# NVML clock-event reason bits (nvml.h: nvmlClocksEventReason*, formerly nvmlClocksThrottleReason*)
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clock",
}
SAMPLE_FIELDS = ("power_w", "sm_util", "mem_util", "sm_clock_mhz", "mem_used_gib", "throttle")


def throttle_names(mask: int) -> str:
    """'sw_power_cap,hw_thermal' for a reason bitmask; '' for none (idle is not a throttle and is left out)."""
    return ",".join(name for bit, name in THROTTLE_REASONS.items() if mask & bit and bit != 0x1)


@dataclass
class GpuTelemetry:
    """What the sampler saw on one or more GPUs over the measured phase."""

    uuids: list[str]
    seconds: float = 0.0
    energy_j: list[float] = field(default_factory=list)            # per GPU
    samples: dict[str, list[np.ndarray]] = field(default_factory=dict)  # field -> per GPU array
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    error: str | None = None

    def summary(self) -> dict[str, float | str | None]:
        """Cell-level numbers: energy and mean power summed over the GPUs, utilisation and clocks averaged."""
        out: dict[str, float | str | None] = {"energy_j": None, "mean_power_w": None}
        if self.energy_j and all(np.isfinite(self.energy_j)):
            out["energy_j"] = float(sum(self.energy_j))
            out["mean_power_w"] = out["energy_j"] / self.seconds if self.seconds > 0 else None
        power = self.samples.get("power_w")
        if power and all(len(p) for p in power):
            out["gpu_power_max_w"] = float(max(p.max() for p in power))
        for name, key in (("sm_util", "gpu_sm_util_mean"), ("mem_util", "gpu_mem_util_mean"),
                          ("sm_clock_mhz", "gpu_sm_clock_mhz_mean")):
            values = self.samples.get(name)
            if values and all(len(v) for v in values):
                out[key] = float(np.mean([v.mean() for v in values]))
        used = self.samples.get("mem_used_gib")
        if used and all(len(u) for u in used):
            out["gpu_mem_used_gib_max"] = float(max(u.max() for u in used))
        throttle = self.samples.get("throttle")
        if throttle and all(len(t) for t in throttle):
            mask = 0
            for values in throttle:
                mask |= int(np.bitwise_or.reduce(values.astype(np.int64)))
            out["gpu_throttle_reasons"] = throttle_names(mask)
        out["telemetry_error"] = self.error
        return out

    def series(self, first_gpu: int = 0) -> dict[str, np.ndarray]:
        """One row per (GPU, sample): the `telemetry` list of the cell file."""
        count = len(self.times)
        if not count or not self.samples:
            return {}
        gpus = len(self.uuids)
        columns = {"gpu": np.repeat(np.arange(first_gpu, first_gpu + gpus, dtype=np.int32), count),
                   "time_s": np.tile(self.times, gpus)}
        for name in SAMPLE_FIELDS:
            columns[name] = np.concatenate(self.samples[name])
        return columns


def merge(parts: list[GpuTelemetry]) -> GpuTelemetry:
    """Telemetry of several processes' GPUs (one per rank) as one: energy per GPU kept, series concatenated."""
    merged = GpuTelemetry(uuids=[u for p in parts for u in p.uuids], seconds=max((p.seconds for p in parts), default=0))
    merged.energy_j = [e for p in parts for e in p.energy_j] if all(p.energy_j for p in parts) else []
    count = min((len(p.times) for p in parts), default=0)
    if count and all(p.samples for p in parts):
        merged.times = parts[0].times[:count]
        merged.samples = {name: [a[:count] for p in parts for a in p.samples[name]] for name in SAMPLE_FIELDS}
    errors = [p.error for p in parts if p.error]
    merged.error = "; ".join(sorted(set(errors))) or None
    return merged


class NvmlReader:
    """Reads NVML for GPUs given by UUID ('GPU-…', as torch.cuda.get_device_properties(i).uuid gives it
    without the prefix). Raises on construction when NVML is not usable."""

    def __init__(self, uuids: list[str]):
        import pynvml  # from nvidia-ml-py

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handles = [pynvml.nvmlDeviceGetHandleByUUID(u if u.startswith("GPU-") else f"GPU-{u}") for u in uuids]

    def energy_mj(self) -> list[float]:
        values = []
        for handle in self.handles:
            try:
                values.append(float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle)))
            except self.nvml.NVMLError:
                values.append(float("nan"))  # pre-Volta: integrate the power samples instead
        return values

    def sample(self) -> list[tuple[float, ...]]:
        nvml = self.nvml
        rows = []
        for handle in self.handles:
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            rows.append((
                nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                float(util.gpu),
                float(util.memory),
                float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
                nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30,
                float(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)),
            ))
        return rows

    def close(self) -> None:
        self.nvml.nvmlShutdown()


def visible_gpus() -> list[tuple[str, str]]:
    """(UUID, name) of the GPUs this process may use: CUDA_VISIBLE_DEVICES (indices or UUIDs) applied to NVML's
    list; [] without NVML or GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid, name = pynvml.nvmlDeviceGetUUID(handle), pynvml.nvmlDeviceGetName(handle)
            gpus.append((uuid.decode() if isinstance(uuid, bytes) else uuid,
                         name.decode() if isinstance(name, bytes) else name))
    finally:
        pynvml.nvmlShutdown()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    chosen = []
    for entry in (e.strip() for e in visible.split(",") if e.strip()):
        if entry.isdigit():
            if int(entry) < len(gpus):
                chosen.append(gpus[int(entry)])
        else:
            chosen.extend(g for g in gpus if g[0] == entry or g[0] == f"GPU-{entry}")
    return chosen


class GpuSampler:
    """`with GpuSampler(uuids) as sampler: …` then `sampler.result` (a GpuTelemetry). `reader` makes the
    sampler testable without GPUs: a callable taking the UUIDs and returning an object like NvmlReader."""

    def __init__(self, uuids: list[str], interval_s: float = 0.1,
                 reader: Callable[[list[str]], NvmlReader] = NvmlReader):
        self.uuids = list(uuids)
        self.interval_s = interval_s
        self.make_reader = reader
        self.result = GpuTelemetry(uuids=self.uuids)
        self._rows: list[list[tuple[float, ...]]] = []
        self._times: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader: NvmlReader | None = None

    def __enter__(self) -> GpuSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._reader = self.make_reader(self.uuids)
            self._energy_start = self._reader.energy_mj()
        except Exception as err:  # no NVML, no such GPU: measure without telemetry
            self.result.error = f"NVML unavailable: {type(err).__name__}: {err}"
            return
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="infscale-nvml", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                rows = self._reader.sample()
            except Exception as err:
                self.result.error = f"NVML sample failed: {type(err).__name__}: {err}"
                return
            self._times.append(time.perf_counter() - self._t0)
            self._rows.append(rows)
            self._stop.wait(self.interval_s)

    def stop(self) -> GpuTelemetry:
        if self._reader is None:
            return self.result
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        result = self.result
        result.seconds = time.perf_counter() - self._t0
        try:
            end = self._reader.energy_mj()
        except Exception as err:
            end = [float("nan")] * len(self.uuids)
            result.error = result.error or f"NVML energy read failed: {type(err).__name__}: {err}"
        finally:
            try:
                self._reader.close()
            except Exception:
                pass
            self._reader = None
        result.times = np.asarray(self._times, dtype=np.float64)
        if self._rows:
            data = np.asarray(self._rows, dtype=np.float64)  # [sample, gpu, field]
            result.samples = {name: [data[:, g, k].copy() for g in range(len(self.uuids))]
                              for k, name in enumerate(SAMPLE_FIELDS)}
        result.energy_j = [(e - s) / 1000.0 for s, e in zip(self._energy_start, end)]
        for g, value in enumerate(result.energy_j):
            if not np.isfinite(value) and result.samples and len(result.times) > 1:
                result.energy_j[g] = float(np.trapezoid(result.samples["power_w"][g], result.times))
        return result
