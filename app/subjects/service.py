"""Creating a studio: every check first, then the photos stored, the rows added and training enqueued.

Nothing is half-done. A request with any problem (a field, a file, the photo count) stores nothing
and answers every problem at once. Photos stored for a request whose transaction then rolls back
(a later error, a failed commit) are deleted again by a session hook.

Services flush, never commit: the request's session dependency owns the transaction.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from app import rate_limits
from app.accounts import usage
from app.config import Settings
from app.jobs import estimates
from app.jobs.service import format_duration
from app.models import SUBJECT_KINDS, GeneratedImage, Job, Photo, Subject, User, utcnow
from app.photos import SanitizedBatch, SanitizedPhoto, sanitize_uploads
from app.photos.decoding import DecodeSlots
from app.photos.sanitize import UploadSource
from app.storage import Storage
from app.storage.base import photo_key
from app.subjects import base_models, repository
from app.subjects.retention import expiry_for
from app.subjects.schemas import PERSON_NOUNS, QUALITY_PRESETS, CreateStudio, FileProblem, StudioProblems
from worker.engine.prompts import DEFAULT_PACK, STYLE_PACKS, normalize_free_prompt, subject_kind

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 100
MAX_ANIMAL_NOUN_LENGTH = 30
MAX_PROMPT_LENGTH = 200
ANIMAL_NOUN = re.compile(r"[a-z]+(?: [a-z]+)*")
FIXED_NOUNS = {"dog": "dog", "cat": "cat"}
ACTIVE_JOBS_RETRY_SECONDS = 60

_UNCOMMITTED_KEYS = "studio.uncommitted_photo_keys"
_HOOKED = "studio.photo_cleanup_hooked"


class StudioRejected(Exception):
    """The request has problems; nothing was stored. ``too_large`` marks a count over a limit (413)."""

    def __init__(self, problems: StudioProblems, too_large: bool = False) -> None:
        super().__init__(problems.summary())
        self.problems = problems
        self.too_large = too_large


class StudioLimitReached(Exception):
    """The owner may not start another studio now (answered with ``status_code``, 429 and
    ``Retry-After: retry_after`` unless a subclass says otherwise)."""

    status_code = 429

    def __init__(self, message: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class EmailNotVerified(StudioLimitReached):
    """The operator requires a confirmed address before training (``require_verified_email``); 403."""

    status_code = 403

    def __init__(self) -> None:
        super().__init__("Confirm your email address before you start a training: open the link we sent you, "
                         "or ask for a new one on your account page.", None)


class TooManyActiveJobs(StudioLimitReached):
    """The owner already has ``limit`` jobs queued or running."""

    def __init__(self, limit: int) -> None:
        studios = "a studio" if limit == 1 else f"{limit} studios"
        finished = "it has" if limit == 1 else "one of them has"
        super().__init__(f"You already have {studios} in training. Start a new one when {finished} finished.",
                         ACTIVE_JOBS_RETRY_SECONDS)
        self.limit = limit


class TooManyStudiosThisHour(StudioLimitReached):
    """The owner created ``limit`` studios in the last hour."""

    def __init__(self, limit: int, retry_after: int) -> None:
        studios = "a studio" if limit == 1 else f"{limit} studios"
        super().__init__(f"You have created {studios} in the last hour, the most this studio allows. "
                         f"You can start the next one in {format_duration(retry_after)}.", retry_after)
        self.limit = limit


class MonthlyQuotaReached(StudioLimitReached):
    """The owner used this month's quota (studios or GPU minutes) that an operator set on the account."""


def monthly_quota(session: Session, owner: User) -> MonthlyQuotaReached | None:
    """The monthly quota ``owner`` has used up (studios or GPU minutes), or None (app.accounts.usage)."""
    used = usage.quota_used(session, owner, studios=True)
    return None if used is None else MonthlyQuotaReached(used.message, used.retry_after)


def studios_per_hour(owner: User, settings: Settings) -> rate_limits.Counter:
    return (rate_limits.Limit("studios", settings.max_studios_per_hour, timedelta(hours=1)), str(owner.id))


