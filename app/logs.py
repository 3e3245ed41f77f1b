"""Structured logs: one JSON object per line, for a log stack to index (``STUDIO_LOG_JSON=true``).

Every line carries the time, level, logger and message, and the ids it is about: ``job_id``,
``account_id`` and ``subject_id`` when the call passed them (``log.info(..., extra={"job_id": ...})``),
otherwise read from the message when it names "job <uuid>" (as the worker's lines do). Lines never
carry an email: any address in a message is replaced by ``[email]``. Nothing logs photo bytes; a
message is cut at :data:`MAX_MESSAGE` characters all the same.

The web calls :func:`configure_logging` when it builds the app; a worker applies :class:`JsonFormatter`
to the handlers Celery sets up (worker.celery_app).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from app.config import Settings

ID_FIELDS = ("job_id", "account_id", "subject_id")
MAX_MESSAGE = 2000
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
NAMED_IDS = {
    "job_id": re.compile(rf"\bjob ({UUID})"),
    "subject_id": re.compile(rf"\b(?:subject|studio) ({UUID})"),
    "account_id": re.compile(rf"\baccount ({UUID})"),
}
# Loggers that keep handlers of their own (uvicorn's): they get the JSON handler instead.
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def scrub(text: str) -> str:
    """``text`` without email addresses, cut to :data:`MAX_MESSAGE` characters."""
    cleaned = EMAIL.sub("[email]", text)
    return cleaned if len(cleaned) <= MAX_MESSAGE else cleaned[:MAX_MESSAGE] + "…"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(message),
        }
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value is None:
                found = NAMED_IDS[name].search(message)
                value = found.group(1) if found else None
            if value is not None:
                line[name] = str(value)
        if record.exc_info:
            line["error"] = scrub(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


def json_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    return handler


def configure_logging(settings: Settings) -> None:
    """With ``settings.log_json``: the root logger and uvicorn's write JSON lines to stderr (INFO and up)."""
    if not settings.log_json:
        return
    root = logging.getLogger()
    root.handlers = [json_handler()]
    root.setLevel(logging.INFO)
    for name in SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        server_logger.handlers = []
        server_logger.propagate = True


def format_as_json(logger: logging.Logger) -> None:
    """Switch every handler of ``logger`` to JSON lines (for the handlers Celery sets up)."""
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
