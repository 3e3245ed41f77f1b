"""Job benchmark: seconds from a studio's upload (the commit of its rows and photos) to a finished gallery.

Runs the whole pipeline with real processes, as production does: a private SQLite database built by
the migrations, local storage, a broker (Redis in a private database number, or the file-system
broker), and one ``celery worker -Q gpu,cpu -c 1`` subprocess with the built-in ``tiny`` model on
the CPU. For each run it records:

- commit -> start: from the commit that enqueues the job (after-commit send) to the worker's claim;
- upload -> gallery: from that commit to the job's ``finished_at`` (images and rows published);
- cold: an empty class-prior bank (the job generates the class images);
  warm: a second studio of the same class (the bank is reused, 0 generated).

    python bench/job.py [--broker redis|filesystem] [--repeat 1] [--steps 30] [--prior-images 8]
                        [--append docs/benchmarks.md]

Prints a table; with ``--append`` the table, the machine, the command and the date go to the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from sqlalchemy import delete  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from app import config as config_module  # noqa: E402
from app import queue  # noqa: E402
from app.config import Settings  # noqa: E402
from app.db import make_engine  # noqa: E402
from app.models import Job, PriorBank  # noqa: E402
from app.storage import LocalStorage  # noqa: E402
from tests.worker.factories import make_job, make_subject, make_user  # noqa: E402
from tests.worker.processes import base_worker_env, wait_until_ready  # noqa: E402
from worker.engine.prompts import DEFAULT_PACK  # noqa: E402

REDIS_URL = os.environ.get("STUDIO_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", choices=["redis", "filesystem"], default="redis")
    parser.add_argument("--repeat", type=int, default=1, help="cold and warm runs each (default 1)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--prior-images", type=int, default=8, help="class-prior images (default 8)")
    parser.add_argument("--prior-steps", type=int, default=10, help="sampler steps of a class image (default 10)")
    parser.add_argument("--sample-steps", type=int, default=10, help="sampler steps of a gallery image (default 10)")
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--preset", action="store_true",
                        help="the studio's defaults instead: the pet recipe of --quality, its class-image count, "
                             "the default pet pack at 4 images per prompt (the step options are ignored)")
    parser.add_argument("--quality", choices=["fast", "balanced", "best"], default="fast",
                        help="the recipe with --preset (default fast; the new-studio form's default is balanced)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for one job")
    parser.add_argument("--machine", default="2-core CPU dev box", help="machine name written with --append")
    parser.add_argument("--append", type=Path, help="append the results to this markdown file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (database, media, worker log)")
    return parser.parse_args()


@contextmanager
def work_folder(keep: bool) -> Iterator[str]:
    """A temporary folder for the database, media and worker log; removed afterwards unless ``keep``."""
    folder = tempfile.mkdtemp(prefix="studio-bench-")
    try:
        yield folder
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def migrate(url: str) -> None:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "head")


def worker_env(settings: Settings, args: argparse.Namespace) -> dict[str, str]:
    env = base_worker_env(settings)
    if not args.preset:
        env.update({
            "STUDIO_TRAIN_OVERRIDES": json.dumps({"steps": args.steps, "preview_every": 0,
                                                  "checkpoint_every": max(1, args.steps // 2)}),
            "STUDIO_PRIOR_IMAGES": str(args.prior_images),
            "STUDIO_PRIOR_STEPS": str(args.prior_steps),
            "STUDIO_SAMPLE_STEPS": str(args.sample_steps),
        })
    return env


def reset_bank(sessions: sessionmaker[Session], storage: LocalStorage, var_dir: Path) -> None:
    """Empty the class-prior bank everywhere (storage, rows, the worker's cache): the next run is cold again."""
    storage.delete_prefix("priors/")
    with sessions() as session:
        session.execute(delete(PriorBank))
        session.commit()
    shutil.rmtree(var_dir / "prior-bank", ignore_errors=True)


STAGE_LINE = re.compile(r"^\[(?P<time>[\d-]+ [\d:]+,\d+): [^\]]*\] job (?P<job>[0-9a-f-]{36})"
                        r"(?:: stage (?P<stage>\w+)| (?P<published>published))")
STAGES = ("preparing", "priors", "training", "sampling", "scoring", "publishing")


def stage_seconds(log_text: str, job_id: str) -> dict[str, float]:
    """Seconds each stage of ``job_id`` took, from the worker's "stage" log lines up to "published"."""
    marks: list[tuple[str, datetime]] = []
    for line in log_text.splitlines():
        found = STAGE_LINE.match(line)
        if found and found["job"] == job_id:
            when = datetime.strptime(found["time"], "%Y-%m-%d %H:%M:%S,%f")
            marks.append((found["stage"] or "published", when))
    return {stage: (marks[i + 1][1] - when).total_seconds()
            for i, (stage, when) in enumerate(marks[:-1])}


def run_one(sessions: sessionmaker[Session], storage: LocalStorage, args: argparse.Namespace) -> dict[str, float]:
    """One studio from commit to finished gallery; returns its timings, prior-bank facts and job id (as an int)."""
    timeout = args.timeout
    with sessions() as session:
        if args.preset:
            subject = make_subject(session, storage, make_user(session), photos=args.photos, prompts=[],
                                   images_per_prompt=4, style_pack=DEFAULT_PACK["pet"], quality=args.quality)
        else:
            subject = make_subject(session, storage, make_user(session), photos=args.photos, images_per_prompt=1)
        job = make_job(session, subject)
        queue.enqueue(session, "training.run", job_id=str(job.id))
        committed = datetime.now(UTC)
        session.commit()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as session:
            found = session.get(Job, job.id)
            assert found is not None
            if found.status in ("done", "failed", "cancelled"):
                break
        time.sleep(0.1)
    else:
        raise SystemExit(f"job {job.id} did not finish within {timeout} s")
    if found.status != "done":
        raise SystemExit(f"job {job.id} ended {found.status}: {found.failure_reason}")
    assert found.started_at is not None and found.finished_at is not None
    return {
        "job": job.id.int,
        "start": (found.started_at - committed).total_seconds(),
        "total": (found.finished_at - committed).total_seconds(),
        "generated": float(found.details.get("prior_generated", -1)),
        "images": float(found.details.get("images_total", 0)),
        "reused": float(found.details.get("prior_reused", -1)),
    }


def main() -> int:
    args = parse_args()
    with work_folder(args.keep) as folder:
        var_dir = Path(folder) / "var"
        var_dir.mkdir()
        database_url = f"sqlite:///{var_dir / 'studio.db'}"
        migrate(database_url)
        settings = Settings(environment="test", var_dir=var_dir, database_url=database_url,
                            broker_url=REDIS_URL if args.broker == "redis" else "",
                            secret_key="bench-secret-key-0123456789abcdef0123456789")
        config_module.get_settings = lambda: settings  # app.queue sends with these settings
        if args.broker == "redis":
            import redis

            redis.Redis.from_url(REDIS_URL).flushdb()
        storage = LocalStorage(settings.resolved_media_dir)
        sessions = sessionmaker(bind=make_engine(database_url), expire_on_commit=False)
        log_path = Path(folder) / "worker.log"
        with log_path.open("wb") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker", "-Q", "gpu,cpu",
                 "-c", "1", "-l", "INFO", "-n", f"bench-{uuid.uuid4().hex[:8]}@localhost", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                cwd=ROOT, env=worker_env(settings, args), stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until_ready(log_path, worker, args.timeout)
            rows: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
            for _ in range(args.repeat):
                for kind in ("cold", "warm"):
                    run = run_one(sessions, storage, args)
                    run.update(stage_seconds(log_path.read_text(errors="replace"), str(uuid.UUID(int=int(run["job"])))))
                    rows[kind].append(run)
                    print(kind, {key: round(value, 2) for key, value in run.items() if key != "job"}, flush=True)
                reset_bank(sessions, storage, var_dir)
        except BaseException:
            print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGQUIT)
                try:
                    worker.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
            if args.broker == "redis":
                import redis

                redis.Redis.from_url(REDIS_URL).flushdb()

    if args.keep:
        print(f"kept {folder}", file=sys.stderr)
    table = render(rows, args)
    print(table)
    if args.append:
        command_line = "python bench/job.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
        with args.append.open("a") as handle:
            handle.write(f"\n## Job: upload to finished gallery (bench/job.py)\n\n"
                         f"Machine: {args.machine} ({platform.machine()}, {os.cpu_count()} CPUs, "
                         f"Python {platform.python_version()}). Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.  \n"
                         f"Command: `{command_line}`\n\n{table}\n")
    return 0


