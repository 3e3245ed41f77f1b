"""``studio``: run the studio and manage it from the command line.

    studio up                    everything on one machine with the embedded defaults
    studio migrate               bring the database schema up to date
    studio web [--host --port --reload]
    studio worker [celery options]   (default: -Q gpu,cpu)
    studio beat [celery options]
    studio createuser EMAIL [--password-stdin] [--operator]
    studio grant-operator EMAIL [--revoke]   the operator console (/operator)
    studio priors fill --model KEY --class dog --count N   warm the class-prior bank (loads the model here)
    studio train ... / studio sample ...   the DreamBooth engine without web, database or queue

This module imports no ML code: ``train`` and ``sample`` import ``worker.engine.cli`` only when run.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from app.config import Settings, get_settings

ROOT = Path(__file__).resolve().parents[1]
CELERY_APP = "worker.celery_app:celery_app"
DEFAULT_WORKER_QUEUES = "gpu,cpu"
# `studio up`: jobs in one process, maintenance (the reaper, clean-ups, retention) in a small second one,
# so it never waits behind a training that takes twenty minutes.
JOB_QUEUES = "gpu"
MAINTENANCE_QUEUES = "cpu"
# Commands whose arguments belong to another program: they are handed over untouched.
PASSTHROUGH_COMMANDS = ("worker", "beat", "train", "sample")
STOP_TIMEOUT_SECONDS = 30.0

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


# --- migrations and accounts ----------------------------------------------------------------------


def run_migrations(settings: Settings) -> None:
    """``alembic upgrade head`` on the settings' database (creates the SQLite file and var/ when needed)."""
    from alembic import command
    from alembic.config import Config

    settings.var_dir.mkdir(parents=True, exist_ok=True)
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", settings.resolved_database_url.replace("%", "%%"))
    command.upgrade(config, "head")


def read_new_password(from_stdin: bool) -> str:
    """The password from one line of stdin, or typed twice at a prompt."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password (at least 10 characters): ")
    if getpass.getpass("Password again: ") != first:
        raise ValueError("The two passwords differ.")
    return first


def create_user(email: str, password: str, operator: bool = False) -> str:
    """Create an account (an operator with ``operator``) and return its id; raises AccountError with a
    sentence on bad input.

    The address counts as confirmed: the operator who types it vouches for it, and on a studio whose
    sign-ups are closed (docker-compose's default) with no mail server, a confirmation link could
    never arrive while STUDIO_REQUIRE_VERIFIED_EMAIL holds the account's first studio back.
    """
    from app.accounts import service
    from app.db import session_scope
    from app.models import utcnow

    with session_scope() as session:
        user = service.sign_up(session, email, password)
        user.is_operator = operator
        user.email_verified_at = utcnow()
        return f"{user.email} ({user.id})"


def clear_metrics_folder() -> None:
    """Empty ``PROMETHEUS_MULTIPROC_DIR`` (when set) before the web processes start.

    In prometheus-client's multiprocess mode each web process keeps its metrics in a file there and
    a scrape adds them all up; files left by an earlier run would be added to this run's (its
    documentation asks for the folder to be wiped at each start).
    """
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for stale in Path(folder).glob("*.db"):
        stale.unlink(missing_ok=True)


def grant_operator(email: str, revoke: bool = False) -> str:
    """Make an existing account an operator (or no longer one); raises ValueError when there is none."""
    from app.accounts import repository, service
    from app.db import session_scope

    with session_scope() as session:
        user = repository.user_by_email(session, service.normalize_email(email))
        if user is None:
            raise ValueError(f"There is no account with the email {email!r}.")
        user.is_operator = not revoke
        return f"{user.email} ({user.id})"


def fill_priors(model: str, class_noun: str, count: int) -> int:
    """``studio priors fill``: fill the bank in this process (it loads the model, on this machine's GPU)."""
    from app.operator.service import PriorFillRefused
    from worker.tasks.priors import DiffusersPriorFiller, fill_priors
    from worker.tasks.runtime import default_context

    def report(event: Any) -> None:
        print(f"  {event.step}/{event.total} class images", flush=True)

    try:
        result = fill_priors(default_context(), DiffusersPriorFiller(), model, class_noun, count, progress=report)
    except PriorFillRefused as error:
        print(f"studio priors fill: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(f"The bank of “{result.class_noun}” on {result.spec} holds {count} images "
          f"({result.generated} painted now, {result.reused} already there).")
    return EXIT_OK


# --- child processes ------------------------------------------------------------------------------


def web_command(host: str, port: int, reload: bool = False) -> list[str]:
    # --no-proxy-headers: uvicorn would otherwise believe X-Forwarded-For from FORWARDED_ALLOW_IPS
    # (127.0.0.1 by default, "*" in many examples); the app believes it from STUDIO_TRUSTED_PROXIES only.
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", host, "--port", str(port),
               "--no-proxy-headers"]
    if reload:
        command.append("--reload")
    return command


