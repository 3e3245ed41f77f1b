"""A real SMTP server on loopback (aiosmtpd) that the studio sends to, and a broker stand-in for mail.

    def test_something(mailbox):                  # settings now point at the server
        ... sign up ...
        message = mailbox.wait_for(1)[0]         # runs the queued mail.send tasks, waits for delivery
        mailbox.link_in(message, "/verify-email")

The ``mail.send`` tasks the app enqueues after its commits are recorded (other tasks too, in
``sent``) and run by :meth:`Mailbox.deliver` through the real task function, which talks SMTP to the
server like a cpu worker would.
"""

from __future__ import annotations

import re
import threading
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

LINK = re.compile(r"https?://\S+")
REFUSED_DOMAIN = "refused.example.com"


class _Collector:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.lock = threading.Lock()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          rcpt_options: list[str]) -> str:
        """Every address is taken except those of :data:`REFUSED_DOMAIN`, refused for good (550)."""
        if address.endswith("@" + REFUSED_DOMAIN):
            return "550 5.1.1 No such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        parsed = message_from_bytes(envelope.original_content or envelope.content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        with self.lock:
            self.messages.append(parsed)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"


class Mailbox:
    """The loopback SMTP server's inbox, and the mail tasks waiting to run."""

    def __init__(self, port: int) -> None:
        self._collector = _Collector()
        self._controller = Controller(self._collector, hostname="127.0.0.1", port=port)
        self.port = port
        self.sent: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def record(self, name: str, kwargs: dict[str, str], queue_name: str) -> None:
        """The app's task sender: tasks are recorded here instead of going to a broker."""
        with self._lock:
            self.sent.append((name, dict(kwargs)))

    def deliver(self) -> int:
        """Run every recorded ``mail.send`` task now, as a cpu worker would; returns how many ran."""
        from worker import settings as worker_settings_module
        from worker.tasks.mail import send_email_task

        with self._lock:
            mail = [kwargs for name, kwargs in self.sent if name == "mail.send"]
            self.sent = [(name, kwargs) for name, kwargs in self.sent if name != "mail.send"]
        worker_settings_module.get_worker_settings.cache_clear()  # the test's settings, as they are now
        for kwargs in mail:
            send_email_task(**kwargs)
        return len(mail)

    @property
    def messages(self) -> list[EmailMessage]:
        with self._collector.lock:
            return list(self._collector.messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[EmailMessage]:
        """The first ``count`` messages received, delivering queued mail while waiting."""
        deadline = time.monotonic() + timeout
        while True:
            self.deliver()
            received = self.messages
            if len(received) >= count:
                return received
            assert time.monotonic() < deadline, f"expected {count} messages, got {len(received)}: " + ", ".join(
                str(message["Subject"]) for message in received)
            time.sleep(0.05)

    def to(self, address: str) -> list[EmailMessage]:
        return [message for message in self.messages if message["To"] == address]


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None, "the message has no plain-text part"
    return str(part.get_content())


def html_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None, "the message has no HTML part"
    return str(part.get_content())


def link_in(message: EmailMessage, path: str) -> str:
    """The one link of the message's text whose path starts with ``path``."""
    links = [link for link in LINK.findall(text_of(message)) if path in link]
    assert len(set(links)) == 1, f"expected one {path} link in: {text_of(message)}"
    return links[0]
