"""A fake engine with the real engine's shape and file layout, fast enough for many pipeline tests.

It writes a prior bank (``bank_root/<key>/00000.png`` + ``meta.json``), checkpoints under
``work_dir/run/checkpoints/step-N`` (resuming from the latest one there, like the real trainer),
weights and ``run.json`` in ``work_dir/run``, and one PNG per image. ``on_step`` lets a test act
in the middle of training (request a cancel, steal the lease, kill the "worker").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from worker.engine.errors import Cancelled
from worker.engine.progress import CancelCheck, Progress, ProgressCallback
from worker.engine.spec import JobSpec
from worker.tasks.engine_adapter import GenerationInputs


@dataclass(frozen=True)
class FakeFamily:
    name: str
    label: str


SD_FAMILY = FakeFamily("sd", "Stable Diffusion 1.x/2.x")
SDXL_FAMILY = FakeFamily("sdxl", "Stable Diffusion XL")


@dataclass
class FakeModel:
    spec: str
    fingerprint: str
    is_demo: bool = True
    family: FakeFamily = SD_FAMILY


@dataclass
class FakeSample:
    path: Path
    prompt: str
    seed: int
    steps: int = 5
    guidance: float = 7.5


@dataclass
class FakeScores:
    dino: float | None
    clip_i: float | None
    clip_t: float | None


@dataclass
class FakeTrain:
    final_step: int
    resumed_from: int | None


@dataclass
class FakeResult:
    identifier: str
    class_prompt: str
    run_dir: Path
    images: list[FakeSample]
    scores: list[FakeScores]
    prior_generated: int
    prior_reused: int
    train: FakeTrain
    instance_prompt: str = ""
    face_distances: list[float | None] = field(default_factory=list)


def _png(path: Path, colour: tuple[int, int, int], size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


@dataclass
class FakeEngine:
    steps: int = 6
    checkpoint_every: int = 2
    preview_every: int = 3
    prior_images: int = 3
    on_step: Callable[[int], None] | None = None
    fail_with: BaseException | None = None  # raised halfway through training, or while sampling more
    fail_times: int | None = None  # how many runs raise ``fail_with``; None: every one
    calls: list[str] = field(default_factory=list)
    started_at_steps: list[int] = field(default_factory=list)
    inputs_seen: list[JobSpec | GenerationInputs] = field(default_factory=list)
    memory_freed: int = 0
    # A person's run records these upload faces (default: one made-up descriptor), and "generate
    # more" returns these pictures first (real photos, to be scored by the real face model).
    face_references: list[list[float]] | None = None
    more_pictures: list[Image.Image] = field(default_factory=list)

    def _should_fail(self) -> bool:
        failed_runs = sum(1 for call in self.calls if call.startswith("failed"))
        return self.fail_with is not None and (self.fail_times is None or failed_runs < self.fail_times)

    def free_memory(self) -> None:
        self.memory_freed += 1

    def load_model(self, spec: str) -> FakeModel:
        self.calls.append(f"load:{spec}")
        # Like the real engine, the family comes from what is loaded: here, from the spec's name.
        family = SDXL_FAMILY if "sdxl" in spec.lower() else SD_FAMILY
        return FakeModel(spec=spec, fingerprint=f"fp-{spec}", family=family)

    def train(self, inputs: JobSpec, model: Any, progress: ProgressCallback,
              should_cancel: CancelCheck) -> FakeResult:
        self.calls.append("train")
        self.inputs_seen.append(inputs)
        progress(Progress(stage="preparing", step=len(inputs.photos), total=len(inputs.photos)))
        assert all(path.is_file() for path in inputs.photos)
        generated, reused = self._fill_bank(inputs, model, progress)
        run_dir = inputs.work_dir / "run"
        start = self._latest_checkpoint(run_dir)
        self.started_at_steps.append(start)
        for step in range(start + 1, self.steps + 1):
            if should_cancel():
                raise Cancelled("cancelled by the caller")
            if step == self.steps // 2 and self._should_fail():
                self.calls.append("failed:train")
                assert self.fail_with is not None
                raise self.fail_with
            event = Progress(stage="training", step=step, total=self.steps, loss=1.0 / step)
            if self.checkpoint_every and step % self.checkpoint_every == 0:
                folder = run_dir / "checkpoints" / f"step-{step:06d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "training_state.json").write_text(json.dumps({"step": step}))
                event.checkpoint = folder
            if self.preview_every and step % self.preview_every == 0:
                event.previews = [_png(inputs.work_dir / "previews" / f"{step}.png", (0, step * 10 % 255, 0))]
            progress(event)
            if self.on_step is not None:
                self.on_step(step)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
        # A person's run keeps the uploads' faces, as the engine's does (one made-up descriptor here).
        references = self.face_references or [[0.0] * 128]
        run_info = {"faces": {"references": references}} if inputs.subject_kind == "person" else {}
        (run_dir / "run.json").write_text(json.dumps({"resumed_from": start or None, "run_info": run_info}))
        identifier = "qzx"
        samples = []
        prompts = [p.replace("{subject}", f"{identifier} {inputs.class_noun}") for p in inputs.prompts]
        total = len(prompts) * inputs.images_per_prompt
        for index in range(total):
            if should_cancel():
                raise Cancelled("cancelled by the caller")
            path = _png(inputs.work_dir / "samples" / f"sample-{index}.png", (200, index * 30 % 255, 0), size=24)
            samples.append(FakeSample(path=path, prompt=prompts[index // inputs.images_per_prompt], seed=index))
            progress(Progress(stage="sampling", step=index + 1, total=total))
        scores = [FakeScores(dino=0.1 * (index % 3), clip_i=0.5, clip_t=0.3) for index in range(total)]
        # A person's pictures: the first has no face, the others are ever closer matches.
        faces: list[float | None] = ([None, *(0.6 - 0.1 * index for index in range(1, total))]
                                     if inputs.subject_kind == "person" else [])
        return FakeResult(identifier=identifier, class_prompt=f"a photo of a {inputs.class_noun}", run_dir=run_dir,
                          images=samples, scores=scores, prior_generated=generated, prior_reused=reused,
                          train=FakeTrain(final_step=self.steps, resumed_from=start or None), face_distances=faces)

    def _fill_bank(self, inputs: JobSpec, model: Any, progress: ProgressCallback) -> tuple[int, int]:
        key = f"bank-{model.fingerprint}-{inputs.class_noun}"
        folder = inputs.bank_root / key
        folder.mkdir(parents=True, exist_ok=True)
        generated = reused = 0
        for index in range(self.prior_images):
            path = folder / f"{index:05d}.png"
            if path.exists():
                reused += 1
            else:
                _png(path, (index * 40 % 255, 0, 200))
                generated += 1
            progress(Progress(stage="priors", step=index + 1, total=self.prior_images, reused=reused))
        meta = {"model_fingerprint": model.fingerprint, "class_prompt": f"a photo of a {inputs.class_noun}",
                "resolution": 64, "sampler": "dpmsolver++", "steps": 5, "guidance": 7.5, "key": key,
                "images": self.prior_images}
        (folder / "meta.json").write_text(json.dumps(meta))
        return generated, reused

    @staticmethod
    def _latest_checkpoint(run_dir: Path) -> int:
        folder = run_dir / "checkpoints"
        steps = [int(path.name.split("-")[1]) for path in folder.glob("step-*")] if folder.is_dir() else []
        return max(steps, default=0)

    def generate(self, inputs: GenerationInputs, model: Any, progress: ProgressCallback,
                 should_cancel: CancelCheck) -> Sequence[FakeSample]:
        self.calls.append("generate")
        self.inputs_seen.append(inputs)
        assert (inputs.run_dir / "pytorch_lora_weights.safetensors").is_file()
        if self._should_fail():
            self.calls.append("failed:generate")
            assert self.fail_with is not None
            raise self.fail_with
        samples = []
        total = len(inputs.prompts) * inputs.images_per_prompt
        for index in range(total):
            if should_cancel():
                raise Cancelled("cancelled by the caller")
            template = inputs.prompts[index // inputs.images_per_prompt]
            path = _png(inputs.out_dir / f"more-{index}.png", (0, 0, index * 30 % 255), size=24)
            if index < len(self.more_pictures):
                self.more_pictures[index].save(path)
            prompt = template.replace("{subject}", f"{inputs.identifier} {inputs.class_noun}")
            samples.append(FakeSample(path=path, prompt=prompt, seed=index))
            progress(Progress(stage="sampling", step=index + 1, total=total))
        return samples
