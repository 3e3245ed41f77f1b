"""Rules of the gallery: grouping by prompt, download names, favourites, "generate more" and the ZIP export.

Services flush, never commit: the request's session dependency owns the transaction.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy.orm import Session

from app.accounts import usage
from app.config import Settings
from app.jobs import estimates
from app.jobs import repository as job_repository
from app.models import GeneratedImage, GenerationRequest, Job, Subject, User, utcnow
from app.storage import ObjectNotFound, Storage
from app.subjects.base_models import model_facts
from worker.engine.faces import MatchWords, match_words
from worker.engine.prompts import SUBJECT_PLACEHOLDER, Shape, normalize_free_prompt, split_shape, with_shape

MAX_PROMPT_CHARS = 300
# What a 429 tells a client with too many active jobs: jobs take minutes, so asking again in one is soon enough.
RETRY_AFTER_SECONDS = 60
SLUG_MAX_CHARS = 60
# Leading words every prompt shares; dropped from file names so "a photo of {subject} on the beach"
# names its files "rex-on-the-beach-1.png".
_BOILERPLATE = re.compile(r"^(a|an)\s+(photo|picture|image)\s+of\s+", re.IGNORECASE)


class GalleryError(Exception):
    """A request the gallery refuses; the message is a sentence for the person."""


class InvalidGenerationRequest(GalleryError):
    """The prompts or the image count are not acceptable (422)."""


class GenerationNotPossible(GalleryError):
    """The studio cannot generate now: not trained yet, or a job is running (409)."""


class TooManyActiveJobs(GalleryError):
    """The account already has its maximum of queued and running jobs (429)."""

    retry_after = RETRY_AFTER_SECONDS


class MonthlyQuotaReached(TooManyActiveJobs):
    """The account used this month's GPU minutes, a quota an operator set (429 until the month ends)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- names ----------------------------------------------------------------------------------------


def slugify(text: str, fallback: str = "image") -> str:
    """Lowercase ASCII words joined by dashes, at most 60 characters: safe in any file system or header."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > SLUG_MAX_CHARS:
        slug = slug[:SLUG_MAX_CHARS].rsplit("-", 1)[0] or slug[:SLUG_MAX_CHARS]
    return slug or fallback


def readable_prompt(template: str, subject_name: str) -> str:
    """The prompt template with ``{subject}`` replaced by the subject's name: "a photo of Rex on the beach"
    (a shape marker such as "(portrait)" left out: the picture shows its shape)."""
    return split_shape(template)[0].replace(SUBJECT_PLACEHOLDER, subject_name)


def prompt_parts(template: str) -> list[str]:
    """The template split around ``{subject}``, so a page can show the subject as a highlighted chip."""
    return split_shape(template)[0].split(SUBJECT_PLACEHOLDER)


def prompt_slug(template: str, subject_name: str) -> str:
    """"a photo of {subject} on the beach" with name "Rex" → "rex-on-the-beach"."""
    return slugify(_BOILERPLATE.sub("", readable_prompt(template, subject_name).strip()))


def download_filename(subject: Subject, image: GeneratedImage, position: int | None = None) -> str:
    """The file name of a single download: "rex-on-the-beach-3.png", or without a position
    "rex-on-the-beach.png" (for inline views, which then need no extra query)."""
    slug = prompt_slug(image.prompt_template, subject.name)
    return f"{slug}-{position}.png" if position is not None else f"{slug}.png"


# --- the gallery ----------------------------------------------------------------------------------


@dataclass
class PromptGroup:
    """The images of one prompt, in the order the gallery shows them."""

    template: str
    readable: str
    parts: list[str]
    slug: str
    images: list[GeneratedImage] = field(default_factory=list)


def positions_by_image(images: Iterable[GeneratedImage]) -> dict[Any, int]:
    """Each image's 1-based position among the images of its prompt, oldest first (stable names)."""
    counters: dict[str, int] = {}
    positions: dict[Any, int] = {}
    for image in sorted(images, key=lambda item: (item.created_at, item.seed, str(item.id))):
        counters[image.prompt_template] = counters.get(image.prompt_template, 0) + 1
        positions[image.id] = counters[image.prompt_template]
    return positions


