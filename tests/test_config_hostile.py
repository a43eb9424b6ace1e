"""Config: hostile input. For any bytes in the file, load() returns a Config or raises
ConfigError naming file, line and key path: never another exception, a hang or unbounded
memory. Each case here was found by trying it against the loader; test_config_fuzz.py
generates many more.

The cases that hung or exhausted memory before the fix (an alias bomb, a FIFO) run `gearvisor
check` as a subprocess with a timeout and a memory limit, so a regression fails the test
instead of the machine.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HOST, REPO, wait_for

from gearvisor import config
from gearvisor.config import ConfigError, Invalid, duration, float_range, parse, servers, size
from gearvisor.gearman.client import Client

MINIMAL = """\
pools:
  text:
    functions:
      reverse: "examples.text:reverse"
"""

FAST = 1.0  # seconds: every hostile input here is refused in milliseconds


@pytest.fixture(params=["libyaml", "python"])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with libyaml's parser (the default) and with PyYAML's pure-Python one (the
    fallback where libyaml is missing): both must hold the limits."""
    if request.param == "python":
        monkeypatch.setattr(config.yamlload, "_LOADER", config.yamlload._PyLoader)
    return request.param


def write(tmp_path: Path, text: str | bytes, name: str = "pools.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    path.write_bytes(text)
    return path


def refused(tmp_path: Path, text: str | bytes) -> tuple[ConfigError, float]:
    """load() a file that must be refused; return the error and how long load() took."""
    path = write(tmp_path, text)
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    elapsed = time.monotonic() - start
    rendered = info.value.render()
    assert all(line.startswith(str(path)) for line in rendered.splitlines()), rendered
    return info.value, elapsed


def problem(err: ConfigError, path: str) -> config.Problem:
    """The one problem at key path `path`."""
    found = [p for p in err.problems if p.path == path]
    assert found, f"no problem at {path!r} in:\n{err.render()}"
    return found[0]


def limited(max_bytes: int = 1 << 30) -> None:
    """preexec_fn: cap the address space, so a regression cannot eat the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


ISOLATED_LOAD = """
import json, sys, time
from gearvisor import config
if sys.argv[2] == "python":
    config.yamlload._LOADER = config.yamlload._PyLoader
start = time.monotonic()
try:
    config.load(sys.argv[1])
    out = {"result": "accepted"}
except config.ConfigError as e:
    out = {"result": "refused", "render": e.render(),
           "problems": [[p.path, p.line, p.message] for p in e.problems]}
out["elapsed"] = time.monotonic() - start
print(json.dumps(out))
"""


def isolated_load(path: Path, loader: str, timeout: float = 30) -> dict:
    """load() in a subprocess bounded in time and memory, for inputs that once took minutes
    and gigabytes: a regression fails this test, not the whole run (or the machine)."""
    out = subprocess.run([sys.executable, "-c", ISOLATED_LOAD, str(path), loader],
                         capture_output=True, text=True, timeout=timeout, preexec_fn=limited,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return json.loads(out.stdout)


def check(path: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`gearvisor check --no-import -c PATH` as a subprocess, bounded in time and memory."""
    return subprocess.run(
        [sys.executable, "-m", "gearvisor", "check", "--no-import", "-c", str(path), *args],
        capture_output=True, text=True, timeout=timeout, preexec_fn=limited,
        env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=path.parent)


# ---------------------------------------------------------------------------------------------
# Nesting, recursive aliases, alias bombs: refused while composing, before anything walks


def test_deep_flow_nesting_is_refused_fast(tmp_path: Path, loader: str) -> None:
    err, elapsed = refused(tmp_path, "x: " + "[" * 1500 + "]" * 1500 + "\n" + MINIMAL)
    assert elapsed < FAST
    [p] = err.problems
    # libyaml's scanner looks ahead in a flow collection and stops at its own limit (1000
    # levels) before our composer sees level 33; the message is the same
    assert p.line == 1 and p.path.startswith("x.0.0" if loader == "python" else "")
    assert "nested deeper than 32 levels" in p.message


def test_deep_block_nesting_is_refused_fast(tmp_path: Path, loader: str) -> None:
    text = "".join(" " * i + f"k{i}:\n" for i in range(1000))  # 1000 levels, ~0.5 MB
    err, elapsed = refused(tmp_path, text)
    assert elapsed < FAST
    [p] = err.problems
    assert p.line == 32 and p.path.startswith("k0.k1.k2")
    assert "nested deeper than 32 levels" in p.message


def test_nesting_within_the_limit_is_fine(tmp_path: Path) -> None:
    # Deep but legal: an env value of no interest 20 levels down is still only a type error.
    err, _ = refused(tmp_path, MINIMAL + "    env: {A: " + "[" * 20 + "]" * 20 + "}\n")
    assert "expected a string or number" in problem(err, "pools.text.env.A").message


@pytest.mark.parametrize("text", [
    "x: &r [*r]\n",
    "x: &r {a: *r}\n",
    "x: &r {<<: *r}\n",  # a recursive merge key: flatten_mapping recursed forever
    "x: &r [[[*r]]]\n",
])
def test_recursive_alias_is_refused(tmp_path: Path, loader: str, text: str) -> None:
    err, elapsed = refused(tmp_path, text + MINIMAL)
    assert elapsed < FAST
    [p] = err.problems
    assert p.line == 1 and p.path.startswith("x")
    assert "recursive alias" in p.message and "*r" in p.message


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n" + MINIMAL


def test_alias_bomb_is_refused_fast(tmp_path: Path, loader: str) -> None:
    # Before: the line map walked all 9**9 expanded nodes (minutes, gigabytes).
    out = isolated_load(write(tmp_path, billion_laughs()), loader)
    assert out["result"] == "refused" and out["elapsed"] < FAST
    [[path, line, message]] = out["problems"]
    assert "alias bomb" in message and "20000 values" in message
    assert (path, line) == ("a4", 5)  # 9**5 > 20000: the fifth level is too much


def test_alias_bomb_of_long_strings_is_refused(tmp_path: Path, loader: str) -> None:
    # Few nodes, but each alias repeats 100 KB of text: every parser would walk it again.
    text = 'a: &s "' + "x" * 100_000 + '"\nb: [' + ", ".join(["*s"] * 20) + "]\n" + MINIMAL
    err, elapsed = refused(tmp_path, text)
    assert elapsed < FAST
    assert "expand the text to more than 1048576 characters" in problem(err, "b").message


def test_alias_bomb_via_merge_keys_is_refused(tmp_path: Path, loader: str) -> None:
    text = "a0: &a0 {x: 1, y: 2}\n" + "".join(
        f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}, *a{i - 1}]}}\n" for i in range(1, 30))
    # Before: the constructor's flatten_mapping copied 3**29 key/value pairs.
    out = isolated_load(write(tmp_path, text + MINIMAL), loader)
    assert out["result"] == "refused" and out["elapsed"] < FAST
    assert "alias bomb" in out["problems"][0][2]


