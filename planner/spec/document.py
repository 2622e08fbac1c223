"""Reading a deployment file: safe YAML, every node's line and column kept, hostile files refused fast.

PyYAML's composer gives a node tree with marks; we build plain Python values from it ourselves so
that no object is ever constructed from a tag, duplicate keys are caught, and alias expansion is
bounded (a "billion laughs" file is refused after a fixed number of nodes, not after the memory is gone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from planner.errors import Diagnostic, SpecError

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


def load_text(text: Union[str, bytes], file: str = "<string>") -> Document:
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_BYTES:
            raise _fail(file, 1, 1, f"file is {len(text)} bytes; a deployment spec may be at most {MAX_FILE_BYTES} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = text[: exc.start].count(b"\n") + 1
            col = exc.start - (text.rfind(b"\n", 0, exc.start) + 1) + 1
            raise _fail(file, line, col, "file is not valid UTF-8") from None
    if len(text) > MAX_FILE_BYTES:
        raise _fail(file, 1, 1, f"file is larger than {MAX_FILE_BYTES} bytes; a deployment spec may be at most that")
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip() or all(ln.strip() == "" or ln.lstrip().startswith("#") for ln in text.splitlines()):
        raise _fail(file, 1, 1, "file is empty; a deployment spec needs at least 'version' and 'pipeline'")
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip(" ")
        if stripped.startswith("\t"):
            raise _fail(file, lineno, len(line) - len(stripped) + 1,
                        "tab character in indentation; YAML indents with spaces")
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
                    "a deployment spec must be a mapping (key: value pairs) at the top level")
    doc = Document(file=file, data=None)
    builder = _Builder(doc)
    doc.data = builder.build(root, (), 0)
    return doc


def load_file(path: Union[str, Path]) -> Document:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise _fail(str(path), 1, 1, f"file is {size} bytes; a deployment spec may be at most {MAX_FILE_BYTES} bytes")
        raw = p.read_bytes()
    except OSError as exc:
        raise _fail(str(path), 1, 1, f"cannot read file: {exc.strerror or exc}") from None
    return load_text(raw, str(path))


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