def group_by_prompt(subject: Subject, images: list[GeneratedImage]) -> list[PromptGroup]:
    """Images grouped by prompt template. Groups come in the order their first image was made;
    inside a group the images keep the order they were given in (by likeness or by time)."""
    first_made: dict[str, tuple[datetime, int]] = {}
    for image in images:
        key = (image.created_at, image.seed)
        if image.prompt_template not in first_made or key < first_made[image.prompt_template]:
            first_made[image.prompt_template] = key
    groups: dict[str, PromptGroup] = {}
    for image in images:
        group = groups.get(image.prompt_template)
        if group is None:
            template = image.prompt_template
            group = PromptGroup(
                template=template,
                readable=readable_prompt(template, subject.name),
                parts=prompt_parts(template),
                slug=prompt_slug(template, subject.name),
            )
            groups[template] = group
        group.images.append(image)
    return sorted(groups.values(), key=lambda group: first_made[group.template])


SHAPE_CHOICES: dict[Shape, str] = {
    "square": "Square", "portrait": "Portrait (taller)", "landscape": "Landscape (wider)",
}


def shape_of(image: GeneratedImage) -> str:
    """The picture's shape in a customer's words: square, portrait (taller) or landscape (wider)."""
    if image.height > image.width:
        return "Portrait"
    return "Landscape" if image.width > image.height else "Square"


def has_scores(images: Iterable[GeneratedImage]) -> bool:
    """Whether "best likeness first" means anything: some image was ranked, or had its face checked."""
    return any(image.rank is not None or image.face_checked for image in images)


def face_match(image: GeneratedImage) -> MatchWords | None:
    """A person's picture's face match in words ("strong match", "weak match", "not a match", "no face
    found"); None when its face was never checked (a pet, or a picture made before faces were)."""
    return match_words(image.face_distance) if image.face_checked else None


# --- the order pictures are shown in --------------------------------------------------------------
# One place decides it, for the gallery page, its lightbox (which walks the page's order) and the
# one-picture page's previous/next, so the three never disagree.

GalleryOrder = Literal["likeness", "created"]
BEST_LIKENESS_TITLE = "Best likeness first"


def made_key(image: GeneratedImage) -> tuple[Any, ...]:
    """Oldest first; ties broken by seed, then id, so the order is stable."""
    return (image.created_at, image.seed, str(image.id))


def likeness_key(image: GeneratedImage) -> tuple[Any, ...]:
    """Best likeness first, unscored last. The one place a likeness score is read for ordering: a
    person's pictures by their face's distance to the photos (no face found: last), then the rank."""
    return (image.face_distance is None, image.face_distance or 0.0,
            image.rank is None, image.rank if image.rank is not None else 0, *made_key(image))


def default_order(all_images: Iterable[GeneratedImage]) -> GalleryOrder:
    """By likeness once the pictures were scored, else in the order they were made."""
    return "likeness" if has_scores(all_images) else "created"


def arrange(subject: Subject, images: Iterable[GeneratedImage], order: GalleryOrder) -> list[PromptGroup]:
    """The gallery's sections. ``created``: one section per prompt, in the order each was first made.
    ``likeness``: one section with every picture ranked, so the best is first wherever its prompt is."""
    if order == "likeness":
        return [PromptGroup(template="", readable=BEST_LIKENESS_TITLE, parts=[], slug="",
                            images=sorted(images, key=likeness_key))]
    return group_by_prompt(subject, sorted(images, key=made_key))


def viewing_order(groups: Iterable[PromptGroup]) -> list[GeneratedImage]:
    """The pictures one after another as the page shows them (the lightbox's and the image page's order)."""
    return [image for group in groups for image in group.images]


def set_favourite(session: Session, image: GeneratedImage, favourite: bool) -> None:
    image.favourite = favourite
    session.flush()


def delete_image(session: Session, storage: Storage, image: GeneratedImage) -> None:
    """Delete one picture for good: its row (flushed) and its file, now.

    As a studio's deletion does, the file goes inside the request's transaction; a ZIP being written
    at that moment lists it under ``missing``. The other pictures keep their ranks and names."""
    from app.galleries.sharing import delete_links_of_image  # sharing imports this module's neighbours

    key = image.storage_key
    delete_links_of_image(session, image.id)
    session.delete(image)
    session.flush()
    storage.delete(key)  # a file already gone is no error: it is what was asked for


# --- generate more --------------------------------------------------------------------------------

# "More like this" asks for this many new pictures of one picture's prompt (new seeds).
MORE_LIKE_THIS_COUNT = 4


