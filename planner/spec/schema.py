"""JSON Schema validation of a loaded spec, with jsonschema's messages rewritten for people.

Every error becomes ``FILE:LINE:COL: error: <what is wrong> (<where in the spec>)``; misspelt keys
get a "did you mean".
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from planner.errors import Diagnostic, SpecError, did_you_mean
from planner.files.bounded_read import load_json_file
from planner.spec.document import Document, PathKey
from planner.spec.sizes import parse_size

_SCHEMA_DIRS = (Path(__file__).parent.parent / "schemas", Path(__file__).parent.parent.parent / "schemas")


def schema_path(name: str) -> Path:
    for folder in _SCHEMA_DIRS:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"schema {name} not found in {', '.join(map(str, _SCHEMA_DIRS))}")


@lru_cache(maxsize=None)
def load_schema(name: str = "deployment.schema.json") -> dict[str, Any]:
    return load_json_file(schema_path(name), f"schema {name}")


def _ecma_pattern(pattern: str) -> str:
    """``pattern`` as ECMA-262 reads it (JSON Schema's dialect): ``$`` ends the string, where Python's
    ``$`` also matches before a final newline (``'cuda\\n'`` would pass ``^(cuda|cpu)$``)."""
    return re.sub(r"(?<!\\)\$", r"\\Z", pattern)


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Any:
    from jsonschema import ValidationError

    if validator.is_type(instance, "string") and not re.search(_ecma_pattern(pattern), instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@lru_cache(maxsize=None)
def _validator(name: str) -> Any:
    from jsonschema import Draft202012Validator, validators

    strict = validators.extend(Draft202012Validator, {"pattern": _pattern})
    return strict(load_schema(name))


def _nul_strings(doc: Document, value: Any, path: PathKey = ()) -> Iterable[Diagnostic]:
    """A NUL character in a key or a string: no file name, device or name holds one."""
    if isinstance(value, str):
        if "\0" in value:
            yield doc.diagnostic(path, "contains a NUL character (\\0)")
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and "\0" in key:
                yield doc.diagnostic(path + (key,), "key contains a NUL character (\\0)", key=True)
            yield from _nul_strings(doc, item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _nul_strings(doc, item, path + (i,))


def validate_document(doc: Document, schema: str = "deployment.schema.json") -> list[Diagnostic]:
    """Schema errors of ``doc``, one per problem, sorted by position."""
    errors = list(_validator(schema).iter_errors(doc.data))
    diags: list[Diagnostic] = []
    seen: set[tuple[int, int, str]] = set()
    for diag in _nul_strings(doc, doc.data):
        seen.add((diag.line, diag.column, diag.message))
        diags.append(diag)
    if schema == "deployment.schema.json":
        diags.extend(_unparsable_sizes(doc, {tuple(e.absolute_path) for e in errors}))
    for err in errors:
        for diag in _rewrite(doc, err):
            key = (diag.line, diag.column, diag.message)
            if key not in seen:
                seen.add(key)
                diags.append(diag)
    diags.sort(key=lambda d: (d.line, d.column))
    return diags


_SIZE_KEYS = (("memory", "gpu_budget"), ("memory", "host_budget"), ("memory", "margin"),
              ("offload", "gpu_memory"), ("offload", "gpu_memory_available"))


def _unparsable_sizes(doc: Document, flagged: set[tuple[Any, ...]]) -> Iterable[Diagnostic]:
    """Sizes the schema's pattern lets through that are no number of bytes (400 digits and a unit)."""

    data = doc.data if isinstance(doc.data, dict) else {}
    for section, key in _SIZE_KEYS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if value is None or (section, key) in flagged or isinstance(value, bool) or not isinstance(value, (int, str)):
            continue
        try:
            parse_size(value)
        except ValueError as exc:
            yield doc.diagnostic((section, key), str(exc))


def check_document(doc: Document, schema: str = "deployment.schema.json") -> None:
    diags = validate_document(doc, schema)
    if diags:
        raise SpecError(diags)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string '{value}'"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "null"}


def _is_size_schema(schema: dict[str, Any]) -> bool:
    return "oneOf" in schema and "Bytes" in str(schema.get("description", ""))


def _is_strategy_or_entry(schema: dict[str, Any]) -> bool:
    branches = schema.get("oneOf", [])
    return len(branches) == 2 and "enum" in branches[0] and branches[1].get("type") == "object"


def _rewrite(doc: Document, err: Any) -> Iterable[Diagnostic]:
    path: PathKey = tuple(err.absolute_path)
    kw = err.validator
    inst = err.instance
    schema = err.schema

    if kw == "additionalProperties" and isinstance(inst, dict):
        allowed = list(schema.get("properties", {}))
        for key in inst:
            if key not in allowed:
                hint = did_you_mean(key, allowed) or (f"; allowed here: {', '.join(allowed)}" if allowed else "")
                yield doc.diagnostic(path + (key,), f"unknown key '{key}'{hint}", key=True)
        return
    if kw == "required":
        missing = [k for k in schema.get("required", []) if k not in inst]
        for key in missing:
            yield doc.diagnostic(path, f"missing required key '{key}'")
        return
    if kw == "const":
        yield doc.diagnostic(path, f"must be {json.dumps(err.validator_value)}, got {_describe(inst)}")
        return
    if kw == "enum":
        options = list(dict.fromkeys(str(o) for o in err.validator_value))
        hint = did_you_mean(str(inst), options) if isinstance(inst, str) else ""
        yield doc.diagnostic(path, f"{_describe(inst)} is not allowed here; expected one of "
                                   f"{', '.join(options)}{hint}")
        return
    if kw == "type":
        expected = err.validator_value
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in (expected if isinstance(expected, list) else [expected]))
        yield doc.diagnostic(path, f"must be {words}, got {_describe(inst)}")
        return
    if kw == "minimum":
        if path and (path[-1] in ("prefetch", "dit_offload_prefetch_size") or path[-2:-1] == ("layerwise_prefetch_size",)):
            yield doc.diagnostic(path, f"prefetch cannot be negative (got {inst})")
        else:
            yield doc.diagnostic(path, f"must be at least {err.validator_value}, got {inst}")
        return
    if kw == "pattern":
        if path and path[-1] == "device":
            yield doc.diagnostic(path, f"device '{inst}' is not valid; expected cuda, cuda:N or cpu")
        else:
            yield doc.diagnostic(path, f"'{inst}' is not a valid value here")
        return
    if kw == "uniqueItems":
        yield doc.diagnostic(path, "lists the same item twice")
        return
    if kw in ("minItems", "minProperties", "minLength"):
        yield doc.diagnostic(path, "must not be empty")
        return
    if kw == "oneOf":
        yield from _rewrite_one_of(doc, err, path)
        return
    yield doc.diagnostic(path, err.message)


