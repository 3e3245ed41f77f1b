"""Training benchmark: optimizer steps per second and peak memory of the DreamBooth loop.

Configurations (all LoRA rank 16 + prior preservation, batch 1 instance + 1 class, unless named):

- CPU: the built-in ``tiny`` model (64 px) and ``medium``, an SD-shaped model defined here
  (128 px, a 3-level UNet of 64/128/256 channels, a 4-level VAE of 64/128/256/256 channels,
  a 4-layer text encoder), each with cached latents (the engine's default) and uncached
  (every step re-encodes the images through the VAE, as diffusers' ``train_dreambooth_lora.py``
  does).
- CPU, per family: ``tiny-sdxl`` (SDXL's layout at 64 px), and both tiny models with bank-free
  preservation (``prior_source="base_model"``: the class half's targets are the frozen base
  model's predictions, one more no-grad forward a step, no class images).
- CUDA, when present: ``sd15-arch`` (the real SD 1.5 architecture, random weights) at 512 px in
  bf16: LoRA cached, LoRA uncached and a full fine-tune, all with prior preservation; ``sdxl-arch``
  (SDXL base's real sizes) at 1024 px: LoRA + prior, LoRA + bank-free preservation, and LoRA + prior
  with gradient checkpointing (the 24 GB-card setting); ``flux2-klein-arch`` and ``zimage-arch`` at
  1024 px with LoRA + prior and LoRA + bank-free preservation, and with the 24 GB-card settings
  (int8 base, gradient checkpointing); their tiny models have CPU rows too.
  CUDA rows add the FLOPs of one step
  (``bench/flops.py``, counted on the meta device) and the share of the GPU's dense bf16 peak that
  the measured speed implies.

Each configuration runs in a fresh process, so its peak memory is its own: on CUDA the peak
allocated by PyTorch, on the CPU the process's peak resident set (which includes the ~0.5 GB
of the imported libraries). Steps/s is measured over the training loop after ``--warmup``
steps; "setup" is the wall time before the loop (copying the model, encoding and caching latents).

On a CPU shared with other work, wall-clock rates swing with the load, so CPU runs use
``--threads`` PyTorch threads (default 1) and also report steps per CPU-second of the process,
which the load hardly moves; the cached/uncached speed-up is computed from that column.

A second table times whole jobs through ``worker.engine.job.run_job`` (4 photos, pet recipe
"fast", 24 gallery images = 6 prompts x 4): class-prior generation (images/s, DPM-Solver++
25 steps with guidance), training and sampling, first with an empty prior bank (cold) and then
again with the bank filled (warm: 0 priors generated). On the CPU this uses ``tiny``; on CUDA
``sd15-arch`` at 512 px.

    python bench/train.py [--steps 8] [--warmup 2] [--threads 1] [--only tiny-lora-cached,...]
                          [--no-jobs] [--job-priors K] [--beside torch|busy]
    python bench/train.py --beside-table [--repeat 1]

``--beside torch`` runs every measurement beside a second CPU-bound process, a PyTorch matmul loop on
2 threads (another worker, another PyTorch program); ``--beside busy`` beside a 1-thread busy loop
(the web process or the database at work). ``--beside-table`` times the command of the report that
found the problem, ``studio train --base-model tiny --steps 20 --prior-images 16``, with PyTorch's
default threads (one per core) and with the worker's choice (worker/engine/threads.py), alone and
beside each of those processes.

Prints the tables; the numbers go into docs/benchmarks.md by hand, with the machine and command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a built-in name, or "medium"
    resolution: int
    method: str
    cache_latents: bool
    cuda_only: bool = False
    prior_source: str = "bank"
    gradient_checkpointing: bool = False
    quantize_base: str = "none"


CASES = (
    Case("tiny-lora-cached", "tiny", 64, "lora", True),
    Case("tiny-lora-uncached", "tiny", 64, "lora", False),
    Case("medium-lora-cached", "medium", 128, "lora", True),
    Case("medium-lora-uncached", "medium", 128, "lora", False),
    Case("sd15-lora-cached", "sd15-arch", 512, "lora", True, cuda_only=True),
    Case("sd15-lora-uncached", "sd15-arch", 512, "lora", False, cuda_only=True),
    Case("sd15-full-cached", "sd15-arch", 512, "full", True, cuda_only=True),
    Case("tiny-sdxl-lora-cached", "tiny-sdxl", 64, "lora", True),
    Case("tiny-sdxl-lora-uncached", "tiny-sdxl", 64, "lora", False),
    Case("tiny-lora-bankfree", "tiny", 64, "lora", True, prior_source="base_model"),
    Case("tiny-sdxl-lora-bankfree", "tiny-sdxl", 64, "lora", True, prior_source="base_model"),
    Case("sdxl-lora-cached", "sdxl-arch", 1024, "lora", True, cuda_only=True),
    Case("sdxl-lora-bankfree", "sdxl-arch", 1024, "lora", True, cuda_only=True, prior_source="base_model"),
    Case("sdxl-lora-checkpointed", "sdxl-arch", 1024, "lora", True, cuda_only=True, gradient_checkpointing=True),
    Case("tiny-flux2-lora-cached", "tiny-flux2", 64, "lora", True),
    Case("tiny-zimage-lora-cached", "tiny-zimage", 64, "lora", True),
    Case("tiny-flux2-lora-bankfree", "tiny-flux2", 64, "lora", True, prior_source="base_model"),
    Case("tiny-zimage-lora-bankfree", "tiny-zimage", 64, "lora", True, prior_source="base_model"),
    Case("tiny-flux2-lora-int8", "tiny-flux2", 64, "lora", True, quantize_base="int8"),
    Case("flux2-klein-lora-cached", "flux2-klein-arch", 1024, "lora", True, cuda_only=True),
    Case("flux2-klein-lora-bankfree", "flux2-klein-arch", 1024, "lora", True, cuda_only=True,
         prior_source="base_model"),
    Case("zimage-lora-cached", "zimage-arch", 1024, "lora", True, cuda_only=True),
    Case("zimage-lora-bankfree", "zimage-arch", 1024, "lora", True, cuda_only=True, prior_source="base_model"),
    # The 24 GB-card settings: int8 base and gradient checkpointing (what a job picks on such a card).
    Case("flux2-klein-lora-int8", "flux2-klein-arch", 1024, "lora", True, cuda_only=True,
         gradient_checkpointing=True, quantize_base="int8"),
    Case("zimage-lora-int8", "zimage-arch", 1024, "lora", True, cuda_only=True,
         gradient_checkpointing=True, quantize_base="int8"),
)


def build_medium(device, dtype):  # type: ignore[no-untyped-def]
    """An SD-shaped model small enough for a CPU: same block layout, fewer channels, 128 px."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from worker.engine.families import FAMILIES
    from worker.engine.families.sd import SD_SCHEDULE, clip_text_encoder
    from worker.engine.models import BaseModel, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(clip_text_encoder(tokenizer, width=256, intermediate=1024, layers=4, heads=4,
                                                       vocab=None))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(64, 128, 256, 256),
                            layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=128)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=256, attention_head_dim=8)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(spec="bench-medium", family=FAMILIES["sd"],
                     modules={"text_encoder": text_encoder, "vae": vae, "unet": unet},
                     tokenizers={"tokenizer": tokenizer}, noise_scheduler=DDPMScheduler(**SD_SCHEDULE),
                     resolution=128, fingerprint="bench-medium", device=device, dtype=dtype)


