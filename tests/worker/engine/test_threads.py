"""The worker's PyTorch threads: the cores the process may use, one left to the rest on a small machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.engine import threads


def test_one_core_is_left_to_the_web_and_the_database_on_a_small_machine() -> None:
    assert [threads.default_threads(cores) for cores in (1, 2, 3, 4, 5, 16)] == [1, 1, 2, 3, 5, 16]


def test_a_cgroup_quota_caps_the_usable_cores(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 cores, as `docker run --cpus 1.5` sets
    assert threads.usable_cpus(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: one core
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.usable_cpus(tmp_path) == 1


def test_a_configured_count_wins_and_is_applied_to_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    assert threads.choose_threads(None) == 1 and threads.choose_threads(0) == 1
    assert threads.choose_threads(3) == 3
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert threads.thread_environment(2) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
