"""Web benchmark: status polling under load, upload memory, ZIP download speed and memory.

Starts the real app under uvicorn on loopback (a fresh var/ folder, SQLite by default or
PostgreSQL with --db postgres) and measures it from this process:

1. status polling: N browsers poll GET /api/v1/jobs/{id} every second, as the studio page does;
   p50 / p99 latency and errors. Then the same pollers with no pause (saturation).
2. upload: one studio of 20 photos of ~8 MB each; the server's peak RSS growth during it.
3. ZIP: download a gallery of ~1 GB as one streamed ZIP; MB/s and the server's peak RSS growth.
4. hostile uploads: the worst photo of each format at its pixel limit (tests/app/hostile_photos.py),
   one per request; the server's peak RSS growth and CPU time for each, and its resident set after
   each compared with before the first (what it keeps). Then ten progressive-JPEG
   scan bombs at once, and how long until all ten were answered.
5. a person's studio: 20 photos of one face (bench/likeness.py's variations of Grace Hopper, 1600 px
   long): the server's CPU for the whole request, and, in this process, the CPU of the face checks
   alone (detection, landmarks, descriptor per photo, then the grouping) after the first photo
   (the model's one-off load is shown apart).

    python bench/web.py [--pollers 100] [--seconds 15] [--zip-mb 1024] [--db sqlite|postgres]
                        [--only all|uploads|faces]

Prints a table; the results go into docs/benchmarks.md by hand, with the machine and command.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.models import GeneratedImage, Job, Subject, User, utcnow  # noqa: E402
from app.storage.base import image_key  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> None:
    # Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class Server:
    """uvicorn running the studio's factory in a child process with its own settings."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=self.env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the web app did not start")

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(10)


def make_photo(seed: int, target_bytes: int) -> bytes:
    """A JPEG of about ``target_bytes``: noise compresses badly, so size follows the pixel count."""
    rng = np.random.default_rng(seed)
    side = int((target_bytes / 0.9) ** 0.5)
    pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


async def poll(host: str, port: int, request: bytes, seconds: float, interval: float,
               latencies: list[float], errors: list[str]) -> None:
    """One browser tab: a kept-alive connection, a GET, the whole response read, a pause, again.

    Plain HTTP/1.1 on asyncio streams rather than an HTTP client library: 100 httpx clients cost
    this process about 2.7 ms of CPU per request, more than the server spends answering it, and on
    2 shared cores the measured tail was mostly the load generator's own event loop.
    """
    await asyncio.sleep(random.random() * max(interval, 0.05))
    reader, writer = await asyncio.open_connection(host, port)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                writer.write(request)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                if status_line.split(b" ")[1:2] != [b"200"]:
                    errors.append(status_line.decode(errors="replace").strip())
            except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                errors.append(type(error).__name__)
                return
            latencies.append(time.perf_counter() - started)
            if interval:
                await asyncio.sleep(interval)
    finally:
        writer.close()


def polling(url: str, headers: dict[str, str], pollers: int, seconds: float, interval: float) -> dict[str, float]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    lines = [f"GET {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Accept: application/json"]
    request = ("\r\n".join(lines + [f"{name}: {value}" for name, value in headers.items()]) + "\r\n\r\n").encode()
    latencies: list[float] = []
    errors: list[str] = []

    async def run() -> None:
        await asyncio.gather(*(poll(parts.hostname or "", parts.port or 80, request, seconds, interval, latencies,
                                    errors) for _ in range(pollers)))

    # The load generator's own full collections would stall every poller at once and be counted
    # as server latency: no collections while it measures.
    gc.collect()
    gc.disable()
    started = time.monotonic()
    cpu_started = time.process_time()
    try:
        asyncio.run(run())
    finally:
        gc.enable()
    elapsed = time.monotonic() - started
    client_cpu = time.process_time() - cpu_started
    quantiles = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "p50_ms": quantiles[49] * 1000,
            "p99_ms": quantiles[98] * 1000, "errors": len(errors),
            "client_cpu_ms": client_cpu * 1000 / max(1, len(latencies))}


