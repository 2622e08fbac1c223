"""The offload: section and from-sglang against SGLang's own resolution at 416fdbb (PR #24593).

How the expected outcomes were obtained: SGLang's python/sglang/multimodal_gen at commit 416fdbb
(the fork mickqian/sglang) was run on the CPU, with the modules it imports but never uses for
server arguments stubbed out, and with ``current_platform`` patched as its own
test/unit/test_server_args.py patches it (CUDA; total memory ``gpu_gib`` GiB; available memory
``available_gib`` GiB, else the total). Each case's ``argv`` went through SGLang's argparse
(ServerArgs.add_cli_args) and ServerArgs.from_cli_args; the pipeline's components were then built as
modules whose classes carry what SGLang's classes declare (LayerwiseOffloadableModuleMixin or not,
layerwise_offload_default_enabled, layer_names, read from SGLang's classes through its ModelRegistry),
with lists of the lengths this project's catalog gives, and passed to
configure_layerwise_offload_modules with the fake device module of its
test/unit/test_layerwise_offload.py, as its gpu_worker does; each component's residency is
build_component_residency_strategy's (LayerwiseOffloadStrategy: layerwise, VanillaD2HStrategy:
cpu_offload), ``fsdp`` for a DiT under use_fsdp_inference, and each layerwise component's managers
give ``[list length, prefetch K]`` in order. ``error`` is the exception SGLang raised. The model's
pipeline config comes from SGLang's registry for the Hugging Face id (its model_index.json reduced to
the pipeline class, since nothing can be downloaded). The outcomes are stored here as data; no SGLang
code is part of this project.

Every case is planned twice: through ``from-sglang`` (the SGLang flag line, with --gpu-memory for the
device SGLang would have asked) and through a spec's ``offload:`` section.

The cases include every residency assertion of SGLang's test/unit/test_server_args.py (``source``
names the test; a test's pipeline config is played by the catalog model or Hugging Face id that
resolves to it); the assertions of test/unit/test_layerwise_offload.py about which components are
configured and which residency strategy they get are at the end (their expected values are that file's
assertions, which pass when run the same way).

The LTX-2.3 two-stage cases (``pipeline_class_name``, ``ltx2_two_stage_device_mode``; the last ten,
among them test_auto_ltx_snapshot_keeps_dit_offload_and_replaces_encoder_cpu_offload) were obtained
the same way up to the server arguments: SGLang's ServerArgs at 416fdbb, imported with the modules it
never uses for server arguments stubbed out, through that test file's own
``_from_dict_with_pipeline_config`` helper (LTX2PipelineConfig patched in; CUDA; ``gpu_gib`` total,
``available_gib`` free; the model path and flags of each case), which also ran that test file, the
test above passing. The flags SGLang resolved are one of two sets, both of which the LTX-2 cases here
already map to components: dit_cpu_offload true with layerwise_offload_components [text_encoder,
image_encoder] (as ltx_auto_low_available) or the same with dit_cpu_offload false (as
ltx_auto_high_available); their per-component outcome is that of those cases. The components are the
catalog's LTX-2 ones (``LTX2_COMPONENTS``): the catalog has no LTX-2.3 entry, SGLang's registry gives
Lightricks/LTX-2.3 the same LTX2PipelineConfig, and the SGLang test loads no model either.
"""

from __future__ import annotations

import json

import pytest

from planner import SpecError, make_plan
from planner.cli.main import main as cli_main
from planner.inventory.model import ComponentInfo, Inventory, LayerList
from planner.spec.document import Document
from planner.spec.families import sglang_model
from planner.spec.sglang_args import SGLangArgsError, parse_args, translate

MiB = 1 << 20

# The LTX-2 pipeline's components as the catalog's ltx-2 gives them (classes, layer lists SGLang streams and
# their lengths), for the Hugging Face id Lightricks/LTX-2.3, which the catalog has no entry for: SGLang's
# registry resolves it to the same LTX2PipelineConfig, and its unit test patches in exactly that config.
def ltx2_outcome(transformer):
    """SGLang's outcome on the LTX-2 components when auto (on an LTX-2 pipeline config, the DiT and the
    encoders offloaded, the encoders' offload replaced by layerwise) leaves the DiT ``transformer``."""
    return {'text_encoder': ['layerwise', [48, 1]], 'connectors': ['resident'], 'transformer': [transformer],
            'vae': ['resident'], 'audio_vae': ['resident'], 'vocoder': ['resident']}


LTX2_COMPONENTS = {'text_encoder': ['Gemma3ForConditionalGeneration',
                                    {'model.language_model.layers': 48, 'model.vision_tower.encoder.layers': 27}],
                   'connectors': ['LTX2TextConnectors', {}],
                   'transformer': ['LTX2VideoTransformer3DModel', {'transformer_blocks': 48}],
                   'vae': ['AutoencoderKLLTX2Video', {'encoder.down_blocks': 4, 'decoder.up_blocks': 3}],
                   'audio_vae': ['AutoencoderKLLTX2Audio', {'encoder.down': 3, 'decoder.up': 3}],
                   'vocoder': ['LTX2Vocoder', {'upsamplers': 5, 'resnets': 15}]}

