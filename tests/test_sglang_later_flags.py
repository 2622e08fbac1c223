"""Later SGLang's layerwise tuning flags and #25517's meanings, in the offload: section and through from-sglang.

How the expected outcomes were obtained. The seed's SGLang commit (416fdbb) has none of these flags, so no
SGLang code at that commit could be run for them, and later SGLang could not be run here (nothing can be
installed or downloaded for it). The expected values are worked out by hand from SGLang's source at revisions
that carry the pull requests, read through the code index (the files, not the pull-request text):

- #31538 / #34534: ``layerwise_offload.py`` (``configure_layerwise_offload`` and ``compute_streamed_layers``,
  at a revision with ``--dit-layerwise-residency-policy`` but before #35688): each layer list of a module whose
  class is in the DiT group (``layerwise_offload_dit_group_enabled``, what 416fdbb calls default-enabled) gets
  its own manager; a resident value v <= 0 keeps none, v in (0, 1) keeps ``max(1, int(round(v * N)))``, v >= 1
  keeps ``min(N, int(v))``; ``leading`` keeps layers 0..r-1, ``strided`` streams ``round(i * N / (N - r))`` for
  i < N - r and keeps the rest; anything but leading or strided is refused (argparse ``choices``).
- #35688: ``server_args.py`` (``layerwise_tuning_for``, ``_parse_component_value_map`` and the help of
  ``--layerwise-prefetch-size`` / ``--layerwise-resident-layers`` / ``--layerwise-residency-policy``): one str
  argument of ``component=value`` entries split on commas (or a JSON object, or a mapping from a config file),
  an entry for the exact component name wins, a component with no entry keeps its group's value.
- #25517: ``layerwise_offload_components.py`` after it (``LAYERWISE_OFFLOAD_DIT_GROUP = "dit"``, ``default``
  expanding to the text_encoder, image_encoder and vae groups), the issue's statement that FSDP is turned
  off only when a DiT is selected, and SGLang's own ``test/unit/test_server_args.py`` at a revision after it
  (the cases whose ``source`` names one of its tests take that test's assertion; the test's pipeline config
  is played by a catalog model, and where the test ran the auto-tuning, the selection it asserts is written
  out under ``performance_mode: manual``, since later changes to the auto-tuning are not modelled).

Where the source leaves a choice to this project, the choice is in docs/guide.md (migration chapter): under
the seed's meaning (the default) a streamed component with no per-component entry keeps the seed's
dit_offload_prefetch_size, as 416fdbb applies it to every streamed list.

``sglang`` gives, per component, its strategy, then for a layerwise one ``[list length, prefetch K]`` per list
and, last, the resident layer indices over its lists in run order. Every case is planned twice: through
``from-sglang`` and through a spec's ``offload:`` section.
"""

from __future__ import annotations

import pytest

from planner import SpecError, make_plan
from planner.cli.main import main as cli_main
from planner.spec.document import Document, load_text
from planner.spec.families import sglang_model
from planner.spec.sglang_args import SGLangArgsError, parse_args, translate

QWEN_STRIDED_24 = [1, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 29, 31, 34, 36, 39, 41, 44, 46, 49, 51, 54, 56, 59]
FLUX_STRIDED_10 = [1, 3, 5, 7, 9, 10, 12, 14, 16, 18, 21, 25, 28, 32, 36, 40, 44, 48, 51, 55]

