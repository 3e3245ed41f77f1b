"""Structured logs: one JSON object per line, with the ids a line is about and never an email."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from app.config import Settings
from app.logs import SERVER_LOGGERS, JsonFormatter, configure_logging


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("worker.tasks.training", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_a_line_is_json_with_its_ids_and_no_email() -> None:
    job, account = uuid.uuid4(), uuid.uuid4()
    line = json.loads(JsonFormatter().format(record("job %s claimed for %s", job, "ann@example.com",
                                                    account_id=str(account))))
    assert line["job_id"] == str(job) and line["account_id"] == str(account)
    assert line["message"] == f"job {job} claimed for [email]"
    assert (line["level"], line["logger"]) == ("info", "worker.tasks.training")
    assert "subject_id" not in line


def test_on_by_a_setting(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    for name in SERVER_LOGGERS:  # configure_logging changes these too: restored after the test
        server_logger = logging.getLogger(name)
        monkeypatch.setattr(server_logger, "handlers", list(server_logger.handlers))
        monkeypatch.setattr(server_logger, "propagate", server_logger.propagate)
    configure_logging(settings)  # off by default: nothing changes
    assert not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    configure_logging(settings.model_copy(update={"log_json": True}))
    assert [type(h.formatter) for h in root.handlers] == [JsonFormatter]