def worker_command(extra: Sequence[str] = ()) -> list[str]:
    """``celery worker`` on the gpu and cpu queues unless the options name queues themselves."""
    command = [sys.executable, "-m", "celery", "-A", CELERY_APP, "worker"]
    names_queues = any(arg in ("-Q", "--queues") or arg.startswith(("-Q", "--queues=")) for arg in extra)
    if not names_queues:
        command += ["-Q", DEFAULT_WORKER_QUEUES]
    return command + list(extra)


def beat_command(settings: Settings, extra: Sequence[str] = ()) -> list[str]:
    command = [sys.executable, "-m", "celery", "-A", CELERY_APP, "beat"]
    if not any(arg in ("-s", "--schedule") or arg.startswith("--schedule=") for arg in extra):
        command += ["--schedule", str((settings.var_dir / "celerybeat-schedule").resolve())]
    return command + list(extra)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]


# What uvicorn runs the app with, besides where and how many: forwarded headers are the app's
# business (STUDIO_TRUSTED_PROXIES, app.main); uvicorn's own handling is off, whatever
# FORWARDED_ALLOW_IPS says, or it would rewrite the client's address before the app sees the peer.
WEB_SERVER_OPTIONS: dict[str, Any] = {"proxy_headers": False}

Spawner = Callable[[list[str]], "subprocess.Popen[bytes]"]


def spawn(command: list[str]) -> subprocess.Popen[bytes]:
    # A session of its own: a terminal's Ctrl-C reaches only ``studio up``, which forwards it once.
    # (Celery treats a second SIGINT as "stop now", so children must not get the terminal's too.)
    return subprocess.Popen(command, cwd=os.getcwd(), start_new_session=True)


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


class Supervisor:
    """Runs child processes until one exits or a signal arrives, then stops the rest."""

    def __init__(self, spawner: Spawner = spawn) -> None:
        self.spawner = spawner
        self.children: list[Child] = []
        self.stop_requests = 0
        self.sent: set[tuple[int, str]] = set()

    def start(self, name: str, command: list[str]) -> None:
        self.children.append(Child(name, self.spawner(command)))

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        self.stop_requests += 1
        if self.stop_requests == 1:
            print("\nStopping the studio (Ctrl-C again to force)...", file=sys.stderr, flush=True)
            self.signal_all(signal.SIGTERM)
        else:
            self.signal_all(signal.SIGKILL)

    def signal_all(self, signum: int) -> None:
        for child in self.children:
            # One SIGTERM each: Celery reads a repeated one as impatience and may cut a shutdown short.
            if child.process.poll() is None and (signum, child.name) not in self.sent:
                self.sent.add((signum, child.name))
                with contextlib.suppress(ProcessLookupError):  # it exited since the poll
                    child.process.send_signal(signum)

    def wait(self, poll_seconds: float = 0.5) -> int:
        """Block until a child exits (then stop the others) or every child stopped after a signal."""
        exit_code: int | None = None
        while exit_code is None:
            for child in self.children:
                code = child.process.poll()
                if code is not None:
                    if self.stop_requests == 0:
                        print(f"{child.name} exited with status {code}; stopping the rest.", file=sys.stderr)
                    # Stopped on request (Ctrl-C, SIGTERM): that is how `studio up` is meant to end.
                    exit_code = EXIT_OK if self.stop_requests else code
                    break
            else:
                time.sleep(poll_seconds)
        self.stop_all()
        return exit_code

    def stop_all(self) -> None:
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for child in self.children:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                child.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()


