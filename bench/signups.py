"""Sign-up burst benchmark: N sign-ups at once against one web process, real argon2 parameters.

Starts the real app under uvicorn on loopback (a fresh var/ with SQLite), signs up once to warm it
up, then sends N sign-ups at once and reports the server's peak RSS growth during the burst, how
long the burst took and how it was answered, for each number of password-hash slots given.

    python bench/signups.py [--burst 40] [--slots 2 10]

(10 hashes at once is what a web process allowed before STUDIO_PASSWORD_HASH_SLOTS: one per
database session slot.) Prints a table; results go into docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found for pid {pid}")


async def burst(url: str, count: int) -> list[int]:
    async with httpx.AsyncClient(timeout=120) as client:
        answers = await asyncio.gather(*(
            client.post(f"{url}/api/v1/auth/signup", json={"email": f"burst{n}@example.com", "password": "x" * 16})
            for n in range(count)
        ))
    return [answer.status_code for answer in answers]


def run(slots: int, count: int) -> tuple[float, float, float, str]:
    """(peak RSS growth MB, RSS growth kept MB, seconds, answers) for one burst."""
    with tempfile.TemporaryDirectory() as var_dir:
        env = {**os.environ, "STUDIO_VAR_DIR": var_dir, "STUDIO_MAX_SIGNUPS_PER_HOUR": "0",
               "STUDIO_PASSWORD_HASH_SLOTS": str(slots), "STUDIO_PASSWORD_HASH_WAIT_SECONDS": "60",
               "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning", "--no-access-log"], cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(url + "/healthz", timeout=1)
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "the web app did not start"
                    time.sleep(0.2)
            warm = httpx.post(f"{url}/api/v1/auth/signup", json={"email": "warm@example.com", "password": "x" * 16})
            assert warm.status_code == 201, warm.text
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
            before = status_kb(server.pid, "VmRSS")
            started = time.perf_counter()
            statuses = asyncio.run(burst(url, count))
            seconds = time.perf_counter() - started
            peak, after = status_kb(server.pid, "VmHWM"), status_kb(server.pid, "VmRSS")
        finally:
            server.terminate()
            server.wait(10)
    answers = ", ".join(f"{n}×{code}" for code, n in sorted(collections.Counter(statuses).items()))
    return (peak - before) / 1024, (after - before) / 1024, seconds, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--slots", type=int, nargs="+", default=[2, 10])
    args = parser.parse_args()
    print(f"| hash slots | {args.burst} sign-ups at once | peak RSS growth | RSS kept | answers |")
    print("|---|---|---|---|---|")
    for slots in args.slots:
        peak, kept, seconds, answers = run(slots, args.burst)
        print(f"| {slots} | {seconds:.1f} s | {peak:.0f} MB | {kept:.0f} MB | {answers} |")


if __name__ == "__main__":
    main()
