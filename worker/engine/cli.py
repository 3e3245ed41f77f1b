"""``studio train`` and ``studio sample``: the DreamBooth engine without web, database or queue.

The top-level ``studio`` command forwards to :func:`main`, e.g. ``main(["train", "--photos", ...])``.

    studio train --photos DIR --class-noun dog --base-model tiny --out DIR [--steps N] ...
    studio sample --run DIR --prompt "a photo of {subject} on the moon" --out DIR [--images N]

Bad input (no photos, unreadable photos, an unknown base model, a resolution that is not a
multiple of 8, steps <= 0, ...) prints one line naming the problem and exits with status 2.
Other engine failures (a diverged run, a model that only makes black images) exit with 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

from tqdm import tqdm

from worker.engine.errors import Cancelled, EngineError, EngineInputError
from worker.engine.progress import Progress

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
DEFAULT_BANK = Path.home() / ".cache" / "photo-studio" / "prior-bank"
PERSON_NOUNS = frozenset({"person", "man", "woman", "boy", "girl", "child", "kid", "baby", "people"})
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".bmp", ".tif", ".tiff"})


class UsageError(Exception):
    """A command-line mistake; :func:`main` prints it as one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class StageBars:
    """A progress callback that shows one tqdm bar per stage on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, event: Progress) -> None:
        if not self.enabled:
            return
        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=f"{event.stage:<9}", unit="img" if event.stage != "training"
                            else "step", file=sys.stderr, dynamic_ncols=True, leave=True)
        postfix: dict[str, Any] = {}
        if event.loss is not None:
            postfix["loss"] = f"{event.loss:.4f}"
        if event.reused is not None:
            postfix["reused"] = event.reused
        if self.bar.total == event.total and self.bar.n == event.step and not postfix:
            return  # nothing new to draw
        self.bar.total = event.total
        self.bar.n = event.step
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def _resolution(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="studio", description="Fine-tune a diffusion model on your photos (DreamBooth).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train on a folder of photos, then sample a gallery")
    train.add_argument("--photos", type=Path, required=True, help="folder of 3-20 photos of the subject")
    train.add_argument("--class-noun", required=True, help="what the subject is: dog, cat, person, ...")
    train.add_argument("--base-model", default="tiny",
                       help="tiny | sd15-arch | a hub id (owner/name) | a diffusers folder | a .safetensors file")
    train.add_argument("--out", type=Path, required=True, help="work folder: prepared/, run/, samples/")
    train.add_argument("--method", choices=("lora", "full"))
    train.add_argument("--steps", type=_positive_int, help="optimizer steps")
    train.add_argument("--resolution", type=_resolution, help="training resolution (default: the model's)")
    train.add_argument("--prior-images", type=_non_negative_int, help="class-prior images (default: the recipe's)")
    train.add_argument("--lr", type=_positive_float, help="learning rate")
    train.add_argument("--rank", type=_positive_int, help="LoRA rank")
    train.add_argument("--seed", type=_non_negative_int, default=0)
    train.add_argument("--prompt", action="append", default=[], dest="prompts",
                       help="a prompt to sample; {subject} marks the subject (repeatable)")
    train.add_argument("--pack", help="a prompt pack (default: the kind's default pack unless --prompt is given)")
    train.add_argument("--images-per-prompt", type=_positive_int, default=4)
    train.add_argument("--quality", choices=("fast", "balanced", "best"), default="balanced")
    train.add_argument("--kind", choices=("pet", "person"), help="default: person for person nouns, else pet")
    train.add_argument("--bank", type=Path, default=DEFAULT_BANK, help=f"class-prior bank (default {DEFAULT_BANK})")
    train.add_argument("--identifier", help="the rare token for the subject (default: chosen from the vocabulary)")
    train.add_argument("--sample-steps", type=_positive_int, help="default: the model family's (SD 25, SDXL 30)")
    train.add_argument("--prior-steps", type=_positive_int, help="default: the model family's")
    train.add_argument("--guidance", type=_positive_float, help="default: the model family's (SD 7.5, SDXL 5)")
    train.add_argument("--no-score", action="store_true", help="skip DINO / CLIP scoring")
    train.add_argument("--device", choices=("auto", "cpu"), default="auto")
    train.add_argument("--threads", type=_positive_int,
                        help="PyTorch CPU threads (default: the usable cores, one left free on up to 4)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    sample = commands.add_parser("sample", help="sample more images from a trained run")
    sample.add_argument("--run", type=Path, required=True, help="a run folder (or the work folder holding run/)")
    sample.add_argument("--prompt", action="append", default=[], dest="prompts",
                        help="a prompt; {subject} marks the subject (repeatable; default: the kind's pack)")
    sample.add_argument("--images", type=_positive_int, default=4, help="images per prompt")
    sample.add_argument("--seed", type=_non_negative_int, default=0)
    sample.add_argument("--steps", type=_positive_int, help="default: the model family's (SD 25, SDXL 30)")
    sample.add_argument("--guidance", type=_positive_float, help="default: the model family's (SD 7.5, SDXL 5)")
    sample.add_argument("--out", type=Path, required=True)
    sample.add_argument("--device", choices=("auto", "cpu"), default="auto")
    sample.add_argument("--threads", type=_positive_int,
                        help="PyTorch CPU threads (default: the usable cores, one left free on up to 4)")
    sample.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def find_photos(folder: Path) -> list[Path]:
    """The files of ``folder`` to try as photos: every non-hidden file with a photo suffix, sorted.

    Raises :class:`EngineInputError` when the folder is missing or holds none.
    """
    if not folder.is_dir():
        raise EngineInputError(f"photo folder {folder} does not exist")
    photos = sorted(p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise EngineInputError(f"no photos in {folder} (looked for {', '.join(sorted(PHOTO_SUFFIXES))})")
    return photos


def _check_some_photo_decodes(photos: list[Path]) -> None:
    """Raise :class:`EngineInputError` naming every file when not one of ``photos`` can be decoded."""
    from worker.engine.photos import load_photo

    failures = []
    for path in photos:
        try:
            load_photo(path)
            return
        except EngineInputError as exc:
            failures.append(str(exc))
    raise EngineInputError(f"no readable photo among {len(photos)}: {'; '.join(failures)}")


def _use_threads(threads: int | None) -> None:
    from worker.engine.threads import apply_threads, choose_threads

    apply_threads(choose_threads(threads))


def _device(choice: str) -> tuple[Any, Any]:
    """The (device, dtype) for ``--device``: "cpu", or "auto" (CUDA with bf16 when present)."""
    from worker.engine.models import select_device

    return select_device("cpu" if choice == "cpu" else "auto")


def _train(args: argparse.Namespace) -> int:
    from worker.engine.job import JobSpec, run_job
    from worker.engine.models import load_base_model

    photos = find_photos(args.photos)
    _check_some_photo_decodes(photos)  # before loading a multi-GB model for nothing
    kind: Literal["pet", "person"] = args.kind or (
        "person" if args.class_noun.strip().lower() in PERSON_NOUNS else "pet"
    )
    overrides: dict[str, Any] = {}
    for option, setting in (("method", "method"), ("steps", "steps"), ("lr", "learning_rate"), ("rank", "rank")):
        if getattr(args, option) is not None:
            overrides[setting] = getattr(args, option)
    _use_threads(args.threads)
    device, dtype = _device(args.device)
    model = load_base_model(args.base_model, device=device, dtype=dtype)
    spec = JobSpec(photos=photos, class_noun=args.class_noun, subject_kind=kind, work_dir=args.out,
                   bank_root=args.bank, quality=args.quality, train_overrides=overrides,
                   prior_images=args.prior_images, pack=args.pack, prompts=args.prompts,
                   images_per_prompt=args.images_per_prompt, identifier=args.identifier, seed=args.seed,
                   resolution=args.resolution, sample_steps=args.sample_steps, prior_steps=args.prior_steps,
                   guidance=args.guidance, score=not args.no_score)
    bars = StageBars(enabled=not args.quiet)
    try:
        result = run_job(spec, model, progress=bars)
    finally:
        bars.close()
    for problem in result.photo_problems:
        print(f"left out {problem}", file=sys.stderr)
    print(f"identifier: {result.identifier} ({result.instance_prompt!r})")
    print(f"class priors: {result.prior_generated} generated, {result.prior_reused} reused")
    print(f"trained {result.train.final_step} steps into {result.run_dir}")
    samples_dir = result.images[0].path.parent if result.images else args.out
    print(f"{len(result.images)} images in {samples_dir}")
    if result.ranking:
        best_index = result.ranking[0]
        facts = []
        if result.face_distances:
            facts.append(_face_words(result.face_distances[best_index]))
        if result.scores:
            score = result.scores[best_index]
            facts.append(f"DINO {score.dino:.3f}, CLIP-I {score.clip_i:.3f}, CLIP-T {score.clip_t:.3f}")
        print(f"best: {result.images[best_index].path.name} ({'; '.join(facts)})")
    if result.face_distances:
        found = sum(value is not None for value in result.face_distances)
        print(f"faces: {found} of {len(result.face_distances)} images show a face; face match per image in "
              f"{result.run_dir / 'run.json'}")
    return EXIT_OK


def _face_words(distance: float | None) -> str:
    """A face match as the gallery says it, with its number: "face 0.412, strong match"."""
    from worker.engine.faces import match_words

    return match_words(None) if distance is None else f"face {distance:.3f}, {match_words(distance)}"


def _sample(args: argparse.Namespace) -> int:
    from worker.engine.job import RUN_DIR, generate_more, run_details
    from worker.engine.models import load_base_model
    from worker.engine.sample import pack_templates

    run_dir = args.run / RUN_DIR if (args.run / RUN_DIR / "run.json").exists() else args.run
    details = run_details(run_dir)
    prompts = args.prompts or list(pack_templates(None, details["subject_kind"]))
    _use_threads(args.threads)
    device, dtype = _device(args.device)
    model = load_base_model(details["base_model"], device=device, dtype=dtype)
    bars = StageBars(enabled=not args.quiet)
    try:
        records = generate_more(model, run_dir, prompts, identifier=details["identifier"],
                                class_noun=details["class_noun"], images_per_prompt=args.images, out_dir=args.out,
                                seed=args.seed, steps=args.steps, guidance=args.guidance, progress=bars)
    finally:
        bars.close()
    from worker.engine.likeness import face_distances, references_of
    from worker.engine.weights import read_run_file

    references = references_of(read_run_file(run_dir).get("run_info") or {})
    distances = face_distances([record.path for record in records], references) if references else []
    for index, record in enumerate(records):
        face = f"  ({_face_words(distances[index])})" if distances else ""
        print(f"{record.path}  seed {record.seed}  {record.prompt}{face}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``studio train`` or ``studio sample``; returns the exit status (0, 1, 2 or 130)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = arguments[0] if arguments and arguments[0] in ("train", "sample") else ""
    prefix = f"studio {command}".strip()
    try:
        args = build_parser().parse_args(arguments)
        return _train(args) if args.command == "train" else _sample(args)
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_BAD_INPUT
    except (UsageError, EngineInputError) as exc:
        print(f"{prefix}: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (Cancelled, KeyboardInterrupt):
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EngineError as exc:
        print(f"{prefix}: failed: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILED


def _one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":
    raise SystemExit(main())
