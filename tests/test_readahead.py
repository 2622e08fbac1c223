"""Reading ahead while the process imports: which files, how many, and that it is only advice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from planner import api, make_plan
from planner.files import readahead


def _meminfo(tmp_path: Path, available_kib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {available_kib} kB\n")
    return path


def test_files_within_take_the_leading_files_that_fit(tmp_path: Path):
    files = []
    for i, size in enumerate((100, 200, 300, 50)):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x" * size)
        files.append(f)
    assert readahead.files_within(files, 350) == files[:2]          # in order: the 50 after the 300 waits
    assert readahead.files_within(files, 1000) == files
    assert readahead.files_within(files, 99) == []
    assert readahead.files_within([tmp_path / "missing", *files], 100) == files[:1]


def test_available_bytes_reads_meminfo(tmp_path: Path):
    assert readahead.available_bytes(_meminfo(tmp_path, 2048)) == 2048 * 1024
    (tmp_path / "bad").write_text("nonsense\n")
    assert readahead.available_bytes(tmp_path / "bad") is None
    assert readahead.available_bytes(tmp_path / "none") is None


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux's")
def test_start_readahead_advises_what_fits_in_half_the_available_memory(tmp_path: Path, monkeypatch):
    files = []
    for i in range(3):
        f = tmp_path / f"w{i}.safetensors"
        f.write_bytes(b"y" * 1024 * 400)
        files.append(f)
    advised = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        return real(fd, offset, length, advice)
    monkeypatch.setattr(os, "posix_fadvise", record)
    thread = readahead.start_readahead(files, _meminfo(tmp_path, 1000))      # half of 1000 KiB: one file
    assert thread is not None
    thread.join(10)
    assert advised == [(str(files[0]), os.POSIX_FADV_WILLNEED)]
    assert readahead.start_readahead(files, tmp_path / "none") is None        # no MemAvailable: nothing


def test_load_reads_ahead_the_files_it_reads_whole_not_a_file_tier(tmp_path: Path):
    from planner.testing.tiny_pipelines import save_tiny_pipeline

    folder = tmp_path / "z"
    save_tiny_pipeline("z-image-turbo", folder)
    spec = {"version": 1, "pipeline": {"path": str(folder)}, "device": "cpu",
            "defaults": {"strategy": "layerwise"}, "components": {"transformer": {"host_tier": "mapped"}}}
    plan = make_plan(spec)
    files = api.files_read_whole(folder, plan)
    assert files and all(folder in f.parents for f in files)
    assert {f.parent.name for f in files} == {n for n in plan.components if n != "transformer"}
