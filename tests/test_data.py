"""Data: bad samples are skipped or converted and counted, never fatal; exactly-once sharding; resumable order."""

import csv
import json
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import PYTHON, subprocess_env
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint

from bksdm_lab.common.checkpoint import read_checkpoint
from bksdm_lab.data.common import DataError, ResumableSampler, collate
from bksdm_lab.data.folder import FolderDataModule, ImageCaptionFolder, read_metadata
from bksdm_lab.data.synthetic import make_synthetic_dataset
from bksdm_lab.distill.callbacks import DataQuality
from bksdm_lab.models.demo import byte_level_tokenizer

GOOD = 36


def _jpeg(path, color=(200, 30, 30), size=80):
    Image.new("RGB", (size, size), color).save(path, quality=90)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """36 good JPEGs plus one of every kind of bad or odd sample, in metadata.jsonl (captions may be non-text)."""
    root = tmp_path_factory.mktemp("bad_data")
    rows = []
    for i in range(GOOD):
        _jpeg(root / f"good{i:02d}.jpg", color=(7 * i % 256, 100, 200))
        rows.append({"file_name": f"good{i:02d}.jpg", "text": f"a picture number {i}"})
    (root / "random_bytes.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    _jpeg(root / "whole.jpg", size=256)
    (root / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:600])
    _jpeg(root / "empty_caption.jpg")
    _jpeg(root / "number_caption.jpg")
    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.new("RGBA", (80, 80), (255, 0, 0, 0)).save(root / "rgba.png")  # fully transparent: white, not black
    Image.new("L", (80, 80), 128).save(root / "gray.png")
    Image.fromarray(np.full((80, 80), 65535 // 2, dtype=np.uint16)).save(root / "sixteen.png")
    _jpeg(root / "small.jpg", size=16)
    _jpeg(root / "bomb.jpg", size=200)  # 40,000 pixels > data.max_pixels=10,000 in these tests
    odd = [
        ("random_bytes.jpg", "noise"),
        ("truncated.jpg", "cut short"),
        ("not_there.jpg", "a missing file"),
        ("empty_caption.jpg", "  "),
        ("number_caption.jpg", 42),
        ("cmyk.jpg", "cmyk"),
        ("rgba.png", "rgba"),
        ("gray.png", "gray"),
        ("sixteen.png", "sixteen bit"),
        ("small.jpg", "small"),
        ("bomb.jpg", "a bomb"),
        ("good00.jpg", "good again"),
    ]
    rows += [{"file_name": f, "text": t} for f, t in odd]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root  # 48 samples


def counts(dataset):
    batch = collate([dataset[i] for i in range(len(dataset))])
    return batch, {k: v for k, v in batch["skipped"].items() if v}, {k: v for k, v in batch["converted"].items() if v}


def test_every_bad_sample_is_skipped_or_converted_and_counted(bad_folder):
    ds = ImageCaptionFolder(bad_folder, byte_level_tokenizer(), resolution=64, max_pixels=10_000)
    batch, skipped, converted = counts(ds)
    assert skipped == {"corrupt": 2, "missing": 1, "caption": 2, "bomb": 1}
    assert converted == {"mode": 2, "alpha": 1, "16bit": 1, "small": 1}
    assert batch["num_samples"] == 48 and batch["pixel_values"].shape == (48 - 6, 3, 64, 64)
    by_name = {ds.samples[i][0]: batch["pixel_values"][k] for k, i in enumerate(batch["index"].tolist())}
    assert torch.allclose(by_name["rgba.png"], torch.ones(3, 64, 64))  # transparent became white
    sixteen = by_name["sixteen.png"]
    assert sixteen.min() > -0.05 and sixteen.max() < 0.05  # mid-grey, not clipped to white
    assert ds.samples[-1][0] == "good00.jpg" and (batch["index"] == 47).any()  # duplicates of a file are fine

    strict = ImageCaptionFolder(
        bad_folder, byte_level_tokenizer(), resolution=64, small_images="skip", max_pixels=10_000
    )
    assert counts(strict)[1]["small"] == 1


def test_metadata_errors_list_what_was_found(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"has no metadata.csv or metadata.jsonl; found: \['a.jpg'\]"):
        ImageCaptionFolder(tmp_path, byte_level_tokenizer(), 64)
    with (tmp_path / "metadata.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["file_name", "caption"], ["a.jpg", "hi"]])
    with pytest.raises(
        DataError, match=r"no 'text' column \(data.caption_column\); columns found: \['file_name', 'caption'\]"
    ):
        read_metadata(tmp_path)
    assert read_metadata(tmp_path, caption_column="caption") == [("a.jpg", "hi")]


@pytest.mark.slow
def test_demo_trains_through_bad_samples_and_logs_the_counts(bad_folder, cache_dir, tmp_path):
    """48 samples, micro-batch 8 x 2: one epoch is 3 optimizer steps; every sample is read exactly once."""
    run = tmp_path / "run"
    args = [
        "experiment=demo",
        f"data.root={bad_folder}",
        "~data.synthetic",
        "data.max_pixels=10000",
        "data.max_skipped_fraction=0.5",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "callbacks.samples.prompts=[]",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.train", *args],
        env=subprocess_env(cache_dir),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (run / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    last = {k: float(v) for k, v in rows[-1].items() if k.startswith("data/") and v}
    assert last["data/skipped_corrupt"] == 2 and last["data/skipped_missing"] == 1
    assert last["data/skipped_caption"] == 2 and last["data/skipped_bomb"] == 1
    assert last["data/converted_mode"] == 2 and last["data/converted_alpha"] == 1
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["callbacks"]["DataQuality"]["counts"]["seen"] == 48

    limited = subprocess.run(
        [
            PYTHON,
            "-m",
            "bksdm_lab.train",
            *args[:-1],
            "data.max_skipped_fraction=0.05",
            "data.skip_check_after=16",
            f"hydra.run.dir={tmp_path}/limited",
        ],
        env=subprocess_env(cache_dir),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert limited.returncode == 2
    assert "data.max_skipped_fraction=0.05" in limited.stderr and "unusable" in limited.stderr


def shard_indices(dm, rank, world, epoch):
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, lightning_module=None)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [i for batch in loader for i in batch["index"].tolist()]


def test_two_ranks_two_workers_see_each_sample_exactly_once(demo_data_dir):
    dm = FolderDataModule(demo_data_dir, byte_level_tokenizer(), resolution=64, batch_size=4, num_workers=2)
    assert len(dm.dataset) == 32
    for epoch in (0, 1):
        seen = [i for rank in (0, 1) for i in shard_indices(dm, rank, 2, epoch)]
        assert sorted(seen) == list(range(32)), epoch
    assert shard_indices(dm, 0, 2, 0) != shard_indices(dm, 0, 2, 1)  # reshuffled each epoch


def test_resumed_sampler_continues_where_it_stopped():
    full = ResumableSampler(40, seed=3, rank=1, world_size=2)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableSampler(40, seed=3, rank=1, world_size=2)
    resumed.resume(epoch=2, samples_done=8)
    resumed.set_epoch(2)
    assert list(resumed) == order[8:]
    assert len(list(resumed)) == 20  # the skip applies once: the next pass is the whole epoch again


# ---- the synthetic writer checks what it finds -----------------------------------------------------------------
def folder_state(root):
    return {p.name: p.stat().st_mtime_ns for p in root.iterdir()}


def test_synthetic_set_with_the_same_parameters_is_reused(tmp_path):
    root = make_synthetic_dataset(tmp_path / "shapes", num_images=4, size=32, seed=1)
    assert json.loads((root / "README.json").read_text()) == {"synthetic": True, "num_images": 4, "size": 32, "seed": 1}
    assert len(read_metadata(root)) == 4 and Image.open(root / "00003.jpg").size == (32, 32)
    before = folder_state(root)
    assert make_synthetic_dataset(root, num_images=4, size=32, seed=1) == root
    assert folder_state(root) == before  # nothing rewritten


@pytest.mark.parametrize(
    ("other", "found"),
    [
        ({"num_images": 8}, "num_images=8, size=32, seed=1"),
        ({"size": 48}, "num_images=4, size=48, seed=1"),
        ({"seed": 2}, "num_images=4, size=32, seed=2"),
    ],
)
def test_synthetic_set_written_with_other_parameters_is_an_error(tmp_path, other, found):
    params = {"num_images": 4, "size": 32, "seed": 1}
    root = make_synthetic_dataset(tmp_path / "shapes", **{**params, **other})
    before = folder_state(root)
    with pytest.raises(DataError) as info:
        make_synthetic_dataset(root, **params)
    message = str(info.value)
    assert str(root) in message
    assert f"written with {found}, not the num_images=4, size=32, seed=1 asked for" in message
    assert folder_state(root) == before  # neither reused nor deleted


def test_a_folder_the_synthetic_writer_did_not_write_is_an_error(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(DataError, match=rf"{root} exists but is not a synthetic data set written by bksdm_lab"):
        make_synthetic_dataset(root, num_images=4, size=32)
    (root / "README.json").write_text('{"synthetic": true, "num_im')  # cut short
    with pytest.raises(DataError, match="README.json: .*asked for num_images=4, size=32, seed=0"):
        make_synthetic_dataset(root, num_images=4, size=32)
    assert sorted(p.name for p in root.iterdir()) == ["README.json", "metadata.csv"]


def test_a_changed_synthetic_set_is_an_error(tmp_path):
    root = make_synthetic_dataset(tmp_path / "shapes", num_images=4, size=32)
    lines = (root / "metadata.csv").read_text().splitlines()
    (root / "metadata.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match=r"was changed after it was written: its metadata.csv lists 3 images"):
        make_synthetic_dataset(root, num_images=4, size=32)


def test_a_synthetic_set_from_before_the_size_was_recorded(tmp_path):
    """README.json of an older version has no size: the images' own size stands in for it."""
    root = make_synthetic_dataset(tmp_path / "shapes", num_images=4, size=32)
    (root / "README.json").write_text(json.dumps({"synthetic": True, "num_images": 4, "seed": 0}))
    assert make_synthetic_dataset(root, num_images=4, size=32) == root
    with pytest.raises(DataError, match="written with num_images=4, size=32, seed=0, not the num_images=4, size=80"):
        make_synthetic_dataset(root, num_images=4, size=80)


def test_demo_data_module_checks_the_demo_set(tmp_path):
    """data=demo over a folder holding another synthetic set: the error, not 4 images trained as if 256."""
    from bksdm_lab.data.synthetic import DemoDataModule

    root = make_synthetic_dataset(tmp_path / "data", num_images=4, size=80)
    with pytest.raises(DataError, match="written with num_images=4, size=80, seed=0, not the num_images=256"):
        DemoDataModule(root, byte_level_tokenizer(), synthetic={"num_images": 256, "size": 80})


def test_sample_indices_stay_on_the_host_when_a_batch_moves():
    """The module seeds each sample's draws from ``index``: on the device that would be a host sync per micro-step."""
    from bksdm_lab.data.common import CaptionDataModule

    batch = {"pixel_values": torch.zeros(2, 3, 8, 8), "index": torch.tensor([3, 7])}
    moved = CaptionDataModule(tokenizer=None, resolution=8, batch_size=2).transfer_batch_to_device(batch, "meta", 0)
    assert moved["index"] is batch["index"] and moved["pixel_values"].device.type == "meta"


# ---- samples come from inside data.root ---------------------------------------------------------------------------
@pytest.fixture()
def reaching_out(tmp_path):
    """A folder whose metadata names 4 images inside it (one through a symlink that stays inside) and 3 outside it:
    `../`, an absolute path, and a symlink out."""
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    for i in range(3):
        _jpeg(root / f"in{i}.jpg")
    _jpeg(elsewhere / "secret.jpg")
    (root / "inner_link.jpg").symlink_to(root / "in0.jpg")
    (root / "outer_link.jpg").symlink_to(elsewhere / "secret.jpg")
    names = ["in0.jpg", "in1.jpg", "../elsewhere/secret.jpg", "in2.jpg", str(elsewhere / "secret.jpg")]
    names += ["outer_link.jpg", "inner_link.jpg"]
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a shape"}) + "\n" for n in names))
    return root


def test_entries_outside_the_root_are_skipped_and_counted(reaching_out, caplog):
    ds = ImageCaptionFolder(reaching_out, byte_level_tokenizer(), resolution=64)
    with caplog.at_level("WARNING"):
        batch, skipped, _ = counts(ds)
    assert skipped == {"outside": 3} and batch["index"].tolist() == [0, 1, 3, 6]
    assert "../elsewhere/secret.jpg is " in caplog.text and "outside data.root" in caplog.text
    opted_out = ImageCaptionFolder(reaching_out, byte_level_tokenizer(), resolution=64, allow_outside_root=True)
    assert counts(opted_out)[1] == {}


def test_a_folder_whose_entries_all_lie_outside_is_refused_before_loading(reaching_out, compose_train):
    from bksdm_lab.distill.checks import check_data

    def problems(*overrides):
        data = [f"data.root={reaching_out}", "~data.synthetic", "data.batch_size=1"]
        return check_data(compose_train("experiment=demo", *data, *overrides))

    assert problems() == []  # some entries lie inside: those outside are skipped and counted when read
    lines = (reaching_out / "metadata.jsonl").read_text().splitlines()
    (reaching_out / "metadata.jsonl").write_text("\n".join(lines[2:3] + lines[4:6]) + "\n")
    (problem,) = problems()
    assert "every entry of its metadata resolves outside it" in problem and "data.allow_outside_root=true" in problem
    assert problems("data.allow_outside_root=true") == []


# ---- the data position and the bad-sample counts across a resume, through Lightning's checkpoint ------------------
class Recorder(pl.LightningModule):
    """The smallest module that trains: one weight; it records the sample indices it trained on."""

    def __init__(self):
        super().__init__()
        self.weight, self.seen = torch.nn.Parameter(torch.zeros(1)), []

    def training_step(self, batch, batch_idx):
        self.seen += batch["index"].tolist() if "index" in batch else []
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_in_two(make_datamodule, stop: int, steps: int, folder) -> tuple[tuple, tuple]:
    """(samples, DataQuality counts) of a run of ``steps`` optimizer steps, and of one stopped at ``stop`` (its last
    checkpoint) and resumed to ``steps``."""

    def fit(max_steps, name, ckpt_path=None):
        module, quality = Recorder(), DataQuality()
        save = ModelCheckpoint(dirpath=folder / name, save_last=True, every_n_train_steps=1)
        trainer = pl.Trainer(
            max_steps=max_steps,
            max_epochs=4,  # a data position that never advances ends, and fails, instead of looping on
            accelerator="cpu",
            logger=False,
            callbacks=[quality, save],
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            default_root_dir=folder,
        )
        trainer.fit(module, datamodule=make_datamodule(), ckpt_path=ckpt_path)
        return module.seen, quality.counts

    whole = fit(steps, "whole")
    first, _ = fit(stop, "first")
    rest, counts = fit(steps, "rest", ckpt_path=folder / "first" / "last.ckpt")
    return whole, (first + rest, counts)


def test_a_resumed_folder_run_continues_at_the_next_sample_and_keeps_counting(bad_folder, tmp_path):
    """48 samples (6 unusable) in micro-batches of 4: 12 steps an epoch; stopped at 5, resumed to 15 (into epoch 1)."""

    def make():
        return FolderDataModule(bad_folder, byte_level_tokenizer(), 64, batch_size=4, max_pixels=10_000)

    (whole, whole_counts), (resumed, resumed_counts) = fit_in_two(make, 5, 15, tmp_path)
    assert whole_counts["seen"] == 60 and whole_counts["skipped_corrupt"] >= 2
    assert resumed == whole and resumed_counts == whole_counts
