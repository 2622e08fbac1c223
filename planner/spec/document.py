"""Reading a deployment file: safe YAML, every node's line and column kept, hostile files refused fast.

PyYAML's composer gives a node tree with marks; we build plain Python values from it ourselves so
that no object is ever constructed from a tag, duplicate keys are caught, and alias expansion is
bounded (a "billion laughs" file is refused after a fixed number of nodes, not after the memory is gone).

Before YAML sees the text, its nesting is measured on the text itself (``_scan``): libyaml's
composer recurses once per level in C and overflows the stack on a flow sequence some 100,000
deep (PyYAML 6.0.1, libyaml 0.2.5; later libyaml stops at 1,000, with its own message), and
libyaml's scanner takes quadratic time on deep flow nesting. Files are read through
``planner.files.bounded_read``: regular files only, at most ``MAX_FILE_BYTES``.

Saved plans are JSON and read as JSON (``load_json_text``), with the same positions kept.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from planner.errors import Diagnostic, SpecError
from planner.files import json_positions
from planner.files.bounded_read import (
    UnreadableFile,
    json_too_deep,
    line_col,
    read_bounded,
)

MAX_FILE_BYTES = 1 << 20          # 1 MiB: a deployment spec is a page of YAML
MAX_NODES = 100_000               # values built, aliases expanded
MAX_DEPTH = 64

PathKey = tuple[Union[str, int], ...]

# libyaml's parser when PyYAML was built with it (marks are the same), else the pure-Python one
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_SCALAR_TAGS = {
    "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null",
}


@dataclass
class Document:
    """A loaded spec: its values and where each came from (value and key positions, 1-based)."""

    file: str
    data: Any
    positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)

    def directory(self) -> Path | None:
        """The folder of the spec's file, where its relative paths start; None for a spec given in
        memory (a mapping, a string)."""
        return Path(self.file).parent if self.file and not self.file.startswith("<") else None

    def position(self, path: PathKey, *, key: bool = False) -> tuple[int, int]:
        """The closest known position for ``path``: the node itself, else its nearest ancestor."""
        table = self.key_positions if key else self.positions
        if path in table:
            return table[path]
        p = tuple(path)
        while p:
            if p in self.positions:
                return self.positions[p]
            p = p[:-1]
        return self.positions.get((), (1, 1))

    def diagnostic(self, path: PathKey, message: str, *, key: bool = False, severity: str = "error",
                   code: str = "") -> Diagnostic:
        line, col = self.position(path, key=key)
        return Diagnostic(self.file, line, col, message, severity=severity, where=format_path(path), code=code)


def format_path(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fail(file: str, line: int, col: int, message: str) -> SpecError:
    return SpecError([Diagnostic(file, line, col, message)])


def _decode(text: Union[str, bytes], file: str, what: str) -> str:
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_BYTES:
            raise _fail(file, 1, 1, f"file is {len(text)} bytes; {what} may be at most {MAX_FILE_BYTES} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = text[: exc.start].count(b"\n") + 1
            col = exc.start - (text.rfind(b"\n", 0, exc.start) + 1) + 1
            raise _fail(file, line, col, "file is not valid UTF-8") from None
    if len(text) > MAX_FILE_BYTES:
        raise _fail(file, 1, 1, f"file is larger than {MAX_FILE_BYTES} bytes; {what} may be at most that")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def load_text(text: Union[str, bytes], file: str = "<string>", *, what: str = "a deployment spec") -> Document:
    """The document of YAML ``text``; ``what`` names the kind of file in messages."""
    text = _decode(text, file, what)
    if not text.strip() or all(ln.strip() == "" or ln.lstrip().startswith("#") for ln in text.splitlines()):
        needs = "; a deployment spec needs at least 'version' and 'pipeline'" if what == "a deployment spec" else ""
        raise _fail(file, 1, 1, f"file is empty{needs}")
    problem = _scan(text, MAX_DEPTH + 2)
    if problem is not None:
        kind, line, col = problem
        raise _fail(file, line, col, "tab character in indentation; YAML indents with spaces" if kind == "tab"
                    else f"document nested deeper than {MAX_DEPTH} levels")
    try:
        nodes = list(yaml.compose_all(text, Loader=_LOADER))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        raise _fail(file, line, col, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:  # pragma: no cover - reader errors without marks
        raise _fail(file, 1, 1, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise _fail(file, 1, 1, "YAML nested too deeply") from None
    if len(nodes) != 1:
        raise _fail(file, 1, 1, f"expected one YAML document, found {len(nodes)}")
    root = nodes[0]
    if root is None:
        raise _fail(file, 1, 1, "file is empty")
    if not isinstance(root, yaml.MappingNode):
        m = root.start_mark
        raise _fail(file, m.line + 1, m.column + 1,
                    f"{what} must be a mapping (key: value pairs) at the top level")
    doc = Document(file=file, data=None)
    builder = _Builder(doc)
    doc.data = builder.build(root, (), 0)
    return doc


def read_file(path: Union[str, Path], what: str = "a deployment spec") -> bytes:
    """The bytes of ``path``: a regular file of at most ``MAX_FILE_BYTES``, else a ``SpecError``."""
    try:
        return read_bounded(path, MAX_FILE_BYTES, "file")
    except UnreadableFile as exc:
        reason = exc.reason
        if reason == "file not found":
            reason = "cannot read file: No such file or directory"
        elif reason.startswith("file is ") and "bytes;" in reason:
            reason = reason.split(";")[0] + f"; {what} may be at most {MAX_FILE_BYTES} bytes"
        raise _fail(str(path), 1, 1, reason) from None


def load_file(path: Union[str, Path]) -> Document:
    return load_text(read_file(path), str(path))


def load_json_text(text: Union[str, bytes], file: str = "<string>", *, what: str = "a saved plan") -> Document:
    """The document of JSON ``text`` (strict JSON: no NaN, no duplicate keys), positions kept."""
    text = _decode(text, file, what)
    if not text.strip():
        raise _fail(file, 1, 1, "file is empty")
    deep = json_too_deep(text, MAX_DEPTH)
    if deep is not None:
        line, col = line_col(text, deep)
        raise _fail(file, line, col, f"document nested deeper than {MAX_DEPTH} levels")
    try:
        data, positions, key_positions = json_positions.parse(text)
    except json_positions.JSONSyntaxError as exc:
        line, col = line_col(text, exc.index)
        raise _fail(file, line, col, f"invalid JSON: {exc.message}") from None
    if not isinstance(data, dict):
        raise _fail(file, 1, 1, f"{what} must be a JSON object at the top level")
    starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def place(i: int) -> tuple[int, int]:
        line = bisect.bisect_right(starts, i)
        return line, i - starts[line - 1] + 1

    return Document(file=file, data=data, positions={p: place(i) for p, i in positions.items()},
                    key_positions={p: place(i) for p, i in key_positions.items()})


def load_json_file(path: Union[str, Path], what: str = "a saved plan") -> Document:
    return load_json_text(read_file(path, what), str(path), what=what)


# ----------------------------------------------------------------------------- nesting, on the text

_BLOCK_INDICATOR = re.compile(r"[-?:](?=[ ]|$)[ ]*")
_TOKEN = re.compile(r"""(?P<space>[ \t]+)|(?P<block>[|>][-+0-9]*[ \t]*(?:\#.*)?$)|(?P<mark>[&!][^ \t\[\]{},]*)"""
                    r"""|(?P<alias>\*[^ \t\[\]{},]*)|(?P<one>[#'":\[\]{},])|(?P<plain>[^ \t\[\]{},#'":]+)""")
_SPECIAL = re.compile(r"""[\[\]{}'"|>]""")
_SINGLE_END = re.compile(r"(?:[^']|'')*'")
_DOUBLE_END = re.compile(r'(?:[^"\\]|\\.)*"')


def _scan(text: str, limit: int) -> tuple[str, int, int] | None:
    """The first problem of YAML ``text`` found without parsing it, as (kind, line, column):
    ``"tab"``, a tab in the indentation of a block line (inside brackets, quotes and block
    scalars tabs are allowed), or ``"deep"``, nesting deeper than ``limit``. Nesting is
    estimated: block levels are the indentation levels open plus the compact indicators
    (``- - x``) on a line; flow levels are the brackets open, outside quotes, comments and block
    scalars. The estimate is at most two above the real depth (the indicators and a plain
    scalar's continuation lines count) and at least half of it (a sequence under a key at the
    key's indentation does not count). ``None`` when there is neither.
    """
    indents: list[int] = []
    flow = block = 0
    quote = ""                        # a quoted scalar open across lines: "'" or '"'
    scalar_parent: int | None = None  # a block scalar (| or >) is open: its parent's indentation,
    scalar_indent: int | None = None  # and its content's, once the first content line set it
    for lineno, line in enumerate(text.splitlines(), 1):
        body = line.lstrip(" ")
        ind = len(line) - len(body)
        if scalar_parent is not None:
            if not body.strip():
                continue
            if scalar_indent is None and ind > scalar_parent:
                scalar_indent = ind
            if scalar_indent is not None and ind >= scalar_indent:
                continue
            scalar_parent = scalar_indent = None
        i, parent, value_start = 0, ind, True
        if flow == 0 and not quote:
            if body[:1] == "\t" and body.strip():
                return "tab", lineno, ind + 1
            if not body or body.startswith("#") or (ind == 0 and body.startswith("%")):
                continue
            if ind == 0 and body[:3] in ("---", "...") and body[3:4] in ("", " "):
                indents, block, i, parent = [], 0, 3, 0
            else:
                while indents and indents[-1] > ind:
                    indents.pop()
                if not indents or indents[-1] < ind:
                    indents.append(ind)
                block, i = len(indents), ind
                if block > limit:
                    return "deep", lineno, ind + 1
                while True:
                    m = _BLOCK_INDICATOR.match(line, i)
                    if m is None:
                        break
                    block, parent, i = block + 1, i, m.end()
                    if block > limit:
                        return "deep", lineno, i + 1
                if i > parent:
                    parent = i        # "- key: |": the mapping after the indicators is the parent
        if not quote and _SPECIAL.search(line, i) is None:
            continue                  # nothing on the line opens or closes a level
        n = len(line)
        while i < n:
            if quote:
                end = (_SINGLE_END if quote == "'" else _DOUBLE_END).match(line, i)
                if end is None:
                    break             # the quoted scalar goes on on the next line
                quote, i, value_start = "", end.end(), False
                continue
            m = _TOKEN.match(line, i)
            assert m is not None
            kind, tok, start, i = m.lastgroup, m.group(), i, m.end()
            if kind == "space" or kind == "mark":
                continue              # an anchor or a tag: the value comes after it
            if kind == "block":
                if not flow and value_start:
                    scalar_parent, scalar_indent = parent, None
                    break
                value_start = False
            elif kind != "one":
                value_start = False   # a plain scalar or an alias
            elif tok == "#":
                if start == 0 or line[start - 1] in " \t":
                    break             # a comment
                value_start = False
            elif tok in "'\"":
                if value_start:
                    quote = tok
            elif tok in "[{":
                if flow or value_start:
                    flow += 1
                    value_start = True
                    if block + flow > limit:
                        return "deep", lineno, start + 1
                else:
                    value_start = False
            elif tok in "]}":
                flow = max(flow - 1, 0)
                value_start = False
            elif tok == ",":
                value_start = bool(flow)
            else:                     # ':'
                value_start = bool(flow) or i == n or line[i] in " \t"
    return None


class _Builder:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.count = 0
        self._constructor = yaml.SafeLoader("")

    def _mark(self, node: yaml.Node) -> tuple[int, int]:
        return node.start_mark.line + 1, node.start_mark.column + 1

    def build(self, node: yaml.Node, path: PathKey, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            line, col = self._mark(node)
            raise _fail(self.doc.file, line, col,
                        f"document expands to more than {MAX_NODES} values (alias expansion?); refused")
        if depth > MAX_DEPTH:
            line, col = self._mark(node)
            raise _fail(self.doc.file, line, col, f"document nested deeper than {MAX_DEPTH} levels")
        self.doc.positions.setdefault(path, self._mark(node))
        if isinstance(node, yaml.MappingNode):
            if node.tag not in ("tag:yaml.org,2002:map",):
                return self._bad_tag(node)
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    line, col = self._mark(key_node)
                    raise _fail(self.doc.file, line, col, "merge keys ('<<') are not supported; write the keys out")
                if not isinstance(key_node, yaml.ScalarNode):
                    line, col = self._mark(key_node)
                    raise _fail(self.doc.file, line, col, "mapping keys must be plain strings")
                key = self._scalar(key_node)
                if not isinstance(key, str):
                    key = str(key_node.value)
                if key in out:
                    line, col = self._mark(key_node)
                    first = self.doc.key_positions.get(path + (key,), (0, 0))
                    raise _fail(self.doc.file, line, col,
                                f"duplicate key '{key}' (first defined at line {first[0]})")
                self.doc.key_positions[path + (key,)] = self._mark(key_node)
                out[key] = self.build(value_node, path + (key,), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                return self._bad_tag(node)
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        return self._scalar(node)

    def _scalar(self, node: yaml.Node) -> Any:
        if node.tag not in _SCALAR_TAGS:
            return self._bad_tag(node)
        try:
            value = self._constructor.construct_object(node, deep=True)
        except (ValueError, IndexError, KeyError, TypeError, OverflowError, yaml.YAMLError):
            # an explicit tag over a value it cannot read: '!!float' alone, '!!int abc', '!!bool maybe'
            line, col = self._mark(node)
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            shown = node.value if len(node.value) <= 40 else node.value[:40] + "..."
            raise _fail(self.doc.file, line, col, f"'{shown}' is not a valid {tag} value") from None
        if isinstance(value, float) and value != value:
            line, col = self._mark(node)
            raise _fail(self.doc.file, line, col, "NaN is not a valid value")
        return value

    def _bad_tag(self, node: yaml.Node) -> Any:
        line, col = self._mark(node)
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise _fail(self.doc.file, line, col, f"unsupported YAML tag '{tag}'; only plain values, lists and mappings")
