"""What a config error is and how it is shown: Problem, ConfigError, Invalid, show().

Every module of the package reports through these, so every error reads the same way:
`file:line: key.path: message, got <value>`, one problem per line, short whatever the value.
They import nothing else of the package, so any module may use them.
"""

from __future__ import annotations

import re
import reprlib
from dataclasses import dataclass
from typing import Any

MAX_SHOWN = 50  # problems printed; the rest are counted


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where it is and what is expected there."""

    path: str  # dotted key path, e.g. "pools.images.processes"
    message: str
    line: int | None = None


# Control characters, line separators and lone surrogates: escaped in error text, so one
# problem stays one line and any terminal or log can print it.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _printable(text_: str) -> str:
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text_)


class ConfigError(Exception):
    """A config that cannot be used. str() lists every problem, one per line."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        """One `file:line: key.path: message` line per problem (the first MAX_SHOWN)."""
        lines = []
        for p in self.problems[:MAX_SHOWN]:
            where = f"{self.file}:{p.line}" if p.line else self.file
            key = f" {p.path}:" if p.path else ""
            lines.append(_printable(f"{where}:{key} {p.message}"))
        if len(self.problems) > MAX_SHOWN:
            lines.append(_printable(f"{self.file}: ... and {len(self.problems) - MAX_SHOWN} "
                                    "more problems; fix these first"))
        return "\n".join(lines)


class Invalid(ValueError):
    """Raised by a parser; its text says what was expected.

    `at` and `value` point inside a list or mapping, so the error names the exact item.
    """

    def __init__(self, message: str, at: tuple = (), value: Any = ...) -> None:
        super().__init__(message)
        self.at = at
        self.value = value


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 6, 6, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 80


def show(value: Any) -> str:
    """`value` for an error message, at most 80 characters whatever it is."""
    # reprlib, not repr: aliases can make a value a large shared tree, and a string may be
    # most of the file; the text shown stays short whatever the value.
    try:
        text_ = _REPR.repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        text_ = f"<{type(value).__name__} too long to show>"
    return text_ if len(text_) <= 80 else text_[:77] + "..."


def key_text(key: Any) -> str:
    """One key of a key path, cut to 40 characters for an error message."""
    text_ = str(key)
    return text_ if len(text_) <= 40 else text_[:37] + "..."


def dotted(path: tuple) -> str:
    """A key path as the operator writes it: ("pools", "images", "processes") ->
    "pools.images.processes"."""
    return ".".join(key_text(p) for p in path)
