"""The residency plan: a frozen value that can be printed, saved, diffed and applied later.

The plan is the one contract between planning and execution: it records every decision the
executor acts on (strategy, layer lists in run order with their module paths and prefetch, resident
layers, whether modules outside the layers stream, where host bytes wait, which modules' weights
are stored in float8 and upcast as they run), so the executor reads the
plan and the pipeline and nothing of the spec, the resolver or the cost model.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from planner.errors import Diagnostic

PLAN_VERSION = 1


class Strategy(str, enum.Enum):
    """Where a component's weights live while it runs."""

    RESIDENT = "resident"
    CPU_OFFLOAD = "cpu_offload"
    LAYERWISE = "layerwise"
    FSDP = "fsdp"

    def __str__(self) -> str:
        return self.value


class HostTier(str, enum.Enum):
    """Where the host copy of streamed or offloaded bytes waits."""

    PINNED = "pinned"        # page-locked host memory, exactly the streamed bytes
    # layerwise only: the bytes stay in the component's safetensors files, copied per layer through
    # a small pinned staging ring: read from the file's mapping (the page cache keeps them warm)
    MAPPED = "mapped"
    # ... or read with plain positioned reads (O_DIRECT where the platform allows), bypassing the
    # page cache, for when it would be evicted anyway
    DISK = "disk"

    def __str__(self) -> str:
        return self.value


STRATEGIES = tuple(s.value for s in Strategy)
# dtypes weights may be stored in while computed in the pipeline's (StoragePlan.dtype)
STORAGE_DTYPES = ("float8_e4m3fn", "float8_e5m2")
HOST_TIERS = tuple(t.value for t in HostTier)
# tiers whose bytes stay in the files (layerwise only): what streams is read per layer into a ring
FILE_TIERS = (HostTier.MAPPED, HostTier.DISK)
# strategies whose weights live on the host between uses
HOST_STRATEGIES = (Strategy.CPU_OFFLOAD, Strategy.LAYERWISE)


@dataclass(frozen=True)
class LayerListPlan:
    """A list of repeated blocks the plan streams, in the order the forward runs the lists.

    ``path`` is the dotted module path inside the component; ``count`` is checked against the
    pipeline at apply time; ``prefetch`` is K for this list (design rule 7: computed per list).
    """

    path: str
    count: int
    prefetch: int = 1


@dataclass(frozen=True)
class StoragePlan:
    """Weights stored in a narrower dtype and computed in the pipeline's (diffusers' layerwise casting).

    The executor casts every module the walk reaches that is an instance of one of ``cast_classes``
    (``torch.nn`` class names), as diffusers' ``apply_layerwise_casting`` walks: from the component's
    root through ``named_children``, a module whose dotted path matches any of ``skip_modules``
    (``re.search``) keeps its dtype with everything under it, a module of a cast class is cast whole
    (every floating-point parameter and buffer under it), any other module is searched further.
    Cast weights are stored in ``dtype`` and upcast to ``compute_dtype`` just before the module runs.
    ``source_bytes`` is the component's weight bytes before casting (``ComponentPlan.weight_bytes``
    counts what is stored).
    """

    dtype: str
    compute_dtype: str
    skip_modules: tuple[str, ...] = ()
    cast_classes: tuple[str, ...] = ()
    source_bytes: int = 0


def storage_to_dict(sp: StoragePlan) -> dict[str, Any]:
    return {"dtype": sp.dtype, "compute_dtype": sp.compute_dtype, "skip_modules": list(sp.skip_modules),
            "cast_classes": list(sp.cast_classes), "source_bytes": sp.source_bytes}


def storage_from_dict(data: Mapping[str, Any]) -> StoragePlan:
    return StoragePlan(dtype=str(data["dtype"]), compute_dtype=str(data["compute_dtype"]),
                       skip_modules=tuple(str(p) for p in data.get("skip_modules", ())),
                       cast_classes=tuple(str(c) for c in data.get("cast_classes", ())),
                       source_bytes=int(data.get("source_bytes", 0)))


@dataclass(frozen=True)
class ComponentEstimate:
    gpu_resident_bytes: int = 0      # weights that stay on the GPU for the whole run
    gpu_transient_bytes: int = 0     # streamed slots, or the whole component while it runs
    host_pinned_bytes: int = 0
    step_seconds: float | None = None
    activation_bytes: int = 0        # the peak of live activations while it runs (one call)
    # host_tier mapped / disk: the streamed bytes read from the files per call (not pinned), and the
    # pinned staging ring they pass through (counted in host_pinned_bytes)
    host_file_bytes: int = 0
    staging_bytes: int = 0