def studio_limit(session: Session, owner: User, settings: Settings) -> StudioLimitReached | None:
    """The limit that keeps ``owner`` from starting a studio now, or None. The new-studio page says it
    before any photo is picked; :func:`create_studio` raises it."""
    # The monthly quota first: it says when the next studio is possible, where the others only say "later".
    quota = monthly_quota(session, owner)
    if quota is not None:
        return quota
    if settings.require_verified_email and owner.email_verified_at is None:
        return EmailNotVerified()
    if repository.count_active_jobs(session, owner.id) >= settings.max_active_jobs_per_user:
        return TooManyActiveJobs(settings.max_active_jobs_per_user)
    if settings.max_studios_per_hour > 0:
        wait = rate_limits.retry_after(session, [studios_per_hour(owner, settings)])
        if wait is not None:
            return TooManyStudiosThisHour(settings.max_studios_per_hour, wait)
    return None


@dataclass(frozen=True)
class ValidStudio:
    """A creation request's fields after every check: what the Subject row is made of."""

    name: str
    kind: str
    class_noun: str
    style_pack: str
    prompts: list[str]
    images_per_prompt: int
    quality: str
    base_model: base_models.Offer | None = None


def clean_text(value: str) -> str:
    """Whitespace collapsed, control characters removed (PostgreSQL refuses NUL in text; none is useful)."""
    printable = "".join(ch if ch.isprintable() else " " for ch in value)
    return " ".join(printable.split())


def too_many_photos_message(settings: Settings, sent: int | None = None) -> str:
    suffix = f" (you sent {sent})" if sent is not None else ""
    return f"Upload at most {settings.max_photos} photos{suffix}."


def _class_noun(form: CreateStudio, problems: StudioProblems) -> str:
    typed = clean_text(form.class_noun).lower()
    if form.kind in FIXED_NOUNS:
        return FIXED_NOUNS[form.kind]
    if form.kind == "animal":
        if not typed or len(typed) > MAX_ANIMAL_NOUN_LENGTH or not ANIMAL_NOUN.fullmatch(typed):
            problems.fields["class_noun"] = (
                f"Type what kind of animal it is, like “rabbit” or “guinea pig” "
                f"(letters and spaces, up to {MAX_ANIMAL_NOUN_LENGTH} characters)."
            )
        return typed
    if form.kind == "person":
        noun = typed or "person"
        if noun not in PERSON_NOUNS:
            problems.fields["class_noun"] = "Choose how to describe the person: man, woman or person."
        return noun
    return typed


def _style_pack(form: CreateStudio, problems: StudioProblems) -> str:
    if form.kind not in SUBJECT_KINDS:
        return form.style_pack
    engine_kind = subject_kind(form.kind)
    name = form.style_pack or DEFAULT_PACK[engine_kind]
    pack = STYLE_PACKS.get(name)
    if pack is None:
        problems.fields["style_pack"] = "Choose one of the style packs in the list."
    elif pack.kind != engine_kind:
        audience = "people" if pack.kind == "person" else "pets"
        problems.fields["style_pack"] = f"The style pack “{pack.title}” is made for {audience}; choose another one."
    return name


def _prompts(form: CreateStudio, settings: Settings, problems: StudioProblems) -> list[str]:
    if len(form.prompts) > settings.max_prompts:
        problems.fields["prompts"] = f"Add at most {settings.max_prompts} prompts (you added {len(form.prompts)})."
        return []
    templates: list[str] = []
    for index, raw_prompt in enumerate(form.prompts, start=1):
        prompt = clean_text(raw_prompt)
        if len(prompt) > MAX_PROMPT_LENGTH:
            problems.fields["prompts"] = f"Prompt {index} is longer than {MAX_PROMPT_LENGTH} characters; shorten it."
            return []
        try:
            template = normalize_free_prompt(prompt)
        except ValueError:
            continue  # only whitespace: nothing to keep
        if template not in templates:
            templates.append(template)
    return templates


# Each style pack's sample: a small SVG illustration drawn by hand for the form (app/static/packs),
# not a picture a studio made; the page says so under it.
PACK_SAMPLES_DIR = Path(__file__).resolve().parents[1] / "static" / "packs"


def pack_sample_url(pack_name: str) -> str | None:
    """The URL of ``pack_name``'s illustration, or None when there is none."""
    return f"/static/packs/{pack_name}.svg" if (PACK_SAMPLES_DIR / f"{pack_name}.svg").is_file() else None


class InvalidName(ValueError):
    """A studio name that cannot be used; the message is a sentence for the person."""


def rename_subject(session: Session, subject: Subject, raw_name: str) -> str:
    """Give the studio a new name (flushed); the pictures' captions and file names follow it.

    Raises InvalidName, and changes nothing, for an empty or too long name."""
    name = clean_text(raw_name)
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"Give the studio a name of 1 to {MAX_NAME_LENGTH} characters, like “Rex”.")
    subject.name = name
    session.flush()
    return name


