"""Writing a file the tool was told to write, without losing what was there.

``write_text_atomic`` writes into a new file beside the target and renames it over the target, so a
full disk or an interrupted write leaves the old file as it was (a device such as ``/dev/null`` is
written directly). ``same_file`` says whether an output would overwrite one of the command's inputs.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Union

PathLike = Union[str, "os.PathLike[str]"]


def write_text_atomic(path: PathLike, text: str) -> None:
    """``text`` into ``path`` (UTF-8); ``OSError`` when it cannot be written, the old file intact."""
    target = Path(path)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory", str(target))
        with open(target, "w", encoding="utf-8") as fh:        # a device: no file to keep
            fh.write(text)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent or "."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, stat.S_IMODE(mode))
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def same_file(output: PathLike, inputs: Iterable[PathLike | None]) -> str | None:
    """The input that ``output`` would overwrite (the same file, through links too), or ``None``."""
    try:
        out = os.path.realpath(output)
    except (OSError, ValueError):
        return None
    for item in inputs:
        if item is None:
            continue
        try:
            if os.path.realpath(item) == out:
                return str(item)
        except (OSError, ValueError):
            continue
    return None
