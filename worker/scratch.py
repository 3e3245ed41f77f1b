"""A job's private scratch folder on the worker, and the sweep that removes those of dead attempts.

The folder holds copies of a person's photos, their prepared crops and checkpoints, so it must not
outlive its attempt. :func:`scratch_folder` removes it whatever happens to the run; only a killed
process (SIGKILL, out-of-memory killer, power loss) leaves one behind. Each folder therefore names
its owner in ``.owner.json`` (host, PID, the process's start time, job and subject ids), and
:func:`sweep_scratch` removes every folder whose owner is provably dead. It runs:

- when a worker starts (``worker_ready``: what this host's killed workers left),
- in every worker at a studio's deletion (a broadcast sent by ``maintenance.purge_subject``), and in
  the web process at the deletion itself (one machine: web and workers share ``var/``),
- in the reaper, with the database's view: a folder of a job that is gone or final goes too when its
  owner cannot be judged from here (another host, or no owner file).

A folder whose owner is alive is never touched: that process removes it itself when its run ends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_FILE = ".owner.json"
# A folder without an owner file younger than this may be between its mkdir and its owner file.
UNMARKED_GRACE_SECONDS = 60.0
FINAL_STATUSES = ("done", "failed", "cancelled")

# job ids -> their status; a job missing from the answer no longer exists.
JobStates = Callable[[list[uuid.UUID]], dict[uuid.UUID, str]]


@dataclass(frozen=True)
class ScratchOwner:
    """The process that created a scratch folder."""

    host: str
    pid: int
    started: int | None  # the process's start time in clock ticks since boot (Linux); guards against PID reuse
    job_id: str
    subject_id: str | None = None


def scratch_path(scratch_root: Path, job_id: uuid.UUID) -> Path:
    return scratch_root / str(job_id)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it follow the last ")".
    return stat[stat.rindex(")") + 2:].split()


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None where /proc cannot say."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None  # field 22, starttime


def current_owner(job_id: uuid.UUID, subject_id: uuid.UUID | None = None) -> ScratchOwner:
    pid = os.getpid()
    return ScratchOwner(host=socket.gethostname(), pid=pid, started=_process_start(pid), job_id=str(job_id),
                        subject_id=str(subject_id) if subject_id else None)


def read_owner(folder: Path) -> ScratchOwner | None:
    try:
        raw = json.loads((folder / OWNER_FILE).read_text())
        return ScratchOwner(host=str(raw["host"]), pid=int(raw["pid"]),
                            started=None if raw.get("started") is None else int(raw["started"]),
                            job_id=str(raw["job_id"]), subject_id=raw.get("subject_id"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def owner_alive(owner: ScratchOwner) -> bool | None:
    """True or False for an owner on this host; None when it ran elsewhere (this host cannot tell)."""
    if owner.host != socket.gethostname():
        return None
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user holds the PID: not ours, unless the start time says it is
    fields = _proc_stat(owner.pid)
    if fields is None:
        return True  # no /proc: the PID exists, which is all this host can tell
    if fields[0] in ("Z", "X"):
        return False  # killed, and not yet reaped by a parent that may itself be gone
    # A different start time: the PID was reused by a later process.
    return owner.started is None or int(fields[19]) == owner.started


@contextmanager
def scratch_folder(scratch_root: Path, job_id: uuid.UUID, subject_id: uuid.UUID | None = None) -> Iterator[Path]:
    """``scratch_root/<job_id>``, emptied first (a crashed earlier attempt may have left files), owned by
    this process, and removed after."""
    folder = scratch_path(scratch_root, job_id)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / OWNER_FILE).write_text(json.dumps(asdict(current_owner(job_id, subject_id))))
    try:
        yield folder
    finally:
        remove_scratch(scratch_root, job_id)


def remove_scratch(scratch_root: Path, job_id: uuid.UUID) -> bool:
    """Remove a job's scratch folder if this machine has one; False when some of it could not be removed."""
    folder = scratch_path(scratch_root, job_id)
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        log.warning("could not remove scratch folder of job %s", job_id)
        return False
    return True


def sweep_scratch(scratch_root: Path, job_states: JobStates | None = None) -> list[str]:
    """Remove the scratch folders of dead attempts under ``scratch_root``; returns their job ids.

    A folder goes when its owner on this host is dead; with ``job_states`` (the database's view) also
    when its owner cannot be judged here and its job is gone or final. Other folders stay.
    """
    if not scratch_root.is_dir():
        return []
    undecided: dict[uuid.UUID, Path] = {}
    removed: list[str] = []
    for folder in sorted(scratch_root.iterdir()):
        try:
            job_id = uuid.UUID(folder.name)
        except ValueError:
            continue  # not a job's folder
        if not folder.is_dir():
            continue
        owner = read_owner(folder)
        alive = owner_alive(owner) if owner is not None else None
        if alive:
            continue
        if alive is False or (owner is None and job_states is None and _age(folder) > UNMARKED_GRACE_SECONDS):
            if remove_scratch(scratch_root, job_id):
                removed.append(str(job_id))
            continue
        undecided[job_id] = folder
    if job_states is not None and undecided:
        states = job_states(list(undecided))
        for job_id, folder in undecided.items():
            status = states.get(job_id)
            unmarked_and_young = read_owner(folder) is None and _age(folder) <= UNMARKED_GRACE_SECONDS
            gone_or_final = status is None or status in FINAL_STATUSES
            if gone_or_final and not unmarked_and_young and remove_scratch(scratch_root, job_id):
                removed.append(str(job_id))
    if removed:
        log.info("scratch sweep: removed the folders of %d dead attempts (%s)", len(removed), ", ".join(removed))
    return removed


def _age(folder: Path) -> float:
    try:
        return time.time() - folder.stat().st_mtime
    except OSError:
        return 0.0
