"""Config: property-based. Thousands of generated and mutated documents per run; for each,
load(path) returns a Config or raises ConfigError whose every line names the file, and it
finishes fast. Nothing else may escape: not ValueError, RecursionError, TypeError, OSError.

Deterministic (derandomize, no example database), so CI sees the same inputs on every run,
and nothing is written into the repository (hypothesis's own cache goes to a temp dir).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

import hypothesis.configuration
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gearvisor import config
from gearvisor.config import POOL_KEYS, SETTINGS, TOP_KEYS, ConfigError

REPO = Path(__file__).resolve().parent.parent

# Hypothesis caches what it learns (constants from our modules, already while pytest collects,
# and Unicode tables) under .hypothesis in the working directory, i.e. the repository. Send it
# to a temp dir, removed when the run ends; an operator's own HYPOTHESIS_STORAGE_DIRECTORY wins.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    _HOME = tempfile.mkdtemp(prefix="gearvisor-hypothesis-")
    atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
    hypothesis.configuration.set_hypothesis_home_dir(_HOME)
SLOW = 2.0  # seconds for one load; the inputs here are small, so a real one takes ~1 ms

FUZZ = settings(
    derandomize=True,  # the same inputs on every run: a CI failure reproduces locally
    database=None,  # no .hypothesis/examples in the repository
    deadline=None,  # timing is asserted below, against SLOW, not per example by hypothesis
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SEEDS = [
    (REPO / "conf" / "pools.yaml").read_bytes(),
    (REPO / "conf" / "stack.yaml").read_bytes(),
    b'pools:\n  text:\n    functions:\n      reverse: "examples.text:reverse"\n',
    b"""servers: ["127.0.0.1:4730", "[::1]:4731"]
env: &env {A: "1", B: two}
backoff: {initial: 100ms, max: 30s, multiplier: 2}
pools:
  a: &pool
    processes: 2
    env: *env
    functions:
      f: {callable: "examples.text:reverse", timeout: 30s}
      g: examples.text:upper
    rlimits: {nofile: 1024, as: 2G}
    max_surge: 25%
  b:
    <<: *pool
    processes: 1
  c:
    command: ["php", "w.php"]
    functions: [php_f, php_g]
    ready: registered
    umask: "022"
