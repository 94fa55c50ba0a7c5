"""Precomputed latents: the cache reproduces the online VAE posterior (and its flip), resumes, and trains with no VAE."""

import contextlib
import io
import json
import os
import subprocess
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF, PYTHON, arch_cfg, subprocess_env
from omegaconf import OmegaConf

from bksdm_lab.data.common import collate
from bksdm_lab.data.folder import ImageCaptionFolder
from bksdm_lab.data.latents import LatentDataModule, LatentShards
from bksdm_lab.distill.losses import KDLoss, OutputKD, TaskLoss
from bksdm_lab.distill.module import DistillModule
from bksdm_lab.models.students import init_student_from_teacher
from bksdm_lab.models.teachers import load_teacher


@pytest.fixture(scope="module")
def cache(cache_dir, demo_teacher_dir, demo_data_dir, tmp_path_factory):
    """`python -m bksdm_lab.prepare` (in-process) on the 32-image test set, shards of 8 rows, fp32 storage."""
    out = tmp_path_factory.mktemp("latents") / "cache"
    args = [
        "teacher=demo",
        "data=demo",
        f"data.root={demo_data_dir}",
        "~data.synthetic",
        f"out={out}",
        "shard_size=8",
        "batch_size=4",
        "num_workers=0",
        "dtype=float32",
    ]
    assert "32 of 32 samples cached" in prepare_in_process(args, cache_dir)
    return out, args


def prepare_in_process(args, cache_dir) -> str:
    """`python -m bksdm_lab.prepare <args>`'s function on the composed config, in-process; returns what it printed."""
    from hydra import compose, initialize_config_dir

    from bksdm_lab.data.prepare import prepare

    printed = io.StringIO()
    with mock.patch.dict(os.environ, {"BKSDM_CACHE_DIR": str(cache_dir)}), contextlib.redirect_stdout(printed):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="prepare", overrides=args)
        prepare(cfg)
    return printed.getvalue()


def teacher_cfg(path):
    return OmegaConf.create({"name": "demo", "pretrained": str(path), "revision": None, "variant": None})


