"""`gearvisor dead ...` and `gearvisor jobs`: the operator's view of the job journal.

    gearvisor dead list [--function F] [--since 1h] [--error TEXT]    grouped by fingerprint
    gearvisor dead show ID                                            every field of one
    gearvisor dead replay ID... | --function F [--since ...] [--error ...] [--rate 10/s]
                          [--dry-run]                                 submit them again
    gearvisor dead delete ID... | --function F [--since ...] [--error ...] --expect N
    gearvisor jobs [--function F] [--unique U] [--failed] [--limit N] recent outcomes

Each reads `-c FILE` for where the store is (`journal.store`) and, for replay, the job
servers; it opens the store itself, so it works with no master running and, on a shared
PostgreSQL, from any host of the fleet. Exit codes: 0 done, 1 an error (the store, an id,
a bad value; one line on stderr says what and what to do), 2 a usage error, 78 a config
that does not load.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gearvisor.journal import record
from gearvisor.journal.store import MAX_LIST, Store, StoreError, open_store

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78
DEFAULT_RATE = 10.0  # replays per second
MAX_RATE = 1000.0  # replays per second at most: gearmand is shared with live traffic
MIN_RATE = 1 / 3600  # one an hour: slower is a typo, not a plan
MAX_SINCE = 3650 * 86400.0  # ten years: any --since past it is the same as none
SUBMIT_TIMEOUT = 5.0  # seconds a job server gets to connect and answer one submit
PAYLOAD_BATCH = 100  # dead letters whose payloads are read at once (each up to payload_cap)
GROUPS_SHOWN = 100  # groups `dead list` shows
ERROR_WIDTH = 70  # characters of an error a table shows
_ID = re.compile(r"[1-9][0-9]{0,17}")  # fits a 64-bit id (SQLite INTEGER, BIGINT)
_SINCE = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)(s|m|h|d|w)?")
_SINCE_UNITS = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_RATE = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)(?:/(s|sec|m|min|h|hour))?")
_RATE_UNITS = {None: 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0,
               "hour": 3600.0}
# C0 and C1 controls but newline and tab: a child's error text or payload must not drive
# the operator's terminal (an ESC sequence can rewrite what the screen shows).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class CliError(Exception):
    """One line for stderr and the exit code; raised anywhere below run()."""

    def __init__(self, text: str, code: int = EXIT_FAILED) -> None:
        super().__init__(text)
        self.code = code


# -- arguments --------------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    """`dead` (list, show, replay, delete) and `jobs`, on cli.main's subparsers."""

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", metavar="FILE", dest="sub_config",
                       help="the pool spec: its journal.store, and for replay its servers")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--function", metavar="F", help="only dead letters of this function")
        p.add_argument("--since", metavar="AGE",
                       help="only those that last failed within AGE (30m, 1h, 7d)")
        p.add_argument("--error", metavar="TEXT",
                       help="only those whose error contains TEXT (case-insensitive)")

    dead = sub.add_parser("dead", help="dead letters (failed jobs not retried): `dead list`, "
                          "`dead show ID`, `dead replay ...`, `dead delete ...`")
    actions = dead.add_subparsers(dest="dead_command", metavar="ACTION", required=True)
    lister = common(actions.add_parser(
        "list", help="dead letters grouped by function and error, with counts"))
    filters(lister)
    show = common(actions.add_parser("show", help="every field of one dead letter"))
    show.add_argument("id", metavar="ID", help="a failure id (from `gearvisor dead list`)")
    replay = common(actions.add_parser(
        "replay", help="submit dead letters again as background jobs to the job servers"))
    replay.add_argument("ids", nargs="*", metavar="ID")
    filters(replay)
    replay.add_argument("--rate", metavar="N/s", default=None,
                        help=f"submissions per second (default {DEFAULT_RATE:g}/s; also N/m, "
                        f"N/h; at most {MAX_RATE:g}/s)")
    replay.add_argument("--dry-run", action="store_true",
                        help="list what would be submitted; submit and change nothing")
    delete = common(actions.add_parser(
        "delete", help="delete dead letters: by id, or by filter with --expect N"))
    delete.add_argument("ids", nargs="*", metavar="ID")
    filters(delete)
    delete.add_argument("--expect", metavar="N", default=None,
                        help="with --function: delete only if exactly N match (see `dead "
                        "list`), else nothing")
    jobs = common(sub.add_parser(
        "jobs", help="recent job outcomes, newest first: did job U run, when, how long, "
        "how did it end"))
    jobs.add_argument("--function", metavar="F", help="only this function's jobs")
    jobs.add_argument("--unique", metavar="U", help="only jobs with this unique id")
    jobs.add_argument("--failed", action="store_true", help="only failures")
    jobs.add_argument("--limit", metavar="N", default="50",
                      help=f"show at most N (default 50, at most {MAX_LIST})")


