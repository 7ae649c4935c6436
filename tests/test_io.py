"""Atomic outputs: a directory replaced whole or entry by entry (the others kept, stale ones removed, the marker
last), the previous output intact when filling fails, and modes from the umask even for private writers."""

import os
import stat

import pytest

from hf_accinf import AccInfError
from hf_accinf.io import is_shard, refuse_foreign, shard_name, write_directory


def fill_with(**files):
    def fill(staging):
        for name, content in files.items():
            (staging / name).write_text(content)
    return fill


def test_a_directory_is_replaced_whole_or_entry_by_entry(tmp_path):
    target = tmp_path / "out"
    write_directory(target, fill_with(a="1", b="1"))
    write_directory(target, fill_with(a="2"))
    assert sorted(p.name for p in target.iterdir()) == ["a"]  # whole: b is gone
    (target / "users.txt").write_text("mine")
    (target / "stale").write_text("old")
    order = []
    original = os.replace

    def recording_replace(source, destination):
        order.append(os.path.basename(destination))
        original(source, destination)
    try:
        os.replace = recording_replace
        write_directory(target, fill_with(z="3", a="3", marker="done"), replaces={"a", "stale", "marker"}, last="marker")
    finally:
        os.replace = original
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "3", "z": "3", "marker": "done", "users.txt": "mine"}
    assert order[-1] == "marker"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left


def test_a_failed_fill_leaves_the_previous_output(tmp_path):
    target = tmp_path / "out"
    write_directory(target, fill_with(a="1"))

    def failing(staging):
        (staging / "a").write_text("2")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_directory(target, failing)
    assert (target / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_modes_follow_the_umask(tmp_path):
    def private(staging):
        (staging / "nested").mkdir(mode=0o700)
        (staging / "nested" / "f").write_text("x")
        os.chmod(staging / "nested" / "f", 0o600)
    previous = os.umask(0o027)
    try:
        write_directory(tmp_path / "out", private)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "nested").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "nested" / "f").stat().st_mode) == 0o640


def test_foreign_directories_and_shard_names(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(AccInfError, match="is a file"):
        refuse_foreign(tmp_path / "file", True, lambda d: True)
    with pytest.raises(AccInfError, match="not empty"):
        refuse_foreign(tmp_path, False, lambda d: True)
    with pytest.raises(AccInfError, match="not written by hf_accinf"):
        refuse_foreign(tmp_path, True, lambda d: False)
    name = shard_name("scores.safetensors", 2, 8)
    assert name == "scores.part-00002-of-00008.safetensors"
    assert is_shard(name, "scores.safetensors") and is_shard(name + ".done", "scores.safetensors")
    assert not is_shard("scores.safetensors", "scores.safetensors") and not is_shard(name, "embeddings.safetensors")
