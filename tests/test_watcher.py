"""watcher: what is watched (module_dir, build_spec, roots, Matcher), the Debouncer and the
master's WatcherState.status(). All pure: real files in tmp_path where the code reads the file
system, an injected `now` for the Debouncer; no helper process, no watchfiles, no sleeps.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

import pytest

from gearvisor.config import Config, ConfigError, parse
from gearvisor.health import Backoff
from gearvisor.watcher import (
    Batch,
    Debouncer,
    Matcher,
    WatcherState,
    WatchSpec,
    _Ignore,
    aliases,
    all_roots,
    build_spec,
    module_dir,
    outermost,
    root_of,
    split_roots,
)

NOW = 10_000.0


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str) -> Config:
    return parse(text, str(tmp_path / "pools.yaml"), euid=1000)


def config_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


# ---------------------------------------------------------------------------------------------
# module_dir


def test_module_dir_takes_the_first_search_path_entry_that_has_the_module(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    touch(first / "jobs.py")
    touch(second / "jobs.py")
    assert module_dir("jobs", [str(first), str(second)]) == str(first)
    assert module_dir("jobs", (str(second), str(first))) == str(second)


def test_module_dir_skips_entries_that_lack_the_module(tmp_path: Path) -> None:
    empty, other = tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    touch(other / "jobs.py")
    missing = tmp_path / "no-such-dir"
    assert module_dir("jobs", [str(missing), str(empty), str(other)]) == str(other)


def test_module_dir_of_a_package_is_the_package_directory(tmp_path: Path) -> None:
    touch(tmp_path / "pkg" / "__init__.py")
    touch(tmp_path / "pkg" / "helpers.py")
    assert module_dir("pkg", [str(tmp_path)]) == str(tmp_path / "pkg")


def test_module_dir_of_a_dotted_module_is_its_package(tmp_path: Path) -> None:
    touch(tmp_path / "pkg" / "__init__.py")
    touch(tmp_path / "pkg" / "sub" / "__init__.py")
    touch(tmp_path / "pkg" / "sub" / "tasks.py")
    assert module_dir("pkg.sub.tasks", [str(tmp_path)]) == str(tmp_path / "pkg" / "sub")
    assert module_dir("pkg.sub", [str(tmp_path)]) == str(tmp_path / "pkg" / "sub")


def test_module_dir_not_found_is_none(tmp_path: Path) -> None:
    touch(tmp_path / "pkg" / "__init__.py")
    touch(tmp_path / "jobs.txt")
    assert module_dir("nothing_here", [str(tmp_path)]) is None
    assert module_dir("jobs", [str(tmp_path)]) is None  # not a .py file
    assert module_dir("pkg.missing", [str(tmp_path)]) is None
    assert module_dir("jobs", []) is None


def test_module_dir_relative_entry_is_made_absolute(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path / "jobs.py")
    monkeypatch.chdir(tmp_path)
    assert module_dir("jobs", [""]) == str(tmp_path)
    assert os.path.isabs(module_dir("jobs", ["."]) or "")


def test_module_dir_never_imports_the_module(tmp_path: Path) -> None:
    mod, pkg = "gearvisor_test_boom_mod", "gearvisor_test_boom_pkg"
    touch(tmp_path / f"{mod}.py", 'raise RuntimeError("imported!")\n')
    touch(tmp_path / pkg / "__init__.py", 'raise RuntimeError("imported!")\n')
    touch(tmp_path / pkg / "inner.py", 'raise RuntimeError("imported!")\n')
    before = set(sys.modules)
    assert module_dir(mod, [str(tmp_path)]) == str(tmp_path)
    assert module_dir(pkg, [str(tmp_path)]) == str(tmp_path / pkg)
    assert module_dir(f"{pkg}.inner", [str(tmp_path)]) == str(tmp_path / pkg)
    assert mod not in sys.modules and pkg not in sys.modules
    assert f"{pkg}.inner" not in sys.modules
    assert set(sys.modules) == before


def test_module_dir_prefers_a_package_over_a_module_of_the_same_name(tmp_path: Path) -> None:
    touch(tmp_path / "jobs.py")
    touch(tmp_path / "jobs" / "__init__.py")
    spec = importlib.machinery.PathFinder.find_spec("jobs", [str(tmp_path)])  # finds, no import
    assert spec is not None and spec.origin == str(tmp_path / "jobs" / "__init__.py")
    assert module_dir("jobs", [str(tmp_path)]) == str(tmp_path / "jobs")


# ---------------------------------------------------------------------------------------------
# build_spec


LAYOUT_CONFIG = """\
pythonpath: [lib]
pools:
  app:
    functions:
      one: "app.jobs:one"
      two: "app.jobs:two"
      three: "app.more:three"
  pkg:
    functions:
      run: "pkg:run"
      deep: "pkg.deep:run"