def parse_id(text: str) -> int:
    """A failure id from the command line; CliError naming it if it is not one."""
    if not _ID.fullmatch(text):
        raise CliError(f"{text[:40]!r} is not a dead letter id: give the number `gearvisor "
                       "dead list` shows in its ID column")
    return int(text)


def parse_since(text: str, now: float) -> float:
    """--since AGE as the epoch time it names (now - AGE)."""
    m = _SINCE.fullmatch(text.strip())
    seconds = float(m.group(1)) * _SINCE_UNITS[m.group(2)] if m else -1.0
    if not 0 < seconds <= MAX_SINCE:
        raise CliError(f"--since {text[:40]!r}: expected an age such as 30m, 1h or 7d "
                       "(s, m, h, d, w; more than 0, at most 3650d)", EXIT_USAGE)
    return now - seconds


def parse_rate(text: str | None) -> float:
    """--rate N/s (or N/m, N/h, or N for per second) as submissions per second."""
    if text is None:
        return DEFAULT_RATE
    m = _RATE.fullmatch(text.strip())
    rate = float(m.group(1)) / _RATE_UNITS[m.group(2)] if m else 0.0
    if not MIN_RATE <= rate <= MAX_RATE:
        raise CliError(f"--rate {text[:40]!r}: expected a rate such as 10/s, 30/m or 100/h, "
                       f"from 1/h to {MAX_RATE:g}/s", EXIT_USAGE)
    return rate


def parse_count(text: str, what: str, most: int) -> int:
    """A count option (--limit, --expect) from 0 (or 1) to `most`."""
    if not re.fullmatch(r"[0-9]{1,12}", text) or int(text) > most:
        raise CliError(f"{what} {text[:40]!r}: expected a whole number from 0 to {most}",
                       EXIT_USAGE)
    return int(text)


# -- running ----------------------------------------------------------------------------------


def run(args: argparse.Namespace, config_file: str,
        opener: Callable[[Any], Store] | None = None) -> int:
    """Carry out `dead ...` or `jobs`; the process exit code. Errors are one line on stderr."""
    name = "jobs" if args.command == "jobs" else f"dead {args.dead_command}"
    from gearvisor.config import ConfigError, load

    try:
        cfg = load(config_file)
    except ConfigError as e:
        print(f"gearvisor: invalid config\n{e}", file=sys.stderr)
        return EXIT_CONFIG
    store: Store | None = None
    try:
        store = (opener or open_journal)(cfg)
        out = COMMANDS[name](args, cfg, store)
    except CliError as e:
        print(f"gearvisor {name}: {e}", file=sys.stderr)
        return e.code
    except StoreError as e:
        print(f"gearvisor {name}: {e}; check journal.store in {config_file} and that the "
              "store is up", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if store is not None:
            store.close()
    return out


def open_journal(cfg: Any) -> Store:
    """The config's store, opened for the CLI. A SQLite file that is not there is an error,
    not created: the CLI run as another user (root) would leave a file the master cannot
    write, and a missing file usually means -c names the wrong config."""
    path = cfg.journal.sqlite_path
    if path is not None and not os.path.exists(path):
        raise CliError(f"no job journal at {path}: the master has not recorded a job there "
                       "yet; check -c FILE (journal.store, state_dir)")
    return open_store(cfg.journal.url, cfg.journal.state_dir)


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text())


