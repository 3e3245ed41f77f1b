"""Quiet access log: the studio page asks for its job's status every 1.5 s, and each answer would be a line
of uvicorn's access log (two thirds of a `make up` terminal in one run), burying the worker's output.

:class:`QuietPolling` drops the lines of successful status polls (``GET /api/v1/jobs/<id>`` answered
below 400); every other request, and every poll that failed, is still logged.
"""

from __future__ import annotations

import logging
import re

ACCESS_LOGGER = "uvicorn.access"
POLLING_PATH = re.compile(r"^/api/v1/jobs/[0-9a-fA-F-]{36}(\?.*)?$")


class QuietPolling(logging.Filter):
    """Drops uvicorn access-log records of a successful job-status poll."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn's access record: (client address, method, path with query, HTTP version, status code).
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        _, method, path, _, status = args
        is_poll = method == "GET" and isinstance(path, str) and POLLING_PATH.match(path) is not None
        return not (is_poll and isinstance(status, int) and status < 400)


def quiet_polling() -> None:
    """Install :class:`QuietPolling` on uvicorn's access logger (once per process)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(existing, QuietPolling) for existing in logger.filters):
        logger.addFilter(QuietPolling())
