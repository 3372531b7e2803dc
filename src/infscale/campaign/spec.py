"""The campaign file (`config/*.yaml`): its schema, and loading it with one clear line per mistake.

Structure is checked by pydantic (types, unknown keys, ranges); meaning is checked afterwards against the
catalog (model and hardware names, layouts that fit the model and the target, lengths within the context).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from infscale.campaign.layout import Layout, enumerate_layouts, layout_problem
from infscale.catalog import CatalogError, Hardware, ModelArch, get_hardware, resolve_model
from infscale.yamlfile import YamlFileError, read_yaml

DTYPES = ("bf16", "fp8")
# Upper bounds that keep every count a 64-bit integer and every loop of the planner and the simulator finite.
MAX_NODES = 1024                # nodes one layout may use (bounds layout enumeration: nodes × GPUs per node)
MAX_REQUESTS = 1_000_000        # requests of one cell (also bounds the simulator's work per cell)
MAX_TOKENS = 1_000_000_000      # any length parameter, in tokens
MAX_SEED = 2**63 - 1
MAX_PP = 4096                   # pipeline stages or micro-batches (far above any model's layer count)
BACKENDS = ("sim", "torch", "trtllm")
ROUTERS = ("round_robin", "least_loaded")
ENGINES = ("trtllm", "torch")   # what the sim's step model stands for (SimSettings.engine)
# Knob defaults of an engine where the campaign leaves a knob unset: TensorRT-LLM as trtllm-bench configures it
# (BuildConfig's max_batch_size 2048 and max_num_tokens 8192, tokens_per_block 32); others take EngineKnobs'.
ENGINE_KNOB_DEFAULTS: dict[str | None, dict[str, object]] = {
    "trtllm": {"max_num_seqs": 2048, "max_num_tokens": 8192, "kv_block_size": 32},
}


class SpecError(ValueError):
    """An invalid campaign file. `lines` holds one line per problem: `file: key: what is wrong`."""

    def __init__(self, lines: list[str]):
        self.lines = [_printable(line) for line in lines]
        super().__init__("\n".join(self.lines))


def _printable(text: str) -> str:
    """One line, whatever the file held: control characters (a key with a newline in it) shown escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


TokenCount = Annotated[int, Field(gt=0, le=MAX_TOKENS)]


class _Strict(BaseModel):
    # strict: `true` is not a count and "8" is not a number; finite: no inf/nan where a number is meant
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------- lengths


