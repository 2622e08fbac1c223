"""Arguments of a pipeline's ``__call__``, typed and checked against its signature.

``run`` takes any argument of the pipeline's ``__call__`` (``--set name=value``, a prompts file's
JSON keys) and a few common ones as flags. Each is checked here before the pipeline runs: the name
must be an explicit parameter of ``__call__`` (a name that only ``**kwargs`` would swallow is
refused, it would be ignored), the value must fit the parameter's annotation (``int``, ``float``,
``bool``, ``str``, lists, unions, ``None`` for an optional one); an argument named ``*image`` takes
a path and is read as an RGB image. A problem is a ``CallArgError`` with a place
(``FILE:LINE:COL: error: message``), never a traceback.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import shlex
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from planner.errors import did_you_mean
from planner.files.bounded_read import (
    MAX_JSON_DEPTH,
    UnreadableFile,
    json_too_deep,
    load_json_file,
    read_bounded,
)

# set by ``run`` itself: giving them is an error
RESERVED = {
    "generator": "the seed is --seed",
    "callback_on_step_end": "run times the steps through it",
    "callback_on_step_end_tensor_inputs": "run times the steps through callback_on_step_end",
    "return_dict": "run reads the pipeline's output object",
}
# ``--num-images`` is whichever of these the pipeline takes
COUNT_NAMES = ("num_images_per_prompt", "num_videos_per_prompt", "num_waveforms_per_prompt")

MAX_IMAGE_BYTES = 64 << 20       # an input image: a PNG of 8192 x 8192 is some 200 MB raw, far less compressed
_NONE_WORDS = {"none", "null"}
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclass(frozen=True)
class Place:
    file: str
    line: int = 1
    column: int = 1


class CallArgError(Exception):
    """A call argument the pipeline cannot take; ``format()`` is ``FILE:LINE:COL: error: message``."""

    def __init__(self, place: Place, message: str) -> None:
        super().__init__(message)
        self.place = place
        self.message = message

    def format(self) -> str:
        return f"{self.place.file}:{self.place.line}:{self.place.column}: error: {self.message}"


def command_line_place(token: str, offset: int = 0) -> Place:
    """Where ``token`` sits on this process's command line (``<command line>:1:COL``); column 1
    when it cannot be found there (``main`` called with an argument list)."""
    line = shlex.join(sys.argv[1:]) if len(sys.argv) > 1 else ""
    quoted = shlex.quote(token)
    match = re.search(r"(?:^|(?<= ))" + re.escape(quoted) + r"(?= |$)", line)   # a whole word of the line
    index = match.start() if match else line.find(quoted)
    if index < 0:
        return Place("<command line>", 1, 1)
    return Place("<command line>", 1, index + 1 + offset + (1 if quoted != token else 0))


class Signature:
    """The parameters of a pipeline class's ``__call__``."""

    def __init__(self, pipeline_class: type) -> None:
        self.class_name = pipeline_class.__name__
        fn = pipeline_class.__call__
        fn = getattr(fn, "__wrapped__", fn)          # torch.no_grad() keeps the original here
        self.function = fn
        self.parameters: dict[str, inspect.Parameter] = {}
        self.var_keyword = False
        for name, param in inspect.signature(fn).parameters.items():
            if name == "self":
                continue
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                self.var_keyword = True
            elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
                self.parameters[name] = param

    def accepts(self, name: str) -> bool:
        """Whether ``name`` is an explicit parameter (not one that ``**kwargs`` would swallow)."""
        return name in self.parameters

    def default(self, name: str) -> Any:
        param = self.parameters.get(name)
        if param is None or param.default is inspect.Parameter.empty:
            return None
        return param.default

    def count_name(self) -> str | None:
        return next((n for n in COUNT_NAMES if n in self.parameters), None)

    def annotation(self, name: str) -> Any:
        ann = self.parameters[name].annotation
        if isinstance(ann, str):
            scope = dict(getattr(self.function, "__globals__", {}))
            scope.setdefault("typing", typing)
            try:
                ann = eval(ann, scope, {})           # noqa: S307 - the library's own annotation text
            except Exception:
                return Any
        return Any if ann is inspect.Parameter.empty else ann

    def describe(self, name: str) -> str:
        param = self.parameters[name]
        text = f"{name}: {_type_text(self.annotation(name))}"
        if param.default is not inspect.Parameter.empty:
            text += f" = {param.default!r}"
        return f"{self.class_name}.__call__({text})"

    def check_name(self, name: str, place: Place) -> None:
        if name in RESERVED:
            raise CallArgError(place, f"{name} is set by run ({RESERVED[name]})")
        if not self.accepts(name):
            known = [n for n in self.parameters if n not in RESERVED]
            extra = " (it takes **kwargs, which would ignore it)" if self.var_keyword else ""
            raise CallArgError(place, f"{self.class_name}.__call__ has no argument {name!r}{extra}"
                                      f"{did_you_mean(name, known)} (it takes: {', '.join(known)})")

    def typed(self, name: str, value: Any, place: Place, base: Path | None = None) -> Any:
        """``value`` (a command-line string, or a JSON value) as the parameter ``name`` takes it."""
        self.check_name(name, place)
        try:
            if _is_image_name(name) and isinstance(value, str):
                return load_image(value, base)
            return coerce(value, self.annotation(name))
        except _Mismatch as exc:
            raise CallArgError(place, f"{name}: {exc}; {self.describe(name)}") from None


