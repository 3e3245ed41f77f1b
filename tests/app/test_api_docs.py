"""docs/api.md, executed: every ``curl`` of the walkthrough runs, in order, against the app, and its
answer must match what the page shows under it.

The page is read as a sequence of ``sh`` blocks. Each ``curl`` in them is sent through the in-process
app (method, path, headers, JSON, multipart fields and photo files as written); the first
backticked status after the block (`201 Created`) must be the answer's, and the first ``json`` block
after it must describe the answer: the same fields (a ``"…"`` key stands for fields the page cut),
the same ids where the page reuses them (the page's ids are mapped to the run's as they appear), and
the same values for the fields that do not depend on the run (messages, labels, flags, names).

The worker's tasks run in this process on a fake engine, when the page first needs their results
(the pictures, the model, another "generate more"), so a job the page shows waiting in line still
waits when its example runs. ``$JOB2``, the second studio the cancel example uses, is created the
way step 3 creates Rex's.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from app import queue
from app.config import BaseModelOption, Settings
from app.main import create_app
from app.models import OutgoingEmail
from app.storage import LocalStorage
from tests.app import photo_factory
from tests.worker.fakes import FakeEngine, FakeResult
from worker.settings import worker_settings_from
from worker.tasks.engine_adapter import GenerationInputs
from worker.tasks.generation import run_generation_job
from worker.tasks.runtime import WorkerContext
from worker.tasks.training import run_training_job

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TOKEN = re.compile(r"studio_[A-Za-z0-9_-]{20,}")
CUT = "…"
# Fields whose values the page shows as they are, whatever the run: messages, labels, flags, names.
SAME_VALUE = {"detail", "email", "name", "kind", "class_noun", "label", "variant", "method",
              "base_model", "key", "default", "licence", "title", "favourite", "images_per_prompt", "prompts"}
# A job's state is the page's only where the run reproduces it exactly: waiting in line, or cancelled.
JOB_STATE = {"status", "stage", "stage_label", "finished", "queue_position", "stages", "demo_model"}
REPRODUCED_STATES = {"queued", "cancelled"}
# Tokens the page takes from a message's link (``export CONFIRM_TOKEN=…``): the run takes them from the
# studio's outbox, the newest message whose link has this path.
EMAILED_TOKENS = {"CONFIRM_TOKEN": "/verify-email?token=", "RESET_TOKEN": "/password/reset?token="}
# The operator's base models of the recorded run (the page's step 3 lists them).
BASE_MODELS = [
    BaseModelOption(key="tiny", name="Tiny SD (demo)", spec="tiny", licence="CreativeML OpenRAIL-M",
                    licence_url="https://huggingface.co/spaces/CompVis/stable-diffusion-license"),
    BaseModelOption(key="tiny-xl", name="Tiny SDXL (demo)", spec="tiny-sdxl", licence="CreativeML Open RAIL++-M"),
]


@dataclass
class Example:
    """One ``curl`` of the page, with the status and the JSON written under its block."""

    command: list[str]
    status: int | None
    answer: Any
    line: int


def examples(text: str) -> Iterator[tuple[list[str], dict[str, str]] | Example]:
    """The page's ``export`` lines (as (name, value) pairs) and ``curl`` examples, in order."""
    blocks = list(re.finditer(r"```(\w*)\n(.*?)```", text, re.S))
    for index, block in enumerate(blocks):
        if block.group(1) != "sh":
            continue
        following = blocks[index + 1:]
        until = next((later.start() for later in following if later.group(1) == "sh"), len(text))
        prose = text[block.end():until]
        # The status opens a line of its own: "`201 Created`", "`200`, `Content-Type: image/png`".
        status = next((int(code) for code in re.findall(r"^`(\d{3})\b[^`]*`", prose, re.M)), None)
        answer_block = next((later for later in following if later.start() < until and later.group(1) == "json"), None)
        answer = json.loads(answer_block.group(2)) if answer_block is not None else None
        line = text.count("\n", 0, block.start()) + 1
        script = block.group(2).replace("\\\n", " ")
        for raw in script.splitlines():
            words = shlex.split(raw, comments=True)
            if not words:
                continue
            if words[0] == "export":
                name, _, value = words[1].partition("=")
                yield [], {name: value}
            elif words[0] == "curl":
                yield Example(command=words, status=status, answer=answer, line=line)


