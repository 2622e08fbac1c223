"""Mutation fuzzing of the spec side over the real deployment specs in configs/.

Every mutated input (byte flips, deleted/duplicated lines, keys and values swapped with others from
the corpus, indentation changes, YAML specials: anchors, aliases, tags, merge keys, huge numbers,
long strings, deep nesting, alias bombs, several documents) must end in one of two ways, within a
memory bound (the time per input is a benchmark: bench/fuzz_speed.py):

- a ``SpecError`` whose every diagnostic is ``FILE:LINE:COL: error: message`` with the line inside
  the file and line, column >= 1, or
- a plan that validates against ``schemas/plan.schema.json`` and is deterministic.

Anything else (another exception, a hang, a memory blow-up) is a bug the fuzzer found. The RNG is
seeded, so a failure names the input number that reproduces it (``_mutant(i)``).
(The hypothesis tests over generated specs and arbitrary bytes are in test_property.py.)
"""

from __future__ import annotations

import json
import random
import re
import time
import tracemalloc
from pathlib import Path

from jsonschema import Draft202012Validator

from planner import SpecError, make_plan
from planner.spec.document import load_text
from planner.spec.schema import load_schema

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PLAN_VALIDATOR = Draft202012Validator(load_schema("plan.schema.json"))

N_INPUTS = 3000
SEED = 20240611
MEMORY_BOUND_MB = 48        # tracemalloc peak per input (the loader caps files at 1 MiB and 100k nodes)

# keyed by the file's path, so that a relative pipeline.path resolves as it does for the real file
CORPUS = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in CONFIGS}
_KEY_RE = re.compile(r"(?:(?<=^)|(?<=[\s{,]))([A-Za-z_][\w-]*)(?=:\s|:$)", re.M)
_VALUE_RE = re.compile(r"(?<=: )([^\s{},\[\]#][^,{}\[\]#\n]*?)(?=\s*(?:[,}\]]|$|\s#))", re.M)
KEYS = sorted({k for text in CORPUS.values() for k in _KEY_RE.findall(text)})
VALUES = sorted({v.strip() for text in CORPUS.values() for v in _VALUE_RE.findall(text) if v.strip()})

SPECIALS = [
    "&a ", "*a", "&anchor {x: 1}", "<<: *a", "<<: {strategy: layerwise}", "!!python/object/apply:os.system ['true']",
    "!!binary aGVsbG8=", "!custom x", "!!set {a, b}", "!!omap [a: 1]", "!!timestamp 2001-12-14", "!!float",
    "!!str", "!!int 3", "1e999", "-1e999", ".nan", ".inf", "-.inf", "99999999999999999999999999999999999999",
    "0x7fffffffffffffffffff", "0o777", "1_000_000", "-0", "~", "null", "yes", "No", "on", "'", '"', '"\\x00"',
    "? [a, b]\n: c", "--- \n", "...\n", "%YAML 1.1\n---\n", "\t", "\x00", "\ufeff", "\u202e", "é", "💥",
    "[", "]", "{", "}", "- ", "|\n  block\n", ">-\n  folded\n", "#", ": ", ",", "@", "`",
]


def _long_string(rng: random.Random) -> str:
    return "x" * rng.choice([300, 5_000, 70_000])


def _deep(rng: random.Random) -> str:
    depth = rng.choice([10, 63, 65, 200, 2_000])
    if rng.random() < 0.5:
        return "[" * depth + "1" + "]" * depth
    return "{a: " * depth + "1" + "}" * depth


def _alias_bomb(rng: random.Random) -> str:
    levels = rng.choice([3, 4, 6, 9])                   # 10^levels values: the last two are refused
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    return "\n".join(lines) + "\n"