def test_aliases_and_merges_still_work(tmp_path: Path) -> None:
    text = """\
pools:
  a: &defaults
    processes: 3
    graceful_timeout: 1m
    functions: &fns {reverse: "examples.text:reverse"}
  b:
    <<: *defaults
    processes: 1
    functions: *fns
"""
    cfg = config.load(str(write(tmp_path, text)))
    assert cfg.pools["a"].processes == 3 and cfg.pools["b"].processes == 1
    assert cfg.pools["b"].graceful_timeout == 60.0
    assert cfg.pools["b"].functions == {"reverse": "examples.text:reverse"}


def test_alias_bomb_check_exits_78_without_traceback(tmp_path: Path) -> None:
    # Before: the line map expanded 9**9 nodes (minutes, gigabytes); the memory cap and the
    # timeout turn such a regression into a failure.
    path = write(tmp_path, billion_laughs())
    start = time.monotonic()
    out = check(path)
    assert out.returncode == 78, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{path}:5: a4: YAML column " in out.stderr
    assert time.monotonic() - start < 20


# ---------------------------------------------------------------------------------------------
# Huge numbers: int() refuses past 4300 digits, float() overflows, so does math.ceil(inf)


def test_thousands_of_digits_are_refused(tmp_path: Path, loader: str) -> None:
    err, _ = refused(tmp_path, MINIMAL + "    processes: " + "9" * 5000 + "\n")
    p = problem(err, "pools.text.processes")
    assert p.line == 5 and "5000 characters is too long" in p.message


