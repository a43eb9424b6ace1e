"""Config: defaults, per-pool overrides, and errors that name file, line, key path and value."""

from __future__ import annotations

import ast
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gearvisor import config
from gearvisor.config import (
    SETTINGS,
    BackoffConfig,
    ConfigError,
    Invalid,
    KeepaliveConfig,
    Server,
    duration,
    markdown_reference,
    parse,
    servers,
)

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """\
pools:
  text:
    functions:
      reverse: "examples.text:reverse"
"""


def write(tmp_path: Path, text: str, name: str = "pools.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors(tmp_path: Path, text: str, *, euid: int = 1000) -> tuple[str, Path, ConfigError]:
    """Parse a config that must fail; return its error text, its path and the error."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        parse(text, str(path), euid=euid)
    return str(info.value), path, info.value


# ---------------------------------------------------------------------------------------------
# Good configs


def test_minimal_config_gets_every_default(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    cfg = config.load(str(path))
    assert cfg.path == str(path)
    assert cfg.pythonpath == (str(tmp_path),)
    assert cfg.log_level == "info"
    assert cfg.log_format == "auto"
    assert cfg.graceful_timeout == 30.0
    assert list(cfg.pools) == ["text"]
    pool = cfg.pools["text"]
    assert pool.name == "text"
    assert pool.processes == 1
    assert pool.functions == {"reverse": "examples.text:reverse"}
    assert pool.servers == (Server("127.0.0.1", 4730),)
    assert pool.graceful_timeout == 30.0
    assert pool.connect_timeout == 5.0
    assert pool.reconnect_max_delay == 2.0
    assert pool.backoff == BackoffConfig(initial=0.1, max=30.0, multiplier=2.0, jitter=0.1,
                                         reset_after=10.0)
    assert pool.keepalive == KeepaliveConfig(idle=30, interval=10, count=3)
    assert pool.env == {}
    assert pool.cwd == str(tmp_path)
    assert pool.user is None and pool.group is None
    assert pool.rlimit_nofile is None
    assert pool.client_id_prefix == (socket.gethostname().split(".")[0] or "gearvisor")
    assert pool.exception_packet == "warning"


def test_top_level_defaults_and_per_pool_overrides(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "work").mkdir()
    text = """\
servers: ["gm1:4731", "[::1]:4730"]
pythonpath: [lib]
graceful_timeout: 2m
connect_timeout: 500ms
log_level: debug
backoff:
  max: 60
  multiplier: 3
keepalive:
  idle: 60
env:
  A: "1"
  B: two
  FLAG: true
pools:
  images:
    processes: 4
    functions:
      resize: "examples.images:resize"
    servers: gm3
    graceful_timeout: 30
    backoff:
      initial: 1s
      jitter: 0
    keepalive:
      count: 9
    env:
      B: three
      C: 4
    cwd: work
    rlimit_nofile: 4096
    client_id_prefix: web-1
    exception_packet: exception
  text:
    functions:
      reverse: "examples.text:reverse"
"""
    cfg = parse(text, str(write(tmp_path, text)))
    assert cfg.pythonpath == (str(tmp_path / "lib"), str(tmp_path))
    assert cfg.graceful_timeout == 120.0
    assert cfg.log_level == "debug"

    images = cfg.pools["images"]
    assert images.processes == 4
    assert images.servers == (Server("gm3", 4730),)
    assert images.graceful_timeout == 30.0
    assert images.connect_timeout == 0.5
    # Nested blocks merge key by key: the pool's keys over the top level's over the defaults.
    assert images.backoff == BackoffConfig(initial=1.0, max=60.0, multiplier=3.0, jitter=0.0,
                                           reset_after=10.0)
    assert images.keepalive == KeepaliveConfig(idle=60, interval=10, count=9)
    assert images.env == {"A": "1", "B": "three", "C": "4", "FLAG": "true"}
    assert images.cwd == str(tmp_path / "work")
    assert images.rlimit_nofile == 4096
    assert images.client_id_prefix == "web-1"
    assert images.exception_packet == "exception"
    assert images.log_level == "debug"

    text_pool = cfg.pools["text"]
    assert text_pool.processes == 1
    assert text_pool.servers == (Server("gm1", 4731), Server("::1", 4730))
    assert text_pool.graceful_timeout == 120.0
    assert text_pool.backoff == BackoffConfig(initial=0.1, max=60.0, multiplier=3.0,
                                              jitter=0.1, reset_after=10.0)
    assert text_pool.keepalive == KeepaliveConfig(idle=60, interval=10, count=3)
    assert text_pool.env == {"A": "1", "B": "two", "FLAG": "true"}
    assert text_pool.cwd == str(tmp_path)


def test_user_and_group_accepted_as_root(tmp_path: Path) -> None:
    text = MINIMAL + "    user: root\n    group: root\n"
    pool = parse(text, str(write(tmp_path, text)), euid=0).pools["text"]
    assert (pool.user, pool.group) == ("root", "root")


# ---------------------------------------------------------------------------------------------
# Value parsers


@pytest.mark.parametrize(("raw", "seconds"), [
    (30, 30.0), (0, 0.0), (1.5, 1.5), ("30", 30.0), ("30s", 30.0), ("500ms", 0.5),
    ("2m", 120.0), ("1h", 3600.0), ("0.25s", 0.25), (" 10 s ", 10.0),
])
def test_duration(raw: object, seconds: float) -> None:
    assert duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", [-1, "-1s", "2 minutes", "ms", "", True, None, [1], "1d"])
def test_bad_duration(raw: object) -> None:
    with pytest.raises(Invalid, match="duration"):
        duration(raw)


def test_duration_rejects_nan_and_infinity() -> None:
    # A NaN backoff would make every restart delay 0: a crash loop with no delay.
    for bad in (math.nan, math.inf):
        with pytest.raises(Invalid):
            duration(bad)


@pytest.mark.parametrize(("raw", "parsed"), [
    ("[::1]:4730", (Server("::1", 4730),)),
    ("[::1]", (Server("::1", 4730),)),
    ("gm1", (Server("gm1", 4730),)),
    ("10.0.0.5:4731", (Server("10.0.0.5", 4731),)),
    (["a:1", "b"], (Server("a", 1), Server("b", 4730))),
])
def test_servers(raw: object, parsed: tuple[Server, ...]) -> None:
    assert servers(raw) == parsed


def test_server_str_brackets_ipv6() -> None:
    assert [str(s) for s in servers(["[::1]:4730", "gm1"])] == ["[::1]:4730", "gm1:4730"]


def test_duplicate_servers_rejected_even_via_default_port() -> None:
    with pytest.raises(Invalid, match="same server twice"):
        servers(["gm1", "gm1:4730"])


@pytest.mark.parametrize("raw", ["h:0", "h:65536", "::1:4730", "a b", [], 4730, ["ok", 1]])
def test_bad_servers(raw: object) -> None:
    with pytest.raises(Invalid):
        servers(raw)


# ---------------------------------------------------------------------------------------------
# Bad configs: the text names file, line, key path and value


def test_bad_value_names_file_line_key_and_value(tmp_path: Path) -> None:
    text = """\
pools:
  images:
    processes: four
    functions:
      resize: "examples.images:resize"
"""
    msg, path, err = errors(tmp_path, text)
    assert msg == (f"{path}:3: pools.images.processes: expected a whole number >= 0, "
                   "got 'four'")
    assert err.file == str(path)
    assert [(p.path, p.line) for p in err.problems] == [("pools.images.processes", 3)]


def test_bad_nested_value_names_dotted_path(tmp_path: Path) -> None:
    text = MINIMAL + "    backoff:\n      jitter: 2\n"
    msg, path, _ = errors(tmp_path, text)
    assert msg == f"{path}:6: pools.text.backoff.jitter: expected a number from 0.0 to 1.0, got 2"


def test_duplicate_servers_error_in_file(tmp_path: Path) -> None:
    text = 'servers: [gm1, "gm1:4730"]\n' + MINIMAL
    msg, path, _ = errors(tmp_path, text)
    assert msg == f"{path}:1: servers: lists the same server twice, got ['gm1', 'gm1:4730']"


def test_bad_server_item_names_its_index(tmp_path: Path) -> None:
    text = "servers:\n  - gm1\n  - gm2:99999\n" + MINIMAL
    msg, path, _ = errors(tmp_path, text)
    assert msg == f"{path}:3: servers.1: expected a port from 1 to 65535, got 'gm2:99999'"


def test_a_functions_key_on_the_pool_says_where_it_goes(tmp_path: Path) -> None:
    """`timeout:` beside `processes:` was answered with "did you mean timeout_grace"."""
    msg, path, _ = errors(tmp_path, MINIMAL + "    timeout: 5s\n")
    assert msg.startswith(f"{path}:5: pools.text.timeout: unknown key; timeout is a "
                          "function's: functions: {NAME: {callable: ..., timeout: ...}}"), msg


def test_unknown_key_with_suggestion(tmp_path: Path) -> None:
    text = "log_levle: debug\n" + MINIMAL + "    procesess: 2\n"
    msg, path, err = errors(tmp_path, text)
    lines = msg.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f'{path}:1: log_levle: unknown key; did you mean "log_level"?')
    assert lines[1].startswith(
        f'{path}:6: pools.text.procesess: unknown key; did you mean "processes"?')
    # A pool-only key is not offered at the top level, and vice versa.
    assert "processes" not in lines[0]
    assert "pythonpath" not in lines[1]


def test_unknown_nested_key_with_suggestion(tmp_path: Path) -> None:
    text = "backoff:\n  intial: 1\n" + MINIMAL
    msg, path, _ = errors(tmp_path, text)
    assert msg == (f'{path}:2: backoff.intial: unknown key; did you mean "initial"? '
                   "(known: initial, jitter, max, multiplier, reset_after)")


def test_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    text = "zzzz: 1\n" + MINIMAL
    msg, path, _ = errors(tmp_path, text)
    assert msg.startswith(f"{path}:1: zzzz: unknown key (known: ")
    assert "did you mean" not in msg


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    text = "pools:\n  text:\n    functions: [a\n    processes: 2\n"
    msg, path, err = errors(tmp_path, text)
    assert msg.startswith(f"{path}:4: YAML syntax error column ")
    assert err.problems[0].line == 4


def test_duplicate_key(tmp_path: Path) -> None:
    text = MINIMAL + "    processes: 2\n    processes: 3\n"
    msg, path, _ = errors(tmp_path, text)
    assert msg == f"{path}:6: pools.text.processes: key is given twice; remove one"


def test_missing_functions(tmp_path: Path) -> None:
    text = "pools:\n  text:\n    processes: 2\n"
    msg, path, _ = errors(tmp_path, text)
    assert msg == (f'{path}:2: pools.text: missing "functions": map each gearman function '
                   'name to "module:callable" (or give a `command:` to run an external '
                   'worker)')


COMMAND_MAPPING = """\
pools:
  php:
    command: [php, worker.php]
    ready: registered
    functions:
      resize: {timeout: 30s, failed_payload: hash}
      thumb:
      crop: {failed_payload: drop, retry: {max_attempts: 3}}
"""


def test_a_command_pool_maps_its_functions_to_their_timeouts_and_payload_modes(
        tmp_path: Path) -> None:
    cfg = config.load(str(write(tmp_path, COMMAND_MAPPING)))
    pool = cfg.pools["php"]
    assert list(pool.command) == ["php", "worker.php"]
    assert sorted(pool.functions) == ["crop", "resize", "thumb"]
    assert pool.timeouts == {"resize": 30.0}
    assert pool.failed_payload == {"resize": "hash", "thumb": "store", "crop": "drop"}
    assert list(pool.retry) == ["crop"] and pool.retry["crop"].max_attempts == 3


@pytest.mark.parametrize(("entry", "where", "says"), [
    ("{callable: 'app:resize'}", "resize.callable", "`callable` is for Python pools"),
    ("{buckets: [1, 2]}", "resize.buckets", "has no job histogram; remove `buckets`"),
    ("'app:resize'", "resize", "Python callables are for Python pools, got 'app:resize'"),
    ("{timout: 30s}", "resize.timout",
     "unknown key 'timout'; a command pool's function takes timeout, retry and "
     "failed_payload"),
])
def test_a_command_pool_function_refuses_what_only_a_python_pool_has(
        tmp_path: Path, entry: str, where: str, says: str) -> None:
    text = f"pools:\n  php:\n    command: [php, w.php]\n    functions:\n      resize: {entry}\n"
    msg, path, _ = errors(tmp_path, text)
    assert msg.startswith(f"{path}:5: pools.php.functions.{where}: "), msg
    assert says in msg


@pytest.mark.parametrize("entry", ["", "{timeout: 5s}"])
def test_a_python_pool_function_without_a_callable_says_what_to_add(
        tmp_path: Path, entry: str) -> None:
    text = f"pools:\n  text:\n    functions:\n      reverse: {entry}\n"
    msg, path, _ = errors(tmp_path, text)
    assert msg == (f'{path}:4: pools.text.functions.reverse: missing "callable": map the '
                   'function to "module:callable" (or give the pool a `command:`)')


def test_missing_pools(tmp_path: Path) -> None:
    msg, path, _ = errors(tmp_path, "log_level: info\n")
    assert msg.startswith(f"{path}:1: pools: expected a mapping of pool name")
    assert msg.endswith("got None")


@pytest.mark.parametrize("target", ["nocolon", "mod:", ":attr", "mod:a b", "1mod:f"])
def test_bad_module_callable(tmp_path: Path, target: str) -> None:
    text = f'pools:\n  text:\n    functions:\n      reverse: "{target}"\n'
    msg, path, _ = errors(tmp_path, text)
    assert msg == (f'{path}:4: pools.text.functions.reverse: expected "module:callable" such '
                   f'as "examples.text:reverse", got {target!r}')


def test_missing_pythonpath_directory(tmp_path: Path) -> None:
    text = "pythonpath:\n  - .\n  - nowhere\n" + MINIMAL
    msg, path, _ = errors(tmp_path, text)
    assert msg == f"{path}:3: pythonpath.1: directory {tmp_path / 'nowhere'} does not exist"


def test_missing_cwd_directory(tmp_path: Path) -> None:
    text = MINIMAL + "    cwd: ../nowhere-gearvisor-test\n"
    msg, path, _ = errors(tmp_path, text)
    missing = os.path.normpath(tmp_path / ".." / "nowhere-gearvisor-test")
    assert msg == f"{path}:5: pools.text.cwd: directory {missing} does not exist"


def test_missing_top_level_cwd_is_reported_where_it_is_written(tmp_path: Path) -> None:
    text = "cwd: nowhere\n" + MINIMAL
    msg, path, _ = errors(tmp_path, text)
    assert msg == f"{path}:1: cwd: directory {tmp_path / 'nowhere'} does not exist"


@pytest.mark.parametrize("which", ["user", "group"])
def test_user_or_group_needs_root(tmp_path: Path, which: str) -> None:
    text = MINIMAL + f"    {which}: root\n"
    msg, path, _ = errors(tmp_path, text, euid=1000)
    assert msg == (f"{path}:5: pools.text.{which}: switching {which} needs gearvisor to run as "
                   f"root; remove {which} or start gearvisor as root")


def test_unknown_user(tmp_path: Path) -> None:
    text = MINIMAL + "    user: no-such-user-gearvisor\n"
    msg, path, _ = errors(tmp_path, text, euid=0)
    assert msg == (f"{path}:5: pools.text.user: expected a user that exists on this machine, "
                   "got 'no-such-user-gearvisor'")


def test_backoff_max_below_initial(tmp_path: Path) -> None:
    text = MINIMAL + "    backoff:\n      initial: 5\n      max: 1\n"
    msg, path, _ = errors(tmp_path, text)
    assert msg == f"{path}:7: pools.text.backoff.max: must be >= backoff.initial (5.0), got 1.0"


def test_bad_env(tmp_path: Path) -> None:
    text = MINIMAL + "    env:\n      GOOD: 1\n      NESTED: {a: 1}\n"
    msg, path, _ = errors(tmp_path, text)
    assert msg == f"{path}:7: pools.text.env.NESTED: expected a string or number, got {{'a': 1}}"


def test_several_problems_reported_at_once_in_line_order(tmp_path: Path) -> None:
    text = """\
log_level: loud
pools:
  images:
    processes: four
    functions:
      resize: nocolon
  text:
    graceful_timeout: soon
    user: root
"""
    msg, path, err = errors(tmp_path, text, euid=1000)
    assert [(p.line, p.path) for p in err.problems] == [
        (1, "log_level"),
        (4, "pools.images.processes"),
        (6, "pools.images.functions.resize"),
        (7, "pools.text"),  # missing functions
        (8, "pools.text.graceful_timeout"),
        (9, "pools.text.user"),
    ]
    assert msg.splitlines()[0] == (f"{path}:1: log_level: expected one of debug, info, warning, "
                                   "error, got 'loud'")
    assert f"{path}:8: pools.text.graceful_timeout: expected a duration" in msg
    assert "got 'soon'" in msg


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    msg, path, _ = errors(tmp_path, "- a\n- b\n")
    assert msg == f"{path}:1: expected a mapping at the top, got ['a', 'b']"


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert str(info.value).startswith(f"{path}: file not found")


# ---------------------------------------------------------------------------------------------
# Docs generated from SETTINGS


def test_markdown_reference_lists_every_setting() -> None:
    table = markdown_reference()
    rows = table.splitlines()
    assert rows[0] == "| key | where | default | meaning |"
    assert len(rows) == 2 + len(SETTINGS)
    for setting, row in zip(SETTINGS, rows[2:], strict=True):
        assert row.startswith(f"| `{setting.key}` |")
        assert setting.doc in row
    assert "| `functions` | pool | required |" in table
    assert '| `servers` | top level or pool | `["127.0.0.1:4730"]` |' in table


def test_readme_contains_the_generated_reference() -> None:
    readme = REPO / "README.md"
    if not readme.exists():
        pytest.skip("README.md does not exist yet")
    assert markdown_reference() in readme.read_text()


def test_top_level_cwd_shared_by_two_pools_is_reported_once(tmp_path: Path) -> None:
    text = ("cwd: nowhere\npools:\n  a:\n    functions: {f: m:f}\n"
            "  b:\n    functions: {g: m:g}\n")
    msg, path, _ = errors(tmp_path, text)
    assert msg == f"{path}:1: cwd: directory {tmp_path / 'nowhere'} does not exist"


def test_max_job_size_defaults_to_64m_and_takes_a_size(tmp_path: Path) -> None:
    text = ("max_job_size: 16M\npools:\n  a: {functions: {r: 'examples.text:reverse'}}\n"
            "  b: {functions: {r: 'examples.text:reverse'}, max_job_size: 1024}\n")
    cfg = parse(text, str(write(tmp_path, text)))
    assert (cfg.pools["a"].max_job_size, cfg.pools["b"].max_job_size) == (16 * 1024 * 1024, 1024)
    assert parse(MINIMAL, str(write(tmp_path, MINIMAL))).pools["text"].max_job_size == (
        64 * 1024 * 1024)


def test_bad_max_job_size_names_the_key_and_value(tmp_path: Path) -> None:
    msg, path, _ = errors(tmp_path, "pools:\n  a:\n    functions: {r: 'examples.text:reverse'}\n"
                                    "    max_job_size: huge\n")
    assert f"{path}:4: pools.a.max_job_size: expected a size from 1 byte to 1024T" in msg
    assert "'huge'" in msg


# ---------------------------------------------------------------------------------------------
# The package: modules that import on their own, in no cycle; one public surface

PACKAGE = REPO / "gearvisor" / "config"
SUBMODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))


def run_python(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter on this checkout, bounded in time."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.parametrize("module", SUBMODULES)
def test_each_config_module_imports_in_a_fresh_interpreter(module: str) -> None:
    out = run_python("-c", f"import gearvisor.config.{module}")
    assert out.returncode == 0, out.stderr[-2000:]


def test_config_modules_import_each_other_without_a_cycle() -> None:
    """Each module imports only modules of the package, never the package itself (whose
    __init__ imports them all, which would hide a cycle), and the imports form no cycle."""
    graph: dict[str, set[str]] = {}
    for module in SUBMODULES:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{module}.py: use absolute imports"
                names.add(node.module or "")
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        assert "gearvisor.config" not in names, f"{module}.py imports the package itself"
        graph[module] = {n.rsplit(".", 1)[1] for n in names
                         if n.startswith("gearvisor.config.")}
    assert graph and set().union(*graph.values()) <= set(graph)
    done: set[str] = set()

    def visit(module: str, chain: tuple[str, ...]) -> None:
        assert module not in chain, "import cycle: " + " -> ".join((*chain, module))
        if module not in done:
            for imported in graph[module]:
                visit(imported, (*chain, module))
            done.add(module)

    for module in graph:
        visit(module, ())


def config_imports() -> set[tuple[str, str]]:
    """(file, name) for every name imported from gearvisor.config in gearvisor/, tests/,
    bench/ and examples/, absolute (`from gearvisor.config import X`) or relative
    (`from ..config import X`)."""
    found = set()
    for top in ("gearvisor", "tests", "bench", "examples"):
        for path in (REPO / top).rglob("*.py"):
            if PACKAGE in path.parents:
                continue
            package = list(path.relative_to(REPO).parent.parts)
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                base = package[:len(package) - node.level + 1] if node.level else []
                if ".".join(base + (node.module or "").split(".")) == "gearvisor.config":
                    found.update((str(path.relative_to(REPO)), a.name) for a in node.names)
    return found


def test_the_package_exports_every_name_imported_from_it() -> None:
    imports = config_imports()
    # the scan finds what is there, absolute and relative
    assert ("tests/test_config.py", "markdown_reference") in imports
    assert any(f.startswith("gearvisor/") for f, _ in imports)
    missing = sorted((f, name) for f, name in imports if name not in config.__all__)
    assert not missing, f"re-export these in gearvisor/config/__init__.py: {missing}"
    assert all(hasattr(config, name) for name in config.__all__)


def test_python_m_gearvisor_config_prints_the_reference() -> None:
    out = run_python("-m", "gearvisor.config", "--markdown")
    assert (out.returncode, out.stdout, out.stderr) == (0, markdown_reference() + "\n", "")
    out = run_python("-m", "gearvisor.config")
    assert out.returncode == 2 and "usage: python -m gearvisor.config --markdown" in out.stderr


@pytest.mark.parametrize(("written", "mode"), [
    ("077", 0o077), ("022", 0o022), ("0022", 0o022), ("22", 0o022), ('"077"', 0o077),
    ("0o027", 0o027), ("0", 0)])
def test_umask_reads_the_digits_as_written(tmp_path: Path, written: str, mode: int) -> None:
    """YAML 1.1 reads an unquoted `077` as the octal number 63: the umask must be 0o077,
    not the digits of 63 read as octal (0o63, which let the group write)."""
    text = ("pools:\n  a:\n    functions: {r: 'examples.text:reverse'}\n"
            f"    umask: {written}\n")
    assert parse(text, str(write(tmp_path, text))).pools["a"].umask == mode


# ---------------------------------------------------------------------------------------------
# metrics: the endpoint and the histogram buckets

METRICS_POOL = """\
pools:
  p:
    functions:
      f: "examples.text:reverse"
      g: {callable: "examples.text:upper", timeout: 5s, buckets: [0.1, 250ms, 1, 10]}
"""


def test_metrics_are_off_without_the_block_and_buckets_default_to_5ms_up_to_1h(
        tmp_path: Path) -> None:
    cfg = parse(METRICS_POOL, str(write(tmp_path, METRICS_POOL)))
    assert cfg.metrics is None
    f = cfg.pools["p"].buckets["f"]
    assert f[0] == 0.005 and f[-1] == 3600.0 and list(f) == sorted(f)
    assert cfg.pools["p"].buckets["g"] == (0.1, 0.25, 1.0, 10.0)
    assert cfg.pools["p"].timeouts == {"g": 5.0}


def test_metrics_listen_and_default_buckets(tmp_path: Path) -> None:
    text = 'metrics: {listen: "127.0.0.1:9464", buckets: [1, 2m]}\n' + METRICS_POOL
    cfg = parse(text, str(write(tmp_path, text)))
    assert cfg.metrics == config.MetricsConfig(Server("127.0.0.1", 9464), (1.0, 120.0))
    assert cfg.pools["p"].buckets == {"f": (1.0, 120.0), "g": (0.1, 0.25, 1.0, 10.0)}
    text = 'metrics: {listen: "[::1]:9464"}\n' + METRICS_POOL
    assert parse(text, str(write(tmp_path, text))).metrics.listen == Server("::1", 9464)


@pytest.mark.parametrize(("block", "message"), [
    ("metrics: {buckets: [1]}", 'metrics: missing "listen"'),
    ('metrics: {listen: "127.0.0.1"}', 'metrics.listen: expected "host:port"'),
    ('metrics: {listen: 9464}', 'metrics.listen: expected "host:port"'),
    ('metrics: {listen: "127.0.0.1:0"}', "metrics.listen: expected a port from 1 to 65535"),
    ('metrics: {listen: "h:1", buckets: [2, 1]}',
     "metrics.buckets.1: expected bounds in increasing order (1 after 2)"),
    ('metrics: {listen: "h:1", buckets: [0]}', "metrics.buckets.0: expected a bucket bound > 0"),
    ('metrics: {listen: "h:1", buckets: []}', "metrics.buckets: expected a list of increasing"),
    ('metrics: {listen: "h:1", buckets: [.nan]}', "metrics.buckets.0: expected a finite"),
    ('metrics: {listen: "h:1", buckets: [' + ", ".join(map(str, range(1, 66))) + "]}",
     "metrics.buckets: expected at most 64 buckets"),
    ('metrics: {listen: "h:1", bucket: [1]}', 'metrics.bucket: unknown key; did you mean '
     '"buckets"?'),
    ("metrics: 5", "metrics: expected a mapping, got 5"),
])
def test_bad_metrics_block_is_named(tmp_path: Path, block: str, message: str) -> None:
    text, path, _ = errors(tmp_path, block + "\n" + METRICS_POOL)
    assert f"{path}:1: {message}" in text


def test_bad_function_buckets_name_the_function(tmp_path: Path) -> None:
    text, path, _ = errors(tmp_path, METRICS_POOL.replace("250ms", "'soon'"))
    assert f"{path}:5: pools.p.functions.g.buckets.1: expected a duration" in text
    text, _, _ = errors(tmp_path, METRICS_POOL + "    metrics: {listen: 'h:1'}\n")
    assert "pools.p.metrics: unknown key" in text


def test_state_dir_defaults_to_var_lib_as_root_and_xdg_state_otherwise(tmp_path: Path) -> None:
    from gearvisor.config.load import default_state_dir

    assert default_state_dir(0, {}) == "/var/lib/gearvisor"
    assert default_state_dir(1000, {"XDG_STATE_HOME": "/x/state"}) == "/x/state/gearvisor"
    assert default_state_dir(1000, {"HOME": "/home/u"}) == "/home/u/.local/state/gearvisor"
    text = "state_dir: st\n" + MINIMAL
    assert parse(text, str(write(tmp_path, text))).state_dir == str(tmp_path / "st")
