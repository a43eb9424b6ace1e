"""Command line: `gearvisor -c FILE` runs the master; `gearvisor check -c FILE` validates."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .config import Config, ConfigError, load

EXIT_CONFIG = 78  # sysexits EX_CONFIG: systemd's RestartPreventExitStatus=78 stops a loop
DEFAULT_CONFIG = "/etc/gearvisor/pools.yaml"


def config_path(arg: str | None) -> str:
    """-c FILE, else $GEARVISOR_CONFIG, else /etc/gearvisor/pools.yaml."""
    return arg or os.environ.get("GEARVISOR_CONFIG") or DEFAULT_CONFIG


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gearvisor",
        description="Supervise Gearman worker pools: fork, register, restart, stop gracefully.",
    )
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="pool spec (YAML); default $GEARVISOR_CONFIG or " + DEFAULT_CONFIG)
    parser.add_argument("--version", action="version", version=f"gearvisor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="start the master in the foreground (the default)")
    check = sub.add_parser("check", help="validate a config and exit: 0 good, 78 bad")
    check.add_argument("-c", "--config", metavar="FILE", dest="sub_config",
                       help="pool spec (YAML)")
    check.add_argument("--no-import", action="store_true",
                       help="only validate the YAML; do not import the pools' functions")
    return parser


def _load_or_report(path: str) -> Config | None:
    try:
        return load(path)
    except ConfigError as e:
        print(f"gearvisor: invalid config\n{e}", file=sys.stderr)
        return None


def cmd_check(path: str, import_functions: bool) -> int:
    cfg = _load_or_report(path)
    if cfg is None:
        return EXIT_CONFIG
    if import_functions:
        from .child import BootError, load_functions

        for p in reversed(cfg.pythonpath):
            if p not in sys.path:
                sys.path.insert(0, p)
        bad = 0
        for pool in cfg.pools.values():
            try:
                load_functions(pool.functions)
            except BootError as e:
                bad += 1
                print(f"{cfg.path}: pools.{pool.name}.functions: {e}", file=sys.stderr)
        if bad:
            return EXIT_CONFIG
    total = sum(p.processes for p in cfg.pools.values())
    print(f"{cfg.path}: OK, {len(cfg.pools)} pool(s), {total} process(es)")
    return 0


def cmd_run(path: str) -> int:
    cfg = _load_or_report(path)
    if cfg is None:
        return EXIT_CONFIG
    from .arbiter import run

    return run(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    if command == "check":
        return cmd_check(config_path(args.sub_config or args.config), not args.no_import)
    return cmd_run(config_path(args.config))


if __name__ == "__main__":
    sys.exit(main())
