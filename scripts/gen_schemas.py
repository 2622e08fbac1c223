"""Writes schemas/deployment.schema.json and schemas/plan.schema.json from the tables in planner.planning.rules.

The schema files are committed (editors and check-jsonschema read them); tests check they are up to date.
Run: python scripts/gen_schemas.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.plan import HOST_TIERS, STRATEGIES  # noqa: E402
from planner.plan import STORAGE_DTYPES  # noqa: E402
from planner.planning.rules import DTYPES, HOST_TIER_CHOICES, PLACEMENTS, SPEC_STRATEGIES, STORAGE_DTYPE_CHOICES
from planner.spec.offload_flags import (LTX2_TWO_STAGE_DEVICE_MODES, OFFLOAD_FLAGS, PERFORMANCE_MODES,
                                        RESIDENCY_MODES, RESIDENCY_POLICIES,
                                        SGLANG_SEMANTICS)

SIZE = {
    "description": "Bytes: an integer, or a string with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB).",
    "oneOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*([KMGT]i?B|B)?\s*$"},
    ],
}
# a host-bound step priced on the fastest and slowest host its profile has seen: [fastest, slowest]
SECONDS_RANGE = {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 2, "maxItems": 2}
PREFETCH = {
    "description": "Layers loaded ahead of the one running: a count (>= 1, floored) or a fraction in [0, 1) of the layer count.",
    "type": "number", "minimum": 0,
}
STRATEGY = {"enum": list(SPEC_STRATEGIES)}
STORAGE_DTYPE = {
    "description": "Store the weights of Linear, Conv and Embedding modules in this float8 dtype and upcast them to "
                   "the pipeline dtype just before each runs (diffusers' layerwise casting); 'none' stores them as "
                   "loaded.",
    "enum": list(STORAGE_DTYPE_CHOICES),
}
HOST_TIER = {
    "description": "Where a streamed (layerwise) component's host bytes wait: 'pinned' (page-locked memory, the "
                   "default), 'mapped' (the safetensors file's mapping and the page cache, copied per layer through "
                   "a small pinned staging ring), 'disk' (read per layer with direct I/O into the ring), 'auto' (the "
                   "planner picks under memory.host_budget and memory.host_ram).",
    "enum": list(HOST_TIER_CHOICES),
}
DOTTED = {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$"}


def deployment_schema() -> dict:
    component_entry = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "strategy": STRATEGY,
            "prefetch": PREFETCH,
            "resident_layers": {
                "description": "Layers never streamed: a count placed by 'placement', or explicit indices into the layer sequence.",
                "oneOf": [
                    {"type": "integer", "minimum": 0},
                    {"type": "array", "items": {"type": "integer", "minimum": 0}, "uniqueItems": True},
                ],
            },
            "placement": {"enum": list(PLACEMENTS)},
            "layers": {"description": "Dotted paths of the layer lists to stream, overriding discovery.",
                       "type": "array", "items": DOTTED, "minItems": 1},
            "storage_dtype": STORAGE_DTYPE,
            "host_tier": HOST_TIER,
            "skip_modules": {"description": "Regular expressions (re.search on a module's dotted path): matching "
                                            "modules keep their dtype, added to diffusers' defaults and the class's.",
                             "type": "array", "items": {"type": "string", "minLength": 1}},
        },
    }
    offload_props: dict = {}
    for name, kind, doc in OFFLOAD_FLAGS:
        if kind == "bool":
            offload_props[name] = {"type": "boolean", "description": doc}
        elif kind == "selection":
            offload_props[name] = {"description": doc, "oneOf": [
                {"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
        elif kind == "prefetch":
            # SGLang refuses a negative value only when something is selected: the resolver checks it
            offload_props[name] = {"type": "number", "description": doc}
        elif kind == "mode":
            offload_props[name] = {"enum": list(PERFORMANCE_MODES), "description": doc}
        elif kind == "count":
            offload_props[name] = {"type": "integer", "minimum": 1, "description": doc}
        elif kind == "layers":
            offload_props[name] = {"type": "number", "minimum": 0, "description": doc}
        elif kind == "policy":
            offload_props[name] = {"enum": list(RESIDENCY_POLICIES), "description": doc}
        elif kind == "tuning":
            offload_props[name] = {"type": "object", "description": doc, "propertyNames": {"minLength": 1},
                                   "additionalProperties": {"type": "number", "minimum": 0}}
        elif kind == "tuning_policy":
            offload_props[name] = {"type": "object", "description": doc, "propertyNames": {"minLength": 1},
                                   "additionalProperties": {"enum": list(RESIDENCY_POLICIES)}}
        elif kind == "semantics":
            # an unquoted 25517 is a YAML integer: both spellings are accepted
            offload_props[name] = {"enum": [*SGLANG_SEMANTICS, *(int(v) for v in SGLANG_SEMANTICS if v.isdigit())],
                                   "description": doc}
        elif kind == "size":
            offload_props[name] = dict(SIZE, description=doc)
        elif kind == "pipeline_class":
            offload_props[name] = {"type": "string", "minLength": 1, "description": doc}
        elif kind == "ltx2_mode":
            offload_props[name] = {"enum": list(LTX2_TWO_STAGE_DEVICE_MODES), "description": doc}
        elif kind == "residency":
            offload_props[name] = {"type": "object", "description": doc, "propertyNames": {"minLength": 1},
                                   "additionalProperties": {"enum": list(RESIDENCY_MODES)}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://residency-planner.dev/schemas/deployment.schema.json",
        "title": "residency-planner deployment spec",
        "type": "object",
        "additionalProperties": False,
        "required": ["version", "pipeline"],
        "properties": {
            "$schema": {"type": "string"},
            "version": {"const": 1},
            "pipeline": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "model": {"type": "string", "minLength": 1, "description": "A built-in catalog entry."},
                    "path": {"type": "string", "minLength": 1, "description": "A diffusers pipeline folder."},
                    "components": {"type": "object", "minProperties": 1,
                                   "additionalProperties": {"type": "string", "minLength": 1},
                                   "description": "Component name to class name."},
                    "dtype": {"enum": list(DTYPES)},
                },
                "oneOf": [{"required": ["model"]}, {"required": ["path"]}, {"required": ["components"]}],
            },
            "device": {"type": "string", "pattern": r"^(cuda(:[0-9]+)?|cpu)$"},
            "memory": {
                "type": "object", "additionalProperties": False,
                "properties": {"gpu_budget": SIZE,
                               "host_budget": dict(SIZE, description="The process's peak host memory while "
                                                   "loading and running (about 3 GiB for the process, the pinned "
                                                   "bytes, the loader's largest transient); the planner keeps the "
                                                   "largest streamed components in their files to fit it. "
                                                   + SIZE["description"]),
                               "margin": SIZE,
                               "host_ram": dict(SIZE, description="The host RAM the plan may count on (the host "
                                                "peak, the page cache of mapped weights); with it "
                                                "the planner reads from disk what the page cache cannot hold. "
                                                + SIZE["description"])},
            },
            "defaults": {
                "type": "object", "additionalProperties": False,
                "properties": {"strategy": STRATEGY, "prefetch": PREFETCH, "placement": {"enum": list(PLACEMENTS)},
                               "storage_dtype": STORAGE_DTYPE, "host_tier": HOST_TIER},
            },
            "components": {
                "type": "object",
                "additionalProperties": {"oneOf": [STRATEGY, component_entry]},
            },
            "offload": {"type": "object", "additionalProperties": False, "properties": offload_props},
            "workload": {
                "type": "object", "additionalProperties": False,
                "description": "What one generation looks like, for activation and time estimates.",
                "properties": {
                    "height": {"type": "integer", "minimum": 8}, "width": {"type": "integer", "minimum": 8},
                    "frames": {"type": "integer", "minimum": 1}, "batch_size": {"type": "integer", "minimum": 1},
                    "steps": {"type": "integer", "minimum": 1}, "text_tokens": {"type": "integer", "minimum": 1},
                    "num_images": {"type": "integer", "minimum": 1,
                                   "description": "Images per prompt (the pipeline's num_images_per_prompt)."},
                    "guidance_scale": {"type": "number", "minimum": 0,
                                       "description": "Classifier-free guidance scale; where the pipeline batches "
                                                      "guidance, the denoiser's batch doubles when it is on."},
                    "vae_tiling": {"type": "boolean",
                                   "description": "The VAE decodes in tiles (diffusers' vae.enable_tiling()): an "
                                                  "image larger than the VAE's tile is decoded tile by tile."},
                },
            },
            "profile": {"type": "string", "minLength": 1,
                        "description": "Hardware profile for time estimates: a built-in name (h100, h200) or a file from 'calibrate'."},
        },
    }


def plan_schema() -> dict:
    est = {"type": "object", "additionalProperties": False, "properties": {
        "gpu_resident_bytes": {"type": "integer", "minimum": 0},
        "gpu_transient_bytes": {"type": "integer", "minimum": 0},
        "host_pinned_bytes": {"type": "integer", "minimum": 0},
        "step_seconds": {"type": "number", "minimum": 0},
        "activation_bytes": {"type": "integer", "minimum": 0},
        "host_file_bytes": {"type": "integer", "minimum": 0,
                            "description": "host_tier mapped/disk: streamed bytes read from the files per call"},
        "staging_bytes": {"type": "integer", "minimum": 0,
                          "description": "host_tier mapped/disk: the pinned staging ring"}}}
    component = {
        "type": "object", "additionalProperties": False, "required": ["strategy", "family"],
        "properties": {
            "strategy": {"enum": list(STRATEGIES)},
            "family": {"type": "string"},
            "class": {"type": "string"},
            "prefetch": {"type": ["integer", "null"], "minimum": 1},
            "resident_layers": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "layers": {"type": "array",
                       "description": "Layer lists in the order the forward runs them: module path, length, K.",
                       "items": {"type": "object", "additionalProperties": False,
                                 "required": ["path", "count"],
                                 "properties": {"path": {"type": "string"},
                                                "count": {"type": "integer", "minimum": 0},
                                                "prefetch": {"type": "integer", "minimum": 1}}}},
            "stream_non_layer": {"type": "boolean",
                                 "description": "layerwise: modules outside the layer lists stream too"},
            "host_tier": {"enum": list(HOST_TIERS), "description": "where the host copy of the weights waits"},
            "phase": {"type": "string", "description": "the part of a generation it runs in (encode, denoise, "
                      "decode): a layerwise component's slots leave the device when another phase starts"},
            "storage": {"type": "object", "additionalProperties": False,
                        "required": ["dtype", "compute_dtype", "skip_modules", "cast_classes"],
                        "description": "weights of cast modules stored in dtype, upcast to compute_dtype just "
                                       "before each runs; weight_bytes counts them as stored",
                        "properties": {"dtype": {"enum": list(STORAGE_DTYPES)},
                                       "compute_dtype": {"enum": list(DTYPES)},
                                       "skip_modules": {"type": "array", "items": {"type": "string"}},
                                       "cast_classes": {"type": "array", "items": {"type": "string"}},
                                       "source_bytes": {"type": "integer", "minimum": 0}}},
            "weight_bytes": {"type": "integer", "minimum": 0},
            "estimate": est,
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://residency-planner.dev/schemas/plan.schema.json",
        "title": "residency-planner residency plan",
        "type": "object", "additionalProperties": False,
        "required": ["version", "device", "components", "decisions", "warnings", "estimate"],
        "properties": {
            "version": {"const": 1},
            "device": {"type": "string", "pattern": r"^(cuda(:[0-9]+)?|cpu)$"},
            "dtype": {"enum": list(DTYPES)},
            "pipeline": {"type": "object"},
            "components": {"type": "object", "additionalProperties": component},
            "decisions": {"type": "array", "items": {
                "type": "object", "additionalProperties": False,
                "required": ["rule", "component", "from", "to", "reason"],
                "properties": {k: {"type": "string"} for k in ("rule", "component", "from", "to", "reason")}}},
            "warnings": {"type": "array", "items": {"anyOf": [
                {"type": "object", "additionalProperties": False, "required": ["message"],
                 "properties": {"file": {"type": "string"}, "line": {"type": "integer", "minimum": 0},
                                "column": {"type": "integer", "minimum": 0},
                                "severity": {"enum": ["warning", "error"]},
                                "message": {"type": "string"}, "where": {"type": "string"},
                                "code": {"type": "string"}}},
                {"type": "string", "description": "a warning of a plan saved before warnings were structured"}]}},
            "estimate": {"type": "object", "additionalProperties": False,
                         "required": ["gpu_peak_bytes", "host_pinned_bytes"],
                         "properties": {
                             "gpu_peak_bytes": {"type": "integer", "minimum": 0},
                             "host_pinned_bytes": {"type": "integer", "minimum": 0},
                             "host_peak_bytes": {"type": "integer", "minimum": 0},
                             "gpu_budget_bytes": {"type": "integer", "minimum": 0},
                             "host_budget_bytes": {"type": "integer", "minimum": 0},
                             "margin_bytes": {"type": "integer", "minimum": 0},
                             "activation_bytes": {"type": "integer", "minimum": 0},
                             "seconds_per_step": {"type": "number", "minimum": 0},
                             "profile": {"type": "string"},
                             "profile_source": {"type": "string"},
                             "steps": {"type": "integer", "minimum": 0},
                             "encode_seconds": {"type": "number", "minimum": 0},
                             "decode_seconds": {"type": "number", "minimum": 0},
                             "generation_seconds": {"type": "number", "minimum": 0},
                             "step_launch_seconds": {"type": "number", "minimum": 0},
                             "step_gpu_seconds": {"type": "number", "minimum": 0},
                             "seconds_per_step_range": SECONDS_RANGE,
                             "generation_seconds_range": SECONDS_RANGE}},
        },
    }


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main() -> None:
    (ROOT / "schemas" / "deployment.schema.json").write_text(render(deployment_schema()))
    (ROOT / "schemas" / "plan.schema.json").write_text(render(plan_schema()))


if __name__ == "__main__":
    main()
