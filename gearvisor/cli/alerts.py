"""`gearvisor alerts` and `gearvisor silence`: the alert engine's view and its levers.

    gearvisor alerts [--json]              pending and firing alerts, with their age
    gearvisor alerts ack ID                stop an alert's escalation (ID: a prefix will do)
    gearvisor alerts test CHANNEL          send a test notification (from this process)
    gearvisor silence add M... --for 2h [--comment TEXT]
    gearvisor silence list [--json]
    gearvisor silence expire ID

Everything but `alerts test` asks the running master over the control socket;
`alerts test` reads the channel from the config and sends from here, so it works (and
shows the error) while no master runs.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from typing import Any

EXIT_FAILED = 1


def add_parsers(control: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The two subcommands, built with cli.main's `control` (adds -c and --socket)."""
    alerts = control("alerts", "list pending and firing alerts; `alerts ack ID` stops an "
                     "alert's escalation; `alerts test CHANNEL` sends a test notification")
    alerts.add_argument("action", nargs="?", choices=("ack", "test"))
    alerts.add_argument("target", nargs="?", metavar="ID|CHANNEL")
    alerts.add_argument("--json", action="store_true", help="machine-readable output")
    silence = control("silence", "silence alerts: `silence add pool=images --for 2h`, "
                      "`silence list`, `silence expire ID`")
    silence.add_argument("action", choices=("add", "list", "expire"))
    silence.add_argument("args", nargs="*", metavar="MATCHER|ID",
                         help="add: LABEL=VALUE (or !=, =~, !~) matchers; expire: the id")
    silence.add_argument("--for", dest="duration", metavar="DURATION",
                         help="add: how long, e.g. 30m, 2h")
    silence.add_argument("--comment", default="", help="add: why (shown in silence list)")
    silence.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace, ask: Callable[[dict[str, Any]], dict[str, Any] | None],
        config_file: str) -> int:
    """Carry out `alerts ...` or `silence ...`; the process exit code."""
    if args.command == "alerts" and args.action == "test":
        return _test(config_file, args.target)
    try:
        payload = _payload(args)
    except ValueError as e:
        print(f"gearvisor {args.command}: {e}", file=sys.stderr)
        return 2
    reply = ask(payload)
    if reply is None:
        return 3  # no master: cli.main says so
    if not reply.get("ok"):
        print(f"gearvisor {args.command}: {reply.get('error') or 'failed'}", file=sys.stderr)
        return EXIT_FAILED
    if getattr(args, "json", False):
        print(json.dumps(reply, indent=2))
    elif "alerts" in reply:
        print(render_alerts(reply["alerts"]))
    elif "silences" in reply:
        print(render_silences(reply["silences"]))
    else:
        print(" ".join(f"{k}: {v}" for k, v in reply.items() if k != "ok"))
    return 0


def _payload(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "alerts":
        if args.action == "ack":
            if not args.target:
                raise ValueError("alerts ack: which alert? (an ID from `gearvisor alerts`)")
            return {"verb": "alerts.ack", "id": args.target}
        return {"verb": "alerts"}
    if args.action == "add":
        from gearvisor.config.errors import Invalid
        from gearvisor.config.values import duration

        if not args.args:
            raise ValueError("silence add: give at least one matcher, e.g. pool=images")
        if not args.duration:
            raise ValueError("silence add: say how long with --for, e.g. --for 2h")
        try:
            seconds = duration(args.duration)
        except Invalid as e:
            raise ValueError(f"--for {args.duration!r}: {e}") from None
        try:
            by = getpass.getuser()
        except (KeyError, OSError):
            by = ""
        return {"verb": "silence.add", "matchers": args.args, "for": seconds,
                "comment": args.comment, "by": by}
    if args.action == "expire":
        if len(args.args) != 1:
            raise ValueError("silence expire: give one silence id (see `silence list`)")
        return {"verb": "silence.expire", "id": args.args[0]}
    return {"verb": "silence.list"}


def _test(config_file: str, name: str | None) -> int:
    from gearvisor.config import ConfigError, load
    from gearvisor.helpers.notifier import send_test

    try:
        cfg = load(config_file)
    except ConfigError as e:
        print(f"gearvisor: invalid config\n{e}", file=sys.stderr)
        return 78
    channels = dict(cfg.alerts.channels) if cfg.alerts is not None else {}
    if not name or name not in channels:
        known = ", ".join(sorted(channels)) or "(none: add alerts.channels)"
        print(f"gearvisor alerts test: no channel named {name!r}; channels: {known}",
              file=sys.stderr)
        return 2
    result = send_test(channels[name])
    if not result.ok:
        print(f"gearvisor alerts test {name}: not delivered after {result.attempts} "
              f"attempt(s): {result.error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{name}: test notification delivered")
    return 0


def render_alerts(alerts: list[dict[str, Any]]) -> str:
    """A table like `amtool alert query`."""
    if not alerts:
        return "no pending or firing alerts"
    rows = [("ID", "ALERT", "STATE", "SEVERITY", "AGE", "ON", "NOTE")]
    for a in alerts:
        labels = a.get("labels", {})
        on = " ".join(f"{k}={labels[k]}" for k in ("pool", "function", "server") if k in labels)
        note = ", ".join(filter(None, ["acked" if a.get("acked") else "",
                                       *(f"muted by {m}" for m in a.get("mutedBy", []))]))
        rows.append((a["fingerprint"][:8], labels.get("alertname", "?"), a["state"],
                     labels.get("severity", "-"), _age(a.get("age")), on or "-", note))
    return _table(rows)


def render_silences(silences: list[dict[str, Any]]) -> str:
    if not silences:
        return "no silences"
    rows = [("ID", "STATE", "MATCHERS", "ENDS", "BY", "COMMENT")]
    for s in silences:
        rows.append((s["id"], s["state"], " ".join(s["matchers"]), s["endsAt"],
                     s.get("createdBy") or "-", s.get("comment") or ""))
    return _table(rows)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths,
                                                               strict=True)), r[-1]]).rstrip()
                     for r in rows)
