"""Precomputed latents: the cache reproduces the online VAE posterior (and its flip), resumes, and trains with no VAE."""

import contextlib
import io
import json
import os
import shutil
import subprocess
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF, PYTHON, arch_cfg, run_app, subprocess_env
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

    # damaged shards in the middle of the stream: encoded again from their place in it, the others untouched
    middle = {k: torch.load(out / f"shard-0000{k}.pt", weights_only=True) for k in (1, 2)}
    (out / "shard-00001.pt").write_bytes(b"")
    (out / "shard-00002.pt").unlink()
    mtimes = {k: (out / f"shard-0000{k}.pt").stat().st_mtime_ns for k in (0, 3)}
    prepare(cfg)
    for k, shard in middle.items():
        again = torch.load(out / f"shard-0000{k}.pt", weights_only=True)
        assert torch.equal(shard["index"], again["index"]) and torch.allclose(shard["mean"], again["mean"])
    assert {k: (out / f"shard-0000{k}.pt").stat().st_mtime_ns for k in (0, 3)} == mtimes
    assert len(LatentShards(out)) == 32


# ---- a cache is checked against its files ---------------------------------------------------------------------------
def damage(out):
    """Shard 1 cut short, shard 2 deleted, shard 3 with one byte changed (its size unchanged)."""
    (out / "shard-00001.pt").write_bytes((out / "shard-00001.pt").read_bytes()[:-100])
    (out / "shard-00002.pt").unlink()
    data = bytearray((out / "shard-00003.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "shard-00003.pt").write_bytes(bytes(data))


def test_a_damaged_cache_is_refused_named_when_read_and_repaired(cache, cache_dir, compose_train, tmp_path):
    from bksdm_lab.data.common import DataError
    from bksdm_lab.distill.checks import check_data

    out = shutil.copytree(cache[0], tmp_path / "cache")
    before = {k: torch.load(out / f"shard-0000{k}.pt", weights_only=True) for k in (1, 2, 3)}
    first = (out / "shard-00000.pt").stat().st_mtime_ns
    damage(out)

    cfg = compose_train("experiment=demo", "data=latents", f"data.root={out}", "data.batch_size=4")
    (problem,) = check_data(cfg)  # before loading: the sizes (a checksum would read the whole cache)
    assert "shard-00001.pt is " in problem and "bytes, meta.json lists" in problem
    assert "shard-00002.pt is missing" in problem and "shard-00003" not in problem
    assert "`python -m bksdm_lab.prepare " in problem and f"out={out}`" in problem

    shards = LatentShards(out)
    with pytest.raises(DataError, match="shard-00003.pt does not match its sha256 in meta.json"):
        shards[24]  # rows 24..31 are shard 3's
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(shards, [25]), num_workers=1)
    with pytest.raises(DataError) as raised:
        next(iter(loader))  # raised in a worker: still one line
    assert str(raised.value).startswith(f"the latent cache {out} is damaged: shard-00003.pt") and "\n" not in str(
        raised.value
    )

    args = [a for a in cache[1] if not a.startswith("out=")] + [f"out={out}"]
    printed = prepare_in_process(args, cache_dir)
    assert (
        "3 shard(s) of" in printed
        and "(shard-00001.pt, shard-00002.pt, shard-00003.pt): encoding them again" in printed
    )
    assert "32 of 32 samples cached" in printed
    assert (out / "shard-00000.pt").stat().st_mtime_ns == first  # the sound shard is not redone
    for k, shard in before.items():
        again = torch.load(out / f"shard-0000{k}.pt", weights_only=True)
        assert torch.equal(again["index"], shard["index"]) and torch.equal(again["mean"], shard["mean"])
    assert check_data(cfg) == [] and json.loads((out / "meta.json").read_text())["skipped"] == cache_skipped(cache)


def cache_skipped(cache):
    return json.loads((cache[0] / "meta.json").read_text())["skipped"]


def test_a_cache_written_without_sizes_and_checksums_still_loads(cache, compose_train, tmp_path):
    from bksdm_lab.distill.checks import check_data

    out = shutil.copytree(cache[0], tmp_path / "cache")
    meta = json.loads((out / "meta.json").read_text())
    for entry in meta["shards"]:
        for key in ("bytes", "sha256", "skipped"):
            entry.pop(key, None)
    (out / "meta.json").write_text(json.dumps(meta))
    cfg = compose_train("experiment=demo", "data=latents", f"data.root={out}", "data.batch_size=4")
    assert check_data(cfg) == [] and LatentShards(out)[31]["latent_mean"].shape[0] == 4
    (out / "shard-00002.pt").unlink()
    (problem,) = check_data(cfg)
    assert "shard-00002.pt is missing" in problem and "python -m bksdm_lab.prepare teacher=demo" in problem


# ---- a folder that cannot be written -------------------------------------------------------------------------------
@pytest.fixture()
def read_only(tmp_path):
    """An empty folder nobody can write: mode 555, or (for root, whom modes do not stop) a read-only tmpfs."""
    path = tmp_path / "read_only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("running as root, and mounting a read-only folder is not allowed here")
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("where", ["", "/cache"])
def test_prepare_into_a_folder_that_cannot_be_written_is_one_line(
    read_only, where, cache_dir, demo_teacher_dir, capsys, monkeypatch, no_hydra_state_left
):
    from bksdm_lab.data.prepare import main

    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))
    code, _, err = run_app(main, ["teacher=demo", "data=demo", f"out={read_only}{where}"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert f"bksdm_lab.prepare: error: out='{read_only}{where}' cannot be written" in err


def test_demo_data_that_cannot_be_written_is_one_line(
    read_only, tmp_path, cache_dir, demo_teacher_dir, compose_train, capsys, monkeypatch, no_hydra_state_left
):
    """data=demo writes its set at data.root when it is missing: prepare (after loading) and train (before)."""
    from bksdm_lab.data.prepare import main
    from bksdm_lab.distill.checks import check_data

    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))
    argv = ["teacher=demo", "data=demo", f"data.root={read_only}/data", f"out={tmp_path}/cache"]
    code, _, err = run_app(main, argv, capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("bksdm_lab.prepare: error: ") and str(read_only) in err.splitlines()[-1]
    (problem,) = check_data(compose_train("experiment=demo", f"data.root={read_only}/data"))
    assert f"data.root='{read_only}/data' does not exist and {read_only} cannot be written" in problem