def _mutate_once(rng: random.Random, text: str) -> str:
    op = rng.randrange(10)
    lines = text.split("\n")
    if op == 0:                                         # flip bits in a few bytes
        raw = bytearray(text.encode("utf-8", errors="surrogateescape"))
        for _ in range(rng.randint(1, 4)):
            if raw:
                i = rng.randrange(len(raw))
                raw[i] ^= 1 << rng.randrange(8)
        return raw.decode("utf-8", errors="surrogateescape")
    if op == 1 and len(lines) > 1:                      # delete a line
        del lines[rng.randrange(len(lines))]
        return "\n".join(lines)
    if op == 2:                                         # duplicate a line
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
        return "\n".join(lines)
    if op == 3:                                         # swap a key with another key of the corpus
        hits = list(_KEY_RE.finditer(text))
        if hits:
            m = rng.choice(hits)
            return text[:m.start()] + rng.choice(KEYS) + text[m.end():]
    if op == 4:                                         # swap a value with another value of the corpus
        hits = list(_VALUE_RE.finditer(text))
        if hits:
            m = rng.choice(hits)
            return text[:m.start()] + rng.choice(VALUES) + text[m.end():]
    if op == 5:                                         # indentation changes
        i = rng.randrange(len(lines))
        r = rng.random()
        if r < 0.45:
            lines[i] = " " * rng.choice([1, 2, 3, 4, 8]) + lines[i]
        elif r < 0.9:
            lines[i] = lines[i].lstrip(" ")
        else:
            lines[i] = rng.choice(["\t", "  \t"]) + lines[i].lstrip(" ")
        return "\n".join(lines)
    if op == 6:                                         # a YAML special at a random place
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice(SPECIALS) + text[i:]
    if op == 7:                                         # a special as a value of an existing key
        hits = list(_VALUE_RE.finditer(text))
        if hits:
            m = rng.choice(hits)
            special = rng.choice(SPECIALS + [_long_string(rng), _deep(rng)])
            return text[:m.start()] + special + text[m.end():]
    if op == 8:                                         # anchors and aliases, merge keys, bombs
        kind = rng.randrange(25)
        if kind == 0:                                   # rare: a refused bomb costs ~0.1 s (0.5 s traced)
            return _alias_bomb(rng) + text
        if kind % 3 == 0:
            return text.replace("pipeline:", "pipeline: &p", 1) + "\nextra: *p\n"
        if kind % 3 == 1:
            return text + "\nbase: &b {strategy: layerwise}\ncomponents2:\n  transformer:\n    <<: *b\n"
        return text.replace("device: cuda", "device: *missing", 1)
    if op == 9:                                         # a new key with a wild value
        i = rng.randrange(len(lines) + 1)
        key = rng.choice(KEYS)
        value = rng.choice(VALUES + SPECIALS + [_long_string(rng), _deep(rng), "[" + ", ".join(KEYS) + "]"])
        lines.insert(i, " " * rng.choice([0, 0, 2]) + f"{key}: {value}")
        return "\n".join(lines)
    return text + rng.choice(SPECIALS)


def _mutant(i: int) -> tuple[str, str | bytes]:
    """Input number ``i``: (file name, text or bytes); deterministic."""
    rng = random.Random(SEED * 100_003 + i)
    name = rng.choice(sorted(CORPUS))
    text = CORPUS[name]
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        text = _mutate_once(rng, text)
    try:
        data: str | bytes = text.encode("utf-8")
    except UnicodeEncodeError:                          # lone surrogates from a byte flip
        data = text.encode("utf-8", errors="surrogateescape")
    return name, data


# diagnostics each kind of mutation must have produced at least once
MARKERS = ["invalid YAML", "not valid UTF-8", "merge keys", "more than 100000 values", "nested deeper than",
           "unsupported YAML tag", "duplicate key", "unknown key", "tab character", "is not a valid"]

DIAG_RE = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>\S.*)$", re.S)


def _check_error(exc: SpecError, file: str, data: bytes) -> None:
    assert exc.diagnostics, "a SpecError without diagnostics"
    n_lines = data.count(b"\n") + 1
    for d in exc.diagnostics:
        assert d.severity == "error", d
        text = d.format()
        m = DIAG_RE.match(text)
        assert m, f"malformed diagnostic: {text!r}"
        assert m["file"] == file, text
        line, col = int(m["line"]), int(m["col"])
        assert line >= 1 and col >= 1, text
        assert line == d.line and col == d.column, text
        assert line <= n_lines + 1, f"line {line} is past the end of a {n_lines}-line file: {text[:200]}"


def _check_plan(plan) -> None:
    text = plan.to_json()
    errors = list(PLAN_VALIDATOR.iter_errors(json.loads(text)))
    assert not errors, errors[0].message
    for cp in plan.components.values():
        if cp.strategy == "layerwise":
            assert cp.prefetch is not None and cp.prefetch >= 1
            assert all(0 <= i < max(cp.layer_count, 1) for i in cp.resident_layers)


