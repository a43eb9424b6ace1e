"""watcher: what is watched (module_dir, build_spec, roots, Matcher), the Debouncer and the
master's WatcherState.status(). All pure: real files in tmp_path where the code reads the file
system, an injected `now` for the Debouncer; no helper process, no watchfiles, no sleeps.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import select
import sys
import time
import types
from pathlib import Path

import pytest

from gearvisor.config import Config, ConfigError, parse
from gearvisor.helpers.watcher import (
    MAX_REPORT_CHARS,
    MAX_REPORT_FILES,
    REPORT_LINE,
    Batch,
    Debouncer,
    ImportReport,
    Matcher,
    WatcherState,
    WatchSpec,
    _Ignore,
    aliases,
    all_roots,
    build_spec,
    imported_files,
    module_dir,
    module_files,
    outermost,
    output_files,
    report_lines,
    report_skip_dirs,
    root_of,
    send_import_report,
    split_roots,
)
from gearvisor.policy.backoff import Backoff

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


def test_build_spec_default_before_any_report_is_each_function_modules_files(
        layout: Path) -> None:
    """Not their whole directories: a log file beside a module is nobody's code."""
    cfg = load(layout, LAYOUT_CONFIG)
    spec = build_spec(cfg, [])
    assert spec.config == str(layout / "pools.yaml")
    assert spec.pools == (
        ("app", (f"{layout}/app/jobs.py", f"{layout}/app/more.py")),  # once each
        ("pkg", (f"{layout}/lib/pkg/__init__.py", f"{layout}/lib/pkg/deep.py")),
    )
    assert spec.notes == ()
    assert not spec.empty


def test_build_spec_one_pattern_per_module_file_in_function_order(tmp_path: Path) -> None:
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
    assert build_spec(cfg, []).pools == (("p", (f"{tmp_path}/b/x.py", f"{tmp_path}/a/y.py")),)


def test_build_spec_also_searches_the_given_search_path(tmp_path: Path) -> None:
    conf_dir, site = tmp_path / "conf", tmp_path / "site"
    conf_dir.mkdir()
    touch(site / "jobs.py")
    touch(conf_dir / "jobs.py")  # the config's own dir comes first
    cfg = parse('pools:\n  p:\n    functions:\n      f: "jobs:f"\n      g: "extra:g"\n',
                str(conf_dir / "pools.yaml"), euid=1000)
    touch(site / "extra.py")
    spec = build_spec(cfg, [str(site)])
    assert spec.pools == (("p", (f"{conf_dir}/jobs.py", f"{site}/extra.py")),)
    assert build_spec(cfg, []).pools == (("p", (f"{conf_dir}/jobs.py",)),)


def test_build_spec_watch_config_false_drops_the_config(layout: Path) -> None:
    cfg = load(layout, "watch_config: false\n" + LAYOUT_CONFIG)
    spec = build_spec(cfg, [])
    assert spec.config is None
    assert dict(spec.pools)["app"] == (f"{layout}/app/jobs.py", f"{layout}/app/more.py")


def test_build_spec_watch_false_is_an_empty_tuple(layout: Path) -> None:
    cfg = load(layout, LAYOUT_CONFIG + "    watch: false\n")  # the last pool, pkg
    assert cfg.pools["pkg"].watch == ()
    spec = build_spec(cfg, [])
    assert dict(spec.pools) == {"app": (f"{layout}/app/jobs.py", f"{layout}/app/more.py"),
                                "pkg": ()}


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
      - ../common/*.py
""")
    spec = build_spec(cfg, [])
    assert spec.pools == (("p", (
        f"{tmp_path}/src/**",  # an existing directory means everything under it
        f"{tmp_path}/templates/**/*.html",  # a glob stays a glob
        f"{tmp_path}/settings.ini",
        f"{tmp_path}/not-yet/created.txt",  # missing: it may become a file...
        f"{tmp_path}/not-yet/created.txt/**",  # ...or a directory
        f"{tmp_path.parent}/common/*.py",  # relative to the config file's directory
    )),)
    # A Python pool's watch: list adds to its imports: the module is still looked up.
    assert [n.split(":")[0] for n in spec.notes] == ["pool p"]


