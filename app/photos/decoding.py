"""Where uploads are decoded in the web process: a few worker threads of their own, never a request's
database session.

Decoding a photo is seconds of CPU. Done inside a request's session (as it once was), a handful of
uploads held every session slot of the process while they decoded, and polls, pages and sign-ins
waited behind them. Here an upload first waits for a decode slot in the event loop, holding no
session and no thread of the shared pool, and its photos are decoded one at a time, each taking a
slot for itself, so concurrent uploads take turns photo by photo instead of one holding a slot for
all of its twenty.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence
from functools import lru_cache

import anyio
import anyio.to_thread

from app.config import Settings
from app.photos import sanitize
from app.photos.sanitize import PhotoRejected, SanitizedBatch, UploadSource


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Hand the memory a decode freed back to the system (glibc only; elsewhere nothing happens).

    A decoded picture is tens to hundreds of MB in Pillow's blocks, freed when the photo is done;
    glibc keeps such freed memory in the decoding thread's arena, so the web process stayed at its
    peak after one large upload (+200 MB after a 50 MP RGBA PNG, measured with bench/web.py's server).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _sanitize_then_release(filename: str, source: UploadSource, settings: Settings,
                           faces: bool) -> sanitize.SanitizedPhoto:
    try:
        return sanitize.sanitize_upload(filename, source, settings, faces)
    finally:
        release_freed_memory()


class DecodeSlots:
    """At most ``concurrency`` photos are decoded at once; the others wait in the event loop, in order."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = max(1, concurrency)
        self._limiter = anyio.CapacityLimiter(self.concurrency)

    async def sanitize_uploads(self, files: Sequence[tuple[str, UploadSource]], settings: Settings,
                               faces: bool = False) -> SanitizedBatch:
        """:func:`app.photos.sanitize.sanitize_uploads`, each photo in a decode slot's thread."""
        batch = SanitizedBatch()
        for filename, source in files:
            try:
                photo = await anyio.to_thread.run_sync(_sanitize_then_release, filename, source, settings,
                                                       faces, limiter=self._limiter)
            except PhotoRejected as refusal:
                batch.rejections.append(refusal)
            else:
                batch.photos.append(photo)
        batch.check_together(faces)
        return batch