@pytest.mark.parametrize("literal", ["0x" + "f" * 600, "9" * 700, "-" + "9" * 700])
def test_ints_of_more_than_600_digits_are_refused(tmp_path: Path, literal: str) -> None:
    err, _ = refused(tmp_path, MINIMAL + f"    processes: {literal}\n")
    assert "more than 600 digits" in problem(err, "pools.text.processes").message


BIG = "9" * 400

# (pool-level YAML, the key path of the problem, a fragment of the message)
HUGE_VALUES = [
    (f"processes: {BIG}", "pools.text.processes", "from 0 to 10000"),
    (f"graceful_timeout: {BIG}", "pools.text.graceful_timeout", "at most 168h (7 days)"),
    (f'graceful_timeout: "{BIG}s"', "pools.text.graceful_timeout", "at most 168h"),
    (f'graceful_timeout: "{BIG}.5h"', "pools.text.graceful_timeout", "at most 168h"),
    (f"graceful_timeout: 1.0e+{BIG[:3]}", "pools.text.graceful_timeout", "finite"),
    (f"max_lifetime: {BIG}", "pools.text.max_lifetime", "at most 720h (30 days)"),
    (f"backoff: {{multiplier: {BIG}}}", "pools.text.backoff.multiplier", "from 1.0 to 10.0"),
    (f"backoff: {{jitter: {BIG}}}", "pools.text.backoff.jitter", "from 0.0 to 1.0"),
    (f"quarantine: {{ratio: -{BIG}}}", "pools.text.quarantine.ratio", "from 0.0 to 1.0"),
    (f"max_memory: {BIG}", "pools.text.max_memory", "1024T"),
    (f"max_memory: {BIG}G", "pools.text.max_memory", "1024T"),
    (f"log_file_max: {BIG}.5K", "pools.text.log_file_max", "1024T"),
    (f"rlimits: {{nofile: {BIG}}}", "pools.text.rlimits.nofile", "from 0 to"),
    (f"rlimits: {{as: {BIG}G}}", "pools.text.rlimits.as", "from 0 to"),
    (f"rlimit_nofile: {BIG}", "pools.text.rlimit_nofile", "from 16 to"),
    (f"max_jobs: {BIG}", "pools.text.max_jobs", "from 1 to"),
    (f"max_restarts: {BIG}", "pools.text.max_restarts", "from 0 to"),
    (f"poison_after: {BIG}", "pools.text.poison_after", "from 0 to 1000"),
    (f"output_rate: {BIG}", "pools.text.output_rate", "from 1 to"),
    (f"max_surge: {BIG}", "pools.text.max_surge", "from 1 to 10000"),
    (f'max_surge: "{BIG}%"', "pools.text.max_surge", "up to 100%"),
    (f"umask: {BIG}", "pools.text.umask", "octal umask"),
    (f'servers: "gm1:{BIG}"', "pools.text.servers.0", "port from 1 to 65535"),
    (f"user: {BIG}", "pools.text.user", "user that exists"),
    (f'group: "{BIG}"', "pools.text.group", "group that exists"),
    (f"user: {'9' * 4400}", "pools.text.user", "too long"),
    (f"functions: {{f: {{callable: 'a:b', timeout: '{BIG}s'}}}}", "pools.text.functions.f.timeout",
     "at most 168h"),
]


@pytest.mark.parametrize(("pool_yaml", "path", "message"), HUGE_VALUES,
                         ids=[v[0][:24] for v in HUGE_VALUES])
def test_400_digit_values_are_refused_by_their_setting(
        tmp_path: Path, pool_yaml: str, path: str, message: str) -> None:
    err, _ = refused(tmp_path, MINIMAL + f"    {pool_yaml}\n")
    p = problem(err, path)
    assert message in p.message, p.message
    assert p.line is not None


