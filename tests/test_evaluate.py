"""`bksdm_lab.evaluate`: real-image statistics, then generate + FID/IS/CLIP end to end, resumable; tiny models."""

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, subprocess_env
from PIL import Image
from test_generate import export_demo_student

from bksdm_lab.evaluation import evaluate as ev
from bksdm_lab.evaluation import metrics

TINY = ["--feature-extractor", "demo", "--clip", "demo"]


@pytest.fixture(scope="module")
def exported(cache_dir) -> Path:
    return export_demo_student(cache_dir)


def run_cli(args, cache_dir, cwd):
    proc = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.evaluate", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=subprocess_env(cache_dir),
        timeout=600,
    )
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def ref_stats(demo_data_dir, cache_dir, tmp_path_factory) -> Path:
    """`evaluate stats` on the demo's 32 synthetic images, squashed to 256 px."""
    out = tmp_path_factory.mktemp("stats") / "demo_256.npz"
    proc = run_cli(["stats", "--images", demo_data_dir, "--out", out, *TINY[:2]], cache_dir, out.parent)
    assert f"wrote {out} (32 images, 32-d features" in proc.stdout
    return out


def eval_args(exported, demo_data_dir, ref_stats, out) -> list[str]:
    args = ["--pipeline", exported, "--metadata", demo_data_dir / "metadata.csv", "--num-prompts", 4]
    args += ["--steps", 2, "--resolution", 64, "--ref-stats", ref_stats, "--out", out, *TINY]
    return [str(a) for a in args]


def test_stats_npz(ref_stats, demo_data_dir):
    with np.load(ref_stats) as data:
        assert sorted(data.files) == ["mu", "sigma"]
        assert data["mu"].shape == (32,) and data["sigma"].shape == (32, 32)
    stats = ev.compute_stats(demo_data_dir, metrics.demo_extractor(), resize=256)
    mu, sigma = metrics.load_stats(ref_stats)
    np.testing.assert_allclose(mu, stats.mu, rtol=1e-6)
    np.testing.assert_allclose(sigma, stats.sigma, rtol=1e-5, atol=1e-9)


