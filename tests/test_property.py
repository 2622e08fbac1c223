"""Property tests: generated specs, valid and broken, never raise anything but SpecError, and plans
round-trip through JSON to the same bytes and validate against the plan schema."""

from __future__ import annotations

import json

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from test_rules import INV

from planner import Plan, SpecError, make_plan
from planner.spec.document import load_text
from planner.spec.schema import load_schema

NAMES = list(INV.names()) + ["transfomer", "scheduler", "nope"]
TOKENS = NAMES + ["all", "default", "text_encoder", "vae", "Text-Encoder", " all ", ""]
STRATS = ["resident", "cpu_offload", "layerwise", "fsdp", "auto", "bogus"]
PLAN_VALIDATOR = Draft202012Validator(load_schema("plan.schema.json"))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.floats(-1, 50, allow_nan=False),
                    st.sampled_from(STRATS + ["16GiB", "1 MB", "lots", "cuda", "gpu"]))
prefetch = st.one_of(st.integers(-2, 60), st.floats(-0.5, 3.0, allow_nan=False), st.sampled_from(["x", None]))
entry = st.one_of(
    st.sampled_from(STRATS),
    st.fixed_dictionaries({}, optional={
        "strategy": st.sampled_from(STRATS), "prefetch": prefetch,
        "resident_layers": st.one_of(st.integers(-1, 50), st.lists(st.integers(-1, 45), max_size=5)),
        "placement": st.sampled_from(["leading", "trailing", "strided", "ends", "middle"]),
        "bogus_key": scalars}),
    scalars,
)
offload = st.fixed_dictionaries({}, optional={
    "dit_layerwise_offload": st.one_of(st.booleans(), scalars),
    "layerwise_offload_components": st.one_of(st.lists(st.sampled_from(TOKENS), max_size=4),
                                              st.lists(st.sampled_from(TOKENS), max_size=4).map(", ".join), scalars),
    "layerwise_offload_modules": st.lists(st.sampled_from(TOKENS), max_size=3),
    "dit_offload_prefetch_size": prefetch,
    "dit_cpu_offload": st.booleans(), "text_encoder_cpu_offload": st.booleans(),
    "image_encoder_cpu_offload": st.booleans(), "vae_cpu_offload": st.booleans(),
    "use_fsdp_inference": st.one_of(st.booleans(), scalars),
    "dit_cpu_ofload": scalars,
})
specs = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, 2, "1"])},
    optional={
        "pipeline": st.one_of(st.just({"model": "test"}), st.just({"model": "test", "dtype": "float32"}),
                              st.just({}), scalars),
        "device": st.sampled_from(["cuda", "cuda:1", "cpu", "gpu", 3]),
        "memory": st.fixed_dictionaries({}, optional={"gpu_budget": st.sampled_from(["1GiB", "80GiB", "1MB", 5, "x"]),
                                                       "host_budget": st.sampled_from(["64GiB", -1])}),
        "defaults": st.fixed_dictionaries({}, optional={"strategy": st.sampled_from(STRATS), "prefetch": prefetch}),
        "components": st.dictionaries(st.sampled_from(NAMES), entry, max_size=4),
        "offload": offload,
        "workload": st.fixed_dictionaries({}, optional={"height": st.integers(0, 4096), "steps": st.integers(0, 50)}),
        "unknown": scalars,
    })


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_spec_side_raises_only_its_own_clear_errors_and_plans_round_trip(spec):
    text = yaml.safe_dump(spec, sort_keys=False)
    try:
        plan = make_plan(load_text(text, "gen.yaml"), inventory=INV)
    except SpecError as exc:
        assert exc.diagnostics
        for d in exc.diagnostics:
            line = d.format()
            assert line.startswith("gen.yaml:") and ": error: " in line
            assert d.line >= 1 and d.column >= 1
        return
    data = plan.to_dict()
    errors = list(PLAN_VALIDATOR.iter_errors(json.loads(plan.to_json())))
    assert not errors, errors[0].message
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()
    assert data["version"] == 1
    for cp in plan.components.values():
        if cp.strategy == "layerwise":
            assert 1 <= cp.prefetch <= max(1, cp.layer_count)
            assert all(0 <= i < cp.layer_count for i in cp.resident_layers)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_loader(raw):
    try:
        make_plan(load_text(raw, "fuzz.yaml"), inventory=INV)
    except SpecError as exc:
        assert all(d.format().startswith("fuzz.yaml:") for d in exc.diagnostics)