def cmd_list(args: argparse.Namespace, cfg: Any, store: Store) -> int:
    """`dead list`: dead letters grouped by function and error fingerprint."""
    now = time.time()
    since = parse_since(args.since, now) if args.since else None
    groups = store.dead_groups(args.function, since, args.error, limit=GROUPS_SHOWN + 1)
    more = len(groups) > GROUPS_SHOWN
    groups = groups[:GROUPS_SHOWN]
    for g in groups:
        g["first_failed_age"] = _seconds_ago(g["first_failed"], now)
        g["last_failed_age"] = _seconds_ago(g["last_failed"], now)
    _emit(args, {"groups": groups, "total": sum(g["count"] for g in groups), "more": more},
          lambda: render_groups(groups, more))
    return 0


def cmd_show(args: argparse.Namespace, cfg: Any, store: Store) -> int:
    """`dead show ID`: every field of one failure."""
    row = store.dead_show(parse_id(args.id))
    if row is None:
        raise CliError(f"no failure with id {args.id}: see `gearvisor dead list` (it may "
                       "have been deleted or trimmed by journal caps)")
    data = describe(row, time.time())
    _emit(args, data, lambda: render_show(data))
    return 0


def describe(row: dict[str, Any], now: float) -> dict[str, Any]:
    """A failures row for show: the payload as text when it is UTF-8, else base64, with
    its size, the bytes kept and its sha256 (the whole payload's, as the child saw it)."""
    data = dict(row)
    payload = data.pop("payload")
    data["payload_kept"] = None if payload is None else len(payload)
    data["payload_text"] = data["payload_base64"] = None
    if payload is not None:
        try:
            data["payload_text"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            data["payload_base64"] = base64.b64encode(payload).decode()
        if data["payload_sha256"] is None and not data["payload_cut"]:
            data["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    data["replayable"] = payload is not None and not data["payload_cut"]
    for key in ("first_failed", "last_failed", "due", "claimed_at"):
        data[f"{key}_age"] = _seconds_ago(data.get(key), now)
    return data


def _selection(args: argparse.Namespace, verb: str, now: float) -> dict[str, Any]:
    """What replay or delete act on: ids, or --function with filters (not both)."""
    filtered = args.function is not None or args.since or args.error
    if args.ids and filtered:
        raise CliError(f"give ids or --function (with --since, --error), not both: `dead "
                       f"{verb} 12 13` or `dead {verb} --function F`", EXIT_USAGE)
    if args.ids:
        if len(args.ids) > MAX_LIST:
            raise CliError(f"{len(args.ids)} ids: at most {MAX_LIST} at once")
        return {"ids": sorted({parse_id(i) for i in args.ids})}
    if args.function is None:
        raise CliError(f"which dead letters? give ids (`dead {verb} 12 13`) or --function F "
                       "(see `gearvisor dead list`)", EXIT_USAGE)
    return {"function": args.function, "error": args.error,
            "since": parse_since(args.since, now) if args.since else None}


def _not_dead(store: Store, ids: Sequence[int], found: Iterable[int]) -> str | None:
    """Why some of `ids` cannot be acted on (missing, or not dead letters), or None."""
    missing = sorted(set(ids) - set(found))
    if not missing:
        return None
    why = []
    for fid in missing[:5]:
        row = store.dead_show(fid)
        why.append(f"{fid} does not exist" if row is None else f"{fid} is {row['state']}")
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return (f"not dead letters: {', '.join(why)}{more} (see `gearvisor dead list`)")


def cmd_replay(args: argparse.Namespace, cfg: Any, store: Store) -> int:
    """`dead replay`: submit dead letters again as background jobs, each with
    retry_unique(id, attempt + 1, unique) so its next record updates the same row."""
    now = time.time()
    rate = parse_rate(args.rate)
    sel = _selection(args, "replay", now)
    rows = store.select_dead(**sel, limit=MAX_LIST)
    if "ids" in sel:
        why = _not_dead(store, sel["ids"], (r["id"] for r in rows))
        if why:
            raise CliError(f"{why}; nothing was submitted")
    servers = tuple(dict.fromkeys(s for p in cfg.pools.values() for s in p.servers))
    if not servers and not args.dry_run:
        raise CliError(f"no job servers in {cfg.path}: a pool's servers are where a replay "
                       "is submitted")
    result: dict[str, Any] = {"dry_run": args.dry_run, "submitted": [], "skipped": [],
                              "not_submitted": [], "raced": []}
    if args.dry_run:
        result["would_submit"] = []
    replayer = Replayer(store, servers, rate)
    try:
        for first in range(0, len(rows), PAYLOAD_BATCH):
            ids = [r["id"] for r in rows[first:first + PAYLOAD_BATCH]]
            # The payloads a batch at a time: all of them at once could be 10000 x payload_cap.
            batch = store.select_dead(ids=ids, with_payload=True, limit=PAYLOAD_BATCH)
            for r in sorted(batch, key=lambda r: r["id"]):
                skip = _skip(r)
                if skip is not None:
                    result["skipped"].append(skip)
                elif args.dry_run:
                    result["would_submit"].append(_job(r))
                elif not replayer.replay(r):
                    result["not_submitted"] = [x["id"] for x in rows if x["id"] >= r["id"]]
                    break
            if result["not_submitted"]:
                break
    finally:
        replayer.close()
    result["submitted"] = replayer.done
    result["raced"] = replayer.raced
    _emit(args, result, lambda: render_replay(result))
    if result["not_submitted"]:
        print(f"gearvisor dead replay: no job server took dead letter "
              f"{result['not_submitted'][0]} ({'; '.join(replayer.errors[-len(servers):])}); "
              f"{len(result['not_submitted'])} not submitted and left dead; "
              f"{len(replayer.done)} submitted; start a job server (servers in {cfg.path}) "
              "and run it again", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _job(r: dict[str, Any]) -> dict[str, Any]:
    attempt = int(r["attempt"] or 0) + 1
    return {"id": r["id"], "function": r["function"], "unique": r["unique"] or "",
            "attempt": attempt, "size": r["payload_size"],
            "retry_unique": record.retry_unique(r["id"], attempt, r["unique"] or "")}


def _skip(r: dict[str, Any]) -> dict[str, Any] | None:
    """Why dead letter `r` cannot be replayed (no whole payload kept), or None."""
    if r["payload_cut"]:
        why = ("its payload was kept cut (longer than journal.payload_cap); it cannot be "
               "run again")
    elif r["payload"] is None:
        why = "its payload was not kept (failed_payload: hash or drop)"
    else:
        return None
    return {"id": r["id"], "function": r["function"], "why": why}


class Replayer:
    """Submits replays one at a time, paced to `rate` per second: each row is first marked
    replayed (so two operators never both submit it), then submitted to the first job
    server that takes it, and put back to dead if none did."""

    def __init__(self, store: Store, servers: Sequence[Any], rate: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.store = store
        self.servers = servers
        self.interval = 1.0 / rate
        self.clock = clock
        self.sleep = sleep
        self.next_at = clock()
        self.clients: dict[Any, Any] = {}
        self.done: list[dict[str, Any]] = []
        self.raced: list[int] = []  # replayed by someone else meanwhile
        self.errors: list[str] = []

    def replay(self, r: dict[str, Any]) -> bool:
        """Submit dead letter `r` (with its payload); False if no job server took it."""
        delay = self.next_at - self.clock()
        if delay > 0:
            self.sleep(delay)
        self.next_at = max(self.next_at, self.clock()) + self.interval
        if not self.store.mark_replayed([r["id"]]):
            self.raced.append(r["id"])  # another replay (or a delete) got there first
            return True
        job = _job(r)
        try:
            submitted = self._submit(r["function"], r["payload"], job["retry_unique"])
        except BaseException:
            # Interrupted (Ctrl-C) before a job server took it: dead again, not left
            # `replayed` with nothing submitted.
            self.store.unmark_replayed([r["id"]])
            raise
        if submitted:
            self.done.append(job)
            return True
        self.store.unmark_replayed([r["id"]])
        return False

    def _submit(self, function: str, payload: bytes, unique: str) -> bool:
        from gearvisor.gearman.client import Client, ClientError

        for server in self.servers:
            try:
                client = self.clients.get(server)
                if client is None:
                    client = Client(server.host, server.port, timeout=SUBMIT_TIMEOUT)
                    self.clients[server] = client
                client.submit_background(function, payload, unique)
                return True
            except (OSError, ClientError, ValueError) as e:
                old = self.clients.pop(server, None)
                if old is not None:
                    old.close()
                self.errors.append(f"{server}: {type(e).__name__}: {e}")
        return False

    def close(self) -> None:
        """Close the job server connections."""
        for client in self.clients.values():
            client.close()
        self.clients.clear()


def cmd_delete(args: argparse.Namespace, cfg: Any, store: Store) -> int:
    """`dead delete`: by ids, or by filter only when exactly --expect N match."""
    now = time.time()
    sel = _selection(args, "delete", now)
    if "ids" in sel:
        if args.expect is not None:
            raise CliError("--expect goes with --function (and --since, --error); with ids, "
                           "the ids are what is deleted", EXIT_USAGE)
        gone = store.delete(sel["ids"])
        result = {"deleted": gone, "asked": len(sel["ids"])}
        _emit(args, result, lambda: f"deleted {gone} of {len(sel['ids'])} "
              f"(the other {len(sel['ids']) - gone} did not exist)" if gone < len(sel["ids"])
              else f"deleted {gone}")
        return 0
    if args.expect is None:
        raise CliError("deleting by filter needs --expect N, the count `gearvisor dead list` "
                       "shows for it: nothing was deleted", EXIT_USAGE)
    expect = parse_count(args.expect, "--expect", MAX_LIST)
    # Select first and delete exactly the rows counted: one that fails meanwhile and
    # matches too is not deleted unseen.
    rows = store.select_dead(**sel, limit=expect + 1)
    matched = len(rows) if len(rows) <= expect else store.count_dead(**sel)
    if matched != expect:
        raise CliError(f"{matched} dead letters match, not {expect}: nothing was deleted; "
                       "check with `gearvisor dead list` and give the right --expect")
    gone = store.delete([r["id"] for r in rows])
    result = {"deleted": gone, "matched": matched}
    _emit(args, result, lambda: f"deleted {gone} dead letters of {args.function}")
    return 0


def cmd_jobs(args: argparse.Namespace, cfg: Any, store: Store) -> int:
    """`gearvisor jobs`: recent outcomes, newest first."""
    limit = parse_count(args.limit, "--limit", MAX_LIST)
    rows = store.recent(args.function, args.unique, args.failed, limit)
    now = time.time()
    for r in rows:
        r["started_age"] = _seconds_ago(r["started"], now)
    successes = bool(cfg.journal.successes)
    note = ("" if successes or args.failed else
            "\n(successful jobs are recorded only when they end a failure; set "
            "journal.successes: true to record them all)")
    _emit(args, {"jobs": rows, "successes_recorded": successes},
          lambda: render_jobs(rows) + note)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Any, Store], int]] = {
    "dead list": cmd_list, "dead show": cmd_show, "dead replay": cmd_replay,
    "dead delete": cmd_delete, "jobs": cmd_jobs}


# -- rendering --------------------------------------------------------------------------------


def _seconds_ago(when: Any, now: float) -> float | None:
    return None if when is None else round(now - float(when), 3)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 0:
        return "in " + _age(-seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def clean(text: Any, width: int | None = None) -> str:
    """`text` safe for a terminal: control characters shown as \\xNN, and on one line cut
    to `width` when given (a table cell)."""
    s = "-" if text is None or text == "" else str(text)
    if width is not None:
        s = " ".join(s.split())
        if len(s) > width:
            s = s[:width - 3] + "..."
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)),
                                r[-1]]).rstrip() for r in rows)


