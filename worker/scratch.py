"""A job's private scratch folder on the worker: created empty, removed whatever happens."""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def scratch_path(scratch_root: Path, job_id: uuid.UUID) -> Path:
    return scratch_root / str(job_id)


@contextmanager
def scratch_folder(scratch_root: Path, job_id: uuid.UUID) -> Iterator[Path]:
    """``scratch_root/<job_id>``, emptied first (a crashed earlier attempt may have left files) and removed after."""
    folder = scratch_path(scratch_root, job_id)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            log.warning("could not remove scratch folder of job %s", job_id)


def remove_scratch(scratch_root: Path, job_id: uuid.UUID) -> None:
    """Remove a job's scratch folder if this machine has one (for deletion and the reaper)."""
    shutil.rmtree(scratch_path(scratch_root, job_id), ignore_errors=True)
