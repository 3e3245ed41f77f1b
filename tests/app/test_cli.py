"""The ``studio`` command: argument handling, migrate, createuser, and how ``up`` runs its children."""

from __future__ import annotations

import io
import signal
import sys
import types
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.orm import Session

from app import cli
from app.config import Settings
from app.models import User
from app.security import verify_password


@pytest.fixture
def fresh_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings on a var/ with no database yet, as on a fresh machine."""
    values = Settings(environment="test", var_dir=tmp_path / "fresh-var", secret_key="x" * 40)
    monkeypatch.setattr(cli, "get_settings", lambda: values)
    return values


def test_migrate_builds_the_schema_on_a_fresh_machine(fresh_settings: Settings,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["migrate"]) == 0
    engine = create_engine(fresh_settings.resolved_database_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"users", "subjects", "jobs", "alembic_version"} <= tables
    assert "up to date" in capsys.readouterr().out
    assert cli.main(["migrate"]) == 0  # running it again changes nothing


def test_createuser_from_stdin(settings: Settings, clean_db: object, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a very long password\n"))
    assert cli.main(["createuser", "Admin@Example.com", "--password-stdin"]) == 0
    assert "Created the account admin@example.com" in capsys.readouterr().out
    with Session(create_engine(settings.resolved_database_url)) as session:
        user = session.scalars(select(User)).one()
    assert user.email == "admin@example.com"
    assert verify_password(user.password_hash, "a very long password")
    assert user.email_verified_at is not None  # the operator vouches for the address

    monkeypatch.setattr(sys, "stdin", io.StringIO("another long password\n"))
    assert cli.main(["createuser", "admin@example.com", "--password-stdin"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_operators_are_created_or_granted(settings: Settings, clean_db: object, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a very long password\n"))
    assert cli.main(["createuser", "op@example.com", "--password-stdin", "--operator"]) == 0
    assert "Created the operator account op@example.com" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("a very long password\n"))
    assert cli.main(["createuser", "ann@example.com", "--password-stdin"]) == 0
    assert cli.main(["grant-operator", "Ann@Example.com"]) == 0
    assert "is now an operator" in capsys.readouterr().out
    assert cli.main(["grant-operator", "op@example.com", "--revoke"]) == 0
    assert cli.main(["grant-operator", "nobody@example.com"]) == 1
    assert "no account with the email" in capsys.readouterr().err
    with Session(create_engine(settings.resolved_database_url)) as session:
        roles = {row[0]: row[1] for row in session.execute(select(User.email, User.is_operator))}
    assert roles == {"op@example.com": False, "ann@example.com": True}


def test_priors_fill_names_a_bad_class(settings: Settings, clean_db: object,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # The filling itself (which loads a model) is tested in tests/worker/tasks/test_priors.py.
    assert cli.main(["priors", "fill", "--model", "tiny", "--class", "d0g", "--count", "5"]) == 1
    assert "The class must be a noun" in capsys.readouterr().err


def test_createuser_refuses_a_short_password(settings: Settings, clean_db: object, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert cli.main(["createuser", "a@example.com", "--password-stdin"]) == 1
    assert "at least 10 characters" in capsys.readouterr().err


def test_createuser_prompt_must_match(settings: Settings, clean_db: object, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    answers = iter(["first long password", "second long password"])
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: next(answers))
    assert cli.main(["createuser", "a@example.com"]) == 1
    assert "differ" in capsys.readouterr().err


def test_argument_parsing() -> None:
    parser = cli.build_parser()
    web = parser.parse_args(["web", "--port", "9000", "--reload"])
    assert (web.command, web.host, web.port, web.reload) == ("web", "127.0.0.1", 9000, True)
    up = parser.parse_args(["up", "--no-beat"])
    assert (up.no_beat, up.no_worker, up.port) == (True, False, 8000)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    with pytest.raises(SystemExit):
        parser.parse_args(["web", "--port", "eighty"])


def test_worker_and_beat_commands(fresh_settings: Settings) -> None:
    default = cli.worker_command([])
    assert default[:3] == [sys.executable, "-m", "celery"]
    assert default[default.index("-Q") + 1] == "gpu,cpu"
    own_queue = cli.worker_command(["-Q", "cpu", "-c", "4"])
    assert own_queue.count("-Q") == 1 and own_queue[-4:] == ["-Q", "cpu", "-c", "4"]
    assert "gpu,cpu" not in cli.worker_command(["--queues=gpu"])
    beat = cli.beat_command(fresh_settings)
    assert beat[beat.index("--schedule") + 1].endswith("celerybeat-schedule")
    assert cli.web_command("0.0.0.0", 8080)[-6:] == ["app.main:create_app", "--host", "0.0.0.0", "--port", "8080",
                                                     "--no-proxy-headers"]


def test_worker_options_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_call(command: list[str]) -> int:
        calls.append(command)
        return 0

    monkeypatch.setattr(cli.subprocess, "call", fake_call)
    assert cli.main(["worker", "-c", "2", "--loglevel", "DEBUG"]) == 0
    assert calls[0][-4:] == ["-c", "2", "--loglevel", "DEBUG"] and "gpu,cpu" in calls[0]


def test_train_and_sample_go_to_the_engine_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []
    def fake_main(argv: list[str]) -> int:
        received.append(list(argv))
        return 7

    fake = types.ModuleType("worker.engine.cli")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "worker.engine.cli", fake)
    assert cli.main(["train", "--photos", "dir", "--steps", "3"]) == 7
    assert cli.main(["sample", "--help"]) == 7
    assert received == [["train", "--photos", "dir", "--steps", "3"], ["sample", "--help"]]


def test_web_runs_the_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(app=app, **options))
    assert cli.main(["web", "--host", "0.0.0.0", "--port", "8123", "--workers", "3"]) == 0
    assert seen["app"] == "app.main:create_app" and seen["factory"] is True
    assert (seen["host"], seen["port"], seen["workers"]) == ("0.0.0.0", 8123, 3)
    # Forwarded headers are believed by the app from STUDIO_TRUSTED_PROXIES only, never by uvicorn.
    assert seen["proxy_headers"] is False
    assert cli.main(["web", "--workers", "0"]) == 1


class FakeProcess:
    """A child that exits when signalled (or by itself after ``lifetime`` polls)."""

    def __init__(self, command: list[str], lifetime: int | None = None, code: int = 0, slow_stop: bool = False) -> None:
        self.command = command
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.polls = 0
        self.lifetime = lifetime
        self.code = code
        self.stopping_since = 0
        self.slow_stop = slow_stop

    def poll(self) -> int | None:
        self.polls += 1
        if self.returncode is None and self.lifetime is not None and self.polls >= self.lifetime:
            self.returncode = self.code
        return self.poll_after_signal()

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        # Like a Celery worker's warm shutdown, stopping takes a moment: the first poll still sees it running.
        self.stopping_since = self.polls

    def poll_after_signal(self) -> int | None:
        # A slow child is still shutting down whenever it is polled; only wait() sees it finish.
        if self.returncode is None and self.signals and not self.slow_stop and self.polls > self.stopping_since + 1:
            self.returncode = -self.signals[0]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self.signals:
            self.returncode = -self.signals[0]
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def test_up_migrates_then_runs_web_worker_and_beat(fresh_settings: Settings) -> None:
    started: list[FakeProcess] = []

    def spawner(command: list[str]) -> FakeProcess:
        # The worker dies on its own after a few polls: up stops the others and reports its status.
        process = FakeProcess(command, lifetime=3, code=3) if "gpu" in command else FakeProcess(command)
        started.append(process)
        return process

    code = cli.up(fresh_settings, "127.0.0.1", 8765, with_worker=True, with_beat=True,
                  spawner=spawner)  # type: ignore[arg-type]
    assert code == 3
    assert fresh_settings.broker_dir.is_dir() and fresh_settings.scratch_dir.is_dir()
    assert (fresh_settings.var_dir / "studio.db").exists()  # migrated before anything started
    web, worker, maintenance, beat = (process.command for process in started)
    assert "app.main:create_app" in web and "8765" in web
    # Jobs in one worker, one at a time; maintenance in a second, so it never waits behind a training.
    assert worker[worker.index("-c") + 1] == "1" and worker[worker.index("-Q") + 1] == "gpu"
    assert maintenance[maintenance.index("-Q") + 1] == "cpu" and maintenance[maintenance.index("-c") + 1] == "1"
    assert worker[worker.index("-n") + 1] != maintenance[maintenance.index("-n") + 1]
    assert "beat" in beat
    assert [started[index].signals for index in (0, 2, 3)] == [[signal.SIGTERM]] * 3


def test_up_forwards_ctrl_c_once(fresh_settings: Settings) -> None:
    started: list[FakeProcess] = []
    supervisor_holder: dict[str, cli.Supervisor] = {}

    class InterruptingProcess(FakeProcess):
        def poll(self) -> int | None:
            # Simulate Ctrl-C arriving while up waits: the handler installed by up is the supervisor's.
            if self.polls == 1 and "web" not in supervisor_holder:
                handler = signal.getsignal(signal.SIGINT)
                assert callable(handler)
                supervisor_holder["web"] = handler.__self__  # type: ignore[attr-defined]
                handler(signal.SIGINT, None)
            return super().poll()

    def spawner(command: list[str]) -> FakeProcess:
        process = InterruptingProcess(command, slow_stop=True) if not started else FakeProcess(command)
        started.append(process)
        return process

    before = signal.getsignal(signal.SIGINT)
    code = cli.up(fresh_settings, "127.0.0.1", 8766, with_worker=True, with_beat=False,
                  spawner=spawner)  # type: ignore[arg-type]
    assert code == 0  # Ctrl-C is how `studio up` ends: `make up` then reports no error
    assert [process.signals for process in started] == [[signal.SIGTERM]] * 3
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_invalid_settings_are_one_clear_line(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "get_settings", lambda: Settings(environment="production", secret_key="short"))
    assert cli.main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("studio: the STUDIO_* settings are invalid:") and "at least 32 characters" in err


def test_the_access_log_leaves_out_the_status_polls() -> None:
    import logging

    from app.access_log import QuietPolling

    def record(method: str, path: str, status: int) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5000", method, path, "1.1", status), None)

    job = "/api/v1/jobs/0b7c1f1e-3c1f-4f7e-9a55-2f1c3e0d9a10"
    quiet = QuietPolling()
    assert not quiet.filter(record("GET", job, 200))
    assert quiet.filter(record("GET", job, 500))  # a failing poll is worth a line
    assert quiet.filter(record("POST", "/studios/new", 303))
    assert quiet.filter(record("GET", job + "/previews/0?v=abc", 200))


def test_studio_train_takes_its_threads_from_the_worker_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(environment="test")
    monkeypatch.setenv("STUDIO_WORKER_THREADS", "3")
    assert cli.with_thread_option(["--steps", "5"], lambda: settings) == ["--steps", "5", "--threads", "3"]
    assert cli.with_thread_option(["--threads", "1"], lambda: settings) == ["--threads", "1"]
    monkeypatch.delenv("STUDIO_WORKER_THREADS")
    assert cli.with_thread_option([], lambda: settings) == []  # the engine chooses from the cores
