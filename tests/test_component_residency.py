"""Later SGLang's --component-residency COMPONENT=MODE (sgl-project/sglang#34736), as the PR describes it: modes
resident, component-offload and layerwise-offload; an exact component key wins over the dit, text_encoder,
image_encoder, vae and all groups; the canonical selector overrides the legacy flags for the components it matches
and leaves the others as the legacy flags make them. Expected outcomes are read from that description (the seed's
SGLang commit predates the flag, so no SGLang code at 416fdbb could be run for them)."""

from __future__ import annotations

import pytest

from planner import SpecError, make_plan
from planner.spec.document import load_text
from planner.spec.sglang_args import SGLangArgsError, parse_args, render_yaml, translate


def strategies(offload: str, model: str = "flux.1-dev") -> dict[str, str]:
    text = f"version: 1\npipeline: {{model: {model}}}\noffload:\n{offload}"
    plan = make_plan(load_text(text, "cr.yaml"))
    return {name: str(cp.strategy) for name, cp in plan.components.items()}


def test_an_exact_key_wins_over_its_group_and_groups_over_all():
    got = strategies("  performance_mode: manual\n"
                     "  component_residency: {all: component-offload, text_encoder: layerwise-offload, "
                     "transformer: resident, dit: layerwise-offload}\n")
    assert got == {"text_encoder": "layerwise", "text_encoder_2": "layerwise", "transformer": "resident",
                   "vae": "cpu_offload"}


def test_the_canonical_selector_overrides_legacy_flags_only_where_it_matches():
    got = strategies("  performance_mode: manual\n  dit_cpu_offload: true\n  text_encoder_cpu_offload: true\n"
                     "  component_residency: {dit: layerwise-offload}\n")
    assert got["transformer"] == "layerwise"                    # the canonical selector
    assert got["text_encoder"] == got["text_encoder_2"] == "cpu_offload"   # the legacy flag, untouched
    assert got["vae"] == "resident"


def test_the_decision_names_the_key_and_the_pr():
    plan = make_plan(load_text("version: 1\npipeline: {model: z-image-turbo}\noffload:\n  performance_mode: manual\n"
                               "  component_residency: {dit: layerwise-offload}\n", "cr.yaml"))
    (decision,) = [d for d in plan.decisions if d.rule == "component-residency"]
    assert decision.component == "transformer" and "component_residency.dit" in decision.reason
    assert "#34736" in decision.reason
    # the lists SGLang streams for the class (Z-Image: its main layers only), as for the legacy flags
    assert [ll.path for ll in plan.components["transformer"].layers] == ["layers"]


def test_a_bad_mode_is_refused_at_its_place_and_an_unknown_key_warns():
    with pytest.raises(SpecError) as exc:
        make_plan(load_text("version: 1\npipeline: {model: flux.1-dev}\noffload:\n"
                            "  component_residency: {dit: fast}\n", "bad.yaml"))
    (diag,) = exc.value.diagnostics
    assert (diag.line, diag.column) == (4, 30)           # at the value
    plan = make_plan(load_text("version: 1\npipeline: {model: flux.1-dev}\noffload:\n  performance_mode: manual\n"
                               "  component_residency: {unet: resident}\n", "warn.yaml"))
    assert [w.code for w in plan.warnings] == ["residency-matches-nothing"]
    assert all(str(cp.strategy) == "resident" for cp in plan.components.values())


def test_from_sglang_translates_the_flag_and_plans_the_same():
    argv = ["--model-path", "black-forest-labs/FLUX.1-dev", "--performance-mode", "manual", "--dit-cpu-offload",
            "--component-residency", "dit=layerwise-offload", "text_encoder_2=resident",
            "--component-residency", "VAE=component_offload"]
    t = translate(parse_args(argv))
    assert t.spec["offload"]["component_residency"] == {"dit": "layerwise-offload", "text_encoder_2": "resident",
                                                        "vae": "component-offload"}
    assert not any("component-residency" in i for i in t.ignored)
    plan = make_plan(load_text(render_yaml(t), "from-sglang.yaml"))
    assert {n: str(cp.strategy) for n, cp in plan.components.items()} == {
        "text_encoder": "resident", "text_encoder_2": "resident", "transformer": "layerwise", "vae": "cpu_offload"}


def test_from_sglang_reads_the_flag_from_a_config_file(tmp_path):
    for body in ("component-residency: [dit=resident, vae=layerwise-offload]\n",
                 "component-residency: {dit: resident, vae: layerwise-offload}\n"):
        cfg = tmp_path / "sglang.yaml"
        cfg.write_text("model-path: Tongyi-MAI/Z-Image-Turbo\n" + body)
        t = translate(parse_args(["--config", str(cfg)]))
        assert t.spec["offload"]["component_residency"] == {"dit": "resident", "vae": "layerwise-offload"}


@pytest.mark.parametrize("argv", [["--component-residency", "dit"], ["--component-residency", "=resident"],
                                  ["--component-residency", "dit=fast"]])
def test_from_sglang_refuses_what_sglang_cannot_read(argv):
    with pytest.raises(SGLangArgsError):
        translate(parse_args(argv))


def test_dit_layerwise_resident_layers_keeps_the_leading_layers_of_a_streamed_dit():
    """#31538: 'keep leading layers resident across denoising steps, so that only tail layers need streaming',
    meant with --dit-layerwise-offload."""
    plan = make_plan(load_text("version: 1\npipeline: {model: z-image-turbo}\noffload:\n  performance_mode: manual\n"
                               "  dit_layerwise_offload: true\n  dit_layerwise_resident_layers: 12\n", "r.yaml"))
    t = plan.components["transformer"]
    assert str(t.strategy) == "layerwise" and t.resident_layers == tuple(range(12))
    everything = make_plan(load_text("version: 1\npipeline: {model: z-image-turbo}\noffload:\n  performance_mode: "
                                     "manual\n  dit_layerwise_offload: true\n  dit_layerwise_resident_layers: 1000\n",
                                     "r.yaml")).components["transformer"]
    assert len(everything.resident_layers) == everything.layer_count          # more than it has keeps all
    own = make_plan(load_text("version: 1\npipeline: {model: z-image-turbo}\noffload:\n  performance_mode: manual\n"
                              "  dit_layerwise_offload: true\n  dit_layerwise_resident_layers: 12\n"
                              "components:\n  transformer: {strategy: layerwise, resident_layers: 2}\n", "r.yaml"))
    assert len(own.components["transformer"].resident_layers) == 2              # the components: entry wins


def test_from_sglang_translates_dit_layerwise_resident_layers():
    t = translate(parse_args(["--dit-layerwise-offload", "--dit-layerwise-resident-layers", "30"]))
    assert t.spec["offload"]["dit_layerwise_resident_layers"] == 30
    for bad in ("-1", "many"):
        with pytest.raises(SGLangArgsError):
            translate(parse_args(["--dit-layerwise-resident-layers", bad]))