class LengthDist(_Strict):
    """A request length: fixed, or drawn per request from a seeded distribution (always within [min, cap])."""

    dist: Literal["fixed", "normal", "lognormal"]
    value: int | None = Field(default=None, gt=0, le=MAX_TOKENS, description="fixed: the length")
    mean: float | None = Field(default=None, gt=0, le=MAX_TOKENS, description="normal: mean")
    std: float | None = Field(default=None, ge=0, le=MAX_TOKENS, description="normal: standard deviation")
    median: float | None = Field(default=None, gt=0, le=MAX_TOKENS, description="lognormal: median (exp of mu)")
    sigma: float | None = Field(default=None, ge=0, le=10, description="lognormal: sigma of log length")
    min: int = Field(default=1, gt=0, le=MAX_TOKENS)
    cap: int | None = Field(default=None, gt=0, le=MAX_TOKENS, description="largest length ever drawn")

    @model_validator(mode="after")
    def _parameters_match_dist(self) -> "LengthDist":
        needed = {"fixed": ("value",), "normal": ("mean", "std", "cap"), "lognormal": ("median", "sigma", "cap")}
        missing = [k for k in needed[self.dist] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a {self.dist} length needs {', '.join(missing)}")
        if self.cap is not None and self.cap < self.min:
            raise ValueError(f"cap={self.cap} is below min={self.min}")
        return self

    @property
    def max_length(self) -> int:
        return self.value if self.dist == "fixed" else self.cap  # type: ignore[return-value]

    @property
    def mean_length(self) -> float:
        """Approximate mean (ignores the clipping at min/cap); used for cost estimates only."""
        if self.dist == "fixed":
            return float(self.value)  # type: ignore[arg-type]
        if self.dist == "normal":
            return float(self.mean)  # type: ignore[arg-type]
        return min(float(self.median) * math.exp(self.sigma**2 / 2), float(self.cap))  # type: ignore[arg-type,operator]

    @property
    def label(self) -> str:
        if self.dist == "fixed":
            return str(self.value)
        if self.dist == "normal":
            return f"N{self.mean:g}s{self.std:g}c{self.cap}"
        return f"LN{self.median:g}s{self.sigma:g}c{self.cap}"

    @classmethod
    def fixed(cls, value: int) -> "LengthDist":
        return cls(dist="fixed", value=value)


def _as_length(value: Any) -> Any:
    if isinstance(value, (bool, float, str)):
        raise ValueError("a length must be a whole number of tokens > 0, or a distribution "  # noqa: TRY004 (pydantic)
                         "{dist: fixed|normal|lognormal, ...}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError("a length must be a whole number of tokens > 0")
        if value > MAX_TOKENS:
            raise ValueError(f"a length must be at most {MAX_TOKENS:,} tokens")
        return {"dist": "fixed", "value": value}
    return value


Length = Annotated[LengthDist, BeforeValidator(_as_length)]


# ---------------------------------------------------------------------------------------------- arrival


Concurrency = Annotated[int, Field(gt=0, le=MAX_REQUESTS)]
Rate = Annotated[float, Field(gt=0, le=1e9, description="requests per second")]


class Arrival(_Strict):
    """How requests arrive: all at t=0 (offline), a fixed number in flight (closed loop), or Poisson at a rate."""

    mode: Literal["offline", "concurrency", "poisson"] = "offline"
    concurrency: Concurrency | None = None
    rate: Rate | None = None
    stagger: bool = Field(
        default=False,
        description="concurrency, sim backend: the clients start spread evenly over one request's latency (the "
        "steady state a long benchmark settles into) instead of all at t=0 (as trtllm-bench starts them)")

    @model_validator(mode="after")
    def _parameters_match_mode(self) -> "Arrival":
        if self.stagger and self.mode != "concurrency":
            raise ValueError(f"'stagger' spreads the start of closed-loop clients: arrival mode 'concurrency' only "
                             f"(got mode '{self.mode}')")
        if self.mode == "concurrency" and self.concurrency is None:
            raise ValueError("arrival mode 'concurrency' needs 'concurrency: N'")
        if self.mode == "poisson" and self.rate is None:
            raise ValueError("arrival mode 'poisson' needs 'rate: requests per second'")
        if self.mode == "offline" and (self.concurrency is not None or self.rate is not None):
            given = ", ".join(f"{k}={v}" for k, v in (("concurrency", self.concurrency), ("rate", self.rate))
                              if v is not None)
            raise ValueError(f"arrival mode 'offline' takes neither 'concurrency' nor 'rate' (got {given})")
        return self

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"c{self.concurrency}" + ("s" if self.stagger else "")
        if self.mode == "poisson":
            return f"r{self.rate:g}"
        return "off"


class ArrivalSweep(_Strict):
    """`arrival:` in a workload; `concurrency` and `rate` may be lists (swept)."""

    mode: Literal["offline", "concurrency", "poisson"] = "offline"
    concurrency: Concurrency | list[Concurrency] | None = None
    rate: Rate | list[Rate] | None = None
    stagger: bool = False

    @model_validator(mode="after")
    def _parameters_match_mode(self) -> ArrivalSweep:
        try:
            self.expand()  # Arrival's own checks (e.g. 'concurrency' mode without a number), at load time
        except ValidationError as err:
            raise ValueError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return self

    def expand(self) -> list[Arrival]:
        if self.mode == "concurrency":
            return [Arrival(mode="concurrency", concurrency=c, stagger=self.stagger)
                    for c in _as_list(self.concurrency)]
        if self.mode == "poisson":
            return [Arrival(mode="poisson", rate=r, stagger=self.stagger) for r in _as_list(self.rate)]
        return [Arrival(mode="offline", concurrency=self.concurrency, rate=self.rate, stagger=self.stagger)]


# ---------------------------------------------------------------------------------------------- engine


class EngineKnobs(_Strict):
    """Engine settings of one cell (vLLM / TensorRT-LLM names in brackets)."""

    max_num_seqs: int = Field(default=256, gt=0, le=1_000_000,
                              description="cap on a replica's running batch [max_batch_size]")
    max_num_tokens: int = Field(default=8192, gt=0, le=100_000_000,
                                description="tokens per iteration; chunked-prefill budget")
    kv_memory_fraction: float | None = Field(
        default=None, gt=0, le=1,
        description="fraction of each GPU's memory for weights + activations + KV [gpu_memory_utilization]; "
        "None: the hardware's default",
    )
    kv_block_size: int = Field(default=16, gt=0, le=1_048_576, description="tokens per KV block [tokens_per_block]")
    router: Literal["round_robin", "least_loaded"] = "round_robin"
    pp_microbatches: int | None = Field(
        default=None, ge=0, le=MAX_PP,
        description="micro-batches a PP replica's decode step is split into, pipelined over its stages: 0 one per "
        "stage, n at most n (1: the stages in turn); None: the engine's own schedule (sim: the hardware profile's, "
        "by default one per stage; torch: 1; TensorRT-LLM schedules them itself and takes no value). The torch "
        "engine takes 0, 1 or pp. Ignored (and left out of the cell) where pp = 1",
    )
    scheduler_policy: Literal["guaranteed_no_evict", "max_utilization"] | None = Field(
        default=None,
        description="KV capacity scheduling [trtllm-bench --scheduler_policy]: guaranteed_no_evict admits a request "
        "only when its whole sequence fits (never preempts); max_utilization admits while blocks are free and "
        "preempts the newest request when they run out. None: the engine's own (TensorRT-LLM: guaranteed_no_evict; "
        "the torch engine and the sim's roofline model: max_utilization)",
    )


class EngineSweep(_Strict):
    """`engine:` in the campaign or a workload; each knob may be a list (swept)."""

    max_num_seqs: int | list[int] | None = None
    max_num_tokens: int | list[int] | None = None
    kv_memory_fraction: float | list[float] | None = None
    kv_block_size: int | list[int] | None = None
    router: str | list[str] | None = None
    pp_microbatches: int | list[int] | None = None
    scheduler_policy: str | list[str] | None = None

    def merged_over(self, base: "EngineSweep") -> "EngineSweep":
        ours = self.model_dump(exclude_none=True)
        return EngineSweep(**{**base.model_dump(exclude_none=True), **ours})

    def expand(self, defaults: dict[str, object] | None = None) -> list[EngineKnobs]:
        """Every combination of the swept knobs; unset knobs take `defaults` (an engine's), then EngineKnobs'."""
        values = {**(defaults or {}), **self.model_dump(exclude_none=True)}
        combos: list[dict[str, Any]] = [{}]
        for key, value in values.items():
            combos = [{**c, key: v} for c in combos for v in _as_list(value)]
        return [EngineKnobs(**c) for c in combos]


# ---------------------------------------------------------------------------------------------- parts


class Precision(_Strict):
    weights: Literal["bf16", "fp8"] = "bf16"
    kv: Literal["bf16", "fp8"] = "bf16"

    @property
    def label(self) -> str:
        return self.weights if self.kv == "bf16" else f"{self.weights}-kv{self.kv}"

    @classmethod
    def parse(cls, value: Any) -> Any:
        """'fp8' → fp8 weights, bf16 KV; 'fp8/fp8' → both fp8; dicts pass through to validation."""
        if isinstance(value, str):
            weights, _, kv = value.partition("/")
            return {"weights": weights, "kv": kv or "bf16"}
        return value


class LayoutSweep(_Strict):
    """`layouts:` as a generator: every valid dp × tp × pp using one of `gpus` GPU counts."""

    gpus: list[Annotated[int, Field(gt=0)]] = Field(min_length=1, description="GPU counts; each at most the "
                                                    "target's nodes × GPUs per node")
    max_pp: int | None = Field(default=None, gt=0, le=MAX_PP)
    expert_parallel: list[bool] = Field(default_factory=lambda: [False], description="MoE: also ep = tp")

    def layouts(self, model: ModelArch, hardware: Hardware, nodes: int) -> list[Layout]:
        """The sweep's valid layouts for one model, each once, in enumeration order."""
        layouts: list[Layout] = []
        for expert_parallel in self.expert_parallel:
            for layout in enumerate_layouts(model, hardware, self.gpus, nodes, self.max_pp, expert_parallel):
                if layout not in layouts:
                    layouts.append(layout)
        return layouts


LayoutsField = list[str] | LayoutSweep


class ModelEntry(_Strict):
    name: str = Field(description="catalog name, or a path to a Hugging Face config.json")
    precision: list[Precision] | None = None
    layouts: LayoutsField | None = None
    proxy_layers: int | None = Field(
        default=None, gt=0,
        description="layer-sliced proxy: run only this many of the model's layers (at the full model's per-GPU "
        "shapes and KV token budget) and scale the per-layer time to the full depth",
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _parse_precision(cls, value: Any) -> Any:
        return [Precision.parse(v) for v in _as_list(value)] if value is not None else None


class Workload(_Strict):
    """Request lengths and arrival. Give `isl` + `osl` (osl may be a list: a sweep) or `pairs` of [isl, osl]."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=64)
    isl: Length | None = None
    osl: list[Length] | None = None
    pairs: list[tuple[TokenCount, TokenCount]] | None = None
    requests: int | Literal["auto"] | None = None
    arrival: ArrivalSweep | None = None
    engine: EngineSweep | None = None

    @field_validator("osl", mode="before")
    @classmethod
    def _osl_lengths(cls, value: Any) -> Any:
        return _as_list(value) if value is not None else None

    @field_validator("pairs", mode="before")
    @classmethod
    def _pairs_as_tuples(cls, value: Any) -> Any:
        """YAML gives [isl, osl] lists; strict validation takes a pair as a tuple."""
        if isinstance(value, list):
            return [tuple(pair) if isinstance(pair, list) else pair for pair in value]
        return value

    @field_validator("arrival", mode="before")
    @classmethod
    def _arrival_shorthand(cls, value: Any) -> Any:
        return {"mode": value} if isinstance(value, str) else value

    @field_validator("requests")
    @classmethod
    def _positive_requests(cls, value: Any) -> Any:
        if isinstance(value, int) and not 1 <= value <= MAX_REQUESTS:
            raise ValueError(f"requests must be at least 1 and at most {MAX_REQUESTS:,} (or 'auto')")
        return value

    @model_validator(mode="after")
    def _lengths_given_once(self) -> "Workload":
        if self.pairs is not None and (self.isl is not None or self.osl is not None):
            raise ValueError("give either 'pairs' or 'isl' + 'osl', not both")
        if self.pairs is None and (self.isl is None or self.osl is None):
            raise ValueError("needs 'isl' and 'osl' (or 'pairs: [[isl, osl], ...]')")
        return self

    def length_pairs(self) -> list[tuple[LengthDist, LengthDist]]:
        if self.pairs is not None:
            return [(LengthDist.fixed(i), LengthDist.fixed(o)) for i, o in self.pairs]
        return [(self.isl, osl) for osl in self.osl]  # type: ignore[misc]


class SimSettings(_Strict):
    """`sim:` — how the `sim` backend (and every prediction of a campaign) models an iteration."""

    engine: Literal["trtllm", "torch"] | None = Field(
        default=None,
        description="the engine the step model stands for: trtllm composes each iteration from measured "
        "TensorRT-LLM operator latencies (aiconfigurator-core) and schedules as trtllm-bench does; torch is the "
        "roofline model with the hardware profile's constants. None: the backend's engine (a trtllm campaign "
        "predicts TensorRT-LLM, a torch campaign the torch engine); for backend sim, the roofline model",
    )


class HardwareTarget(_Strict):
    name: str
    nodes: int = Field(default=1, gt=0, le=MAX_NODES, description="most nodes one layout may use")
    profile: str | None = Field(default=None, description="a hardware profile (infscale calibrate) whose measured "
                                "constants the sim model and the planner use; a path relative to the campaign "
                                "file, or to the working directory")


class CampaignSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = Field(default="", max_length=10_000)
    backend: Literal["sim", "torch", "trtllm"] = "sim"
    hardware: HardwareTarget
    models: list[ModelEntry] = Field(min_length=1)
    precision: list[Precision] = Field(default_factory=lambda: [Precision()])
    layouts: LayoutsField
    workloads: list[Workload] = Field(min_length=1)
    requests: int | Literal["auto"] = "auto"
    requests_per_slot: int = Field(default=4, gt=0, le=10_000,
                                   description="'auto' requests = this × the layout's max concurrency")
    min_requests: int = Field(default=1, gt=0, le=MAX_REQUESTS, description="lower bound for 'auto'")
    max_requests: int = Field(default=16384, gt=0, le=MAX_REQUESTS, description="upper bound for 'auto'")
    arrival: ArrivalSweep = Field(default_factory=ArrivalSweep)
    engine: EngineSweep = Field(default_factory=EngineSweep)
    sim: SimSettings = Field(default_factory=SimSettings)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)

    @field_validator("models", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return [{"name": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("hardware", mode="before")
    @classmethod
    def _hardware_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("precision", mode="before")
    @classmethod
    def _parse_precision(cls, value: Any) -> Any:
        return [Precision.parse(v) for v in _as_list(value)]

    @field_validator("arrival", mode="before")
    @classmethod
    def _arrival_shorthand(cls, value: Any) -> Any:
        return {"mode": value} if isinstance(value, str) else value

    @field_validator("requests")
    @classmethod
    def _positive_requests(cls, value: Any) -> Any:
        if isinstance(value, int) and not 1 <= value <= MAX_REQUESTS:
            raise ValueError(f"requests must be at least 1 and at most {MAX_REQUESTS:,} (or 'auto')")
        return value

    @model_validator(mode="after")
    def _request_bounds_in_order(self) -> "CampaignSpec":
        if self.min_requests > self.max_requests:
            raise ValueError(f"min_requests ({self.min_requests}) is above max_requests ({self.max_requests})")
        return self

    @field_validator("workloads")
    @classmethod
    def _unique_workload_names(cls, value: list[Workload]) -> list[Workload]:
        names = [w.name for w in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"workload names must be unique; repeated: {', '.join(duplicates)}")
        return value


# ---------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ProfileRef:
    """The hardware profile a campaign predicts with: where it was read, its content hash and what it says."""

    path: Path
    sha256: str
    name: str
    created_at: str
    engine: str
    efficiency: dict[str, float]

    @property
    def label(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"

    def provenance(self) -> dict[str, object]:
        return {"name": self.name, "sha256": self.sha256, "path": str(self.path), "created_at": self.created_at,
                "engine": self.engine, "efficiency": self.efficiency}


class Campaign:
    """A validated campaign: the spec plus the catalog entries it names."""

    def __init__(self, spec: CampaignSpec, path: Path | None, config_hash: str,
                 models: dict[str, ModelArch], hardware: Hardware,
                 layouts: dict[str, list[Layout] | LayoutSweep], profile: ProfileRef | None = None):
        self.spec = spec
        self.path = path
        self.config_hash = config_hash
        self.models = models            # entry name -> architecture
        self.hardware = hardware        # with the profile's constants in place when the campaign names one
        self.layouts = layouts          # entry name -> explicit layouts, or the sweep to expand
        self.profile = profile

    @property
    def prediction_profile(self) -> str | None:
        """The label sim cells carry (it enters their spec hash: other constants, other predictions)."""
        return self.profile.label if self.profile is not None and self.spec.backend == "sim" else None

    @property
    def sim_engine(self) -> str | None:
        """The engine the predictions stand for: `sim.engine`, else the backend's (None: the roofline model)."""
        return engine_of(self.spec)

    @property
    def engine_knob_defaults(self) -> dict[str, object]:
        """The knobs unset in the campaign take the engine's defaults (TensorRT-LLM's as trtllm-bench sets them)."""
        return dict(ENGINE_KNOB_DEFAULTS.get(self.sim_engine, {}))

    @property
    def prediction_engine(self) -> str | None:
        """The label sim cells predicted by an engine model other than the roofline carry (in their spec hash):
        the engine and the version of the measured data it composes."""
        if self.spec.backend != "sim" or self.sim_engine != "trtllm":
            return None
        from infscale.opdata import data_version

        return f"trtllm/{data_version().split(' ')[0]}"

    @property
    def name(self) -> str:
        return self.spec.name

    def model_for(self, cell: "object") -> ModelArch:
        """The architecture of a cell's model (cells name models by their catalog/architecture name)."""
        for model in self.models.values():
            if model.name == cell.model:  # type: ignore[attr-defined]
                return model
        raise KeyError(f"model '{cell.model}' is not part of campaign '{self.name}'")  # type: ignore[attr-defined]


def load_campaign(path: str | Path) -> Campaign:
    path = Path(path)
    try:
        raw = read_yaml(path, "campaign file")
    except YamlFileError as err:
        raise SpecError([str(err)]) from None
    return campaign_from_dict(raw, source=str(path), path=path)


def campaign_from_dict(raw: Any, source: str = "<campaign>", path: Path | None = None) -> Campaign:
    if not isinstance(raw, dict):
        got = type(raw).__name__ if raw is not None else "an empty file"
        raise SpecError([(f"{source}: <top level>: the campaign must be a mapping of keys (name, hardware, "
                          f"models, ...), not {got}")])
    try:
        spec = CampaignSpec.model_validate(raw)
    except ValidationError as err:
        # An unknown key first: a typo ('worklods') also makes the real key missing, and the typo is the cause.
        errors = sorted(_without_union_noise(err.errors()), key=lambda e: e["type"] != "extra_forbidden")
        raise SpecError([_format_pydantic_error(source, e, raw) for e in errors]) from None
    config_hash = hashlib.sha256(yaml.safe_dump(raw, sort_keys=True).encode()).hexdigest()[:16]
    return _check_meaning(spec, source, path, config_hash)


def _check_meaning(spec: CampaignSpec, source: str, path: Path | None, config_hash: str) -> Campaign:
    """Checks that need the catalog. Collects every problem before raising."""
    problems: list[str] = []
    try:
        hardware = get_hardware(spec.hardware.name)
    except CatalogError as err:
        raise SpecError([f"{source}: hardware.name: {err}"]) from None
    profile = None
    if spec.hardware.profile is not None:
        hardware, profile = _with_profile(source, spec.hardware.profile, path, hardware)

    models: dict[str, ModelArch] = {}
    layouts: dict[str, list[Layout] | LayoutSweep] = {}
    for i, entry in enumerate(spec.models):
        try:
            model = resolve_model(_relative_to(entry.name, path))
        except CatalogError as err:
            problems.append(f"{source}: models[{i}].name: {err}")
            continue
        if entry.name in models:
            problems.append(f"{source}: models[{i}].name: '{entry.name}' is listed twice")
            continue
        models[entry.name] = model
        where = f"models[{i}].layouts" if entry.layouts is not None else "layouts"
        chosen = entry.layouts if entry.layouts is not None else spec.layouts
        if isinstance(chosen, LayoutSweep):
            # bounded before anything is enumerated: a sweep over 10^9 GPUs would never finish
            sweep_problems = [line for line in _sweep_problems(source, where, chosen, hardware, spec.hardware.nodes)
                              if line not in problems]
            problems += sweep_problems
            if sweep_problems:
                continue
            if not chosen.layouts(model, hardware, spec.hardware.nodes):
                problems.append(f"{source}: {where}: no valid layout of {', '.join(map(str, chosen.gpus))} GPU(s) "
                                f"for {entry.name} (see `infscale plan` of a list of layouts for the reasons)")
                continue
        if entry.proxy_layers is not None:
            problems += _proxy_problems(source, i, entry, model, chosen, spec, hardware)
        if isinstance(chosen, LayoutSweep):
            layouts[entry.name] = chosen
            continue
        parsed: list[Layout] = []
        for j, text in enumerate(chosen):
            try:
                layout = Layout.parse(text)
            except ValueError as err:
                problems.append(f"{source}: {where}[{j}]: {err}")
                continue
            problem = layout_problem(layout, model, hardware, spec.hardware.nodes)
            if problem:
                problems.append(f"{source}: {where}[{j}]: '{text}' for {entry.name}: {problem}")
            parsed.append(layout)
        layouts[entry.name] = parsed

    engine_problems = _engine_problems(source, "engine", spec.engine)
    for w, workload in enumerate(spec.workloads):
        for k, (isl, osl) in enumerate(workload.length_pairs()):
            key = f"workloads[{w}].pairs[{k}]" if workload.pairs is not None else f"workloads[{w}].osl[{k}]"
            for name, model in models.items():
                total = isl.max_length + osl.max_length
                if total > model.max_context:
                    problems.append(
                        f"{source}: {key}: isl+osl = {isl.max_length}+{osl.max_length} = {total} "
                        f"exceeds {name}'s context of {model.max_context} tokens (workload {workload.name})"
                    )
        own = _engine_problems(source, f"workloads[{w}].engine", workload.engine) if workload.engine else []
        problems += own
        if own or engine_problems:
            continue
        engine = (workload.engine or EngineSweep()).merged_over(spec.engine)
        own_sizes = workload.engine is not None and (workload.engine.max_num_tokens is not None
                                                     or workload.engine.kv_block_size is not None)
        where = f"workloads[{w}].engine" if own_sizes else "engine"
        for k in engine.expand(ENGINE_KNOB_DEFAULTS.get(engine_of(spec), {})):
            line = (f"{source}: {where}.max_num_tokens: {k.max_num_tokens} is below "
                    f"kv_block_size {k.kv_block_size}")
            if k.max_num_tokens < k.kv_block_size and line not in problems:
                problems.append(line)
            who = "the trtllm backend" if spec.backend == "trtllm" else "TensorRT-LLM (sim.engine: trtllm)"
            line = (f"{source}: {where}.pp_microbatches: {who} schedules PP micro-batches itself; "
                    f"leave it out (got {k.pp_microbatches})")
            if engine_of(spec) == "trtllm" and k.pp_microbatches is not None and line not in problems:
                problems.append(line)
    problems += engine_problems
    staggered = [k for k, w in [("arrival", spec.arrival)] + [(f"workloads[{i}].arrival", w.arrival)
                                                                for i, w in enumerate(spec.workloads)]
                 if w is not None and w.stagger]
    if staggered and spec.backend != "sim":
        problems.append(f"{source}: {staggered[0]}.stagger: staggered client starts are a prediction setting of "
                        f"the sim backend (a real {spec.backend} run starts its clients as its benchmark does)")
    if engine_of(spec) == "trtllm":
        from infscale.opdata import SYSTEMS

        if hardware.name not in SYSTEMS:
            key = "sim.engine" if spec.sim.engine else "backend"
            problems.append(f"{source}: {key}: the trtllm engine model has measured operator tables for "
                            f"{', '.join(SYSTEMS)} only (hardware is {hardware.name})")
    if problems:
        raise SpecError(problems)
    return Campaign(spec, path, config_hash, models, hardware, layouts, profile)


def engine_of(spec: CampaignSpec) -> str | None:
    """The engine a campaign's predictions stand for: `sim.engine`, else the backend's (None: the roofline)."""
    if spec.sim.engine is not None:
        return spec.sim.engine
    return spec.backend if spec.backend in ENGINES else None


def _with_profile(source: str, given: str, path: Path | None, hardware: Hardware) -> tuple[Hardware, ProfileRef]:
    """The catalog hardware with the profile's constants, and what the cells record of the profile."""
    from infscale.calibration import ProfileError, load_profile, sha256_of  # calibration imports this module

    where = Path(given)
    if not where.is_absolute() and path is not None and _is_file(path.parent / where):
        where = path.parent / where
    try:
        profile = load_profile(where)
        patched = profile.apply(hardware)
    except ProfileError as err:
        raise SpecError([f"{source}: hardware.profile: {err}"]) from None
    return patched, ProfileRef(where, sha256_of(where), profile.name, profile.created_at, profile.engine,
                               dict(profile.efficiency))


def _sweep_problems(source: str, where: str, sweep: LayoutSweep, hardware: Hardware, nodes: int) -> list[str]:
    """A swept GPU count beyond the target (nodes × GPUs per node) can have no layout: say so by its index."""
    available = nodes * hardware.gpus_per_node
    return [f"{source}: {where}.gpus[{k}]: {gpus} GPUs exceed the target's {available} ({nodes} node(s) × "
            f"{hardware.gpus_per_node} {hardware.name}); allowed: 1 to {available}, or raise hardware.nodes "
            f"(at most {MAX_NODES})"
            for k, gpus in enumerate(sweep.gpus) if gpus > available]


def _proxy_problems(source: str, index: int, entry: ModelEntry, model: ModelArch,
                    chosen: list[str] | LayoutSweep, spec: CampaignSpec, hardware: Hardware) -> list[str]:
    """`proxy_layers: k` must be a true slice of the model that every pipeline stage shares evenly (layout
    strings that do not parse are reported by the layout checks)."""
    k = entry.proxy_layers
    where = f"{source}: models[{index}].proxy_layers"
    if spec.backend == "trtllm":
        return [f"{where}: the trtllm backend cannot run a layer-sliced proxy (got {k}); allowed with the "
                "torch and sim backends"]
    if k >= model.num_layers:  # type: ignore[operator]
        return [f"{where}: must be below {entry.name}'s {model.num_layers} layers (got {k}); leave it out for a "
                "full run"]
    if model.is_moe and model.first_dense_layers:
        return [f"{where}: {entry.name} mixes {model.first_dense_layers} dense and {model.num_moe_layers} MoE "
                f"layers, so a slice of {k} layers is not a scaled copy of it (got {k})"]
    if isinstance(chosen, LayoutSweep):
        pps = {layout.pp for layout in chosen.layouts(model, hardware, spec.hardware.nodes)}
    else:
        pps = set()
        for text in chosen:
            try:
                pps.add(Layout.parse(text).pp)
            except ValueError:
                continue
    uneven = sorted(pp for pp in pps if k % pp)  # type: ignore[operator]
    if uneven:
        pps = ", ".join(f"pp{pp}" for pp in uneven)
        return [f"{where}: {k} layers cannot be split evenly over {pps} (each pipeline stage must run the same "
                f"number of layers, at least one); use a multiple of {math.lcm(*uneven)} (got {k})"]
    return []


def _engine_problems(source: str, where: str, sweep: EngineSweep) -> list[str]:
    """Each engine value checked against EngineKnobs' rules, named by its key (and index, for a swept list)."""
    problems = []
    for key, value in sweep.model_dump(exclude_none=True).items():
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            try:
                EngineKnobs(**{key: v})
            except ValidationError as err:
                index = f"[{i}]" if isinstance(value, list) else ""
                message = err.errors()[0]["msg"].removeprefix("Value error, ")
                problems.append(f"{source}: {where}.{key}{index}: {message} (got {v!r})")
    return problems


def _relative_to(name: str, path: Path | None) -> str:
    """A model given as a relative config.json path is read relative to the campaign file."""
    if path is not None and (name.endswith(".json") or "/" in name):
        candidate = path.parent / name
        if _is_file(candidate) or _is_file(candidate / "config.json"):
            return str(candidate)
    return name


def _is_file(path: Path) -> bool:
    """Path.is_file, False for a name the OS refuses (too long) instead of an OSError."""
    try:
        return path.is_file()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- errors


def _format_pydantic_error(source: str, error: dict[str, Any], raw: dict[str, Any],
                           root: type[BaseModel] | None = None) -> str:
    loc = _location(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent_model = _model_at(error["loc"][:-1], root or CampaignSpec)
        key = error["loc"][-1]
        allowed = sorted(parent_model.model_fields) if parent_model else []
        hint = difflib.get_close_matches(str(key), allowed, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{source}: {loc}: unknown key{suggestion}; allowed keys: {', '.join(allowed)}"
    if kind == "missing":
        return f"{source}: {loc}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{source}: {loc}: {message}{shown}"


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part in _UNION_TAGS or "[" in part or part.startswith(("function-", "literal[", "constrained-")))


def _without_union_noise(errors: list[Any]) -> list[Any]:
    """Drop "Input should be a valid list/dict…" from a union branch when another branch of the same union
    took the input and failed deeper inside it (that deeper error is the one the user needs to see)."""
    def branch_root(loc: tuple[Any, ...]) -> int | None:
        tags = [i for i, part in enumerate(loc) if _is_union_tag(part)]
        return tags[-1] if tags and tags[-1] == len(loc) - 1 else None

    kept = []
    for error in errors:
        loc, root = error["loc"], branch_root(error["loc"])
        deeper = root is not None and any(
            other is not error and len(other["loc"]) > root + 1 and other["loc"][:root] == loc[:root]
            and _is_union_tag(other["loc"][root]) and other["loc"][root] != loc[root]
            for other in errors
        )
        if not deeper:
            kept.append(error)
    return _one_per_union(kept or errors, branch_root)


_CONTAINER_MISMATCH = {"list_type", "dict_type", "model_type", "tuple_type"}


def _one_per_union(errors: list[Any], branch_root: Any) -> list[Any]:
    """Branches of one union that each refused the same value make one error: a container branch's "should be a
    valid list" is dropped beside a scalar branch's reason, and the rest are joined ("a valid integer or 'auto'")."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    out: list[Any] = []
    for error in errors:
        root = branch_root(error["loc"])
        if root is None:
            out.append(error)
            continue
        key = tuple(error["loc"][:root])
        if key not in groups:
            groups[key] = []
            out.append(key)  # placeholder: the group's error goes where its first branch was
        groups[key].append(error)
    merged = []
    for item in out:
        if not isinstance(item, tuple):
            merged.append(item)
            continue
        branches = groups[item]
        scalar = [e for e in branches if e["type"] not in _CONTAINER_MISMATCH]
        branches = scalar or branches
        reasons = [branches[0]["msg"]] + [e["msg"].removeprefix("Input should be ") for e in branches[1:]]
        merged.append({**branches[0], "msg": " or ".join(dict.fromkeys(reasons))})
    return merged


def _location(loc: tuple[Any, ...]) -> str:
    """('workloads', 0, 'osl', 2) → 'workloads[0].osl[2]'; drops pydantic's union-branch labels."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _is_union_tag(part):
            continue
        else:
            name = str(part)
            text += ("." if text else "") + (name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else repr(name))
    return text or "<top level>"


_UNION_TAGS = {"int", "str", "float", "bool", "list", "LayoutSweep", "list[str]", "dict"}


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at `loc` (for listing allowed keys)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int) or part in _UNION_TAGS:
            continue
        if part == "LayoutSweep":
            model = LayoutSweep
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return _NAMED_MODELS.get(str(part), None)
        model = _first_model(field.annotation)
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found:
            return found
    return None


_NAMED_MODELS: dict[str, type[BaseModel]] = {"LayoutSweep": LayoutSweep}


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
