"""Command line: `gearvisor -c FILE` runs the master; `gearvisor check -c FILE` validates;
`gearvisor reload|status|stop|restart|scale|fleet|top` talk to a running master over its
control socket; `gearvisor dead ...` and `gearvisor jobs` read the job journal's store
themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from typing import Any

from gearvisor import __version__
from gearvisor.cli import alerts as alerts_cli
from gearvisor.cli import journal as journal_cli
from gearvisor.cli import top as top_cli
from gearvisor.config import Config, ConfigError, load, load_yaml, read_file

EXIT_CONFIG = 78  # sysexits EX_CONFIG: systemd's RestartPreventExitStatus=78 stops a loop
EXIT_FAILED = 1  # the master refused or could not carry out the request
EXIT_NO_MASTER = 3  # no master to talk to (LSB: "program is not running")
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

    def control(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("-c", "--config", metavar="FILE", dest="sub_config",
                       help="the master's pool spec: its control_socket is used")
        p.add_argument("--socket", metavar="PATH", help="control socket path (overrides -c)")
        return p

    reload_ = control("reload", "re-read the config and roll every pool to new code; waits "
                      "until the roll is done; non-zero if it was refused or halted")
    reload_.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                         help="how long to wait for the roll (default 600)")
    status = control("status", "show every pool and child; exit 3 if no master runs")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    stop = control("stop", "graceful stop: children finish their jobs, then the master exits")
    stop.add_argument("--no-wait", action="store_true", help="do not wait for the exit")
    stop.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                      help="how long to wait for the master to exit (default 600)")
    restart = control("restart", "roll one pool to a new generation (same surge as reload)")
    restart.add_argument("pool")
    restart.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    scale = control("scale", "set a pool's process count until the next reload changes it "
                    "(an autoscaled pool: until the next reload), or for a while with --for")
    scale.add_argument("pool")
    scale.add_argument("processes", type=int)
    fleet = control("fleet", "every gearvisor host and other worker on the job servers, "
                    "from the master's last probes; flags vanished hosts and partial "
                    "registrations")
    fleet.add_argument("--json", action="store_true", help="machine-readable output")
    scale.add_argument("--for", dest="pin_for", metavar="DURATION", type=_pin_duration,
                       help="pin the count this long (e.g. 30m, 2h), then the autoscaler (or "
                            "the pool's processes) takes over again")
    alerts_cli.add_parsers(control)
    top_cli.add_parser(control)
    journal_cli.add_parsers(sub)
    return parser


def _pin_duration(text: str) -> float:
    """`scale --for`: a duration as the config writes one (30m, 2h, 90s), 1s to 30d."""
    from gearvisor.config import Invalid, duration

    try:
        seconds = duration(text, 30 * 86400.0)
    except Invalid as e:
        raise argparse.ArgumentTypeError(f"{e}, got {text!r}") from None
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1s, got {text!r}")
    return seconds


def _scan_control_socket(path: str) -> str | None:
    """control_socket from a file YAML cannot parse (the watcher may just have refused an
    edit): a top-level `control_socket: PATH` line, so status and stop still reach the
    master. Read as load() reads (a regular file, at most 1 MiB), so it cannot hang."""
    try:
        data = read_file(path)
    except ConfigError:
        return None
    for line in data.decode(errors="replace").splitlines():
        m = re.match(r"""control_socket:\s*["']?([^"'#\s]+)""", line)
        if m:
            return m.group(1)
    return None


def _usable_path(value: Any) -> bool:
    """A path os calls take: a NUL byte or a lone surrogate would raise from os.stat."""
    if not isinstance(value, str) or not value or "\0" in value:
        return False
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        return False
    return True


def _exists(path: str) -> bool:
    """False only if nothing is there: a file we may not read is reported as such by
    load_yaml(), not as missing."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    return True


def socket_path(args: argparse.Namespace) -> str:
    """--socket, else control_socket from -c FILE / $GEARVISOR_CONFIG / the default config
    (read leniently: a config the master will refuse must still lead to the master), else
    the default path."""
    from gearvisor.control import default_socket_path

    if getattr(args, "socket", None):
        return args.socket
    explicit = args.sub_config or args.config or os.environ.get("GEARVISOR_CONFIG")
    path = config_path(explicit)
    if not _exists(path):
        if explicit:
            print(f"gearvisor: note: {path} not found; using the default control socket",
                  file=sys.stderr)
        return default_socket_path()
    try:
        data = load_yaml(path)
    except ConfigError as e:
        if args.command == "reload":
            # The master would refuse it anyway; say why here (we cannot even find the
            # socket in it), and leave the fleet alone.
            print(f"gearvisor: invalid config\n{e}", file=sys.stderr)
            print("gearvisor reload: nothing was sent; the running fleet is unchanged",
                  file=sys.stderr)
            raise SystemExit(EXIT_CONFIG) from None
        value = _scan_control_socket(path)
        if value is None:
            print(f"gearvisor: note: cannot read control_socket from {e.render().splitlines()[0]}"
                  "; using the default control socket", file=sys.stderr)
            return default_socket_path()
        data = {"control_socket": value}  # found by a line scan of the broken file
    value = data.get("control_socket") if isinstance(data, dict) else None
    if _usable_path(value):
        return os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(value))
    return default_socket_path()


def _ask(args: argparse.Namespace, payload: dict[str, Any],
         timeout: float = 30.0) -> dict[str, Any] | None:
    from gearvisor.control import ControlError, request

    try:
        return request(socket_path(args), payload, timeout)
    except ControlError as e:
        print(f"gearvisor: {e}", file=sys.stderr)
        return None


def cmd_control(args: argparse.Namespace) -> int:
    verb = args.command
    payload: dict[str, Any] = {"verb": verb}
    if verb in ("restart", "scale"):
        payload["pool"] = args.pool
    if verb == "scale":
        payload["processes"] = args.processes
        if args.pin_for is not None:
            payload["for"] = args.pin_for
    reply = _ask(args, payload, getattr(args, "timeout", 30.0))
    if reply is None:
        return EXIT_NO_MASTER
    if not reply.get("ok"):
        print(f"gearvisor {verb}: {reply.get('error') or 'failed'}", file=sys.stderr)
        for name, result in (reply.get("pools") or {}).items():
            print(f"  {name}: {result.get('result')}", file=sys.stderr)
        return EXIT_FAILED
    if verb == "status":
        from gearvisor.cli.render import render

        status = reply["status"]
        print(json.dumps(status, indent=2) if args.json else render(status))
    elif verb == "fleet":
        from gearvisor.cli.render import render_fleet

        fleet = reply["fleet"]
        print(json.dumps(fleet, indent=2) if args.json else render_fleet(fleet))
    elif verb in ("reload", "restart"):
        for name, result in reply.get("pools", {}).items():
            gen = f" (generation {result['generation']})" if "generation" in result else ""
            print(f"{name}: {result['result']}{gen}")
    elif verb == "scale":
        pinned = f" for {args.pin_for:g}s" if args.pin_for is not None else ""
        print(f"{reply['pool']}: {reply['before']} -> {reply['after']} processes{pinned}")
    elif verb == "stop":
        return _wait_gone(reply["pid"], 0 if args.no_wait else args.timeout)
    return 0


def _wait_gone(pid: int, timeout: float) -> int:
    import psutil

    print(f"stopping gearvisor master {pid}")
    deadline = time.monotonic() + timeout
    while timeout and psutil.pid_exists(pid):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        if time.monotonic() >= deadline:
            print(f"gearvisor stop: master {pid} still running after {timeout:g}s",
                  file=sys.stderr)
            return EXIT_FAILED
        time.sleep(0.05)  # polling the master's exit
    return 0


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
        from gearvisor.child.python import BootError, load_functions

        for p in reversed(cfg.pythonpath):
            if p not in sys.path:
                sys.path.insert(0, p)
        bad = 0
        for pool in cfg.pools.values():
            if pool.command is not None:
                exe = pool.command[0]
                found = (os.access(os.path.join(pool.cwd, exe), os.X_OK) if os.sep in exe
                         else shutil.which(exe, path=pool.env.get("PATH")))
                if not found:
                    bad += 1
                    print(f"{cfg.path}: pools.{pool.name}.command: {exe!r} is not an "
                          "executable on PATH (or relative to cwd)", file=sys.stderr)
                continue
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
    from gearvisor.master import run

    return run(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "silence" and not any(a.startswith("-") for a in extra):
        args.args += extra  # `silence add -c FILE pool=x`: matchers after an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    command = args.command or "run"
    if command == "check":
        return cmd_check(config_path(args.sub_config or args.config), not args.no_import)
    if command in ("reload", "status", "stop", "restart", "scale", "fleet"):
        return cmd_control(args)
    if command in ("alerts", "silence"):
        return alerts_cli.run(args, lambda payload: _ask(args, payload, 30.0),
                              config_path(args.sub_config or args.config))
    if command == "top":
        # A master must be there to start with (as `status` needs one): once it runs,
        # top rides out its restarts, but with none it would wait forever.
        if _ask(args, {"verb": "status"}, 10.0) is None:
            return EXIT_NO_MASTER
        return top_cli.run(socket_path(args), args.interval)
    if command in ("dead", "jobs"):
        return journal_cli.run(args, config_path(args.sub_config or args.config))
    return cmd_run(config_path(args.config))


if __name__ == "__main__":
    sys.exit(main())