def test_cache_holds_the_posterior_of_each_image_and_of_its_mirror(cache, teacher, demo_data_dir):
    out, _ = cache
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and [s["count"] for s in meta["shards"]] == [8, 8, 8, 8]
    assert meta["scaling_factor"] == teacher.vae.config.scaling_factor
    shards = LatentShards(out)
    images = ImageCaptionFolder(demo_data_dir, teacher.tokenizer, resolution=64, random_flip=False)
    for position in (0, 13, 31):
        cached, mirrored = shards[position], shards[(position, True)]
        sample = images[cached["index"]]
        with torch.no_grad():
            for pixels, got in ((sample["pixel_values"], cached), (sample["pixel_values"].flip(-1), mirrored)):
                posterior = teacher.vae.encode(pixels[None]).latent_dist
                torch.testing.assert_close(got["latent_mean"], posterior.mean[0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(got["latent_std"], posterior.std[0], atol=1e-5, rtol=1e-4)
        assert torch.equal(cached["input_ids"], sample["input_ids"])
        assert not torch.allclose(cached["latent_mean"], mirrored["latent_mean"])


def test_cached_latents_are_sampled_like_the_online_path(cache, teacher, demo_data_dir):
    """Same generator state -> the same latents from the cache as from the VAE (the noise is not collapsed)."""
    out, _ = cache
    module = DistillModule(
        teacher,
        init_student_from_teacher(teacher.unet, arch_cfg("tiny")),
        KDLoss({"task": TaskLoss()}, {"task": 1.0}),
        optimizer=torch.optim.AdamW,
    )
    shards = LatentShards(out)
    images = ImageCaptionFolder(demo_data_dir, teacher.tokenizer, resolution=64, random_flip=False)
    cached = [shards[p] for p in (2, 5)]
    online = collate([images[c["index"]] for c in cached])
    from bksdm_lab.data.latents import collate_latents

    module._rng = None
    from_pixels, cond_a = module.encode(online)
    module._rng = None
    from_cache, cond_b = module.encode(collate_latents(cached, shards.scaling_factor))
    torch.testing.assert_close(from_cache, from_pixels, atol=1e-5, rtol=1e-4)
    assert torch.equal(cond_a, cond_b)
    module._rng = None
    again = module.encode(collate_latents(cached, shards.scaling_factor))[0]
    module._rng = torch.Generator().manual_seed(99)
    other = module.encode(collate_latents(cached, shards.scaling_factor))[0]
    assert torch.equal(again, from_cache) and not torch.allclose(other, from_cache)  # a sample, not the mean


def test_training_from_the_cache_never_builds_a_vae(cache, demo_teacher_dir, monkeypatch):
    out, _ = cache
    teacher = load_teacher(teacher_cfg(demo_teacher_dir), load_vae=False)
    import diffusers

    def no_vae(*args, **kwargs):
        raise AssertionError("a VAE was instantiated while training from cached latents")

    monkeypatch.setattr(diffusers.AutoencoderKL, "__init__", no_vae)
    module = DistillModule(
        teacher,
        init_student_from_teacher(teacher.unet, arch_cfg("tiny")),
        KDLoss({"task": TaskLoss(), "out_kd": OutputKD()}, {"task": 1.0, "out_kd": 1.0}),
        optimizer=torch.optim.AdamW,
    )
    dm = LatentDataModule(out, batch_size=4, resolution=64)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert teacher.vae is None and module.vae is None and "vae" not in module.frozen


def test_prepare_resumes_at_the_first_missing_shard(cache, cache_dir, tmp_path):
    out, args = cache
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.pt")}
    (out / "shard-00002.pt").unlink()  # as if killed while writing the third shard
    meta["shards"] = [s for s in meta["shards"] if s["file"] != "shard-00002.pt"]
    meta.update(complete=False, done=24)
    meta_path.write_text(json.dumps(meta))
    assert "32 of 32 samples cached" in prepare_in_process(args, cache_dir)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.pt")}
    assert sorted(after) == sorted(before)
    assert {k: v for k, v in after.items() if k != "shard-00002.pt"} == {
        k: v for k, v in before.items() if k != "shard-00002.pt"
    }  # finished shards are not redone
    assert json.loads(meta_path.read_text())["complete"]


@pytest.mark.slow
def test_train_command_on_cached_latents(cache, cache_dir, tmp_path):
    out, _ = cache
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "bksdm_lab.train",
            "experiment=demo",
            "data=latents",
            f"data.root={out}",
            "data.batch_size=4",
            "trainer.max_steps=3",
            "callbacks.samples.prompts=[]",
            f"hydra.run.dir={run}",
        ],
        env=subprocess_env(cache_dir),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "pipeline" / "vae" / "config.json").is_file()  # the VAE is loaded for the export only
    bad = subprocess.run(
        [
            PYTHON,
            "-m",
            "bksdm_lab.train",
            "experiment=demo",
            "data=latents",
            f"data.root={tmp_path}",
            f"hydra.run.dir={tmp_path}/bad",
        ],
        env=subprocess_env(cache_dir),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "not a latent cache" in bad.stderr and "bksdm_lab.prepare" in bad.stderr


@pytest.fixture(scope="module")
def wds_shards(demo_data_dir, tmp_path_factory):
    """The 32 demo images as 4 img2dataset-style tar shards (<key>.jpg + <key>.txt)."""
    import csv
    import io
    import tarfile

    with (demo_data_dir / "metadata.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    folder = tmp_path_factory.mktemp("wds")
    shards = []
    for s in range(4):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, row in enumerate(rows[s * 8 : (s + 1) * 8]):
                key = f"{s:05d}{i:04d}"
                for ext, data in (
                    ("jpg", (demo_data_dir / row["file_name"]).read_bytes()),
                    ("txt", row["text"].encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(str(path))
    return shards


def test_prepare_builds_the_data_set_through_the_data_config(cache, wds_shards, demo_teacher_dir, tmp_path):
    """data=webdataset (data._target_ = the WebDataset module): the same posteriors as the folder cache; resumes."""
    from test_generate import compose

    from bksdm_lab.data.prepare import prepare

    out = tmp_path / "wds_cache"
    overrides = ["teacher=demo", f"teacher.pretrained={demo_teacher_dir}", "data=webdataset"]
    overrides += [f"data.shards=[{','.join(wds_shards)}]", f"out={out}", "shard_size=8", "batch_size=4"]
    cfg = compose("prepare", [*overrides, "num_workers=0", "dtype=float32"])
    prepare(cfg)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["num_rows"] == 32 and [s["count"] for s in meta["shards"]] == [8, 8, 8, 8]
    streamed, folder = LatentShards(out), LatentShards(cache[0])
    assert len(streamed) == 32
    folder_means = [folder[i]["latent_mean"] for i in range(len(folder))]
    for i in range(32):  # every image's posterior, as the folder cache has it (the order is the stream's)
        mean = streamed[i]["latent_mean"]
        assert any(torch.allclose(mean, m, atol=1e-5, rtol=1e-4) for m in folder_means), i

    # killed before the last shard: a rerun writes only that one, the same
    last = out / "shard-00003.pt"
    before = torch.load(last, weights_only=True)
    last.unlink()
    meta["shards"] = meta["shards"][:3]
    meta.update(complete=False, done=24)
    (out / "meta.json").write_text(json.dumps(meta))
    mtime = (out / "shard-00000.pt").stat().st_mtime_ns
    prepare(cfg)
    after = torch.load(last, weights_only=True)
    assert torch.equal(before["index"], after["index"]) and torch.allclose(before["mean"], after["mean"])
    assert (out / "shard-00000.pt").stat().st_mtime_ns == mtime
    assert json.loads((out / "meta.json").read_text())["complete"]
