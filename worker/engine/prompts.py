"""Prompt packs and the ``{subject}`` placeholder. Pure Python: the web app imports this too.

The pet packs are what a pet owner would choose: days out, dressing up, art and portraits; the
``pet-dreambooth`` pack keeps the DreamBooth dataset's live-subject prompts (new places,
accessories, property changes) for measurements. The person packs are portrait styles.
A prompt template holds ``{subject}``, which expands to "[V] [class noun]", e.g. "qzx dog".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SUBJECT_PLACEHOLDER = "{subject}"
SubjectKind = Literal["pet", "person"]
Shape = Literal["square", "portrait", "landscape"]
# A prompt ending in one of these is painted in that shape (the words are not sent to the model):
# "a photo of {subject} in the snow (landscape)". Without one, a picture is square.
SHAPE_MARKERS: dict[str, Shape] = {"(portrait)": "portrait", "(landscape)": "landscape", "(square)": "square"}
# The long side is the model's native size; the short side three quarters of it (3:4 and 4:3).
SHORT_SIDE = 0.75


def split_shape(prompt: str) -> tuple[str, Shape]:
    """The prompt without its trailing shape marker, and the shape ("square" when it has none)."""
    text = prompt.rstrip()
    for marker, shape in SHAPE_MARKERS.items():
        if text.lower().endswith(marker):
            return text[: -len(marker)].rstrip(" ,"), shape
    return text, "square"


def with_shape(prompt: str, shape: Shape) -> str:
    """``prompt`` marked to be painted in ``shape`` (its own marker, if any, replaced)."""
    text, _ = split_shape(prompt)
    return text if shape == "square" else f"{text} ({shape})"


def size_for(shape: Shape, resolution: int) -> tuple[int, int]:
    """(width, height) of a ``shape`` picture on a model of native ``resolution``: the long side is
    the resolution, the short side 3/4 of it, a multiple of 16 (what every family's latents divide)."""
    short = max(16, int(round(resolution * SHORT_SIDE / 16)) * 16)
    if shape == "portrait":
        return short, resolution
    if shape == "landscape":
        return resolution, short
    return resolution, resolution


@dataclass(frozen=True)
class StylePack:
    """A set of prompts a person picks on the form; ``shape`` is the shape of its pictures (each
    prompt carries it as its marker, so a pack's pictures keep it whatever path samples them)."""

    name: str
    title: str
    kind: SubjectKind
    prompts: tuple[str, ...]
    shape: Shape = "square"

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(with_shape(prompt, self.shape) for prompt in self.prompts))


