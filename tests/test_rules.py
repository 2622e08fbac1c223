"""The design's resolution rules, one test (or more) per rule, with SGLang's behaviours."""

from __future__ import annotations

import pytest

from planner import SpecError, make_plan
from planner.inventory.model import ComponentInfo, Inventory, LayerList
from planner.planning.resolve import place_resident, prefetch_count
from planner.spec.document import load_text

GiB = 1 << 30


def comp(name: str, cls: str = "Model", layers: int = 0, layer_bytes: int = 1 << 20, extra: int = 1 << 20,
         path: str = "layers") -> ComponentInfo:
    lls = (LayerList(path, layers, (layer_bytes,) * layers),) if layers else ()
    return ComponentInfo(name=name, class_name=cls, weight_bytes=layers * layer_bytes + extra, layer_lists=lls)


INV = Inventory("test", (
    comp("text_encoder", layers=36), comp("text_encoder_2", layers=24), comp("image_encoder", layers=12),
    comp("transformer", layers=40), comp("transformer_2", layers=40), comp("dual_tower_bridge", layers=4),
    comp("vae"), comp("vocoder", layers=3), comp("connectors", layers=2),
))


def plan_of(yaml_text: str, inv: Inventory = INV, strict: bool = False, mode: str | None = "manual"):
    """The rules one at a time: performance_mode manual (SGLang's default, auto, fills unset flags from the
    model and the GPU; tests/test_sglang_fidelity.py covers it), unless the spec or ``mode`` says otherwise."""
    doc = load_text("version: 1\npipeline: {model: test}\n" + yaml_text, "spec.yaml")
    offload = doc.data.get("offload")
    if isinstance(offload, dict) and mode is not None:
        offload.setdefault("performance_mode", mode)
    return make_plan(doc, inventory=inv, strict=strict)


def strategies(plan) -> dict[str, str]:
    return {n: c.strategy for n, c in plan.components.items()}


def rules_of(plan, component: str) -> list[str]:
    return [d.rule for d in plan.decisions if d.component == component]


# Rule 1: families
def test_families_by_name():
    plan = plan_of("")
    fam = {n: c.family for n, c in plan.components.items()}
    assert fam == {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "image_encoder": "image_encoder",
                   "transformer": "dit", "transformer_2": "dit", "dual_tower_bridge": "dit", "vae": "vae",
                   "vocoder": "vae", "connectors": "other"}
    assert set(strategies(plan).values()) == {"resident"}
    assert plan.decisions == ()


def test_name_ending_in_text_encoder_is_a_text_encoder():
    inv = Inventory("t", (comp("prompt_text_encoder", layers=2), comp("transformer", layers=2)))
    plan = plan_of("offload: {text_encoder_cpu_offload: true}\n", inv)
    assert strategies(plan)["prompt_text_encoder"] == "cpu_offload"


# Rule 2: tokens
def test_legacy_flag_selects_dit_only():
    plan = plan_of("offload: {dit_layerwise_offload: true}\n")
    s = strategies(plan)
    assert s["transformer"] == s["transformer_2"] == "layerwise"
    assert s["dual_tower_bridge"] == "resident"          # 'default' excludes the bridge
    assert s["text_encoder"] == s["vae"] == s["vocoder"] == "resident"


def test_all_selects_every_module_component_with_layers():
    plan = plan_of("offload: {layerwise_offload_components: all}\n")
    s = strategies(plan)
    assert all(s[n] == "layerwise" for n in s if n != "vae")
    # the VAE has no layer lists: it cannot stream; SGLang skips it (quietly under 'all') and, its
    # family's CPU offload turned off by the selection, it stays on the GPU
    assert s["vae"] == "resident"
    assert rules_of(plan, "vae") == []
    assert plan.warnings == ()
    named = plan_of("offload: {layerwise_offload_components: [vae, transformer]}\n")
    assert strategies(named)["vae"] == "resident"
    assert [w.code for w in named.warnings] == ["layerwise-cannot-stream"]
    assert "vae is selected for layerwise offload" in named.warnings[0].message


