"""Diagnostics that point at a place in a file: ``FILE:LINE:COL: error: message``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Diagnostic:
    file: str
    line: int          # 1-based; 0 when the place is the whole file
    column: int        # 1-based
    message: str
    severity: str = "error"   # error | warning
    where: str = ""           # path inside the spec, e.g. "offload.dit_cpu_offload"
    code: str = ""            # a stable id for warnings a plan carries, e.g. "selection-matches-nothing"

    def format(self) -> str:
        """One line, always: control characters in the file name, message or place are written
        as escapes (``\\n``), so no part of a diagnostic can print a line of its own."""
        where = f" ({_one_line(self.where)})" if self.where else ""
        return (f"{_one_line(self.file)}:{self.line}:{self.column}: {self.severity}: "
                f"{_one_line(self.message)}{where}")

    def format_github(self) -> str:
        """A GitHub workflow command, escaped as the runner unescapes it: in the properties
        ``%``, CR, LF, ``:`` and ``,`` (a file name cannot end the command or add a property); in
        the message ``%``, CR and LF."""
        kind = "error" if self.severity == "error" else "warning"
        msg = self.message + (f" ({self.where})" if self.where else "")
        msg = _one_line(msg, keep="\r\n").replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        file = (_one_line(self.file, keep="\r\n").replace("%", "%25").replace("\r", "%0D")
                .replace("\n", "%0A").replace(":", "%3A").replace(",", "%2C"))
        return f"::{kind} file={file},line={max(self.line, 1)},col={max(self.column, 1)}::{msg}"

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"file": self.file, "line": self.line, "column": self.column,
                                  "severity": self.severity, "message": self.message, "where": self.where}
        if self.code:
            out["code"] = self.code
        return out

    @classmethod
    def from_dict(cls, data: "dict[str, object]") -> "Diagnostic":
        return cls(file=str(data.get("file", "")), line=int(data.get("line", 0)),  # type: ignore[arg-type]
                   column=int(data.get("column", 1)), message=str(data.get("message", "")),  # type: ignore[arg-type]
                   severity=str(data.get("severity", "warning")), where=str(data.get("where", "")),
                   code=str(data.get("code", "")))


# characters that end a line for a terminal or for str.splitlines(), and other control characters
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, 0x85)}
_CONTROL.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def _one_line(text: str, keep: str = "") -> str:
    """``text`` with control and line-separator characters escaped (``keep``: ones left as they are)."""
    table = {c: e for c, e in _CONTROL.items() if chr(c) not in keep} if keep else _CONTROL
    return str(text).translate(table)


class SpecError(Exception):
    """One or more errors in a deployment spec or plan; each carries its place."""

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(d.format() for d in self.diagnostics))


class FolderError(ValueError):
    """A model folder or file that cannot be read as one; the message names the file."""


class PlanApplyError(RuntimeError):
    """Applying a plan to a pipeline failed; the pipeline was left as it was."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    import difflib

    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""