def test_build_spec_missing_module_gives_a_note(layout: Path) -> None:
    cfg = load(layout, LAYOUT_CONFIG.replace('"app.more:three"', '"ghost.mod:three"'))
    spec = build_spec(cfg, [])
    assert dict(spec.pools)["app"] == (f"{layout}/app/jobs.py",)  # what was found still is
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
    assert dict(spec.pools) == {"php": (f"{tmp_path}/bin/*.php",),
                                "py": (f"{tmp_path}/jobs.py",)}
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


# ---------------------------------------------------------------------------------------------
# module_files: what a pool watches before its first import report


def test_module_files_of_a_plain_module_is_its_source(tmp_path: Path) -> None:
    touch(tmp_path / "jobs.py")
    touch(tmp_path / "worker.log")
    assert module_files("jobs", [str(tmp_path)]) == [str(tmp_path / "jobs.py")]


def test_module_files_of_a_dotted_module_include_each_package_init(tmp_path: Path) -> None:
    touch(tmp_path / "pkg" / "__init__.py")
    touch(tmp_path / "pkg" / "sub" / "__init__.py")
    touch(tmp_path / "pkg" / "sub" / "tasks.py")
    assert module_files("pkg.sub.tasks", [str(tmp_path)]) == [
        str(tmp_path / "pkg" / "__init__.py"), str(tmp_path / "pkg" / "sub" / "__init__.py"),
        str(tmp_path / "pkg" / "sub" / "tasks.py")]
    assert module_files("pkg.sub", [str(tmp_path)]) == [
        str(tmp_path / "pkg" / "__init__.py"), str(tmp_path / "pkg" / "sub" / "__init__.py")]


def test_module_files_skip_a_namespace_package_level(tmp_path: Path) -> None:
    touch(tmp_path / "ns" / "tasks.py")  # ns/ has no __init__.py
    assert module_files("ns.tasks", [str(tmp_path)]) == [str(tmp_path / "ns" / "tasks.py")]


def test_module_files_not_found_is_none_and_nothing_is_imported(tmp_path: Path) -> None:
    mod = "gearvisor_test_boom_files"
    touch(tmp_path / f"{mod}.py", 'raise RuntimeError("imported!")\n')
    before = set(sys.modules)
    assert module_files(mod, [str(tmp_path)]) == [str(tmp_path / f"{mod}.py")]
    assert module_files("nothing_here", [str(tmp_path)]) is None
    assert set(sys.modules) == before


# ---------------------------------------------------------------------------------------------
# build_spec with import reports, and what is never a change


REPORTED = """\
pools:
  py:
    functions:
      f: "app.tasks:f"
  explicit:
    functions:
      f: "app.tasks:f"
    watch: ["templates/*.html"]
  silent:
    functions:
      f: "app.tasks:f"
    watch: false
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """tmp_path/app/{__init__,tasks}.py, app/lib/images.py, shared/helpers.py, a log."""
    for f in ("app/__init__.py", "app/tasks.py", "app/lib/images.py", "shared/helpers.py",
              "app/worker.log"):
        touch(tmp_path / f)
    return tmp_path


def test_build_spec_follows_the_reported_imports_after_the_function_modules(app: Path) -> None:
    cfg = load(app, REPORTED)
    report = [f"{app}/app/__init__.py", f"{app}/app/lib/images.py", f"{app}/app/tasks.py",
              f"{app}/shared/helpers.py"]
    spec = build_spec(cfg, [], {"py": report, "explicit": report, "silent": report})
    # the function module's own files first, each file once, then the rest of the report
    imported = (f"{app}/app/__init__.py", f"{app}/app/tasks.py", f"{app}/app/lib/images.py",
                f"{app}/shared/helpers.py")
    assert dict(spec.pools) == {
        "py": imported,
        "explicit": (*imported, f"{app}/templates/*.html"),  # its watch: list adds to it
        "silent": (),
    }
    m = Matcher(spec)
    assert m.match([f"{app}/app/lib/images.py"]) == ({"py", "explicit"}, False)
    assert m.match([f"{app}/templates/a.html"]) == ({"explicit"}, False)
    assert m.match([f"{app}/shared/helpers.py"]) == ({"py", "explicit"}, False)
    assert m.match([f"{app}/app/worker.log"]) == (set(), False)  # beside the code: nobody's
    assert m.match([f"{app}/app/lib/other.py"]) == (set(), False)  # not imported
    # Only the directories of those files (and of the other pool's glob), none recursively.
    assert split_roots(spec) == ([], [str(app), f"{app}/app", f"{app}/app/lib", f"{app}/shared",
                                      f"{app}/templates"])


def test_build_spec_a_report_replaces_the_module_not_found_note(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'pools:\n  p:\n    functions:\n      f: "elsewhere:f"\n')
    assert [n.split(":")[0] for n in build_spec(cfg, []).notes] == ["pool p"]
    spec = build_spec(cfg, [], {"p": ["/srv/found/elsewhere.py"]})
    assert spec.notes == ()
    assert dict(spec.pools)["p"] == ("/srv/found/elsewhere.py",)


def test_build_spec_reported_files_with_glob_characters_match_only_themselves(
        tmp_path: Path) -> None:
    cfg = load(tmp_path, 'pools:\n  p:\n    functions:\n      f: "ghost:f"\n')
    odd = f"{tmp_path}/lib[v2]/mod*.py"
    m = Matcher(build_spec(cfg, [], {"p": [odd]}))
    assert m.match([odd]) == ({"p"}, False)
    assert m.match([f"{tmp_path}/libv/mod.py", f"{tmp_path}/lib[v2]/modx.py"]) == (set(), False)


def test_build_spec_never_counts_a_command_pools_log_file_or_its_rotations(
        tmp_path: Path) -> None:
    touch(tmp_path / "cmd" / "run")  # no extension: the pool watches cmd/*
    cfg = load(tmp_path, """\
