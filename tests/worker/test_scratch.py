"""Scratch folders: owned by the process that made them, removed by the sweep only once that process is dead."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.worker.processes import ROOT
from worker.scratch import OWNER_FILE, UNMARKED_GRACE_SECONDS, scratch_folder, scratch_path, sweep_scratch

PLANT = """
import os, sys, uuid
from pathlib import Path
from worker.scratch import scratch_folder
root, job_id = Path(sys.argv[1]), uuid.UUID(sys.argv[2])
with scratch_folder(root, job_id, uuid.uuid4()) as folder:
    (folder / "photos").mkdir()
    (folder / "photos" / "00.jpg").write_bytes(b"a person's photo")
    os.kill(os.getpid(), 9)  # killed mid-run: the folder's finally never runs
"""


def plant_dead_attempt(root: Path) -> uuid.UUID:
    """A scratch folder left by a process killed with SIGKILL while it held photos."""
    job_id = uuid.uuid4()
    result = subprocess.run([sys.executable, "-c", PLANT, str(root), str(job_id)], cwd=ROOT, check=False,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == -signal.SIGKILL
    assert (scratch_path(root, job_id) / "photos" / "00.jpg").is_file()
    return job_id


def _rewrite_owner(folder: Path, **changes: object) -> None:
    owner = json.loads((folder / OWNER_FILE).read_text())
    owner.update(changes)
    (folder / OWNER_FILE).write_text(json.dumps(owner))


def test_the_folder_is_owned_while_the_run_lasts_and_removed_after(tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    with scratch_folder(tmp_path, job_id) as folder:
        owner = json.loads((folder / OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["job_id"] == str(job_id)
        assert sweep_scratch(tmp_path) == []  # a live owner's folder is never touched
        assert folder.is_dir()
    assert not folder.exists()


def test_the_sweep_removes_what_a_killed_process_left_and_keeps_the_rest(tmp_path: Path) -> None:
    dead = plant_dead_attempt(tmp_path)
    with scratch_folder(tmp_path, uuid.uuid4()) as live:
        (tmp_path / "not-a-job").mkdir()
        assert sweep_scratch(tmp_path) == [str(dead)]
        assert not scratch_path(tmp_path, dead).exists() and live.is_dir() and (tmp_path / "not-a-job").is_dir()


def test_a_reused_pid_does_not_keep_a_dead_owners_folder(tmp_path: Path) -> None:
    with scratch_folder(tmp_path, uuid.uuid4()) as folder:
        _rewrite_owner(folder, started=1)  # this PID, but a process that started at another time
        assert sweep_scratch(tmp_path) == [folder.name]


def test_an_owner_on_another_host_is_judged_by_the_database(tmp_path: Path) -> None:
    folders = {}
    for status in ("running", "done", "gone"):
        job_id = uuid.uuid4()
        folder = scratch_path(tmp_path, job_id)
        folder.mkdir()
        (folder / OWNER_FILE).write_text(json.dumps({"host": "another-host", "pid": 1, "started": None,
                                                     "job_id": str(job_id)}))
        folders[status] = job_id
    assert sweep_scratch(tmp_path) == []  # this host cannot tell whether that process is alive
    states = {folders["running"]: "running", folders["done"]: "done"}
    removed = sweep_scratch(tmp_path, lambda ids: {job_id: states[job_id] for job_id in ids if job_id in states})
    assert sorted(removed) == sorted([str(folders["done"]), str(folders["gone"])])
    assert scratch_path(tmp_path, folders["running"]).is_dir()


def test_a_folder_without_an_owner_file_goes_once_it_is_old(tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    folder = scratch_path(tmp_path, job_id)
    folder.mkdir()
    assert sweep_scratch(tmp_path) == []  # it may be between its mkdir and its owner file
    old = time.time() - UNMARKED_GRACE_SECONDS - 5
    os.utime(folder, (old, old))
    assert sweep_scratch(tmp_path) == [str(job_id)]


@pytest.mark.parametrize("missing", [True, False])
def test_the_sweep_of_a_missing_root_is_empty(tmp_path: Path, missing: bool) -> None:
    root = tmp_path / "scratch"
    if not missing:
        root.mkdir()
    assert sweep_scratch(root) == []