def test_component_entry_layerwise_without_layers_is_offloaded_whole():
    plan = plan_of("components:\n  vae: layerwise\n")
    assert strategies(plan)["vae"] == "cpu_offload"
    assert rules_of(plan, "vae") == ["component-entry", "layerwise-no-layers"]


def test_default_plus_family_tokens():
    plan = plan_of("offload: {layerwise_offload_components: 'default, text_encoder'}\n")
    s = strategies(plan)
    assert s["transformer"] == s["transformer_2"] == s["text_encoder"] == s["text_encoder_2"] == "layerwise"
    assert s["dual_tower_bridge"] == s["image_encoder"] == s["vocoder"] == "resident"


def test_vae_family_token_and_exact_name():
    plan = plan_of("offload: {layerwise_offload_components: [vae, dual_tower_bridge]}\n")
    s = strategies(plan)
    assert s["vocoder"] == "layerwise" and s["dual_tower_bridge"] == "layerwise"
    assert s["transformer"] == "resident"


def test_token_normalisation_trim_dash_case_dedup():
    plan = plan_of("offload: {layerwise_offload_components: ' Transformer-2 ,TRANSFORMER_2,, text-encoder '}\n")
    s = strategies(plan)
    assert s["transformer_2"] == "layerwise" and s["text_encoder"] == "layerwise"
    assert s["transformer"] == "resident"
    assert plan.warnings == ()
    assert len(rules_of(plan, "transformer_2")) == 1


def test_alias_modules():
    plan = plan_of("offload: {layerwise_offload_modules: transformer}\n")
    assert strategies(plan)["transformer"] == "layerwise"


def test_alias_and_name_together_is_an_error_naming_both():
    with pytest.raises(SpecError) as exc:
        plan_of("offload:\n  layerwise_offload_components: transformer\n  layerwise_offload_modules: vae\n")
    msg = str(exc.value)
    assert msg.startswith("spec.yaml:5:3: error:")
    assert "layerwise_offload_components" in msg and "line 4" in msg


def test_legacy_flag_adds_default_to_explicit_tokens():
    plan = plan_of("offload: {dit_layerwise_offload: true, layerwise_offload_components: text_encoder_2}\n")
    s = strategies(plan)
    assert s["text_encoder_2"] == s["transformer"] == s["transformer_2"] == "layerwise"
    assert s["text_encoder"] == "resident"


# Rule 3: family flags
def test_family_flags():
    plan = plan_of("offload: {dit_cpu_offload: true, text_encoder_cpu_offload: true, image_encoder_cpu_offload: true,"
                   " vae_cpu_offload: true}\n")
    s = strategies(plan)
    assert s["transformer"] == s["dual_tower_bridge"] == "cpu_offload"
    assert s["text_encoder"] == s["image_encoder"] == s["vae"] == s["vocoder"] == "cpu_offload"
    assert s["connectors"] == "resident"
    assert all(d.rule == "family-flag" for d in plan.decisions)


def test_fsdp_flag_gives_dit_family_fsdp():
    plan = plan_of("offload: {use_fsdp_inference: true}\n")
    s = strategies(plan)
    assert s["transformer"] == s["transformer_2"] == s["dual_tower_bridge"] == "fsdp"
    assert s["text_encoder"] == "resident"


def test_false_flags_change_nothing():
    plan = plan_of("offload: {dit_cpu_offload: false, dit_layerwise_offload: false}\n")
    assert set(strategies(plan).values()) == {"resident"} and plan.decisions == ()