def test_huge_numbers_in_parsers_directly() -> None:
    # The YAML layer stops past 600 digits; a parser must also hold for what gets through.
    for bad in (10**400, -(10**400)):
        with pytest.raises(Invalid):
            duration(bad)
        with pytest.raises(Invalid):
            float_range(0.0, 1.0)(bad)
        with pytest.raises(Invalid):
            size(bad)
    with pytest.raises(Invalid, match="at most"):
        duration("9" * 400 + "s")
    with pytest.raises(Invalid):
        size("9" * 400 + "T")


# ---------------------------------------------------------------------------------------------
# Infinite or absurd durations


@pytest.mark.parametrize(("pool_yaml", "path"), [
    ('graceful_timeout: "99999999999999999999999999999999999999999s"', "graceful_timeout"),
    ("graceful_timeout: 1000000h", "graceful_timeout"),
    ("graceful_timeout: 169h", "graceful_timeout"),
    ("graceful_timeout: .inf", "graceful_timeout"),
    ("timeout_grace: 2h", "timeout_grace"),
    ("connect_timeout: 61m", "connect_timeout"),
    ("startsecs: 3601", "startsecs"),
    ("max_lifetime: 721h", "max_lifetime"),
    ("backoff: {max: 25h}", "backoff.max"),
    ("quarantine: {cooldown_max: 169h}", "quarantine.cooldown_max"),
    ("functions: {f: {callable: 'a:b', timeout: 169h}}", "functions.f.timeout"),
])
def test_durations_have_a_maximum(tmp_path: Path, pool_yaml: str, path: str) -> None:
    # Before: "999...9s" was accepted as infinity, and every child then died on stop with
    # OverflowError (math.ceil(inf) in its stop timer).
    err, _ = refused(tmp_path, MINIMAL + f"    {pool_yaml}\n")
    p = problem(err, f"pools.text.{path}")
    assert "at most" in p.message or "finite" in p.message, p.message


def test_durations_at_their_maximum_are_accepted(tmp_path: Path) -> None:
    text = MINIMAL.replace('      reverse: "examples.text:reverse"\n',
                           "      reverse: {callable: 'examples.text:reverse', timeout: 168h}\n")
    text += ("    graceful_timeout: 168h\n    max_lifetime: 720h\n    timeout_grace: 1h\n"
             "    backoff: {max: 24h, multiplier: 10}\n")
    pool = config.load(str(write(tmp_path, text))).pools["text"]
    assert pool.graceful_timeout == 7 * 86400 and pool.max_lifetime == 30 * 86400
    assert pool.timeouts == {"reverse": 7 * 86400}
    assert pool.backoff.max == 86400 and pool.backoff.multiplier == 10.0


def test_the_error_says_the_maximum(tmp_path: Path) -> None:
    err, _ = refused(tmp_path, MINIMAL + "    graceful_timeout: 200h\n")
    assert err.render() == (f"{tmp_path / 'pools.yaml'}:5: pools.text.graceful_timeout: "
                            "expected a duration of at most 168h (7 days), got '200h'")


# ---------------------------------------------------------------------------------------------
# NUL bytes and lone surrogates in paths, commands, the socket path and env


NUL_VALUES = [
    ('cwd: "a\\0b"', "pools.text.cwd"),
    ('log_file: "/tmp/a\\0b"', "pools.text.log_file"),
    ('watch: ["a\\0b"]', "pools.text.watch.0"),
    ('env: {A: "x\\0y"}', "pools.text.env.A"),
    ('user: "root\\0"', "pools.text.user"),
    ('client_id_prefix: "web\\0"', "pools.text.client_id_prefix"),
]


@pytest.mark.parametrize(("pool_yaml", "path"), NUL_VALUES, ids=[p for _, p in NUL_VALUES])
def test_nul_byte_is_refused(tmp_path: Path, loader: str, pool_yaml: str, path: str) -> None:
    err, _ = refused(tmp_path, MINIMAL + f"    {pool_yaml}\n")
    assert "NUL byte" in problem(err, path).message


