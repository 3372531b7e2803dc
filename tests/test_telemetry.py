"""The NVML sampler's bookkeeping (with a scripted reader: this machine has no GPU) and its never-fail rule."""

from __future__ import annotations

import time

import numpy as np
import pytest

from infscale.telemetry import GpuSampler, merge, throttle_names


class ScriptedReader:
    """Two GPUs at fixed power; the energy counter advances 300 J / 200 J between start and stop."""

    def __init__(self, uuids: list[str]):
        self.uuids = uuids
        self.energy_reads = 0

    def energy_mj(self) -> list[float]:
        self.energy_reads += 1
        return [1e6, 2e6] if self.energy_reads == 1 else [1e6 + 300e3, 2e6 + 200e3]

    def sample(self) -> list[tuple[float, ...]]:
        return [(350.0, 90.0, 60.0, 1980.0, 70.0, 0x4), (250.0, 80.0, 40.0, 1755.0, 60.0, 0x0)]

    def close(self) -> None:
        pass


def test_sampler_sums_energy_and_keeps_series() -> None:
    with GpuSampler(["GPU-a", "GPU-b"], interval_s=0.01, reader=ScriptedReader) as sampler:
        time.sleep(0.08)
    result = sampler.result
    summary = result.summary()
    assert summary["energy_j"] == pytest.approx(500.0)
    assert summary["mean_power_w"] == pytest.approx(500.0 / result.seconds)
    assert summary["gpu_power_max_w"] == 350.0
    assert summary["gpu_sm_util_mean"] == pytest.approx(85.0)
    assert summary["gpu_mem_used_gib_max"] == 70.0
    assert summary["gpu_throttle_reasons"] == "sw_power_cap"
    assert summary["telemetry_error"] is None
    series = result.series(first_gpu=2)
    samples = len(result.times)
    assert samples >= 2 and sorted(set(series["gpu"].tolist())) == [2, 3]
    assert len(series["power_w"]) == 2 * samples and np.all(np.diff(result.times) > 0)


def test_missing_nvml_never_fails_the_run() -> None:
    def broken(uuids: list[str]):
        raise RuntimeError("NVML Shared Library Not Found")

    with GpuSampler(["GPU-x"], reader=broken) as sampler:
        pass
    summary = sampler.result.summary()
    assert summary["energy_j"] is None and "NVML unavailable" in summary["telemetry_error"]


def test_real_nvml_reader_without_gpu_reports_why() -> None:
    """The real reader on this GPU-less machine: the run goes on and the reason is recorded."""
    with GpuSampler(["GPU-00000000-0000-0000-0000-000000000000"]) as sampler:
        pass
    assert sampler.result.error and sampler.result.error.startswith("NVML unavailable")


def test_merge_of_ranks_and_throttle_names() -> None:
    parts = []
    for _ in range(2):
        with GpuSampler(["GPU-a", "GPU-b"], interval_s=0.01, reader=ScriptedReader) as sampler:
            time.sleep(0.03)
        parts.append(sampler.result)
    merged = merge(parts)
    assert merged.uuids == ["GPU-a", "GPU-b"] * 2 and merged.summary()["energy_j"] == pytest.approx(1000.0)
    assert throttle_names(0x1 | 0x40 | 0x4) == "sw_power_cap,hw_thermal"  # idle is not a throttle
