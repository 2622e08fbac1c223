"""The rules as data: component families, selection tokens, SGLang flags, conflict rules.

Each table is the single place its facts live; the resolver, the schema generator, ``explain``
and the docs read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

DTYPES = ("bfloat16", "float16", "float32")


SPEC_STRATEGIES = ("resident", "cpu_offload", "layerwise", "fsdp", "auto")


PLACEMENTS = ("leading", "trailing", "strided", "ends")


@dataclass(frozen=True)
class Token:
    token: str
    description: str
    select: Callable[[str, str], bool]    # (component name, family) -> selected


SELECTION_TOKENS: tuple[Token, ...] = (
    Token("all", "every component that can stream", lambda name, fam: True),
    # The resolver selects by class: what the component's class declares in SGLang
    # (layerwise_offload_default_enabled). This name rule is the fallback for classes SGLang does not know.
    Token("default", "the components whose class SGLang marks default-enabled (its DiTs; not the bridge, the "
                     "text encoders or the VAEs)",
          lambda name, fam: fam == "dit" and name != "dual_tower_bridge"),
    Token("text_encoder", "the whole text-encoder family", lambda name, fam: fam == "text_encoder"),
    Token("vae", "the whole VAE family", lambda name, fam: fam == "vae"),
)


def normalize_token(raw: str) -> str:
    return raw.strip().replace("-", "_").lower()


# Family -> SGLang's CPU-offload flag of that family (layerwise_offload_components.CPU_OFFLOAD_FLAG_NAMES).
FAMILY_CPU_OFFLOAD_FLAG: dict[str, str] = {
    "dit": "dit_cpu_offload",
    "text_encoder": "text_encoder_cpu_offload",
    "image_encoder": "image_encoder_cpu_offload",
    "vae": "vae_cpu_offload",
}


# Family flags (design rule 3): flag -> (family, strategy)
FAMILY_FLAGS: dict[str, tuple[str, str]] = {
    "dit_cpu_offload": ("dit", "cpu_offload"),
    "text_encoder_cpu_offload": ("text_encoder", "cpu_offload"),
    "image_encoder_cpu_offload": ("image_encoder", "cpu_offload"),
    "vae_cpu_offload": ("vae", "cpu_offload"),
    "use_fsdp_inference": ("dit", "fsdp"),
}


@dataclass(frozen=True)
class Rule:
    id: str
    summary: str
    reason: str      # a template: {component}, {flag}, {source}, {from_}, {to}


RULES: dict[str, Rule] = {r.id: r for r in (
    Rule("default-strategy", "defaults.strategy applies to every component",
         "defaults.strategy is '{to}'"),
    Rule("family-flag", "an SGLang family flag sets the strategy of its family",
         "offload.{flag} is true and {component} is in the {family} family"),
    Rule("performance-mode", "SGLang's performance_mode fills the flags left unset (its server-args auto-tuning)",
         "{detail}"),
    Rule("fsdp-overrides-cpu-offload", "FSDP and CPU offload of one family: FSDP wins",
         "offload.use_fsdp_inference shards {component}; its CPU offload from {flag} is turned off"),
    Rule("layerwise-selection", "a component selected for layerwise offload is streamed",
         "{component} is selected by {source}"),
    Rule("layerwise-overrides-cpu-offload",
         "a layerwise selection turns its family's CPU-offload flag off, for the whole family (as SGLang does)",
         "{component} is selected for layerwise offload by {source}; its CPU offload from {flag} is turned off "
         "(the weights already live in pinned host memory and stream in per layer)"),
    Rule("layerwise-disables-family-cpu-offload",
         "a layerwise selection turns its family's CPU-offload flag off for the whole family, selected or not",
         "{source} selects the {family} family for layerwise offload, which turns offload.{flag} off for the whole "
         "family (SGLang: _disable_cpu_offload_for_layerwise_components); {component} is not streamed, so it stays "
         "on the GPU"),
    Rule("layerwise-overrides-fsdp",
         "any layerwise selection turns use_fsdp_inference off, for the whole pipeline (as SGLang does)",
         "{source} selects components for layerwise offload, which turns offload.use_fsdp_inference off "
         "(SGLang: _validate_offload); {detail}"),
    Rule("layerwise-cannot-stream",
         "a selected component that cannot stream stays where its family flag, turned off by the selection, leaves it",
         "{component} is selected by {source}, but {detail}; SGLang skips it with a warning, and with its family's "
         "CPU offload turned off by the selection it stays on the GPU"),
    Rule("component-entry", "a components: entry is the most specific statement and overrides flags",
         "components.{component} sets strategy '{to}'"),
    Rule("auto-budget", "strategy auto: chosen under memory.gpu_budget to minimise predicted time",
         "{detail}"),
    Rule("layerwise-no-layers", "a component with no layer lists cannot stream layer by layer",
         "{component} has no repeated blocks to stream; it is offloaded whole instead"),
)}


def reason(rule_id: str, **fields: object) -> str:
    class _Default(dict):
        def __missing__(self, key: str) -> str:
            return "?"
    return RULES[rule_id].reason.format_map(_Default(fields))