@pytest.mark.parametrize(("top_yaml", "path"), [
    ('pythonpath: ["lib\\0"]', "pythonpath.0"),
    ('control_socket: "/tmp/s\\0ck"', "control_socket"),
    ('servers: ["gm1\\0:4730"]', "servers.0"),
])
def test_nul_byte_at_the_top_level_is_refused(tmp_path: Path, top_yaml: str, path: str) -> None:
    err, _ = refused(tmp_path, top_yaml + "\n" + MINIMAL)
    p = problem(err, path)
    assert p.line == 1 and ("NUL byte" in p.message or "host:port" in p.message), p.message


@pytest.mark.parametrize("command", ['["php", "w\\0.php"]', '"php w\\0.php"'])
def test_nul_byte_in_a_command_is_refused(tmp_path: Path, command: str) -> None:
    text = f"pools:\n  php:\n    command: {command}\n    functions: [f]\n"
    err, _ = refused(tmp_path, text)
    assert any(p.path.startswith("pools.php.command") and "NUL byte" in p.message
               for p in err.problems), err.render()


@pytest.mark.parametrize("pool_yaml", [
    'cwd: "a\\ud800b"', 'env: {A: "\\udfff"}', 'command: ["php", "\\ud800"]',
    'log_file: "\\udc80"',
])
def test_lone_surrogate_is_refused(tmp_path: Path, loader: str, pool_yaml: str) -> None:
    # libyaml refuses the escape itself; PyYAML's own scanner accepts it, the setting not.
    err, _ = refused(tmp_path, MINIMAL + f"    {pool_yaml}\n")
    [p] = [p for p in err.problems if p.line == 5]
    assert ("must not contain a lone surrogate" in p.message
            or "found invalid Unicode character escape code" in p.message), p.message


