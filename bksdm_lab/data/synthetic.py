"""The demo's synthetic captioned-image set (coloured shapes in the LAION-Aesthetics folder layout, ``data=demo``)
and the build-once, check-on-reuse rule every generated data set follows (:func:`publish_dataset`)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from bksdm_lab.common.publish import publish
from bksdm_lab.data.common import DataError
from bksdm_lab.data.folder import FolderDataModule

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")


def make_synthetic_dataset(out: str | Path, num_images: int = 256, size: int = 80, seed: int = 0) -> Path:
    """Write ``num_images`` JPEGs of coloured shapes plus ``metadata.csv`` (file_name,text) and ``README.json`` (the
    parameters). A folder already there is reused only if its ``README.json`` records these same parameters; any
    other folder (other parameters, or not written here) is a ``DataError`` naming it: never reused, never deleted.
    """
    asked = {"num_images": int(num_images), "size": int(size), "seed": int(seed)}

    def build(tmp: Path) -> None:
        rng = random.Random(seed)
        tmp.mkdir(parents=True)
        rows = []
        for i in range(num_images):
            shape, fg, bg = rng.choice(SHAPES), *rng.sample(sorted(COLORS), 2)
            image = Image.new("RGB", (size, size), COLORS[bg])
            draw = ImageDraw.Draw(image)
            r = rng.randint(size // 6, size // 3)
            cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
            if shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[fg])
            elif shape == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLORS[fg])
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
            name = f"{i:05d}.jpg"
            image.save(tmp / name, quality=90)
            rows.append({"file_name": name, "text": f"a {fg} {shape} on a {bg} background"})
        with (tmp / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "README.json").write_text(json.dumps({"synthetic": True, **asked}))

    def upgrade(found: dict, out: Path) -> None:  # written before README.json recorded the size
        if "size" not in found and (out / "00000.jpg").is_file():
            with Image.open(out / "00000.jpg") as first:
                found["size"] = first.width if first.width == first.height else list(first.size)

    return publish_dataset(build, out, asked, "synthetic", "synthetic data set", "bksdm_lab", upgrade)


def publish_dataset(build, out: str | Path, asked: dict, marker: str, what: str, writer: str, upgrade=None) -> Path:
    """Build a generated data set at ``out`` once (atomically: :func:`bksdm_lab.common.publish.publish`) and check
    what is there: it is reused only if its ``README.json`` has ``marker: true`` and records the ``asked`` parameters,
    and its ``metadata.csv`` lists ``asked["num_images"]`` rows; anything else is a ``DataError`` naming the folder
    (never reused, never deleted). ``upgrade(found, out)`` may fill in parameters that older folders did not record."""

    def describe(params: dict) -> str:
        return ", ".join(f"{k}={params.get(k, '?')}" for k in asked if k != marker)

    out = Path(out).expanduser()
    publish(build, out)  # a no-op if the folder exists: then check what is there
    readme = out / "README.json"
    try:
        found = json.loads(readme.read_text(encoding="utf-8"))
        if not isinstance(found, dict) or found.get(marker) is not True:
            raise ValueError(f"no '{marker}': true")
    except (OSError, ValueError) as err:
        article = "an" if what[0] in "aeiou" else "a"
        raise DataError(
            f"{out} exists but is not {article} {what} written by {writer} ({readme.name}: {err}); "
            f"asked for {describe(asked)}: point the data root elsewhere, or move that folder away"
        ) from None
    if upgrade is not None:
        upgrade(found, out)
    if {k: found.get(k) for k in asked} != asked:
        raise DataError(
            f"the {what} in {out} was written with {describe(found)}, not the {describe(asked)} "
            "asked for: point the data root elsewhere (e.g. data.root=<new folder>), or delete that folder to "
            "have it rewritten"
        )
    try:
        with (out / "metadata.csv").open(newline="", encoding="utf-8") as f:
            rows = sum(1 for _ in csv.DictReader(f))
        problem = None if rows == asked["num_images"] else f"its metadata.csv lists {rows} images"
    except (OSError, ValueError) as err:
        problem = f"its metadata.csv is not readable ({err})"
    if problem:
        raise DataError(
            f"the {what} in {out} ({describe(found)}) was changed after it was written: {problem}; "
            "delete that folder to have it rewritten"
        )
    return out


class DemoDataModule(FolderDataModule):
    """``data=demo``: the image-folder data module over the synthetic set, written first if ``root`` is missing."""

    def __init__(self, root, *args, synthetic: dict | None = None, **kwargs):
        if synthetic:
            make_synthetic_dataset(root, **synthetic)
        super().__init__(root, *args, **kwargs)