def test_evaluate_cli_end_to_end_then_resume(exported, demo_data_dir, ref_stats, cache_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = eval_args(exported, demo_data_dir, ref_stats, out)
    proc = run_cli([*args, "--wandb"], cache_dir, tmp_path)
    assert "4 images generated" in proc.stdout
    assert "meaningless" in proc.stdout  # the demo models are called what they are

    results = json.loads((out / "results.json").read_text())
    for key in ("fid", "is", "clip_score"):
        assert isinstance(results[key], float) and np.isfinite(results[key]), key
    assert results["fid"] >= 0 and results["is"] >= 1 and -1 <= results["clip_score"] <= 1
    assert results["num_images"] == 4 and results["comparable_to_paper"] is False
    gen_settings = results["generation"]
    assert gen_settings["scheduler"] == "PNDMScheduler" and gen_settings["seed"] == 1234
    assert gen_settings["seed_mode"] == "paper" and gen_settings["guidance"] == 7.5
    assert gen_settings["generated"] == 4 and gen_settings["images_per_s"] > 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    assert (out / "grid.png").is_file() and (out / "generated_stats.npz").is_file()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs

    # the same command again: nothing is generated, the numbers are the same
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    again = ev.main(args + ["--no-progress"])
    printed = capsys.readouterr().out
    assert "0 images generated" in printed and "4 already on disk" in printed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    for key in ("fid", "is", "clip_score"):
        assert again[key] == pytest.approx(results[key], rel=1e-9)

    # no pipeline: score what is on disk
    scored = ev.main([a for a in args if a not in ("--pipeline", str(exported))] + ["--no-progress"])
    assert scored["fid"] == pytest.approx(results["fid"], rel=1e-9)


def test_evaluate_function_equals_the_metrics_by_hand(demo_data_dir):
    paths = sorted(demo_data_dir.glob("*.jpg"))
    with (demo_data_dir / "metadata.csv").open() as f:
        captions = {row["file_name"]: row["text"] for row in csv.DictReader(f)}
    real, fake = paths[:16], paths[16:]
    prompts = [captions[p.name] for p in fake]
    extractor, clip = metrics.demo_extractor(), metrics.demo_clip()
    ref = metrics.FeatureStats()
    for p in real:
        ref.update(extractor(metrics.to_uint8_batch([Image.open(p).resize((256, 256), Image.BICUBIC)]))[0])

    results = ev.evaluate(
        fake, prompts, feature_extractor=extractor, clip_model=clip, ref_stats=(ref.mu, ref.sigma), batch_size=5
    )

    images = [Image.open(p).convert("RGB").resize((256, 256), Image.BICUBIC) for p in fake]
    with torch.no_grad():
        feats, logits = extractor(metrics.to_uint8_batch(images))
    gen_stats = metrics.FeatureStats.from_features(feats)
    assert results["fid"] == pytest.approx(
        metrics.frechet_distance(gen_stats.mu, gen_stats.sigma, ref.mu, ref.sigma), rel=1e-5
    )
    assert results["is"] == pytest.approx(metrics.inception_score(logits, splits=10)[0], rel=1e-5)
    img, txt = clip.encode_images(images).double(), clip.encode_texts(prompts).double()
    cos = (img * txt).sum(1) / (img.norm(dim=1) * txt.norm(dim=1))
    assert results["clip_score"] == pytest.approx(float(cos.mean()), rel=1e-5)
    assert results["num_images"] == 16


def test_paper_models_and_table():
    assert ev.paper_model("nota-ai/bk-sdm-tiny") == "BK-SDM-Tiny"
    assert ev.paper_model("/models/bk-sdm-small-2m") == "BK-SDM-Small-2M"
    assert ev.paper_model("nota-ai/bk-sdm-v2-base") == "BK-SDM-v2-Base"
    assert ev.paper_model("CompVis/stable-diffusion-v1-4") == "SD-v1.4"
    assert ev.paper_model("stabilityai/stable-diffusion-2-1-base") == "SD-v2.1-base"
    assert ev.paper_model("CompVis/stable-diffusion-v1-4 + unet /x/bk-sdm-base") == "BK-SDM-Base"
    assert ev.paper_model("/tmp/export-ema-step000004") is None
    table = ev.format_table(
        {"paper_model": "BK-SDM-Tiny", "fid": 17.3, "is": 30.0, "clip_score": 0.26, "num_images": 4}
    )
    assert "paper (BK-SDM-Tiny)" in table and "17.12" in table and "0.2653" in table and "30,000" in table


def test_missing_images_without_a_pipeline(demo_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ev.main(
            ["--metadata", str(demo_data_dir / "metadata.csv"), "--num-prompts", "2", "--out", str(tmp_path), *TINY]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "2 of 2 images are missing" in err and "no pipeline given" in err


def test_default_models_fail_before_generating(exported, demo_data_dir, tmp_path, capsys):
    try:
        import torch_fidelity  # noqa: F401

        pytest.skip("torch-fidelity is installed: the default extractor is available")
    except ImportError:
        pass
    with pytest.raises(SystemExit) as exc:
        ev.main(["--pipeline", str(exported), "--prompt", "x", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[eval]"' in err and "--feature-extractor demo" in err
    assert not (tmp_path / "out" / "images").exists()  # failed before any generation


class FakeLogger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, metrics))


def test_eval_callback_logs_fid_and_clip_score(exported, demo_teacher_dir, demo_data_dir, ref_stats, tmp_path):
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel
    from omegaconf import OmegaConf

    from bksdm_lab.models.teachers import load_teacher

    teacher = load_teacher(OmegaConf.create({"name": "demo", "pretrained": str(demo_teacher_dir)}))
    student = UNet2DConditionModel.from_pretrained(exported, subfolder="unet").train()
    module = SimpleNamespace(teacher=teacher, student=student, ema_student=None, device=torch.device("cpu"))
    logger = FakeLogger()
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, loggers=[logger])
    callback = ev.EvalCallback(
        metadata=str(demo_data_dir / "metadata.csv"),
        num_prompts=3,
        ref_stats=str(ref_stats),
        every_n_steps=2,
        num_inference_steps=2,
        batch_size=2,
        feature_extractor="demo",
        clip="demo",
        out_dir=str(tmp_path),
    )
    callback.setup(trainer, module, "fit")
    for step in (1, 2, 3):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, step)
    callback.on_train_end(trainer, module)
    assert [step for step, _ in logger.logged] == [2, 3]
    for _, logged in logger.logged:
        assert {"eval/fid", "eval/is", "eval/clip_score"} <= set(logged)
        assert all(np.isfinite(v) for v in logged.values())
    assert student.training  # put back as it was
    assert len(list((tmp_path / "step000002" / "images").iterdir())) == 3
    # the same student, the same per-prompt seeds: the same numbers at both steps
    assert logger.logged[0][1]["eval/fid"] == pytest.approx(logger.logged[1][1]["eval/fid"], rel=1e-6)

    bad = ev.EvalCallback(prompts=["x"], feature_extractor="resnet")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        bad.setup(trainer, module, "fit")
