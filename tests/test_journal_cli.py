"""`gearvisor dead ...` and `gearvisor jobs` (gearvisor/cli/journal.py): run through the CLI's
own main() against a real store (SQLite, and the real PostgreSQL fixture where the SQL
matters), filled through Store.write; replay against a real gearmand, taken by a raw
worker."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HOST, Gearmand, free_port, wait_value
from test_store import rec, records
from test_store_helper import grab

from gearvisor.cli import journal as journal_cli
from gearvisor.cli.main import main
from gearvisor.journal import record, store

NOW = time.time()


def failed(unique: str, payload: bytes | None = b"mail body", **kw: Any) -> dict[str, Any]:
    """A dead failure record of send_mail, payload `payload` (None: failed_payload drop)."""
    extra: dict[str, Any] = {"unique": unique, "started": kw.pop("started", NOW - 60)}
    if payload is None:
        extra.update(payload=None, payload_size=9)
    else:
        extra.update(payload=base64.b64encode(payload).decode(), payload_size=len(payload))
    extra.update(kw)
    return rec("error", **extra)


class Env:
    """A config file naming a store (and job servers), the store itself, and the CLI."""

    def __init__(self, tmp: Path, url: str, servers: list[str]) -> None:
        self.tmp = tmp
        self.url = url
        self.config = tmp / "pools.yaml"
        self.write_config(servers)
        self.store = store.open_store(url, str(tmp / "state"))

    def write_config(self, servers: list[str]) -> None:
        self.config.write_text(
            f"state_dir: {self.tmp}/state\njournal: {{store: '{self.url}'}}\n"
            f"servers: {json.dumps(servers)}\n"
            "pools:\n  mail:\n    functions:\n      send_mail: app.mail:send\n")

    def fill(self, *items: dict[str, Any]) -> list[int]:
        """Write records; the failure ids of the failed ones, in order."""
        self.store.write(records(*items), now=NOW)
        return [r["failure_id"] for r in reversed(self.store.recent(limit=len(items)))
                if r["failure_id"] is not None]

    def cli(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        """Run `gearvisor ARGV -c CONFIG`: (exit code, stdout, stderr)."""
        capsys.readouterr()
        try:
            code = main([*argv, "-c", str(self.config)])
        except SystemExit as e:  # argparse's usage errors
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    def json(self, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
        code, out, err = self.cli(capsys, *argv, "--json")
        assert code == 0, err
        return json.loads(out)

    def state(self, fid: int) -> str:
        row = self.store.dead_show(fid)
        return "gone" if row is None else row["state"]


@pytest.fixture
def env(tmp_path: Path, store_url: str) -> Iterator[Env]:
    e = Env(tmp_path, store_url, [f"{HOST}:{free_port()}"])
    try:
        yield e
    finally:
        e.store.close()


@pytest.fixture
def sqlite_env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, f"sqlite:///{tmp_path}/state/journal.sqlite3", [f"{HOST}:{free_port()}"])
    try:
        yield e
    finally:
        e.store.close()


# -- dead list / show ---------------------------------------------------------------------


def test_dead_list_groups_by_fingerprint_with_counts_and_filters(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    ids = env.fill(failed("a", error="connect to 10.0.0.7:25 refused"),
                   failed("b", error="connect to 10.0.0.9:25 refused"),
                   failed("c", error="quota exceeded", error_class="Quota",
                          function="resize", started=NOW - 7200))
    got = env.json(capsys, "dead", "list")
    assert got["total"] == 3 and got["more"] is False
    mail, resize = got["groups"]
    assert (mail["function"], mail["count"], mail["id"]) == ("send_mail", 2, ids[1])
    assert mail["error_class"] == "SMTPError" and "refused" in mail["error"]
    assert 50 < mail["last_failed_age"] < 3600
    assert (resize["function"], resize["count"], resize["id"]) == ("resize", 1, ids[2])
    assert [g["function"] for g in env.json(capsys, "dead", "list", "--since", "1h")[
        "groups"]] == ["send_mail"]
    assert [g["function"] for g in env.json(capsys, "dead", "list", "--error", "QUOTA")[
        "groups"]] == ["resize"]
    assert env.json(capsys, "dead", "list", "--function", "nope")["groups"] == []
    code, out, _ = env.cli(capsys, "dead", "list")
    header, first, second = out.splitlines()
    assert header.split() == ["FUNCTION", "COUNT", "FIRST", "LAST", "ID", "ERROR"]
    assert first.split()[:2] == ["send_mail", "2"] and str(ids[1]) in first
    assert code == 0 and "Quota: quota exceeded" in second


def test_dead_show_every_field_text_or_base64_payload(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    text_id, bin_id = env.fill(failed("t", b"hello \xc3\xa9", payload_sha256="ab" * 32),
                               failed("b", b"\xff\x00\xfe"))
    got = env.json(capsys, "dead", "show", str(text_id))
    assert (got["id"], got["state"], got["function"], got["unique"]) == (
        text_id, "dead", "send_mail", "t")
    assert (got["payload_text"], got["payload_base64"], got["payload_size"]) == (
        "hello é", None, 8)
    assert got["payload_sha256"] == "ab" * 32 and got["replayable"] is True
    assert got["traceback"] == "Traceback...\nSMTPError" and got["attempt"] == 1
    for key in store.FAILURE_COLUMNS:
        assert key in got or key == "payload"
    binary = env.json(capsys, "dead", "show", str(bin_id))
    assert binary["payload_text"] is None
    assert base64.b64decode(binary["payload_base64"]) == b"\xff\x00\xfe"
    code, out, _ = env.cli(capsys, "dead", "show", str(bin_id))
    assert code == 0 and "payload (base64, not UTF-8):\n/wD+" in out
    assert "sha256:" in out and "traceback:" in out


def test_dead_show_escapes_terminal_control_characters(
        sqlite_env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    # A child's error and payload are untrusted: an ESC sequence must not reach the tty.
    [fid] = sqlite_env.fill(failed("x", b"\x1b]2;owned\x07body", error="bad\x1b[2J"))
    code, out, _ = sqlite_env.cli(capsys, "dead", "show", str(fid))
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "\\x1b]2;owned\\x07body" in out and "bad\\x1b[2J" in out
    code, out, _ = sqlite_env.cli(capsys, "dead", "list")
    assert code == 0 and "\x1b" not in out


def test_no_such_id_and_malformed_ids_are_one_clear_line(
        sqlite_env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    sqlite_env.fill(failed("a"))
    code, out, err = sqlite_env.cli(capsys, "dead", "show", "999")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "no failure with id 999" in err and "gearvisor dead list" in err
    for bad in ("abc", "-1", "0", "1" * 5000, "9" * 19, "1.5", "\x00"):
        code, out, err = sqlite_env.cli(capsys, "dead", "show", bad)
        assert (code, out) == (1, ""), bad
        assert "is not a dead letter id" in err and err.count("\n") == 1 and len(err) < 300


# -- jobs -------------------------------------------------------------------------------


def test_jobs_newest_first_with_filters(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.fill(rec(unique="old", started=NOW - 30, seconds=1.5),
             failed("bad"),
             rec(unique="new", function="resize", started=NOW - 5))
    got = env.json(capsys, "jobs")["jobs"]
    assert [j["unique"] for j in got] == ["new", "bad", "old"]
    assert got[2]["seconds"] == 1.5 and got[2]["outcome"] == "success"
    assert (got[2]["pool"], got[2]["slot"], got[2]["host"]) == ("mail", 0, "h1")
    assert [j["unique"] for j in env.json(capsys, "jobs", "--failed")["jobs"]] == ["bad"]
    assert [j["unique"] for j in env.json(capsys, "jobs", "--unique", "old")["jobs"]] == ["old"]
    assert [j["unique"] for j in env.json(capsys, "jobs", "--function", "resize")[
        "jobs"]] == ["new"]
    assert len(env.json(capsys, "jobs", "--limit", "1")["jobs"]) == 1
    code, out, _ = env.cli(capsys, "jobs")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["WHEN", "FUNCTION", "UNIQUE", "OUTCOME"]
    assert "mail/0/h1" in lines[1] and "SMTPError" in lines[2]
    # journal.successes is off by default: the table says why a success may be missing
    assert "journal.successes: true" in lines[-1]
    assert env.json(capsys, "jobs")["successes_recorded"] is False
    code, out, _ = env.cli(capsys, "jobs", "--failed")
    assert "journal.successes" not in out


@pytest.mark.parametrize("limit", ["10001", "9" * 400, "-5", "many", "1e9"])
def test_jobs_hostile_limit_is_refused_clearly(
        sqlite_env: Env, capsys: pytest.CaptureFixture[str], limit: str) -> None:
    code, out, err = sqlite_env.cli(capsys, "jobs", "--limit", limit)
    assert (code, out) == (2, "")  # (a usage error, as argparse's)
    assert "--limit" in err and "from 0 to 10000" in err and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "text"), [
    (("dead", "list", "--since", "yesterday"), "--since 'yesterday': expected an age"),
    (("dead", "list", "--since", "0s"), "--since '0s'"),
    (("dead", "list", "--since", "9" * 50 + "d"), "at most 3650d"),
    (("dead", "replay", "1", "--rate", "fast"), "--rate 'fast': expected a rate"),
    (("dead", "replay", "1", "--rate", "0/s"), "--rate '0/s'"),
    (("dead", "replay", "1", "--rate", "100000/s"), "to 1000/s"),
])
def test_bad_since_and_rate_are_one_clear_line(
        sqlite_env: Env, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...],
        text: str) -> None:
    sqlite_env.fill(failed("a"))
    code, out, err = sqlite_env.cli(capsys, *argv)
    assert (code, out) == (2, "") and text in err and err.count("\n") == 1
    assert sqlite_env.state(1) == "dead"


def test_an_unreachable_store_is_one_clear_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "pools.yaml"
    url = f"postgresql://gv@{HOST}:{free_port()}/gv"
    config.write_text(f"journal: {{store: '{url}'}}\npools:\n  mail:\n    functions:\n"
                      "      send_mail: app.mail:send\n")
    capsys.readouterr()
    assert main(["dead", "list", "-c", str(config)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"{HOST}:" in err and "journal.store" in err and str(config) in err


def test_a_missing_sqlite_file_is_an_error_and_not_created(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "pools.yaml"
    config.write_text(f"state_dir: {tmp_path}/nowhere\npools:\n  mail:\n    functions:\n"
                      "      send_mail: app.mail:send\n")
    capsys.readouterr()
    assert main(["jobs", "-c", str(config)]) == 1
    _, err = capsys.readouterr()
    assert f"no job journal at {tmp_path}/nowhere/journal.sqlite3" in err
    assert not (tmp_path / "nowhere").exists()


# -- delete ------------------------------------------------------------------------------


def test_delete_by_filter_refuses_a_wrong_count_and_deletes_on_the_right_one(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    keep = env.fill(failed("r", function="resize"))
    ids = env.fill(failed("a"), failed("b"), failed("c"))
    for wrong in ("2", "4", "0"):
        code, out, err = env.cli(capsys, "dead", "delete", "--function", "send_mail",
                                 "--expect", wrong)
        assert (code, out) == (1, "") and f"3 dead letters match, not {wrong}" in err
        assert "nothing was deleted" in err
        assert [env.state(i) for i in ids] == ["dead"] * 3
    code, out, err = env.cli(capsys, "dead", "delete", "--function", "send_mail")
    assert code == 2 and "needs --expect N" in err and env.state(ids[0]) == "dead"
    got = env.json(capsys, "dead", "delete", "--function", "send_mail", "--expect", "3")
    assert got == {"deleted": 3, "matched": 3}
    assert [env.state(i) for i in ids] == ["gone"] * 3 and env.state(keep[0]) == "dead"


def test_delete_by_ids_says_how_many_existed(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    ids = env.fill(failed("a"), failed("b"))
    code, out, err = env.cli(capsys, "dead", "delete", str(ids[0]), str(ids[1]), "99999")
    assert code == 0 and out.strip() == "deleted 2 of 3 (the other 1 did not exist)"
    assert [env.state(i) for i in ids] == ["gone", "gone"]


def test_delete_refuses_ids_with_filters_and_needs_a_selection(
        sqlite_env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    [fid] = sqlite_env.fill(failed("a"))
    for argv in (("dead", "delete", str(fid), "--function", "send_mail", "--expect", "1"),
                 ("dead", "delete", "--expect", "1"),
                 ("dead", "delete", str(fid), "--expect", "1"),
                 ("dead", "replay")):
        code, out, err = sqlite_env.cli(capsys, *argv)
        assert (code, out) == (2, "") and err.count("\n") == 1, argv
    assert sqlite_env.state(fid) == "dead"


# -- replay (a real gearmand) -------------------------------------------------------------


def test_replay_submits_with_the_retry_unique_and_marks_replayed(
        env: Env, gearmand: Gearmand, capsys: pytest.CaptureFixture[str]) -> None:
    [fid] = env.fill(failed("mail-7", b"body of mail-7", attempt=3))
    env.write_config([f"{HOST}:{free_port()}", gearmand.address])  # the first one is down
    got = env.json(capsys, "dead", "replay", str(fid))
    assert got["submitted"] == [{"id": fid, "function": "send_mail", "unique": "mail-7",
                                 "attempt": 4, "size": 14,
                                 "retry_unique": f"gv:{fid}:4:mail-7"}]
    assert env.state(fid) == "replayed"
    wait_value(lambda: gearmand.gearadmin("--status"), lambda out: "send_mail\t1\t0\t0" in out,
               message="the replay queued on gearmand (gearadmin --status)")
    job = grab(gearmand.port, "send_mail", 10)
    assert job == (f"gv:{fid}:4:mail-7", b"body of mail-7")
    assert record.parse_unique(job[0]) == ("mail-7", 4, fid)
    # It is not a dead letter any more: a second replay finds nothing.
    code, _, err = env.cli(capsys, "dead", "replay", str(fid))
    assert code == 1 and f"{fid} is replayed" in err


def test_replay_by_function_paced_skips_what_has_no_whole_payload(
        sqlite_env: Env, gearmand: Gearmand, capsys: pytest.CaptureFixture[str]) -> None:
    env = sqlite_env
    ok = env.fill(*(failed(f"m{i}", f"body {i}".encode()) for i in range(3)))
    dropped, cut = env.fill(failed("dropped", None),
                            failed("cut", b"part", payload_size=100_000, payload_cut=True))
    env.write_config([gearmand.address])
    dry = env.json(capsys, "dead", "replay", "--function", "send_mail", "--dry-run")
    assert [j["id"] for j in dry["would_submit"]] == ok
    assert [(s["id"], "payload" in s["why"]) for s in dry["skipped"]] == [
        (dropped, True), (cut, True)]
    assert [env.state(i) for i in ok] == ["dead"] * 3 and "send_mail" not in gearmand.status()
    started = time.monotonic()
    code, out, err = env.cli(capsys, "dead", "replay", "--function", "send_mail",
                             "--rate", "20/s")
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert elapsed >= 2 / 20 * 0.9  # three submissions, two intervals at 20/s
    assert "3 submitted, 2 skipped" in out and f"skipped {dropped}" in out
    assert "failed_payload" in out and "payload_cap" in out
    assert [env.state(i) for i in ok] == ["replayed"] * 3
    assert (env.state(dropped), env.state(cut)) == ("dead", "dead")
    wait_value(lambda: gearmand.status().get("send_mail"), lambda st: st and st.queued == 3,
               message="three replays queued")
    got = sorted(grab(gearmand.port, "send_mail", 10) for _ in range(3))
    assert got == [(f"gv:{fid}:2:m{i}", f"body {i}".encode()) for i, fid in enumerate(ok)]


def test_replay_with_no_server_reachable_exits_1_and_marks_nothing(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    ids = env.fill(failed("a"), failed("b"))
    env.write_config([f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"])
    code, out, err = env.cli(capsys, "dead", "replay", *map(str, ids))
    assert code == 1 and "no job server took" in err and "2 not submitted" in err
    assert "ConnectionRefusedError" in err
    assert [env.state(i) for i in ids] == ["dead", "dead"]


def test_replay_of_an_unknown_id_submits_nothing(
        sqlite_env: Env, gearmand: Gearmand, capsys: pytest.CaptureFixture[str]) -> None:
    [fid] = sqlite_env.fill(failed("a"))
    sqlite_env.write_config([gearmand.address])
    code, out, err = sqlite_env.cli(capsys, "dead", "replay", str(fid), "424242")
    assert (code, out) == (1, "") and "424242 does not exist" in err
    assert "nothing was submitted" in err and sqlite_env.state(fid) == "dead"
    assert "send_mail" not in gearmand.status()


def test_a_row_another_replay_took_is_not_submitted_twice(
        sqlite_env: Env, gearmand: Gearmand) -> None:
    [fid] = sqlite_env.fill(failed("a"))
    [row] = sqlite_env.store.select_dead(ids=[fid], with_payload=True)
    assert sqlite_env.store.mark_replayed([fid]) == 1  # the other operator was first
    replayer = journal_cli.Replayer(sqlite_env.store, [gearmand_server(gearmand)], 100.0)
    try:
        assert replayer.replay(row) is True
    finally:
        replayer.close()
    assert replayer.raced == [fid] and replayer.done == []
    assert "send_mail" not in gearmand.status()


def test_a_replay_interrupted_before_a_server_took_it_leaves_the_row_dead(
        sqlite_env: Env) -> None:
    [fid] = sqlite_env.fill(failed("a"))
    [row] = sqlite_env.store.select_dead(ids=[fid], with_payload=True)
    replayer = journal_cli.Replayer(sqlite_env.store, [], 100.0)

    def interrupted(*_args: Any) -> bool:
        assert sqlite_env.state(fid) == "replayed"  # claimed first, as a replay does
        raise KeyboardInterrupt

    replayer._submit = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        replayer.replay(row)
    assert sqlite_env.state(fid) == "dead" and replayer.done == []


def gearmand_server(g: Gearmand) -> Any:
    from gearvisor.config.model import Server

    return Server(HOST, g.port)


def test_the_commands_are_in_gearvisor_help() -> None:
    out = subprocess.run([sys.executable, "-m", "gearvisor", "--help"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert "dead" in out and "jobs" in out
    out = subprocess.run([sys.executable, "-m", "gearvisor", "dead", "--help"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    for action in ("list", "show", "replay", "delete"):
        assert action in out


def test_replay_pacing_is_bounded_by_the_rate() -> None:
    # Pure: the pacing arithmetic with a fake clock; a late start does not burst.
    t = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        t[0] += s

    class FakeStore:
        def mark_replayed(self, ids: list[int]) -> int:
            return 0  # every row "raced": nothing is submitted, only paced

    r = journal_cli.Replayer(FakeStore(), [], 4.0, clock=lambda: t[0], sleep=sleep)
    for i in range(5):
        r.replay({"id": i})
    assert slept == [0.25] * 4
    t[0] += 10  # a long pause (a slow store): the next goes at once, then 4/s again
    r.replay({"id": 9})
    r.replay({"id": 10})
    assert slept == [0.25] * 5