def test_lone_surrogate_in_text_given_to_parse(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse(MINIMAL + "    cwd: a\ud800\n", str(tmp_path / "p.yaml"))
    assert info.value.problems[0].line == 5
    assert "surrogate" in info.value.render()
    info.value.render().encode("utf-8")  # printable, loggable


# ---------------------------------------------------------------------------------------------
# Names with a trailing newline: `$` matched before it; now every pattern is a full match


@pytest.mark.parametrize(("text", "path"), [
    ('pools:\n  "text\\n":\n    functions: {reverse: "examples.text:reverse"}\n',
     "pools.text\\n"),
    ('pools:\n  text:\n    functions: {"reverse\\n": "examples.text:reverse"}\n',
     "pools.text.functions.reverse\\n"),
    ('pools:\n  text:\n    functions: {reverse: "examples.text:reverse\\n"}\n',
     "pools.text.functions.reverse"),
    (MINIMAL + '    env: {"A\\n": x}\n', "pools.text.env.A\\n"),
    ('pools:\n  php:\n    command: [php, w.php]\n    functions: ["f\\n"]\n',
     "pools.php.functions.0"),
])
def test_trailing_newline_in_a_name_is_refused(tmp_path: Path, text: str, path: str) -> None:
    err, _ = refused(tmp_path, text)
    rendered = err.render()
    # The newline is shown escaped: one problem is one line.
    assert len(rendered.splitlines()) == len(err.problems)
    assert f": {path}: " in rendered, rendered


def test_control_characters_in_keys_are_escaped_in_the_error(tmp_path: Path) -> None:
    err, _ = refused(tmp_path, '"log\\nlevel\\x1b[31m": 1\n' + MINIMAL)
    [line] = err.render().splitlines()
    assert "log\\nlevel\\x1b[31m: unknown key" in line


# ---------------------------------------------------------------------------------------------
# Other shapes that raised


def test_function_mapping_with_an_int_key(tmp_path: Path) -> None:
    # Before: sorted() of {"bogus", 2} raised TypeError.
    text = 'pools:\n  text:\n    functions: {f: {callable: "a:b", bogus: 1, 2: 3}}\n'
    err, _ = refused(tmp_path, text)
    p = problem(err, "pools.text.functions.f.2")
    assert p.line == 3
    assert ("unknown key 2; a function takes callable, timeout, buckets, retry and "
            "failed_payload") in p.message


@pytest.mark.parametrize("scalar", ["0x_", "0b_", "-0x_", "2001-13-45", "2001-02-30",
                                    "2001-01-01t01:01:01+99"])
def test_scalars_pyyaml_cannot_construct(tmp_path: Path, loader: str, scalar: str) -> None:
    # Before: PyYAML let ValueError out ("invalid literal for int()", "month must be in 1..12").
    err, _ = refused(tmp_path, MINIMAL + f"    graceful_timeout: {scalar}\n")
    p = problem(err, "pools.text.graceful_timeout")
    assert p.line == 5 and "quote it if it is text" in p.message


@pytest.mark.parametrize(("text", "path", "line"), [
    ("!!python/object/apply:os.system ['echo hi']\n", "", 1),
    ("x: !!python/name:os.system\n" + MINIMAL, "x", 1),
    (MINIMAL + "    cwd: !!python/object/new:str [a]\n", "pools.text.cwd", 5),
    (MINIMAL + "    env: !custom {A: 1}\n", "pools.text.env", 5),
])
def test_yaml_tags_are_refused(tmp_path: Path, loader: str, text: str, path: str,
                               line: int) -> None:
    err, _ = refused(tmp_path, text)
    [p] = err.problems
    assert (p.path, p.line) == (path, line)
    assert "is not allowed: a config holds plain text" in p.message


@pytest.mark.parametrize("server", ["[::1::2]:4730", "[127.0.0.1]:4730", "[]:4730",
                                    "[gm1]", "[::1]x", "gm1:47:30", "gm\0:4730"])
def test_malformed_servers_are_refused(server: str) -> None:
    with pytest.raises(Invalid):
        servers(server)


@pytest.mark.parametrize(("raw", "host", "port"), [
    ("[::1]:4730", "::1", 4730),
    ("[fe80::1%eth0]:4731", "fe80::1%eth0", 4731),
    ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1", 4730),
    ("gm-1.example.com:99", "gm-1.example.com", 99),
    ("127.0.0.1", "127.0.0.1", 4730),
    ("gm_1", "gm_1", 4730),
])
def test_good_servers_still_parse(raw: str, host: str, port: int) -> None:
    assert servers(raw) == (config.Server(host, port),)


def test_malformed_ipv6_in_a_file(tmp_path: Path) -> None:
    err, _ = refused(tmp_path, 'servers: "[::1::2]:4730"\n' + MINIMAL)
    assert err.render() == (f"{tmp_path / 'pools.yaml'}:1: servers.0: expected an IPv6 "
                            "address in the brackets, such as \"[::1]:4730\", got "
                            "'[::1::2]:4730'")


def test_control_socket_path_too_long_for_a_unix_socket(tmp_path: Path) -> None:
    err, _ = refused(tmp_path, f"control_socket: /tmp/{'s' * 120}.sock\n" + MINIMAL)
    p = problem(err, "control_socket")
    assert p.line == 1 and "at most 107" in p.message


def test_many_problems_are_capped_and_counted(tmp_path: Path) -> None:
    text = "pools:\n" + "".join(f"  p{i}: {{processes: x, functions: {{f: 'a:b'}}}}\n"
                                for i in range(200))
    err, elapsed = refused(tmp_path, text)
    lines = err.render().splitlines()
    assert len(err.problems) == 200 and len(lines) == 51
    assert lines[-1].endswith("... and 150 more problems; fix these first")
    assert elapsed < FAST


def test_many_unknown_keys_stay_fast(tmp_path: Path) -> None:
    # Before: each problem was compared with every earlier one (quadratic).
    text = "".join(f"k{i}: 1\n" for i in range(9000)) + MINIMAL
    err, elapsed = refused(tmp_path, text)
    assert len(err.problems) == 9000
    assert elapsed < 5 * FAST


def test_long_values_are_shown_short(tmp_path: Path) -> None:
    err, _ = refused(tmp_path, MINIMAL + "    stop_signal: " + "X" * 500_000 + "\n")
    [line] = err.render().splitlines()
    assert len(line) < 300 and "XXX...XXX" in line


# ---------------------------------------------------------------------------------------------
# The file itself


def test_non_utf8_bytes_name_line_and_column(tmp_path: Path) -> None:
    err, _ = refused(tmp_path, MINIMAL.encode() + b"    cwd: caf\xe9\n")
    [p] = err.problems
    assert p.line == 5
    assert err.render().endswith(":5: column 13: byte 0xe9 is not UTF-8 text; save the file "
                                 "as UTF-8")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    err, _ = refused(tmp_path, text)
    assert err.render() == (f"{tmp_path / 'pools.yaml'}: has no settings (it is empty, or only "
                            "comments); a config needs at least `pools:`, see conf/pools.yaml")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n", "[pools]\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    err, _ = refused(tmp_path, text)
    [p] = err.problems
    assert p.line == 1 and p.message.startswith("expected a mapping at the top, got ")


@pytest.mark.parametrize("bad", ["x: a\x00b\n", "x: \x07\n", "x: \x1b[31m\n"])
def test_control_characters_in_the_file(tmp_path: Path, loader: str, bad: str) -> None:
    err, _ = refused(tmp_path, MINIMAL + bad)
    [p] = err.problems
    assert p.line == 5 and "is not allowed in YAML" in p.message


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path))
    assert info.value.render() == (f"{tmp_path}: is a directory; pass the config file itself "
                                   "with -c FILE (see conf/pools.yaml)")


