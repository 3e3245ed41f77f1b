"""The mail.send task: the embedded default writes .eml files, an unreachable server keeps the message
for a retry with back-off, and a delivered message leaves no row."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from email import message_from_bytes, policy

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import queue
from app.config import Settings
from app.mail import queue_email
from app.mail.transport import DeliveryError
from app.models import OutgoingEmail
from tests.mailbox import REFUSED_DOMAIN, Mailbox
from tests.servers import free_port
from worker import settings as worker_settings_module
from worker.tasks.mail import retry_delay, send_email_task


@pytest.fixture
def queued(db_session: Session, settings: Settings) -> Iterator[list[str]]:
    """One message in the outbox (committed); yields the ids of the mail.send tasks sent after the commit."""
    ids: list[str] = []
    queue.set_sender(lambda name, kwargs, queue_name: ids.append(kwargs["email_id"]))
    queue_email(db_session, "ann@example.com", "password_changed", base_url=settings.base_url)
    db_session.commit()
    worker_settings_module.get_worker_settings.cache_clear()
    yield ids
    queue.set_sender(None)
    worker_settings_module.get_worker_settings.cache_clear()


def outbox_rows(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(OutgoingEmail)) or 0)


def test_without_a_server_each_message_is_an_eml_file_under_var_mail(
        queued: list[str], settings: Settings, db_session: Session, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.mail.transport")
    assert settings.smtp_host == "" and len(queued) == 1
    assert send_email_task(queued[0]) == "sent"
    [eml] = list(settings.mail_dir.glob("*.eml"))
    assert settings.mail_dir == (settings.var_dir / "mail").resolve()
    message = message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert message["To"] == "ann@example.com" and message["Subject"] == "Your password was reset"
    assert message.get_body(preferencelist=("plain",)) and message.get_body(preferencelist=("html",))
    assert any(str(eml) in record.getMessage() for record in caplog.records)
    assert outbox_rows(db_session) == 0
    assert send_email_task(queued[0]) == "gone"  # a second delivery of the task sends nothing twice


def test_an_unreachable_server_keeps_the_message_for_a_retry(queued: list[str], settings: Settings,
                                                            db_session: Session) -> None:
    settings.smtp_host, settings.smtp_port, settings.smtp_tls = "127.0.0.1", free_port(), "none"
    worker_settings_module.get_worker_settings.cache_clear()
    with pytest.raises(DeliveryError, match="could not reach"):
        send_email_task(queued[0])  # called directly, Celery's retry re-raises; a worker schedules it instead
    assert outbox_rows(db_session) == 1
    assert [retry_delay(n) for n in range(9)] == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]


def test_a_message_the_server_refuses_for_good_is_dropped(db_session: Session, settings: Settings,
                                                          mailbox: Mailbox) -> None:
    from app.mail.outbox import queue_email as queue

    queue(db_session, f"nobody@{REFUSED_DOMAIN}", "password_changed", base_url=settings.base_url)
    queue(db_session, "ann@example.com", "password_changed", base_url=settings.base_url)
    db_session.commit()
    worker_settings_module.get_worker_settings.cache_clear()
    outcomes = [send_email_task(**kwargs) for name, kwargs in mailbox.sent if name == "mail.send"]
    assert outcomes == ["dropped", "sent"]  # a 550 is not retried: the row, with its address, goes
    assert [message["To"] for message in mailbox.messages] == ["ann@example.com"]
    assert outbox_rows(db_session) == 0
