"""child.load_functions: user code imported from tmp_path, and BootError texts for operators."""

from __future__ import annotations

import importlib
import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gearvisor.child.python import BootError, load_functions

_counter = itertools.count()


@pytest.fixture
def make_module(tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a module with a unique name onto sys.path; return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def make(source: str) -> str:
        name = f"gv_test_mod_{next(_counter)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        # The path finder caches directory listings; a file written this instant may be missed.
        importlib.invalidate_caches()
        written.append(name)
        return name

    yield make
    for name in written:
        sys.modules.pop(name, None)


def test_good_functions_load(make_module: Callable[[str], str]) -> None:
    mod = make_module("""
        def reverse(job):
            return job.data[::-1]

        def with_default(job, extra=1):
            return extra

        def star(*args):
            return args

        class Tools:
            @staticmethod
            def upper(job):
                return job.data.upper()

        class Callable_:
            def __call__(self, job):
                return b"called"

        instance = Callable_()
    """)
    loaded = load_functions({
        "reverse": f"{mod}:reverse",
        "with_default": f"{mod}:with_default",
        "star": f"{mod}:star",
        "upper": f"{mod}:Tools.upper",
        "instance": f"{mod}:instance",
    })
    module = sys.modules[mod]
    assert loaded == {
        "reverse": module.reverse,
        "with_default": module.with_default,
        "star": module.star,
        "upper": module.Tools.upper,
        "instance": module.instance,
    }
    assert loaded["reverse"](type("J", (), {"data": b"abc"})()) == b"cba"


def test_empty_mapping_loads_nothing() -> None:
    assert load_functions({}) == {}


def test_missing_module() -> None:
    name = f"gv_test_absent_{next(_counter)}"
    with pytest.raises(BootError) as info:
        load_functions({"reverse": f"{name}:reverse"})
    assert str(info.value) == (f"function reverse: cannot import module {name!r}: "
                               f"ModuleNotFoundError: No module named {name!r}")


def test_module_that_raises_on_import(make_module: Callable[[str], str]) -> None:
    mod = make_module("""
        raise RuntimeError("database URL not set")
    """)
    with pytest.raises(BootError) as info:
        load_functions({"resize": f"{mod}:resize"})
    assert str(info.value) == (f"function resize: cannot import module {mod!r}: "
                               "RuntimeError: database URL not set")


def test_module_with_syntax_error(make_module: Callable[[str], str]) -> None:
    mod = make_module("""
        def broken(job)
            return 1
    """)
    with pytest.raises(BootError) as info:
        load_functions({"broken": f"{mod}:broken"})
    text = str(info.value)
    assert text.startswith(f"function broken: cannot import module {mod!r}: ")
    assert "SyntaxError" in text


def test_missing_attribute(make_module: Callable[[str], str]) -> None:
    mod = make_module("""
        def reverse(job):
            return job.data
    """)
    with pytest.raises(BootError) as info:
        load_functions({"reverse": f"{mod}:revers"})
    assert str(info.value) == f"function reverse: module {mod!r} has no attribute 'revers'"


def test_missing_nested_attribute(make_module: Callable[[str], str]) -> None:
    mod = make_module("""
        class Tools:
            pass
    """)
    with pytest.raises(BootError) as info:
        load_functions({"upper": f"{mod}:Tools.upper"})
    assert str(info.value) == f"function upper: module {mod!r} has no attribute 'Tools.upper'"


def test_not_callable(make_module: Callable[[str], str]) -> None:
    mod = make_module("""
        reverse = "not a function"
    """)
    with pytest.raises(BootError) as info:
        load_functions({"reverse": f"{mod}:reverse"})
    assert str(info.value) == f"function reverse: {mod}:reverse is a str, not callable"


@pytest.mark.parametrize("signature", ["job, size", "", "*, job"])
def test_wrong_signature(make_module: Callable[[str], str], signature: str) -> None:
    mod = make_module(f"""
        def resize({signature}):
            return None
    """)
    with pytest.raises(BootError) as info:
        load_functions({"resize": f"{mod}:resize"})
    assert str(info.value) == (f"function resize: {mod}:resize must accept exactly one argument "
                               "(the job), e.g. def resize(job): ...")


def test_first_bad_function_stops_loading(make_module: Callable[[str], str]) -> None:
    mod = make_module("""
        def good(job):
            return 1

        bad = 3
    """)
    with pytest.raises(BootError, match=rf"^function bad: {mod}:bad is a int, not callable$"):
        load_functions({"good": f"{mod}:good", "bad": f"{mod}:bad"})
