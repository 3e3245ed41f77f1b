"""Queue benchmark: N studios submitted at once, then where each one stands in line and how long it will wait.

Starts the real app under uvicorn on loopback (a fresh var/ folder, SQLite, the file-system broker, no
worker: every job stays queued), creates N accounts, and has each submit a studio of 3 small photos at
the same moment (POST /api/v1/subjects, N threads). Then it reads every job's status once and reports:

- how long the submissions took (each request, and all of them);
- whether the queue positions are exactly 1..N, and in the order the jobs were handed to the broker;
- the estimated wait of the first and the last in line (the demo model's speeds: no studio has finished);
- how long one status read takes for a job deep in the line (it counts and reads the jobs ahead).

    python bench/queue_positions.py [--studios 30]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.web import Server  # noqa: E402

PASSWORD = "benchmark-password"


def photo(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (320, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def submit(url: str, token: str, index: int) -> tuple[float, str]:
    files = [("photos", (f"p{index}-{n}.jpg", photo(index * 10 + n), "image/jpeg")) for n in range(3)]
    data = {"name": f"Dog {index}", "kind": "dog", "style_pack": "pet-adventures", "images_per_prompt": "1",
            "consent": "true"}
    started = time.monotonic()
    response = httpx.post(f"{url}/api/v1/subjects", headers={"Authorization": f"Bearer {token}"}, data=data,
                          files=files, timeout=300)
    elapsed = time.monotonic() - started
    response.raise_for_status()
    return elapsed, str(response.json()["job"]["id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studios", type=int, default=30)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="studio-bench-queue-"))
    database_url = f"sqlite:///{workdir / 'studio.db'}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("STUDIO_")},
           "STUDIO_VAR_DIR": str(workdir / "var"), "STUDIO_DATABASE_URL": database_url,
           "STUDIO_ENVIRONMENT": "development", "STUDIO_MAX_SIGNUPS_PER_HOUR": "0", "STUDIO_BASE_MODEL": "tiny"}
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True)
    with Server(env) as server:
        tokens = []
        for index in range(args.studios):
            email = f"queue-{index}@example.com"
            httpx.post(server.url + "/api/v1/auth/signup", json={"email": email, "password": PASSWORD}, timeout=60)
            tokens.append(httpx.post(server.url + "/api/v1/auth/token", json={"email": email, "password": PASSWORD},
                                     timeout=60).json()["token"])
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=args.studios) as pool:
            results = list(pool.map(lambda pair: submit(server.url, pair[1], pair[0]), enumerate(tokens)))
        all_seconds = time.monotonic() - started
        statuses, reads = [], []
        for (_, job_id), token in zip(results, tokens, strict=True):
            read_started = time.monotonic()
            answer = httpx.get(f"{server.url}/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"},
                               timeout=60)
            reads.append(time.monotonic() - read_started)
            statuses.append(answer.json())

    from sqlalchemy import create_engine, text

    with create_engine(database_url).connect() as connection:
        sent_order = [str(row[0]).replace("-", "") for row in connection.execute(
            text("SELECT id FROM jobs ORDER BY enqueued_at, id"))]
    positions = sorted(status["queue_position"] for status in statuses)
    by_position = [status["id"].replace("-", "") for status in sorted(statuses, key=lambda s: s["queue_position"])]
    first = min(statuses, key=lambda s: s["queue_position"])
    last = max(statuses, key=lambda s: s["queue_position"])
    print(f"{args.studios} studios submitted at once: {all_seconds:.1f} s in all; one request p50 "
          f"{statistics.median(s for s, _ in results):.2f} s, max {max(s for s, _ in results):.2f} s")
    print(f"queue positions 1..{args.studios} each once: {positions == list(range(1, args.studios + 1))}; "
          f"in the order the broker took them: {by_position == sent_order}")
    print(f"first in line: waits {first['queue_wait_seconds']} s, done in {first['eta_seconds']} s "
          f"({first['stage_label']!r})")
    print(f"last in line: waits {last['queue_wait_seconds']} s, done in {last['eta_seconds']} s "
          f"({last['stage_label']!r})")
    print(f"status read: p50 {1000 * statistics.median(reads):.0f} ms, max {1000 * max(reads):.0f} ms")


if __name__ == "__main__":
    main()
