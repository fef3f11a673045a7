"""``linear_moe.components.files``: atomic file writes and atomic output-directory swaps.

References: the filesystem itself (what a reader finds during and after the write) and the same
swap through the two-rename fallback, forced by making the exchange unavailable.
"""
from __future__ import annotations

import json
import threading

import pytest

from linear_moe.components import files
from linear_moe.components.files import atomic_dir, atomic_write_json, exchange_paths

MARKER = "done.txt"


def _write_output(final, text: str) -> None:
    with atomic_dir(final, MARKER) as tmp:
        (tmp / MARKER).write_text(text)


def _siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_exchange_paths_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("from a")
    (b / "y").write_text("from b")
    if not exchange_paths(a, b):
        pytest.skip("this kernel or filesystem cannot exchange paths (the two-rename fallback is tested below)")
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]


def test_exchange_paths_raises_on_a_missing_path(tmp_path):
    (tmp_path / "a").mkdir()
    if not exchange_paths(tmp_path / "a", tmp_path / "a"):
        pytest.skip("this kernel or filesystem cannot exchange paths")
    with pytest.raises(FileNotFoundError, match="missing"):
        exchange_paths(tmp_path / "a", tmp_path / "missing")


@pytest.mark.parametrize("exchange", ["native", "two_renames"])
def test_atomic_dir_replaces_a_previous_output_and_leaves_no_debris(tmp_path, monkeypatch, exchange):
    if exchange == "two_renames":
        monkeypatch.setattr(files, "exchange_paths", lambda a, b: False)
    final = tmp_path / "out"
    _write_output(final, "first")
    _write_output(final, "second")
    assert (final / MARKER).read_text() == "second"
    assert _siblings(final) == []


def test_atomic_dir_keeps_the_previous_output_when_the_run_fails(tmp_path):
    final = tmp_path / "out"
    _write_output(final, "first")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(final, MARKER) as tmp:
        (tmp / MARKER).write_text("half")
        raise RuntimeError("boom")
    assert (final / MARKER).read_text() == "first"
    assert _siblings(final) == []


def test_a_reader_always_finds_the_output_while_it_is_replaced(tmp_path):
    """With the exchange, ``final`` never goes missing between the old output and the new one (the
    two-rename fallback leaves a moment without it)."""
    final = tmp_path / "out"
    _write_output(final, "0")
    probe = tmp_path / "probe"
    probe.mkdir()
    if not exchange_paths(probe, final) or not exchange_paths(probe, final):
        pytest.skip("this kernel or filesystem cannot exchange paths")
    missing, stop = [], threading.Event()

    def read_until_stopped() -> None:
        while not stop.is_set():
            try:
                (final / MARKER).read_text()
            except FileNotFoundError:
                missing.append(1)

    reader = threading.Thread(target=read_until_stopped)
    reader.start()
    try:
        for index in range(1, 300):
            _write_output(final, str(index))
    finally:
        stop.set()
        reader.join()
    assert (final / MARKER).read_text() == "299"
    assert not missing, f"the output was missing {len(missing)} times while being replaced"


def test_atomic_write_json_replaces_whole_and_cleans_up(tmp_path):
    path = tmp_path / "sub" / "state.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    atomic_write_json(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 2}
    assert path.read_text().endswith("\n")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"step": 2}, "a failed write must leave the previous file"
    assert _siblings(path) == []
