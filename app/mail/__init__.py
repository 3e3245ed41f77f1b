"""Email: messages rendered from templates, kept in an outbox, sent by a cpu task after the commit.

- :mod:`app.mail.compose` renders a message (plain text plus simple HTML, no images, no tracking);
- :mod:`app.mail.outbox` records it in the request's transaction and enqueues ``mail.send``;
- :mod:`app.mail.transport` delivers it: an SMTP server from the settings, or, on the embedded
  defaults, an ``.eml`` file under ``var/mail`` and one log line.
"""

from app.mail.compose import Composed, compose
from app.mail.outbox import queue_email, send_queued

__all__ = ["Composed", "compose", "queue_email", "send_queued"]
