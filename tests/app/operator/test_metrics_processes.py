"""`studio web --workers 2` with PROMETHEUS_MULTIPROC_DIR: every scrape, whichever process answers
it, counts the requests both processes served; a restart starts the counts again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from app.config import Settings
from tests.servers import free_port
from tests.worker.processes import ROOT, base_worker_env

TOKEN = "m" * 24
HEALTHZ_COUNT = re.compile(r'studio_http_request_duration_seconds_count\{method="GET",route="/healthz"\} (\S+)')

pytestmark = pytest.mark.slow


@contextmanager
def web(settings: Settings, folder: Path) -> Iterator[str]:
    """`studio web --workers 2` on a free port, until the block ends."""
    port = free_port()
    # The test's database and folders, as a worker of the tests gets them.
    env = {**base_worker_env(settings), "STUDIO_METRICS_TOKEN": TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "web", "--workers", "2", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"studio web exited with {process.returncode}"
            assert time.monotonic() < deadline, "studio web did not answer within 120 s"
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code in (200, 503):
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def healthz_count(url: str) -> float:
    scraped = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert scraped.status_code == 200, scraped.text[:500]
    found = HEALTHZ_COUNT.search(scraped.text)
    return float(found.group(1)) if found else 0.0


def test_two_web_processes_report_one_sum(settings: Settings, clean_db: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "prometheus"
    with web(settings, folder) as url:
        # Concurrent clients, so that both processes take connections (each keeps its own file).
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda _: httpx.get(f"{url}/healthz", timeout=30).status_code, range(60)))
        assert answers == [200] * 60
        served_by = {path.name for path in folder.glob("histogram_*.db")}
        assert len(served_by) == 2, f"the requests did not reach both processes: {served_by}"
        assert [healthz_count(url) for _ in range(6)] == [60.0] * 6
    # A new run starts from nothing: the files of the last one are wiped at the start.
    with web(settings, folder) as url:
        assert healthz_count(url) == 0.0
