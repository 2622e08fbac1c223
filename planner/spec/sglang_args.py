"""From SGLang server arguments (flags or a ``--config`` file) to an equivalent deployment spec.

SGLang drops arguments it does not know; here every argument is either translated or reported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from planner.errors import SpecError
from planner.spec.document import load_text, read_file
from planner.spec.offload_flags import (
    DEFAULT_SGLANG_SEMANTICS,
    LTX2_TWO_STAGE_DEVICE_MODES,
    OFFLOAD_FLAGS,
    PERFORMANCE_MODES,
    RESIDENCY_MODES,
    RESIDENCY_POLICIES,
    SGLANG_SEMANTICS,
)
from planner.spec.sizes import parse_size

# Hugging Face repository ids of the catalog's models, for --model-path.
HF_MODEL_IDS = {
    "tongyi-mai/z-image-turbo": "z-image-turbo",
    "black-forest-labs/flux.1-dev": "flux.1-dev",
    "qwen/qwen-image": "qwen-image",
    "wan-ai/wan2.2-t2v-a14b-diffusers": "wan2.2-t2v-a14b",
    "wan-ai/wan2.2-t2v-a14b": "wan2.2-t2v-a14b",
    "stabilityai/stable-diffusion-3.5-large": "sd3.5-large",
    "lightricks/ltx-2": "ltx-2",
}
_BOOL_FLAGS = {name for name, kind, _ in OFFLOAD_FLAGS if kind == "bool"}
_LIST_FLAGS = {"layerwise_offload_components", "layerwise_offload_modules"}   # argparse nargs="+"
_PAIR_FLAGS = {"component_residency"}     # COMPONENT=MODE values, one or more, the flag repeatable
# SGLang's StoreBoolean takes the flag alone (true) or 'true' / 'false' in any case, and nothing else.
_TRUE = {"true"}
_FALSE = {"false"}
# SGLang's own spellings that write the same server argument (argparse dest).
_ALIASES = {"mode": "performance_mode"}
# Options of from-sglang itself (not SGLang's): facts SGLang reads from the device.
_OWN_OPTIONS = {"gpu_memory", "gpu_memory_available"}
# from-sglang's own choice of which SGLang the flags mean (offload.sglang_semantics)
_SEMANTICS_OPTION = "sglang_semantics"
# later SGLang's per-component maps (#35688): one str argument, COMPONENT=VALUE[,COMPONENT=VALUE...] or a
# JSON object; a --config file may give a mapping
_TUNING_FLAGS = {"layerwise_prefetch_size": "number", "layerwise_resident_layers": "number",
                 "layerwise_residency_policy": "policy"}
# Precisions SGLang names (--dit-precision) and this project's dtypes, for --dtype / --dit-precision.
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
           "fp32": "float32", "float32": "float32", "float": "float32"}
# Residency flags of SGLang releases after 416fdbb that are not translated (flag -> pull request); every
# one users write now is: --component-residency (#34736), --dit-layerwise-resident-layers (#31538),
# --dit-layerwise-residency-policy (#34534), --layerwise-prefetch-size, --layerwise-resident-layers and
# --layerwise-residency-policy (#35688).
LATER_FLAGS: dict[str, str] = {}


class SGLangArgsError(ValueError):
    """An argument that cannot be translated. ``key``: the server argument it is about (its place is
    in the ``places`` that ``parse_args`` filled); ``usage``: the argument list itself is malformed
    (exit 2); ``diagnostics``: located errors of a ``--config`` file."""

    def __init__(self, message: str, *, key: str | None = None, usage: bool = False,
                 diagnostics: tuple = (), token: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.token = token
        self.usage = usage
        self.diagnostics = diagnostics


# flags that take exactly one value: given alone, they are a usage error
_VALUE_FLAGS = {"config", "model_path", "dtype", "dit_precision", "performance_mode", "num_gpus",
                "dit_offload_prefetch_size", "dit_layerwise_resident_layers", "dit_layerwise_residency_policy",
                "pipeline_class_name", "ltx2_two_stage_device_mode",
                _SEMANTICS_OPTION} | _OWN_OPTIONS | set(_TUNING_FLAGS)


@dataclass
class Translation:
    spec: dict[str, Any]
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").lower()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv: Sequence[str], places: dict[str, Any] | None = None) -> dict[str, Any]:
    """SGLang-style arguments into a mapping, as SGLang's argparse reads them: ``--flag value``,
    ``--flag=value``, boolean flags alone or with true/false, list flags with one or more values
    (``--layerwise-offload-components transformer text_encoder``); a ``--config`` file first, its
    values as YAML gives them (a list stays a list), the command line over it. ``places``, when
    given, gets each argument's place: ``(index in argv,)`` for a flag, ``(file, line, column)`` for
    a config file's key."""
    cli: dict[str, Any] = {}
    cli_places: dict[str, Any] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise SGLangArgsError(f"expected a --flag, got '{item}'", usage=True, token=item)
        name, eq, inline = item.partition("=")
        key = _key(name)
        key = _ALIASES.get(key, key)
        if not key:
            raise SGLangArgsError(f"expected a --flag, got '{item}'", usage=True, token=item)
        cli_places[key] = (i,)
        i += 1
        values: list[str] = []
        if eq:
            values = [inline]
        else:
            while i < len(items) and not (items[i].startswith("-") and not _is_number(items[i])):
                values.append(items[i])
                i += 1
                if key not in _LIST_FLAGS and key in _BOOL_FLAGS | _VALUE_FLAGS:
                    break
        if key in _VALUE_FLAGS and not values and not eq:
            raise SGLangArgsError(f"{name} needs a value", usage=True, token=item)
        if key in _PAIR_FLAGS:
            if not values:
                raise SGLangArgsError(f"{name} expects one or more COMPONENT=MODE values", usage=True, token=item)
            cli[key] = list(cli.get(key, [])) + values
        elif key in _LIST_FLAGS:
            if not values:
                raise SGLangArgsError(f"{name} expects one or more component names", usage=True, token=item)
            if key in cli or ({"layerwise_offload_components", "layerwise_offload_modules"} & set(cli)):
                # one argparse destination: the later spelling wins
                cli.pop("layerwise_offload_components", None)
                cli.pop("layerwise_offload_modules", None)
            cli[key] = values
        elif key in _BOOL_FLAGS:
            if len(values) > 1:
                raise SGLangArgsError(f"{name} takes at most one value (true or false), got {' '.join(values)}",
                                      key=key)
            try:
                cli[key] = _as_bool(key, values[0]) if values else True
            except SGLangArgsError as exc:
                if places is not None:
                    places.update(cli_places)
                raise SGLangArgsError(str(exc), key=key) from None
        else:
            cli[key] = (values[0] if len(values) == 1 else values) if values else True
    args: dict[str, Any] = {}
    if places is not None:
        places.update(cli_places)
    if "config" in cli:
        config = cli.pop("config")
        if not isinstance(config, str):
            raise SGLangArgsError("--config takes one file name", key="config", usage=True)
        args.update(_read_config(config, places))
    args.update(cli)
    if places is not None:
        places.update({k: v for k, v in cli_places.items() if k != "config"})
    return args


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_config(path: str, places: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``--config`` file, read as a deployment spec is: a regular file of at most 1 MiB, safe
    YAML with nesting and alias expansion bounded, errors at their place."""
    what = "an SGLang config"
    try:
        doc = load_text(read_file(path, what), path, what=what)
    except SpecError as exc:
        raise SGLangArgsError("; ".join(d.format() for d in exc.diagnostics),
                              diagnostics=exc.diagnostics) from None
    out: dict[str, Any] = {}
    for k, v in doc.data.items():
        key = _ALIASES.get(_key(str(k)), _key(str(k)))
        out[key] = v
        if places is not None:
            places[key] = (path, *doc.position((k,), key=True))
    return out


def _as_bool(name: str, value: Any) -> bool:
    """SGLang's StoreBoolean: 'true' or 'false' in any case; yes, on and 1 are refused."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SGLangArgsError(f"{_flag(name)} expects true or false, got '{value}' (SGLang refuses anything else)")


def _prefetch(value: Any) -> float | int:
    if isinstance(value, bool):
        raise SGLangArgsError(f"--dit-offload-prefetch-size expects a number, got '{value}'")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SGLangArgsError(f"--dit-offload-prefetch-size expects a number, got '{value}'") from None
    if not math.isfinite(number):
        raise SGLangArgsError(f"--dit-offload-prefetch-size must be a finite number, got '{value}' (SGLang fails "
                              "on it: it floors every value above 1 to an integer)")
    return int(number) if number.is_integer() and "." not in str(value) and "e" not in str(value).lower() else number


def _residency_pairs(value: Any) -> dict[str, str]:
    """--component-residency values (``COMPONENT=MODE`` words, or a mapping from a config file) as the
    offload section's mapping; a later pair for the same key wins, as later assignments do in SGLang."""
    items: list[tuple[Any, Any]]
    if isinstance(value, dict):
        items = list(value.items())
    else:
        words = [value] if isinstance(value, str) else value
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise SGLangArgsError(f"--component-residency expects COMPONENT=MODE values, got {value!r}")
        items = []
        for word in words:
            key, eq, mode = word.partition("=")
            if not eq or not key.strip():
                raise SGLangArgsError(f"--component-residency expects COMPONENT=MODE, got '{word}'")
            items.append((key, mode))
    out: dict[str, str] = {}
    for key, mode in items:
        if not isinstance(key, str) or not isinstance(mode, str):
            raise SGLangArgsError(f"--component-residency expects COMPONENT=MODE, got {key!r}: {mode!r}")
        mode = mode.strip().lower().replace("_", "-")
        if mode not in RESIDENCY_MODES:
            raise SGLangArgsError(f"--component-residency {key}={mode}: the mode is one of "
                                  f"{', '.join(RESIDENCY_MODES)}")
        out[key.strip().lower().replace("-", "_")] = mode
    return out


def _shown(value: Any, limit: int = 80) -> str:
    """A value as a message shows it: long ones cut, with their length."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _finite(flag: str, value: Any) -> float:
    """A number as SGLang's float() reads it; what it cannot use is refused here."""
    if isinstance(value, bool):
        raise SGLangArgsError(f"{flag} expects a number, got '{value}'")
    try:
        number = float(str(value).strip())
    except ValueError:
        raise SGLangArgsError(f"{flag} expects a number, got '{_shown(value)}'") from None
    if not math.isfinite(number):
        raise SGLangArgsError(f"{flag} must be a finite number, got '{_shown(value)}' (SGLang fails on it when it "
                              "counts the layers)")
    return number


def _plain(number: float) -> float | int:
    return int(number) if number.is_integer() else number


def _resident_layers(value: Any, notes: list[str]) -> float | int:
    """--dit-layerwise-resident-layers (#31538; type float): a fraction of each list below 1, a count from 1
    (SGLang floors a fractional count with a message); negative refused, as SGLang's _validate_offload does."""
    number = _finite("--dit-layerwise-resident-layers", value)
    if number < 0:
        raise SGLangArgsError(f"--dit-layerwise-resident-layers must be 0 or more, got '{value}' (SGLang refuses it)")
    if number >= 1 and not number.is_integer():
        notes.append(f"--dit-layerwise-resident-layers {value}: SGLang truncates a count to {math.floor(number)}")
        number = float(math.floor(number))
    return _plain(number)


def _policy(flag: str, value: Any) -> str:
    """A residency policy, spelled exactly (argparse choices and _validate_offload compare, never strip)."""
    text = value
    if text not in RESIDENCY_POLICIES:
        raise SGLangArgsError(f"{flag} expects one of {', '.join(RESIDENCY_POLICIES)}, got '{_shown(value)}' "
                              "(SGLang refuses anything else)")
    return text


def _tuning_map(name: str, value: Any, notes: list[str]) -> dict[str, float | int | str]:
    """A per-component map of #35688 as SGLang's _parse_component_value_map reads it: a mapping (from a
    config file), a JSON object, or COMPONENT=VALUE entries split on commas; keys and values stripped,
    keys taken as exact component names."""
    flag = _flag(name)
    items: list[tuple[Any, Any]]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, str):
        items = []
        try:
            parsed = json.loads(value) if value.lstrip().startswith("{") else None
        except (ValueError, RecursionError):       # not JSON (or nested past reading): taken as entries
            parsed = None
        if isinstance(parsed, dict):
            items = list(parsed.items())
        else:
            for pair in value.split(","):
                pair = pair.strip()
                if not pair:
                    continue
                if "=" not in pair:
                    raise SGLangArgsError(f"{flag} must use COMPONENT=VALUE entries, got '{_shown(pair)}' (SGLang "
                                          "refuses it)")
                key, entry = pair.split("=", 1)
                items.append((key.strip(), entry.strip()))
    else:
        raise SGLangArgsError(f"{flag} expects COMPONENT=VALUE entries, got {_shown(repr(value))}")
    out: dict[str, float | int | str] = {}
    for key, entry in items:
        key = str(key)
        if not key:
            raise SGLangArgsError(f"{flag}: an entry has no component name")
        if _TUNING_FLAGS[name] == "policy":
            out[key] = _policy(f"{flag} {_shown(key)}=", str(entry))
            continue
        number = _finite(f"{flag} {_shown(key)}=", entry)
        if number < 0:
            what = "prefetches 1 layer" if name == "layerwise_prefetch_size" else "keeps no layer resident"
            notes.append(f"{flag} {key}={entry}: SGLang {what} for a negative value; written as 0, which means the "
                         "same")
            number = 0.0
        out[key] = _plain(number)
    return out