def validate_fields(form: CreateStudio, settings: Settings, problems: StudioProblems) -> ValidStudio:
    """Check every field of ``form``, adding a sentence to ``problems.fields`` for each bad one."""
    name = clean_text(form.name)
    if not name or len(name) > MAX_NAME_LENGTH:
        problems.fields["name"] = f"Give the studio a name of 1 to {MAX_NAME_LENGTH} characters, like “Rex”."
    if form.kind not in SUBJECT_KINDS:
        problems.fields["kind"] = "Choose what the photos show: a dog, a cat, another animal or a person."
    class_noun = _class_noun(form, problems)
    style_pack = _style_pack(form, problems)
    prompts = _prompts(form, settings, problems)
    images_per_prompt = form.images_per_prompt
    if images_per_prompt is None or not 1 <= images_per_prompt <= settings.max_images_per_prompt:
        problems.fields["images_per_prompt"] = (
            f"Choose between 1 and {settings.max_images_per_prompt} pictures per prompt."
        )
    if form.quality not in QUALITY_PRESETS:
        problems.fields["quality"] = "Choose a quality: fast, balanced or best."
    base_model = base_models.choose(settings, form.base_model)
    if base_model is None:
        problems.fields["base_model"] = base_models.unknown_key_message(settings, form.base_model)
    if not form.consent:
        problems.fields["consent"] = (
            "Confirm that you are this person, or that this is your pet, or that you have their permission."
        )
    return ValidStudio(
        name=name,
        kind=form.kind,
        class_noun=class_noun,
        style_pack=style_pack,
        prompts=prompts,
        images_per_prompt=images_per_prompt or 0,
        quality=form.quality,
        base_model=base_model,
    )


def _forget_uncommitted(session: Session) -> None:
    session.info.pop(_UNCOMMITTED_KEYS, None)


def _delete_uncommitted(session: Session, previous_transaction: Any) -> None:
    if previous_transaction.nested:
        return  # a savepoint rolled back; the outer transaction (and its photos) lives on
    for storage, key in session.info.pop(_UNCOMMITTED_KEYS, []):
        try:
            storage.delete(key)
        except Exception:
            log.exception("could not delete photo %s of a rolled-back studio; retention will remove it", key)


def _track_until_commit(session: Session, storage: Storage, keys: Sequence[str]) -> None:
    """Delete ``keys`` from ``storage`` if the session's transaction rolls back instead of committing."""
    if not session.info.get(_HOOKED):
        session.info[_HOOKED] = True
        event.listen(session, "after_commit", _forget_uncommitted)
        event.listen(session, "after_soft_rollback", _delete_uncommitted)
    session.info.setdefault(_UNCOMMITTED_KEYS, []).extend((storage, key) for key in keys)


@dataclass(frozen=True)
class CheckedStudio:
    """A creation request that passed every check: its fields and its sanitized photos, in order."""

    valid: ValidStudio
    photos: list[SanitizedPhoto]


def _check_fields_and_count(
    form: CreateStudio, files: Sequence[tuple[str, UploadSource]], settings: Settings
) -> tuple[ValidStudio, StudioProblems]:
    problems = StudioProblems()
    valid = validate_fields(form, settings, problems)
    if len(files) > settings.max_photos:
        # Over the limit nothing is decoded: the refusal must not cost more than the request did.
        problems.fields["photos"] = too_many_photos_message(settings, len(files))
        raise StudioRejected(problems, too_large=True)
    if len(files) < settings.min_photos:
        problems.fields["photos"] = (
            f"Add at least {settings.min_photos} photos (you added {len(files)}); "
            f"{settings.min_photos} to {settings.max_photos} different shots work best."
        )
    return valid, problems


def checks_faces(valid: ValidStudio) -> bool:
    """Whether a studio's photos get the face checks (app.photos.faces): a person's do, pets' do not."""
    return valid.kind == "person"


def _checked(valid: ValidStudio, problems: StudioProblems, batch: SanitizedBatch) -> CheckedStudio:
    problems.files.extend(FileProblem(refusal.filename, refusal.reason) for refusal in batch.rejections)
    if batch.set_problem is not None:
        problems.fields.setdefault("photos", batch.set_problem)
    if problems:
        raise StudioRejected(problems)
    return CheckedStudio(valid=valid, photos=batch.photos)