def seed_rows(database_url: str, media_dir: Path, email: str, zip_mb: int) -> tuple[str, str]:
    """A subject with a running job and a gallery of ``zip_mb`` MB; returns (job id, subject id)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from app.db import make_engine

    engine = make_engine(database_url)
    with Session(engine) as session:
        user = session.scalars(select(User).where(User.email == email)).one()
        now = utcnow()
        subject = Subject(owner_id=user.id, name="Benchmark", kind="dog", class_noun="dog",
                          style_pack="pet-adventures", prompts=[], consent_at=now,
                          expires_at=now + timedelta(days=30), identifier="qzx", weights_key="x")
        session.add(subject)
        session.flush()
        job = Job(subject_id=subject.id, owner_id=user.id, status="running", stage="training", step=120,
                  total=400, loss=0.12, eta_seconds=80, attempts=1, details={"prior_reused": 50})
        session.add(job)
        session.flush()
        image_bytes = 4 * 1024 * 1024
        payload = os.urandom(image_bytes)
        for index in range(max(1, zip_mb * 1024 * 1024 // image_bytes)):
            image_id = uuid.uuid4()
            key = image_key(user.id, subject.id, image_id)
            path = media_dir / key
            path.parent.mkdir(parents=True, exist_ok=True)
            # Distinct bytes per file at no cost: a small header, then the shared random block.
            path.write_bytes(index.to_bytes(8, "big") + payload)
            session.add(GeneratedImage(id=image_id, subject_id=subject.id, job_id=job.id, storage_key=key,
                                       prompt=f"a photo of qzx dog number {index % 10}",
                                       prompt_template="a photo of {subject}", seed=index, steps=25,
                                       guidance=7.5, width=512, height=512))
        session.commit()
        return str(job.id), str(subject.id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pollers", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--zip-mb", type=int, default=1024)
    parser.add_argument("--photo-mb", type=float, default=8)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--only", choices=["all", "uploads", "faces"], default="all",
                        help="uploads: only the hostile uploads (section 4); faces: only a person's studio (5)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="studio-bench-"))
    var_dir = workdir / "var"
    if args.db == "postgres":
        from sqlalchemy import create_engine, text

        name = f"studio_bench_{uuid.uuid4().hex[:8]}"
        with create_engine("postgresql+psycopg://postgres@127.0.0.1/postgres",
                           isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        database_url = f"postgresql+psycopg://postgres@127.0.0.1/{name}"
    else:
        database_url = f"sqlite:///{workdir / 'studio.db'}"
    env = {**os.environ, "STUDIO_VAR_DIR": str(var_dir), "STUDIO_DATABASE_URL": database_url,
           "STUDIO_ENVIRONMENT": "development", "STUDIO_MAX_ACTIVE_JOBS_PER_USER": "100"}
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True)

    rows: list[tuple[str, str, str]] = []
    with Server(env) as server:
        email = "bench@example.com"
        httpx.post(server.url + "/api/v1/auth/signup", json={"email": email, "password": "benchmark-password"})
        token = httpx.post(server.url + "/api/v1/auth/token",
                           json={"email": email, "password": "benchmark-password"}).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        assert server.process is not None
        pid = server.process.pid
        if args.only == "uploads":
            rows.extend(hostile_uploads(server.url, headers, pid, workdir))
            print_rows(args.db, rows)
            return
        if args.only == "faces":
            rows.extend(person_upload(server.url, headers, pid))
            print_rows(args.db, rows)
            return
        job_id, subject_id = seed_rows(database_url, var_dir / "media", email, args.zip_mb)

        status_url = f"{server.url}/api/v1/jobs/{job_id}"
        cpu_before = cpu_seconds(pid)
        paced = polling(status_url, headers, args.pollers, args.seconds, interval=1.0)
        server_cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / max(1, paced["requests"])
        rows.append((f"status, {args.pollers} pollers every 1 s",
                     f"p50 {paced['p50_ms']:.1f} ms, p99 {paced['p99_ms']:.1f} ms",
                     f"{paced['requests']:.0f} requests, {paced['errors']:.0f} errors"))
        rows.append(("  CPU per status request", f"server {server_cpu_ms:.2f} ms",
                     f"load generator {paced['client_cpu_ms']:.2f} ms"))
        flat_out = polling(status_url, headers, args.pollers, args.seconds / 2, interval=0.0)
        rows.append((f"status, {args.pollers} pollers, no pause",
                     f"p50 {flat_out['p50_ms']:.1f} ms, p99 {flat_out['p99_ms']:.1f} ms",
                     f"{flat_out['rps']:.0f} req/s, {flat_out['errors']:.0f} errors"))

        photos = [make_photo(seed, int(args.photo_mb * 1024 * 1024)) for seed in range(20)]
        files = [("photos", (f"photo{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
        form = {"name": "Upload bench", "kind": "dog", "style_pack": "pet-adventures", "images_per_prompt": "1",
                "quality": "fast", "consent": "on"}
        reset_peak(pid)
        before = rss_kb(pid, "VmRSS")
        started = time.monotonic()
        response = httpx.post(server.url + "/api/v1/subjects", headers=headers, data=form, files=files, timeout=300)
        upload_seconds = time.monotonic() - started
        growth = (rss_kb(pid, "VmHWM") - before) / 1024
        total_mb = sum(len(p) for p in photos) / 1024 / 1024
        rows.append((f"upload 20 photos, {total_mb:.0f} MB", f"peak RSS growth {growth:.0f} MB",
                     f"HTTP {response.status_code} in {upload_seconds:.1f} s"))

        reset_peak(pid)
        before = rss_kb(pid, "VmRSS")
        received = 0
        started = time.monotonic()
        with httpx.stream("GET", f"{server.url}/api/v1/subjects/{subject_id}/download.zip", headers=headers,
                          timeout=600) as stream:
            status_code = stream.status_code
            for chunk in stream.iter_bytes(1024 * 1024):
                received += len(chunk)
        seconds = time.monotonic() - started
        growth = (rss_kb(pid, "VmHWM") - before) / 1024
        rows.append((f"ZIP download, {received / 1024 / 1024:.0f} MB", f"{received / 1024 / 1024 / seconds:.0f} MB/s",
                     f"HTTP {status_code}, peak RSS growth {growth:.0f} MB"))
        rows.extend(hostile_uploads(server.url, headers, pid, workdir))
        rows.extend(person_upload(server.url, headers, pid))
    print_rows(args.db, rows)


# The worst photo of each format at the limit it is held to with the default settings: the pixel
# limit (50 MP) or, where decoding needs more memory per pixel, the decode memory budget.
HOSTILE = [
    ("png16", 7071, "16-bit grey PNG, 50 MP"),
    ("rgba", 7071, "RGBA PNG, 50 MP"),
    ("jpeg420", 7071, "progressive JPEG 4:2:0, 50 MP"),
    ("jpeg444", 6500, "progressive JPEG 4:4:4, 42 MP"),
    ("jpeg444", 7071, "progressive JPEG 4:4:4, 50 MP"),
    ("webp", 4000, "WebP, 16 MP"),
    ("heic", 6000, "HEIC, 36 MP"),
]
FORM = {"name": "Hostile", "kind": "dog", "consent": "on"}


def one_photo_outcome(response: httpx.Response, name: str) -> str:
    """The photo's fate from the answer to a one-photo request (which is short of photos anyway)."""
    if response.status_code != 422:
        return f"HTTP {response.status_code}"
    for problem in response.json().get("files", []):
        if problem["name"] == name:
            return "refused: " + problem["reason"].split(";")[0]
    return "accepted"