CASES = [
    {'id': 'dit_resident_leading',
     'model': 'Qwen/Qwen-Image',
     'argv': ['--performance-mode', 'manual', '--dit-layerwise-offload', '--dit-layerwise-resident-layers', '24'],
     'offload': {'performance_mode': 'manual', 'dit_layerwise_offload': True, 'dit_layerwise_resident_layers': 24},
     'sglang': {'text_encoder': ['resident'], 'transformer': ['layerwise', [60, 1], list(range(24))],
                'vae': ['resident']},
     'source': '#31538: the leading layers stay'},
    {'id': 'dit_resident_strided',
     'model': 'Qwen/Qwen-Image',
     'argv': ['--performance-mode', 'manual', '--dit-layerwise-offload', '--dit-layerwise-resident-layers', '24',
              '--dit-layerwise-residency-policy', 'strided'],
     'offload': {'performance_mode': 'manual', 'dit_layerwise_offload': True, 'dit_layerwise_resident_layers': 24,
                 'dit_layerwise_residency_policy': 'strided'},
     'sglang': {'text_encoder': ['resident'], 'transformer': ['layerwise', [60, 1], QWEN_STRIDED_24],
                'vae': ['resident']},
     'source': "#34534: n = 60, N = round(0.4 n) = 24, the PR's Qwen-Image run"},
    {'id': 'dit_resident_fraction',
     'model': 'Qwen/Qwen-Image',
     'argv': ['--performance-mode', 'manual', '--dit-layerwise-offload', '--dit-layerwise-resident-layers', '0.4'],
     'offload': {'performance_mode': 'manual', 'dit_layerwise_offload': True, 'dit_layerwise_resident_layers': 0.4},
     'sglang': {'text_encoder': ['resident'], 'transformer': ['layerwise', [60, 1], list(range(24))],
                'vae': ['resident']},
     'source': 'a value in (0, 1) is a fraction: max(1, round(0.4 * 60)) = 24'},
    {'id': 'dit_resident_tiny_fraction',
     'model': 'Tongyi-MAI/Z-Image-Turbo',
     'argv': ['--performance-mode', 'manual', '--dit-layerwise-offload', '--dit-layerwise-resident-layers', '0.01'],
     'offload': {'performance_mode': 'manual', 'dit_layerwise_offload': True, 'dit_layerwise_resident_layers': 0.01},
     'sglang': {'text_encoder': ['resident'], 'transformer': ['layerwise', [30, 1], [0]], 'vae': ['resident']},
     'source': 'a fraction keeps at least one layer: max(1, round(0.3)) = 1'},
    {'id': 'dit_resident_per_list_strided',
     'model': 'black-forest-labs/FLUX.1-dev',
     'argv': ['--performance-mode', 'manual', '--dit-layerwise-offload', '--dit-layerwise-resident-layers', '10',
              '--dit-layerwise-residency-policy', 'strided'],
     'offload': {'performance_mode': 'manual', 'dit_layerwise_offload': True, 'dit_layerwise_resident_layers': 10,
                 'dit_layerwise_residency_policy': 'strided'},
     'sglang': {'text_encoder': ['resident'], 'text_encoder_2': ['resident'],
                'transformer': ['layerwise', [19, 1], [38, 1], FLUX_STRIDED_10], 'vae': ['resident']},
     'source': "one manager per list: 10 of Flux's 19 double blocks and 10 of its 38 single blocks"},
    {'id': 'dit_resident_per_list_fraction',
     'model': 'black-forest-labs/FLUX.1-dev',
     'argv': ['--performance-mode', 'manual', '--dit-layerwise-offload', '--dit-layerwise-resident-layers', '0.25'],
     'offload': {'performance_mode': 'manual', 'dit_layerwise_offload': True, 'dit_layerwise_resident_layers': 0.25},
     'sglang': {'text_encoder': ['resident'], 'text_encoder_2': ['resident'],
                'transformer': ['layerwise', [19, 1], [38, 1], [0, 1, 2, 3, 4, *range(19, 29)]],
                'vae': ['resident']},
     'source': 'round(4.75) = 5 and round(9.5) = 10 (half to even), per list'},
    {'id': 'dit_resident_not_for_text_encoders',
     'model': 'black-forest-labs/FLUX.1-dev',
     'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'transformer', 'text_encoder',
              '--dit-layerwise-resident-layers', '4'],
     'offload': {'performance_mode': 'manual', 'layerwise_offload_components': ['transformer', 'text_encoder'],
                 'dit_layerwise_resident_layers': 4},
     'sglang': {'text_encoder': ['layerwise', [12, 1], []], 'text_encoder_2': ['layerwise', [24, 1], []],
                'transformer': ['layerwise', [19, 1], [38, 1], [0, 1, 2, 3, 19, 20, 21, 22]], 'vae': ['resident']},
     'source': 'the DiT flag is DiT-scoped (dit_tuning_enabled): the text encoders keep none'},
    {'id': 'per_component_knobs',
     'model': 'black-forest-labs/FLUX.1-dev',
     'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'transformer', 'text_encoder',
              '--dit-offload-prefetch-size', '0.25', '--layerwise-prefetch-size', 'text_encoder_2=3',
              '--layerwise-resident-layers', 'text_encoder_2=0.5', '--layerwise-residency-policy',
              'text_encoder_2=strided'],
     'offload': {'performance_mode': 'manual', 'layerwise_offload_components': ['transformer', 'text_encoder'],
                 'dit_offload_prefetch_size': 0.25, 'layerwise_prefetch_size': {'text_encoder_2': 3},
                 'layerwise_resident_layers': {'text_encoder_2': 0.5},
                 'layerwise_residency_policy': {'text_encoder_2': 'strided'}},
     'sglang': {'text_encoder': ['layerwise', [12, 4], []],
                'text_encoder_2': ['layerwise', [24, 3], list(range(1, 24, 2))],
                'transformer': ['layerwise', [19, 5], [38, 10], []], 'vae': ['resident']},
     'source': '#35688: an entry for the exact name wins; text_encoder keeps the group value (the seed: 0.25 for '
               'every list, K = 4)'},
    {'id': 'per_component_exact_name_only',
     'model': 'black-forest-labs/FLUX.1-dev',
     'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'text_encoder',
              '--layerwise-prefetch-size', 'text_encoder=2', '--layerwise-resident-layers', 'text_encoder=3'],
     'offload': {'performance_mode': 'manual', 'layerwise_offload_components': ['text_encoder'],
                 'layerwise_prefetch_size': {'text_encoder': 2}, 'layerwise_resident_layers': {'text_encoder': 3}},
     'sglang': {'text_encoder': ['layerwise', [12, 2], [0, 1, 2]], 'text_encoder_2': ['layerwise', [24, 1], []],
                'transformer': ['resident'], 'vae': ['resident']},
     'source': "#35688: 'text_encoder' is a key, not the family token: text_encoder_2 keeps its group value"},
    {'id': 'per_component_dit_entry_over_dit_flags',
     'model': 'Qwen/Qwen-Image',
     'argv': ['--performance-mode', 'manual', '--dit-layerwise-offload', '--dit-layerwise-resident-layers', '24',
              '--dit-layerwise-residency-policy', 'strided', '--layerwise-resident-layers', 'transformer=2',
              '--layerwise-residency-policy', 'transformer=leading', '--layerwise-prefetch-size', 'transformer=4'],
     'offload': {'performance_mode': 'manual', 'dit_layerwise_offload': True, 'dit_layerwise_resident_layers': 24,
                 'dit_layerwise_residency_policy': 'strided', 'layerwise_resident_layers': {'transformer': 2},
                 'layerwise_residency_policy': {'transformer': 'leading'},
                 'layerwise_prefetch_size': {'transformer': 4}},
     'sglang': {'text_encoder': ['resident'], 'transformer': ['layerwise', [60, 4], [0, 1]], 'vae': ['resident']},
     'source': "#35688: the component's own entry wins over the DiT flags"},
    # #25517's meanings, picked by offload.sglang_semantics / --sglang-semantics
    {'id': 'later_selection_keeps_fsdp',
     'model': 'Wan-AI/Wan2.2-T2V-A14B-Diffusers',
     'argv': ['--sglang-semantics', '25517', '--performance-mode', 'manual', '--use-fsdp-inference',
              '--layerwise-offload-components', 'text_encoder'],
     'offload': {'sglang_semantics': '25517', 'performance_mode': 'manual', 'use_fsdp_inference': True,
                 'layerwise_offload_components': ['text_encoder']},
     'sglang': {'text_encoder': ['layerwise', [24, 1], []], 'transformer': ['fsdp'], 'transformer_2': ['fsdp'],
                'vae': ['resident']},
     'source': '#25517: a selection without a DiT leaves FSDP on'},
    {'id': 'seed_selection_turns_fsdp_off',
     'model': 'Wan-AI/Wan2.2-T2V-A14B-Diffusers',
     'argv': ['--performance-mode', 'manual', '--use-fsdp-inference', '--layerwise-offload-components',
              'text_encoder'],
     'offload': {'performance_mode': 'manual', 'use_fsdp_inference': True,
                 'layerwise_offload_components': ['text_encoder']},
     'sglang': {'text_encoder': ['layerwise', [24, 1], []], 'transformer': ['resident'],
                'transformer_2': ['resident'], 'vae': ['resident']},
     'source': '416fdbb (the default): any selection turns FSDP off (test_sglang_fidelity has the others)'},
    {'id': 'later_dit_token',
     'model': 'Wan-AI/Wan2.2-T2V-A14B-Diffusers',
     'argv': ['--sglang-semantics', '25517', '--performance-mode', 'manual', '--use-fsdp-inference',
              '--layerwise-offload-components', 'dit'],
     'offload': {'sglang_semantics': '25517', 'performance_mode': 'manual', 'use_fsdp_inference': True,
                 'layerwise_offload_components': ['dit']},
     'sglang': {'text_encoder': ['resident'], 'transformer': ['layerwise', [40, 1], []],
                'transformer_2': ['layerwise', [40, 1], []], 'vae': ['resident']},
     'source': "#25517: 'dit' is the DiT group; selecting a DiT turns FSDP off"},
    {'id': 'later_dit_name_turns_fsdp_off',
     'model': 'Wan-AI/Wan2.2-T2V-A14B-Diffusers',
     'argv': ['--sglang-semantics', '25517', '--performance-mode', 'manual', '--use-fsdp-inference',
              '--layerwise-offload-components', 'transformer_2'],
     'offload': {'sglang_semantics': '25517', 'performance_mode': 'manual', 'use_fsdp_inference': True,
                 'layerwise_offload_components': ['transformer_2']},
     'sglang': {'text_encoder': ['resident'], 'transformer': ['resident'],
                'transformer_2': ['layerwise', [40, 1], []], 'vae': ['resident']},
     'source': '#25517: a DiT named exactly is a DiT selected'},
    {'id': 'later_default_token',
     'model': 'black-forest-labs/FLUX.1-dev',
     'argv': ['--sglang-semantics', '25517', '--performance-mode', 'manual', '--layerwise-offload-components',
              'default'],
     'offload': {'sglang_semantics': '25517', 'performance_mode': 'manual', 'layerwise_offload_components': ['default']},
     'sglang': {'text_encoder': ['layerwise', [12, 1], []], 'text_encoder_2': ['layerwise', [24, 1], []],
                'transformer': ['resident'], 'vae': ['layerwise', [4, 1], [4, 1], []]},
     'source': "#25517: 'default' is the text_encoder, image_encoder and vae groups, not the DiTs"},
    {'id': 'later_default_with_explicit_fsdp',
     'model': 'Wan-AI/Wan2.2-T2V-A14B-Diffusers',
     'argv': ['--sglang-semantics', '25517', '--performance-mode', 'manual', '--num-gpus', '2',
              '--use-fsdp-inference', '--layerwise-offload-components', 'default'],
     'offload': {'sglang_semantics': '25517', 'performance_mode': 'manual', 'num_gpus': 2,
                 'use_fsdp_inference': True, 'layerwise_offload_components': ['default']},
     'sglang': {'text_encoder': ['layerwise', [24, 1], []], 'transformer': ['fsdp'], 'transformer_2': ['fsdp'],
                'vae': ['layerwise', [11, 1], [4, 1], []]},
     'source': 'test_server_args.py (after #25517)::test_auto_wan_layerwise_offload_does_not_disable_explicit_fsdp '
               '(layerwise [text_encoder, image_encoder, vae] with use_fsdp_inference kept true)'},
    {'id': 'later_default_group_normalized',
     'model': 'black-forest-labs/FLUX.1-dev',
     'argv': ['--sglang-semantics', '25517', '--performance-mode', 'manual', '--layerwise-offload-components',
              'default', 'text_encoder'],
     'offload': {'sglang_semantics': '25517', 'performance_mode': 'manual',
                 'layerwise_offload_components': ['default', 'text_encoder']},
     'sglang': {'text_encoder': ['layerwise', [12, 1], []], 'text_encoder_2': ['layerwise', [24, 1], []],
                'transformer': ['resident'], 'vae': ['layerwise', [4, 1], [4, 1], []]},
     'source': 'test_server_args.py (after #25517)::test_layerwise_offload_components_normalize_default_group '
               '([default, text_encoder] -> [text_encoder, image_encoder, vae])'},
    {'id': 'later_dit_layerwise_offload',
     'model': 'Tongyi-MAI/Z-Image-Turbo',
     'argv': ['--sglang-semantics', '25517', '--performance-mode', 'manual', '--dit-layerwise-offload'],
     'offload': {'sglang_semantics': '25517', 'performance_mode': 'manual', 'dit_layerwise_offload': True},
     'sglang': {'text_encoder': ['resident'], 'transformer': ['layerwise', [30, 1], []], 'vae': ['resident']},
     'source': "test_server_args.py (after #25517)::test_dit_layerwise_offload_selects_dit_group "
               "(--dit-layerwise-offload gives [dit])"},
    {'id': 'seed_dit_token_matches_nothing',
     'model': 'Tongyi-MAI/Z-Image-Turbo',
     'argv': ['--performance-mode', 'manual', '--layerwise-offload-components', 'dit'],
     'offload': {'performance_mode': 'manual', 'layerwise_offload_components': ['dit']},
     'sglang': {'text_encoder': ['resident'], 'transformer': ['resident'], 'vae': ['resident']},
     'source': "416fdbb: 'dit' is an exact component name, and no pipeline has one"},
]


