"""Delivering one message: to the SMTP server the settings name, or into ``var/mail`` as an ``.eml`` file.

Errors a retry may cure (the server is down, refuses for now, times out) are raised as
:class:`DeliveryError` for the task to retry with back-off; a message the server refuses for good
(a 5xx for the recipient or the sender) raises :class:`Undeliverable`.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import uuid
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from app.config import Settings
from app.mail.compose import Composed

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """Sending failed in a way a later try may cure."""


class Undeliverable(Exception):
    """The server refused the message for good (a 5xx answer)."""


def build_message(settings: Settings, to_address: str, composed: Composed) -> EmailMessage:
    """A multipart/alternative message: the plain text first, the HTML second."""
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = to_address
    message["Subject"] = composed.subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=_sender_domain(settings.mail_from))
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to the studio
    message.set_content(composed.text)
    message.add_alternative(composed.html, subtype="html")
    return message


def _sender_domain(mail_from: str) -> str:
    address = mail_from.rsplit("<", 1)[-1].rstrip(">").strip()
    return address.rsplit("@", 1)[-1] if "@" in address else "localhost"


def deliver(settings: Settings, message: EmailMessage) -> None:
    """Send ``message`` by SMTP, or write it under ``settings.mail_dir`` when no server is set."""
    if not settings.smtp_host:
        _write_eml(settings, message)
        return
    try:
        _send_smtp(settings, message)
    except smtplib.SMTPRecipientsRefused as error:
        codes = [code for code, _ in error.recipients.values()]
        if all(code >= 500 for code in codes):
            raise Undeliverable(f"the server refused the recipient ({codes})") from error
        raise DeliveryError(f"the server refused the recipient for now ({codes})") from error
    except smtplib.SMTPResponseException as error:
        if error.smtp_code >= 500 and not isinstance(error, smtplib.SMTPAuthenticationError):
            raise Undeliverable(f"the server refused the message ({error.smtp_code})") from error
        raise DeliveryError(f"the server answered {error.smtp_code}") from error
    except (smtplib.SMTPException, OSError) as error:
        raise DeliveryError(f"could not reach {settings.smtp_host}:{settings.smtp_port}: {error}") from error


def _send_smtp(settings: Settings, message: EmailMessage) -> None:
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if settings.smtp_tls == "ssl":
        smtp = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout_seconds,
                                context=context)
    else:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout_seconds)
    with smtp:
        if settings.smtp_tls == "starttls":
            smtp.starttls(context=context)
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        smtp.send_message(message)


def _write_eml(settings: Settings, message: EmailMessage) -> None:
    """The embedded default: the message as a file a mail program opens, and one line in the log."""
    folder = settings.mail_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.eml"
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(message.as_bytes())
    temporary.replace(path)  # a reader never sees half a message
    log.info("mail to %s (%s) written to %s (no STUDIO_SMTP_HOST set)", message["To"], message["Subject"], path)