def run_case(case: Case, steps: int, warmup: int, threads: int) -> dict[str, object]:
    """Train one configuration in this process and return its measurements."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(threads)

    from tests.worker.engine.conftest import make_subject_photo
    from worker.engine.models import build_builtin, select_device
    from worker.engine.progress import Progress
    from worker.engine.train import TrainConfig, train

    device, dtype = select_device()
    if case.model == "medium":
        model = build_medium(device, dtype)
    else:
        model = build_builtin(case.model, seed=0, device=device, dtype=dtype)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        size = (case.resolution * 5 // 4, case.resolution)
        photos = [make_subject_photo(folder / f"photo{i}.jpg", seed=i, size=size) for i in range(4)]
        classes = [make_subject_photo(folder / f"class{i}.jpg", seed=100 + i, size=size) for i in range(4)]
        config = TrainConfig(method=case.method, steps=warmup + steps, resolution=case.resolution, rank=16,
                             learning_rate=1e-4 if case.method == "lora" else 5e-6,
                             cache_latents=case.cache_latents, with_prior=True, prior_source=case.prior_source,
                             gradient_checkpointing=case.gradient_checkpointing, quantize_base=case.quantize_base)
        step_starts: list[float] = []
        cpu_starts: list[float] = []
        finished: list[float] = []
        cpu_finished: list[float] = []

        def at_step_start() -> bool:
            # Called by the loop before every step; the GPU is synchronised at the end of the
            # warm-up so the timed window starts with an idle GPU.
            if len(step_starts) == warmup and device.type == "cuda":
                torch.cuda.synchronize()
            step_starts.append(time.monotonic())
            cpu_starts.append(time.process_time())
            return False

        def on_progress(event: Progress) -> None:
            # The last step's event always goes out, after its loss was read back (a GPU sync).
            if event.step == event.total and not finished and step_starts:
                finished.append(time.monotonic())
                cpu_finished.append(time.process_time())

        started = time.monotonic()
        result = train(model, config, instance_images=photos, instance_prompt="a photo of sks dog",
                       class_images=classes, class_prompt="a photo of dog", run_dir=folder / "run",
                       progress=on_progress, should_cancel=at_step_start)
    setup = step_starts[0] - started
    loop = finished[0] - step_starts[warmup]
    cpu_loop = cpu_finished[0] - cpu_starts[warmup]
    step_flops = peak = None
    if device.type == "cuda" and case.model != "medium":
        from bench.flops import peak_tflops, training_step_flops

        try:
            step_flops = training_step_flops(case.model, case.resolution, case.method,
                                             prior_source=case.prior_source)
        except RuntimeError as exc:  # the LLM-encoded families do not run on the meta device yet
            print(f"{case.name}: no FLOP count ({exc})", file=sys.stderr)
        peak = peak_tflops(torch.cuda.get_device_name(device))
    return {
        "step_tflop": step_flops / 1e12 if step_flops else None,
        "share_of_peak": (step_flops * steps / loop / 1e12 / peak) if step_flops and peak else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "name": case.name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "resolution": case.resolution, "method": case.method, "cache_latents": case.cache_latents,
        "steps_per_second": steps / loop, "steps_per_cpu_second": steps / cpu_loop, "threads": threads,
        "peak_memory_mb": result.peak_memory_mb,
        "setup_seconds": setup, "final_loss": result.loss_history[-1],
    }


class StageClock:
    """A progress callback that times each stage from its first event to the next stage's first."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.started = 0.0
        self.seconds: dict[str, float] = {}

    def __call__(self, event: object) -> None:
        stage = str(getattr(event, "stage", ""))
        if stage != self.current:
            self.finish()
            self.current, self.started = stage, time.monotonic()

    def finish(self) -> dict[str, float]:
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + time.monotonic() - self.started
            self.current = None
        return self.seconds