def _error(cls: Any, text: Any) -> str:
    return f"{cls}: {text}" if cls and text else str(cls or text or "")


def render_groups(groups: list[dict[str, Any]], more: bool) -> str:
    """`dead list`'s table: one row per function and error fingerprint."""
    if not groups:
        return "no dead letters"
    rows = [("FUNCTION", "COUNT", "FIRST", "LAST", "ID", "ERROR")]
    for g in groups:
        rows.append((clean(g["function"], 40), str(g["count"]), _age(g["first_failed_age"]),
                     _age(g["last_failed_age"]), str(g["id"]),
                     clean(_error(g["error_class"], g["error"]), ERROR_WIDTH)))
    text = _table(rows)
    if more:
        text += f"\n(more groups than {GROUPS_SHOWN}; narrow with --function or --since)"
    return text


def _when(epoch: Any, age: float | None) -> str:
    if epoch is None:
        return "-"
    at = datetime.datetime.fromtimestamp(float(epoch)).astimezone()
    return f"{at.isoformat(timespec='seconds')} ({_age(age)} ago)"


def render_show(d: dict[str, Any]) -> str:
    """`dead show`'s key: value lines, payload and traceback last."""
    size = d["payload_size"]
    if d["payload_kept"] is None:
        payload = f"not kept, {size if size is not None else '?'} bytes"
    elif d["payload_cut"]:
        payload = f"{d['payload_kept']} of {size} bytes kept (cut: cannot be replayed)"
    else:
        payload = f"{d['payload_kept']} bytes"
    lines = [
        ("id", d["id"]), ("state", d["state"]), ("function", d["function"]),
        ("unique", d["unique"]), ("attempt", d["attempt"]), ("outcome", d["outcome"]),
        ("error", _error(d["error_class"], d["error"])),
        ("first failed", _when(d["first_failed"], d["first_failed_age"])),
        ("last failed", _when(d["last_failed"], d["last_failed_age"])),
        ("due", _when(d["due"], d["due_age"])),
        ("where", f"pool {clean(d['pool'])} slot {clean(d['slot'])} host {clean(d['host'])} "
                  f"generation {clean(d['generation'])}"),
        ("handle", f"{clean(d['handle'])} on {clean(d['server'])}"),
        ("fingerprint", d["fingerprint"]),
        ("payload", payload), ("sha256", d["payload_sha256"]),
        ("replayable", "yes" if d["replayable"] else "no"),
    ]
    if d["claimed_by"]:
        lines.append(("claimed", f"by {d['claimed_by']} "
                      f"{_when(d['claimed_at'], d['claimed_at_age'])}"))
    out = [f"{k + ':':14}{clean(v)}" for k, v in lines]
    if d["payload_text"] is not None:
        out += ["", "payload (text):", clean(d["payload_text"])]
    elif d["payload_base64"] is not None:
        out += ["", "payload (base64, not UTF-8):", d["payload_base64"]]
    if d["traceback"]:
        out += ["", "traceback:", clean(d["traceback"])]
    return "\n".join(out)


