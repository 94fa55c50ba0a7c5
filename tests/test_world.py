"""The CPU-scale world: scenes (captions, rendering, labels, the written set), the small teacher and its data."""

from __future__ import annotations

import csv
import itertools
import json
import random

import numpy as np
import pytest

from bksdm_lab.data.common import DataError
from bksdm_lab.world import scenes
from bksdm_lab.world.scenes import ATTRIBUTES, VOCABULARIES, Scene, caption, labels, parse_caption, render, write_world


def all_scenes():
    for values in itertools.product(*(VOCABULARIES[a] for a in ATTRIBUTES)):
        yield Scene(**dict(zip(ATTRIBUTES, values)))


def test_caption_parse_round_trip_over_every_scene():
    seen = set()
    for scene in all_scenes():
        text = caption(scene)
        assert parse_caption(text) == scene
        assert parse_caption("  " + text.upper() + " ") == scene  # case and outer spaces do not matter
        seen.add(text)
    assert len(seen) == 6 * 3 * 2 * 5 * 3 * 2  # every scene has its own caption
    assert caption(Scene("red", "circle", "large", "top", 2, "black")) == (
        "two large red circles at the top on a black background"
    )
    assert caption(Scene("blue", "square", "small", "left", 1, "white")) == (
        "one small blue square on the left on a white background"
    )


@pytest.mark.parametrize(
    "text",
    [
        "a red circle on a blue background",  # the demo's captions are not the world's
        "two large red circle at the top on a black background",  # plural disagrees with the count
        "one large red circles at the top on a black background",
        "two large pink circles at the top on a black background",  # unknown colour
        "two large red circles at the top on a black background please",
    ],
)
def test_parse_caption_refuses_text_outside_the_world(text):
    with pytest.raises(ValueError, match="not a caption of the world"):
        parse_caption(text)


def test_scene_refuses_values_outside_the_vocabularies():
    with pytest.raises(ValueError, match=r"Scene.colour='pink' is not one of \['red'"):
        Scene("pink", "circle", "large", "top", 2, "black")
    with pytest.raises(ValueError, match="Scene.count=4"):
        Scene("red", "circle", "large", "top", 4, "black")


def test_labels_index_each_vocabulary():
    scene = Scene("blue", "triangle", "large", "bottom", 3, "white")
    assert labels(scene) == {"colour": 2, "shape": 2, "size": 1, "position": 3, "count": 2, "background": 1}
    for scene in itertools.islice(all_scenes(), 0, None, 37):
        got = labels(scene)
        assert list(got) == list(ATTRIBUTES)
        assert all(VOCABULARIES[a][i] == getattr(scene, a) for a, i in got.items())


def test_sample_scene_is_a_function_of_the_rng_and_covers_the_vocabularies():
    a = [scenes.sample_scene(random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(0)
    drawn = [scenes.sample_scene(rng) for _ in range(400)]
    for attr in ATTRIBUTES:
        assert {getattr(s, attr) for s in drawn} == set(VOCABULARIES[attr])


def test_render_is_deterministic_for_a_seed_and_draws_the_scene():
    scene = Scene("red", "circle", "large", "top", 2, "black")
    one = np.asarray(render(scene, 64, random.Random(5)))
    two = np.asarray(render(scene, 64, random.Random(5)))
    other = np.asarray(render(scene, 64, random.Random(6)))
    assert one.shape == (64, 64, 3) and one.dtype == np.uint8
    assert np.array_equal(one, two)
    assert not np.array_equal(one, other)  # the jitter moves the shapes a little
    assert render(scene, 32).size == (32, 32)
    # Without an rng: no jitter. The background is black, the shapes red and in the top half, two blobs in a row.
    img = np.asarray(render(scene, 64)).astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 100) & (img[..., 2] < 100)
    assert np.array_equal(img[-1, -1], scenes.BACKGROUNDS["black"])
    ys, xs = np.nonzero(red)
    assert ys.max() < 32 and red.sum() > 2 * 100  # two large circles (radius ~7.7 px) in the top half
    assert red[:, :32].any() and red[:, 32:].any() and not red[:, 30:34].any()  # left and right of the middle
    # Sizes, counts and colours change the pixels as the caption says.
    small = np.asarray(render(Scene("red", "circle", "small", "top", 2, "black"), 64)).astype(int)
    assert ((small[..., 0] > 150) & (small[..., 1] < 100)).sum() < red.sum() / 2
    three = np.asarray(render(Scene("green", "square", "large", "left", 3, "white"), 64)).astype(int)
    green = (three[..., 1] > 150) & (three[..., 0] < 100)
    assert green[:, :32].sum() > 3 * 150 and not green[:, 40:].any()
    with pytest.raises(ValueError, match="too small"):
        render(scene, 8)


def test_write_world_writes_the_folder_layout_then_reuses_it(tmp_path):
    out = write_world(tmp_path / "world", num_images=12, seed=1, size=32)
    assert out == tmp_path / "world"
    with (out / "metadata.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and list(rows[0]) == ["file_name", "text", *ATTRIBUTES]
    for row in rows:
        scene = parse_caption(row["text"])
        assert {a: str(getattr(scene, a)) for a in ATTRIBUTES} == {a: row[a] for a in ATTRIBUTES}
        image = scenes.Image.open(out / row["file_name"])
        assert image.size == (32, 32) and image.mode == "RGB"
    assert json.loads((out / "README.json").read_text())["num_images"] == 12
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no temporary folder left behind
    # The same parameters: reused as is (not rewritten); the same seed elsewhere: the same images.
    stamp = (out / "00000.png").stat().st_mtime_ns
    assert write_world(out, num_images=12, seed=1, size=32) == out
    assert (out / "00000.png").stat().st_mtime_ns == stamp
    again = write_world(tmp_path / "again", num_images=12, seed=1, size=32)
    assert (again / "metadata.csv").read_bytes() == (out / "metadata.csv").read_bytes()
    assert (again / "00007.png").read_bytes() == (out / "00007.png").read_bytes()
    assert scenes.read_world(out)[3] == (rows[3]["file_name"], parse_caption(rows[3]["text"]))


def test_write_world_refuses_other_parameters_and_foreign_folders(tmp_path):
    out = write_world(tmp_path / "world", num_images=4, seed=0, size=32)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(DataError, match=r"written with version=1, num_images=4, seed=0, size=32, not the .*seed=1"):
        write_world(out, num_images=4, seed=1, size=32)
    assert sorted(p.name for p in out.iterdir()) == before  # refused: nothing deleted or rewritten
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a world set written by bksdm_lab.world"):
        write_world(foreign, num_images=4, seed=0, size=32)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (out / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(DataError, match="changed after it was written: its metadata.csv lists 0 images"):
        write_world(out, num_images=4, seed=0, size=32)
