"""The CPU-scale world: procedural captioned scenes whose caption determines the image up to small jitter.

A scene is ``count`` identical shapes of one colour and size at one position on a plain background; ``write_world``
writes a set in the LAION-Aesthetics folder layout (``data=world``). PIL and the standard library only, on purpose.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

WORLD_VERSION = 3  # bump when a change here changes the images or captions: old sets are then refused, not reused

# Vocabularies. Shape colours and backgrounds never coincide, so every shape is visible.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
COUNTS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "white": (235, 235, 235),
}

ATTRIBUTES = ("colour", "shape", "size", "position", "count", "background")
# Each attribute's vocabulary, in label order (``labels`` indexes into these).
VOCABULARIES: dict[str, tuple] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "count": tuple(COUNTS),
    "background": tuple(BACKGROUNDS),
}

# Phrases of the caption.
_POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# Shape radius as a fraction of the image side, and where each position puts the group's centre.
_RADIUS = {"small": 0.1, "large": 0.14}
_ANCHORS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78), "centre": (0.5, 0.5)}
_SPACING = 0.31  # distance between the centres of neighbouring shapes, fraction of the side
_JITTER = 0.025  # largest random shift of each shape's centre, fraction of the side
_SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    count: int
    background: str

    def __post_init__(self) -> None:
        for attr in ATTRIBUTES:
            value = getattr(self, attr)
            if value not in VOCABULARIES[attr]:
                raise ValueError(f"Scene.{attr}={value!r} is not one of {list(VOCABULARIES[attr])}")


def sample_scene(rng: random.Random) -> Scene:
    """A uniformly random scene (each attribute drawn independently)."""
    return Scene(
        colour=rng.choice(VOCABULARIES["colour"]),
        shape=rng.choice(SHAPES),
        size=rng.choice(SIZES),
        position=rng.choice(POSITIONS),
        count=rng.choice(VOCABULARIES["count"]),
        background=rng.choice(VOCABULARIES["background"]),
    )


def all_scenes() -> list[Scene]:
    """Every scene of the world, once each."""
    return [Scene(*values) for values in itertools.product(*(VOCABULARIES[a] for a in ATTRIBUTES))]


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def caption(scene: Scene) -> str:
    """E.g. "two large red circles at the top on a black background"."""
    return (
        f"{COUNTS[scene.count]} {scene.size} {scene.colour} {_plural(scene.shape, scene.count)} "
        f"{_POSITION_PHRASES[scene.position]} on a {scene.background} background"
    )


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_CAPTION_RE = re.compile(
    rf"(?P<count>{_alternatives(COUNTS.values())}) (?P<size>{_alternatives(SIZES)}) "
    rf"(?P<colour>{_alternatives(COLOURS)}) (?P<shape>{_alternatives(SHAPES)})(?P<plural>s?) "
    rf"(?P<position>{_alternatives(_POSITION_PHRASES.values())}) on an? (?P<background>{_alternatives(BACKGROUNDS)}) "
    r"background"
)


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (the inverse of ``caption``; case and surrounding spaces ignored).

    Raises ``ValueError`` for text that is not a caption of this world, or whose plural disagrees with its count.
    """
    match = _CAPTION_RE.fullmatch(" ".join(str(text).lower().split()))
    if match is None:
        raise ValueError(
            f"not a caption of the world: {text!r} (expected e.g. {caption(Scene('red', 'circle', 'large', 'top', 2, 'black'))!r})"
        )
    count = {word: n for n, word in COUNTS.items()}[match["count"]]
    if (count == 1) != (match["plural"] == ""):
        raise ValueError(f"not a caption of the world: {text!r} (the count {match['count']!r} and the noun disagree)")
    position = {phrase: name for name, phrase in _POSITION_PHRASES.items()}[match["position"]]
    return Scene(match["colour"], match["shape"], match["size"], position, count, match["background"])


def labels(scene: Scene) -> dict[str, int]:
    """Each attribute's index in its vocabulary (``VOCABULARIES``), e.g. {"colour": 0, ..., "count": 1, ...}."""
    return {attr: VOCABULARIES[attr].index(getattr(scene, attr)) for attr in ATTRIBUTES}


def _centres(scene: Scene) -> list[tuple[float, float]]:
    """The shapes' centres, as fractions of the side: in a row (top, bottom, centre) or a column (left, right)."""
    ax, ay = _ANCHORS[scene.position]
    offsets = [(i - (scene.count - 1) / 2) * _SPACING for i in range(scene.count)]
    if scene.position in ("left", "right"):
        return [(ax, ay + o) for o in offsets]
    return [(ax + o, ay) for o in offsets]


def render(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """The scene as an RGB ``size`` x ``size`` image; ``rng`` adds a small random shift to each shape (none without)."""
    if int(size) < 16:
        raise ValueError(f"render: size={size} is too small to draw a scene (at least 16 px)")
    big = int(size) * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    r = _RADIUS[scene.size] * big
    for fx, fy in _centres(scene):
        if rng is not None:
            fx += rng.uniform(-_JITTER, _JITTER)
            fy += rng.uniform(-_JITTER, _JITTER)
        cx, cy = fx * big, fy * big
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif scene.shape == "square":
            s = r * 0.9  # a square of the circle's area reads as the same size
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:  # an upward triangle inscribed in the circle of radius r*1.15
            t = r * 1.15
            draw.polygon([(cx, cy - t), (cx - t * 0.866, cy + t * 0.5), (cx + t * 0.866, cy + t * 0.5)], fill=fill)
    return image.resize((int(size), int(size)), Image.Resampling.BOX)


def world_parameters(num_images: int, seed: int, size: int = 64) -> dict:
    """What ``README.json`` records about a world set; two sets with equal parameters hold the same images."""
    return {
        "world": True,
        "version": WORLD_VERSION,
        "num_images": int(num_images),
        "seed": int(seed),
        "size": int(size),
    }


def write_world(out_dir: str | Path, num_images: int, seed: int, size: int = 64) -> Path:
    """Write ``num_images`` scenes as PNGs plus ``metadata.csv`` (file_name, text and one column per attribute) and
    ``README.json`` (the parameters), published atomically (built in a temporary sibling folder, then renamed).

    A folder already there is reused only if its ``README.json`` records these same parameters (and the same
    ``WORLD_VERSION``); any other folder is a ``DataError`` naming it: never reused, never deleted.
    """
    from bksdm_lab.data.synthetic import publish_dataset

    if int(num_images) < 1:
        raise ValueError(f"write_world: num_images={num_images} must be at least 1")
    asked = world_parameters(num_images, seed, size)

    def build(tmp: Path) -> None:
        rng = random.Random(int(seed))
        tmp.mkdir(parents=True)
        rows = []
        for i in range(int(num_images)):
            scene = sample_scene(rng)
            name = f"{i:05d}.png"
            render(scene, size, rng).save(tmp / name, optimize=True)
            rows.append({"file_name": name, "text": caption(scene), **{a: getattr(scene, a) for a in ATTRIBUTES}})
        with (tmp / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text", *ATTRIBUTES])
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "README.json").write_text(json.dumps(asked, indent=2) + "\n", encoding="utf-8")

    return publish_dataset(build, out_dir, asked, "world", "world set", "bksdm_lab.world")


def read_world(root: str | Path) -> list[tuple[str, Scene]]:
    """The (file name, scene) pairs of a set ``write_world`` wrote, read back from its ``metadata.csv``."""
    root = Path(root).expanduser()
    with (root / "metadata.csv").open(newline="", encoding="utf-8") as f:
        return [(row["file_name"], parse_caption(row["text"])) for row in csv.DictReader(f)]