def _outcome(plan):
    out = {}
    for name, cp in plan.components.items():
        s = str(cp.strategy)
        out[name] = [s] + ([[ll.count, ll.prefetch] for ll in cp.layers] + [list(cp.resident_layers)]
                           if s == "layerwise" else [])
    return out


def _pipeline(case):
    facts = sglang_model(model_path=case["model"])
    return {"model": facts.catalog} if facts is not None and facts.catalog else {"path": case["model"]}


def through_from_sglang(case):
    return make_plan(Document(file="<case>", data=translate(parse_args(["--model-path", case["model"],
                                                                        *case["argv"]])).spec))


def through_spec(case):
    return make_plan(Document(file="<case>", data={"version": 1, "pipeline": _pipeline(case),
                                                   "offload": dict(case["offload"])}))


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
@pytest.mark.parametrize("route", [through_from_sglang, through_spec], ids=["from-sglang", "spec"])
def test_later_sglang_outcome(case, route):
    assert _outcome(route(case)) == case["sglang"]


def test_from_sglang_writes_what_the_spec_says():
    for case in CASES:
        offload = translate(parse_args(["--model-path", case["model"], *case["argv"]])).spec["offload"]
        assert offload == case["offload"], case["id"]


# --- decisions and warnings ------------------------------------------------------------------------------