"""


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """tmp_path/app/{jobs,more}.py (a namespace dir) and tmp_path/lib/pkg/ (a package)."""
    touch(tmp_path / "app" / "jobs.py")
    touch(tmp_path / "app" / "more.py")
    touch(tmp_path / "lib" / "pkg" / "__init__.py")
    touch(tmp_path / "lib" / "pkg" / "deep.py")
    return tmp_path


def test_build_spec_default_watch_is_each_module_dir_deduplicated(layout: Path) -> None:
    cfg = load(layout, LAYOUT_CONFIG)
    spec = build_spec(cfg, [])
    assert spec.config == str(layout / "pools.yaml")
    assert spec.pools == (
        ("app", (f"{layout}/app/*.py",)),
        ("pkg", (f"{layout}/lib/pkg/*.py",)),
    )
    assert spec.notes == ()
    assert not spec.empty


def test_build_spec_one_pattern_per_module_dir_in_function_order(tmp_path: Path) -> None:
    touch(tmp_path / "b" / "x.py")
    touch(tmp_path / "a" / "y.py")
    cfg = load(tmp_path, """\
pools:
  p:
    functions:
      f1: "b.x:f"
      f2: "a.y:f"
      f3: "b.x:g"
""")
    assert build_spec(cfg, []).pools == (("p", (f"{tmp_path}/b/*.py", f"{tmp_path}/a/*.py")),)


def test_build_spec_also_searches_the_given_search_path(tmp_path: Path) -> None:
    conf_dir, site = tmp_path / "conf", tmp_path / "site"
    conf_dir.mkdir()
    touch(site / "jobs.py")
    touch(conf_dir / "jobs.py")  # the config's own dir comes first
    cfg = parse('pools:\n  p:\n    functions:\n      f: "jobs:f"\n      g: "extra:g"\n',
                str(conf_dir / "pools.yaml"), euid=1000)
    touch(site / "extra.py")
    spec = build_spec(cfg, [str(site)])
    assert spec.pools == (("p", (f"{conf_dir}/*.py", f"{site}/*.py")),)
    assert build_spec(cfg, []).pools == (("p", (f"{conf_dir}/*.py",)),)


def test_build_spec_watch_config_false_drops_the_config(layout: Path) -> None:
    cfg = load(layout, "watch_config: false\n" + LAYOUT_CONFIG)
    spec = build_spec(cfg, [])
    assert spec.config is None
    assert dict(spec.pools)["app"] == (f"{layout}/app/*.py",)


def test_build_spec_watch_false_is_an_empty_tuple(layout: Path) -> None:
    cfg = load(layout, LAYOUT_CONFIG + "    watch: false\n")  # the last pool, pkg
    assert cfg.pools["pkg"].watch == ()
    spec = build_spec(cfg, [])
    assert dict(spec.pools) == {"app": (f"{layout}/app/*.py",), "pkg": ()}


def test_build_spec_explicit_watch_entries(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    touch(tmp_path / "settings.ini")
    cfg = load(tmp_path, """\
pools:
  p:
    functions:
      f: "nowhere:f"
    watch:
      - src
      - "templates/**/*.html"
      - settings.ini
      - not-yet/created.txt
      - ../shared/*.py
""")
    spec = build_spec(cfg, [])
    assert spec.pools == (("p", (
        f"{tmp_path}/src/**",  # an existing directory means everything under it
        f"{tmp_path}/templates/**/*.html",  # a glob stays a glob
        f"{tmp_path}/settings.ini",
        f"{tmp_path}/not-yet/created.txt",  # missing: it may become a file...
        f"{tmp_path}/not-yet/created.txt/**",  # ...or a directory
        f"{tmp_path.parent}/shared/*.py",  # relative to the config file's directory
    )),)
    assert spec.notes == ()  # an explicit watch list never looks the module up


