"""structlog setup: key=value on a terminal, JSON lines otherwise. Every line has pool and pid."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def _add_pid(_: Any, __: str, event: dict) -> dict:
    # os.getpid() at log time, not at configure time: the same logger crosses fork().
    # pool and pid lead, so console lines line up as "event  pool=text pid=123 ...".
    head = {"pool": event.pop("pool", "-"), "pid": os.getpid()}
    event.pop("pid", None)
    return {"event": event.pop("event", ""), **head, **event}


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog for this process (the master, or a child after fork).

    Args:
        level: debug, info, warning or error.
        fmt: console (key=value), json, or auto (console when `stream` is a terminal).
        stream: where lines go; stderr by default. Each line is one write() call, so lines
            from many children sharing one stderr never interleave mid-line.
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if _isatty(stream) else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_pid,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        # format_exc_info, not dict_tracebacks: a traceback must not dump job payloads held
        # in local variables into the log.
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.processors.format_exc_info,
                       structlog.dev.ConsoleRenderer(colors=_isatty(stream), sort_keys=False,
                                                     pad_event_to=36)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get(**bound: Any) -> Any:
    """A logger with `bound` context (pool=..., slot=...) on every line."""
    return structlog.get_logger().bind(**bound)