def up(settings: Settings, host: str, port: int, with_worker: bool, with_beat: bool,
       spawner: Spawner = spawn) -> int:
    """Migrate, then run the web server, a job worker, a maintenance worker and beat until Ctrl-C (exit 0)
    or until one of them stops (its status)."""
    for directory in (settings.var_dir, settings.resolved_media_dir, settings.scratch_dir, settings.broker_dir):
        directory.mkdir(parents=True, exist_ok=True)
    print("Updating the database schema...", flush=True)
    run_migrations(settings)

    supervisor = Supervisor(spawner)
    previous = {sig: signal.signal(sig, supervisor.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        clear_metrics_folder()
        supervisor.start("web", web_command(host, port))
        if with_worker:
            # One process, one job at a time: the GPU (or CPU) is the bottleneck.
            supervisor.start("worker", worker_command(["-Q", JOB_QUEUES, "-c", "1", "-n", "jobs@%h",
                                                       "--loglevel", "INFO"]))
            # Maintenance beside it: one slot, never a job, so it runs while a training does.
            supervisor.start("maintenance", worker_command(["-Q", MAINTENANCE_QUEUES, "-c", "1",
                                                            "-n", "maintenance@%h", "--loglevel", "INFO"]))
        if with_beat:
            supervisor.start("beat", beat_command(settings, ["--loglevel", "INFO"]))
        if spawner is spawn and wait_for_port(host, port, timeout=30):
            print(f"\nPhoto Studio is running at http://{host}:{port}  (Ctrl-C stops it)\n", flush=True)
        return supervisor.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- the command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="A self-hosted AI photo studio.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up_parser = commands.add_parser("up", help="run everything on this machine (web, workers, beat)")
    up_parser.add_argument("--host", default="127.0.0.1")
    up_parser.add_argument("--port", type=int, default=8000)
    up_parser.add_argument("--no-worker", action="store_true", help="do not start the workers")
    up_parser.add_argument("--no-beat", action="store_true", help="do not start the periodic scheduler")

    commands.add_parser("migrate", help="bring the database schema up to date (alembic upgrade head)")

    web = commands.add_parser("web", help="run the web server (uvicorn)")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=8000)
    web.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    web.add_argument("--workers", type=int, default=1,
                     help="web processes (they share the database, sign-in limits included); not with --reload")

    commands.add_parser("worker", help="run a Celery worker; options go to celery (default -Q gpu,cpu)",
                        add_help=False)
    commands.add_parser("beat", help="run the periodic scheduler (retention, the reaper)", add_help=False)

    createuser = commands.add_parser("createuser", help="create an account")
    createuser.add_argument("email")
    createuser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    createuser.add_argument("--operator", action="store_true", help="the account may use the operator console")
    grant = commands.add_parser("grant-operator", help="let an existing account use the operator console")
    grant.add_argument("email")
    grant.add_argument("--revoke", action="store_true", help="take the operator role away instead")

    priors = commands.add_parser("priors", help="the shared class-prior bank")
    priors_commands = priors.add_subparsers(dest="priors_command", required=True, metavar="COMMAND")
    fill = priors_commands.add_parser("fill", help="paint the class images a model's jobs of a class will reuse")
    fill.add_argument("--model", default="", help="a key of STUDIO_BASE_MODELS (default: the first) or a model spec")
    fill.add_argument("--class", dest="class_noun", required=True, help="the class noun: dog, cat, woman...")
    fill.add_argument("--count", type=int, default=200, help="how many images the bank should hold")

    commands.add_parser("train", help="fine-tune on a folder of photos (see: studio train --help)", add_help=False)
    commands.add_parser("sample", help="sample prompts from trained weights (see: studio sample --help)",
                        add_help=False)
    return parser


def with_thread_option(extra: list[str], settings_loader: Callable[[], Settings]) -> list[str]:
    """``studio train``/``sample`` arguments with ``--threads`` from STUDIO_WORKER_THREADS unless they give it."""
    if any(arg == "--threads" or arg.startswith("--threads=") for arg in extra):
        return extra
    from worker.settings import worker_settings_from

    threads = worker_settings_from(settings_loader()).worker_threads
    return [*extra, "--threads", str(threads)] if threads else extra


def run_passthrough(command: str, extra: list[str], settings_loader: Callable[[], Settings] = get_settings) -> int:
    if command in ("train", "sample"):
        from worker.engine.cli import main as engine_main  # torch is imported here, not before

        return int(engine_main([command, *with_thread_option(extra, settings_loader)]))
    if command == "worker":
        return subprocess.call(worker_command(extra))
    return subprocess.call(beat_command(settings_loader(), extra))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``studio`` command; returns its exit status. Invalid settings are one clear line, not a traceback."""
    try:
        return _run(argv)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        print(f"studio: the STUDIO_* settings are invalid: {problems}", file=sys.stderr)
        return EXIT_ERROR


def _run(argv: Sequence[str] | None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in PASSTHROUGH_COMMANDS:
        try:
            return run_passthrough(arguments[0], arguments[1:])
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    args = build_parser().parse_args(arguments)
    if args.command == "migrate":
        run_migrations(get_settings())
        print("The database schema is up to date.")
        return EXIT_OK
    if args.command == "createuser":
        from app.accounts.service import AccountError

        try:
            created = create_user(args.email, read_new_password(args.password_stdin), operator=args.operator)
        except (AccountError, ValueError) as error:
            print(f"studio createuser: {error}", file=sys.stderr)
            return EXIT_ERROR
        print(f"Created the {'operator ' if args.operator else ''}account {created}.")
        return EXIT_OK
    if args.command == "grant-operator":
        try:
            changed = grant_operator(args.email, revoke=args.revoke)
        except ValueError as error:
            print(f"studio grant-operator: {error}", file=sys.stderr)
            return EXIT_ERROR
        print(f"{changed} {'is no longer' if args.revoke else 'is now'} an operator.")
        return EXIT_OK
    if args.command == "priors":
        return fill_priors(args.model, args.class_noun, args.count)
    if args.command == "web":
        import uvicorn

        if args.workers < 1:
            print("studio web: --workers must be at least 1", file=sys.stderr)
            return EXIT_ERROR
        clear_metrics_folder()
        uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, reload=args.reload,
                    workers=None if args.reload else args.workers, **WEB_SERVER_OPTIONS)
        return EXIT_OK
    if args.command == "up":
        return up(get_settings(), args.host, args.port, with_worker=not args.no_worker, with_beat=not args.no_beat)
    raise AssertionError(f"unhandled command {args.command}")  # argparse refuses unknown commands


if __name__ == "__main__":
    sys.exit(main())
