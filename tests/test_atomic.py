"""Directory outputs are swapped into place so that a crash at any moment leaves one complete version on disk."""

import os

import pytest

from dmd2 import atomic
from dmd2.atomic import aside_path, fresh_staging_dir, replace_directory


def _version(folder, text: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights").write_text(text)
    return folder


def test_replace_directory_swaps_in_the_new_version_and_drops_the_old(tmp_path):
    final = _version(tmp_path / "student", "old")
    tmp = _version(fresh_staging_dir(final), "new")
    replace_directory(tmp, final)
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_a_crash_between_the_renames_keeps_the_old_version_and_the_next_write_recovers(tmp_path, monkeypatch):
    final = _version(tmp_path / "student", "old")
    real_replace, calls = os.replace, []

    def crash_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the old version moved aside, before the new one moved in
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_directory(_version(fresh_staging_dir(final), "new"), final)
    assert not final.exists() and (aside_path(final) / "weights").read_text() == "old"  # not lost: aside
    monkeypatch.setattr(atomic.os, "replace", real_replace)

    atomic.recover_directory(final)
    assert (final / "weights").read_text() == "old" and not aside_path(final).exists()
    # and a write that finds the old version aside puts it back before replacing it
    monkeypatch.setattr(atomic.os, "replace", crash_on_second_rename)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        replace_directory(_version(fresh_staging_dir(final), "new"), final)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    replace_directory(_version(fresh_staging_dir(final), "newer"), final)
    assert (final / "weights").read_text() == "newer" and not aside_path(final).exists()
