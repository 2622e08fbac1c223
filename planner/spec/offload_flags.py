"""The SGLang server arguments the ``offload:`` section understands: names, kinds and what each means.

Spec vocabulary: the schema generator, ``from-sglang`` and the resolver read this one table.
"""

from __future__ import annotations

# SGLang's performance_mode values (server_args_auto_tune.PERFORMANCE_MODES); its default is auto.
PERFORMANCE_MODES = ("manual", "auto", "speed", "memory")
DEFAULT_PERFORMANCE_MODE = "auto"


# later SGLang's --component-residency COMPONENT=MODE (#34736): its modes as this project's strategies, and
# the group keys an exact component name wins over
RESIDENCY_MODES = {"resident": "resident", "component-offload": "cpu_offload", "layerwise-offload": "layerwise"}
RESIDENCY_GROUPS = ("dit", "text_encoder", "image_encoder", "vae", "all")

# later SGLang's --dit-layerwise-residency-policy (#34534): which layers of a list the resident count keeps
# (layerwise_offload_components.RESIDENCY_POLICIES); leading is its default
RESIDENCY_POLICIES = ("leading", "strided")
DEFAULT_RESIDENCY_POLICY = "leading"

# Which SGLang the offload: section means: the seed's merge commit (the default), or SGLang after #25517
# (the token 'dit' names the DiT group, 'default' the text-encoder, image-encoder and VAE groups, and a
# layerwise selection turns FSDP off only when it reaches a DiT).
SGLANG_SEMANTICS = ("416fdbb", "25517")
DEFAULT_SGLANG_SEMANTICS = "416fdbb"


# SGLang's LTX-2.3 two-stage residency (server_args.py at 416fdbb): --ltx2-two-stage-device-mode's choices
# (LTX2_TWO_STAGE_DEVICE_MODES), the --pipeline-class-name values that make a pipeline two-stage
# (LTX2_TWO_STAGE_PIPELINE_NAMES), the total memory from which an unset mode defaults to resident
# (LTX2_RESIDENT_AUTO_ENABLE_MEM_GB; an H200 by name too, else snapshot; snapshot off CUDA), and the model-path
# fragments of _is_ltx23_model_path (lower-cased path).
LTX2_TWO_STAGE_DEVICE_MODES = ("original", "snapshot", "resident")
LTX2_TWO_STAGE_PIPELINE_NAMES = ("LTX2TwoStagePipeline", "LTX2TwoStageHQPipeline")
LTX2_RESIDENT_MIN_GIB = 130
LTX23_MODEL_PATH_FRAGMENTS = ("lightricks/ltx-2.3", "models--lightricks--ltx-2.3", "lightricks__ltx-2.3")


def is_ltx23_model_path(model_path: str | None) -> bool:
    """SGLang's ServerArgs._is_ltx23_model_path: the path names Lightricks/LTX-2.3 (a Hugging Face id, its
    cache folder, or a folder named like it)."""
    return bool(model_path) and any(f in str(model_path).lower() for f in LTX23_MODEL_PATH_FRAGMENTS)