@dataclass(frozen=True)
class ComponentPlan:
    """Where one component's weights live.

    ``resident_layers`` indexes the component's layer sequence: its layer lists concatenated in
    order (Flux: 19 ``transformer_blocks`` then 38 ``single_transformer_blocks``).
    """

    strategy: Strategy
    family: str
    class_name: str = ""
    prefetch: int | None = None
    resident_layers: tuple[int, ...] = ()
    layers: tuple[LayerListPlan, ...] = ()
    weight_bytes: int = 0
    estimate: ComponentEstimate = field(default_factory=ComponentEstimate)
    stream_non_layer: bool = False          # layerwise: modules outside the layers stream too
    host_tier: HostTier | None = None       # cpu_offload / layerwise: where the host bytes wait
    # the part of a generation it runs in ("encode", "denoise", "decode"): when a component of
    # another phase starts, a layerwise component's slots and streamed modules leave the device
    phase: str = ""
    # weights stored in float8 and upcast per module just before it runs (None: stored as loaded)
    storage: StoragePlan | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        if self.host_tier is not None:
            object.__setattr__(self, "host_tier", HostTier(self.host_tier))

    @property
    def layer_count(self) -> int:
        return sum(ll.count for ll in self.layers)

    def layer_prefetch(self) -> tuple[int, ...]:
        """K for every layer of the flattened layer sequence (the K of the list it belongs to)."""
        return tuple(ll.prefetch for ll in self.layers for _ in range(ll.count))


@dataclass(frozen=True)
class Decision:
    """A change the resolver made, with the rule that made it and why."""

    rule: str
    component: str
    from_: str
    to: str
    reason: str


# a step whose launches take at least this share of it is the host's (below, its copies dominate)
HOST_BOUND_SHARE = 0.5