@dataclass
class Run:
    """The walkthrough's state: the client, the page's ids mapped to the run's, the tasks not run yet."""

    client: TestClient
    ctx: WorkerContext
    folder: Path
    variables: dict[str, str] = field(default_factory=dict)
    mapped: dict[str, str] = field(default_factory=dict)
    pending: list[tuple[str, str]] = field(default_factory=list)

    def expand(self, word: str) -> str:
        for name, value in sorted(self.variables.items(), key=lambda item: -len(item[0])):
            word = word.replace("${" + name + "}", value).replace("$" + name, value)
        for recorded, actual in self.mapped.items():
            word = word.replace(recorded, actual)
        return word

    def run_pending(self) -> None:
        """What a worker would have done by now: each queued job, in the order it was sent."""
        while self.pending:
            name, job_id = self.pending.pop(0)
            runner = run_training_job if name == "training.run" else run_generation_job
            assert runner(uuid.UUID(job_id), ctx=self.ctx, engine=DocsEngine()) in ("done", "skipped"), name


class DocsEngine(FakeEngine):
    """The fake engine, writing the kohya-named LoRA too, as the real one does for SD 1.x/2.x."""

    def train(self, inputs: Any, model: Any, progress: Any, should_cancel: Any) -> FakeResult:
        result = super().train(inputs, model, progress, should_cancel)
        (result.run_dir / "lora_kohya.safetensors").write_bytes(b"kohya weights")
        return result

    def generate(self, inputs: GenerationInputs, model: Any, progress: Any, should_cancel: Any) -> Any:
        return super().generate(inputs, model, progress, should_cancel)


def request_of(run: Run, words: list[str]) -> tuple[str, str, dict[str, str], dict[str, Any]]:
    """The curl words as (method, path, headers, httpx keyword arguments)."""
    method, url, headers = "GET", "", {}
    fields: list[tuple[str, str]] = []
    files: list[tuple[str, tuple[str, bytes, str]]] = []
    body: str | None = None
    position = 1
    while position < len(words):
        word = run.expand(words[position])
        if word == "-X":
            method = run.expand(words[position + 1])
            position += 1
        elif word == "-H":
            name, _, value = run.expand(words[position + 1]).partition(":")
            headers[name.strip()] = value.strip()
            position += 1
        elif word == "-d":
            body = run.expand(words[position + 1])
            method = "POST" if method == "GET" else method
            position += 1
        elif word == "-F":
            name, _, value = run.expand(words[position + 1]).partition("=")
            if value.startswith("@"):
                files.append((name, (value[1:], (run.folder / value[1:]).read_bytes(), "image/jpeg")))
            else:
                fields.append((name, value))
            method = "POST" if method == "GET" else method
            position += 1
        elif word in ("-o", "-w"):
            position += 1
        elif not word.startswith("-"):
            url = word
        position += 1
    assert url.startswith("/"), f"not a URL of the studio: {url}"
    options: dict[str, Any] = {}
    if body is not None:
        options["content"] = body.encode()
    if files or fields:
        options["files"] = files
        options["data"] = {}
        for name, value in fields:
            options["data"].setdefault(name, []).append(value)
    return method, url, headers, options


def record_ids(run: Run, recorded: Any, actual: Any) -> None:
    """Map each id (and token) the page shows to the run's, walking both answers side by side."""
    if isinstance(recorded, dict) and isinstance(actual, dict):
        for key, value in recorded.items():
            if key in actual:
                record_ids(run, value, actual[key])
    elif isinstance(recorded, list) and isinstance(actual, list):
        for each, other in zip(recorded, actual, strict=False):
            record_ids(run, each, other)
    elif isinstance(recorded, str) and isinstance(actual, str):
        for pattern in (UUID, TOKEN):
            for page_id, run_id in zip(pattern.findall(recorded), pattern.findall(actual), strict=False):
                assert run.mapped.setdefault(page_id, run_id) == run_id, f"{page_id} stands for two ids"


def compare(recorded: Any, actual: Any, where: str, errors: list[str], job_state: bool = True,
            exact: bool = True) -> None:
    """What the page shows against the answer: fields, and the values that do not depend on the run
    (``exact`` False below a job's state the run does not reproduce: only the fields count there)."""
    if isinstance(recorded, dict):
        if not isinstance(actual, dict):
            errors.append(f"{where}: the page shows an object, the answer is {actual!r:.80}")
            return
        shown = {key for key in recorded if key != CUT}
        if CUT not in recorded and set(actual) - shown:
            errors.append(f"{where}: the answer has fields the page does not show: {sorted(set(actual) - shown)}")
        if isinstance(recorded.get("status"), str):
            job_state = recorded["status"] in REPRODUCED_STATES
        for key in sorted(shown):
            if key not in actual:
                errors.append(f"{where}: the page shows {key!r}, the answer has no such field")
                continue
            deeper = exact and (key not in JOB_STATE or job_state)
            if deeper and (key in SAME_VALUE or key in JOB_STATE) and (
                    key == "prompts" or not isinstance(recorded[key], (dict, list))):
                if recorded[key] != actual[key] and not _is_cut(recorded[key]):
                    errors.append(f"{where}.{key}: the page shows {recorded[key]!r}, the answer {actual[key]!r}")
            else:
                compare(recorded[key], actual[key], f"{where}.{key}", errors, job_state, deeper)
    elif isinstance(recorded, list):
        if not isinstance(actual, list):
            errors.append(f"{where}: the page shows a list, the answer is {actual!r:.80}")
            return
        listed = [each for each in recorded if not _is_cut(each)]
        if listed and actual:
            compare(listed[0], actual[0], f"{where}[0]", errors, job_state, exact)