def _spec(offload: str, model: str = "flux.1-dev"):
    return load_text(f"version: 1\npipeline: {{model: {model}}}\noffload:\n  performance_mode: manual\n{offload}",
                     "later.yaml")


def test_each_tuning_change_is_a_decision_naming_its_flag_and_pr():
    case = next(c for c in CASES if c["id"] == "per_component_knobs")
    plan = through_spec(case)
    rules = {(d.rule, d.component): d for d in plan.decisions}
    prefetch = rules[("layerwise-prefetch-size", "text_encoder_2")]
    assert "layerwise_prefetch_size.text_encoder_2" in prefetch.reason and prefetch.to == "prefetch 3"
    resident = rules[("layerwise-resident-layers", "text_encoder_2")]
    assert "strided" in resident.reason and "12 of 24" in resident.reason and resident.to == "12 resident layers"
    assert ("layerwise-resident-layers", "text_encoder") not in rules
    dit = through_spec(next(c for c in CASES if c["id"] == "dit_resident_per_list_strided"))
    (d,) = [d for d in dit.decisions if d.rule == "layerwise-resident-layers"]
    assert "dit_layerwise_residency_policy" in d.reason and "10 of 19, 10 of 38" in d.reason


def test_the_later_fsdp_rule_is_its_own_decision():
    plan = through_spec(next(c for c in CASES if c["id"] == "later_dit_token"))
    fsdp = [d for d in plan.decisions if d.to == "layerwise" and d.from_ == "fsdp"]
    assert {d.rule for d in fsdp} == {"layerwise-dit-overrides-fsdp"} and "#25517" in fsdp[0].reason
    assert "the DiT group, SGLang after #25517" in fsdp[0].reason
    seed = make_plan(_spec("  use_fsdp_inference: true\n  layerwise_offload_components: transformer\n",
                           "wan2.2-t2v-a14b"))
    assert {d.rule for d in seed.decisions if d.from_ == "fsdp"} == {"layerwise-overrides-fsdp"}