def check_studio(form: CreateStudio, files: Sequence[tuple[str, UploadSource]], settings: Settings) -> CheckedStudio:
    """Every check of a creation request that needs no database: the fields, the photo count and each
    photo (decoded here, in the calling thread). Raises :class:`StudioRejected` listing every problem."""
    valid, problems = _check_fields_and_count(form, files, settings)
    return _checked(valid, problems, sanitize_uploads(files, settings, checks_faces(valid)))


async def check_studio_in_slots(
    form: CreateStudio, files: Sequence[tuple[str, UploadSource]], settings: Settings, slots: DecodeSlots
) -> CheckedStudio:
    """:func:`check_studio` for a web request: the photos are decoded in the process's decode slots,
    while the request holds no database session (see app.photos.decoding)."""
    valid, problems = _check_fields_and_count(form, files, settings)
    return _checked(valid, problems, await slots.sanitize_uploads(files, settings, checks_faces(valid)))


def raise_if_limited(session: Session, owner: User, settings: Settings) -> None:
    """Raise the :class:`StudioLimitReached` that keeps ``owner`` from starting a studio now, if any.

    Checked before the photos are decoded, so an owner at a limit costs no decoding."""
    limit = studio_limit(session, owner, settings)
    if limit is not None:
        raise limit


def create_studio(
    session: Session,
    storage: Storage,
    settings: Settings,
    owner: User,
    form: CreateStudio,
    files: Sequence[tuple[str, UploadSource]],
) -> tuple[Subject, Job]:
    """Create a studio from a filled-in form and its photos, and enqueue its training.

    Raises :class:`StudioLimitReached` when the owner is at the active-job limit or has created
    ``settings.max_studios_per_hour`` studios in the last hour, and
    :class:`StudioRejected` listing every problem (fields, photo count, each refused file) when
    anything is wrong; then nothing was stored. On success the Subject, its Photo rows and a queued
    training Job are flushed, the sanitized photos are in storage, and "training.run" is sent once
    the caller's transaction commits. The photos are decoded in the calling thread, inside
    ``session``; web requests use :func:`check_studio_in_slots` and :func:`store_studio` instead.
    """
    raise_if_limited(session, owner, settings)
    return store_studio(session, storage, settings, owner, check_studio(form, files, settings))


def store_studio(
    session: Session, storage: Storage, settings: Settings, owner: User, checked: CheckedStudio
) -> tuple[Subject, Job]:
    """Store a checked request: the photos in storage, the Subject, Photo and Job rows flushed, and
    "training.run" sent after commit. The owner's limits are checked again here, in the transaction
    that records the studio, since other requests may have started studios while this one decoded."""
    raise_if_limited(session, owner, settings)
    valid = checked.valid
    now = utcnow()
    subject = Subject(
        id=uuid.uuid4(),
        owner_id=owner.id,
        name=valid.name,
        kind=valid.kind,
        class_noun=valid.class_noun,
        style_pack=valid.style_pack,
        prompts=valid.prompts,
        images_per_prompt=valid.images_per_prompt,
        quality=valid.quality,
        base_model_choice=valid.base_model.record() if valid.base_model is not None else None,
        consent_at=now,
        expires_at=expiry_for(now, settings),
    )
    stored: list[str] = []
    try:
        photos: list[Photo] = []
        for position, sanitized in enumerate(checked.photos):
            photo_id = uuid.uuid4()
            key = photo_key(owner.id, subject.id, photo_id)
            storage.put_bytes(key, sanitized.jpeg_bytes, "image/jpeg")
            stored.append(key)
            photos.append(
                Photo(
                    id=photo_id,
                    subject_id=subject.id,
                    position=position,
                    storage_key=key,
                    original_name=sanitized.original_name,
                    width=sanitized.width,
                    height=sanitized.height,
                    byte_size=sanitized.byte_size,
                    perceptual_hash=sanitized.perceptual_hash,
                )
            )
        job = Job(
            subject_id=subject.id,
            owner_id=owner.id,
            kind="train",
            status="queued",
            stage="queued",
            max_attempts=settings.max_attempts,
            details=planned(session, settings, subject),
        )
        session.add(subject)
        session.flush()  # the subject first: photos and the job refer to it
        session.add_all([*photos, job])
        # Counted with the studio, in its transaction: a refused request counts for nothing.
        rate_limits.record(session, [studios_per_hour(owner, settings)])
        session.flush()

        from app.queue import enqueue  # P1's module; imported here to keep this module's import light

        enqueue(session, "training.run", job_id=str(job.id))
    except BaseException:
        for key in stored:
            try:
                storage.delete(key)
            except Exception:
                log.exception("could not delete photo %s of a failed studio; retention will remove it", key)
        raise
    _track_until_commit(session, storage, stored)
    return subject, job


