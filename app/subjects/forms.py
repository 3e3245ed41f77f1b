"""Reading a "new studio" upload: the multipart body parsed with explicit limits, then split into the
text fields (:class:`CreateStudio`) and the photo files.

Used as a route dependency *before* ``require_csrf``: Starlette caches the parsed form on the
request, so the CSRF check reads this parse (with these limits) instead of parsing again with the
general limits of ``app.deps.read_form``, which would refuse a 21-file upload before the studio's
own, clearer answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import Settings
from app.deps import MAX_FORM_FIELD_BYTES
from app.photos.decoding import DecodeSlots
from app.photos.sanitize import UploadSource
from app.subjects.schemas import CreateStudio
from app.subjects.service import too_many_photos_message

# name, kind, class_noun, style_pack, images_per_prompt, quality, consent, csrf_token, and prompts
# (one field per prompt is allowed, up to the prompt limit): 60 leaves room without inviting abuse.
MAX_STUDIO_FIELDS = 60
PHOTO_FIELD = "photos"


@dataclass
class StudioUpload:
    """A parsed creation request: the filled-in form, the photos (name, spooled file), and the raw
    text values to fill the form in again when it is shown with errors.

    The photos stay in the parser's spooled temporary files (on disk past 1 MB) and are read one at
    a time by the sanitizer, so the request never holds all of them in memory."""

    form: CreateStudio
    files: list[tuple[str, UploadSource]]
    values: dict[str, list[str]] = field(default_factory=dict)


def _limit_error(message: str, settings: Settings) -> HTTPException:
    """Starlette's parser message → an answer a person understands (413 over a limit, else 400)."""
    if message.startswith("Too many files"):
        return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, too_many_photos_message(settings))
    if message.startswith("Too many fields"):
        return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "The form has too many fields.")
    if message.startswith(("Field exceeded", "Part exceeded")):
        return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "A text field of the form is too long.")
    return HTTPException(status.HTTP_400_BAD_REQUEST, "The upload could not be read; please send it again.")


async def read_studio_upload(request: Request) -> StudioUpload:
    """Parse the request's multipart body with the studio's limits (a dependency; cached per request).

    At most ``settings.max_photos + 1`` files are parsed: one more than allowed, so 21 photos get the
    service's full answer ("at most 20 photos (you sent 21)"); more are cut off while parsing (413).
    Text fields are limited to 64 KiB each. Starlette applies no per-part limit to files, so a file
    over ``settings.max_photo_bytes`` is refused by the sanitizer, which names it.
    """
    settings: Settings = request.app.state.settings
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "Send the studio as multipart/form-data with the photos as files."
        )
    try:
        form = await request.form(
            max_files=settings.max_photos + 1, max_fields=MAX_STUDIO_FIELDS, max_part_size=MAX_FORM_FIELD_BYTES
        )
    except StarletteHTTPException as error:
        # Starlette turns its MultiPartException into a 400 whose detail is the parser's message.
        raise _limit_error(str(error.detail), settings) from None

    values: dict[str, list[str]] = {}
    files: list[tuple[str, UploadSource]] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != PHOTO_FIELD:
                continue
            if not value.filename and not value.size:
                continue  # an empty file input sends one nameless, empty part
            files.append((value.filename or "unnamed file", value.file))
        else:
            values.setdefault(name, []).append(value)
    return StudioUpload(form=CreateStudio.from_form(values), files=files, values=values)


UploadDep = Annotated[StudioUpload, Depends(read_studio_upload)]


def decode_slots(request: Request) -> DecodeSlots:
    """The process's decode slots (app.photos.decoding), made on first use from the app's settings."""
    slots: DecodeSlots | None = getattr(request.app.state, "decode_slots", None)
    if slots is None:
        settings: Settings = request.app.state.settings
        slots = request.app.state.decode_slots = DecodeSlots(settings.upload_decode_concurrency)
    return slots