def hostile_uploads(url: str, headers: dict[str, str], pid: int, workdir: Path) -> list[tuple[str, str, str]]:
    from tests.app.hostile_photos import scan_bomb

    rows: list[tuple[str, str, str]] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = rss_kb(pid, "VmRSS")
    for kind, side, label in HOSTILE:
        path = workdir / f"{kind}-{side}.img"
        subprocess.run([sys.executable, "-m", "tests.app.hostile_photos", "make", kind, str(side), str(side),
                        str(path)], cwd=ROOT, env=env, check=True)
        data = path.read_bytes()
        reset_peak(pid)
        before, cpu_before = rss_kb(pid, "VmRSS"), cpu_seconds(pid)
        started = time.monotonic()
        response = httpx.post(url + "/api/v1/subjects", headers=headers, data=FORM,
                              files=[("photos", (path.name, data, "application/octet-stream"))], timeout=300)
        wall = time.monotonic() - started
        growth = (rss_kb(pid, "VmHWM") - before) / 1024
        cpu = cpu_seconds(pid) - cpu_before
        kept = (rss_kb(pid, "VmRSS") - start) / 1024
        rows.append((f"upload: {label} ({len(data) / 1024 / 1024:.1f} MB)",
                     f"peak RSS growth {growth:.0f} MB, CPU {cpu:.2f} s",
                     f"{one_photo_outcome(response, path.name)} in {wall:.1f} s; RSS since the first: {kept:+.0f} MB"))

    bomb = scan_bomb(4096, 4096, 30_000)
    cpu_before = cpu_seconds(pid)

    def send_bomb(index: int) -> int:
        return httpx.post(url + "/api/v1/subjects", headers=headers, data=FORM,
                          files=[("photos", (f"bomb{index}.jpg", bomb, "image/jpeg"))], timeout=300).status_code

    started = time.monotonic()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(send_bomb, range(10)))
    rows.append((f"10 scan bombs at once (16 MP, 30,000 scans, {len(bomb) / 1024:.0f} KB each)",
                 f"all answered in {time.monotonic() - started:.2f} s",
                 f"HTTP {sorted(set(codes))}, server CPU {cpu_seconds(pid) - cpu_before:.2f} s in all"))
    return rows