def request_more_like(session: Session, settings: Settings, subject: Subject, image: GeneratedImage) -> Job:
    """"More like this": a "generate more" job for the picture's prompt, with new seeds (the worker
    draws them), so the new pictures join that prompt's group. Raises as :func:`request_generation`."""
    count = min(MORE_LIKE_THIS_COUNT, settings.max_images_per_prompt)
    return request_generation(session, settings, subject, [image.prompt_template], count)


def clean_prompts(raw_prompts: Iterable[str], settings: Settings, shape: Shape | None = None) -> list[str]:
    """The prompts as templates with ``{subject}``: blank lines dropped, duplicates removed, limits checked.
    ``shape`` marks each prompt that does not name its own ("... (landscape)") with that shape."""
    prompts: list[str] = []
    for raw in raw_prompts:
        if not raw or not raw.strip():
            continue
        template = normalize_free_prompt(raw)
        if shape is not None and split_shape(template)[1] == "square" and not template.lower().endswith("(square)"):
            template = with_shape(template, shape)
        if len(template) > MAX_PROMPT_CHARS:
            raise InvalidGenerationRequest(
                f"The prompt {raw.strip()[:40]!r}... is too long: at most {MAX_PROMPT_CHARS} characters."
            )
        if template not in prompts:
            prompts.append(template)
    if not prompts:
        raise InvalidGenerationRequest("Write at least one prompt, for example: a photo of {subject} in the snow.")
    if len(prompts) > settings.max_prompts:
        raise InvalidGenerationRequest(f"At most {settings.max_prompts} prompts at a time; {len(prompts)} given.")
    return prompts


def trained_on_demo_model(subject: Subject) -> bool:
    """Whether the studio's trained model is the built-in demo model (what its training recorded)."""
    return bool((subject.model_info or {}).get("demo_model")) or subject.base_model == "tiny"


def request_generation(
    session: Session,
    settings: Settings,
    subject: Subject,
    raw_prompts: Iterable[str],
    images_per_prompt: int,
    shape: Shape | None = None,
) -> Job:
    """Queue a "generate more" job on a trained subject: a GenerationRequest, a Job, and the task.

    The task "generation.run" is sent only after the transaction commits (app.queue). Raises
    InvalidGenerationRequest, GenerationNotPossible or TooManyActiveJobs with a sentence to show.
    """
    from app.queue import enqueue  # imported here: app.queue pulls in the Celery producer lazily

    if subject.weights_key is None:
        raise GenerationNotPossible("This studio has no trained model yet: wait for training to finish.")
    if job_repository.active_job_of_subject(session, subject.id) is not None:
        raise GenerationNotPossible("This studio already has a job in progress: wait for it to finish.")
    if not 1 <= images_per_prompt <= settings.max_images_per_prompt:
        raise InvalidGenerationRequest(
            f"Images per prompt must be between 1 and {settings.max_images_per_prompt}; {images_per_prompt} given."
        )
    prompts = clean_prompts(raw_prompts, settings, shape)
    owner = session.get(User, subject.owner_id)
    used = usage.quota_used(session, owner, studios=False) if owner is not None else None
    if used is not None:
        raise MonthlyQuotaReached(used.message, used.retry_after)
    if job_repository.count_active_jobs_of_owner(session, subject.owner_id) >= settings.max_active_jobs_per_user:
        raise TooManyActiveJobs(
            f"You already have {settings.max_active_jobs_per_user} jobs in progress: wait for one to finish."
        )
    job = Job(
        subject_id=subject.id,
        owner_id=subject.owner_id,
        kind="generate",
        status="queued",
        stage="queued",
        max_attempts=settings.max_attempts,
        details={"images_done": 0, "images_total": len(prompts) * images_per_prompt,
                 **planned_generation(session, settings, subject, len(prompts) * images_per_prompt),
                 # Known now, from the trained model: the job says so before a worker loads it.
                 "demo_model": trained_on_demo_model(subject)},
    )
    session.add(job)
    session.flush()
    session.add(
        GenerationRequest(subject_id=subject.id, job_id=job.id, prompts=prompts, images_per_prompt=images_per_prompt)
    )
    session.flush()
    enqueue(session, "generation.run", job_id=str(job.id))
    return job


def planned_generation(session: Session, settings: Settings, subject: Subject, images: int) -> dict[str, Any]:
    """A "generate more" job's plan (its seconds), when a speed is known for the studio's model."""
    plan = estimates.plan_generation(session, settings, subject, images)
    return {"plan": plan} if plan else {}