def planned(session: Session, settings: Settings, subject: Subject) -> dict[str, Any]:
    """A new training job's details: its plan (the seconds each step should take), when a speed is known."""
    plan = estimates.plan_training(session, settings, subject)
    return {"plan": plan} if plan else {}


RETRYABLE_STATUSES = ("failed", "cancelled")


class RetryRefused(Exception):
    """The studio cannot be tried again (answered with 409); the message says why and what to do instead."""


def retry_refusal(session: Session, subject: Subject) -> RetryRefused | None:
    """Why ``subject`` cannot be tried again now, or None when it can: its training failed or was cancelled,
    it has no trained model, and its photos are still kept."""
    latest = repository.latest_jobs(session, [subject.id]).get(subject.id)
    if latest is None or latest.kind != "train" or latest.status not in RETRYABLE_STATUSES:
        return RetryRefused("Only a studio whose training failed or was cancelled can be tried again.")
    if subject.weights_key is not None:
        return RetryRefused("This studio is already trained: make more pictures from its gallery instead.")
    if subject.photos_deleted_at is not None or repository.count_photos(session, subject.id) == 0:
        return RetryRefused("This studio's photos are no longer kept, so it cannot be tried again. "
                            "Create a new studio with your photos.")
    return None


def retry_studio(session: Session, settings: Settings, owner: User, subject: Subject) -> Job:
    """Start a new training job of ``subject`` from the photos it kept ("Try again" on a failed studio).

    Raises :class:`RetryRefused` when the studio cannot be tried again, :class:`MonthlyQuotaReached`
    when the owner used this month's GPU minutes, and :class:`TooManyActiveJobs` at the active-job limit.
    A retry is not a new studio: the hourly studio limit and the monthly studio quota do not count it.
    The job is flushed and "training.run" is sent once the caller commits.
    """
    refusal = retry_refusal(session, subject)
    if refusal is not None:
        raise refusal
    used = usage.quota_used(session, owner, studios=False)  # a retry trains again: GPU minutes count
    if used is not None:
        raise MonthlyQuotaReached(used.message, used.retry_after)
    if settings.require_verified_email and owner.email_verified_at is None:
        raise EmailNotVerified()
    if repository.count_active_jobs(session, owner.id) >= settings.max_active_jobs_per_user:
        raise TooManyActiveJobs(settings.max_active_jobs_per_user)
    job = Job(subject_id=subject.id, owner_id=owner.id, kind="train", status="queued", stage="queued",
              max_attempts=settings.max_attempts, details=planned(session, settings, subject))
    session.add(job)
    session.flush()

    from app.queue import enqueue

    enqueue(session, "training.run", job_id=str(job.id))
    log.info("subject %s: training tried again as job %s", subject.id, job.id)
    return job


@dataclass(frozen=True)
class StudioCard:
    """One studio as the lists show it: its status (its newest job's), first photo and newest job."""

    subject: Subject
    status: str
    thumbnail: Photo | None
    latest_job: Job | None
    # The cover once the photos are gone (removed after training): the studio's best picture.
    cover_image: GeneratedImage | None = None


def subject_status(subject: Subject, latest_job: Job | None) -> str:
    """queued, running, done, failed or cancelled (the newest job's); "new" before any job exists."""
    return latest_job.status if latest_job is not None else "new"


def studio_cards(session: Session, owner: User) -> list[StudioCard]:
    """The owner's studios, newest first, each with its status and thumbnail."""
    subjects = repository.list_for_owner(session, owner.id)
    ids = [subject.id for subject in subjects]
    jobs = repository.latest_jobs(session, ids)
    thumbnails = repository.first_photos(session, ids)
    without_photos = [subject.id for subject in subjects
                      if subject.photos_deleted_at is not None or subject.id not in thumbnails]
    covers = repository.best_images(session, without_photos)
    return [
        StudioCard(
            subject=subject,
            status=subject_status(subject, jobs.get(subject.id)),
            thumbnail=None if subject.photos_deleted_at else thumbnails.get(subject.id),
            latest_job=jobs.get(subject.id),
            cover_image=covers.get(subject.id),
        )
        for subject in subjects
    ]