def test_the_dit_token_under_the_seed_warns_and_says_how_to_get_the_later_meaning():
    plan = through_spec(next(c for c in CASES if c["id"] == "seed_dit_token_matches_nothing"))
    (w,) = plan.warnings
    assert w.code == "selection-matches-nothing" and "sglang_semantics: '25517'" in w.message
    t = translate(parse_args(["--layerwise-offload-components", "dit"]))
    assert any("--sglang-semantics 25517" in note for note in t.notes)
    assert not translate(parse_args(["--sglang-semantics", "25517", "--layerwise-offload-components", "dit"])).notes


def test_a_per_component_key_that_names_no_component_warns_and_one_for_a_resident_component_is_ignored():
    plan = make_plan(_spec("  layerwise_offload_components: transformer\n"
                           "  layerwise_prefetch_size: {transfomer: 2, vae: 3}\n"))
    codes = sorted(w.code for w in plan.warnings)
    assert codes == ["ignored-for-strategy", "tuning-matches-nothing"]
    (miss,) = [w for w in plan.warnings if w.code == "tuning-matches-nothing"]
    assert "transfomer" in miss.message and "transformer" in miss.message          # did you mean
    assert (miss.line, miss.column) == (6, 29)


def test_a_components_entry_wins_over_the_per_component_flags():
    plan = make_plan(load_text("version: 1\npipeline: {model: flux.1-dev}\noffload:\n  performance_mode: manual\n"
                               "  layerwise_offload_components: text_encoder\n"
                               "  layerwise_prefetch_size: {text_encoder_2: 3}\n"
                               "  layerwise_resident_layers: {text_encoder_2: 10}\n"
                               "components:\n  text_encoder_2: {strategy: layerwise, prefetch: 2, resident_layers: 4,"
                               " placement: leading}\n", "own.yaml"))
    te2 = plan.components["text_encoder_2"]
    assert [ll.prefetch for ll in te2.layers] == [2] and te2.resident_layers == (0, 1, 2, 3)


