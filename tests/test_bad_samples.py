"""A micro-batch whose samples are all unusable kills nothing: the run goes on and counts it."""

import csv
import math

import pytest
import torch
from conftest import compose_train_cfg
from hydra.core.hydra_config import HydraConfig

from bksdm_lab import train as train_app
from bksdm_lab.common.checkpoint import read_checkpoint
from bksdm_lab.distill.callbacks import Throughput, usable_samples


@pytest.fixture()
def compose_train(tmp_path, monkeypatch, cache_dir, demo_teacher_dir):
    """conf/train.yaml composed as `python -m bksdm_lab.train` would, into this test's own run dir."""
    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))
    run_dir = tmp_path / "run"

    def make(*overrides):
        return compose_train_cfg(run_dir, *overrides)

    yield make
    HydraConfig.instance().cfg = None


def test_usable_samples_of_a_batch():
    assert usable_samples({"input_ids": torch.zeros(3, 77), "skipped": {}}) == 3
    assert usable_samples({"skipped": {"corrupt": 1}, "converted": {}, "num_samples": 1}) == 0


@pytest.mark.slow  # in-process, but a whole (tiny) epoch with every callback: about 35 s on 2 cores
def test_one_corrupt_image_at_batch_size_1_is_skipped_and_counted(compose_train, tmp_path):
    """A real demo fit (every default callback: data quality, EMA, samples, throughput, checkpoints, export; W&B
    offline + CSV) on 16 images, one of them corrupt, one image per micro-batch: a whole epoch trains, the corrupt
    one is counted, every step's throughput is logged, and the run exports its pipeline."""
    from bksdm_lab.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_images=16, size=80)
    (data / "00005.jpg").write_bytes(b"this is not a JPEG")
    cfg = compose_train(
        "experiment=demo",
        f"data.root={data}",
        "~data.synthetic",
        "data.batch_size=1",
        "data.max_skipped_fraction=0.5",
        "trainer.max_steps=8",  # 16 micro-batches of 1 x 2 accumulation: the whole epoch, the corrupt one included
        "trainer.log_every_n_steps=1",
        "callbacks.samples.every_n_steps=4",
        "callbacks.samples.num_inference_steps=2",
        "callbacks.checkpoint.every_n_train_steps=4",
    )
    assert any(isinstance(c, Throughput) or "Throughput" in str(c.get("_target_")) for c in cfg.callbacks.values())
    train_app.main(cfg)  # no exception: the run finished

    run_dir = tmp_path / "run"
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    skipped = [float(r["data/skipped_corrupt"]) for r in rows if r.get("data/skipped_corrupt")]
    assert skipped and max(skipped) == 1.0  # counted, once
    steps = {int(r["step"]) for r in rows if r.get("perf/images_per_s")}
    rates = [float(r["perf/images_per_s"]) for r in rows if r.get("perf/images_per_s")]
    assert len(steps) >= 7 and all(math.isfinite(x) and x > 0 for x in rates), rows  # every step's throughput
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 8
    assert (run_dir / "pipeline" / "model_index.json").is_file()
