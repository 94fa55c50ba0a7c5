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
    assert ys.max() < 32 and red.sum() > 2 * 100  # two large circles (radius ~9 px) in the top half
    assert red[:, :32].any() and red[:, 32:].any() and not red[:, 31:33].any()  # left and right of the middle
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
    with pytest.raises(DataError, match=r"written with version=3, num_images=4, seed=0, size=32, not the .*seed=1"):
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


# ---- the world's teacher and its configs ------------------------------------------------------------------------
def compose_world(*overrides: str):
    """conf/world.yaml as `python -m bksdm_lab.world.teacher <overrides>` composes it."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="world", overrides=list(overrides))


def test_teacher_world_loads_the_folder_the_teacher_command_writes(tmp_path, compose_train):
    from bksdm_lab.world.teacher import config_hash, teacher_dir

    world = compose_world(f"paths.cache_dir={tmp_path}")
    train = compose_train("experiment=world", f"paths.cache_dir={tmp_path}")
    # The hash pinned in conf/teacher/world.yaml is the default training config's: change conf/world.yaml, update it.
    assert str(teacher_dir(world)) == train.teacher.pretrained == f"{tmp_path}/world/teacher-{config_hash(world)}"
    assert train.data.root == world.data.root == f"{tmp_path}/world/data-n3000-s0-32px"  # the set it trained on
    assert train.teacher.resolution == train.data.synthetic.size == world.data.size == 32
    assert train.data.random_flip is False  # a mirrored "on the left" scene would contradict its caption
    assert all(scenes.parse_caption(p) for p in train.callbacks.samples.prompts)
    # Only the training config is hashed: threads, out and the samples grid do not change the folder.
    assert teacher_dir(compose_world(f"paths.cache_dir={tmp_path}", "threads=2", "samples.prompts=0")) == teacher_dir(
        world
    )
    assert teacher_dir(compose_world(f"paths.cache_dir={tmp_path}", "unet.steps=999")) != teacher_dir(world)
    assert teacher_dir(compose_world("out=/somewhere/else")) == scenes.Path("/somewhere/else")


def test_a_missing_world_teacher_names_the_command_that_builds_it(tmp_path, compose_train):
    from bksdm_lab.models.teachers import TeacherLoadError, probe_teacher

    cfg = compose_train("experiment=world", f"paths.cache_dir={tmp_path}")
    with pytest.raises(TeacherLoadError, match=r"does not exist\. .*run `python -m bksdm_lab\.world\.teacher`"):
        probe_teacher(cfg.teacher)
    assert not (tmp_path / "world").exists()  # nothing is trained or built behind the user's back


def test_world_teacher_refuses_bad_values_before_loading(tmp_path):
    from bksdm_lab.world.teacher import WorldTeacherError, train_teacher

    cfg = compose_world(
        f"paths.cache_dir={tmp_path}",
        "unet.steps=0",
        "data.size=36",
        "text_encoder.layers=0",
        "+unet.overrides.bogus=1",
    )
    with pytest.raises(WorldTeacherError) as err:
        train_teacher(cfg)
    lines = str(err.value).splitlines()
    assert any(line.startswith("unet.steps=0 must be an integer >= 1") for line in lines)
    assert any(line.startswith("data.size=36 must be a multiple of 32") for line in lines)
    assert any(line.startswith("text_encoder.layers=0 must be an integer >= 1") for line in lines)
    assert any("not U-Net config keys: ['bogus']" in line for line in lines)
    assert not tmp_path.joinpath("world").exists()


def test_world_tokenizer_makes_one_token_of_each_word_and_bytes_of_the_rest():
    from bksdm_lab.world.teacher import world_tokenizer

    tok = world_tokenizer()
    text = "three large yellow triangles at the bottom on a black background"  # the longest kind of caption
    ids = tok(text).input_ids
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in text.split()] and len(ids) <= 16
    assert len({w for s in scenes.all_scenes() for w in scenes.caption(s).split()}) == 30  # every word, one token
    assert len(tok("pink dog", add_special_tokens=False).input_ids) == 7  # unknown words fall back to bytes


def test_world_teacher_reuses_its_folder_and_refuses_any_other(tmp_path, capsys, monkeypatch):
    from bksdm_lab.world import teacher as world_teacher
    from tests.conftest import run_app

    cfg = compose_world(f"paths.cache_dir={tmp_path}")
    home = world_teacher.teacher_dir(cfg)
    home.mkdir(parents=True)
    (home / "README.json").write_text(
        json.dumps({"world_teacher": True, "config_hash": world_teacher.config_hash(cfg), "wall_time": {}})
    )
    # Its own folder: reused without training (a training run would need minutes and write the world set).
    assert world_teacher.train_teacher(cfg) == home
    assert sorted(p.name for p in tmp_path.joinpath("world").iterdir()) == [home.name]
    # A folder holding another config's teacher, or anything else, is refused with exit code 2 and left alone.
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.json").write_text(json.dumps({"world_teacher": True, "config_hash": "0123456789"}))
    code, _, err = run_app(world_teacher.main, [f"paths.cache_dir={tmp_path}", f"out={other}"], capsys, monkeypatch)
    assert code == 2 and "holds the world teacher of another config (hash 0123456789, not " in err
    (tmp_path / "mine").mkdir()
    code, _, err = run_app(world_teacher.main, [f"out={tmp_path / 'mine'}"], capsys, monkeypatch)
    assert code == 2 and "exists but is not a world teacher written by python -m bksdm_lab.world.teacher" in err
    assert json.loads((other / "README.json").read_text())["config_hash"] == "0123456789"
    assert list((tmp_path / "mine").iterdir()) == []


def test_world_data_module_writes_the_set_once(tmp_path):
    from bksdm_lab.models.demo import byte_level_tokenizer
    from bksdm_lab.world.data import WorldDataModule

    root = tmp_path / "data"
    dm = WorldDataModule(
        root, tokenizer=byte_level_tokenizer(), resolution=32, batch_size=4, num_workers=0, random_flip=False,
        synthetic={"num_images": 8, "seed": 0, "size": 32},
    )  # fmt: skip
    assert json.loads((root / "README.json").read_text())["num_images"] == 8
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["pixel_values"].shape) == (4, 3, 32, 32)
    with pytest.raises(DataError, match="written with version=3, num_images=8"):
        WorldDataModule(root, tokenizer=byte_level_tokenizer(), resolution=32, synthetic={"num_images": 9, "seed": 0})


@pytest.mark.slow
def test_short_world_teacher_trains_then_a_student_distils_from_it(tmp_path):
    """The real commands: the short teacher (seconds), then a few distillation steps from it, exported."""
    import subprocess

    from tests.conftest import PYTHON, REPO, subprocess_env

    env = subprocess_env(tmp_path / "cache")
    short = [
        "data.num_images=32", "vae.steps=3", "vae.batch_size=8", "unet.steps=3", "unet.batch_size=8",
        "samples.prompts=1", "samples.num_inference_steps=2",
    ]  # fmt: skip
    first = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.world.teacher", *short], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr[-3000:]
    folder = scenes.Path(first.stdout.split("world teacher: ")[1].split()[0])
    assert folder.parent == tmp_path / "cache" / "world" and folder.name.startswith("teacher-")
    readme = json.loads((folder / "README.json").read_text())
    assert readme["steps"] == {"vae": 3, "unet": 3} and readme["threads"] == 1
    assert set(readme["final_losses"]) == {"vae_recon_mse", "vae_kl", "unet_loss"}
    assert all(np.isfinite(v) for v in readme["final_losses"].values())
    assert {"vae", "unet", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in folder.iterdir()}
    assert scenes.Image.open(folder / "samples.png").size == (1 * 32 * 4, 2 * 32 * 4)
    run = tmp_path / "run"
    distil = subprocess.run(
        [
            PYTHON, "-m", "bksdm_lab.train", "experiment=world", "arch=tiny", f"teacher.pretrained={folder}",
            "data.synthetic.num_images=32", "data.batch_size=8", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
            "callbacks.samples.prompts=[]", "callbacks.checkpoint.every_n_train_steps=3",
            f"hydra.run.dir={run}",
        ],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert distil.returncode == 0, distil.stderr[-3000:]
    with (run / "csv" / "metrics.csv").open(newline="") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_pretrained(run / "pipeline" / "unet")
    assert len(student.down_blocks) == 3 and student.config.sample_size == 8  # Tiny: the deepest stage removed