def test_sglang_semantics_accepts_both_spellings_and_refuses_others_at_their_place():
    for value in ("'25517'", "25517", "416fdbb"):
        make_plan(_spec(f"  sglang_semantics: {value}\n"))
    with pytest.raises(SpecError) as exc:
        make_plan(_spec("  sglang_semantics: latest\n"))
    (d,) = exc.value.diagnostics
    assert (d.line, d.column) == (5, 21) and "416fdbb, 25517" in d.message and "25517, 25517" not in d.message


@pytest.mark.parametrize("offload, where", [
    ("  dit_layerwise_residency_policy: spread\n", (5, 35)),
    ("  dit_layerwise_resident_layers: -1\n", (5, 34)),
    ("  layerwise_prefetch_size: {text_encoder: -1}\n", (5, 43)),
    ("  layerwise_resident_layers: {text_encoder: many}\n", (5, 45)),
    ("  layerwise_residency_policy: {text_encoder: Leading}\n", (5, 46)),
    ("  layerwise_prefetch_size: [text_encoder]\n", (5, 28)),
])
def test_bad_values_in_the_spec_are_errors_at_their_place(offload, where):
    with pytest.raises(SpecError) as exc:
        make_plan(_spec(offload))
    assert (exc.value.diagnostics[0].line, exc.value.diagnostics[0].column) == where


