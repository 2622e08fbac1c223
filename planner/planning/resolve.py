"""The resolver: spec + inventory → one strategy per component, every change recorded as a decision.

The order follows the design's rules: defaults, then SGLang family flags (rule 3), then the
layerwise selection (rules 2 and 4), then ``components:`` entries (rule 5), then prefetch and
resident layers (rule 7). The budget planner (``budget.py``) fills in components left at ``auto``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from planner.errors import Diagnostic, SpecError, did_you_mean
from planner.inventory.model import ComponentInfo, Inventory, LayerList
from planner.plan import Decision
from planner.planning.rules import (
    CAST_ADAPTER_SKIP,
    FAMILY_CPU_OFFLOAD_FLAG,
    FAMILY_FLAGS,
    SELECTION_TOKENS,
    cast_skip_patterns,
    normalize_token,
    reason,
)
from planner.spec.document import Document, PathKey
from planner.spec.families import (
    SGLangClass,
    SGLangModel,
    family_of,
    sglang_class,
    sglang_layer_lists,
    sglang_model,
)
from planner.spec.offload_flags import (
    DEFAULT_PERFORMANCE_MODE,
    DEFAULT_RESIDENCY_POLICY,
    DEFAULT_SGLANG_SEMANTICS,
    LTX2_RESIDENT_MIN_GIB,
    LTX2_TWO_STAGE_PIPELINE_NAMES,
    PERFORMANCE_MODES,
    RESIDENCY_GROUPS,
    RESIDENCY_MODES,
    is_ltx23_model_path,
)
from planner.spec.sizes import parse_size

DEFAULT_PREFETCH = 1
DEFAULT_PLACEMENT = "strided"


@dataclass
class ComponentResolution:
    name: str
    family: str
    info: ComponentInfo
    strategy: str = "resident"
    flag: str = ""                 # what set the current strategy, in the words of the spec
    selected_by: str = ""          # the token that selected it for layerwise, if any
    explicit_selection: PathKey | None = None  # where an exact-name token selected it
    prefetch: int | None = None         # K over the whole layer sequence (what the time model reads)
    prefetch_request: float = 1.0        # the p the spec gave; K is computed from it per layer list
    resident_layers: tuple[int, ...] = ()
    resident_count: int | None = None   # a count still to be placed (auto may choose it)
    placement: str = DEFAULT_PLACEMENT
    layer_paths: tuple[str, ...] = ()
    catalog_info: ComponentInfo | None = None   # the inventory's facts, before SGLang's lists replaced them
    # storage_dtype: weights stored in float8, computed in compute_dtype (the pipeline's); "" = as loaded
    storage_dtype: str = ""
    compute_dtype: str = "bfloat16"
    skip_modules: tuple[str, ...] = ()     # the spec's patterns, added to diffusers' and the class's

    def __post_init__(self) -> None:
        if self.catalog_info is None:
            self.catalog_info = self.info


@dataclass
class Resolution:
    components: dict[str, ComponentResolution]
    decisions: list[Decision] = field(default_factory=list)
    warnings: list[Diagnostic] = field(default_factory=list)


def resolve(doc: Document, inventory: Inventory, *, strict: bool = False) -> Resolution:
    spec: dict[str, Any] = doc.data
    errors: list[Diagnostic] = []
    res = Resolution(components={
        c.name: ComponentResolution(name=c.name, family=family_of(c.name), info=c) for c in inventory.components
    })
    defaults = spec.get("defaults", {})
    offload = spec.get("offload", {})
    entries = spec.get("components", {})

    def decide(comp: ComponentResolution, rule: str, to: str, **fields: Any) -> None:
        if comp.strategy == to:
            return
        res.decisions.append(Decision(rule=rule, component=comp.name, from_=comp.strategy, to=to,
                                      reason=reason(rule, component=comp.name, from_=comp.strategy, to=to,
                                                    family=comp.family, **fields)))
        comp.strategy = to

    base = defaults.get("strategy", "resident")
    for comp in res.components.values():
        decide(comp, "default-strategy", base)
        comp.flag = "defaults.strategy"

    # Rules 2, 3 and 4: the offload: section, resolved as SGLang resolves its server arguments.
    if "offload" in spec:
        _apply_offload(doc, res, base, decide, errors, strict)

    residency = offload.get("component_residency") or {}
    if residency:
        _apply_component_residency(doc, res, residency, decide)
    check_tuning_keys(doc, res, offload)
    _check_resident_values(doc, offload, errors)

    # Rule 5: components: entries, the most specific statement.
    for name, entry in entries.items():
        comp = res.components.get(name)
        if comp is None:
            known = list(res.components)
            hint = did_you_mean(name, known) or (f"; its module components are: {', '.join(known)}" if known else "")
            errors.append(doc.diagnostic(("components", name), f"the pipeline has no module component '{name}'{hint}",
                                         key=True))
            continue
        entry = {"strategy": entry} if isinstance(entry, str) else entry
        strategy = entry.get("strategy")
        if strategy is not None:
            if comp.explicit_selection is not None and strategy != "layerwise":
                line, col = doc.position(comp.explicit_selection)
                entry_path = ("components", name) + (() if isinstance(entries[name], str) else ("strategy",))
                errors.append(doc.diagnostic(
                    entry_path,
                    f"components.{name} sets strategy '{strategy}', but {name} is explicitly selected for layerwise "
                    f"offload at line {line}, column {col}; remove one of the two"))
                continue
            decide(comp, "component-entry", strategy)
            comp.flag = f"components.{name}"
            if strategy != "layerwise":
                comp.layer_paths = ()
                comp.info = comp.catalog_info
        if entry.get("layers"):
            comp.layer_paths = tuple(entry["layers"])
            comp.info = comp.catalog_info

    _resolve_storage(doc, res, entries, defaults, spec["pipeline"].get("dtype", "bfloat16"), errors)

    # Rule 7: prefetch and resident layers, for everything that may stream.
    for comp in res.components.values():
        entry = entries.get(comp.name, {})
        entry = {} if isinstance(entry, str) else entry
        _resolve_layers(doc, comp, entry, defaults, offload, errors, res)
    _check_dit_tuning(doc, res, offload)

    if strict:
        errors.extend(Diagnostic(w.file, w.line, w.column, w.message, "error", w.where, w.code) for w in res.warnings)
        res.warnings = []
    if errors:
        unique = {(d.line, d.column, d.message): d for d in errors}
        raise SpecError(sorted(unique.values(), key=lambda d: (d.line, d.column)))
    return res


# --- The offload: section: SGLang's server-argument resolution at 416fdbb ------------------------------
#
# server_args.ServerArgs._adjust_parameters / _validate_offload, server_args_auto_tune.ServerArgsAutoTuner,
# layerwise_offload_components and layerwise_offload.configure_layerwise_offload_modules, in that order:
# the performance_mode preset, the defaults of auto, the layerwise selection normalised, the CPU-offload
# flags of every selected family turned off, FSDP turned off by any selection, then the components each
# selection reaches, by name and by what their classes declare. Each change is a stage; a component
# whose strategy a stage changes gets a decision naming the rule.

_SGLANG_FLAGS = ("use_fsdp_inference", "dit_cpu_offload", "dit_layerwise_offload", "text_encoder_cpu_offload",
                 "image_encoder_cpu_offload", "vae_cpu_offload")
_GiB = 1 << 30


@dataclass
class _Stage:
    rule: str
    flags: dict[str, Any]
    detail: str = ""
    flag: str = ""


def _selection_raw(doc: Document, errors: list[Diagnostic]) -> tuple[str, Any]:
    offload = doc.data.get("offload", {})
    if "layerwise_offload_components" in offload and "layerwise_offload_modules" in offload:
        other = doc.position(("offload", "layerwise_offload_components"), key=True)
        errors.append(doc.diagnostic(("offload", "layerwise_offload_modules"),
                                     "layerwise_offload_modules is an alias of layerwise_offload_components, which is "
                                     f"also given (line {other[0]}); give only one", key=True))
        return "layerwise_offload_components", None
    key = "layerwise_offload_modules" if "layerwise_offload_modules" in offload else "layerwise_offload_components"
    return key, offload.get(key)


def normalize_selection(raw: Any) -> list[str] | None:
    """SGLang's normalize_layerwise_offload_components: split on commas, trimmed, '-' to '_', lower-cased,
    de-duplicated in order; 'all' alone wins; nothing left is no selection (None)."""
    if raw is None:
        return None
    items = [raw] if isinstance(raw, str) else list(raw)
    out: dict[str, None] = {}          # ordered, and a set: 100,000 tokens stay linear
    for item in items:
        for part in str(item).split(","):
            token = normalize_token(part)
            if not token:
                continue
            if token == "all":
                return ["all"]
            out.setdefault(token, None)
    return list(out) or None


def _token_family(token: str, group: str = "default") -> str | None:
    """The CPU-offload family a selection token names (cpu_offload_flags_for_layerwise_components);
    ``group`` is the token that names the DiT group ('default' at 416fdbb, 'dit' after #25517)."""
    if token == group:
        return "dit"
    fam = family_of(token)
    return fam if fam in FAMILY_CPU_OFFLOAD_FLAG else None


# After SGLang #25517 the token 'default' names the groups whose layerwise offload was validated as a
# better default than CPU offload (layerwise_offload_components.LAYERWISE_OFFLOAD_DEFAULT_GROUP_COMPONENTS).
LATER_DEFAULT_GROUP = ("text_encoder", "image_encoder", "vae")


def semantics_of(offload: Mapping[str, Any]) -> str:
    """Which SGLang the offload: section means (offload.sglang_semantics; the seed's commit by default)."""
    return str(offload.get("sglang_semantics", DEFAULT_SGLANG_SEMANTICS))


def dit_group_token(offload: Mapping[str, Any]) -> str:
    """The selection token of the DiT group: 'default' at 416fdbb, 'dit' after #25517."""
    return "dit" if semantics_of(offload) == "25517" else "default"


def _expand_later_default(names: list[str] | None) -> list[str] | None:
    """After #25517: 'default' expands to its groups in place, de-duplicated in order."""
    if not names or "default" not in names:
        return names
    out: dict[str, None] = {}
    for token in names:
        for t in (LATER_DEFAULT_GROUP if token == "default" else (token,)):
            out.setdefault(t, None)
    return list(out)


def _gib(value: Any) -> float | None:
    return None if value is None else parse_size(value) / _GiB


def _sglang_model_of(doc: Document) -> SGLangModel | None:
    section = doc.data.get("pipeline", {})
    if "model" in section:
        return sglang_model(catalog=section["model"])
    if "path" in section:
        return sglang_model(model_path=section["path"])
    return None


def _sglang_flags(doc: Document, res: Resolution, errors: list[Diagnostic]) -> tuple[list[_Stage], list[str] | None]:
    """The stages of SGLang's resolution and the final selection (normalised tokens, or None)."""
    offload = doc.data.get("offload", {})
    mode = str(offload.get("performance_mode", DEFAULT_PERFORMANCE_MODE)).lower()
    later = semantics_of(offload) == "25517"
    group = dit_group_token(offload)
    model = _sglang_model_of(doc)
    deploy: Mapping[str, Any] = model.deployment if model is not None else {}
    num_gpus = int(offload.get("num_gpus", 1))
    total = _gib(offload.get("gpu_memory"))
    available = _gib(offload.get("gpu_memory_available", offload.get("gpu_memory")))
    sel_key, raw = _selection_raw(doc, errors)
    flags: dict[str, Any] = {f: offload.get(f) for f in _SGLANG_FLAGS}
    if flags["vae_cpu_offload"] is None:
        flags["vae_cpu_offload"] = False            # SGLang's default for vae_cpu_offload is False, not unset
    flags["layerwise_offload_components"] = raw
    stages: list[_Stage] = []
    families = {c.family for c in res.components.values()}
    has_image_encoder = "image_encoder" in families
    on_cpu = str(doc.data.get("device", "cuda")) == "cpu"
    two_stage = _ltx23_two_stage(doc, offload, model)
    if "ltx2_two_stage_device_mode" in offload and not two_stage:
        res.warnings.append(doc.diagnostic(
            ("offload", "ltx2_two_stage_device_mode"),
            "offload.ltx2_two_stage_device_mode applies only to SGLang's LTX-2.3 two-stage pipeline "
            f"(offload.pipeline_class_name {' or '.join(LTX2_TWO_STAGE_PIPELINE_NAMES)} on a model path naming "
            "Lightricks/LTX-2.3); SGLang leaves it unused here", severity="warning",
            code="ltx2-two-stage-mode-unused"))

    def ltx2_mode() -> str:
        """ServerArgs._adjust_ltx2_two_stage_device_mode: the mode given, else SGLang's default."""
        given = offload.get("ltx2_two_stage_device_mode")
        if given is not None:
            return str(given)
        if on_cpu:
            return "snapshot"                       # not CUDA: snapshot
        if total is None:
            res.warnings.append(doc.diagnostic(
                ("offload", "pipeline_class_name"),
                "SGLang's LTX-2.3 two-stage pipeline defaults ltx2_two_stage_device_mode to resident on an H200 or "
                f"a GPU of {LTX2_RESIDENT_MIN_GIB} GiB or more, else snapshot (SGLang reads the device), and in "
                "snapshot mode performance_mode auto keeps the DiT's CPU offload; set offload.gpu_memory (or "
                "offload.ltx2_two_stage_device_mode): taken as snapshot", severity="warning",
                code="ltx2-two-stage-mode-needs-gpu-memory"))
            return "snapshot"
        return "resident" if total >= LTX2_RESIDENT_MIN_GIB else "snapshot"

    # The user's flags, one stage each (design rule 3).
    user = dict(flags, use_fsdp_inference=None, dit_cpu_offload=None, text_encoder_cpu_offload=None,
                image_encoder_cpu_offload=None, vae_cpu_offload=False)
    for flag in FAMILY_FLAGS:
        if flags[flag] is True:
            user[flag] = True
            stages.append(_Stage("family-flag", dict(user), flag=flag))

    explicit_memory = any(flags[f] is not None for f in ("use_fsdp_inference", "dit_cpu_offload",
                                                          "dit_layerwise_offload", "text_encoder_cpu_offload",
                                                          "image_encoder_cpu_offload")) or raw is not None
    explicit_replacement = (any(flags[f] is not None for f in ("dit_layerwise_offload", "text_encoder_cpu_offload",
                                                                 "image_encoder_cpu_offload"))
                            or raw is not None or flags["vae_cpu_offload"] is True)
    what = f"performance_mode {mode}" + ("" if "performance_mode" in offload else " (SGLang's default)")

    def need(message: str, code: str = "performance-mode-needs-gpu-memory") -> None:
        where = ("offload", "performance_mode") if "performance_mode" in offload else ("offload",)
        res.warnings.append(doc.diagnostic(where, message, severity="warning", key="performance_mode" not in offload,
                                           code=code))

    def step(why: str, **changes: Any) -> None:
        changed = {k: v for k, v in changes.items() if flags.get(k) != v}
        if not changed:
            return
        flags.update(changed)
        text = ", ".join(f"offload.{k} {'left unset' if offload.get(k) is None else 'given'} becomes "
                         f"{_yaml_value(v)}" for k, v in changed.items())
        stages.append(_Stage("performance-mode", dict(flags), detail=f"{what}: {text} ({why})"))

    def unset(name: str, value: Any) -> dict[str, Any]:
        return {name: value} if flags[name] is None else {}

    def fsdp_possible(require_headroom: bool) -> bool:
        min_gb = deploy.get("fsdp_auto_min_available_memory_gb")
        if min_gb is None:
            return False
        if deploy.get("fsdp_auto_requires_cfg", True) and not (model is not None and model.uses_cfg):
            return False
        if not require_headroom:
            return True
        if available is None:
            need(f"{what} replaces DiT offload with FSDP on {num_gpus} GPUs when each has at least {min_gb} GiB "
                 "free (SGLang reads the devices); set offload.gpu_memory (or offload.gpu_memory_available): "
                 f"taken as below {min_gb} GiB")
            return False
        return available >= min_gb

    if mode not in PERFORMANCE_MODES:
        errors.append(doc.diagnostic(("offload", "performance_mode"),
                                     f"performance_mode must be one of {', '.join(PERFORMANCE_MODES)} (got {mode!r})"))
        return stages, None
    if mode != "manual" and on_cpu:
        # SGLang's CPU platform: no preset, no offload default, no replacement; unset flags end up false
        mode_steps = False
    else:
        mode_steps = mode != "manual"
    if mode_steps and model is None:
        need(f"{what} fills unset flags from the model's deployment config, and SGLang knows none for this "
             "pipeline: SGLang's defaults are taken (no model-specific hint); name a catalog model or a Hugging Face "
             "id SGLang registers, or set performance_mode: manual", code="performance-mode-unknown-model")

    if mode == "speed" and mode_steps:
        use_fsdp = num_gpus >= 2 and fsdp_possible(require_headroom=False)
        step("speed: every component on the GPU" + (", the DiTs sharded" if use_fsdp else ""),
             **unset("use_fsdp_inference", use_fsdp), **unset("dit_cpu_offload", False),
             **unset("dit_layerwise_offload", False), **unset("text_encoder_cpu_offload", False),
             **unset("image_encoder_cpu_offload", False))
    elif mode == "memory" and mode_steps:
        if flags["use_fsdp_inference"]:
            step("memory with FSDP given: the rest on the GPU", **unset("dit_cpu_offload", False),
                 **unset("dit_layerwise_offload", False), **unset("text_encoder_cpu_offload", False),
                 **unset("image_encoder_cpu_offload", False))
        else:
            step("memory: no FSDP", use_fsdp_inference=False)
            if deploy.get("auto_dit_layerwise_offload"):
                step("memory: the model's deployment config streams its DiTs layerwise",
                     **unset("dit_layerwise_offload", True), **unset("dit_cpu_offload", False),
                     **unset("text_encoder_cpu_offload", True), **unset("image_encoder_cpu_offload", True))
            else:
                step("memory: component CPU offload", **unset("dit_cpu_offload", True),
                     **unset("text_encoder_cpu_offload", True), **unset("image_encoder_cpu_offload", True),
                     **unset("use_fsdp_inference", False))

    if mode_steps:
        # ServerArgs._adjust_offload
        if total is None and has_image_encoder and flags["image_encoder_cpu_offload"] is None and \
                (model is None or model.image_gen):
            need(f"{what} CPU-offloads the image encoder of an image model only on a GPU under 30 GiB (SGLang "
                 "reads the device); set offload.gpu_memory: taken as 30 GiB or more")
        if total is not None and total < 30:
            step("GPU under 30 GiB: large components offloaded", **unset("dit_cpu_offload", True),
                 **unset("text_encoder_cpu_offload", True), **unset("image_encoder_cpu_offload", True))
        elif model is None or model.image_gen:
            step("image model: DiT and text encoder offloaded", **unset("dit_cpu_offload", True),
                 **unset("text_encoder_cpu_offload", True), **unset("image_encoder_cpu_offload", False))
        else:
            step("video model: DiT and encoders offloaded", **unset("dit_cpu_offload", True),
                 **unset("text_encoder_cpu_offload", True), **unset("image_encoder_cpu_offload", True))
        # ServerArgsAutoTuner.maybe_adjust_auto_default_layerwise_offload
        if not explicit_memory and deploy.get("auto_dit_layerwise_offload") and flags["dit_layerwise_offload"] is None:
            if flags["use_fsdp_inference"]:
                step("FSDP already shards the DiTs", dit_layerwise_offload=False)
            else:
                limit = deploy.get("auto_dit_layerwise_offload_high_memory_disable_gb")
                high = False
                if limit is not None:
                    if total is None:
                        need(f"{what} streams the DiTs layerwise unless the GPU has {limit} GiB or more (SGLang "
                             f"reads the device); set offload.gpu_memory: taken as below {limit} GiB")
                    else:
                        high = total >= limit
                if high:
                    step(f"a GPU of {limit} GiB or more keeps the DiTs resident", dit_layerwise_offload=False)
                else:
                    step("the model's deployment config streams its DiTs layerwise instead of offloading them whole",
                         dit_layerwise_offload=True, dit_cpu_offload=False)
    if mode == "auto" and mode_steps and not explicit_memory:
        # ServerArgsAutoTuner.maybe_adjust_auto_component_residency_after_offload
        limit = deploy.get("auto_disable_component_offload_min_available_memory_gb")
        if limit is not None:
            if available is None:
                need(f"{what} keeps components resident when each GPU has {limit} GiB free (SGLang reads the "
                     "devices); set offload.gpu_memory (or offload.gpu_memory_available): "
                     f"taken as below {limit} GiB")
            elif available >= limit:
                comps = tuple(deploy.get("auto_disable_component_offload_components", ()))
                if "dit" in comps and two_stage and ltx2_mode() == "snapshot":
                    # the LTX-2.3 two-stage pipeline in snapshot mode moves its stage DiTs with dit_cpu_offload
                    comps = tuple(c for c in comps if c != "dit")
                    if flags["dit_cpu_offload"]:
                        given = ("given" if offload.get("ltx2_two_stage_device_mode") is not None
                                 else f"its default below {LTX2_RESIDENT_MIN_GIB} GiB")
                        stages.append(_Stage("ltx2-snapshot-keeps-dit-offload", dict(flags), detail=(
                            f"{what}: {limit} GiB free or more would turn dit_cpu_offload off, but SGLang's LTX-2.3 "
                            f"two-stage pipeline ({offload.get('pipeline_class_name')}) in ltx2_two_stage_device_mode "
                            f"snapshot ({given}) keeps it: it releases and prefetches the stage DiTs between "
                            "phases with it")))
                if comps:
                    step(f"{limit} GiB free or more: offload turned off for {', '.join(comps)}",
                         **{f"{c}_cpu_offload": False for c in comps if flags.get(f"{c}_cpu_offload")})
        # ServerArgsAutoTuner.maybe_adjust_auto_fsdp_with_offload_enabled
        if num_gpus >= 2 and (flags["dit_cpu_offload"] or flags["dit_layerwise_offload"]) and \
                fsdp_possible(require_headroom=True):
            step(f"{num_gpus} GPUs: FSDP replaces DiT offload", use_fsdp_inference=True,
                 **({"dit_cpu_offload": False} if flags["dit_cpu_offload"] else {}),
                 **({"dit_layerwise_offload": False} if flags["dit_layerwise_offload"] else {}))
    if mode_steps:
        # ServerArgsAutoTuner.maybe_replace_cpu_offloaded_components_with_layerwise
        if not explicit_replacement and not flags["use_fsdp_inference"] and flags["layerwise_offload_components"] is None:
            chosen = [group] if flags["dit_layerwise_offload"] else []
            changed = [c for c in ("text_encoder", "image_encoder", "vae") if flags[f"{c}_cpu_offload"]]
            if changed:
                step(f"CPU offload of {', '.join(changed)} replaced by layerwise offload",
                     layerwise_offload_components=chosen + changed)

    # ServerArgs._adjust_layerwise_offload_components and _validate_offload: the conflict rule.
    names = normalize_selection(flags["layerwise_offload_components"])
    if later:
        names = _expand_later_default(names)
    if flags["dit_layerwise_offload"]:
        names = [group] if names is None else (names if group in names else [group, *names])
    if mode != "manual":
        for f in ("use_fsdp_inference", "dit_cpu_offload", "dit_layerwise_offload", "text_encoder_cpu_offload",
                  "image_encoder_cpu_offload"):
            if flags[f] is None:
                flags[f] = False
    if names:
        families = {_token_family(n, group) for n in names}
        off = set(FAMILY_CPU_OFFLOAD_FLAG.values()) if "all" in names else \
            {FAMILY_CPU_OFFLOAD_FLAG[f] for f in families if f is not None}
        # at 416fdbb any selection turns FSDP off; after #25517 only one that reaches a DiT
        fsdp_off = not later or "all" in names or "dit" in families
        final = dict(flags, layerwise_offload_components=names, **({"use_fsdp_inference": False} if fsdp_off else {}),
                     **{f: False for f in off})
        stages.append(_Stage("conflict", final))
        p = _bounded(offload.get("dit_offload_prefetch_size"))
        if isinstance(p, (int, float)) and not isinstance(p, bool):
            where = ("offload", "dit_offload_prefetch_size")
            if p < 0:
                errors.append(doc.diagnostic(where, f"prefetch cannot be negative (got {p})"))
            elif not math.isfinite(p):
                errors.append(doc.diagnostic(where, f"prefetch must be a finite number (got {p})"))
    return stages, names


def _ltx23_two_stage(doc: Document, offload: Mapping[str, Any], model: SGLangModel | None) -> bool:
    """ServerArgs._is_ltx23_two_stage_pipeline: a two-stage --pipeline-class-name on an LTX-2.3 model path.
    The model path is pipeline.path, or the Hugging Face id of a catalog model. (SGLang's other test, the VAE
    arch config's ltx_variant, holds its default ltx_2 while the server arguments are resolved: the loaded
    VAE's markers are copied in when the pipeline is built.)"""
    if offload.get("pipeline_class_name") not in LTX2_TWO_STAGE_PIPELINE_NAMES:
        return False
    section = doc.data.get("pipeline", {})
    path = section.get("path") if "path" in section else model.model_id if model is not None else None
    return is_ltx23_model_path(path)


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _can_stream(comp: ComponentResolution, cls: SGLangClass | None) -> tuple[bool, str]:
    """Whether SGLang would stream this component, and if not, why."""
    if cls is None:
        # a class SGLang's table does not know: it streams when it has layer lists (or may, before loading)
        if comp.info.known and comp.info.layer_count == 0:
            return False, f"{comp.info.class_name or comp.name} has no repeated blocks to stream"
        return True, ""
    if not cls.layerwise:
        return False, f"SGLang's {cls.sglang_class.rsplit('.', 1)[-1]} does not support layerwise offload"
    if not cls.streams:
        return False, (f"SGLang's {cls.sglang_class.rsplit('.', 1)[-1]} declares no layer list SGLang can stream "
                       "(its layer_names are empty)")
    return True, ""


def _default_enabled(comp: ComponentResolution, cls: SGLangClass | None) -> bool:
    if cls is None:
        return next(t for t in SELECTION_TOKENS if t.token == "default").select(comp.name, comp.family)
    return cls.layerwise and cls.default_enabled


def _matches(comp: ComponentResolution, token: str) -> bool:
    """layerwise_component_matches_selection: the family tokens, else the exact name."""
    if token == "text_encoder":
        return comp.family == "text_encoder"
    if token == "vae":
        return comp.family == "vae"
    return comp.name == token


def _streamed_lists(doc: Document, comp: ComponentResolution, cls: SGLangClass | None) -> None:
    """The lists SGLang streams for this class (its layer_names), as the resolution's layer paths, with
    their lengths from the inventory or, for a catalog model, from SGLang's table. Where a list's length
    is known to neither (a folder or a loaded pipeline whose discovery found other lists), the
    inventory's own lists are kept: a plan names only lists whose length it knows."""
    if cls is None or not cls.streams:
        return
    known = {ll.path: ll for ll in comp.info.layer_lists}
    model = doc.data.get("pipeline", {}).get("model")
    extra = {d["path"]: LayerList.from_dict(d) for d in (sglang_layer_lists(model, comp.name) if model else ())}
    lists = tuple(known.get(p) or extra.get(p) for p in cls.streams)
    if any(ll is None for ll in lists):
        if not comp.info.known:
            lists = tuple(LayerList(p, 0) for p in cls.streams)     # lengths are read when the pipeline loads
        else:
            return
    comp.layer_paths = tuple(ll.path for ll in lists)
    comp.info = replace(comp.info, layer_lists=lists)


def _apply_component_residency(doc: Document, res: Resolution, residency: Mapping[str, str], decide: Any) -> None:
    """Later SGLang's canonical selector: for each component its own key, else its family's group, else
    ``all``; a key that names neither a component nor a group matches nothing (a warning)."""
    for key in residency:
        if key not in res.components and key not in RESIDENCY_GROUPS:
            res.warnings.append(doc.diagnostic(("offload", "component_residency", key),
                                               f"offload.component_residency: '{key}' is neither a component of "
                                               f"this pipeline ({', '.join(res.components)}) nor a group "
                                               f"({', '.join(RESIDENCY_GROUPS)}); it matches nothing",
                                               severity="warning", key=True, code="residency-matches-nothing"))
    for comp in res.components.values():
        key = next((k for k in (comp.name, comp.family, "all") if k in residency), None)
        if key is None:
            continue
        to = RESIDENCY_MODES[residency[key]]
        decide(comp, "component-residency", to, key=key, mode=residency[key])
        comp.flag = f"offload.component_residency.{key}"
        if to == "layerwise":
            _streamed_lists(doc, comp, sglang_class(comp.info.class_name))
        else:
            comp.layer_paths = ()
            comp.info = comp.catalog_info


def _apply_offload(doc: Document, res: Resolution, base: str, decide: Any, errors: list[Diagnostic],
                   strict: bool) -> None:
    stages, names = _sglang_flags(doc, res, errors)
    sel_key, raw = _selection_raw(doc, [])
    offload = doc.data["offload"]
    later = semantics_of(offload) == "25517"
    group = dit_group_token(offload)
    groups = ("all", group)
    comps = list(res.components.values())
    classes = {c.name: sglang_class(c.info.class_name) for c in comps}

    # which components the final selection reaches (configure_layerwise_offload_modules), and which stream
    selected: dict[str, tuple[str, PathKey | None]] = {}
    streams: set[str] = set()
    if names:
        where_of = _token_places(doc, sel_key, raw)
        expanded: set[str] = set()          # tokens only 'default' wrote (after #25517): a group, not names
        if later and "default" in where_of:
            for t in LATER_DEFAULT_GROUP:
                if t not in where_of:
                    where_of[t] = where_of["default"]
                    expanded.add(t)
        auto_selected = raw is None or "layerwise_offload_components" not in doc.data["offload"] and \
            "layerwise_offload_modules" not in doc.data["offload"]
        for token in names:
            if token in groups or token in expanded:
                continue
            if not any(_matches(c, token) for c in comps):
                where = where_of.get(token) or ("offload", sel_key)
                if where_of.get(token) is None and auto_selected:
                    continue
                known = [c.name for c in comps] + [t.token for t in SELECTION_TOKENS]
                hint = (" ('dit' names the DiT group in SGLang after #25517; for that meaning set "
                        "offload.sglang_semantics: '25517')" if token == "dit" and not later else "")
                res.warnings.append(doc.diagnostic(
                    where, f"layerwise selection token '{token}' matches no component{did_you_mean(token, known)}"
                           f"{hint}", severity="warning", code="selection-matches-nothing"))
        for comp in comps:
            cls = classes[comp.name]
            token = next((t for t in names if t not in groups and _matches(comp, t)), None)
            if token is None and "all" in names:
                token = "all"
            if token is None and group in names and _default_enabled(comp, cls):
                token = group
            if token is None:
                continue
            path = where_of.get(token)
            if token == group and path is None:
                source = ("offload.dit_layerwise_offload" if doc.data["offload"].get("dit_layerwise_offload")
                          else "SGLang's performance_mode")
            elif path is None:
                source = f"SGLang's performance_mode (token '{token}')"
            elif token in expanded:
                source = f"offload token 'default' (its {token} group, SGLang after #25517)"
            elif token == "dit" and later:
                source = "offload token 'dit' (the DiT group, SGLang after #25517)"
            else:
                source = f"offload token '{token}'"
            comp.selected_by = source
            if token == comp.name and token not in ("text_encoder", "vae") and path is not None and \
                    token not in expanded:
                comp.explicit_selection = path
            selected[comp.name] = (source, path)
            ok, why = _can_stream(comp, cls)
            if ok:
                streams.add(comp.name)
            elif token not in groups and token not in expanded:
                # SGLang warns about explicitly named components only ('all' and the groups skip quietly)
                res.warnings.append(doc.diagnostic(path or ("offload", sel_key) if path or raw is not None
                                                   else ("offload",),
                                                   f"{comp.name} is selected for layerwise offload by {source}, but "
                                                   f"{why}; it stays on the GPU (SGLang skips it with a warning, and "
                                                   "the selection turned its family's CPU offload off)",
                                                   severity="warning", key=path is None and raw is None,
                                                   code="layerwise-cannot-stream"))

    def strategy_of(comp: ComponentResolution, flags: Mapping[str, Any], final: bool) -> str:
        if final and comp.name in streams:
            return "layerwise"
        if flags.get("use_fsdp_inference") and comp.family == "dit":
            return "fsdp"
        flag = FAMILY_CPU_OFFLOAD_FLAG.get(comp.family)
        if flag and flags.get(flag):
            return "cpu_offload"
        return base

    for stage in stages:
        final = stage.rule == "conflict"
        for comp in comps:
            to = strategy_of(comp, stage.flags, final)
            if stage.rule == "ltx2-snapshot-keeps-dit-offload" and comp.family == "dit" and \
                    to == comp.strategy == "cpu_offload":
                # no change of strategy, but one of SGLang's rules: the decision says why the offload stays
                res.decisions.append(Decision(rule=stage.rule, component=comp.name, from_=comp.strategy, to=to,
                                              reason=reason(stage.rule, component=comp.name, detail=stage.detail)))
            if to == comp.strategy:
                continue
            if stage.rule == "family-flag":
                if to == "fsdp" and comp.strategy == "cpu_offload":
                    decide(comp, "fsdp-overrides-cpu-offload", to, flag=comp.flag)
                else:
                    decide(comp, "family-flag", to, flag=stage.flag)
                comp.flag = f"offload.{stage.flag}"
            elif stage.rule == "performance-mode":
                decide(comp, "performance-mode", to, detail=stage.detail)
                comp.flag = "offload.performance_mode"
            elif to == "layerwise":
                source = selected[comp.name][0]
                rule = {"cpu_offload": "layerwise-overrides-cpu-offload",
                        "fsdp": "layerwise-dit-overrides-fsdp" if later else "layerwise-overrides-fsdp",
                        }.get(comp.strategy, "layerwise-selection")
                decide(comp, rule, to, source=source, flag=comp.flag,
                       detail=f"{comp.name} is streamed instead of sharded")
                comp.flag = source
            elif comp.strategy == "fsdp":
                decide(comp, "layerwise-dit-overrides-fsdp" if later else "layerwise-overrides-fsdp", to,
                       source=_any_source(selected, doc), detail=f"{comp.name} is not sharded")
                comp.flag = "offload.use_fsdp_inference"
            elif comp.name in selected:
                source = selected[comp.name][0]
                decide(comp, "layerwise-cannot-stream", to, source=source,
                       detail=_can_stream(comp, classes[comp.name])[1])
                comp.flag = source
            else:
                decide(comp, "layerwise-disables-family-cpu-offload", to, source=_any_source(selected, doc),
                       flag=FAMILY_CPU_OFFLOAD_FLAG.get(comp.family, "?"))
                comp.flag = "offload.layerwise_offload_components"
    for comp in comps:
        if comp.name in streams:
            if comp.strategy != "layerwise":       # already layerwise from defaults.strategy
                decide(comp, "layerwise-selection", "layerwise", source=selected[comp.name][0])
            _streamed_lists(doc, comp, classes[comp.name])


def _any_source(selected: Mapping[str, tuple[str, PathKey | None]], doc: Document) -> str:
    for source, _ in selected.values():
        return source
    return "the layerwise selection"


def _token_places(doc: Document, key: str, raw: Any) -> dict[str, PathKey]:
    """Where each normalised token of the spec's selection is written (its first place)."""
    places: dict[str, PathKey] = {}
    if isinstance(raw, str):
        for part in raw.split(","):
            places.setdefault(normalize_token(part), ("offload", key))
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            for part in str(item).split(","):
                places.setdefault(normalize_token(part), ("offload", key, i))
    places.pop("", None)
    return places


_COUNT_BOUND = 1 << 31


def _bounded(value: Any) -> Any:
    """An integer count beyond any layer list's length means what the bound means (K and resident counts are
    clamped to N): bounded so that it converts to a float (a 400-digit integer does not)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > _COUNT_BOUND:
        return _COUNT_BOUND
    return value


def prefetch_count(p: float, layer_count: int) -> int:
    """Design rule 7: a fraction p in [0, 1) of N layers is K = 1 + round(p·(N−1)) with Python's round
    (half to even, as SGLang computes it); p ≥ 1 is a count, floored; K is clamped to [1, N]."""
    if p < 0:
        raise ValueError("prefetch cannot be negative")
    n = max(layer_count, 1)
    k = 1 + int(round(p * (n - 1))) if p < 1 else math.floor(p)
    return min(max(k, 1), n)


def place_resident(count: int, layer_count: int, placement: str) -> tuple[int, ...]:
    """Indices of ``count`` resident layers out of ``layer_count``, placed as asked."""
    n, r = layer_count, max(0, min(count, layer_count))
    if r == 0:
        return ()
    if placement == "leading":
        return tuple(range(r))
    if placement == "trailing":
        return tuple(range(n - r, n))
    if placement == "ends":
        head = (r + 1) // 2
        return tuple(range(head)) + tuple(range(n - (r - head), n))
    # strided: spread evenly so that every streamed layer has resident compute around it to hide under
    return tuple(sorted({(i * n) // r for i in range(r)}))


def _resolve_storage(doc: Document, res: Resolution, entries: Mapping[str, Any], defaults: Mapping[str, Any],
                     compute_dtype: str, errors: list[Diagnostic]) -> None:
    """storage_dtype (defaults or a components: entry) and skip_modules: each cast component gets a
    decision naming where its dtype came from and the patterns that keep their dtype."""
    for comp in res.components.values():
        comp.compute_dtype = compute_dtype
        raw = entries.get(comp.name, {})
        entry = {} if isinstance(raw, str) else raw
        patterns = entry.get("skip_modules", [])
        bad = False
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                errors.append(doc.diagnostic(("components", comp.name, "skip_modules", i),
                                             f"skip_modules[{i}] is not a valid regular expression: {exc}"))
                bad = True
        if "storage_dtype" in entry:
            dtype, source = entry["storage_dtype"], f"components.{comp.name}.storage_dtype"
            where: tuple[Any, ...] = ("components", comp.name, "storage_dtype")
        elif "storage_dtype" in defaults:
            dtype, source, where = defaults["storage_dtype"], "defaults.storage_dtype", ()
        else:
            dtype, source, where = "none", "", ()
        if patterns and dtype == "none":
            res.warnings.append(doc.diagnostic(("components", comp.name, "skip_modules"),
                                               f"skip_modules is ignored: {comp.name} has no storage_dtype",
                                               key=True, severity="warning", code="ignored-without-storage-dtype"))
        if bad or dtype == "none":
            continue
        if comp.strategy == "fsdp":
            if where:
                errors.append(doc.diagnostic(where, f"storage_dtype is not supported with strategy 'fsdp' "
                                                    f"({comp.name} is sharded)"))
            else:
                res.warnings.append(doc.diagnostic(("defaults", "storage_dtype"),
                                                   f"storage_dtype is ignored for {comp.name}: it is sharded (fsdp)",
                                                   severity="warning", code="storage-dtype-ignored-for-strategy"))
            continue
        comp.storage_dtype = dtype
        comp.skip_modules = tuple(patterns)
        kept = [p for p in cast_skip_patterns(comp.info.class_name, comp.skip_modules) if p not in CAST_ADAPTER_SKIP]
        res.decisions.append(Decision(rule="storage-dtype", component=comp.name, from_=compute_dtype, to=dtype,
                                      reason=reason("storage-dtype", component=comp.name, source=source,
                                                    from_=compute_dtype, to=dtype, patterns=", ".join(repr(p) for p in kept) + " (and peft's adapter layers)")))


def _resolve_layers(doc: Document, comp: ComponentResolution, entry: dict[str, Any], defaults: dict[str, Any],
                    offload: dict[str, Any], errors: list[Diagnostic], res: Resolution) -> None:
    n = comp.info.layer_count
    streams = comp.strategy in ("layerwise", "auto")
    comp.placement = entry.get("placement", defaults.get("placement", DEFAULT_PLACEMENT))
    if not streams:
        for key in ("prefetch", "resident_layers"):
            if key in entry:
                res.warnings.append(doc.diagnostic(("components", comp.name, key),
                                                   f"{key} is ignored: {comp.name} is planned '{comp.strategy}', not "
                                                   "layerwise", key=True, severity="warning",
                                                   code="ignored-for-strategy"))
        for key in TUNING_KEYS:
            if comp.name in (offload.get(key) or {}):
                res.warnings.append(doc.diagnostic(("offload", key, comp.name),
                                                   f"offload.{key}.{comp.name} is ignored: {comp.name} is planned "
                                                   f"'{comp.strategy}', not layerwise (SGLang ignores it too)",
                                                   key=True, severity="warning", code="ignored-for-strategy"))
        return
    if comp.info.known and n == 0 and comp.strategy == "layerwise" and not comp.layer_paths:
        res.decisions.append(Decision(rule="layerwise-no-layers", component=comp.name, from_="layerwise",
                                      to="cpu_offload", reason=reason("layerwise-no-layers", component=comp.name)))
        comp.strategy = "cpu_offload"
        return
    per_component = offload.get("layerwise_prefetch_size") or {}
    if "prefetch" in entry:
        p, where = entry["prefetch"], ("components", comp.name, "prefetch")
    elif comp.name in per_component:
        # later SGLang (#35688): this component's own dit_offload_prefetch_size
        p, where = per_component[comp.name], ("offload", "layerwise_prefetch_size", comp.name)
        group_p = _bounded(offload.get("dit_offload_prefetch_size", defaults.get("prefetch", DEFAULT_PREFETCH)))
        if float(_bounded(p)) != float(group_p):
            res.decisions.append(Decision(
                rule="layerwise-prefetch-size", component=comp.name, from_=f"prefetch {_yaml_value(group_p)}",
                to=f"prefetch {_yaml_value(p)}",
                reason=reason("layerwise-prefetch-size", component=comp.name,
                              source=f"offload.layerwise_prefetch_size.{comp.name}", value=_yaml_value(p),
                              detail=f"in place of {_yaml_value(group_p)}")))
    elif "dit_offload_prefetch_size" in offload:
        p, where = offload["dit_offload_prefetch_size"], ("offload", "dit_offload_prefetch_size")
    elif "prefetch" in defaults:
        p, where = defaults["prefetch"], ("defaults", "prefetch")
    else:
        p, where = DEFAULT_PREFETCH, None
    p = _bounded(p)
    if p < 0:
        errors.append(doc.diagnostic(where or ("defaults",), f"prefetch cannot be negative (got {p})"))
        return
    if not math.isfinite(p):
        errors.append(doc.diagnostic(where or ("defaults",), f"prefetch must be a finite number (got {p})"))
        return
    if not comp.info.known and p < 1 and where is not None:
        res.warnings.append(doc.diagnostic(where, f"the layer count of {comp.name} is unknown before loading; "
                                                  f"prefetch fraction {p} is taken as 1 layer", severity="warning",
                                                  code="layer-count-unknown"))
    comp.prefetch_request = float(p)
    comp.prefetch = prefetch_count(float(p), n) if n else max(1, math.floor(p)) if p >= 1 else 1

    resident = entry.get("resident_layers")
    if isinstance(resident, list):
        bad = [i for i in resident if n and i >= n]
        if bad:
            errors.append(doc.diagnostic(("components", comp.name, "resident_layers"),
                                         f"resident layer index {bad[0]} is out of range: {comp.name} has {n} layers "
                                         f"(0..{n - 1})"))
            return
        comp.resident_layers = tuple(sorted(resident))
    elif isinstance(resident, int):
        if n and resident > n:
            errors.append(doc.diagnostic(("components", comp.name, "resident_layers"),
                                         f"resident_layers is {resident}, but {comp.name} has only {n} layers"))
            return
        comp.resident_count = resident
        comp.resident_layers = place_resident(resident, n, comp.placement)
    elif resident is None:
        _resolve_sglang_resident(doc, comp, offload, res)


# later SGLang's per-component layerwise knobs (#35688): COMPONENT -> value, for that exact component name
TUNING_KEYS = ("layerwise_prefetch_size", "layerwise_resident_layers", "layerwise_residency_policy")


def check_tuning_keys(doc: Document, res: Resolution, offload: Mapping[str, Any]) -> None:
    """A per-component key that names no component of the pipeline: SGLang matches exact names only and
    ignores it; here a warning."""
    for key in TUNING_KEYS:
        for name in offload.get(key) or {}:
            if name not in res.components:
                res.warnings.append(doc.diagnostic(
                    ("offload", key, name),
                    f"offload.{key}: '{name}' is not a component of this pipeline ({', '.join(res.components)}); "
                    f"SGLang matches exact component names only, so it matches nothing"
                    f"{did_you_mean(name, list(res.components))}",
                    severity="warning", key=True, code="tuning-matches-nothing"))


def _check_resident_values(doc: Document, offload: Mapping[str, Any], errors: list[Diagnostic]) -> None:
    """A resident value must be finite (SGLang fails on an infinite one when it counts the layers)."""
    places: list[tuple[PathKey, Any]] = []
    if "dit_layerwise_resident_layers" in offload:
        places.append((("offload", "dit_layerwise_resident_layers"), offload["dit_layerwise_resident_layers"]))
    places += [(("offload", "layerwise_resident_layers", name), v)
               for name, v in (offload.get("layerwise_resident_layers") or {}).items()]
    for where, value in places:
        value = _bounded(value)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            errors.append(doc.diagnostic(where, f"resident layers must be a finite number (got {value}); SGLang "
                                                "fails on it when it counts the layers"))


def _check_dit_tuning(doc: Document, res: Resolution, offload: Mapping[str, Any]) -> None:
    """SGLang's _validate_offload warnings: the DiT flags act only on a streamed DiT, and a policy only on a
    resident set."""
    streamed_dit = any(c.strategy == "layerwise" and _default_enabled(c, sglang_class(c.info.class_name))
                       for c in res.components.values())
    resident = offload.get("dit_layerwise_resident_layers") or 0
    policy = offload.get("dit_layerwise_residency_policy", DEFAULT_RESIDENCY_POLICY)
    if resident > 0 and not streamed_dit:
        res.warnings.append(doc.diagnostic(("offload", "dit_layerwise_resident_layers"),
                                           "dit_layerwise_resident_layers has no effect: no DiT is streamed layer by "
                                           "layer (SGLang warns the same; it applies with dit_layerwise_offload or a "
                                           "selected DiT)", severity="warning", key=True, code="dit-tuning-no-effect"))
    if policy != DEFAULT_RESIDENCY_POLICY and (not streamed_dit or resident <= 0):
        why = "no DiT is streamed layer by layer" if not streamed_dit else \
            "dit_layerwise_resident_layers is 0, so every layer streams and there is no resident set to place"
        res.warnings.append(doc.diagnostic(("offload", "dit_layerwise_residency_policy"),
                                           f"dit_layerwise_residency_policy has no effect: {why} (SGLang warns the "
                                           "same)", severity="warning", key=True, code="dit-tuning-no-effect"))


def list_resident_count(value: float, layer_count: int) -> int:
    """SGLang's resident count for one layer list (configure_layerwise_offload): 0 or less keeps none; a
    value in (0, 1) is a fraction, max(1, round(v·N)) with Python's round; 1 or more is a count,
    floored, at most N."""
    if value <= 0:
        return 0
    if value < 1:
        return min(layer_count, max(1, round(value * layer_count)))
    return min(layer_count, int(value))


def list_resident_indices(count: int, layer_count: int, policy: str) -> tuple[int, ...]:
    """Which of a list's layers stay (compute_streamed_layers): leading keeps 0..r-1; strided streams
    S = N - r layers at round(i·N/S), i < S, and keeps the rest."""
    n, r = layer_count, max(0, min(count, layer_count))
    if r == 0:
        return ()
    if r == n or policy == "leading":
        return tuple(range(r))
    s = n - r
    streamed = {round(i * n / s) for i in range(s)}
    return tuple(i for i in range(n) if i not in streamed)


def _resolve_sglang_resident(doc: Document, comp: ComponentResolution, offload: Mapping[str, Any],
                             res: Resolution) -> None:
    """Resident layers from the offload: section, as later SGLang places them: this component's own
    layerwise_resident_layers / layerwise_residency_policy (#35688), else, for the DiT group (the classes
    SGLang marks default-enabled), dit_layerwise_resident_layers (#31538) placed by
    dit_layerwise_residency_policy (#34534); per layer list, in run order."""
    per_value = offload.get("layerwise_resident_layers") or {}
    per_policy = offload.get("layerwise_residency_policy") or {}
    dit_group = _default_enabled(comp, sglang_class(comp.info.class_name))
    if comp.name in per_value:
        value, source = per_value[comp.name], f"offload.layerwise_resident_layers.{comp.name}"
    elif dit_group and offload.get("dit_layerwise_resident_layers"):
        value, source = offload["dit_layerwise_resident_layers"], "offload.dit_layerwise_resident_layers"
    else:
        return
    if comp.name in per_policy:
        policy, policy_source = per_policy[comp.name], f"offload.layerwise_residency_policy.{comp.name}"
    elif dit_group:
        policy = offload.get("dit_layerwise_residency_policy", DEFAULT_RESIDENCY_POLICY)
        policy_source = "offload.dit_layerwise_residency_policy"
    else:
        policy, policy_source = DEFAULT_RESIDENCY_POLICY, "the residency policy (SGLang's default)"
    value = _bounded(value)
    lists = [ll.count for ll in comp.info.layer_lists if ll.count]
    if not lists or not math.isfinite(float(value)) or float(value) <= 0:
        return                       # a value that is not finite is an error (_check_resident_values)
    indices: list[int] = []
    offset = 0
    per_list = []
    for count in lists:
        kept = list_resident_indices(list_resident_count(float(value), count), count, policy)
        indices.extend(offset + i for i in kept)
        per_list.append(f"{len(kept)} of {count}")
        offset += count
    comp.resident_count = len(indices)
    comp.resident_layers = tuple(indices)
    res.decisions.append(Decision(
        rule="layerwise-resident-layers", component=comp.name, from_="0 resident layers",
        to=f"{len(indices)} resident layers",
        reason=reason("layerwise-resident-layers", component=comp.name, source=source, value=_yaml_value(value),
                      policy_source=policy_source, policy=policy,
                      detail=f"{', '.join(per_list)} layers per list ({policy})")))
