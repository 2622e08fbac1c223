"""JSON parsed as ``json.loads`` parses it (the same string and number scanners), keeping where
each value and key starts, for errors that point at their place in a saved plan.

Strict JSON: ``NaN``, ``Infinity``, trailing commas, comments and duplicate keys are errors. The
caller bounds the nesting first (``bounded_read.json_too_deep``); the parser recurses once per
level.
"""

from __future__ import annotations

import re
from json.decoder import scanstring
from json.scanner import NUMBER_RE
from typing import Any, Union

PathKey = tuple[Union[str, int], ...]

_WS = re.compile(r"[ \t\n\r]*")


class JSONSyntaxError(ValueError):
    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.message = message
        self.index = index


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.positions: dict[PathKey, int] = {}
        self.key_positions: dict[PathKey, int] = {}

    def ws(self, i: int) -> int:
        return _WS.match(self.text, i).end()  # type: ignore[union-attr]

    def value(self, i: int, path: PathKey) -> tuple[Any, int]:
        text = self.text
        i = self.ws(i)
        self.positions[path] = i
        c = text[i:i + 1]
        if c == "{":
            return self.obj(i + 1, path)
        if c == "[":
            return self.arr(i + 1, path)
        if c == '"':
            return self.string(i)
        for word, val in (("true", True), ("false", False), ("null", None)):
            if text.startswith(word, i):
                return val, i + len(word)
        m = NUMBER_RE.match(text, i)
        if m is not None and m.end() > i:
            integer, frac, exp = m.groups()
            if frac or exp:
                number: Any = float(integer + (frac or "") + (exp or ""))
                if number in (float("inf"), float("-inf")):
                    raise JSONSyntaxError("number out of range", i)
                return number, m.end()
            try:
                return int(integer), m.end()
            except ValueError:   # more than 4300 digits
                raise JSONSyntaxError("number too long", i) from None
        if not c:
            raise JSONSyntaxError("expecting a value, found the end of the file", i)
        raise JSONSyntaxError(f"expecting a value, found {c!r}", i)

    def string(self, i: int) -> tuple[str, int]:
        try:
            return scanstring(self.text, i + 1, True)
        except ValueError as exc:
            raise JSONSyntaxError(getattr(exc, "msg", str(exc)), getattr(exc, "pos", i)) from None

    def obj(self, i: int, path: PathKey) -> tuple[dict[str, Any], int]:
        text = self.text
        out: dict[str, Any] = {}
        i = self.ws(i)
        if text.startswith("}", i):
            return out, i + 1
        while True:
            if not text.startswith('"', i):
                raise JSONSyntaxError("expecting a property name in double quotes", i)
            start = i
            key, i = self.string(i)
            if key in out:
                raise JSONSyntaxError(f"duplicate key '{key}'", start)
            self.key_positions[path + (key,)] = start
            i = self.ws(i)
            if not text.startswith(":", i):
                raise JSONSyntaxError("expecting ':' after a key", i)
            out[key], i = self.value(i + 1, path + (key,))
            i = self.ws(i)
            if text.startswith("}", i):
                return out, i + 1
            if not text.startswith(",", i):
                raise JSONSyntaxError("expecting ',' or '}'", i)
            i = self.ws(i + 1)

    def arr(self, i: int, path: PathKey) -> tuple[list[Any], int]:
        text = self.text
        out: list[Any] = []
        i = self.ws(i)
        if text.startswith("]", i):
            return out, i + 1
        while True:
            item, i = self.value(i, path + (len(out),))
            out.append(item)
            i = self.ws(i)
            if text.startswith("]", i):
                return out, i + 1
            if not text.startswith(",", i):
                raise JSONSyntaxError("expecting ',' or ']'", i)
            i += 1


def parse(text: str) -> tuple[Any, dict[PathKey, int], dict[PathKey, int]]:
    """The value of JSON ``text`` and the start index of every value and key, by path."""
    parser = _Parser(text)
    value, end = parser.value(0, ())
    end = parser.ws(end)
    if end != len(text):
        raise JSONSyntaxError("extra data after the JSON value", end)
    return value, parser.positions, parser.key_positions