def test_build_spec_missing_module_gives_a_note(layout: Path) -> None:
    cfg = load(layout, LAYOUT_CONFIG.replace('"app.more:three"', '"ghost.mod:three"'))
    spec = build_spec(cfg, [])
    assert dict(spec.pools)["app"] == (f"{layout}/app/*.py",)  # what was found still is
    assert len(spec.notes) == 1
    assert "pool app" in spec.notes[0]
    assert "module ghost.mod" in spec.notes[0]
    assert "watch:" in spec.notes[0]


def test_build_spec_nothing_found_and_no_config_is_empty(tmp_path: Path) -> None:
    cfg = load(tmp_path, """\
watch_config: false
pools:
  p:
    functions:
      f: "ghost:f"
  q:
    functions:
      f: "ghost:f"
    watch: false
""")
    spec = build_spec(cfg, [])
    assert spec.pools == (("p", ()), ("q", ()))
    assert spec.empty
    assert [n.split(":")[0] for n in spec.notes] == ["pool p"]


def test_watch_spec_empty() -> None:
    assert WatchSpec(None, ()).empty
    assert WatchSpec(None, (("a", ()), ("b", ()))).empty
    assert not WatchSpec("/etc/gv/pools.yaml", (("a", ()),)).empty
    assert not WatchSpec(None, (("a", ()), ("b", ("/x/*.py",)))).empty


def test_watch_spec_equality_ignores_notes(layout: Path) -> None:
    cfg = load(layout, LAYOUT_CONFIG.replace('"app.more:three"', '"ghost:three"'))
    one, two = build_spec(cfg, []), build_spec(cfg, [])
    assert one == two
    assert one.notes
    assert WatchSpec(None, (("a", ("/x",)),), ("why",)) == WatchSpec(None, (("a", ("/x",)),))
    assert WatchSpec(None, (("a", ("/x",)),)) != WatchSpec(None, (("a", ("/y",)),))
    assert WatchSpec(None, (("a", ("/x",)),)) != WatchSpec("/c.yaml", (("a", ("/x",)),))
    changed = load(layout, "watch_config: false\n" + LAYOUT_CONFIG)
    assert build_spec(changed, []) != one


def test_watch_spec_to_json() -> None:
    spec = WatchSpec("/c.yaml", (("a", ("/x/*.py",)), ("b", ())), ("note",))
    assert spec.to_json() == {"config": "/c.yaml", "pools": {"a": ["/x/*.py"], "b": []}}


def test_build_spec_directory_with_glob_characters_still_matches_its_files(
        tmp_path: Path) -> None:
    (tmp_path / "app[1]").mkdir()
    cfg = load(tmp_path, 'pools:\n  p:\n    functions:\n      f: "x:f"\n    watch: ["app[1]"]\n')
    spec = build_spec(cfg, [])
    assert Matcher(spec).match([f"{tmp_path}/app[1]/jobs.py"]) == ({"p"}, False)


def test_build_spec_module_dir_with_glob_characters_still_matches(tmp_path: Path) -> None:
    touch(tmp_path / "lib[v2]" / "jobs.py")
    cfg = load(tmp_path, 'pythonpath: ["lib[v2]"]\npools:\n  p:\n    functions:\n'
                         '      f: "jobs:f"\n')
    spec = build_spec(cfg, [])
    assert spec.notes == ()
    assert Matcher(spec).match([f"{tmp_path}/lib[v2]/jobs.py"]) == ({"p"}, False)


def test_build_spec_a_command_pool_listed_first_leaves_the_python_path_alone(
        tmp_path: Path) -> None:
    """The command pool's script path once overwrote the search path of later pools."""
    touch(tmp_path / "bin" / "worker.php")
    touch(tmp_path / "jobs.py")
    cfg = load(tmp_path, """\
pools:
  php:
    command: ["php", "bin/worker.php"]
    functions: [reverse]
  py:
    functions:
      f: "jobs:f"
""")
    spec = build_spec(cfg, [])
    assert dict(spec.pools) == {"php": (f"{tmp_path}/bin/*.php",), "py": (f"{tmp_path}/*.py",)}
    assert spec.notes == ()


# ---------------------------------------------------------------------------------------------
# config: watch, watch_config, watch_debounce


