"""From SGLang server arguments (flags or a ``--config`` file) to an equivalent deployment spec.

SGLang drops arguments it does not know; here every argument is either translated or reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from planner.errors import SpecError
from planner.spec.document import load_text, read_file
from planner.spec.offload_flags import OFFLOAD_FLAGS

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
_VALUE_FLAGS = {name for name, kind, _ in OFFLOAD_FLAGS if kind != "bool"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class SGLangArgsError(ValueError):
    pass


@dataclass
class Translation:
    spec: dict[str, Any]
    ignored: list[str] = field(default_factory=list)


def _key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").lower()


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """SGLang-style ``--flag value`` / ``--flag`` / ``--flag=value`` into a mapping (config file merged first)."""
    args: dict[str, Any] = {}
    cli: dict[str, Any] = {}
    i = 0
    items = list(argv)
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise SGLangArgsError(f"expected a --flag, got '{item}'")
        if "=" in item:
            name, value = item.split("=", 1)
            cli[_key(name)] = value
            i += 1
            continue
        name = _key(item)
        nxt = items[i + 1] if i + 1 < len(items) else None
        if nxt is not None and not nxt.startswith("--"):
            cli[name] = nxt
            i += 2
        else:
            cli[name] = True
            i += 1
    if "config" in cli:
        args.update(_read_config(str(cli.pop("config"))))
    args.update(cli)
    return args


def _read_config(path: str) -> dict[str, Any]:
    """A ``--config`` file, read as a deployment spec is: a regular file of at most 1 MiB, safe
    YAML with nesting and alias expansion bounded, errors at their place."""
    what = "an SGLang config"
    try:
        data = load_text(read_file(path, what), path, what=what).data
    except SpecError as exc:
        raise SGLangArgsError("; ".join(d.format() for d in exc.diagnostics)) from None
    return {_key(str(k)): v for k, v in data.items()}


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SGLangArgsError(f"--{name.replace('_', '-')} expects true or false, got '{value}'")


def translate(args: dict[str, Any]) -> Translation:
    spec: dict[str, Any] = {"version": 1}
    ignored: list[str] = []
    model_path = args.pop("model_path", None)
    if model_path is None:
        spec["pipeline"] = {"model": "z-image-turbo"}
        ignored.append("(no --model-path given: pipeline.model set to z-image-turbo; edit it)")
    elif str(model_path).lower() in HF_MODEL_IDS:
        spec["pipeline"] = {"model": HF_MODEL_IDS[str(model_path).lower()]}
    else:
        spec["pipeline"] = {"path": str(model_path)}
    dtype = args.pop("dtype", None)
    if dtype in ("bfloat16", "float16", "float32"):
        spec["pipeline"]["dtype"] = dtype
    offload: dict[str, Any] = {}
    for name, value in args.items():
        if name in _BOOL_FLAGS:
            offload[name] = _as_bool(name, value)
        elif name in ("layerwise_offload_components", "layerwise_offload_modules"):
            offload[name] = str(value)
        elif name == "dit_offload_prefetch_size":
            try:
                offload[name] = float(value) if "." in str(value) else int(value)
            except ValueError:
                raise SGLangArgsError(f"--dit-offload-prefetch-size expects a number, got '{value}'") from None
        else:
            ignored.append(f"--{name.replace('_', '-')}")
    if offload:
        spec["offload"] = offload
    return Translation(spec=spec, ignored=ignored)


def render_yaml(translation: Translation, schema_ref: str = "../schemas/deployment.schema.json") -> str:
    import yaml

    head = f"# yaml-language-server: $schema={schema_ref}\n# Translated from SGLang server arguments by residency-planner from-sglang.\n"
    if translation.ignored:
        head += "# Not residency settings, left out: " + ", ".join(translation.ignored) + "\n"
    return head + yaml.safe_dump(translation.spec, sort_keys=False, default_flow_style=False)