def _is_cut(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(CUT)


@pytest.fixture
def docs_app(settings: Settings, clean_db: Engine) -> FastAPI:
    return create_app(settings.model_copy(update={"base_models": BASE_MODELS}))


def test_the_api_walkthrough_runs_as_written(
    docs_app: FastAPI, clean_db: Engine, settings: Settings, tmp_path: Path
) -> None:
    for index in range(1, 5):
        (tmp_path / f"rex-{index}.jpg").write_bytes(photo_factory.make_photo(60 + index))
    worker = worker_settings_from(settings).model_copy(update={"progress_write_seconds": 0.0,
                                                               "cancel_poll_seconds": 0.0})
    storage = docs_app.state.storage
    assert isinstance(storage, LocalStorage)
    ctx = WorkerContext(settings=worker, storage=storage, worker_id="docs-worker",
                        sessions=sessionmaker(bind=clean_db, expire_on_commit=False))
    sent: list[tuple[str, str]] = []
    # Jobs for the worker; the clean-up tasks a deletion sends have nothing to show here.
    queue.set_sender(lambda name, kwargs, queue_name: sent.append((name, kwargs["job_id"])) if "job_id" in kwargs
                     else None)
    ran = 0
    try:
        with TestClient(docs_app, base_url="http://localhost") as client:
            run = Run(client=client, ctx=ctx, folder=tmp_path)
            for item in examples(DOC.read_text(encoding="utf-8")):
                if isinstance(item, tuple):
                    for name, value in item[1].items():
                        if name in EMAILED_TOKENS:
                            run.variables[name] = emailed_token(ctx, EMAILED_TOKENS[name])
                        else:
                            run.variables[name] = "" if name == "STUDIO" else run.expand(value)
                    continue
                if any("$JOB2" in word for word in item.command) and "JOB2" not in run.variables:
                    run.variables["JOB2"] = second_studio_job(run)
                method, url, headers, options = request_of(run, item.command)
                if re.search(r"/(images|model|download\.zip|generate|more|previews)\b", url):
                    run.pending.extend(sent)
                    sent.clear()
                    run.run_pending()
                response = client.request(method, url, headers=headers, **options)
                run.pending.extend(sent)
                sent.clear()
                ran += 1
                where = f"docs/api.md:{item.line} {method} {url}"
                expected = item.status
                if expected is None and not (isinstance(item.answer, dict) and set(item.answer) == {"detail"}):
                    expected = 200
                if expected is not None:
                    assert response.status_code == expected, f"{where}: {response.status_code} {response.text[:300]}"
                else:
                    assert response.status_code >= 400, f"{where}: {response.status_code}"
                if item.answer is not None:
                    # A ZIP's JSON on the page is its manifest.json.
                    actual = (json.loads(zipfile.ZipFile(io.BytesIO(response.content)).read("manifest.json"))
                              if response.headers["content-type"] == "application/zip" else response.json())
                    record_ids(run, item.answer, actual)
                    errors: list[str] = []
                    compare(item.answer, actual, where, errors)
                    assert errors == [], "\n".join(errors)
    finally:
        queue.set_sender(None)
    assert ran >= 22  # the whole walkthrough ran, not a page that lost its examples


def emailed_token(ctx: WorkerContext, link_path: str) -> str:
    """The token of the newest message in the outbox whose link has ``link_path`` (the mail task does
    not run here, so every message stays in the outbox)."""
    with ctx.sessions() as session:
        bodies = session.scalars(select(OutgoingEmail.text_body).order_by(OutgoingEmail.created_at.desc())).all()
    for body in bodies:
        found = re.search(re.escape(link_path) + r"([^\s&\"<>]+)", body)
        if found:
            return found.group(1)
    raise AssertionError(f"no message in the outbox has a {link_path} link")


def second_studio_job(run: Run) -> str:
    """``$JOB2``: a second studio made as step 3 makes Rex's; its training job waits behind Rex's."""
    files = [("photos", (f"rex-{index}.jpg", (run.folder / f"rex-{index}.jpg").read_bytes(), "image/jpeg"))
             for index in range(1, 5)]
    response = run.client.post("/api/v1/subjects", headers={"Authorization": run.variables["AUTH"].split(": ", 1)[1]},
                               data={"name": "Bella", "kind": "dog", "consent": "true"}, files=files)
    assert response.status_code == 201, response.text
    return str(response.json()["job"]["id"])