def test_config_watch_not_a_list_is_refused(tmp_path: Path) -> None:
    err = config_error(tmp_path, 'pools:\n  img:\n    functions:\n      f: "m:f"\n    watch: 5\n')
    assert [p.path for p in err.problems] == ["pools.img.watch"]
    assert err.problems[0].line == 5
    assert "pools.img.watch:" in str(err)
    assert "got 5" in str(err)


def test_config_watch_list_of_non_strings_is_refused(tmp_path: Path) -> None:
    err = config_error(tmp_path, 'pools:\n  img:\n    functions:\n      f: "m:f"\n'
                                 '    watch: [1]\n')
    assert [p.path for p in err.problems] == ["pools.img.watch"]
    assert "expected a list of paths or globs" in str(err)


def test_config_watch_true_and_false(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'pools:\n  a:\n    functions:\n      f: "m:f"\n    watch: true\n'
                         '  b:\n    functions:\n      f: "m:f"\n    watch: false\n'
                         '  c:\n    functions:\n      f: "m:f"\n    watch: "src/*.py"\n')
    assert cfg.pools["a"].watch is None
    assert cfg.pools["b"].watch == ()
    assert cfg.pools["c"].watch == (f"{tmp_path}/src/*.py",)


def test_config_watch_config_must_be_a_boolean(tmp_path: Path) -> None:
    err = config_error(tmp_path, 'watch_config: "yes"\npools:\n  a:\n    functions:\n'
                                 '      f: "m:f"\n')
    assert [p.path for p in err.problems] == ["watch_config"]
    assert "expected true or false" in str(err)
    assert load(tmp_path, 'watch_config: false\npools:\n  a:\n    functions:\n'
                          '      f: "m:f"\n').watch_config is False


def test_config_watch_config_is_top_level_only(tmp_path: Path) -> None:
    err = config_error(tmp_path, 'pools:\n  a:\n    functions:\n      f: "m:f"\n'
                                 '    watch_config: false\n')
    assert [p.path for p in err.problems] == ["pools.a.watch_config"]
    assert "unknown key" in str(err)


def test_config_watch_debounce(tmp_path: Path) -> None:
    pools = 'pools:\n  a:\n    functions:\n      f: "m:f"\n'
    assert load(tmp_path, pools).watch_debounce == 1.0
    assert load(tmp_path, pools).watch_config is True
    assert load(tmp_path, "watch_debounce: 250ms\n" + pools).watch_debounce == 0.25
    assert load(tmp_path, "watch_debounce: 2\n" + pools).watch_debounce == 2.0
    err = config_error(tmp_path, "watch_debounce: soon\n" + pools)
    assert [p.path for p in err.problems] == ["watch_debounce"]


def test_config_top_level_watch_is_inherited_and_overridden(tmp_path: Path) -> None:
    cfg = load(tmp_path, """\
watch: ["shared/**/*.py"]
pools:
  inherits:
    functions:
      f: "m:f"
  own:
    functions:
      f: "m:f"
    watch: ["own/*.py"]
  silent:
    functions:
      f: "m:f"
    watch: false
  default:
    functions:
      f: "m:f"
    watch: true
""")
    assert cfg.pools["inherits"].watch == (f"{tmp_path}/shared/**/*.py",)
    assert cfg.pools["own"].watch == (f"{tmp_path}/own/*.py",)
    assert cfg.pools["silent"].watch == ()
    assert cfg.pools["default"].watch is None


def test_config_top_level_watch_false_turns_every_pool_off(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'watch: false\nwatch_config: false\npools:\n  a:\n    functions:\n'
                         '      f: "m:f"\n')
    assert cfg.pools["a"].watch == ()
    assert build_spec(cfg, []).empty


# ---------------------------------------------------------------------------------------------
# root_of, all_roots, outermost


@pytest.mark.parametrize(("pattern", "root"), [
    ("/a/b/*.py", "/a/b"),
    ("/a/**/x.py", "/a"),
    ("/a/b/**", "/a/b"),
    ("/a/b?/c.py", "/a"),
    ("/*.py", "/"),
])
def test_root_of_a_glob_is_its_leading_plain_components(pattern: str, root: str) -> None:
    assert root_of(pattern) == root