def person_photos(count: int = 20) -> list[tuple[str, bytes]]:
    """``count`` photos of Grace Hopper as a phone would send them: 1600 px long, JPEG."""
    from bench.likeness import builtin_set

    people, _ = builtin_set(count - 1)
    photos = []
    for index, image in enumerate(people["Grace Hopper"][:count]):
        scale = 1600 / max(image.size)
        large = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        large.save(buffer, format="JPEG", quality=90)
        photos.append((f"me-{index:02d}.jpg", buffer.getvalue()))
    return photos


def face_check_cpu(photos: list[tuple[str, bytes]]) -> tuple[float, float, int]:
    """CPU seconds of the face work for ``photos`` in this process: (loading the model, which the
    web process does once at its start; the checks of every photo and the grouping), photos refused."""
    from app.config import Settings
    from app.photos.faces import check_face, identity_problems, load_face_model
    from app.photos.sanitize import PhotoRejected, sanitize_upload
    from worker.engine.faces import face_model

    settings = Settings()
    cleaned = [(name, Image.open(io.BytesIO(sanitize_upload(name, data, settings).jpeg_bytes)).convert("RGB"))
               for name, data in photos]
    face_model.cache_clear()
    started = time.process_time()
    load_face_model()
    load = time.process_time() - started
    refused = 0
    started = time.process_time()
    found = []
    for name, image in cleaned:
        try:
            found.append((name, check_face(name, image)))
        except PhotoRejected:
            refused += 1
    refused += len(identity_problems(found).rejections)
    return load, time.process_time() - started, refused


def person_upload(url: str, headers: dict[str, str], pid: int) -> list[tuple[str, str, str]]:
    photos = person_photos()
    form = {"name": "Face bench", "kind": "person", "class_noun": "woman", "images_per_prompt": "1",
            "quality": "fast", "consent": "on"}
    files = [("photos", (name, data, "image/jpeg")) for name, data in photos]
    # A first request imports what the measured one reuses (the face model is loaded at the server's start).
    httpx.post(url + "/api/v1/subjects", headers=headers, data=form, files=files[:1], timeout=300)
    cpu_before = cpu_seconds(pid)
    started = time.monotonic()
    response = httpx.post(url + "/api/v1/subjects", headers=headers, data=form, files=files, timeout=300)
    wall = time.monotonic() - started
    server_cpu = cpu_seconds(pid) - cpu_before
    load, checks, refused = face_check_cpu(photos)
    total_mb = sum(len(data) for _, data in photos) / 1024 / 1024
    return [
        (f"person studio, 20 photos ({total_mb:.1f} MB)", f"server CPU {server_cpu:.2f} s",
         f"HTTP {response.status_code} in {wall:.1f} s (decode, checks, faces, store)"),
        ("  face checks alone, 20 photos", f"CPU {checks:.2f} s",
         f"detection, landmarks, descriptors, grouping; {refused} refused; the model's load at the "
         f"process's start {load:.2f} s more"),
    ]


def print_rows(db: str, rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\nweb benchmark ({db}, {os.cpu_count()} CPUs)")
    print(f"{'what':<{width}} | {'result':<36} | detail")
    print(f"{'-' * width}-+-{'-' * 36}-+-{'-' * 30}")
    for what, result, detail in rows:
        print(f"{what:<{width}} | {result:<36} | {detail}")


if __name__ == "__main__":
    main()