CASES = [{'id': 'layerwise_components_imply_layerwise',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'text_encoder', 'transformer'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual', 'layerwise_offload_components': ['text_encoder', 'transformer']},
  'sglang': {'text_encoder': ['layerwise', [28, 1]], 'transformer': ['layerwise', [60, 1]], 'vae': ['resident']},
  'source': 'test_server_args.py::test_layerwise_offload_components_imply_layerwise'},
 {'id': 'dit_layerwise_extends_default',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--performance-mode', 'manual', '--dit-layerwise-offload', 'true'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual', 'dit_layerwise_offload': True},
  'sglang': {'text_encoder': ['resident'], 'transformer': ['layerwise', [60, 1]], 'vae': ['resident']},
  'source': 'test_server_args.py::test_dit_layerwise_offload_extends_default_components, '
            'test_dit_layerwise_offload_from_kwargs, test_dit_layerwise_offload_cli_arg'},
 {'id': 'components_normalize_commas',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'text-encoder,transformer'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual', 'layerwise_offload_components': 'text-encoder,transformer'},
  'sglang': {'text_encoder': ['layerwise', [28, 1]], 'transformer': ['layerwise', [60, 1]], 'vae': ['resident']},
  'source': 'test_server_args.py::test_layerwise_offload_components_normalize_commas'},
 {'id': 'components_cli_list',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'transformer', 'text_encoder'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual', 'layerwise_offload_components': ['transformer', 'text_encoder']},
  'sglang': {'text_encoder': ['layerwise', [28, 1]], 'transformer': ['layerwise', [60, 1]], 'vae': ['resident']},
  'source': 'test_server_args.py::test_layerwise_offload_components_cli_args'},
 {'id': 'vae_default_false_video',
  'model': 'Lightricks/LTX-2',
  'argv': [],
  'gpu_gib': 80,
  'offload': {},
  'sglang': {'text_encoder': ['layerwise', [48, 1]],
             'connectors': ['resident'],
             'transformer': ['resident'],
             'vae': ['resident'],
             'audio_vae': ['resident'],
             'vocoder': ['resident']},
  'source': 'test_server_args.py::test_vae_cpu_offload_defaults_false_for_video_generation (a video model with '
            "SGLang's default deployment hints)"},
 {'id': 'memory_low_gpu_component_offload',
  'model': 'Lightricks/LTX-2',
  'argv': ['--performance-mode', 'memory'],
  'gpu_gib': 16,
  'offload': {'performance_mode': 'memory'},
  'sglang': {'text_encoder': ['layerwise', [48, 1]],
             'connectors': ['resident'],
             'transformer': ['cpu_offload'],
             'vae': ['resident'],
             'audio_vae': ['resident'],
             'vocoder': ['resident']},
  'source': 'test_server_args.py::test_vae_cpu_offload_defaults_false_on_low_memory_gpu'},
 {'id': 'explicit_vae_offload_kept',
  'model': 'Lightricks/LTX-2',
  'argv': ['--vae-cpu-offload', 'true'],
  'gpu_gib': 80,
  'offload': {'vae_cpu_offload': True},
  'sglang': {'text_encoder': ['cpu_offload'],
             'connectors': ['resident'],
             'transformer': ['resident'],
             'vae': ['cpu_offload'],
             'audio_vae': ['cpu_offload'],
             'vocoder': ['cpu_offload']},
  'source': 'test_server_args.py::test_explicit_vae_cpu_offload_true_is_preserved_without_component_selection'},
 {'id': 'selection_disables_matching_flags',
  'model': 'OpenMOSS-Team/MOVA-360p',
  'argv': ['--performance-mode', 'manual', '--dit-cpu-offload', '--text-encoder-cpu-offload',
           '--image-encoder-cpu-offload', '--vae-cpu-offload', '--layerwise-offload-components', 'text_encoder',
           'image_encoder', 'video_dit', 'vae'],
  'gpu_gib': 16,
  'offload': {'performance_mode': 'manual',
              'dit_cpu_offload': True,
              'text_encoder_cpu_offload': True,
              'image_encoder_cpu_offload': True,
              'vae_cpu_offload': True,
              'layerwise_offload_components': ['text_encoder', 'image_encoder', 'video_dit', 'vae']},
  'components': {'text_encoder': ['UMT5EncoderModel', {'encoder.block': 24}],
                 'video_dit': ['WanModel', {'blocks': 40}],
                 'audio_dit': ['WanAudioModel', {'blocks': 30}],
                 'dual_tower_bridge': ['DualTowerConditionalBridge',
                                       {'audio_to_video_conditioners': 8, 'video_to_audio_conditioners': 8}],
                 'video_vae': ['AutoencoderKLWan', {'encoder.down_blocks': 11, 'decoder.up_blocks': 4}]},
  'sglang': {'text_encoder': ['layerwise', [24, 1]],
             'video_dit': ['layerwise', [40, 1]],
             'audio_dit': ['resident'],
             'dual_tower_bridge': ['resident'],
             'video_vae': ['layerwise', [11, 1], [4, 1]]},
  'source': 'test_server_args.py::test_layerwise_components_disable_matching_cpu_offloads'},
 {'id': 'manual_keeps_unset',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--num-gpus', '2', '--performance-mode', 'manual'],
  'gpu_gib': 80,
  'offload': {'num_gpus': 2, 'performance_mode': 'manual'},
  'sglang': {'text_encoder': ['resident'], 'transformer': ['resident'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_manual_mode_preserves_unset_performance_args'},
 {'id': 'auto_qwen_text_encoder_layerwise',
  'model': 'Qwen/Qwen-Image',
  'argv': [],
  'gpu_gib': 80,
  'offload': {},
  'sglang': {'text_encoder': ['layerwise', [28, 1]], 'transformer': ['cpu_offload'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_default_auto_replaces_text_encoder_cpu_offload_with_layerwise'},
 {'id': 'auto_wan_layerwise_no_fsdp',
  'model': 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers',
  'argv': ['--performance-mode', 'auto'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'auto'},
  'components': {'text_encoder': ['UMT5EncoderModel', {'encoder.block': 24}],
                 'transformer': ['WanTransformer3DModel', {'blocks': 30}],
                 'vae': ['AutoencoderKLWan', {'encoder.down_blocks': 11, 'decoder.up_blocks': 4}]},
  'sglang': {'text_encoder': ['layerwise', [24, 1]], 'transformer': ['layerwise', [30, 1]], 'vae': ['resident']},
  'source': 'test_server_args.py::test_auto_wan_layerwise_offload_is_enabled_without_fsdp'},
 {'id': 'memory_wan_layerwise',
  'model': 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers',
  'argv': ['--performance-mode', 'memory'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'memory'},
  'components': {'text_encoder': ['UMT5EncoderModel', {'encoder.block': 24}],
                 'transformer': ['WanTransformer3DModel', {'blocks': 30}],
                 'vae': ['AutoencoderKLWan', {'encoder.down_blocks': 11, 'decoder.up_blocks': 4}]},
  'sglang': {'text_encoder': ['layerwise', [24, 1]], 'transformer': ['layerwise', [30, 1]], 'vae': ['resident']},
  'source': 'test_server_args.py::test_memory_wan_layerwise_offload_is_enabled_without_fsdp, '
            'test_memory_mode_wan_uses_layerwise_offload'},
 {'id': 'auto_wan_explicit_fsdp',
  'model': 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers',
  'argv': ['--num-gpus', '2', '--performance-mode', 'auto', '--use-fsdp-inference', 'true'],
  'gpu_gib': 80,
  'offload': {'num_gpus': 2, 'performance_mode': 'auto', 'use_fsdp_inference': True},
  'components': {'text_encoder': ['UMT5EncoderModel', {'encoder.block': 24}],
                 'transformer': ['WanTransformer3DModel', {'blocks': 30}],
                 'vae': ['AutoencoderKLWan', {'encoder.down_blocks': 11, 'decoder.up_blocks': 4}]},
  'sglang': {'text_encoder': ['cpu_offload'], 'transformer': ['fsdp'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_auto_wan_layerwise_offload_does_not_disable_explicit_fsdp'},
 {'id': 'auto_wan_two_gpus_layerwise',
  'model': 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers',
  'argv': ['--num-gpus', '2', '--performance-mode', 'auto'],
  'gpu_gib': 80,
  'offload': {'num_gpus': 2, 'performance_mode': 'auto'},
  'components': {'text_encoder': ['UMT5EncoderModel', {'encoder.block': 24}],
                 'transformer': ['WanTransformer3DModel', {'blocks': 30}],
                 'vae': ['AutoencoderKLWan', {'encoder.down_blocks': 11, 'decoder.up_blocks': 4}]},
  'sglang': {'text_encoder': ['layerwise', [24, 1]], 'transformer': ['layerwise', [30, 1]], 'vae': ['resident']},
  'source': 'test_server_args.py::test_auto_multi_gpu_wan_uses_layerwise_offload_without_cfg'},
 {'id': 'mova_dit_layerwise_two_gpus',
  'model': 'OpenMOSS-Team/MOVA-360p',
  'argv': ['--num-gpus', '2', '--dit-layerwise-offload', 'true'],
  'gpu_gib': 80,
  'offload': {'num_gpus': 2, 'dit_layerwise_offload': True},
  'components': {'text_encoder': ['UMT5EncoderModel', {'encoder.block': 24}],
                 'video_dit': ['WanModel', {'blocks': 40}],
                 'audio_dit': ['WanAudioModel', {'blocks': 30}],
                 'dual_tower_bridge': ['DualTowerConditionalBridge',
                                       {'audio_to_video_conditioners': 8, 'video_to_audio_conditioners': 8}],
                 'video_vae': ['AutoencoderKLWan', {'encoder.down_blocks': 11, 'decoder.up_blocks': 4}]},
  'sglang': {'text_encoder': ['cpu_offload'],
             'video_dit': ['layerwise', [40, 1]],
             'audio_dit': ['layerwise', [30, 1]],
             'dual_tower_bridge': ['resident'],
             'video_vae': ['resident']},
  'source': 'test_server_args.py::test_explicit_multi_gpu_dit_layerwise_only_selects_default_component'},
 {'id': 'auto_ltx_two_gpus_resident_dit',
  'model': 'Lightricks/LTX-2',
  'argv': ['--num-gpus', '2'],
  'gpu_gib': 80,
  'available_gib': 76,
  'offload': {'num_gpus': 2},
  'sglang': {'text_encoder': ['layerwise', [48, 1]],
             'connectors': ['resident'],
             'transformer': ['resident'],
             'vae': ['resident'],
             'audio_vae': ['resident'],
             'vocoder': ['resident']},
  'source': 'test_server_args.py::test_auto_multi_gpu_ltx_replaces_component_cpu_offload_with_resident_dit (LTX-2, '
            'not the LTX-2.3 two-stage pipeline)'},
 {'id': 'auto_qwen_two_gpus',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--num-gpus', '2', '--performance-mode', 'auto'],
  'gpu_gib': 80,
  'offload': {'num_gpus': 2, 'performance_mode': 'auto'},
  'sglang': {'text_encoder': ['layerwise', [28, 1]], 'transformer': ['cpu_offload'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_auto_multi_gpu_qwen_replaces_text_encoder_offload_with_cfg'},
 {'id': 'auto_zimage_base_fsdp',
  'model': 'Tongyi-MAI/Z-Image',
  'argv': ['--num-gpus', '2', '--performance-mode', 'auto'],
  'gpu_gib': 80,
  'offload': {'num_gpus': 2, 'performance_mode': 'auto'},
  'components': {'text_encoder': ['Qwen3Model', {'layers': 36}],
                 'transformer': ['ZImageTransformer2DModel', {'layers': 30}],
                 'vae': ['AutoencoderKL', {'encoder.down_blocks': 4, 'decoder.up_blocks': 4}]},
  'sglang': {'text_encoder': ['cpu_offload'], 'transformer': ['fsdp'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_auto_multi_gpu_zimage_base_prefers_fsdp'},
 {'id': 'auto_zimage_turbo_no_fsdp',
  'model': 'Tongyi-MAI/Z-Image-Turbo',
  'argv': ['--num-gpus', '2', '--performance-mode', 'auto'],
  'gpu_gib': 80,
  'offload': {'num_gpus': 2, 'performance_mode': 'auto'},
  'sglang': {'text_encoder': ['layerwise', [36, 1]], 'transformer': ['cpu_offload'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_auto_multi_gpu_zimage_turbo_skips_fsdp'},
 {'id': 'auto_qwen_explicit_fsdp_false',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--num-gpus', '2', '--performance-mode', 'auto', '--use-fsdp-inference', 'false'],
  'gpu_gib': 80,
  'offload': {'num_gpus': 2, 'performance_mode': 'auto', 'use_fsdp_inference': False},
  'sglang': {'text_encoder': ['layerwise', [28, 1]], 'transformer': ['cpu_offload'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_auto_multi_gpu_qwen_preserves_explicit_fsdp_false'},
 {'id': 'auto_qwen_low_memory',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--num-gpus', '2', '--performance-mode', 'auto'],
  'gpu_gib': 50,
  'offload': {'num_gpus': 2, 'performance_mode': 'auto'},
  'sglang': {'text_encoder': ['layerwise', [28, 1]], 'transformer': ['cpu_offload'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_auto_multi_gpu_qwen_skips_fsdp_when_available_memory_is_low'},
 {'id': 'auto_qwen_min_available',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--num-gpus', '2', '--performance-mode', 'auto'],
  'gpu_gib': 80,
  'available_gib': 50,
  'offload': {'num_gpus': 2, 'performance_mode': 'auto'},
  'sglang': {'text_encoder': ['layerwise', [28, 1]], 'transformer': ['cpu_offload'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_auto_multi_gpu_qwen_uses_selected_gpu_min_available_memory'},
 {'id': 'auto_qwen_headroom',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--num-gpus', '2', '--performance-mode', 'auto'],
  'gpu_gib': 80,
  'available_gib': 72,
  'offload': {'num_gpus': 2, 'performance_mode': 'auto'},
  'sglang': {'text_encoder': ['layerwise', [28, 1]], 'transformer': ['cpu_offload'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_auto_multi_gpu_qwen_replaces_text_encoder_offload_with_headroom'},
 {'id': 'speed_single_gpu',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--performance-mode', 'speed'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'speed'},
  'sglang': {'text_encoder': ['resident'], 'transformer': ['resident'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_speed_mode_single_gpu_disables_offload'},
 {'id': 'speed_explicit_offload',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--performance-mode', 'speed', '--dit-cpu-offload', 'true'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'speed', 'dit_cpu_offload': True},
  'sglang': {'text_encoder': ['resident'], 'transformer': ['cpu_offload'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_speed_mode_preserves_explicit_offload'},
 {'id': 'memory_explicit_fsdp',
  'model': 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers',
  'argv': ['--num-gpus', '2', '--performance-mode', 'memory', '--use-fsdp-inference', 'true'],
  'gpu_gib': 80,
  'offload': {'num_gpus': 2, 'performance_mode': 'memory', 'use_fsdp_inference': True},
  'components': {'text_encoder': ['UMT5EncoderModel', {'encoder.block': 24}],
                 'transformer': ['WanTransformer3DModel', {'blocks': 30}],
                 'vae': ['AutoencoderKLWan', {'encoder.down_blocks': 11, 'decoder.up_blocks': 4}]},
  'sglang': {'text_encoder': ['resident'], 'transformer': ['fsdp'], 'vae': ['resident']},
  'source': 'test_server_args.py::test_memory_mode_preserves_explicit_fsdp'},
 {'id': 'invalid_mode',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--performance-mode', 'turbo'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'turbo'},
  'sglang': {'error': 'SystemExit'},
  'source': 'test_server_args.py::test_invalid_performance_mode_raises'},
 {'id': 'wan_dit_offload_select_transformer',
  'model': 'Wan-AI/Wan2.2-T2V-A14B-Diffusers',
  'argv': ['--performance-mode', 'manual', '--dit-cpu-offload', '--layerwise-offload-components', 'transformer'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual', 'dit_cpu_offload': True, 'layerwise_offload_components': 'transformer'},
  'sglang': {'text_encoder': ['resident'],
             'transformer': ['layerwise', [40, 1]],
             'transformer_2': ['resident'],
             'vae': ['resident']},
  'source': 'issue 14, point 2: flag-wide'},
 {'id': 'wan_dit_offload_select_transformer_auto',
  'model': 'Wan-AI/Wan2.2-T2V-A14B-Diffusers',
  'argv': ['--dit-cpu-offload', '--layerwise-offload-components', 'transformer'],
  'gpu_gib': 80,
  'offload': {'dit_cpu_offload': True, 'layerwise_offload_components': 'transformer'},
  'sglang': {'text_encoder': ['cpu_offload'],
             'transformer': ['layerwise', [40, 1]],
             'transformer_2': ['resident'],
             'vae': ['resident']},
  'source': 'issue 14, point 2, auto mode'},
 {'id': 'wan_fsdp_and_selection',
  'model': 'Wan-AI/Wan2.2-T2V-A14B-Diffusers',
  'argv': ['--num-gpus', '2', '--use-fsdp-inference', '--layerwise-offload-components', 'transformer_2',
           '--text-encoder-cpu-offload'],
  'gpu_gib': 80,
  'offload': {'num_gpus': 2,
              'use_fsdp_inference': True,
              'layerwise_offload_components': 'transformer_2',
              'text_encoder_cpu_offload': True},
  'sglang': {'text_encoder': ['cpu_offload'],
             'transformer': ['resident'],
             'transformer_2': ['layerwise', [40, 1]],
             'vae': ['resident']},
  'source': 'configs/wan2.2-t2v-a14b-fsdp.yaml before the fix'},
 {'id': 'wan_fsdp_config',
  'model': 'Wan-AI/Wan2.2-T2V-A14B-Diffusers',
  'argv': ['--num-gpus', '2', '--use-fsdp-inference', '--dit-cpu-offload', 'false', '--text-encoder-cpu-offload'],
  'gpu_gib': 80,
  'offload': {'num_gpus': 2, 'use_fsdp_inference': True, 'dit_cpu_offload': False, 'text_encoder_cpu_offload': True},
  'sglang': {'text_encoder': ['cpu_offload'],
             'transformer': ['fsdp'],
             'transformer_2': ['fsdp'],
             'vae': ['resident']},
  'source': 'configs/wan2.2-t2v-a14b-fsdp.yaml'},
 {'id': 'wan_auto_h100',
  'model': 'Wan-AI/Wan2.2-T2V-A14B-Diffusers',
  'argv': [],
  'gpu_gib': 80,
  'offload': {},
  'sglang': {'text_encoder': ['layerwise', [24, 1]],
             'transformer': ['layerwise', [40, 1]],
             'transformer_2': ['layerwise', [40, 1]],
             'vae': ['resident']},
  'source': "issue 14, point 1: Wan's DiTs layerwise without FSDP"},
 {'id': 'wan_auto_h200',
  'model': 'Wan-AI/Wan2.2-T2V-A14B-Diffusers',
  'argv': [],
  'gpu_gib': 141,
  'offload': {},
  'sglang': {'text_encoder': ['layerwise', [24, 1]],
             'transformer': ['cpu_offload'],
             'transformer_2': ['cpu_offload'],
             'vae': ['resident']},
  'source': 'issue 14, point 1: layerwise skipped on high-memory GPUs'},
 {'id': 'flux_quarter_prefetch',
  'model': 'black-forest-labs/FLUX.1-dev',
  'argv': ['--layerwise-offload-components', 'transformer', 'text_encoder', '--dit-offload-prefetch-size', '0.25',
           '--dit-cpu-offload', '--text-encoder-cpu-offload', '--vae-cpu-offload'],
  'gpu_gib': 80,
  'offload': {'layerwise_offload_components': ['transformer', 'text_encoder'],
              'dit_offload_prefetch_size': 0.25,
              'dit_cpu_offload': True,
              'text_encoder_cpu_offload': True,
              'vae_cpu_offload': True},
  'sglang': {'text_encoder': ['layerwise', [12, 4]],
             'text_encoder_2': ['layerwise', [24, 7]],
             'transformer': ['layerwise', [19, 5], [38, 10]],
             'vae': ['cpu_offload']},
  'source': 'configs/flux.1-dev-sglang.yaml; issue 14, point 4'},
 {'id': 'flux_auto',
  'model': 'black-forest-labs/FLUX.1-dev',
  'argv': [],
  'gpu_gib': 80,
  'offload': {},
  'sglang': {'text_encoder': ['layerwise', [12, 1]],
             'text_encoder_2': ['layerwise', [24, 1]],
             'transformer': ['cpu_offload'],
             'vae': ['resident']},
  'source': 'auto on an image model: text encoders CPU offload replaced by layerwise'},
 {'id': 'zimage_legacy_layerwise',
  'model': 'Tongyi-MAI/Z-Image-Turbo',
  'argv': ['--dit-layerwise-offload', 'true', '--text-encoder-cpu-offload'],
  'gpu_gib': 80,
  'offload': {'dit_layerwise_offload': True, 'text_encoder_cpu_offload': True},
  'sglang': {'text_encoder': ['cpu_offload'], 'transformer': ['layerwise', [30, 1]], 'vae': ['resident']},
  'source': 'configs/z-image-turbo-layerwise.yaml; issue 14, point 5'},
 {'id': 'zimage_all_manual',
  'model': 'Tongyi-MAI/Z-Image-Turbo',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'all', '--dit-offload-prefetch-size',
           '0.5'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual', 'layerwise_offload_components': 'all', 'dit_offload_prefetch_size': 0.5},
  'sglang': {'text_encoder': ['layerwise', [36, 19]],
             'transformer': ['layerwise', [30, 15]],
             'vae': ['layerwise', [4, 3], [4, 3]]},
  'source': "issue 14, points 3 and 5: VAE block lists, Z-Image's layers only"},
 {'id': 'qwen_text_encoder_language_model',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'text_encoder',
           '--dit-offload-prefetch-size', '3'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual',
              'layerwise_offload_components': 'text_encoder',
              'dit_offload_prefetch_size': 3},
  'sglang': {'text_encoder': ['layerwise', [28, 3]], 'transformer': ['resident'], 'vae': ['resident']},
  'source': 'issue 14, point 5: the language model only'},
 {'id': 'ltx_default_text_vae',
  'model': 'Lightricks/LTX-2',
  'argv': ['--layerwise-offload-components', 'default', 'text_encoder', 'vae', '--dit-offload-prefetch-size', '2'],
  'gpu_gib': 80,
  'offload': {'layerwise_offload_components': ['default', 'text_encoder', 'vae'], 'dit_offload_prefetch_size': 2},
  'sglang': {'text_encoder': ['layerwise', [48, 2]],
             'connectors': ['resident'],
             'transformer': ['layerwise', [48, 2]],
             'vae': ['layerwise', [4, 2], [3, 2]],
             'audio_vae': ['layerwise', [3, 2], [3, 2]],
             'vocoder': ['layerwise', [5, 2], [15, 2]]},
  'source': 'configs/ltx-2-all.yaml'},
 {'id': 'ltx_all_connectors_cannot_stream',
  'model': 'Lightricks/LTX-2',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'all'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual', 'layerwise_offload_components': 'all'},
  'sglang': {'text_encoder': ['layerwise', [48, 1]],
             'connectors': ['resident'],
             'transformer': ['layerwise', [48, 1]],
             'vae': ['layerwise', [4, 1], [3, 1]],
             'audio_vae': ['layerwise', [3, 1], [3, 1]],
             'vocoder': ['layerwise', [5, 1], [15, 1]]},
  'source': 'issue 14, point 3: a module that cannot stream'},
 {'id': 'ltx_connectors_named',
  'model': 'Lightricks/LTX-2',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'connectors', 'vocoder'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual', 'layerwise_offload_components': ['connectors', 'vocoder']},
  'sglang': {'text_encoder': ['resident'],
             'connectors': ['resident'],
             'transformer': ['resident'],
             'vae': ['resident'],
             'audio_vae': ['resident'],
             'vocoder': ['layerwise', [5, 1], [15, 1]]},
  'source': 'issue 14, point 3: named, cannot stream'},
 {'id': 'sd3_text_encoders_alias',
  'model': 'stabilityai/stable-diffusion-3.5-large',
  'argv': ['--layerwise-offload-modules', 'text_encoder'],
  'gpu_gib': 80,
  'offload': {'layerwise_offload_modules': 'text_encoder'},
  'sglang': {'text_encoder': ['layerwise', [12, 1]],
             'text_encoder_2': ['layerwise', [32, 1]],
             'text_encoder_3': ['layerwise', [24, 1]],
             'transformer': ['cpu_offload'],
             'vae': ['resident']},
  'source': 'configs/sd3.5-large-text-encoders.yaml; issue 14, point 8'},
 {'id': 'sd3_default_manual_half',
  'model': 'stabilityai/stable-diffusion-3.5-large',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'default', '--dit-offload-prefetch-size',
           '0.5'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual',
              'layerwise_offload_components': 'default',
              'dit_offload_prefetch_size': 0.5},
  'sglang': {'text_encoder': ['resident'],
             'text_encoder_2': ['resident'],
             'text_encoder_3': ['resident'],
             'transformer': ['layerwise', [38, 19]],
             'vae': ['resident']},
  'source': 'half to even, per list'},
 {'id': 'negative_prefetch_selected',
  'model': 'Tongyi-MAI/Z-Image-Turbo',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'transformer',
           '--dit-offload-prefetch-size', '-1'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual',
              'layerwise_offload_components': 'transformer',
              'dit_offload_prefetch_size': -1},
  'sglang': {'error': 'ValueError'},
  'source': 'issue 14, point 7'},
 {'id': 'negative_prefetch_unselected',
  'model': 'Tongyi-MAI/Z-Image-Turbo',
  'argv': ['--performance-mode', 'manual', '--dit-cpu-offload', '--dit-offload-prefetch-size', '-1'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual', 'dit_cpu_offload': True, 'dit_offload_prefetch_size': -1},
  'sglang': {'text_encoder': ['resident'], 'transformer': ['cpu_offload'], 'vae': ['resident']},
  'source': 'issue 14, point 7'},
 {'id': 'mova_default_excludes_bridge',
  'model': 'OpenMOSS-Team/MOVA-360p',
  'argv': ['--performance-mode', 'manual', '--dit-layerwise-offload', 'true', '--dit-cpu-offload'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual', 'dit_layerwise_offload': True, 'dit_cpu_offload': True},
  'components': {'text_encoder': ['UMT5EncoderModel', {'encoder.block': 24}],
                 'video_dit': ['WanModel', {'blocks': 40}],
                 'audio_dit': ['WanAudioModel', {'blocks': 30}],
                 'dual_tower_bridge': ['DualTowerConditionalBridge',
                                       {'audio_to_video_conditioners': 8, 'video_to_audio_conditioners': 8}],
                 'video_vae': ['AutoencoderKLWan', {'encoder.down_blocks': 11, 'decoder.up_blocks': 4}]},
  'sglang': {'text_encoder': ['resident'],
             'video_dit': ['layerwise', [40, 1]],
             'audio_dit': ['layerwise', [30, 1]],
             'dual_tower_bridge': ['resident'],
             'video_vae': ['resident']},
  'source': 'issue 14, points 2 and 6: default by class, the bridge out, flag-wide'},
 {'id': 'mova_bridge_named',
  'model': 'OpenMOSS-Team/MOVA-360p',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'dual_tower_bridge',
           '--dit-cpu-offload'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual',
              'layerwise_offload_components': 'dual_tower_bridge',
              'dit_cpu_offload': True},
  'components': {'text_encoder': ['UMT5EncoderModel', {'encoder.block': 24}],
                 'video_dit': ['WanModel', {'blocks': 40}],
                 'audio_dit': ['WanAudioModel', {'blocks': 30}],
                 'dual_tower_bridge': ['DualTowerConditionalBridge',
                                       {'audio_to_video_conditioners': 8, 'video_to_audio_conditioners': 8}],
                 'video_vae': ['AutoencoderKLWan', {'encoder.down_blocks': 11, 'decoder.up_blocks': 4}]},
  'sglang': {'text_encoder': ['resident'],
             'video_dit': ['resident'],
             'audio_dit': ['resident'],
             'dual_tower_bridge': ['layerwise', [8, 1], [8, 1]],
             'video_vae': ['resident']},
  'source': 'issue 14, point 2: dual_tower_bridge maps to dit_cpu_offload'},
 {'id': 'zimage_memory_mode',
  'model': 'Tongyi-MAI/Z-Image-Turbo',
  'argv': ['--performance-mode', 'memory'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'memory'},
  'sglang': {'text_encoder': ['layerwise', [36, 1]], 'transformer': ['cpu_offload'], 'vae': ['resident']},
  'source': 'memory preset on an image model'},
 {'id': 'ltx_auto_high_available',
  'model': 'Lightricks/LTX-2',
  'argv': [],
  'gpu_gib': 80,
  'available_gib': 80,
  'offload': {},
  'sglang': {'text_encoder': ['layerwise', [48, 1]],
             'connectors': ['resident'],
             'transformer': ['resident'],
             'vae': ['resident'],
             'audio_vae': ['resident'],
             'vocoder': ['resident']},
  'source': 'auto: component offload turned off with 70 GiB free'},
 {'id': 'ltx_auto_low_available',
  'model': 'Lightricks/LTX-2',
  'argv': [],
  'gpu_gib': 80,
  'available_gib': 40,
  'offload': {},
  'sglang': {'text_encoder': ['layerwise', [48, 1]],
             'connectors': ['resident'],
             'transformer': ['cpu_offload'],
             'vae': ['resident'],
             'audio_vae': ['resident'],
             'vocoder': ['resident']},
  'source': 'auto: below 70 GiB free the DiT stays offloaded'},
 {'id': 'flux_low_memory_gpu',
  'model': 'black-forest-labs/FLUX.1-dev',
  'argv': [],
  'gpu_gib': 24,
  'offload': {},
  'sglang': {'text_encoder': ['layerwise', [12, 1]],
             'text_encoder_2': ['layerwise', [24, 1]],
             'transformer': ['cpu_offload'],
             'vae': ['resident']},
  'source': 'auto on a GPU under 30 GiB'},
 {'id': 'prefetch_count_floored',
  'model': 'black-forest-labs/FLUX.1-dev',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'transformer',
           '--dit-offload-prefetch-size', '2.7'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual',
              'layerwise_offload_components': 'transformer',
              'dit_offload_prefetch_size': 2.7},
  'sglang': {'text_encoder': ['resident'],
             'text_encoder_2': ['resident'],
             'transformer': ['layerwise', [19, 2], [38, 2]],
             'vae': ['resident']},
  'source': 'p >= 1 floored'},
 {'id': 'unknown_token_warns',
  'model': 'Qwen/Qwen-Image',
  'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'transformer', 'transfomer_3'],
  'gpu_gib': 80,
  'offload': {'performance_mode': 'manual', 'layerwise_offload_components': ['transformer', 'transfomer_3']},
  'sglang': {'text_encoder': ['resident'], 'transformer': ['layerwise', [60, 1]], 'vae': ['resident']},
  'source': 'a token that matches nothing'},
 {'id': 'auto_ltx23_snapshot_keeps_dit_offload',
  'model': 'Lightricks/LTX-2.3',
  'argv': ['--pipeline-class-name', 'LTX2TwoStageHQPipeline', '--ltx2-two-stage-device-mode', 'snapshot',
           '--performance-mode', 'auto'],
  'gpu_gib': 80,
  'available_gib': 76,
  'offload': {'pipeline_class_name': 'LTX2TwoStageHQPipeline', 'ltx2_two_stage_device_mode': 'snapshot',
              'performance_mode': 'auto'},
  'components': LTX2_COMPONENTS,
  'sglang': {'text_encoder': ['layerwise', [48, 1]],
             'connectors': ['resident'],
             'transformer': ['cpu_offload'],
             'vae': ['resident'],
             'audio_vae': ['resident'],
             'vocoder': ['resident']},
  'source': 'test_server_args.py::test_auto_ltx_snapshot_keeps_dit_offload_and_replaces_encoder_cpu_offload '
            '(its flags, asserted there: dit_cpu_offload true, layerwise_offload_components [text_encoder, '
            'image_encoder], both encoder flags false; per component as ltx_auto_low_available, whose flags are '
            'the same)'},
 {'id': 'ltx23_resident_mode_turns_dit_offload_off',
  'model': 'Lightricks/LTX-2.3',
  'argv': ['--pipeline-class-name', 'LTX2TwoStageHQPipeline', '--ltx2-two-stage-device-mode', 'resident'],
  'gpu_gib': 80,
  'available_gib': 76,
  'offload': {'pipeline_class_name': 'LTX2TwoStageHQPipeline', 'ltx2_two_stage_device_mode': 'resident'},
  'components': LTX2_COMPONENTS,
  'sglang': ltx2_outcome('resident'),
  'source': 'LTX-2.3 two-stage, resident mode: auto turns the DiT offload off as for LTX-2'},
 {'id': 'ltx23_original_mode_turns_dit_offload_off',
  'model': 'Lightricks/LTX-2.3',
  'argv': ['--pipeline-class-name', 'LTX2TwoStagePipeline', '--ltx2-two-stage-device-mode', 'original'],
  'gpu_gib': 80,
  'available_gib': 76,
  'offload': {'pipeline_class_name': 'LTX2TwoStagePipeline', 'ltx2_two_stage_device_mode': 'original'},
  'components': LTX2_COMPONENTS,
  'sglang': ltx2_outcome('resident'),
  'source': 'LTX-2.3 two-stage, original mode'},
 {'id': 'ltx23_default_mode_snapshot_below_130',
  'model': 'Lightricks/LTX-2.3',
  'argv': ['--pipeline-class-name', 'LTX2TwoStageHQPipeline'],
  'gpu_gib': 80,
  'available_gib': 76,
  'offload': {'pipeline_class_name': 'LTX2TwoStageHQPipeline'},
  'components': LTX2_COMPONENTS,
  'sglang': ltx2_outcome('cpu_offload'),
  'source': 'LTX-2.3 two-stage, mode unset on an 80 GiB GPU: snapshot, the DiT offload kept'},
 {'id': 'ltx23_default_mode_resident_from_130',
  'model': 'Lightricks/LTX-2.3',
  'argv': ['--pipeline-class-name', 'LTX2TwoStagePipeline'],
  'gpu_gib': 140,
  'offload': {'pipeline_class_name': 'LTX2TwoStagePipeline'},
  'components': LTX2_COMPONENTS,
  'sglang': ltx2_outcome('resident'),
  'source': 'LTX-2.3 two-stage, mode unset on a 140 GiB GPU: resident'},
 {'id': 'ltx23_snapshot_low_available',
  'model': 'Lightricks/LTX-2.3',
  'argv': ['--pipeline-class-name', 'LTX2TwoStageHQPipeline', '--ltx2-two-stage-device-mode', 'snapshot'],
  'gpu_gib': 80,
  'available_gib': 40,
  'offload': {'pipeline_class_name': 'LTX2TwoStageHQPipeline', 'ltx2_two_stage_device_mode': 'snapshot'},
  'components': LTX2_COMPONENTS,
  'sglang': ltx2_outcome('cpu_offload'),
  'source': 'LTX-2.3 two-stage snapshot below 70 GiB free'},
 {'id': 'ltx2_two_stage_name_on_ltx2_model',
  'model': 'Lightricks/LTX-2',
  'argv': ['--pipeline-class-name', 'LTX2TwoStageHQPipeline', '--ltx2-two-stage-device-mode', 'snapshot'],
  'gpu_gib': 80,
  'available_gib': 76,
  'offload': {'pipeline_class_name': 'LTX2TwoStageHQPipeline', 'ltx2_two_stage_device_mode': 'snapshot'},
  'sglang': ltx2_outcome('resident'),
  'source': 'the two-stage class on LTX-2 (not LTX-2.3): the mode is left unused'},
 {'id': 'ltx23_one_stage',
  'model': 'Lightricks/LTX-2.3',
  'argv': [],
  'gpu_gib': 80,
  'available_gib': 76,
  'offload': {},
  'components': LTX2_COMPONENTS,
  'sglang': ltx2_outcome('resident'),
  'source': 'LTX-2.3 without a two-stage --pipeline-class-name'},
 {'id': 'ltx23_local_folder_not_by_path',
  'model': '/models/LTX-2.3',
  'argv': ['--pipeline-class-name', 'LTX2TwoStageHQPipeline', '--ltx2-two-stage-device-mode', 'snapshot'],
  'gpu_gib': 80,
  'available_gib': 76,
  'offload': {'pipeline_class_name': 'LTX2TwoStageHQPipeline', 'ltx2_two_stage_device_mode': 'snapshot'},
  'components': LTX2_COMPONENTS,
  'sglang': ltx2_outcome('resident'),
  'source': "a local folder LTX-2.3: SGLang's registry resolves it to LTX2PipelineConfig, but "
            "_is_ltx23_model_path does not match it"},
 {'id': 'ltx23_cache_folder',
  'model': '/root/.cache/huggingface/hub/models--Lightricks--LTX-2.3/snapshots/0',
  'argv': ['--pipeline-class-name', 'LTX2TwoStageHQPipeline'],
  'gpu_gib': 80,
  'available_gib': 76,
  'offload': {'pipeline_class_name': 'LTX2TwoStageHQPipeline'},
  'components': LTX2_COMPONENTS,
  'sglang': ltx2_outcome('cpu_offload'),
  'source': 'the Hugging Face cache folder of Lightricks/LTX-2.3 matches by path'}]


def _inventory(components):
    comps = []
    for name, (cls, lists) in components.items():
        lls = tuple(LayerList(path, n, (MiB,) * n) for path, n in lists.items())
        comps.append(ComponentInfo(name=name, class_name=cls, weight_bytes=(sum(lists.values()) + 1) * MiB,
                                   layer_lists=lls))
    return Inventory("sglang-case", tuple(comps))


def _outcome(plan):
    out = {}
    for name, cp in plan.components.items():
        s = str(cp.strategy)
        out[name] = [s] + ([[ll.count, ll.prefetch] for ll in cp.layers] if s == "layerwise" else [])
    return out


def _plan(spec, case):
    inv = _inventory(case["components"]) if "components" in case else None
    doc = Document(file="<case>", data=spec)
    return make_plan(doc, inventory=inv)


def _memory(case):
    out = {"gpu_memory": f"{case['gpu_gib']}GiB"}
    if "available_gib" in case:
        out["gpu_memory_available"] = f"{case['available_gib']}GiB"
    return out


def _pipeline(case):
    facts = sglang_model(model_path=case["model"])
    return {"model": facts.catalog} if facts is not None and facts.catalog else {"path": case["model"]}


def through_from_sglang(case):
    argv = ["--model-path", case["model"], *case["argv"], "--gpu-memory", f"{case['gpu_gib']}GiB"]
    if "available_gib" in case:
        argv += ["--gpu-memory-available", f"{case['available_gib']}GiB"]
    spec = translate(parse_args(argv)).spec
    return _plan(spec, case)


def through_spec(case):
    spec = {"version": 1, "pipeline": _pipeline(case), "offload": {**case["offload"], **_memory(case)}}
    return _plan(spec, case)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
@pytest.mark.parametrize("route", [through_from_sglang, through_spec], ids=["from-sglang", "spec"])
def test_sglang_outcome(case, route):
    expected = case["sglang"]
    if "error" in expected:
        with pytest.raises((SpecError, SGLangArgsError)):
            route(case)
        return
    assert _outcome(route(case)) == expected


def test_at_least_forty_cases_and_every_unit_test_file_covered():
    assert len(CASES) >= 40
    assert len({c["id"] for c in CASES}) == len(CASES)
    assert sum("test_server_args.py::" in c["source"] for c in CASES) >= 25


# --- What SGLang warns about (configure_layerwise_offload_modules) -----------------------------------

def test_a_named_component_that_cannot_stream_is_a_warning_and_stays_resident():
    case = next(c for c in CASES if c["id"] == "ltx_connectors_named")
    plan = through_spec(case)
    assert [w.code for w in plan.warnings if w.code == "layerwise-cannot-stream"] == ["layerwise-cannot-stream"]
    assert "connectors" in plan.warnings[0].message
    quiet = through_spec(next(c for c in CASES if c["id"] == "ltx_all_connectors_cannot_stream"))
    assert not [w for w in quiet.warnings if w.code == "layerwise-cannot-stream"]   # 'all' skips quietly


def test_a_token_that_matches_nothing_is_a_warning():
    plan = through_spec(next(c for c in CASES if c["id"] == "unknown_token_warns"))
    assert [w.code for w in plan.warnings] == ["selection-matches-nothing"]


def test_auto_without_gpu_memory_says_what_it_needs():
    spec = {"version": 1, "pipeline": {"model": "wan2.2-t2v-a14b"}, "offload": {}}
    plan = make_plan(spec)
    needs = [w for w in plan.warnings if w.code == "performance-mode-needs-gpu-memory"]
    assert needs and "offload.gpu_memory" in needs[0].message and "130 GiB" in needs[0].message
    # taken as below the threshold: the DiTs stream, as on most GPUs
    assert str(plan.components["transformer"].strategy) == "layerwise"
    # manual mode reads nothing
    assert not make_plan({"version": 1, "pipeline": {"model": "wan2.2-t2v-a14b"},
                          "offload": {"performance_mode": "manual"}}).warnings


def test_every_change_is_a_decision_naming_the_sglang_rule():
    plan = through_spec(next(c for c in CASES if c["id"] == "wan_dit_offload_select_transformer_auto"))
    rules = {(d.component, d.rule) for d in plan.decisions}
    assert ("transformer", "layerwise-overrides-cpu-offload") in rules
    assert ("transformer_2", "layerwise-disables-family-cpu-offload") in rules
    assert ("text_encoder", "performance-mode") in rules
    reason = next(d.reason for d in plan.decisions if d.rule == "layerwise-disables-family-cpu-offload")
    assert "dit_cpu_offload" in reason and "whole family" in reason


# --- LTX-2.3 two-stage residency (ServerArgs._adjust_ltx2_two_stage_device_mode, the auto-tuner's exception)

def _case(case_id):
    return next(c for c in CASES if c["id"] == case_id)


def test_ltx23_snapshot_keeping_the_dit_offload_is_a_decision():
    for route in (through_from_sglang, through_spec):
        plan = route(_case("auto_ltx23_snapshot_keeps_dit_offload"))
        kept = [d for d in plan.decisions if d.rule == "ltx2-snapshot-keeps-dit-offload"]
        assert [(d.component, d.from_, d.to) for d in kept] == [("transformer", "cpu_offload", "cpu_offload")]
        assert "snapshot" in kept[0].reason and "LTX2TwoStageHQPipeline" in kept[0].reason
        assert not plan.warnings
    # resident mode: the DiT offload goes, as for LTX-2, and no such decision
    plan = through_spec(_case("ltx23_resident_mode_turns_dit_offload_off"))
    assert not [d for d in plan.decisions if d.rule == "ltx2-snapshot-keeps-dit-offload"]


def test_ltx23_default_mode_without_gpu_memory_says_what_it_needs():
    case = _case("ltx23_default_mode_snapshot_below_130")
    spec = {"version": 1, "pipeline": {"path": "Lightricks/LTX-2.3"},
            "offload": {"pipeline_class_name": "LTX2TwoStageHQPipeline", "gpu_memory_available": "76GiB"}}
    plan = _plan(spec, case)
    needs = [w for w in plan.warnings if w.code == "ltx2-two-stage-mode-needs-gpu-memory"]
    assert needs and "offload.gpu_memory" in needs[0].message and "130 GiB" in needs[0].message
    assert "taken as snapshot" in needs[0].message
    assert str(plan.components["transformer"].strategy) == "cpu_offload"
    # with the mode given nothing is needed
    spec["offload"]["ltx2_two_stage_device_mode"] = "resident"
    plan = _plan(spec, case)
    assert not plan.warnings and str(plan.components["transformer"].strategy) == "resident"


def test_ltx2_mode_outside_the_ltx23_two_stage_pipeline_is_a_warning():
    for case_id in ("ltx2_two_stage_name_on_ltx2_model", "ltx23_local_folder_not_by_path"):
        plan = through_spec(_case(case_id))
        assert [w.code for w in plan.warnings] == ["ltx2-two-stage-mode-unused"]
        assert plan.warnings[0].where == "offload.ltx2_two_stage_device_mode"


def test_ltx2_mode_bad_values_are_located_errors(tmp_path, capsys):
    spec = tmp_path / "ltx.yaml"
    spec.write_text("version: 1\npipeline:\n  model: ltx-2\noffload:\n  pipeline_class_name: LTX2TwoStagePipeline\n"
                    "  ltx2_two_stage_device_mode: Snapshot\n")
    assert cli_main(["validate", str(spec)]) == 1
    err = capsys.readouterr()
    assert f"{spec}:6:31: error:" in err.out + err.err
    spec.write_text("version: 1\npipeline:\n  model: ltx-2\noffload:\n  pipeline_class_name: ''\n")
    assert cli_main(["validate", str(spec)]) == 1
    assert f"{spec}:5:24: error:" in "".join(capsys.readouterr())
    assert cli_main(["from-sglang", "--model-path", "Lightricks/LTX-2.3", "--ltx2-two-stage-device-mode",
                     "turbo"]) == 1
    assert "<command line>:1:" in "".join(capsys.readouterr())
    cfg = tmp_path / "sglang.yaml"
    cfg.write_text("model_path: Lightricks/LTX-2.3\npipeline_class_name: [LTX2TwoStagePipeline]\n")
    assert cli_main(["from-sglang", "--config", str(cfg)]) == 1
    assert f"{cfg}:2:1: error:" in "".join(capsys.readouterr())


def test_from_sglang_writes_the_ltx23_two_stage_flags(capsys):
    assert cli_main(["from-sglang", "--model-path", "Lightricks/LTX-2.3", "--pipeline-class-name",
                     "LTX2TwoStageHQPipeline", "--ltx2-two-stage-device-mode", "snapshot"]) == 0
    out = capsys.readouterr().out
    assert "path: Lightricks/LTX-2.3" in out and "pipeline_class_name: LTX2TwoStageHQPipeline" in out
    assert "ltx2_two_stage_device_mode: snapshot" in out and "Not residency settings" not in out


# --- The data SGLang's auto-tuning reads (test_server_args.py::test_pipeline_configs_declare_auto_tune_hints)

def test_deployment_hints_as_sglang_declares_them():
    qwen, wan, mova = (sglang_model(model_path=m) for m in ("Qwen/Qwen-Image", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                                                            "OpenMOSS-Team/MOVA-360p"))
    zimage, ltx = sglang_model(model_path="Tongyi-MAI/Z-Image"), sglang_model(model_path="Lightricks/LTX-2")
    assert qwen.deployment["fsdp_auto_min_available_memory_gb"] is None
    assert not qwen.deployment["auto_dit_layerwise_offload"]
    assert wan.deployment["fsdp_auto_min_available_memory_gb"] is None and wan.deployment["auto_dit_layerwise_offload"]
    assert mova.deployment["fsdp_auto_min_available_memory_gb"] is None and mova.deployment["auto_dit_layerwise_offload"]
    assert zimage.deployment["fsdp_auto_min_available_memory_gb"] == 40 and zimage.deployment["fsdp_auto_requires_cfg"]
    assert not zimage.deployment["auto_dit_layerwise_offload"]
    assert ltx.deployment["auto_disable_component_offload_min_available_memory_gb"] == 70
    assert ltx.deployment["auto_disable_component_offload_components"] == ["dit"]


# --- test/unit/test_layerwise_offload.py: which components are configured, which strategy they get.
# Its dummy classes are played by classes that declare the same: _NestedDummyModel (default-enabled,
# streams) by FluxTransformer2DModel, _NestedEncoderDummyModel (not default-enabled, streams) by
# T5EncoderModel and AutoencoderKL, _DummyModel (no mixin) by LTX2TextConnectors.

def _components_plan(components, offload):
    spec = {"version": 1, "pipeline": {"components": components}, "offload": {"performance_mode": "manual", **offload}}
    return {n: str(c.strategy) for n, c in make_plan(spec).components.items()}


def test_layerwise_configuration_uses_legacy_default_components():
    # configured == ["text_encoder"]: the component whose class is default-enabled (component_names=None is
    # SGLang's legacy default, what dit_layerwise_offload selects)
    s = _components_plan({"text_encoder": "FluxTransformer2DModel"}, {"dit_layerwise_offload": True})
    assert s == {"text_encoder": "layerwise"}


def test_layerwise_configuration_filters_by_component_name():
    s = _components_plan({"custom_encoder_name": "T5EncoderModel", "custom_transformer_name": "FluxTransformer2DModel",
                          "custom_vae_name": "FluxTransformer2DModel"},
                         {"layerwise_offload_components": ["custom_encoder_name"]})
    assert s == {"custom_encoder_name": "layerwise", "custom_transformer_name": "resident",
                 "custom_vae_name": "resident"}


def test_layerwise_configuration_default_marker_extends_legacy_defaults():
    s = _components_plan({"text_encoder": "T5EncoderModel", "text_encoder_2": "T5EncoderModel",
                          "transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL", "audio_vae": "AutoencoderKL",
                          "condition_image_encoder": "AutoencoderKL"},
                         {"layerwise_offload_components": ["default", "text_encoder", "vae"]})
    assert s == dict.fromkeys(("text_encoder", "text_encoder_2", "transformer", "vae", "audio_vae",
                               "condition_image_encoder"), "layerwise")


def test_layerwise_configuration_all_selects_every_capable_component():
    s = _components_plan({"custom_encoder_name": "T5EncoderModel", "custom_transformer_name": "FluxTransformer2DModel"},
                         {"layerwise_offload_components": "all"})
    assert s == {"custom_encoder_name": "layerwise", "custom_transformer_name": "layerwise"}


def test_layerwise_capability_selects_layerwise_strategy_for_any_component():
    s = _components_plan({"text_encoder": "T5EncoderModel"},
                         {"layerwise_offload_components": "text_encoder", "text_encoder_cpu_offload": True})
    assert s == {"text_encoder": "layerwise"}


def test_component_cpu_offload_strategy_remains_flag_driven():
    s = _components_plan({"text_encoder": "LTX2TextConnectors", "unknown_component": "LTX2TextConnectors"},
                         {"text_encoder_cpu_offload": True})
    assert s == {"text_encoder": "cpu_offload", "unknown_component": "resident"}


# --- from-sglang: values validated as SGLang validates them ------------------------------------------

@pytest.mark.parametrize("argv", [["--dit-cpu-offload", "yes"], ["--dit-cpu-offload", "on"], ["--dit-cpu-offload", "1"],
                                  ["--dit-offload-prefetch-size=1e999"], ["--dit-offload-prefetch-size", "nan"],
                                  ["--layerwise-offload-components", "transformer", "--dit-offload-prefetch-size", "-1"],
                                  ["--performance-mode", "turbo"],
                                  ["--ltx2-two-stage-device-mode", "Snapshot"],     # argparse choices: as written
                                  ["--ltx2-two-stage-device-mode", "auto"]])
def test_from_sglang_refuses_what_sglang_refuses(argv):
    with pytest.raises(SGLangArgsError):
        translate(parse_args(argv))


def test_from_sglang_list_flags_and_config_lists(tmp_path):
    spec = translate(parse_args(["--layerwise-offload-components", "transformer", "text_encoder",
                                 "--dit-cpu-offload", "TRUE"])).spec
    assert spec["offload"] == {"layerwise_offload_components": ["transformer", "text_encoder"], "dit_cpu_offload": True}
    cfg = tmp_path / "sglang.yaml"
    cfg.write_text("model_path: Qwen/Qwen-Image\nlayerwise_offload_components: [transformer, text_encoder]\n"
                   "performance_mode: memory\n")
    spec = translate(parse_args(["--config", str(cfg)])).spec
    assert spec["offload"]["layerwise_offload_components"] == ["transformer", "text_encoder"]
    assert spec["offload"]["performance_mode"] == "memory" and spec["pipeline"] == {"model": "qwen-image"}


def test_from_sglang_translates_dtype_mode_and_later_flags(capsys):
    assert cli_main(["from-sglang", "--model-path", "Qwen/Qwen-Image", "--dtype", "bf16", "--mode", "speed",
                     "--num-gpus", "2", "--dit-layerwise-residency-policy", "strided", "--component-residency",
                     "vae=resident"]) == 0
    out = capsys.readouterr().out
    assert "dtype: bfloat16" in out and "performance_mode: speed" in out and "num_gpus: 2" in out
    head = "\n".join(line for line in out.splitlines() if line.startswith("#"))
    assert "later SGLang" not in head and "residency-policy" not in head      # later SGLang, but translated
    assert "dit_layerwise_residency_policy: strided" in out
    assert "component-residency" not in head                 # later SGLang, but translated
    assert "component_residency:" in out and "vae: resident" in out
    assert "--dtype is not an SGLang server argument" in head


def test_every_config_with_offload_plans_as_its_sglang_flag_line():
    """Each config's comment gives its SGLang flag line; through from-sglang it plans as the config does
    (a components: section, the project's own language, is applied on top)."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    for cfg in sorted((root / "configs").glob("*.yaml")):
        text = cfg.read_text()
        data = yaml.safe_load(text)
        if "offload" not in data:
            continue
        line = " ".join(l.lstrip("# ").strip() for l in text.splitlines()
                        if l.startswith("# SGLang:") or (l.startswith("#  ") and "--" in l))
        assert line.startswith("SGLang:"), f"{cfg.name} names no SGLang flag line"
        argv = line[len("SGLang:"):].split()
        model = next(k for k, v in json.loads(json.dumps(HF_IDS)).items() if v == data["pipeline"]["model"])
        spec = translate(parse_args(["--model-path", model, *argv])).spec
        spec["pipeline"] = data["pipeline"]
        for key in ("components", "defaults", "device", "memory", "workload"):
            if key in data:
                spec[key] = data[key]
        flags_plan = make_plan(spec)
        config_plan = make_plan(cfg)
        assert {n: str(c.strategy) for n, c in flags_plan.components.items()} == \
            {n: str(c.strategy) for n, c in config_plan.components.items()}, cfg.name
        assert [[ll.count, ll.prefetch] for c in flags_plan.components.values() for ll in c.layers] == \
            [[ll.count, ll.prefetch] for c in config_plan.components.values() for ll in c.layers], cfg.name


HF_IDS = {"Tongyi-MAI/Z-Image-Turbo": "z-image-turbo", "black-forest-labs/FLUX.1-dev": "flux.1-dev",
          "Qwen/Qwen-Image": "qwen-image", "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "wan2.2-t2v-a14b",
          "stabilityai/stable-diffusion-3.5-large": "sd3.5-large", "Lightricks/LTX-2": "ltx-2"}