def test_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path / "loop.yaml"))
    assert info.value.render().startswith(f"{tmp_path / 'loop.yaml'}: cannot read: ")


def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    path.chmod(0o000)
    if os.geteuid() != 0:
        with pytest.raises(ConfigError) as info:
            config.load(str(path))
        message = info.value.render()
    else:
        # root reads anything: load as an unprivileged user, in a forked child (real setuid)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    config.load(str(path))
                    text_ = "accepted"
                except ConfigError as e:
                    text_ = e.render()
                except BaseException as e:  # noqa: BLE001 - reported to the parent
                    text_ = f"escaped: {e!r}"
                os.write(w, text_.encode("utf-8", "backslashreplace"))
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            message = f.read().decode()
        os.waitpid(pid, 0)
    assert message == (f"{path}: permission denied; let the user gearvisor runs as read the "
                       "file (and enter its directories)")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    # Before: open() waited forever for a writer.
    path = tmp_path / "pools.yaml"
    os.mkfifo(path)
    out = check(path, timeout=20)
    assert out.returncode == 78
    assert out.stderr.strip().endswith(f"{path}: is not a regular file (a FIFO, socket or "
                                       "device); pass the config file itself with -c FILE")


def test_device_is_refused() -> None:
    out = check(Path("/dev/zero"))  # before: read until memory ran out
    assert out.returncode == 78
    assert "/dev/zero: is not a regular file" in out.stderr


def test_file_larger_than_1_mib(tmp_path: Path) -> None:
    err, elapsed = refused(tmp_path, MINIMAL + "#" * (1024 * 1024))
    assert err.render() == (f"{tmp_path / 'pools.yaml'}: is larger than 1024 KiB; a pool spec "
                            "is a few KiB: is this the right file?")
    assert elapsed < FAST


def test_file_just_under_1_mib_is_accepted(tmp_path: Path) -> None:
    text = MINIMAL + "#" * (1024 * 1024 - len(MINIMAL) - 1) + "\n"
    assert len(text) == 1024 * 1024
    start = time.monotonic()
    assert list(config.load(str(write(tmp_path, text))).pools) == ["text"]
    assert time.monotonic() - start < FAST


# ---------------------------------------------------------------------------------------------
# The CLI: exit 78 and the problems, never a traceback