pools:
  cmd:
    command: ["sh", "cmd/run"]
    functions: [x]
    log_file: cmd/run.log
    log_file_backups: 2
  everything:
    functions:
      f: "ghost:f"
    watch: ["cmd"]
""")
    spec = build_spec(cfg, [], ignore=[f"{tmp_path}/master.log"])
    assert spec.ignore == (f"{tmp_path}/master.log", f"{tmp_path}/cmd/run.log",
                           f"{tmp_path}/cmd/run.log.1", f"{tmp_path}/cmd/run.log.2")
    m = Matcher(spec)
    for log in spec.ignore:
        assert m.match([log]) == (set(), False)
    assert m.match([f"{tmp_path}/cmd/run"]) == ({"cmd", "everything"}, False)
    assert m.match([f"{tmp_path}/cmd/run.log.3"]) == ({"cmd", "everything"}, False)  # not ours


def test_build_spec_ignore_is_part_of_the_specs_identity(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'pools:\n  p:\n    functions:\n      f: "ghost:f"\n')
    assert build_spec(cfg, [], ignore=["/a.log"]) != build_spec(cfg, [])
    assert build_spec(cfg, [], ignore=["/a.log"]) == build_spec(cfg, [], ignore=["/a.log"])


def test_matcher_plain_files_and_globs_together() -> None:
    spec = WatchSpec("/srv/app/pools.yaml", (
        ("a", ("/srv/app/tasks.py", "/srv/app/lib/images.py")),
        ("b", ("/srv/app/**/*.html", "/srv/app/tasks.py")),
    ), ignore=("/srv/app/gearvisor.log", "/srv/app/pools.yaml"))
    m = Matcher(spec)
    assert m.files == {"/srv/app/tasks.py", "/srv/app/lib/images.py"}
    assert m.match(["/srv/app/tasks.py"]) == ({"a", "b"}, False)
    assert m.match(["/srv/app/lib/images.py"]) == ({"a"}, False)
    assert m.match(["/srv/app/t/page.html"]) == ({"b"}, False)
    assert m.match(["/srv/app/gearvisor.log"]) == (set(), False)
    assert m.match(["/srv/app/pools.yaml"]) == (set(), False)  # ignored wins even there


def test_output_files_are_the_regular_files_behind_the_fds(tmp_path: Path) -> None:
    log = tmp_path / "master.log"
    with log.open("a") as f:
        r, w = os.pipe()
        try:
            dup = os.dup(f.fileno())
            try:
                assert output_files([f.fileno(), r, dup]) == (str(log),)  # once, pipe left out
            finally:
                os.close(dup)
            closed = os.dup(r)
            os.close(closed)
            assert output_files([closed, w]) == ()
        finally:
            os.close(r)
            os.close(w)


# ---------------------------------------------------------------------------------------------
# what a child reports importing (imported_files, report_lines, send_import_report)


def fake_module(name: str, file: object = None, origin: str | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    if file is not None:
        module.__file__ = file  # type: ignore[assignment]
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, origin=origin)
    return module


def test_imported_files_keep_the_pools_code_and_drop_stdlib_site_packages_gearvisor(
        app: Path) -> None:
    import json as json_module

    import structlog
    import yaml

    import gearvisor.helpers.watcher

    modules = {
        "os": os, "json": json_module,  # stdlib (os: frozen in 3.11, with a stdlib __file__)
        "yaml": yaml, "structlog": structlog,  # site-packages
        "gearvisor.helpers.watcher": gearvisor.helpers.watcher,  # gearvisor itself
        "app": fake_module("app", f"{app}/app/__init__.py"),
        "app.tasks": fake_module("app.tasks", f"{app}/app/tasks.py"),
        "app.lib.images": fake_module("app.lib.images", f"{app}/app/lib/images.py"),
        "helpers": fake_module("helpers", f"{app}/shared/helpers.py"),
        "alias": fake_module("alias", f"{app}/shared/helpers.py"),  # one file, listed once
    }
    assert imported_files(modules, report_skip_dirs()) == [
        f"{app}/app/__init__.py", f"{app}/app/lib/images.py", f"{app}/app/tasks.py",
        f"{app}/shared/helpers.py"]


def test_report_skip_dirs_cover_this_interpreter_and_gearvisor() -> None:
    import sysconfig

    import yaml

    import gearvisor

    skip = report_skip_dirs()
    for path in (os.__file__, yaml.__file__, gearvisor.__file__,
                 sysconfig.get_paths()["purelib"] + "/x.py"):
        assert any(os.path.realpath(path).startswith(d + os.sep) for d in skip), path


def test_imported_files_drop_builtin_frozen_and_fileless_modules(app: Path) -> None:
    user = f"{app}/app/tasks.py"
    modules = {
        "sys": sys,  # built-in: no __file__
        "frozen_user": fake_module("frozen_user", user, origin="frozen"),
        "builtin_user": fake_module("builtin_user", user, origin="built-in"),
        "bare": fake_module("bare"),  # no __file__ at all
        "not_a_str": fake_module("not_a_str", 42),
        "empty": fake_module("empty", ""),
        "nul": fake_module("nul", f"{app}/app/ta\0sks.py"),
        "gone": fake_module("gone", f"{app}/app/deleted.py"),  # no such file any more
        "__main__": fake_module("__main__", user),  # gearvisor's entry point, never the pool's
        "none": None,  # sys.modules may hold None (an import blocked on purpose)
    }
    assert imported_files(modules, []) == []


def test_imported_files_drop_namespace_packages_but_keep_their_modules(tmp_path: Path) -> None:
    touch(tmp_path / "nspkg" / "mod.py")
    spec = importlib.machinery.PathFinder.find_spec("nspkg", [str(tmp_path)])  # no import
    assert spec is not None and spec.origin is None  # a namespace package
    ns = importlib.util.module_from_spec(spec)
    modules = {"nspkg": ns, "nspkg.mod": fake_module("nspkg.mod", f"{tmp_path}/nspkg/mod.py")}
    assert imported_files(modules, []) == [f"{tmp_path}/nspkg/mod.py"]


def test_imported_files_bytecode(tmp_path: Path) -> None:
    """A .pyc deployed without source is the code; bytecode in __pycache__ never is (a
    child's import rewrites it), its source is."""
    import py_compile

    src = touch(tmp_path / "legacy_src.py", "X = 1\n")
    legacy = tmp_path / "legacy.pyc"
    py_compile.compile(str(src), cfile=str(legacy))
    src.unlink()
    cached_src = touch(tmp_path / "cached.py", "Y = 1\n")
    cached = py_compile.compile(str(cached_src))  # __pycache__/cached.cpython-3XX.pyc
    orphan = touch(tmp_path / "__pycache__" / "orphan.cpython-311.pyc")
    modules = {"legacy": fake_module("legacy", str(legacy)),
               "cached": fake_module("cached", cached),
               "orphan": fake_module("orphan", str(orphan))}
    assert imported_files(modules, []) == [str(cached_src), str(legacy)]


def test_imported_files_drop_what_resolves_into_a_skipped_dir(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    touch(site / "lib.py")
    touch(tmp_path / "app" / "own.py")
    (tmp_path / "linked.py").symlink_to(site / "lib.py")
    (tmp_path / "linkdir").symlink_to(site)
    (tmp_path / "current").symlink_to(tmp_path / "app")  # a release symlink: kept as named
    modules = {"a": fake_module("a", f"{tmp_path}/linked.py"),
               "b": fake_module("b", f"{tmp_path}/linkdir/lib.py"),
               "c": fake_module("c", f"{site}/lib.py"),
               "d": fake_module("d", f"{tmp_path}/current/own.py")}
    assert imported_files(modules, [str(site)]) == [f"{tmp_path}/current/own.py"]


def test_imported_files_of_a_zip_import_is_the_archive(tmp_path: Path) -> None:
    import zipfile

    archive = tmp_path / "app.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("pkg/mod.py", "X = 1\n")
    modules = {"pkg.mod": fake_module("pkg.mod", f"{archive}/pkg/mod.py")}
    assert imported_files(modules, []) == [str(archive)]


def test_imported_files_survive_modules_that_raise_on_attribute_access(app: Path) -> None:
    class Hostile(types.ModuleType):
        def __getattribute__(self, name: str) -> object:
            raise RuntimeError("lazy module exploded")

    modules = {"hostile": Hostile("hostile"),
               "ok": fake_module("ok", f"{app}/app/tasks.py")}
    assert imported_files(modules, []) == [f"{app}/app/tasks.py"]


def test_imported_files_make_a_relative_file_absolute(app: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(app)
    assert imported_files({"t": fake_module("t", "app/tasks.py")}, []) == [
        f"{app}/app/tasks.py"]


def parse_lines(lines: list[bytes]) -> list[dict]:
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    return [json.loads(line) for line in lines]


def test_report_lines_round_trip_in_lines_short_enough_to_write_atomically() -> None:
    files = [f"/srv/app/pkg{i // 50}/module_with_a_long_name_{i:04}.py" for i in range(500)]
    lines = report_lines(files)
    assert len(lines) > 5
    assert REPORT_LINE <= select.PIPE_BUF
    assert all(len(line) <= REPORT_LINE for line in lines)
    events = parse_lines(lines)
    assert all(e["event"] == "modules" for e in events)
    assert [e["more"] for e in events] == [True] * (len(events) - 1) + [False]
    assert events[-1]["dropped"] == 0
    assert [f for e in events for f in e["files"]] == files


def test_report_lines_of_nothing_is_one_final_line() -> None:
    assert parse_lines(report_lines([])) == [{"event": "modules", "files": [], "more": False,
                                              "dropped": 0}]


def test_report_lines_are_bounded_in_files_characters_and_path_length() -> None:
    many = [f"/srv/app/m{i:05}.py" for i in range(MAX_REPORT_FILES + 10)]
    events = parse_lines(report_lines(many))
    assert sum(len(e["files"]) for e in events) == MAX_REPORT_FILES
    assert events[-1]["dropped"] == 10
    wide = [f"/srv/{i:04}/" + "x" * 990 + ".py" for i in range(300)]  # 1003 chars each
    events = parse_lines(report_lines(wide))
    kept = MAX_REPORT_CHARS // 1003
    assert sum(len(e["files"]) for e in events) == kept
    assert events[-1]["dropped"] == 300 - kept
    too_long = "/srv/" + "y" * 5000 + ".py"  # longer than one line can carry
    events = parse_lines(report_lines(["/srv/a.py", too_long, "/srv/b.py"]))
    assert [f for e in events for f in e["files"]] == ["/srv/a.py", "/srv/b.py"]
    assert events[-1]["dropped"] == 1


def test_report_lines_carry_any_path_python_can_name() -> None:
    odd = ["/srv/ünïcødé/ç.py", "/srv/bad\udcff.py", '/srv/quote"back\\slash\nnl.py',
           "/srv/" + "é" * 600 + ".py"]  # JSON-escaped to 6 bytes a character
    lines = report_lines(odd)
    assert all(len(line) <= REPORT_LINE for line in lines)
    assert [f for e in parse_lines(lines) for f in e["files"]] == odd


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_send_import_report_writes_the_report_down_a_non_blocking_pipe(app: Path) -> None:
    modules = {"t": fake_module("t", f"{app}/app/tasks.py"),
               "h": fake_module("h", f"{app}/shared/helpers.py")}
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        send_import_report(w, modules)
        events = parse_lines(read_all(r).splitlines(keepends=True))
    finally:
        os.close(r)
        os.close(w)
    assert events == [{"event": "modules", "dropped": 0, "more": False,
                       "files": [f"{app}/app/tasks.py", f"{app}/shared/helpers.py"]}]


def test_send_import_report_into_a_full_pipe_gives_up_in_time_with_whole_lines(
        tmp_path: Path) -> None:
    import fcntl

    files = []
    for i in range(400):
        files.append(str(touch(tmp_path / f"d{i // 100}" / f"mod_{i:03}_{'x' * 60}.py")))
    modules = {f"m{i}": fake_module(f"m{i}", f) for i, f in enumerate(files)}
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # the smallest pipe: one line fits
        os.set_blocking(w, False)
        started = time.monotonic()
        send_import_report(w, modules, wait=0.2)  # nobody reads: it must give up, not hang
        assert time.monotonic() - started < 5.0
        data = read_all(r)
    finally:
        os.close(r)
        os.close(w)
    events = parse_lines(data.splitlines(keepends=True))  # whole lines only, none cut
    assert events and all(e.get("more") is True for e in events)  # the report is unfinished


def test_send_import_report_to_a_closed_pipe_does_not_raise(app: Path) -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        os.set_blocking(w, False)
        send_import_report(w, {"t": fake_module("t", f"{app}/app/tasks.py")})
    finally:
        os.close(w)


# ---------------------------------------------------------------------------------------------
# WatcherState: collecting import reports in the master


def lines_of(files: list[str]) -> list[dict]:
    return [json.loads(line) for line in report_lines(files)]


def feed(w: WatcherState, pool: str, pid: int, generation: int, events: list[dict],
         live: set[int] | None = None) -> list[ImportReport | None]:
    return [w.add_report(pool, pid, generation, e, live if live is not None else {pid})
            for e in events]


def test_add_report_assembles_one_childs_lines(app: Path) -> None:
    files = [f"/srv/app/m{i:04}_{'x' * 40}.py" for i in range(300)]
    events = lines_of(files)
    assert len(events) > 2
    w = WatcherState(WatchSpec(None, ()))
    results = feed(w, "p", 101, 1, events)
    assert results[:-1] == [None] * (len(events) - 1)
    assert results[-1] == ImportReport(1, tuple(files), 0)
    assert w.reports["p"] == results[-1] and w.partial == {}
    assert w.status(NOW, Debouncer(1.0))["modules"] == {"p": 300}


def test_add_report_keeps_the_first_report_of_each_generation() -> None:
    w = WatcherState(WatchSpec(None, ()))
    one, two = lines_of(["/srv/a.py"]), lines_of(["/srv/a.py", "/srv/b.py"])
    assert feed(w, "p", 101, 1, one) == [ImportReport(1, ("/srv/a.py",))]
    assert feed(w, "p", 102, 1, two) == [None]  # same generation: the first one stands
    assert w.reports["p"].files == ("/srv/a.py",)
    assert feed(w, "p", 103, 2, one) == [None]  # a new generation, same files: no change
    assert w.reports["p"].generation == 2
    assert feed(w, "p", 104, 1, two) == [None]  # an old generation's late report
    assert feed(w, "p", 105, 3, two) == [ImportReport(3, ("/srv/a.py", "/srv/b.py"))]
    assert feed(w, "q", 106, 1, two) == [ImportReport(1, ("/srv/a.py", "/srv/b.py"))]
    assert w.partial == {}


def test_add_report_refuses_bad_input_item_by_item() -> None:
    w = WatcherState(WatchSpec(None, ()))
    events: list[dict] = [
        {"event": "modules", "files": "/srv/a.py", "more": True},  # not a list
        {"event": "modules", "files": None, "more": True},
        {"event": "modules", "files": {"/srv/a.py": 1}, "more": True},
        {"event": "modules", "files": ["/srv/ok.py", 7, None, "relative.py", "/srv/n\0ul.py",
                                       ["/srv/nested.py"]], "more": True},
        {"event": "modules", "dropped": "5", "more": True},
        {"event": "modules", "dropped": True, "more": True},
        {"event": "modules", "dropped": -3, "more": True},
        {"event": "modules", "files": ["/srv/ok.py"], "dropped": 10**30, "more": "yes"},
    ]
    results = feed(w, "p", 101, 1, events)
    assert results[:-1] == [None] * (len(events) - 1)
    assert results[-1] == ImportReport(1, ("/srv/ok.py",), 5 + (1 << 30))


def test_add_report_is_bounded_whatever_a_child_sends() -> None:
    w = WatcherState(WatchSpec(None, ()))
    endless = ({"event": "modules", "more": True,
                "files": [f"/srv/{n:06}/{i}_{'z' * 200}.py" for i in range(10)]}
               for n in range(5000))  # 50,000 paths of ~220 characters: 11 MB
    for event in endless:
        assert w.add_report("p", 101, 1, event, {101}) is None
        part = w.partial[101]
        assert len(part.files) <= MAX_REPORT_FILES and part.chars <= MAX_REPORT_CHARS
    report = w.add_report("p", 101, 1, {"event": "modules", "files": []}, {101})
    assert report is not None
    assert len(report.files) == MAX_REPORT_CHARS // len(report.files[0])
    assert report.dropped == 50_000 - len(report.files)


def test_add_report_drops_unfinished_reports_of_children_gone() -> None:
    w = WatcherState(WatchSpec(None, ()))
    unfinished = {"event": "modules", "files": ["/srv/a.py"], "more": True}
    assert w.add_report("p", 101, 1, unfinished, {101}) is None
    assert w.add_report("q", 102, 1, unfinished, {101, 102}) is None
    assert set(w.partial) == {101, 102}
    assert w.add_report("p", 103, 1, unfinished, {103}) is None  # 101 and 102 exited
    assert set(w.partial) == {103}
    # A pid reused by a child of another pool or generation starts a fresh report.
    assert w.add_report("q", 103, 4, {"event": "modules", "files": ["/srv/q.py"]},
                        {103}) == ImportReport(4, ("/srv/q.py",))
    assert w.partial == {}


def test_rebuild_follows_reports_and_forgets_removed_pools(app: Path) -> None:
    cfg = load(app, 'pools:\n  py:\n    functions:\n      f: "app.tasks:f"\n')
    w = WatcherState(build_spec(cfg, []))
    assert not w.rebuild(cfg, [])
    assert w.add_report("py", 1, 1, {"event": "modules", "files": [f"{app}/app/lib/images.py"]},
                        {1}) is not None
    assert w.rebuild(cfg, [])
    assert f"{app}/app/lib/images.py" in dict(w.spec.pools)["py"]
    assert not w.rebuild(cfg, [])
    other = load(app, 'pools:\n  other:\n    functions:\n      f: "app.tasks:f"\n')
    assert w.rebuild(other, [])
    assert w.reports == {}  # py was removed: if it comes back, it reports afresh


def test_for_config_leaves_the_masters_own_log_out(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import gearvisor.helpers.watcher as watcher

    monkeypatch.setattr(watcher, "output_files", lambda: (f"{tmp_path}/master.log",))
    cfg = load(tmp_path, 'pools:\n  p:\n    functions:\n      f: "x:f"\n    watch: ["."]\n')
    w = WatcherState.for_config(cfg, [])
    assert w.spec.ignore == (f"{tmp_path}/master.log",)
    assert Matcher(w.spec).match([f"{tmp_path}/master.log"]) == (set(), False)
    assert Matcher(w.spec).match([f"{tmp_path}/code.py"]) == ({"p"}, False)
    assert w.add_report("p", 1, 1, {"event": "modules", "files": ["/x.py"]}, {1})
    w.rebuild(cfg, [])
    assert w.spec.ignore == (f"{tmp_path}/master.log",)  # kept across rebuilds


# ---------------------------------------------------------------------------------------------
# the helper's loop, replayed through a fake notifier (no threads, no inotify, no sleeps)


class ScriptDone(Exception):
    """The fake notifier ran out of scripted events: ends the helper's loop."""


class FakeNotify:
    """Stands in for watchfiles' RustNotify, as watchfiles' own tests do: each watch() hands
    out the next scripted batch of raw (change, path) events ("timeout" for an empty one),
    and the end of the script ends the helper."""

    def __init__(self, script: list[set[tuple[int, str]]]) -> None:
        self.script = list(script)
        self.made: list[tuple[list[str], bool]] = []

    def __call__(self, paths: list[str], debug: bool, polling: bool, delay_ms: int,
                 recursive: bool, ignore_denied: bool) -> FakeNotify:
        self.made.append((list(paths), recursive))
        return self

    def watch(self, debounce_ms: int, step_ms: int, timeout_ms: int,
              stop_event: object) -> set[tuple[int, str]] | str:
        if not self.script:
            raise ScriptDone
        return self.script.pop(0) or "timeout"

    def close(self) -> None:
        pass


MODIFIED, DELETED = 2, 3  # watchfiles.Change values


def replay(spec: WatchSpec, script: list[set[tuple[int, str]]],
           monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict], FakeNotify]:
    """Run the helper's loop on `spec` over `script`; every event line it sent."""
    import watchfiles._rust_notify

    from gearvisor.helpers.watcher import _watch

    fake = FakeNotify(script)
    monkeypatch.setattr(watchfiles._rust_notify, "RustNotify", fake)
    r, w = os.pipe()
    try:
        with pytest.raises(ScriptDone):
            _watch(spec, w, os.getppid())
        data = read_all(r)
    finally:
        os.close(r)
        os.close(w)
    return [json.loads(line) for line in data.splitlines()], fake


def appended(path: Path, lines: int) -> list[set[tuple[int, str]]]:
    """What inotify reports for a log written line by line: one change per write."""
    return [{(MODIFIED, str(path))} for _ in range(lines)]


def test_helper_a_log_beside_the_code_sends_nothing(app: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    touch(app / "master.log")
    cfg = load(app, 'pools:\n  py:\n    functions:\n      f: "app.tasks:f"\n')
    images = f"{app}/app/lib/images.py"
    spec = build_spec(cfg, [], {"py": [images, f"{app}/shared/helpers.py"]},
                      ignore=[str(app / "master.log")])
    script = (appended(app / "app" / "worker.log", 200) + appended(app / "master.log", 50)
              + [set(), {(MODIFIED, f"{app}/app/worker.log"), (MODIFIED, images)}])
    events, fake = replay(spec, script, monkeypatch)
    assert [e["event"] for e in events] == ["watching", "changed"]  # not one per log line
    assert events[1] == {"event": "changed", "pools": ["py"], "config": False,
                         "files": [images], "count": 1, "why": "edited"}
    # The directories of the files only, flat: no recursive watch when files are wanted.
    assert fake.made == [([str(app), f"{app}/app", f"{app}/app/lib", f"{app}/shared"], False)]


def test_helper_a_command_pools_log_file_beside_its_script_sends_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The script has no extension, so the pool watches cmd/*, its log_file included:
    every line the pool logged rolled it, and the roll logged more."""
    touch(tmp_path / "cmd" / "run")
    touch(tmp_path / "cmd" / "run.log")
    cfg = load(tmp_path, """\
watch_config: false
pools:
  cmd:
    command: ["sh", "cmd/run"]
    functions: [x]
    log_file: cmd/run.log
    log_file_backups: 2
""")
    log = tmp_path / "cmd" / "run.log"
    rotation = {(DELETED, f"{log}"), (MODIFIED, f"{log}.1"), (MODIFIED, f"{log}.2")}
    script = [*appended(log, 100), rotation, *appended(log, 20),
              {(MODIFIED, f"{tmp_path}/cmd/run")}]
    events, _ = replay(build_spec(cfg, []), script, monkeypatch)
    assert [e["event"] for e in events] == ["watching", "changed"]
    assert events[1]["pools"] == ["cmd"] and events[1]["files"] == [f"{tmp_path}/cmd/run"]


def test_helper_the_masters_own_log_in_a_watched_directory_sends_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path / "code.py")
    log = touch(tmp_path / "gearvisor.log")
    cfg = load(tmp_path, 'pools:\n  p:\n    functions:\n      f: "code:f"\n    watch: ["."]\n')
    spec = build_spec(cfg, [], ignore=[str(log)])
    events, fake = replay(spec, [*appended(log, 100), {(MODIFIED, f"{tmp_path}/code.py")}],
                          monkeypatch)
    assert [e["event"] for e in events] == ["watching", "changed"]
    assert events[1]["files"] == [f"{tmp_path}/code.py"]
    assert fake.made == [([str(tmp_path)], True)]  # watch: a directory means all under it


def test_helper_a_bytecode_only_module_is_watched_despite_the_ignore_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    legacy = touch(tmp_path / "legacy.pyc")
    cfg = load(tmp_path, 'watch_config: false\npools:\n  p:\n    functions:\n      f: "x:f"\n')
    spec = build_spec(cfg, [], {"p": [str(legacy)]})
    script = [{(MODIFIED, f"{tmp_path}/other.pyc")}, {(MODIFIED, str(legacy))}]
    events, _ = replay(spec, script, monkeypatch)
    assert [(e["event"], e.get("files")) for e in events] == [
        ("watching", None), ("changed", [str(legacy)])]