# Rule 4: conflicts, flag-wide as SGLang applies them, each change a decision
def test_layerwise_turns_off_the_family_cpu_offload_flag_for_the_whole_family():
    plan = plan_of("offload:\n  layerwise_offload_components: transformer, text_encoder_2\n"
                   "  dit_cpu_offload: true\n  text_encoder_cpu_offload: true\n")
    s = strategies(plan)
    # SGLang turns dit_cpu_offload and text_encoder_cpu_offload off: the unselected members stay resident
    assert s["transformer"] == "layerwise" and s["transformer_2"] == "resident"
    assert s["text_encoder_2"] == "layerwise" and s["text_encoder"] == "resident"
    assert s["dual_tower_bridge"] == "resident"
    d = [d for d in plan.decisions if d.rule == "layerwise-overrides-cpu-offload"]
    assert [(x.component, x.from_, x.to) for x in d] == [("text_encoder_2", "cpu_offload", "layerwise"),
                                                          ("transformer", "cpu_offload", "layerwise")]
    assert "dit_cpu_offload" in d[1].reason and "transformer" in d[1].reason
    off = [d for d in plan.decisions if d.rule == "layerwise-disables-family-cpu-offload"]
    assert {(x.component, x.from_, x.to) for x in off} == {
        ("text_encoder", "cpu_offload", "resident"), ("transformer_2", "cpu_offload", "resident"),
        ("dual_tower_bridge", "cpu_offload", "resident")}


def test_any_layerwise_selection_turns_fsdp_off():
    plan = plan_of("offload:\n  layerwise_offload_components: transformer_2\n  use_fsdp_inference: true\n")
    s = strategies(plan)
    assert s["transformer"] == "resident" and s["transformer_2"] == "layerwise"
    assert rules_of(plan, "transformer_2") == ["family-flag", "layerwise-overrides-fsdp"]
    assert rules_of(plan, "transformer") == ["family-flag", "layerwise-overrides-fsdp"]
    # a selection of another family turns FSDP off as well
    plan = plan_of("offload:\n  layerwise_offload_components: text_encoder\n  use_fsdp_inference: true\n")
    assert strategies(plan)["transformer"] == "resident" and strategies(plan)["text_encoder"] == "layerwise"


def test_negative_prefetch_is_an_error_only_when_something_is_selected():
    plan = plan_of("offload: {dit_cpu_offload: true, dit_offload_prefetch_size: -1}\n")
    assert strategies(plan)["transformer"] == "cpu_offload"
    with pytest.raises(SpecError, match="prefetch cannot be negative"):
        plan_of("offload: {layerwise_offload_components: vae, dit_offload_prefetch_size: -1}\n")


def test_fsdp_and_cpu_offload_flags_fsdp_wins_as_a_decision():
    plan = plan_of("offload: {dit_cpu_offload: true, use_fsdp_inference: true}\n")
    assert strategies(plan)["transformer"] == "fsdp"
    assert "fsdp-overrides-cpu-offload" in rules_of(plan, "transformer")


# Rule 5: components entries
def test_component_entry_overrides_flags_with_decision():
    plan = plan_of("offload: {dit_cpu_offload: true}\ncomponents:\n  transformer: resident\n")
    assert strategies(plan)["transformer"] == "resident"
    assert rules_of(plan, "transformer") == ["family-flag", "component-entry"]


def test_component_entry_may_override_a_family_token_selection():
    plan = plan_of("offload: {layerwise_offload_components: all}\ncomponents:\n  text_encoder: cpu_offload\n")
    assert strategies(plan)["text_encoder"] == "cpu_offload"


def test_component_entry_contradicting_explicit_selection_is_an_error_naming_both():
    with pytest.raises(SpecError) as exc:
        plan_of("offload:\n  layerwise_offload_components: [vae, transformer]\n"
                "components:\n  transformer: {strategy: fsdp}\n")
    (diag,) = exc.value.diagnostics
    assert (diag.line, diag.column) == (6, 27)  # the strategy value
    assert "line 4" in diag.message and "components.transformer" in diag.message


def test_component_entry_contradicting_in_short_form():
    with pytest.raises(SpecError) as exc:
        plan_of("offload: {layerwise_offload_components: transformer}\ncomponents: {transformer: resident}\n")
    assert "explicitly selected" in str(exc.value)