# --- the ZIP export -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZipEntry:
    """One image of the archive: where it comes from and what it is called inside."""

    storage_key: str
    name: str
    manifest: dict[str, Any]


def zip_entries(subject: Subject, images: list[GeneratedImage]) -> list[ZipEntry]:
    """Plain data for :func:`iter_zip`, built before the response streams (the DB session is gone by then).

    Entries are "<prompt-slug>/<n>.png" with n counted per prompt, oldest first. The prompt made first
    keeps the plain folder name; a later prompt with the same slug gets "-2", "-3".
    """
    used: set[str] = set()
    positions = positions_by_image(images)
    chronological = sorted(images, key=lambda item: (item.created_at, item.seed, str(item.id)))
    entries: list[ZipEntry] = []
    for group in group_by_prompt(subject, chronological):
        folder, suffix = group.slug, 2
        while folder in used:
            folder, suffix = f"{group.slug}-{suffix}", suffix + 1
        used.add(folder)
        entries.extend(_zip_entry(image, f"{folder}/{positions[image.id]}.png") for image in group.images)
    return entries


def _zip_entry(image: GeneratedImage, name: str) -> ZipEntry:
    return ZipEntry(
        storage_key=image.storage_key,
        name=name,
        manifest={
            "file": name,
            "prompt": image.prompt,
            "prompt_template": image.prompt_template,
            "seed": image.seed,
            "steps": image.steps,
            "guidance": image.guidance,
            "width": image.width,
            "height": image.height,
            "scores": {"dino": image.dino, "clip_i": image.clip_i, "clip_t": image.clip_t,
                       "face_distance": image.face_distance},
            "face_match": face_match(image),
            "rank": image.rank,
            "favourite": image.favourite,
            "created_at": image.created_at.isoformat(),
        },
    )


class _ChunkSink(io.RawIOBase):
    """A write-only, unseekable file that hands what was written to the generator, chunk by chunk.

    zipfile sees that it cannot seek and writes each entry's sizes and CRC in a data descriptor
    after the data, so nothing has to be buffered to patch a header afterwards.
    """

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []
        self._offset = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._offset += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._offset

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def open_chunks(storage: Storage, key: str) -> Iterator[bytes]:
    """The object's chunks; raises ObjectNotFound *now*, not after a response has started streaming."""
    chunks = storage.iter_chunks(key)
    try:
        first = next(chunks)
    except StopIteration:
        return iter(())

    def rest() -> Iterator[bytes]:
        yield first
        yield from chunks

    return rest()


def iter_zip(
    storage: Storage, entries: list[ZipEntry], about: dict[str, Any], listing: str = "images"
) -> Iterator[bytes]:
    """A ZIP archive of ``entries`` plus a manifest.json, produced piece by piece.

    Memory stays flat however large the archive: each file is read with ``storage.iter_chunks`` and
    every chunk leaves as soon as zipfile has framed it. Files are stored (PNGs and weights do not
    compress); ZIP64 records are written when the archive passes 4 GiB or 65,535 entries. ``about``
    goes into the manifest next to the entries' manifests, listed under ``listing``.
    """
    import zipfile

    sink = _ChunkSink()
    included: list[dict[str, Any]] = []
    missing: list[str] = []
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for entry in entries:
            try:
                chunks = open_chunks(storage, entry.storage_key)
            except ObjectNotFound:
                # Deleted while the archive was being written: leave it out and say so in the manifest.
                missing.append(entry.name)
                continue
            info = zipfile.ZipInfo(entry.name, date_time=utcnow().timetuple()[:6])
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with archive.open(info, mode="w") as target:
                for chunk in chunks:
                    target.write(chunk)
                    if data := sink.drain():
                        yield data
            if data := sink.drain():
                yield data
            included.append(entry.manifest)
        manifest = {**about, listing: included, "missing": missing}
        archive.writestr("manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
    yield sink.drain()


def zip_filename(subject: Subject) -> str:
    return f"{slugify(subject.name, fallback='studio')}-gallery.zip"


def zip_about(subject: Subject) -> dict[str, Any]:
    """The manifest's header: which studio, when."""
    return {
        "studio": subject.name,
        "kind": subject.kind,
        "class_noun": subject.class_noun,
        "identifier": subject.identifier,
        "base_model": subject.base_model,
        "base_model_info": facts.as_json() if (facts := model_facts(subject)) is not None else None,
        "exported_at": utcnow().isoformat(),
    }