def test_corpus_is_valid_and_the_mutators_have_material():
    assert len(CORPUS) >= 5
    valid = 0
    for name, text in CORPUS.items():
        try:
            _check_plan(make_plan(load_text(text, name)))
            valid += 1
        except SpecError as exc:   # a spec of a pipeline folder that is not built here (CI without files)
            assert "pipeline folder not found" in str(exc), exc
    assert valid >= 5
    assert {"pipeline", "model", "offload", "components", "strategy", "device"} <= set(KEYS)
    assert {"cuda", "bfloat16", "resident", "cpu_offload"} <= set(VALUES)


def test_mutated_configs_end_in_a_plan_or_clear_errors():
    counts = {"valid": 0, "invalid": 0}
    kinds: dict[str, int] = {}
    markers = dict.fromkeys(MARKERS, 0)
    biggest = (0, -1)
    started = time.perf_counter()
    tracemalloc.start()
    try:
        for i in range(N_INPUTS):
            file, data = _mutant(i)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                plan = make_plan(load_text(data, file))
            except SpecError as exc:
                peak = tracemalloc.get_traced_memory()[1] - base
                _check_error(exc, file, data)
                counts["invalid"] += 1
                first = exc.diagnostics[0].message.split(":")[0].split(";")[0][:40]
                kinds[first] = kinds.get(first, 0) + 1
                text = str(exc)
                for marker in MARKERS:
                    if marker in text:
                        markers[marker] += 1
            except Exception as exc:  # noqa: BLE001 - the fuzzer's finding: report the input
                raise AssertionError(f"input {i} ({file}) raised {type(exc).__name__}: {exc}\n"
                                     f"--- input ---\n{data[:2000]!r}") from exc
            else:
                peak = tracemalloc.get_traced_memory()[1] - base
                _check_plan(plan)
                counts["valid"] += 1
            assert peak < MEMORY_BOUND_MB << 20, f"input {i} ({file}) peaked at {peak / 2**20:.1f} MiB"
            biggest = max(biggest, (peak, i))
    finally:
        tracemalloc.stop()
    total = counts["valid"] + counts["invalid"]
    print(f"\nfuzz: {total} inputs, {counts['valid']} valid plans, {counts['invalid']} SpecErrors, "
          f"{time.perf_counter() - started:.1f} s; largest peak input {biggest[1]} ({biggest[0] / 2**20:.1f} MiB)")
    for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {n:5d}  {kind}")
    assert total == N_INPUTS
    # every family of hostile input was produced and refused with its own diagnostic
    assert all(markers.values()), markers
    # both outcomes are common: the mutations are neither all fatal nor all harmless
    assert counts["valid"] >= N_INPUTS // 20, counts
    assert counts["invalid"] >= N_INPUTS // 5, counts


def test_mutants_are_deterministic():
    assert [_mutant(i) for i in (0, 7, 1234)] == [_mutant(i) for i in (0, 7, 1234)]
    # and distinct enough to be worth running
    assert len({_mutant(i)[1] for i in range(200)}) > 150


def test_a_valid_mutant_plans_to_the_same_bytes_twice():
    seen = 0
    for i in range(N_INPUTS):
        file, data = _mutant(i)
        try:
            first = make_plan(load_text(data, file)).to_json()
        except SpecError:
            continue
        assert make_plan(load_text(data, file)).to_json() == first, i
        seen += 1
        if seen == 25:
            break
    assert seen == 25


def test_regressions_found_by_the_fuzzer():
    """Inputs that once escaped as other exceptions: an explicit tag over a value it cannot read
    (PyYAML's IndexError/ValueError) and a profile that is neither built in nor a file."""
    base = "version: 1\npipeline: {model: z-image-turbo}\n"
    for text, where in [(base + "device: !!float\n", (3, 9)), (base + "device: !!int abc\n", (3, 9)),
                        (base + "workload: {steps: !!bool maybe}\n", (3, 19)),
                        (base + "profile: cuda\n", (3, 10)), (base + "profile: .\n", (3, 10))]:
        try:
            make_plan(load_text(text, "r.yaml"))
        except SpecError as exc:
            _check_error(exc, "r.yaml", text.encode())
            assert (exc.diagnostics[0].line, exc.diagnostics[0].column) == where, exc
        else:
            raise AssertionError(f"no SpecError for {text!r}")
