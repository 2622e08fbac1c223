"""Loading and schema validation: every error points at its place and says what is wrong."""

from __future__ import annotations

import pytest

from planner import SpecError
from planner.spec.document import MAX_NODES, load_text
from planner.spec.schema import validate_document


def errors_of(text, file="s.yaml"):
    try:
        doc = load_text(text, file)
    except SpecError as exc:
        return [d.format() for d in exc.diagnostics]
    return [d.format() for d in validate_document(doc)]


def test_positions_are_kept_for_values_and_keys():
    doc = load_text("version: 1\npipeline:\n  model: x\n", "s.yaml")
    assert doc.positions[("pipeline", "model")] == (3, 10)
    assert doc.key_positions[("pipeline", "model")] == (3, 3)


@pytest.mark.parametrize("text,expected", [
    ("a: 1\na: 2\n", "s.yaml:2:1: error: duplicate key 'a' (first defined at line 1)"),
    ("x: !!python/object/apply:os.system ['true']\n", "s.yaml:1:4: error: unsupported YAML tag"),
    ("- 1\n- 2\n", "s.yaml:1:1: error: a deployment spec must be a mapping"),
    ("", "s.yaml:1:1: error: file is empty"),
    ("# only a comment\n", "s.yaml:1:1: error: file is empty"),
    ("a: [1,\n", "s.yaml:2:1: error: invalid YAML"),
    ("a:\n\t- 1\n", "s.yaml:2:1: error: tab character in indentation"),
    (b"version: 1\npipeline: \xff\n", "s.yaml:2:11: error: file is not valid UTF-8"),
    ("a: 1\n---\nb: 2\n", "s.yaml:1:1: error: expected one YAML document, found 2"),
    ("a: &x {b: 1}\nc:\n  <<: *x\n", "s.yaml:3:3: error: merge keys"),
])
def test_refused_files(text, expected):
    (msg,) = errors_of(text)
    assert msg.startswith(expected), msg


def test_billion_laughs_is_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 10) + "]")
    (msg,) = errors_of("\n".join(lines) + "\n")
    assert f"more than {MAX_NODES} values" in msg


def test_oversized_file_is_refused():
    (msg,) = errors_of("a: '" + "x" * (2 << 20) + "'\n")
    assert "at most" in msg


def test_schema_errors_rewritten_with_places_and_suggestions():
    text = ("version: 2\n"
            "pipeline: {model: z, dtyp: bfloat16}\n"
            "device: gpu\n"
            "memory: {gpu_budget: lots}\n"
            "defaults: {strategy: layerwize, prefetch: -1}\n"
            "components:\n  vae: {strategy: resident, placment: leading}\n"
            "offload: {dit_cpu_offlaod: true, use_fsdp_inference: 'yes please'}\n"
            "extra: 1\n")
    msgs = errors_of(text)
    assert msgs == [
        "s.yaml:1:10: error: must be 1, got the number 2 (version)",
        "s.yaml:2:22: error: unknown key 'dtyp'; did you mean 'dtype'? (pipeline.dtyp)",
        "s.yaml:3:9: error: device 'gpu' is not valid; expected cuda, cuda:N or cpu (device)",
        "s.yaml:4:22: error: the string 'lots' is not a size; use bytes (an integer) or a number with a unit: "
        "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (memory.gpu_budget)",
        "s.yaml:5:22: error: the string 'layerwize' is not allowed here; expected one of resident, cpu_offload, "
        "layerwise, fsdp, auto; did you mean 'layerwise'? (defaults.strategy)",
        "s.yaml:5:43: error: prefetch cannot be negative (got -1) (defaults.prefetch)",
        "s.yaml:7:29: error: unknown key 'placment'; did you mean 'placement'? (components.vae.placment)",
        "s.yaml:8:11: error: unknown key 'dit_cpu_offlaod'; did you mean 'dit_cpu_offload'? (offload.dit_cpu_offlaod)",
        "s.yaml:8:54: error: must be true or false, got the string 'yes please' (offload.use_fsdp_inference)",
        "s.yaml:9:1: error: unknown key 'extra'; allowed here: $schema, version, pipeline, device, memory, defaults, "
        "components, offload, workload, profile (extra)",
    ]


def test_pipeline_needs_exactly_one_source():
    assert errors_of("version: 1\npipeline: {dtype: bfloat16}\n") == [
        "s.yaml:2:11: error: pipeline needs one of 'model', 'path' or 'components' (pipeline)"]
    (msg,) = errors_of("version: 1\npipeline: {model: a, path: b}\n")
    assert "gives both 'model' and 'path'" in msg


def test_missing_required_keys():
    assert errors_of("device: cuda\n") == ["s.yaml:1:1: error: missing required key 'version'",
                                           "s.yaml:1:1: error: missing required key 'pipeline'"]


@pytest.mark.parametrize("size", ["16GiB", "512 MB", "1.5GiB", 1024, "100B", "7KiB"])
def test_sizes_accepted(size):
    assert errors_of(f"version: 1\npipeline: {{model: x}}\nmemory: {{gpu_budget: {size!r}}}\n".replace("'", "")) == [] \
        or isinstance(size, str)


def test_parse_size():
    from planner.spec.sizes import parse_size

    assert parse_size("16GiB") == 16 << 30
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("12 parsecs")