# The prompts of the DreamBooth dataset's live subjects, kept as one pack for comparing with the
# paper and for measurements (bench/): they read like a benchmark ("on top of pink fabric").
_DREAMBOOTH_PLACES = (
    "a photo of {subject} in the jungle",
    "a photo of {subject} in the snow",
    "a photo of {subject} on the beach",
    "a photo of {subject} on a cobblestone street",
    "a photo of {subject} on top of a wooden floor",
    "a photo of {subject} with a city in the background",
    "a photo of {subject} with a mountain in the background",
    "a photo of {subject} with a blue house in the background",
    "a photo of {subject} on top of a purple rug in a forest",
    "a photo of {subject} on top of pink fabric",
)
_DREAMBOOTH_ACCESSORIES = (
    "a photo of {subject} wearing a red hat",
    "a photo of {subject} wearing a santa hat",
    "a photo of {subject} wearing a rainbow scarf",
    "a photo of {subject} wearing a black top hat and a monocle",
    "a photo of {subject} in a chef outfit",
    "a photo of {subject} in a firefighter outfit",
    "a photo of {subject} in a police outfit",
    "a photo of {subject} wearing pink glasses",
    "a photo of {subject} wearing a yellow shirt",
    "a photo of {subject} in a purple wizard outfit",
)
_DREAMBOOTH_PROPERTIES = (
    "a photo of a red {subject}",
    "a photo of a purple {subject}",
    "a photo of a shiny {subject}",
    "a photo of a wet {subject}",
    "a photo of a cube shaped {subject}",
)
# What a pet owner would pick: days out, dressing up, keepsakes for the wall.
_PET_ADVENTURES = (
    "a photo of {subject} on the beach at sunset",
    "a photo of {subject} playing in the snow",
    "a photo of {subject} in a field of sunflowers",
    "a photo of {subject} in an autumn park with golden leaves",
    "a photo of {subject} on a mountain trail with a view of the valley",
    "a photo of {subject} sitting in a canoe on a calm lake",
    "a photo of {subject} at a cafe table in Paris",
    "a photo of {subject} curled up by a cosy fireplace",
    "a photo of {subject} in a garden full of spring flowers",
    "a photo of {subject} looking out of a car window on a road trip",
)
_PET_DRESS_UP = (
    "a photo of {subject} wearing a santa hat by the christmas tree",
    "a photo of {subject} wearing a birthday party hat with a cake",
    "a photo of {subject} in a yellow raincoat in the rain",
    "a photo of {subject} wearing a superhero cape",
    "a photo of {subject} wearing a knitted winter scarf",
    "a photo of {subject} in a chef outfit in a kitchen",
    "a photo of {subject} wearing sunglasses on the beach",
    "a photo of {subject} wearing a bow tie, studio portrait",
    "a photo of {subject} in a pumpkin costume for halloween",
    "a photo of {subject} wearing a flower crown",
)
_PET_ART = (
    "an oil painting portrait of {subject}, classic style",
    "a watercolor painting of {subject}",
    "a pencil sketch of {subject}",
    "a pop art portrait of {subject}, bright colours",
    "a royal portrait of {subject} in a velvet cape, renaissance painting",
    "a studio portrait of {subject}, soft light, plain background",
    "a cartoon illustration of {subject}",
    "a photo of {subject} as an astronaut on the moon",
    "a storybook illustration of {subject} in a magical forest",
    "a black and white fine art photo of {subject}",
)
_PORTRAITS = (
    "a professional headshot of {subject}, studio lighting, neutral background",
    "an oil painting portrait of {subject}",
    "a watercolor portrait of {subject}",
    "a pencil sketch portrait of {subject}",
    "a photo of {subject} as an astronaut",
    "a photo of {subject} as a knight in shining armor",
    "a cinematic film still of {subject} in a city at night",
    "a photo of {subject} hiking in the mountains",
    "a photo of {subject} on a beach at sunset",
    "a renaissance painting of {subject}",
)

STYLE_PACKS: dict[str, StylePack] = {
    pack.name: pack
    for pack in (
        StylePack("pet-adventures", "Days out: beach, snow, parks and trips", "pet", _PET_ADVENTURES,
                  shape="landscape"),
        StylePack("pet-dress-up", "Dress-up: hats, costumes and holidays", "pet", _PET_DRESS_UP),
        StylePack("pet-fun", "Art and portraits: paintings, sketches, pop art", "pet", _PET_ART, shape="portrait"),
        StylePack("pet-dreambooth", "Research: the DreamBooth paper's 25 prompts", "pet",
                  _DREAMBOOTH_PLACES + _DREAMBOOTH_ACCESSORIES + _DREAMBOOTH_PROPERTIES),
        StylePack("portrait-classics", "Portrait classics", "person", _PORTRAITS[:5], shape="portrait"),
        StylePack("portrait-stories", "Portrait stories", "person", _PORTRAITS[4:], shape="portrait"),
        StylePack("portrait-all", "Every portrait style", "person", _PORTRAITS, shape="portrait"),
    )
}
DEFAULT_PACK: dict[SubjectKind, str] = {"pet": "pet-adventures", "person": "portrait-classics"}


def subject_kind(kind: str) -> SubjectKind:
    """The studio's subject kinds (dog, cat, animal, person) mapped onto the engine's two."""
    return "person" if kind == "person" else "pet"


def packs_for(kind: SubjectKind) -> list[StylePack]:
    return [pack for pack in STYLE_PACKS.values() if pack.kind == kind]


def normalize_free_prompt(prompt: str) -> str:
    """A user's prompt as a template: whitespace collapsed; without ``{subject}`` it is prefixed.

    "on a skateboard" becomes "a photo of {subject}, on a skateboard", so every free prompt
    names the subject; otherwise the fine-tuned identifier would not be used at all.
    """
    text = " ".join(prompt.split())
    if not text:
        raise ValueError("empty prompt")
    if SUBJECT_PLACEHOLDER not in text:
        text = f"a photo of {SUBJECT_PLACEHOLDER}, {text}"
    return text


def expand(template: str, identifier: str, class_noun: str) -> str:
    """Replace ``{subject}`` with "[V] [class noun]"."""
    return template.replace(SUBJECT_PLACEHOLDER, f"{identifier} {class_noun}")