# (name, kind, description); kind: bool | selection | prefetch | mode | count | layers | policy | size |
# residency | tuning (COMPONENT: number >= 0) | tuning_policy (COMPONENT: policy) | semantics |
# pipeline_class (a non-empty string) | ltx2_mode
OFFLOAD_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("performance_mode", "mode",
     "SGLang's preset (default auto): manual leaves unset flags unset; auto fills them from the model's deployment "
     "config and the GPU's memory; memory and speed are presets. Explicit flags win."),
    ("dit_layerwise_offload", "bool",
     "Legacy: stream the components SGLang's classes mark default-enabled (adds the token 'default')."),
    ("layerwise_offload_components", "selection",
     "Components to stream layer by layer: comma-separated tokens or a list (all, default, text_encoder, vae, or names)."),
    ("layerwise_offload_modules", "selection", "Alias of layerwise_offload_components."),
    ("dit_offload_prefetch_size", "prefetch",
     "Layers prefetched ahead, per layer list: a fraction in [0, 1) of the list's length, or a count (floored). "
     "Negative is an error when something is selected."),
    ("dit_cpu_offload", "bool", "Move the DiT family to the GPU whole before use and back after."),
    ("text_encoder_cpu_offload", "bool", "CPU offload for the text-encoder family."),
    ("image_encoder_cpu_offload", "bool", "CPU offload for the image-encoder family."),
    ("vae_cpu_offload", "bool", "CPU offload for the VAE family."),
    ("use_fsdp_inference", "bool", "Shard the DiT family with FSDP2 across ranks."),
    ("dit_layerwise_resident_layers", "layers",
     ("Later SGLang's --dit-layerwise-resident-layers (#31538): layers of each streamed DiT-group component kept "
     "on the GPU, per layer list as SGLang counts them: a value in (0, 1) is a fraction of the list "
     "(max(1, round(v*N))), 1 or more a count (floored, at most N); 0 streams every layer. Which layers: "
     "dit_layerwise_residency_policy. A components: resident_layers wins.")),
    ("dit_layerwise_residency_policy", "policy",
     ("Later SGLang's --dit-layerwise-residency-policy (#34534): leading (default) keeps each list's first layers, "
     "strided spreads them over the list (the streamed ones at round(i*N/S), i < S). DiT group only.")),
    ("layerwise_prefetch_size", "tuning",
     ("Later SGLang's --layerwise-prefetch-size (#35688): COMPONENT: p, a per-component dit_offload_prefetch_size "
     "(same units), for that exact component name; a components: prefetch wins.")),
    ("layerwise_resident_layers", "tuning",
     ("Later SGLang's --layerwise-resident-layers (#35688): COMPONENT: v, a per-component "
     "dit_layerwise_resident_layers (same units, any streamed component); a components: resident_layers wins.")),
    ("layerwise_residency_policy", "tuning_policy",
     ("Later SGLang's --layerwise-residency-policy (#35688): COMPONENT: leading | strided, a per-component "
     "dit_layerwise_residency_policy.")),
    ("sglang_semantics", "semantics",
     ("Which SGLang this section means: 416fdbb (default, the seed's merge commit) or 25517 (after SGLang #25517: "
     "the token dit selects the DiT group, default the text-encoder, image-encoder and VAE groups, and a "
     "selection turns use_fsdp_inference off only when it reaches a DiT).")),
    ("component_residency", "residency",
     "Later SGLang's --component-residency (#34736): COMPONENT: MODE (resident, component-offload, "
     "layerwise-offload). A component's own name wins over its group (dit, text_encoder, image_encoder, vae, "
     "all); what it matches overrides every other flag of this section, what it does not match keeps theirs."),
    ("pipeline_class_name", "pipeline_class",
     ("SGLang's --pipeline-class-name: the pipeline class SGLang runs instead of model_index.json's. "
      "LTX2TwoStagePipeline or LTX2TwoStageHQPipeline on an LTX-2.3 model path (Lightricks/LTX-2.3, its cache "
      "folder) is SGLang's LTX-2.3 two-stage pipeline, which ltx2_two_stage_device_mode applies to; other values "
      "change no residency.")),
    ("ltx2_two_stage_device_mode", "ltx2_mode",
     ("SGLang's --ltx2-two-stage-device-mode, for the LTX-2.3 two-stage pipeline: original, snapshot or resident; "
      "unset, SGLang's default: resident on an H200 or a GPU of 130 GiB or more (offload.gpu_memory), else "
      "snapshot (snapshot on device cpu). In snapshot mode performance_mode auto keeps dit_cpu_offload where "
      "enough free memory would turn it off (SGLang moves the stage DiTs between phases with it).")),
    ("num_gpus", "count", "SGLang's --num-gpus (default 1): multi-GPU auto-tuning (FSDP in place of DiT offload)."),
    ("gpu_memory", "size",
     "Total memory of one GPU, read by the performance_mode decisions that depend on it (SGLang asks the device)."),
    ("gpu_memory_available", "size",
     "Free memory of the least-free GPU at start-up (default: gpu_memory), read by the auto decisions that use it."),
)
