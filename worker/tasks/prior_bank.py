"""The shared class-prior bank: kept in storage, cached on each worker, listed in the ``prior_banks`` table.

The engine fills a bank folder ``bank_root/<key>/`` (``00000.png``, ... and ``meta.json`` naming the
model fingerprint, class prompt and sampler settings). Before a job, :func:`pull_banks` copies the
banks of the job's base model from storage into the worker's local cache, so the engine finds them
and generates only what is missing; after it, :func:`push_banks` uploads new images and upserts
the bank's row. Every account's jobs share the banks: class images ("a photo of a dog") hold
nothing personal.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import PriorBank, utcnow
from app.storage import Storage
from app.storage.base import prior_bank_prefix

log = logging.getLogger(__name__)

META_FILE = "meta.json"


@dataclass
class BankSync:
    banks: int = 0
    files: int = 0


def pull_banks(session: Session, storage: Storage, bank_root: Path, model_fingerprint: str) -> BankSync:
    """Copy every bank of ``model_fingerprint`` from storage into ``bank_root`` (files missing locally only)."""
    sync = BankSync()
    rows = session.execute(select(PriorBank).where(PriorBank.model_fingerprint == model_fingerprint)).scalars()
    for bank in rows:
        folder = bank_root / bank.key
        folder.mkdir(parents=True, exist_ok=True)
        sync.banks += 1
        for key in storage.list(bank.storage_prefix):
            name = key[len(bank.storage_prefix):]
            if not name or "/" in name or name.startswith("."):
                continue
            target = folder / name
            if target.exists():
                continue
            # Into a temporary name, then renamed: the engine never sees a torn image.
            partial = folder / f".{name}.{os.getpid()}.download"
            storage.download_to(key, partial)
            os.replace(partial, target)
            sync.files += 1
    return sync


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def push_banks(session: Session, storage: Storage, bank_root: Path, model_fingerprint: str) -> BankSync:
    """Upload new images of the local banks of ``model_fingerprint`` and upsert their rows.

    The images go first and ``meta.json`` last, so a bank in storage never claims more than it holds.
    """
    sync = BankSync()
    if not bank_root.is_dir():
        return sync
    for folder in sorted(p for p in bank_root.iterdir() if p.is_dir()):
        meta = _read_meta(folder)
        if meta is None or meta.get("model_fingerprint") != model_fingerprint:
            continue
        prefix = prior_bank_prefix(folder.name)
        stored = {key[len(prefix):] for key in storage.list(prefix)}
        images = sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))
        for image in images:
            if image.name not in stored:
                storage.put_file(prefix + image.name, image, "image/png")
                sync.files += 1
        storage.put_file(prefix + META_FILE, folder / META_FILE, "application/json")
        _upsert_row(session, folder.name, meta, prefix, len(images))
        sync.banks += 1
    return sync


def _upsert_row(session: Session, key: str, meta: dict[str, Any], prefix: str, image_count: int) -> None:
    bank = session.execute(select(PriorBank).where(PriorBank.key == key)).scalar_one_or_none()
    if bank is None:
        bank = PriorBank(
            key=key,
            model_fingerprint=str(meta.get("model_fingerprint", "")),
            class_prompt=str(meta.get("class_prompt", ""))[:200],
            resolution=int(meta.get("resolution", 0)),
            sampler=str(meta.get("sampler", ""))[:40],
            steps=int(meta.get("steps", 0)),
            guidance=float(meta.get("guidance", 0.0)),
            image_count=image_count,
            storage_prefix=prefix,
        )
        try:
            with session.begin_nested():
                session.add(bank)
            return
        except IntegrityError:
            # Another worker inserted the same bank a moment ago: update its row instead.
            bank = session.execute(select(PriorBank).where(PriorBank.key == key)).scalar_one()
    bank.image_count = max(bank.image_count, image_count)
    bank.updated_at = utcnow()