def run_job_case(model_name: str, prior_images: int, threads: int) -> dict[str, object]:
    """A whole job, cold bank then warm bank, timed per stage from the engine's progress events."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(threads)

    from tests.worker.engine.conftest import make_subject_photo
    from worker.engine.job import JobSpec, run_job
    from worker.engine.models import build_builtin, select_device
    from worker.engine.prompts import STYLE_PACKS

    device, dtype = select_device()
    model = build_builtin(model_name, seed=0, device=device, dtype=dtype)
    row: dict[str, object] = {"name": f"{model_name} job", "device": str(device), "resolution": model.resolution}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        # Photos as a phone would give them: larger than the training resolution.
        side = max(256, model.resolution)
        photos = [make_subject_photo(folder / f"photo{i}.jpg", seed=i, size=(side * 5 // 4, side)) for i in range(4)]
        for run in ("cold", "warm"):
            clock = StageClock()
            spec = JobSpec(photos=photos, class_noun="dog", subject_kind="pet", work_dir=folder / f"work-{run}",
                           bank_root=folder / "bank", quality="fast", prior_images=prior_images,
                           prompts=list(STYLE_PACKS["pet-adventures"].prompts[:6]), images_per_prompt=4, score=False,
                           train_overrides={"checkpoint_every": 0, "preview_every": 0})
            started = time.monotonic()
            result = run_job(spec, model, progress=clock)
            if device.type == "cuda":
                torch.cuda.synchronize()
            total = time.monotonic() - started
            stage_seconds = clock.finish()
            row[f"{run}_seconds"] = total
            row[f"{run}_priors_generated"] = result.prior_generated
            row[f"{run}_priors_seconds"] = stage_seconds.get("priors", 0.0)
            row[f"{run}_training_seconds"] = stage_seconds.get("training", 0.0)
            row[f"{run}_sampling_seconds"] = stage_seconds.get("sampling", 0.0)
            row["images"] = len(result.images)
            row["steps"] = result.train.final_step
            row["steps_per_second"] = result.train.steps_per_second
    generated = int(row["cold_priors_generated"])  # type: ignore[call-overload]
    row["prior_images_per_second"] = generated / float(row["cold_priors_seconds"])  # type: ignore[arg-type]
    return row


HOGS = ("torch", "busy")


def hog(kind: str) -> None:
    """Burn CPU until killed: a 2-thread PyTorch matmul loop, or a 1-thread Python busy loop."""
    if kind == "torch":
        import torch

        torch.set_num_threads(2)
        a = torch.randn(512, 512)
        while True:
            a = torch.tanh(a @ a)
    while True:
        pass


@contextmanager
def beside(kind: str | None) -> Iterator[None]:
    """Run the block beside a CPU hog of ``kind`` (none when None)."""
    if kind is None:
        yield
        return
    process = subprocess.Popen([sys.executable, __file__, "--hog", kind])
    try:
        time.sleep(2.0)  # its imports done, it is spinning
        yield
    finally:
        process.kill()
        process.wait()


def beside_table(repeat: int) -> None:
    """The reported command with PyTorch's default threads and with the worker's, alone and beside each hog."""
    from statistics import median

    from worker.engine.threads import choose_threads, usable_cpus

    cores = os.cpu_count() or 1
    chosen = choose_threads()
    print(f"studio train --base-model tiny --steps 20 --prior-images 16; {cores} cores, {usable_cpus()} usable; "
          f"median of {repeat}")
    print(f"{'beside':<28} {'threads':>16} {'wall s':>8}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        from tests.worker.engine.conftest import make_subject_photo

        (folder / "photos").mkdir()
        for i in range(4):
            make_subject_photo(folder / "photos" / f"{i}.jpg", seed=i, size=(320, 256))
        for kind in (None, *HOGS):
            for label, threads in ((f"{cores} (PyTorch default)", cores), (f"{chosen} (worker default)", chosen)):
                times = []
                for run in range(repeat):
                    command = [sys.executable, "-m", "app.cli", "train", "--photos", str(folder / "photos"),
                               "--class-noun", "dog", "--base-model", "tiny", "--steps", "20", "--prior-images",
                               "16", "--quiet", "--no-score", "--threads", str(threads),
                               "--out", str(folder / f"out-{kind}-{threads}-{run}"),
                               "--bank", str(folder / f"bank-{kind}-{threads}-{run}")]
                    with beside(kind):
                        started = time.monotonic()
                        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
                        times.append(time.monotonic() - started)
                what = {None: "nothing", "torch": "2-thread PyTorch matmul loop", "busy": "1-thread busy loop"}[kind]
                print(f"{what:<28} {label:>16} {median(times):>8.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads (CPU runs only; 0: the worker's)")
    parser.add_argument("--beside", choices=HOGS, help="measure beside a second CPU-bound process")
    parser.add_argument("--beside-table", action="store_true",
                        help="only the threads table: the reported command alone and beside each CPU hog")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row of --beside-table (median)")
    parser.add_argument("--hog", choices=HOGS, help=argparse.SUPPRESS)  # internal: burn CPU until killed
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--no-jobs", action="store_true", help="skip the whole-job table")
    parser.add_argument("--job-priors", type=int, default=0, help="prior images of a job (default 16 CPU, 200 CUDA)")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    parser.add_argument("--one-job", default="", help=argparse.SUPPRESS)  # internal: one whole job, print JSON
    args = parser.parse_args()

    if args.hog:
        hog(args.hog)
    if args.beside_table:
        beside_table(args.repeat)
        return
    if args.threads <= 0:
        from worker.engine.threads import choose_threads

        args.threads = choose_threads()
    by_name = {case.name: case for case in CASES}
    if args.one:
        print(json.dumps(run_case(by_name[args.one], args.steps, args.warmup, args.threads)))
        return
    if args.one_job:
        print(json.dumps(run_job_case(args.one_job, args.job_priors, args.threads)))
        return

    with beside(args.beside):
        run_tables(args, parser, by_name)


def run_tables(args: argparse.Namespace, parser: argparse.ArgumentParser, by_name: dict[str, Case]) -> None:
    import torch

    wanted = [name for name in args.only.split(",") if name] or [c.name for c in CASES]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    has_cuda = torch.cuda.is_available()
    rows = []
    for name in wanted:
        case = by_name[name]
        if case.cuda_only and not has_cuda:
            continue
        if not case.cuda_only and has_cuda and not args.only:
            continue  # the CPU configurations describe a CPU machine
        command = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads)]
        output = subprocess.run(command, capture_output=True, text=True, check=False)
        if output.returncode != 0:
            print(f"{name}: failed\n{output.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
        print(f"done: {name}", file=sys.stderr, flush=True)

    header = (f"{'configuration':<24} {'device':<6} {'dtype':<9} {'px':>4} {'steps/s':>8} {'steps/CPU-s':>11} "
              f"{'speed-up':>8} {'peak MB':>8} {'setup s':>8} {'TFLOP/step':>10} {'% of peak':>9}")
    print(header)
    print("-" * len(header))

    def family(name: object) -> str:
        return str(name).replace("-uncached", "").replace("-cached", "")

    # On the CPU the speed-up compares CPU time per step (robust to a shared machine); on CUDA, wall time.
    def rate(row: dict[str, object]) -> float:
        key = "steps_per_second" if str(row["device"]).startswith("cuda") else "steps_per_cpu_second"
        return float(row[key])  # type: ignore[arg-type]

    uncached_rate = {family(r["name"]): rate(r) for r in rows if not r["cache_latents"]}
    for row in rows:
        base = uncached_rate.get(family(row["name"]))
        speedup = f"{rate(row) / base:.2f}x" if row["cache_latents"] and base else ""
        cpu_rate = f"{row['steps_per_cpu_second']:.2f}" if row["device"] == "cpu" else ""
        flops = f"{row['step_tflop']:.2f}" if row.get("step_tflop") else ""
        share = f"{100 * row['share_of_peak']:.1f}" if row.get("share_of_peak") else ""
        print(f"{row['name']:<24} {row['device']:<6} {row['dtype']:<9} {row['resolution']:>4} "
              f"{row['steps_per_second']:>8.2f} {cpu_rate:>11} {speedup:>8} {row['peak_memory_mb']:>8.0f} "
              f"{row['setup_seconds']:>8.1f} {flops:>10} {share:>9}")

    if not args.no_jobs:
        print_job_table(has_cuda, args.job_priors or (200 if has_cuda else 16), args.threads)


def print_job_table(has_cuda: bool, prior_images: int, threads: int) -> None:
    model_name = "sd15-arch" if has_cuda else "tiny"
    command = [sys.executable, __file__, "--one-job", model_name, "--job-priors", str(prior_images),
               "--threads", str(threads)]
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    if output.returncode != 0:
        print(f"{model_name} job: failed\n{output.stderr[-3000:]}", file=sys.stderr)
        return
    row = json.loads(output.stdout.strip().splitlines()[-1])
    print()
    print(f"whole job: {row['name']} on {row['device']} at {row['resolution']} px, {prior_images} prior images, "
          f"{row['steps']} LoRA steps ({row['steps_per_second']:.1f} steps/s), {row['images']} gallery images")
    header = f"{'bank':<5} {'priors made':>11} {'priors s':>9} {'prior img/s':>11} {'training s':>10} " \
             f"{'sampling s':>10} {'total s':>8}"
    print(header)
    print("-" * len(header))
    for run in ("cold", "warm"):
        made = row[f"{run}_priors_generated"]
        rate = f"{made / row[f'{run}_priors_seconds']:.2f}" if made else ""
        print(f"{run:<5} {made:>11} {row[f'{run}_priors_seconds']:>9.1f} {rate:>11} "
              f"{row[f'{run}_training_seconds']:>10.1f} {row[f'{run}_sampling_seconds']:>10.1f} "
              f"{row[f'{run}_seconds']:>8.1f}")


if __name__ == "__main__":
    main()