# --- from-sglang reads the flags as SGLang reads them --------------------------------------------------------

def test_from_sglang_reads_json_objects_config_mappings_and_the_last_flag(tmp_path):
    t = translate(parse_args(["--layerwise-prefetch-size", '{"text_encoder": 2, "vae": 0.5}']))
    assert t.spec["offload"]["layerwise_prefetch_size"] == {"text_encoder": 2, "vae": 0.5}
    t = translate(parse_args(["--layerwise-resident-layers", " text_encoder = 4 , ,vae=1"]))
    assert t.spec["offload"]["layerwise_resident_layers"] == {"text_encoder": 4, "vae": 1}
    t = translate(parse_args(["--layerwise-residency-policy", "a=leading", "--layerwise-residency-policy",
                              "b=strided"]))
    assert t.spec["offload"]["layerwise_residency_policy"] == {"b": "strided"}     # one str argument: the last
    cfg = tmp_path / "sglang.yaml"
    cfg.write_text("layerwise-prefetch-size: {text_encoder: 3}\nlayerwise_residency_policy: text_encoder=strided\n"
                   "dit-layerwise-residency-policy: strided\ndit_layerwise_resident_layers: 0.5\n")
    offload = translate(parse_args(["--config", str(cfg)])).spec["offload"]
    assert offload == {"layerwise_prefetch_size": {"text_encoder": 3},
                       "layerwise_residency_policy": {"text_encoder": "strided"},
                       "dit_layerwise_residency_policy": "strided", "dit_layerwise_resident_layers": 0.5}


def test_from_sglang_writes_negative_per_component_values_as_sglang_uses_them():
    t = translate(parse_args(["--layerwise-prefetch-size", "vae=-2", "--layerwise-resident-layers", "vae=-1"]))
    assert t.spec["offload"]["layerwise_prefetch_size"] == {"vae": 0}      # SGLang: K = 1, as for 0
    assert t.spec["offload"]["layerwise_resident_layers"] == {"vae": 0}    # SGLang: none resident
    assert len(t.notes) == 2
    t = translate(parse_args(["--dit-layerwise-resident-layers", "10.7"]))
    assert t.spec["offload"]["dit_layerwise_resident_layers"] == 10 and "truncates" in t.notes[0]