def _selection_value(name: str, value: Any) -> str | list[str]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, str):
        return value
    raise SGLangArgsError(f"{_flag(name)} expects component names, got {value!r}", key=name)


def translate(args: dict[str, Any]) -> Translation:
    """An equivalent spec. What is not a residency setting of SGLang at 416fdbb is listed in ``ignored``.
    An ``SGLangArgsError`` names (``key``) the argument it is about."""
    current: list[str] = []
    try:
        return _translate(args, current)
    except SGLangArgsError as exc:
        if exc.key is None and current:
            raise SGLangArgsError(str(exc), key=current[-1], usage=exc.usage) from None
        raise


def _translate(args: dict[str, Any], current: list[str]) -> Translation:
    spec: dict[str, Any] = {"version": 1}
    ignored: list[str] = []
    notes: list[str] = []
    args = dict(args)
    if "model_path" in args and not isinstance(args["model_path"], str):
        raise SGLangArgsError(f"--model-path expects a path or a Hugging Face repository id, got "
                              f"{args['model_path']!r}", key="model_path")
    model_path = args.pop("model_path", None)
    if model_path is None:
        spec["pipeline"] = {"model": "z-image-turbo"}
        ignored.append("(no --model-path given: pipeline.model set to z-image-turbo; edit it)")
    elif str(model_path).lower() in HF_MODEL_IDS:
        spec["pipeline"] = {"model": HF_MODEL_IDS[str(model_path).lower()]}
    else:
        spec["pipeline"] = {"path": str(model_path)}
    for dkey in ("dtype", "dit_precision"):
        if dkey not in args:
            continue
        current.append(dkey)
        dtype = args.pop(dkey)
        if str(dtype).lower() not in _DTYPES:
            raise SGLangArgsError(f"{_flag(dkey)} expects one of {', '.join(sorted(_DTYPES))}, got '{dtype}'")
        spec["pipeline"]["dtype"] = _DTYPES[str(dtype).lower()]
        if dkey == "dtype":
            notes.append("--dtype is not an SGLang server argument at 416fdbb (its precisions are --dit-precision, "
                         "--vae-precision, --text-encoder-precisions); taken as pipeline.dtype")
    offload: dict[str, Any] = {}
    for name, value in args.items():
        current.append(name)
        if name in _BOOL_FLAGS:
            if not isinstance(value, bool):
                if isinstance(value, str):
                    value = _as_bool(name, value)
                else:
                    notes.append(f"{name}: {value!r} from the config file is taken as SGLang takes it, "
                                 f"{'true' if value else 'false'} (config values are not checked)")
                    value = bool(value)
            offload[name] = value
        elif name in _LIST_FLAGS:
            offload[name] = _selection_value(name, value)
        elif name == "dit_offload_prefetch_size":
            offload[name] = _prefetch(value)
        elif name in _PAIR_FLAGS:
            offload[name] = _residency_pairs(value)
        elif name == "dit_layerwise_resident_layers":
            offload[name] = _resident_layers(value, notes)
        elif name == "dit_layerwise_residency_policy":
            offload[name] = _policy("--dit-layerwise-residency-policy", value)
        elif name in _TUNING_FLAGS:
            offload[name] = _tuning_map(name, value, notes)
        elif name == _SEMANTICS_OPTION:
            if str(value) not in SGLANG_SEMANTICS:
                raise SGLangArgsError(f"--sglang-semantics expects one of {', '.join(SGLANG_SEMANTICS)}, got "
                                      f"'{value}'")
            offload[name] = str(value)
        elif name == "performance_mode":
            mode = str(value).lower()
            if mode not in PERFORMANCE_MODES:
                raise SGLangArgsError(f"--performance-mode expects one of {', '.join(PERFORMANCE_MODES)}, got '{value}'")
            offload[name] = mode
        elif name == "pipeline_class_name":
            # argparse type=str: one word (a --config value becomes its text)
            if isinstance(value, (list, dict)) or value is None or value is True or str(value) == "":
                raise SGLangArgsError(f"--pipeline-class-name expects a pipeline class name, got '{_shown(value)}'")
            offload[name] = str(value)
        elif name == "ltx2_two_stage_device_mode":
            # argparse choices: checked as written, before SGLang lower-cases it
            if str(value) not in LTX2_TWO_STAGE_DEVICE_MODES:
                raise SGLangArgsError(f"--ltx2-two-stage-device-mode expects one of "
                                      f"{', '.join(LTX2_TWO_STAGE_DEVICE_MODES)}, got '{_shown(value)}'")
            offload[name] = str(value)
        elif name == "num_gpus":
            try:
                count = int(str(value))
            except ValueError:
                raise SGLangArgsError(f"--num-gpus expects an integer, got '{value}'") from None
            if count < 1:
                raise SGLangArgsError(f"--num-gpus expects at least 1, got {count}")
            offload[name] = count
        elif name in _OWN_OPTIONS:
            try:
                parse_size(value)
            except ValueError as exc:
                raise SGLangArgsError(f"{_flag(name)}: {exc}") from None
            offload[name] = value
        elif name in LATER_FLAGS:
            ignored.append(f"{_flag(name)} (later SGLang, {LATER_FLAGS[name]}; not in 416fdbb, not translated)")
        else:
            ignored.append(_flag(name))
    if offload.get(_SEMANTICS_OPTION, DEFAULT_SGLANG_SEMANTICS) != "25517" and _names_dit_token(offload):
        notes.append("the selection token 'dit' names the DiT group in SGLang after #25517; at 416fdbb it is a "
                     "component name no pipeline has (pass --sglang-semantics 25517 for the later meaning)")
    p = offload.get("dit_offload_prefetch_size")
    selects = bool(offload.get("dit_layerwise_offload")) or any(
        offload.get(k) not in (None, "", []) for k in _LIST_FLAGS)
    current.append("dit_offload_prefetch_size")
    if isinstance(p, (int, float)) and p < 0 and selects:
        raise SGLangArgsError(f"--dit-offload-prefetch-size cannot be negative when components are selected for "
                              f"layerwise offload (got {p}); SGLang refuses it")
    if offload:
        spec["offload"] = offload
    return Translation(spec=spec, ignored=ignored, notes=notes)


def _names_dit_token(offload: dict[str, Any]) -> bool:
    for key in _LIST_FLAGS:
        raw = offload.get(key)
        words = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        if any(part.strip().replace("-", "_").lower() == "dit" for w in words for part in str(w).split(",")):
            return True
    return False


def render_yaml(translation: Translation, schema_ref: str = "../schemas/deployment.schema.json") -> str:
    import yaml

    head = f"# yaml-language-server: $schema={schema_ref}\n# Translated from SGLang server arguments by residency-planner from-sglang.\n"
    if translation.ignored:
        head += "# Not residency settings, left out: " + ", ".join(translation.ignored) + "\n"
    for note in translation.notes:
        head += f"# Note: {note}\n"
    return head + yaml.safe_dump(translation.spec, sort_keys=False, default_flow_style=False)
