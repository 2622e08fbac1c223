"""Reading a file the tool was pointed at, whatever it turns out to be.

Every file the project reads (spec, saved plan, SGLang config, ``model_index.json``, component
configs, shard indexes, safetensors headers) comes through here:

* regular files only: a FIFO, a character or block device, a socket or a directory is refused
  without blocking (the path is checked before opening, and opened with ``O_NONBLOCK`` and checked
  again with ``fstat``, so a FIFO swapped in between cannot hang the open or the read);
* at most ``limit`` bytes are read, whatever ``st_size`` says (``/proc`` files report 0);
* JSON nesting is measured on the text before any recursive parser runs.

Errors are ``UnreadableFile`` (a ``FolderError``) whose message names the file; ``reason`` is the
same message without the file, for callers that put the file in front themselves.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Union

from planner.errors import FolderError

PathLike = Union[str, "os.PathLike[str]"]

MAX_JSON_DEPTH = 64            # a config, an index or a plan nests a handful of levels
MAX_FOLDER_JSON_BYTES = 64 << 20   # model_index.json, config.json, *.safetensors.index.json


class UnreadableFile(FolderError):
    """A file that was refused or could not be read: ``str()`` is ``"PATH: reason"``, or
    ``"PATH:LINE:COL: reason"`` when the problem has a place (``line`` is 0 when it has none)."""

    def __init__(self, path: PathLike, reason: str, line: int = 0, column: int = 0) -> None:
        self.path = str(path)
        self.reason = reason
        self.line = line
        self.column = column
        place = f":{line}:{column}" if line else ""
        super().__init__(f"{self.path}{place}: {reason}")


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _refuse_irregular(path: PathLike, mode: int, what: str) -> None:
    if not stat.S_ISREG(mode):
        kind = _kind(mode)
        tail = ", not a regular file; refused" if kind.startswith("a ") else "; refused"
        raise UnreadableFile(path, f"{what} is {kind}{tail}")


def _os_error(path: PathLike, exc: OSError, what: str) -> UnreadableFile:
    if isinstance(exc, FileNotFoundError):
        return UnreadableFile(path, f"{what} not found")
    return UnreadableFile(path, f"cannot read {what}: {exc.strerror or exc}")


@contextlib.contextmanager
def open_regular(path: PathLike, what: str = "file") -> Iterator[BinaryIO]:
    """A binary file object for ``path``, which must be a regular file; never blocks on opening."""
    if "\0" in os.fspath(path):
        raise UnreadableFile(path, f"{what} name contains a NUL character; refused")
    try:
        _refuse_irregular(path, os.stat(path).st_mode, what)
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
    except OSError as exc:
        raise _os_error(path, exc, what) from None
    try:
        try:
            _refuse_irregular(path, os.fstat(fd).st_mode, what)
            os.set_blocking(fd, True)
        except OSError as exc:
            raise _os_error(path, exc, what) from None
        fh = io.open(fd, "rb", buffering=0, closefd=True)
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh  # type: ignore[misc]


def read_upto(fh: BinaryIO, path: PathLike, n: int, what: str = "file") -> bytes:
    """The next ``n`` bytes of ``fh``, fewer at the end of the file."""
    chunks: list[bytes] = []
    total = 0
    try:
        while total < n:
            chunk = fh.read(min(1 << 20, n - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise _os_error(path, exc, what) from None
    return b"".join(chunks)


def read_limited(fh: BinaryIO, path: PathLike, limit: int, what: str = "file") -> bytes:
    """The rest of ``fh``, refused when it is more than ``limit`` bytes (``st_size`` is not trusted)."""
    data = read_upto(fh, path, limit + 1, what)
    if len(data) > limit:
        raise UnreadableFile(path, f"{what} is larger than {limit} bytes; refused")
    return data


def read_bounded(path: PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, refused when it holds more than ``limit``."""
    with open_regular(path, what) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
        except OSError as exc:  # pragma: no cover - fstat of an open file
            raise _os_error(path, exc, what) from None
        if size > limit:
            raise UnreadableFile(path, f"{what} is {size} bytes; at most {limit} bytes are read")
        return read_limited(fh, path, limit, what)


# ----------------------------------------------------------------------------- JSON

_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.S)


def json_too_deep(text: str, max_depth: int = MAX_JSON_DEPTH) -> int | None:
    """The index of the first bracket nested deeper than ``max_depth`` in JSON ``text``, or ``None``.

    Brackets inside strings do not count. Linear, no recursion: run before a recursive parser.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return None
    depth = 0
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > max_depth:
                return m.start()
        elif c in "]}":
            depth -= 1
    return None


def line_col(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of ``index`` in ``text``."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def decode_utf8(raw: bytes, path: PathLike, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UnreadableFile(path, f"{what} is not valid UTF-8", line, col) from None
    return text[1:] if text.startswith("\ufeff") else text


def loads_json(text: str, path: PathLike, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with the nesting checked first; errors name ``path``, line and column."""
    deep = json_too_deep(text, max_depth)
    if deep is not None:
        line, col = line_col(text, deep)
        raise UnreadableFile(path, f"corrupt {what}: nested deeper than {max_depth} levels", line, col)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnreadableFile(path, f"corrupt {what}: {exc.msg}", exc.lineno, exc.colno) from None
    except (ValueError, RecursionError) as exc:   # e.g. an integer of more than 4300 digits
        raise UnreadableFile(path, f"corrupt {what}: {exc}") from None


def load_json_file(path: PathLike, what: str, *, limit: int = MAX_FOLDER_JSON_BYTES,
                   max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON file read through ``read_bounded`` and ``loads_json``."""
    return loads_json(decode_utf8(read_bounded(path, limit, what), path, what), path, what, max_depth)


def inside(path: Path, base: Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``base`` or somewhere under it; ``base``
    is resolved too. A hub cache's snapshot files are links into the repository's ``blobs``
    folder: those count as inside when ``base`` lies in a ``snapshots`` folder."""
    try:
        target = Path(os.path.realpath(path))
        root = Path(os.path.realpath(base))
    except (OSError, ValueError):  # pragma: no cover - a loop of links
        return False
    if target == root or root in target.parents:
        return True
    absolute = Path(os.path.abspath(base))
    for ancestor in (absolute, *absolute.parents):
        if ancestor.name == "snapshots":
            blobs = Path(os.path.realpath(ancestor.parent / "blobs"))
            return target.parent == blobs
    return False


def plain_relative(name: str) -> bool:
    """Whether ``name`` is a relative path that stays where it is joined: no ``..``, no absolute
    path or drive, no backslash, no NUL, not empty."""
    if not name or "\0" in name or "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in name.split("/")