def render(rows: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    images = int(rows["cold"][-1]["images"])
    if args.preset:
        workload = (f"the studio's defaults (pet '{args.quality}' recipe and class-image count, default pet pack: "
                    f"{images} images)")
    else:
        workload = (f"{args.steps} training steps, {args.prior_images} class images x {args.prior_steps} steps, "
                    f"{images} images x {args.sample_steps} steps")
    lines = [
        f"tiny model on the CPU, {args.broker} broker, {args.photos} photos, {workload}; "
        f"median of {args.repeat} run(s)",
        "",
        "| bank | commit -> start (s) | upload -> gallery (s) | " + " | ".join(STAGES)
        + " | class images generated / reused | goal |",
        "|---|---:|---:|" + "---:|" * len(STAGES) + "---:|---|",
    ]
    for name, goal in (("cold", "< 60 s"), ("warm", "< 30 s")):
        runs = rows[name]
        start = median(run["start"] for run in runs)
        total = median(run["total"] for run in runs)
        generated, reused = int(runs[-1]["generated"]), int(runs[-1]["reused"])
        stages = " | ".join(f"{median(run.get(stage, 0.0) for run in runs):.1f}" for stage in STAGES)
        lines.append(f"| {name} | {start:.2f} | {total:.1f} | {stages} | {generated} / {reused} | {goal} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