""",
]

# Pieces that broke the loader once, or are YAML's sharp edges
HOSTILE = [
    "&a ", "*a", "<<: *a", "&r [*r]", "!!python/object/apply:os.system ['true']", "!custom ",
    "!!binary aGk=", "!!set {a}", "!!int ", "!!float ", "!!timestamp ", "\\0", '"\\0"',
    '"\\ud800"', "\x00", "\x1b", "\t", "\r", "\x85", "\u2028", "\ufeff", "[" * 40, "{" * 40,
    "]", "}", ",", ": ", "? ", "- ", "|", ">-", "#", "---", "...", "%YAML 1.1\n---\n", "'",
    '"', "~", "9" * 400, "9" * 700, "9" * 5000, "0x_", "0b_", "1:00:00:00", "2001-13-45",
    "2001-01-01t01:01:01+99", "1.0e+400", ".inf", "-.nan", '"999999999999999999999s"',
    '"[::1::2]:4730"', "'a:b\n'", '"text\\n"', "1000000h", "100%", "0%", "unlimited",
    "{f: {callable: 'a:b', bogus: 1, 2: 3}}", "\n  ", "\n    ", "\n", "pools:", "functions:",
]


def mutate(seed: bytes, ops: list[tuple[str, int, int, bytes]]) -> bytes:
    """Apply byte-level edits to a valid config: flips, inserts, deletes, hostile snippets,
    duplicated and dropped lines."""
    data = bytearray(seed)
    for op, a, b, piece in ops:
        i = a % (len(data) + 1)
        if op == "flip" and data:
            data[i % len(data)] = b % 256
        elif op == "insert":
            data[i:i] = piece
        elif op == "delete":
            del data[i:i + b % 16]
        elif op == "line":  # duplicate or drop a whole line
            lines = bytes(data).split(b"\n")
            j = a % len(lines)
            if b % 2:
                lines.insert(j, lines[j])
            else:
                del lines[j]
            data = bytearray(b"\n".join(lines))
        elif op == "truncate":
            del data[i:]
    return bytes(data)


edits = st.lists(st.tuples(
    st.sampled_from(["flip", "insert", "insert", "delete", "line", "truncate"]),
    st.integers(0, 1 << 16), st.integers(0, 1 << 16),
    st.one_of(st.sampled_from([h.encode("utf-8", "surrogatepass") for h in HOSTILE]),
              st.binary(max_size=8))),
    min_size=1, max_size=6)

# Generated from scratch: documents shaped like configs (known keys, nested blocks, pools),
# with values of every YAML type, huge, empty and hostile ones among them.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**500), 10**500),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from([h for h in HOSTILE if "\x00" not in h] + [
        "30s", "500ms", "2m", "1h", "25%", "512M", "2G", "TERM", "a:b", "examples.text:reverse",
        "gm1:4730", "[::1]:4730", "127.0.0.1", "root", "022", "0o022", ".", "..", "/"]),
)
# (small on purpose: drawing dominates the run time, and the settings' parsers see each
# value on its own)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner,
                                        max_size=3), max_leaves=4)
SUBKEYS = sorted({s.key.split(".")[1] for s in SETTINGS if s.block} | {"bogus"})
blocks = st.dictionaries(st.sampled_from(SUBKEYS), scalars, max_size=3)


def setting_values(keys: set[str]) -> st.SearchStrategy:
    return st.dictionaries(st.sampled_from(sorted(keys | {"bogus", "pools"})),
                           st.one_of(scalars, values, blocks), max_size=6)


pool = setting_values(POOL_KEYS).map(
    lambda d: {k: v for k, v in d.items() if k != "pools" or not isinstance(v, dict)})
documents = st.builds(
    lambda top, pools: {**top, "pools": pools},
    setting_values(TOP_KEYS - {"pools"}),
    st.one_of(st.dictionaries(st.one_of(st.sampled_from(["a", "b-1", "x.y"]), st.text(max_size=6)),
                              st.one_of(pool, values), max_size=2),
              values))


def dump(doc: object) -> bytes:
    return yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogatepass")


# Token soup: YAML-ish text that exercises the scanner and parser more than the settings
soup = st.lists(st.sampled_from(HOSTILE + [
    "servers: ", "processes: ", "env: ", "backoff: ", "cwd: ", "command: ", "reverse: ",
    "examples.text:reverse", "a", "b", "1", "30s", "[a, b]", "{a: 1}", "x"]),
    max_size=40).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file every example is written to."""
    return tmp_path_factory.mktemp("fuzz") / "pools.yaml"


def holds(path: Path, raw: bytes) -> None:
    """The property: a Config, or a ConfigError naming the file on every line; fast."""
    path.write_bytes(raw)
    start = time.monotonic()
    try:
        cfg = config.load(str(path))
    except ConfigError as e:
        rendered = e.render()
        assert rendered, "an empty error"
        for line in rendered.splitlines():
            assert line.startswith(f"{path}"), line
        rendered.encode("utf-8")  # printable: no lone surrogate reaches a log or terminal
    else:
        assert isinstance(cfg, config.Config) and cfg.pools
    elapsed = time.monotonic() - start
    assert elapsed < SLOW, f"load() took {elapsed:.2f}s on {raw[:200]!r}"


@settings(FUZZ, max_examples=1200)
@given(seed=st.sampled_from(SEEDS), ops=edits)
def test_mutated_configs(target: Path, seed: bytes, ops: list) -> None:
    holds(target, mutate(seed, ops))


@settings(FUZZ, max_examples=300)
@given(doc=documents, ops=st.one_of(st.just([]), edits))
def test_generated_configs(target: Path, doc: dict, ops: list) -> None:
    holds(target, mutate(dump(doc), ops) if ops else dump(doc))


@settings(FUZZ, max_examples=500)
@given(raw=st.one_of(soup, st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_yaml_soup_and_raw_bytes(target: Path, raw: bytes) -> None:
    holds(target, raw)


def test_seeds_are_valid() -> None:
    # The mutations start from configs that load (as if they were in conf/, for the
    # relative pythonpath).
    for seed in SEEDS:
        assert config.parse(seed.decode(), str(REPO / "conf" / "seed.yaml")).pools