class _Mismatch(Exception):
    pass


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def strict_json(text: str) -> Any:
    """``json.loads`` as the prompts file and ``--set`` read JSON: no NaN or Infinity, nesting
    measured first (a deep value is refused, not a ``RecursionError``), integers of any JSON length
    refused past Python's 4300 digits with a ``ValueError`` like any other bad value."""
    if json_too_deep(text, MAX_JSON_DEPTH) is not None:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:   # pragma: no cover - json_too_deep ran first
        raise ValueError("nested too deeply") from None


def _is_image_name(name: str) -> bool:
    return name == "image" or name.endswith("_image") or name in ("images", "last_image")


def load_image(path: str, base: Path | None = None) -> Any:
    """An RGB ``PIL.Image`` read from ``path`` (relative to ``base`` when given)."""
    import io

    from PIL import Image, UnidentifiedImageError

    full = Path(path) if base is None or Path(path).is_absolute() else base / path
    try:
        raw = read_bounded(full, MAX_IMAGE_BYTES, "image")    # a regular file, at most 64 MiB
    except UnreadableFile as exc:
        raise _Mismatch(f"image {str(full)!r}: {exc.reason}") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise _Mismatch(f"{str(full)!r} is not an image PIL can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _Mismatch(f"cannot read image {str(full)!r}: {exc}") from None


def _alternatives(ann: Any) -> list[Any]:
    origin = typing.get_origin(ann)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(ann):
            out.extend(_alternatives(arg))
        return out
    return [ann]


def _type_text(ann: Any) -> str:
    if ann is Any:
        return "Any"
    if isinstance(ann, type) and typing.get_origin(ann) is None:
        return ann.__name__ if ann is not type(None) else "None"
    alts = _alternatives(ann)
    if len(alts) > 1:
        return " | ".join(_type_text(a) for a in alts)
    text = str(ann).replace("typing.", "")
    return re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rpartition(".")[2], text)


def _scalar(text: str, kind: type) -> Any:
    if kind is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError
    if kind is int:
        return int(text)
    if kind is float:
        number = float(text)
        if not math.isfinite(number):       # 'nan', 'inf': no argument of a pipeline means them
            raise ValueError
        return number
    return text


