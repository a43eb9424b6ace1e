"""The master's state file: JSON documents in SQLite that survive a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from gearvisor.master.state import StateError, StateStore


def test_saved_state_is_there_after_reopening(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "state"))
    assert store.load("alerts") is None
    store.save("alerts", {"silences": [{"id": "a1", "ends": 1.5}]})
    store.save("alerts", {"silences": []})  # replaced, not appended
    store.close()
    again = StateStore(str(tmp_path / "state"))
    try:
        assert again.load("alerts") == {"silences": []}
    finally:
        again.close()
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def test_a_damaged_file_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "state.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError) as e:
        store = StateStore(str(tmp_path))
        store.load("alerts")
    assert str(tmp_path / "state.sqlite3") in str(e.value)


def test_a_state_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    with pytest.raises(StateError, match="check state_dir"):
        StateStore(str(tmp_path / "taken"))


def test_a_document_too_large_is_refused_and_the_old_one_kept(tmp_path: Path,
                                                               monkeypatch) -> None:
    from gearvisor.master import state

    store = StateStore(str(tmp_path))
    try:
        store.save("k", [1])
        monkeypatch.setattr(state, "MAX_DOCUMENT", 10)
        with pytest.raises(StateError, match="more than the 10"):
            store.save("k", list(range(100)))
        assert store.load("k") == [1]
    finally:
        store.close()