HOSTILE_FILES = {
    "deep": "x: " + "[" * 1500 + "\n",
    "recursive": "x: &r [*r]\n" + MINIMAL,
    "bigint": MINIMAL + "    processes: " + "9" * 5000 + "\n",
    "infinite": MINIMAL + '    graceful_timeout: "' + "9" * 400 + 's"\n',
    "nul": MINIMAL + '    cwd: "\\0"\n',
    "bogus": 'pools:\n  text:\n    functions: {f: {callable: "a:b", bogus: 1, 2: 3}}\n',
    "badint": MINIMAL + "    processes: 0x_\n",
    "tag": "!!python/object/apply:os.system ['true']\n",
    "nonutf8": b"pools: \xff\n",
}


@pytest.mark.parametrize("name", list(HOSTILE_FILES))
def test_check_exits_78_with_no_traceback(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, HOSTILE_FILES[name])
    out = check(path)
    assert out.returncode == 78, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("gearvisor: invalid config\n")
    assert all(line.startswith(f"{path}:") for line in out.stderr.splitlines()[1:]), out.stderr


@pytest.mark.parametrize("name", ["deep", "recursive", "nonutf8"])
def test_reload_cli_exits_78_before_looking_for_a_master(tmp_path: Path, name: str) -> None:
    # `gearvisor reload` reads control_socket from the file first; that read was a plain
    # yaml.safe_load (RecursionError, UnicodeDecodeError escaped as tracebacks).
    path = write(tmp_path, HOSTILE_FILES[name])
    out = subprocess.run(
        [sys.executable, "-m", "gearvisor", "reload", "-c", str(path)],
        capture_output=True, text=True, timeout=30, preexec_fn=limited,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 78, out.stderr
    assert "Traceback" not in out.stderr
    assert "nothing was sent; the running fleet is unchanged" in out.stderr


@pytest.mark.parametrize("name", ["deep", "recursive", "nonutf8"])
def test_status_cli_finds_the_socket_in_a_hostile_file(tmp_path: Path, name: str) -> None:
    sock = tmp_path / "nobody-listens.sock"
    content = HOSTILE_FILES[name]
    line = f"control_socket: {sock}\n"
    content = (line.encode() + content) if isinstance(content, bytes) else line + content
    path = write(tmp_path, content)
    out = subprocess.run(
        [sys.executable, "-m", "gearvisor", "status", "-c", str(path)],
        capture_output=True, text=True, timeout=30, preexec_fn=limited,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "Traceback" not in out.stderr
    assert out.returncode == 3, out.stderr  # no master: at the socket the file names
    assert str(sock) in out.stderr


# ---------------------------------------------------------------------------------------------
# A running master refuses a hostile reload and keeps serving


@pytest.fixture
def fleet(gearmand, master, tmp_path: Path) -> Iterator:
    m = master({"servers": [gearmand.address], "watch_config": False,
                "pools": {"text": {"processes": 1, "watch": False,
                                   "functions": {"reverse": "examples.text:reverse"}}}})
    wait_for(lambda: len(gearmand.workers("text")) == 1, timeout=20,
             message="the child registered")
    yield m


@pytest.mark.integration
def test_master_refuses_hostile_reloads_and_keeps_serving(gearmand, fleet, tmp_path: Path
                                                          ) -> None:
    m = fleet
    child = {c["pid"] for c in m.status()["pools"][0]["children"]}
    head = f"control_socket: {tmp_path / 'gearvisor.sock'}\nlog_format: json\n"
    for i, name in enumerate(["deep", "recursive", "bigint", "infinite", "bogus", "badint"],
                             start=1):
        m.write_config(head + HOSTILE_FILES[name])
        m.signal(signal.SIGHUP)
        wait_for(lambda i=i: len(m.events("reload refused: invalid config; the fleet keeps "
                                          "its old config")) >= i,
                 timeout=20, message=f"reload #{i} ({name}) refused")
        assert m.proc.poll() is None, f"the master died on {name}"
    m.write_config(head + "x: [\n")
    out = m.ctl("reload")
    assert out.returncode == 78 and "Traceback" not in out.stderr, out.stderr
    # Still the same child, serving the old config.
    assert {c["pid"] for c in m.status()["pools"][0]["children"]} == child
    with Client(HOST, gearmand.port, timeout=20) as c:
        r = c.call("reverse", "abc")
    assert r.ok and r.data == b"cba"