def test_root_of_an_existing_directory_is_itself(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    assert root_of(str(tmp_path / "dir")) == str(tmp_path / "dir")


def test_root_of_a_plain_file_is_its_directory(tmp_path: Path) -> None:
    touch(tmp_path / "settings.ini")
    assert root_of(str(tmp_path / "settings.ini")) == str(tmp_path)
    assert root_of(str(tmp_path / "missing" / "later.txt")) == str(tmp_path / "missing")


def test_all_roots_keeps_nested_roots_and_outermost_drops_them() -> None:
    spec = WatchSpec("/etc/gv/pools.yaml", (
        ("a", ("/a/*.py", "/a/b/**")),
        ("b", ("/a/bc/*.py", "/a/b/x/**/*.py")),
        ("c", ()),
    ))
    roots = all_roots(spec)
    assert roots == ["/a", "/a/b", "/a/b/x", "/a/bc", "/etc/gv"]
    assert outermost(roots) == ["/a", "/etc/gv"]


def test_all_roots_without_config_and_deduplicated() -> None:
    spec = WatchSpec(None, (("a", ("/a/*.py", "/a/*.txt")), ("b", ("/a/**/*.py",))))
    assert all_roots(spec) == ["/a"]
    assert all_roots(WatchSpec(None, ())) == []


def test_outermost_is_by_path_component_not_by_string_prefix() -> None:
    assert outermost(["/a/b", "/a/bc"]) == ["/a/b", "/a/bc"]
    assert outermost(["/a/b", "/a/b/c", "/a/bc"]) == ["/a/b", "/a/bc"]
    assert outermost(["/", "/a", "/b/c"]) == ["/"]
    assert outermost([]) == []


# ---------------------------------------------------------------------------------------------
# Matcher


SPEC = WatchSpec("/srv/app/pools.yaml", (
    ("code", ("/srv/app/*.py",)),
    ("everything", ("/srv/app/**",)),
    ("other", ("/srv/other/*.py",)),
    ("off", ()),
))


def test_matcher_star_py_matches_only_py_files_in_that_directory() -> None:
    m = Matcher(SPEC)
    assert m.match(["/srv/app/jobs.py"]) == ({"code", "everything"}, False)
    assert m.match(["/srv/app/sub/jobs.py"]) == ({"everything"}, False)
    assert m.match(["/srv/app/jobs.txt"]) == ({"everything"}, False)
    assert m.match(["/srv/app/jobs.pyc"]) == ({"everything"}, False)
    assert m.match(["/srv/appx/jobs.py"]) == (set(), False)
    assert m.match(["/elsewhere/jobs.py"]) == (set(), False)
    assert m.match([]) == (set(), False)


def test_matcher_double_star_spans_directories() -> None:
    m = Matcher(SPEC)
    assert m.match(["/srv/app/a/b/c/templates/page.html"]) == ({"everything"}, False)


def test_matcher_config_path_sets_config() -> None:
    m = Matcher(WatchSpec("/etc/gv/pools.yaml", (("code", ("/srv/app/*.py",)),)))
    assert m.match(["/etc/gv/pools.yaml"]) == (set(), True)
    assert m.match(["/etc/gv/pools.yaml.swp"]) == (set(), False)
    assert m.match(["/etc/gv/pools.yaml", "/srv/app/x.py"]) == ({"code"}, True)
    assert Matcher(SPEC).match(["/srv/app/pools.yaml"]) == ({"everything"}, True)


def test_matcher_one_path_can_belong_to_several_pools() -> None:
    spec = WatchSpec(None, (("a", ("/srv/lib/*.py",)), ("b", ("/srv/**/*.py",)),
                            ("c", ("/srv/lib/*.txt",))))
    assert Matcher(spec).match(["/srv/lib/shared.py"]) == ({"a", "b"}, False)
    assert Matcher(spec).pools_for("/srv/lib/shared.py") == ["a", "b"]


def test_matcher_under_marks_pools_with_globs_inside_a_moved_root() -> None:
    spec = WatchSpec("/srv/current/pools.yaml", (
        ("a", ("/srv/current/app/*.py",)),
        ("b", ("/srv/other/**",)),
        ("c", ("/opt/x/*.py",)),
        ("ini", ("/etc/app.ini",)),
        ("off", ()),
    ))
    m = Matcher(spec)
    assert m.under(["/srv/current"]) == ({"a"}, True)
    assert m.under(["/srv/current/app"]) == ({"a"}, False)
    assert m.under(["/srv"]) == ({"a", "b"}, True)
    assert m.under(["/opt/x", "/srv/other"]) == ({"b", "c"}, False)
    assert m.under(["/etc"]) == ({"ini"}, False)
    assert m.under(["/etc/app.ini"]) == ({"ini"}, False)  # the watched path itself
    assert m.under(["/srv/cur"]) == (set(), False)  # a string prefix is not a parent
    assert m.under([]) == (set(), False)


def test_matcher_under_without_config() -> None:
    m = Matcher(WatchSpec(None, (("a", ("/srv/current/*.py",)),)))
    assert m.under(["/srv/current"]) == ({"a"}, False)


# ---------------------------------------------------------------------------------------------
# Debouncer


def test_debouncer_burst_gives_one_batch_after_the_quiet_period() -> None:
    d = Debouncer(1.0)
    assert d.max_wait == 30.0
    batches = []
    now = 0.0
    for i in range(500):
        now = 100.0 + i * 0.01
        d.add({f"p{i % 3}"}, False, [f"/srv/app/f{i}.py"], now)
        assert d.due() == pytest.approx(now + 1.0)  # each change pushes the deadline
        if (b := d.pop(now)) is not None:
            batches.append(b)
    last = now
    assert batches == []
    assert d.pop(last + 0.99) is None
    t = last
    while t < last + 20.0:
        t += 0.01
        if (b := d.pop(t)) is not None:
            batches.append((t, b))
    assert len(batches) == 1
    fired_at, batch = batches[0]
    assert last + 1.0 <= fired_at < last + 1.02
    assert batch.pools == {"p0", "p1", "p2"}
    assert batch.config is False
    assert batch.files == 500
    assert batch.sample == [f"/srv/app/f{i}.py" for i in range(5)]
    assert d.pending is None and d.due() is None


def test_debouncer_fires_exactly_at_due() -> None:
    d = Debouncer(0.5)
    d.add({"a"}, False, ["/x.py"], 10.0)
    assert d.due() == 10.5
    assert d.pop(10.49) is None
    assert d.pending is not None
    assert d.pop(10.5) is not None


def test_debouncer_counts_files_and_caps_the_sample() -> None:
    d = Debouncer(1.0)
    d.add({"a"}, False, ["/1", "/2", "/3"], 1.0, count=40)
    d.add({"b"}, False, ["/4", "/5", "/6", "/7"], 1.1)
    d.add({"a"}, False, ["/8", "/9"], 1.2, count=1)  # count never below the files given
    batch = d.pop(5.0)
    assert batch is not None
    assert batch.files == 40 + 4 + 2
    assert batch.sample == ["/1", "/2", "/3", "/4", "/5"]
    assert batch.pools == {"a", "b"}


def test_debouncer_config_flag_survives_merging() -> None:
    d = Debouncer(1.0)
    d.add(set(), True, ["/etc/gv/pools.yaml"], 1.0)
    d.add({"a"}, False, ["/srv/a.py"], 1.5)
    d.add({"b"}, False, ["/srv/b.py"], 1.6)
    batch = d.pop(2.6)
    assert batch is not None
    assert batch.config is True
    assert batch.pools == {"a", "b"}
    assert batch.files == 3


def test_debouncer_never_quiet_still_fires_at_max_wait() -> None:
    d = Debouncer(1.0, max_wait=10.0)
    fired = None
    for i in range(100):
        now = 1000.0 + i * 0.5
        d.add({"busy"}, False, ["/srv/loop.py"], now)
        batch = d.pop(now)
        if batch is not None:
            fired = (now, batch)
            break
    assert fired is not None
    assert fired[0] == 1010.0
    assert fired[1].files == 21


def test_debouncer_default_max_wait() -> None:
    assert Debouncer(1.0).max_wait == 30.0
    assert Debouncer(0.1).max_wait == 30.0
    assert Debouncer(2.0, max_wait=3.0).max_wait == 3.0
    assert Debouncer(5.0).max_wait == 50.0


def test_debouncer_next_change_after_pop_starts_a_new_batch() -> None:
    d = Debouncer(1.0, max_wait=10.0)
    for i in range(21):
        d.add({"old"}, True, ["/old.py"], 1000.0 + i * 0.5)
    first = d.pop(1010.0)
    assert first is not None and first.pools == {"old"}
    d.add({"new"}, False, ["/new.py"], 1010.2)
    assert d.due() == pytest.approx(1011.2)  # not the old first + max_wait
    assert d.pop(1011.0) is None
    second = d.pop(1011.2)
    assert second is not None
    assert second.pools == {"new"}
    assert second.config is False
    assert second.files == 1
    assert second.sample == ["/new.py"]


def test_debouncer_ignores_changes_that_touch_nothing() -> None:
    d = Debouncer(1.0)
    d.add(set(), False, ["/tmp/unrelated"], 1.0, count=3)
    assert d.pending is None and d.due() is None
    assert d.pop(100.0) is None
    d.add({"a"}, False, ["/srv/a.py"], 2.0)
    d.add(set(), False, ["/tmp/unrelated"], 2.9)  # does not push the deadline
    assert d.due() == 3.0
    batch = d.pop(3.0)
    assert batch is not None and batch.files == 1 and batch.sample == ["/srv/a.py"]


def test_debouncer_retime_keeps_the_pending_batch_and_its_times() -> None:
    d = Debouncer(1.0)
    d.add({"a"}, True, ["/srv/a.py"], NOW, count=7)
    d.retime(2.0)  # a reload changed watch_debounce mid-burst
    assert (d.quiet, d.max_wait) == (2.0, 30.0)
    assert d.pop(NOW + 1.5) is None  # the last change was only 1.5 s ago: not quiet yet
    d.add({"b"}, False, ["/srv/b.py"], NOW + 1.6)
    assert d.pop(NOW + 3.5) is None
    batch = d.pop(NOW + 3.6)
    assert batch is not None
    assert batch.pools == {"a", "b"}
    assert batch.config is True
    assert batch.files == 8
    assert batch.sample == ["/srv/a.py", "/srv/b.py"]
    assert d.pop(NOW + 200.0) is None


def test_batch_defaults_are_not_shared() -> None:
    one, two = Batch(), Batch()
    one.pools.add("a")
    one.sample.append("/x")
    assert two.pools == set() and two.sample == []
    assert (two.config, two.files) == (False, 0)


# ---------------------------------------------------------------------------------------------
# WatcherState.status


WATCHED = WatchSpec("/etc/gv/pools.yaml", (("a", ("/srv/a/*.py",)),), ("pool b: not watched",))


def test_status_disabled_for_an_empty_spec() -> None:
    w = WatcherState(WatchSpec(None, (("a", ()),)))
    st = w.status(NOW, Debouncer(1.0))
    assert st["state"] == "disabled"
    assert st["pid"] is None and st["retry_in"] is None
    assert st["pending"] == [] and st["last_change"] is None


def test_status_starting_without_pid_or_failures() -> None:
    w = WatcherState(WATCHED)
    st = w.status(NOW, Debouncer(1.0))
    assert st["state"] == "starting"
    assert st["retry_in"] is None
    assert st["notes"] == ["pool b: not watched"]
    assert st["restarts"] == 0


def test_status_backoff_after_a_failure() -> None:
    w = WatcherState(WATCHED, backoff=Backoff(0.5, 30.0, 2.0, 0.0, 10.0))
    delay = w.backoff.failure(NOW - 1.0, NOW)
    assert delay == 0.5
    w.restart_at = NOW + delay
    w.restarts = 1
    w.error = "boom"
    st = w.status(NOW + 0.2, Debouncer(1.0))
    assert st["state"] == "backoff"
    assert st["retry_in"] == 0.3
    assert st["restarts"] == 1 and st["error"] == "boom"
    assert w.status(NOW + 5.0, Debouncer(1.0))["retry_in"] == 0.0  # never negative


def test_status_watching_once_paths_are_known() -> None:
    w = WatcherState(WATCHED, pid=4242)
    assert w.status(NOW, Debouncer(1.0))["state"] == "starting"  # helper not reported yet
    w.paths = ["/etc/gv", "/srv/a"]
    w.polling = True
    st = w.status(NOW, Debouncer(1.0))
    assert st["state"] == "watching"
    assert st["pid"] == 4242
    assert st["paths"] == ["/etc/gv", "/srv/a"]
    assert st["polling"] is True
    assert st["retry_in"] is None
    st["paths"].append("/mutated")
    assert w.paths == ["/etc/gv", "/srv/a"]  # status hands out copies
    only_missing = WatcherState(WATCHED, pid=4242, missing=["/srv/a"])
    st = only_missing.status(NOW, Debouncer(1.0))
    assert st["state"] == "watching"
    assert st["missing"] == ["/srv/a"]


def test_status_running_helper_has_no_retry_in_even_after_failures() -> None:
    w = WatcherState(WATCHED, pid=4242, paths=["/srv/a"])
    w.backoff.failure(NOW - 1.0, NOW)
    w.restart_at = NOW + 5.0
    st = w.status(NOW, Debouncer(1.0))
    assert st["state"] == "watching"
    assert st["retry_in"] is None


def test_status_pending_lists_pools_and_config() -> None:
    w = WatcherState(WATCHED, pid=4242, paths=["/srv/a"], last_change=NOW - 3.0)
    d = Debouncer(1.0)
    d.add({"b", "a"}, False, ["/srv/a/x.py"], NOW)
    assert w.status(NOW, d)["pending"] == ["a", "b"]
    d.add(set(), True, ["/etc/gv/pools.yaml"], NOW + 0.1)
    st = w.status(NOW, d)
    assert st["pending"] == ["a", "b", "(config)"]
    assert st["last_change"] == 3.0
    assert d.pop(NOW + 5.0) is not None
    assert w.status(NOW, d)["pending"] == []


# ---------------------------------------------------------------------------------------------
# split_roots, aliases, the ignore list (what the helper hands to watchfiles)


def test_split_roots_watches_the_config_dir_and_flat_globs_flat(tmp_path: Path) -> None:
    """A config in a big tree (or in /) must never mean a recursive watch of that tree."""
    (tmp_path / "app" / "lib").mkdir(parents=True)
    spec = WatchSpec(str(tmp_path / "pools.yaml"), (
        ("a", (f"{tmp_path}/app/*.py",)),  # flat
        ("b", (f"{tmp_path}/app/lib/**/*.py",)),  # recursive
        ("c", (f"{tmp_path}/app/lib/x.py",)),  # flat, but inside a recursive root: dropped
        ("d", (f"{tmp_path}/other/*/x.py",)),  # a wildcard directory: recursive
    ))
    deep, flat = split_roots(spec)
    assert deep == [str(tmp_path / "app" / "lib"), str(tmp_path / "other")]
    assert flat == [str(tmp_path), str(tmp_path / "app")]


def test_split_roots_also_watches_a_symlinked_config_files_target(tmp_path: Path) -> None:
    real = touch(tmp_path / "release" / "conf" / "pools.yaml")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "pools.yaml").symlink_to(real)
    _, flat = split_roots(WatchSpec(str(tmp_path / "etc" / "pools.yaml"), ()))
    assert flat == [str(tmp_path / "etc"), str(tmp_path / "release" / "conf")]