# Rule 6: unknown tokens and unknown components
def test_unknown_token_warns():
    plan = plan_of("offload: {layerwise_offload_components: 'transformer, transfomer_3'}\n")
    assert len(plan.warnings) == 1
    (w,) = plan.warnings
    assert (w.file, w.line, w.code, w.where) == ("spec.yaml", 3, "selection-matches-nothing",
                                                 "offload.layerwise_offload_components")
    assert w.format().startswith("spec.yaml:3:")
    assert "warning: layerwise selection token 'transfomer_3' matches no component" in w.format()


def test_unknown_token_is_an_error_under_strict():
    with pytest.raises(SpecError) as exc:
        plan_of("offload: {layerwise_offload_components: [nope]}\n", strict=True)
    assert "error: layerwise selection token 'nope'" in str(exc.value)


def test_unknown_component_key_is_an_error_with_suggestion():
    with pytest.raises(SpecError) as exc:
        plan_of("components:\n  transfromer: layerwise\n")
    (diag,) = exc.value.diagnostics
    assert (diag.line, diag.column) == (4, 3)
    assert "did you mean 'transformer'" in diag.message


# Rule 7: prefetch
@pytest.mark.parametrize("p,n,k", [(0, 40, 1), (0.25, 40, 11), (0.5, 40, 21), (0.99, 40, 40), (1, 40, 1),
                                   (2.7, 40, 2), (100, 40, 40), (0.5, 2, 1), (0.25, 3, 1), (0.5, 1, 1),
                                   # half to even, as Python's round (and SGLang) computes it
                                   (0.5, 4, 3), (0.125, 5, 1), (0.375, 5, 3)])
def test_prefetch_fraction_and_count(p, n, k):
    assert prefetch_count(p, n) == k


def test_prefetch_precedence_component_over_flag_over_defaults():
    plan = plan_of("defaults: {prefetch: 3}\noffload: {dit_layerwise_offload: true, dit_offload_prefetch_size: 0.25,"
                   " layerwise_offload_components: text_encoder}\ncomponents:\n  transformer: {prefetch: 5}\n")
    c = plan.components
    assert c["transformer"].prefetch == 5
    assert c["transformer_2"].prefetch == 1 + round(0.25 * 39)
    assert c["text_encoder"].prefetch == 1 + round(0.25 * 35)
    plan = plan_of("defaults: {prefetch: 3}\noffload: {dit_layerwise_offload: true}\n")
    assert plan.components["transformer"].prefetch == 3


def test_negative_prefetch_is_an_error_at_its_place():
    with pytest.raises(SpecError) as exc:
        plan_of("offload: {dit_layerwise_offload: true, dit_offload_prefetch_size: -0.5}\n")
    assert "spec.yaml:3:" in str(exc.value) and "prefetch cannot be negative" in str(exc.value)


# Resident layers and placement
@pytest.mark.parametrize("placement,expected", [("leading", (0, 1, 2)), ("trailing", (7, 8, 9)),
                                                ("strided", (0, 3, 6)), ("ends", (0, 1, 9))])
def test_placements(placement, expected):
    assert place_resident(3, 10, placement) == expected


def test_resident_layers_count_and_indices():
    plan = plan_of("offload: {dit_layerwise_offload: true}\ncomponents:\n"
                   "  transformer: {resident_layers: 20, placement: strided}\n"
                   "  transformer_2: {resident_layers: [0, 39]}\n")
    assert plan.components["transformer"].resident_layers == tuple(range(0, 40, 2))
    assert plan.components["transformer_2"].resident_layers == (0, 39)


def test_resident_layer_index_out_of_range():
    with pytest.raises(SpecError) as exc:
        plan_of("offload: {dit_layerwise_offload: true}\ncomponents:\n  transformer: {resident_layers: [0, 40]}\n")
    assert "out of range" in str(exc.value) and "40 layers" in str(exc.value)


def test_decisions_are_ordered_and_deterministic():
    text = ("offload:\n  layerwise_offload_components: all\n  dit_cpu_offload: true\n  vae_cpu_offload: true\n"
            "  use_fsdp_inference: true\n")
    assert plan_of(text).to_json() == plan_of(text).to_json()