def coerce(value: Any, ann: Any) -> Any:
    """``value`` converted to fit ``ann``; ``_Mismatch`` with what was expected otherwise."""
    alts = _alternatives(ann)
    optional = type(None) in alts
    alts = [a for a in alts if a is not type(None)]
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional or Any in alts:
            return None
        raise _Mismatch(f"cannot be None (takes {_type_text(ann)})")
    if Any in alts:
        return _any_value(value)
    errors: list[str] = []
    # numbers before strings ("3" for ``int | str`` is the int); a string before a list unless the
    # text is written as JSON ("a, b" for ``str | list[str]`` is the string)
    bracketed = isinstance(value, str) and value.lstrip()[:1] in ("[", "{")
    order = sorted(alts, key=lambda a: 0 if a in (bool, int, float) else (1 if bracketed else 3) if a is not str
                   else 2)
    for alt in order:
        try:
            return _coerce_one(value, alt)
        except (_Mismatch, ValueError, TypeError):
            errors.append(_type_text(alt))
    got = value if isinstance(value, str) else json.dumps(value)
    if len(got) > 200:
        got = got[:200] + f"... ({len(got)} characters)"
    raise _Mismatch(f"{got!r} is not {' or '.join(dict.fromkeys(errors))}")


def _any_value(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return strict_json(value)
    except ValueError:
        return value


def _coerce_one(value: Any, alt: Any) -> Any:
    origin = typing.get_origin(alt) or alt
    if alt in (bool, int, float, str):
        if isinstance(value, str):
            return _scalar(value, alt)
        if alt is bool and isinstance(value, bool):
            return value
        if alt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if alt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch(alt.__name__)
    if origin in (list, tuple, typing.List, typing.Tuple):
        items = value
        if isinstance(value, str):
            text = value.strip()
            items = strict_json(text) if text.startswith("[") else [v for v in text.split(",")]
        if not isinstance(items, list):
            raise _Mismatch("list")
        args = [a for a in typing.get_args(alt) if a is not Ellipsis]
        item_ann = args[0] if len(args) == 1 or (origin is tuple and len(args) >= 1) else Any
        out = [coerce(v, item_ann) for v in items]
        return tuple(out) if origin in (tuple, typing.Tuple) else out
    if origin in (dict, typing.Dict, Mapping):
        obj = strict_json(value) if isinstance(value, str) else value
        if not isinstance(obj, dict):
            raise _Mismatch("dict")
        return obj
    if isinstance(origin, type) and isinstance(value, origin) and not isinstance(value, str):
        return value
    raise _Mismatch(_type_text(alt))


def pipeline_class_of(folder: Path) -> type | None:
    """The diffusers pipeline class that ``folder``'s ``model_index.json`` names, or ``None``."""
    try:
        index = load_json_file(folder / "model_index.json", "model_index.json")
        import diffusers

        cls = getattr(diffusers, index["_class_name"], None)
    except Exception:
        return None
    return cls if isinstance(cls, type) and callable(getattr(cls, "__call__", None)) else None


def flag_arguments(args: Any, signature: Signature) -> list[tuple[str, Any, Place, str]]:
    """The named flags ``args`` gives, as (call argument, value, place, flag)."""
    out = []
    for flag, attr, name in (("--negative-prompt", "negative_prompt", "negative_prompt"),
                             ("--guidance-scale", "guidance_scale", "guidance_scale"),
                             ("--image", "image", "image"),
                             ("--num-frames", "num_frames", "num_frames"),
                             ("--num-images", "num_images", signature.count_name() or "num_images_per_prompt"),
                             ("--steps", "steps", "num_inference_steps"),
                             ("--height", "height", "height"),
                             ("--width", "width", "width")):
        value = getattr(args, attr, None)
        if value is not None:
            out.append((name, value, command_line_place(flag), flag))
    return out


def parse_set(text: str) -> tuple[str, str, Place, Place]:
    """``name=value`` of ``--set``: (name, value, the name's place, the value's place)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise CallArgError(command_line_place(text), f"--set takes NAME=VALUE (an argument of the pipeline's "
                                                     f"__call__), got {text!r}")
    return name, value, command_line_place(text), command_line_place(text, len(name) + 1)