@pytest.mark.parametrize("argv", [
    ["--dit-layerwise-residency-policy", "Strided"],          # argparse choices are exact
    ["--dit-layerwise-residency-policy", "spread"],
    ["--dit-layerwise-residency-policy", " strided"],         # nor stripped
    ["--layerwise-residency-policy", '{"vae": "strided "}'],
    ["--dit-layerwise-resident-layers", "-1"],
    ["--dit-layerwise-resident-layers", "inf"],
    ["--dit-layerwise-resident-layers", "nan"],
    ["--layerwise-prefetch-size", "text_encoder"],             # no '='
    ["--layerwise-prefetch-size", "text_encoder=fast"],
    ["--layerwise-resident-layers", "vae=1e999"],
    ["--layerwise-residency-policy", "vae=spread"],
    ["--layerwise-residency-policy", "=strided"],
    ["--sglang-semantics", "latest"],
])
def test_from_sglang_refuses_what_sglang_cannot_use(argv):
    with pytest.raises(SGLangArgsError):
        translate(parse_args(argv))


def test_from_sglang_cli_error_is_located_and_exit_1(capsys):
    assert cli_main(["from-sglang", "--layerwise-prefetch-size", "text_encoder"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("<command line>:") and "COMPONENT=VALUE" in err and "Traceback" not in err
    assert cli_main(["from-sglang", "--layerwise-prefetch-size"]) == 2          # a flag without its value


def test_the_later_meaning_needs_to_be_asked_for():
    default = translate(parse_args(["--layerwise-offload-components", "default"])).spec["offload"]
    assert "sglang_semantics" not in default                     # the seed's meaning unless asked
    plan = make_plan(Document(file="<x>", data={"version": 1, "pipeline": {"model": "flux.1-dev"},
                                                "offload": {"performance_mode": "manual",
                                                            "layerwise_offload_components": "default"}}))
    assert str(plan.components["transformer"].strategy) == "layerwise"          # 416fdbb: default = the DiTs
    assert str(plan.components["text_encoder"].strategy) == "resident"


def test_the_dit_flags_without_a_streamed_dit_warn_as_sglang_does():
    """server_args._validate_offload (later SGLang): the resident count needs a layerwise DiT, the policy a
    resident set."""
    plan = make_plan(_spec("  dit_layerwise_resident_layers: 8\n  dit_layerwise_residency_policy: strided\n"))
    assert [w.code for w in plan.warnings] == ["dit-tuning-no-effect", "dit-tuning-no-effect"]
    plan = make_plan(_spec("  dit_layerwise_offload: true\n  dit_layerwise_residency_policy: strided\n"))
    (w,) = plan.warnings
    assert "no resident set" in w.message and (w.line, w.column) == (6, 3)
    assert not make_plan(_spec("  dit_layerwise_offload: true\n  dit_layerwise_resident_layers: 8\n"
                               "  dit_layerwise_residency_policy: strided\n")).warnings


def test_resident_values_that_are_not_finite_are_errors_and_huge_counts_mean_all():
    with pytest.raises(SpecError) as exc:
        make_plan(_spec("  dit_layerwise_offload: true\n  dit_layerwise_resident_layers: .inf\n"
                        "  layerwise_resident_layers: {text_encoder: .inf}\n"))
    assert [(d.line, d.column) for d in exc.value.diagnostics] == [(6, 34), (7, 45)]
    big = "9" * 400                       # a YAML integer no float holds: bounded, not a traceback
    plan = make_plan(_spec(f"  dit_layerwise_offload: true\n  dit_layerwise_resident_layers: {big}\n"
                           f"  dit_offload_prefetch_size: {big}\n  layerwise_offload_components: text_encoder\n"
                           f"  layerwise_prefetch_size: {{text_encoder: {big}}}\n"))
    t = plan.components["transformer"]
    assert len(t.resident_layers) == 57 and [ll.prefetch for ll in t.layers] == [19, 38]


def test_hostile_per_component_values_are_located_short_errors():
    for value in ("[" * 100_000, '{"a": ' * 10_000 + "1", "x" * 100_000):
        with pytest.raises(SGLangArgsError) as exc:
            translate(parse_args(["--layerwise-prefetch-size", value]))
        assert len(str(exc.value)) < 300