def render_replay(r: dict[str, Any]) -> str:
    """What replay did (or, with --dry-run, would do)."""
    out = []
    if r["dry_run"]:
        for j in r["would_submit"]:
            out.append(f"would submit {j['id']}  {clean(j['function'], 40)}  attempt "
                       f"{j['attempt']}  unique {clean(j['retry_unique'])}  "
                       f"{j['size'] if j['size'] is not None else '?'} bytes")
        out.append(f"dry run: {len(r['would_submit'])} would be submitted, nothing changed")
    else:
        for j in r["submitted"]:
            out.append(f"submitted {j['id']}  {clean(j['function'], 40)}  attempt "
                       f"{j['attempt']}  unique {clean(j['retry_unique'])}")
        for fid in r.get("raced", []):
            out.append(f"not submitted {fid}: replayed or deleted by someone else meanwhile")
    for s in r["skipped"]:
        out.append(f"skipped {s['id']}  {clean(s['function'], 40)}: {s['why']}")
    if not r["dry_run"]:
        out.append(f"{len(r['submitted'])} submitted, {len(r['skipped'])} skipped")
    return "\n".join(out)


def render_jobs(rows: list[dict[str, Any]]) -> str:
    """`gearvisor jobs`' table, newest first."""
    if not rows:
        return "no jobs recorded"
    table = [("WHEN", "FUNCTION", "UNIQUE", "OUTCOME", "ATTEMPT", "SECONDS", "WHERE",
              "ERROR")]
    for r in rows:
        where = f"{clean(r['pool'])}/{clean(r['slot'])}/{clean(r['host'])}"
        seconds = "-" if r["seconds"] is None else f"{float(r['seconds']):.3f}"
        table.append((_age(r["started_age"]), clean(r["function"], 40),
                      clean(r["unique"], 40), clean(r["outcome"]), clean(r["attempt"]),
                      seconds, where, clean(_error(r["error_class"], r["error"]), ERROR_WIDTH)))
    return _table(table)
