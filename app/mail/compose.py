"""Rendering a message from its two templates, ``templates/mail/<kind>.txt`` and ``<kind>.html``.

The HTML part is deliberately plain: no images, no remote resources, no tracking pixels or
rewritten links, so reading a message tells the studio nothing. Every link in a message is the
studio's own ``base_url``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

MAIL_TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates" / "mail"

# The subject of each kind of message; the templates hold the bodies.
SUBJECTS: dict[str, str] = {
    "verify_email": "Confirm your email address",
    "password_reset": "Reset your password",
    "password_changed": "Your password was reset",
    "studio_ready": "Your studio “{name}” is ready",
    "studio_failed": "Your studio “{name}” could not be finished",
    "account_deleted": "Your account is deleted",
    "export_ready": "Your data export is ready",
}


@dataclass(frozen=True)
class Composed:
    subject: str
    text: str
    html: str


@lru_cache(maxsize=1)
def _environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(str(MAIL_TEMPLATES_DIR)),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False, default=False),
        undefined=StrictUndefined,  # a missing value is a bug, never an empty link in someone's inbox
        keep_trailing_newline=True,
    )


def compose(kind: str, **context: Any) -> Composed:
    """Render the message ``kind`` (a key of :data:`SUBJECTS`) with ``context``; KeyError for an unknown kind."""
    subject = SUBJECTS[kind].format(**{key: value for key, value in context.items() if isinstance(value, str)})
    env = _environment()
    text = env.get_template(f"{kind}.txt").render(**context)
    html = env.get_template(f"{kind}.html").render(subject=subject, **context)
    return Composed(subject=" ".join(subject.split())[:300], text=text, html=html)