def _rewrite_one_of(doc: Document, err: Any, path: PathKey) -> Iterable[Diagnostic]:
    inst = err.instance
    schema = err.schema
    if path == ("pipeline",) and isinstance(inst, dict):
        given = [k for k in ("model", "path", "components") if k in inst]
        if not given:
            yield doc.diagnostic(path, "pipeline needs one of 'model', 'path' or 'components'")
        else:
            yield doc.diagnostic(path + (given[1],), f"pipeline gives both '{given[0]}' and '{given[1]}'; "
                                                    "give exactly one", key=True)
        return
    if _is_size_schema(schema):
        yield doc.diagnostic(path, f"{_describe(inst)} is not a size; use bytes (an integer) or "
                                   "a number with a unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
        return
    if _is_strategy_or_entry(schema):
        if isinstance(inst, dict):
            sub_errors = [e for e in err.context if e.schema_path and e.schema_path[0] == 1]
        else:
            sub_errors = [e for e in err.context if e.schema_path and e.schema_path[0] == 0]
        if sub_errors:
            for sub in sub_errors:
                yield from _rewrite(doc, sub)
            return
        yield doc.diagnostic(path, f"must be a strategy name or a mapping, got {_describe(inst)}")
        return
    if schema.get("oneOf") and all("type" in b for b in schema["oneOf"]):
        kinds = " or ".join(_TYPE_WORDS.get(b["type"], b["type"]) for b in schema["oneOf"])
        matching = [e for e in err.context if e.validator != "type"]
        if matching:
            for sub in matching:
                yield from _rewrite(doc, sub)
            return
        yield doc.diagnostic(path, f"must be {kinds}, got {_describe(inst)}")
        return
    yield doc.diagnostic(path, f"not valid: {err.message}")