@dataclass(frozen=True)
class Estimate:
    gpu_peak_bytes: int = 0
    host_pinned_bytes: int = 0
    # the process's peak resident memory while load_pipeline reads the folder and the pipeline runs:
    # the process itself, the pinned bytes, the loader's largest transient (what memory.host_budget caps)
    host_peak_bytes: int | None = None
    gpu_budget_bytes: int | None = None
    host_budget_bytes: int | None = None
    margin_bytes: int = 0
    activation_bytes: int = 0
    seconds_per_step: float | None = None
    profile: str | None = None
    profile_source: str | None = None        # why that profile (named by the spec, or the GPU found)
    encode_seconds: float | None = None      # one generation's encoders
    decode_seconds: float | None = None      # one generation's VAE decode
    generation_seconds: float | None = None  # encode + steps x seconds_per_step + decode
    steps: int | None = None
    # one step's denoiser calls with their weights on the GPU: the host's time to launch their ops
    # and the GPU's time to run them. Where launching takes longer the step waits on the host's CPU,
    # whose speed differs between machines (the profile's host_op_seconds is one machine's)
    step_launch_seconds: float | None = None
    step_gpu_seconds: float | None = None
    # a step that waits on the host, priced also on the fastest and slowest host the profile has seen
    # for its GPU kind (kernel_rates.host_op_seconds_seen): (fastest, slowest)
    seconds_per_step_range: tuple[float, float] | None = None
    generation_seconds_range: tuple[float, float] | None = None

    @property
    def host_bound(self) -> bool:
        """The step's calls wait on the host's launches more than on the GPU, and those launches are
        most of the step (not its copies): its time follows the host's CPU."""
        launch, gpu, step = self.step_launch_seconds or 0.0, self.step_gpu_seconds or 0.0, self.seconds_per_step or 0.0
        return launch > gpu > 0.0 and launch >= HOST_BOUND_SHARE * step


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: str
    pipeline: Mapping[str, Any]
    components: Mapping[str, ComponentPlan]
    decisions: tuple[Decision, ...] = ()
    warnings: tuple[Diagnostic, ...] = ()
    estimate: Estimate = field(default_factory=Estimate)
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "device": self.device,
            "dtype": self.dtype,
            "pipeline": dict(self.pipeline),
            "components": {name: component_to_dict(cp) for name, cp in self.components.items()},
            "decisions": [{"rule": d.rule, "component": d.component, "from": d.from_, "to": d.to,
                           "reason": d.reason} for d in self.decisions],
            "warnings": [w.to_dict() for w in self.warnings],
            "estimate": _drop_none({
                "gpu_peak_bytes": self.estimate.gpu_peak_bytes,
                "host_pinned_bytes": self.estimate.host_pinned_bytes,
                "host_peak_bytes": self.estimate.host_peak_bytes,
                "gpu_budget_bytes": self.estimate.gpu_budget_bytes,
                "host_budget_bytes": self.estimate.host_budget_bytes,
                "margin_bytes": self.estimate.margin_bytes,
                "activation_bytes": self.estimate.activation_bytes,
                "seconds_per_step": self.estimate.seconds_per_step,
                "profile": self.estimate.profile,
                "profile_source": self.estimate.profile_source,
                "steps": self.estimate.steps,
                "encode_seconds": self.estimate.encode_seconds,
                "decode_seconds": self.estimate.decode_seconds,
                "generation_seconds": self.estimate.generation_seconds,
                "step_launch_seconds": self.estimate.step_launch_seconds,
                "step_gpu_seconds": self.estimate.step_gpu_seconds,
                "seconds_per_step_range": _listed(self.estimate.seconds_per_step_range),
                "generation_seconds_range": _listed(self.estimate.generation_seconds_range),
            }),
        }

    def to_json(self) -> str:
        """Deterministic JSON: same plan, same bytes."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        est = data.get("estimate", {})
        return cls(
            version=int(data.get("version", PLAN_VERSION)),
            device=data["device"],
            dtype=data.get("dtype", "bfloat16"),
            pipeline=dict(data.get("pipeline", {})),
            components={name: _component_from_dict(cp) for name, cp in data["components"].items()},
            decisions=tuple(Decision(rule=d["rule"], component=d["component"], from_=d["from"], to=d["to"],
                                     reason=d["reason"]) for d in data.get("decisions", ())),
            warnings=tuple(_warning_from(w) for w in data.get("warnings", ())),
            estimate=Estimate(
                gpu_peak_bytes=int(est.get("gpu_peak_bytes", 0)),
                host_pinned_bytes=int(est.get("host_pinned_bytes", 0)),
                host_peak_bytes=est.get("host_peak_bytes"),
                gpu_budget_bytes=est.get("gpu_budget_bytes"),
                host_budget_bytes=est.get("host_budget_bytes"),
                margin_bytes=int(est.get("margin_bytes", 0)),
                activation_bytes=int(est.get("activation_bytes", 0)),
                seconds_per_step=est.get("seconds_per_step"),
                profile=est.get("profile"),
                profile_source=est.get("profile_source"),
                steps=est.get("steps"),
                encode_seconds=est.get("encode_seconds"),
                decode_seconds=est.get("decode_seconds"),
                generation_seconds=est.get("generation_seconds"),
                step_launch_seconds=est.get("step_launch_seconds"),
                step_gpu_seconds=est.get("step_gpu_seconds"),
                seconds_per_step_range=_pair(est.get("seconds_per_step_range")),
                generation_seconds_range=_pair(est.get("generation_seconds_range")),
            ),
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


def _listed(pair: tuple[float, float] | None) -> list[float] | None:
    return None if pair is None else [pair[0], pair[1]]


def _pair(data: Any) -> tuple[float, float] | None:
    return None if data is None else (float(data[0]), float(data[1]))


def _warning_from(data: Any) -> Diagnostic:
    if isinstance(data, str):        # a plan saved before warnings were structured
        return Diagnostic(file="", line=0, column=1, message=data, severity="warning")
    return Diagnostic.from_dict(data)


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def component_to_dict(cp: ComponentPlan) -> dict[str, Any]:
    out: dict[str, Any] = {"strategy": cp.strategy.value, "family": cp.family}
    if cp.class_name:
        out["class"] = cp.class_name
    if cp.strategy == Strategy.LAYERWISE:
        out["prefetch"] = cp.prefetch
        out["resident_layers"] = list(cp.resident_layers)
        out["stream_non_layer"] = cp.stream_non_layer
    if cp.layers:
        out["layers"] = [{"path": ll.path, "count": ll.count, "prefetch": ll.prefetch} for ll in cp.layers]
    if cp.host_tier is not None:
        out["host_tier"] = cp.host_tier.value
    if cp.phase:
        out["phase"] = cp.phase
    if cp.storage is not None:
        out["storage"] = storage_to_dict(cp.storage)
    out["weight_bytes"] = cp.weight_bytes
    out["estimate"] = _drop_none({
        "gpu_resident_bytes": cp.estimate.gpu_resident_bytes,
        "gpu_transient_bytes": cp.estimate.gpu_transient_bytes,
        "host_pinned_bytes": cp.estimate.host_pinned_bytes,
        "step_seconds": cp.estimate.step_seconds,
        "activation_bytes": cp.estimate.activation_bytes or None,
        "host_file_bytes": cp.estimate.host_file_bytes or None,
        "staging_bytes": cp.estimate.staging_bytes or None,
    })
    return out


def _component_from_dict(data: Mapping[str, Any]) -> ComponentPlan:
    est = data.get("estimate", {})
    return ComponentPlan(
        strategy=data["strategy"],
        family=data.get("family", "other"),
        class_name=data.get("class", ""),
        prefetch=data.get("prefetch"),
        resident_layers=tuple(int(i) for i in data.get("resident_layers", ())),
        layers=tuple(LayerListPlan(path=ll["path"], count=int(ll["count"]), prefetch=int(ll.get("prefetch", 1)))
                     for ll in data.get("layers", ())),
        weight_bytes=int(data.get("weight_bytes", 0)),
        stream_non_layer=bool(data.get("stream_non_layer", False)),
        host_tier=data.get("host_tier"),
        phase=str(data.get("phase", "")),
        storage=storage_from_dict(data["storage"]) if data.get("storage") else None,
        estimate=ComponentEstimate(
            gpu_resident_bytes=int(est.get("gpu_resident_bytes", 0)),
            gpu_transient_bytes=int(est.get("gpu_transient_bytes", 0)),
            host_pinned_bytes=int(est.get("host_pinned_bytes", 0)),
            step_seconds=est.get("step_seconds"),
            activation_bytes=int(est.get("activation_bytes", 0)),
            host_file_bytes=int(est.get("host_file_bytes", 0)),
            staging_bytes=int(est.get("staging_bytes", 0)),
        ),
    )