def test_aliases_map_a_path_reported_through_the_real_directory(tmp_path: Path) -> None:
    touch(tmp_path / "releases" / "1" / "app" / "mod.py")
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "1")
    real = str(tmp_path / "releases" / "1" / "app" / "mod.py")
    link_root = str(tmp_path / "current" / "app")
    assert aliases(real, [link_root]) == [real, f"{link_root}/mod.py"]
    matcher = Matcher(WatchSpec(None, (("p", (f"{link_root}/*.py",)),)))
    assert matcher.match([real]) == (set(), False)  # what inotify may report...
    assert matcher.match(aliases(real, [link_root])) == ({"p"}, False)  # ...still matches


def test_aliases_of_an_unrelated_path_is_itself(tmp_path: Path) -> None:
    assert aliases(str(tmp_path / "x.py"), [str(tmp_path / "elsewhere")]) == [
        str(tmp_path / "x.py")]


def test_ignore_applies_only_below_the_watched_root() -> None:
    ignore = _Ignore(["/srv/app/.venv/lib/site-packages/myapp", "/srv/app"])
    assert not ignore("/srv/app/.venv/lib/site-packages/myapp/jobs.py")  # code in a venv
    assert ignore("/srv/app/.git/HEAD")
    assert ignore("/srv/app/pkg/__pycache__/jobs.cpython-311.pyc")
    assert ignore("/srv/app/pkg/.jobs.py.swp")
    assert ignore("/srv/app/node_modules/x/index.js")
    assert not ignore("/srv/app/pkg/jobs.py")
