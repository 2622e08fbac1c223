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


# (name, kind, description); kind: bool | selection | prefetch | mode | count | count0 | size | residency
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
    ("dit_layerwise_resident_layers", "count0",
     "Later SGLang's --dit-layerwise-resident-layers (#31538): keep this many leading layers of each streamed DiT "
     "on the GPU (the component's layer lists in run order; more than it has keeps all); a components: "
     "resident_layers wins."),
    ("component_residency", "residency",
     "Later SGLang's --component-residency (#34736): COMPONENT: MODE (resident, component-offload, "
     "layerwise-offload). A component's own name wins over its group (dit, text_encoder, image_encoder, vae, "
     "all); what it matches overrides every other flag of this section, what it does not match keeps theirs."),
    ("num_gpus", "count", "SGLang's --num-gpus (default 1): multi-GPU auto-tuning (FSDP in place of DiT offload)."),
    ("gpu_memory", "size",
     "Total memory of one GPU, read by the performance_mode decisions that depend on it (SGLang asks the device)."),
    ("gpu_memory_available", "size",
     "Free memory of the least-free GPU at start-up (default: gpu_memory), read by the auto decisions that use it."),
)
