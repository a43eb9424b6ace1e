"""YAML pool spec -> frozen dataclasses, with every error naming file, line, key path and value.

Each setting is declared once (key, parser, default, one-line doc, scope). That one
declaration drives validation, defaults, per-pool overrides and the reference table in
README.md (`python -m gearvisor.config --markdown`), so the docs cannot drift from the code.

Any bytes may be in the file (it is edited by hand, and the watcher reloads every save): the
loader either returns a Config or raises ConfigError, within a bounded time and memory.

The modules, each importing only those above it:
  errors     Problem, ConfigError, Invalid, and how a value is shown in an error
  model      the frozen dataclasses the rest of gearvisor reads (Config, PoolConfig, ...)
  values     the value parsers (duration, size, int_range, server, command, rlimits, ...)
  alerts     the built-in alert rules (RULES) and the parsers of the `alerts:` block
  settings   SETTINGS, the one declaration of every key, and the file's shape from it
  yamlload   the bounded YAML loader (read_file, decode, load_yaml)
  load       parse() and load(): YAML data -> Config, every problem collected
  reference  markdown_reference(), the README table

This package re-exports what the rest of gearvisor and its tests import; anything else is
imported from its module (`from gearvisor.config.values import duration_upto`).
"""

from gearvisor.config.errors import ConfigError, Invalid, Problem
from gearvisor.config.load import load, parse
from gearvisor.config.model import (
    BackoffConfig,
    CircuitConfig,
    Config,
    KeepaliveConfig,
    MetricsConfig,
    PoolConfig,
    QuarantineConfig,
    Server,
)
from gearvisor.config.reference import markdown_reference
from gearvisor.config.settings import POOL_KEYS, SETTINGS, TOP_KEYS, Setting
from gearvisor.config.values import duration, float_range, servers, size
from gearvisor.config.yamlload import decode, load_yaml, read_file

__all__ = [
    "POOL_KEYS",
    "SETTINGS",
    "TOP_KEYS",
    "BackoffConfig",
    "CircuitConfig",
    "Config",
    "ConfigError",
    "Invalid",
    "KeepaliveConfig",
    "MetricsConfig",
    "PoolConfig",
    "Problem",
    "QuarantineConfig",
    "Server",
    "Setting",
    "decode",
    "duration",
    "float_range",
    "load",
    "load_yaml",
    "markdown_reference",
    "parse",
    "read_file",
    "servers",
    "size",
]
