"""`bksdm_lab.evaluate`: real-image statistics, then generate + FID/IS/CLIP end to end, resumable; tiny models."""

import contextlib
import csv
import io
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, run_app, subprocess_env
from omegaconf import OmegaConf
from PIL import Image
from test_generate import compose

from bksdm_lab import evaluate as app
from bksdm_lab.evaluation import evaluate as ev
from bksdm_lab.evaluation import metrics
from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.evaluation.callback import EvalCallback
from bksdm_lab.evaluation.paper import paper_model

TINY = ["feature_extractor=demo", "clip=demo"]


@pytest.fixture(scope="module")
def exported(demo_export_dir) -> Path:
    return demo_export_dir


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


def run_in_process(args, capsys, monkeypatch) -> str:
    """`python -m bksdm_lab.evaluate <args>` in-process (sys.argv through hydra.main); returns its stdout."""
    code, out, err = run_app(app.main, args, capsys, monkeypatch)
    assert code == 0, f"exit {code}\nSTDOUT:\n{out[-3000:]}\nSTDERR:\n{err[-5000:]}"
    return out


@pytest.fixture(scope="module")
def ref_stats(demo_data_dir, tmp_path_factory) -> Path:
    """`evaluate stats` on the 32 synthetic test images, squashed to 256 px (the app's function, in-process)."""
    out = tmp_path_factory.mktemp("stats") / "demo_256.npz"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        app.run_stats(compose("evaluate_stats", [f"images={demo_data_dir}", f"out={out}", TINY[0]]))
    assert f"wrote {out} (32 images, 32-d features" in printed.getvalue()
    return out


def eval_args(exported, demo_data_dir, ref_stats, out) -> list[str]:
    args = [f"pipeline={exported}", f"metadata={demo_data_dir / 'metadata.csv'}", "num_prompts=4"]
    return args + ["sampling.steps=2", "sampling.resolution=64", f"ref_stats={ref_stats}", f"out={out}", *TINY]


def test_stats_npz(ref_stats, demo_data_dir):
    with np.load(ref_stats) as data:
        assert sorted(data.files) == ["mu", "n", "sigma"] and int(data["n"]) == 32
        assert data["mu"].shape == (32,) and data["sigma"].shape == (32, 32)
    stats, _ = ev.compute_stats(demo_data_dir, metrics.demo_extractor(), resize=256)
    mu, sigma = metrics.load_stats(ref_stats)
    np.testing.assert_allclose(mu, stats.mu, rtol=1e-6)
    np.testing.assert_allclose(sigma, stats.sigma, rtol=1e-5, atol=1e-9)


def test_stats_skip_count_and_name_unusable_images(demo_data_dir, tmp_path, capsys, monkeypatch):
    """`evaluate stats` skips files that are no usable image (as training does): counted and named, and the
    statistics are those of the usable images; with none usable, one line and exit 2."""
    images, usable = tmp_path / "images", tmp_path / "usable"
    usable.mkdir()
    for path in sorted(demo_data_dir.glob("*.jpg"))[:4]:
        shutil.copy(path, usable)
    shutil.copytree(usable, images)
    (images / "zz_text.jpg").write_text("not an image")
    whole = (usable / "00000.jpg").read_bytes()
    (images / "zz_cut.jpg").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "stats.npz"
    args = ["stats", f"images={images}", f"out={out}", TINY[0], "progress=false", f"hydra.run.dir={tmp_path / 'h'}"]
    stdout = run_in_process(args, capsys, monkeypatch)
    assert "skipped 2 unusable image file(s): " in stdout and "zz_cut.jpg" in stdout and "zz_text.jpg" in stdout
    assert f"wrote {out} (4 images, 32-d features, feature extractor demo; 2 unusable skipped)" in stdout
    expected, skipped = ev.compute_stats(usable, metrics.demo_extractor(), resize=256)
    assert skipped == [] and np.array_equal(metrics.FeatureStats.load(out).mu, expected.mu)

    for path in usable.iterdir():
        path.write_bytes(b"")
    args[1:3] = [f"images={usable}", f"out={tmp_path / 'none.npz'}"]
    code, _, err = run_app(app.main, args, capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert f"error: statistics need at least 2 usable images under images={usable}, found 0 (4 unusable skipped)" in err
    assert not (tmp_path / "none.npz").exists()

    (tmp_path / "a_file").write_text("")
    args[1:3] = [f"images={images}", f"out={tmp_path / 'a_file' / 'stats.npz'}", "batch_size=0"]
    code, stdout, err = run_app(app.main, args, capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err and "skipping" not in stdout  # before any image is read
    assert "error: batch_size=0 is not a whole number >= 1" in err and f"cannot write in {tmp_path / 'a_file'}" in err


def test_evaluate_cli_end_to_end_then_resume(exported, demo_data_dir, ref_stats, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    args = eval_args(exported, demo_data_dir, ref_stats, out)
    monkeypatch.chdir(tmp_path)
    stdout = run_in_process([*args, "wandb=true"], capsys, monkeypatch)
    assert "4 images generated" in stdout
    assert "meaningless" in stdout  # the demo models are called what they are

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
    saved = OmegaConf.load(out / ".hydra" / "config.yaml")  # the run folder keeps its resolved config
    assert saved.sampling.steps == 2 and saved.num_prompts == 4 and saved.feature_extractor == "demo"

    # the same command again: nothing is generated, the numbers are the same
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    again = app.run_evaluation(compose("evaluate", args + ["progress=false"]))
    printed = capsys.readouterr().out
    assert "0 images generated" in printed and "4 already on disk" in printed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    for key in ("fid", "is", "clip_score"):
        assert again[key] == pytest.approx(results[key], rel=1e-9)

    # no pipeline: score what is on disk
    scored = app.run_evaluation(compose("evaluate", [a for a in args if not a.startswith("pipeline=")]))
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
    assert paper_model("nota-ai/bk-sdm-tiny") == "BK-SDM-Tiny"
    assert paper_model("/models/bk-sdm-small-2m") == "BK-SDM-Small-2M"
    assert paper_model("nota-ai/bk-sdm-v2-base") == "BK-SDM-v2-Base"
    assert paper_model("CompVis/stable-diffusion-v1-4") == "SD-v1.4"
    assert paper_model("stabilityai/stable-diffusion-2-1-base") == "SD-v2.1-base"
    assert paper_model("CompVis/stable-diffusion-v1-4 + unet /x/bk-sdm-base") == "BK-SDM-Base"
    assert paper_model("/tmp/export-ema-step000004") is None
    table = ev.format_table(
        {"paper_model": "BK-SDM-Tiny", "fid": 17.3, "is": 30.0, "clip_score": 0.26, "num_images": 4}
    )
    assert "paper (BK-SDM-Tiny)" in table and "17.12" in table and "0.2653" in table and "30,000" in table


def test_missing_images_without_a_pipeline(demo_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        app.evaluate_app(
            compose(
                "evaluate", [f"metadata={demo_data_dir / 'metadata.csv'}", "num_prompts=2", f"out={tmp_path}", *TINY]
            )
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
        app.evaluate_app(compose("evaluate", [f"pipeline={exported}", "prompt=x", f"out={tmp_path / 'out'}"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[eval]"' in err and "demo" in err
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
    callback = EvalCallback(
        metadata=str(demo_data_dir / "metadata.csv"),
        num_prompts=3,
        ref_stats=str(ref_stats),
        every_n_steps=2,
        sampling={"steps": 2},
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

    settings = json.loads((tmp_path / "step000002" / "generation.json").read_text())["settings"]
    assert settings["steps"] == 2 and settings["guidance"] == 7.5 and settings["seed_mode"] == "per-prompt"
    # a resumed run at step 3 again, with other weights: they are evaluated, not the images already there
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert callback.evaluate_now(trainer, module)["eval/fid"] != pytest.approx(logger.logged[1][1]["eval/fid"])

    bad = EvalCallback(prompts=["x"], feature_extractor="resnet")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        bad.setup(trainer, module, "fit")


@pytest.mark.slow
def test_guidance_sweep_writes_one_folder_per_value(exported, demo_data_dir, ref_stats, cache_dir, tmp_path):
    """The real command, `-m sampling.guidance=5,7.5`: two jobs, each with its own folder, results.json and .hydra/
    record."""
    sweep = tmp_path / "sweep"
    args = eval_args(exported, demo_data_dir, ref_stats, sweep)
    args = [a for a in args if not a.startswith("num_prompts=")] + ["num_prompts=2", "grid=0", "progress=false"]
    run_cli(["-m", *args, "sampling.guidance=5,7.5"], cache_dir, tmp_path)
    results = sorted(sweep.glob("*/results.json"))
    names = [p.parent.name for p in results]  # <job>_<overrides> (paths left out)
    assert len(names) == 2 and names[0].startswith("0_") and names[1].startswith("1_"), names
    assert "sampling.guidance=5," in names[0] and "sampling.guidance=7.5," in names[1], names
    guidance = []
    for path in results:
        record = json.loads(path.read_text())
        assert record["num_images"] == 2 and np.isfinite(record["fid"])
        saved = OmegaConf.load(path.parent / ".hydra" / "config.yaml")
        assert saved.sampling.guidance == record["generation"]["guidance"]
        assert (path.parent / ".hydra" / "overrides.yaml").is_file()
        guidance.append(record["generation"]["guidance"])
    assert guidance == [5.0, 7.5]


def test_train_config_gives_the_eval_callback_its_sampling(demo_data_dir):
    """callbacks=with_eval takes scheduler, steps, guidance, seed from the run's `sampling` group."""
    from hydra.utils import instantiate

    cfg = compose(
        "train",
        ["experiment=demo", "callbacks=with_eval", "sampling.steps=3", "sampling.guidance=2.0", *TINY_EVAL],
    )
    callback = instantiate(cfg.callbacks.eval)
    assert isinstance(callback, EvalCallback)
    assert callback.sampling["steps"] == 3 and callback.sampling["guidance"] == 2.0
    assert callback.sampling["scheduler"] == "pndm" and callback.sampling["seed"] == 1234


TINY_EVAL = ["callbacks.eval.feature_extractor=demo", "callbacks.eval.clip=demo", "callbacks.eval.out_dir=null"]


def test_train_config_gives_the_sample_callback_its_sampling(teacher, monkeypatch):
    """callbacks.samples takes scheduler, steps, guidance, seed from the run's `sampling` group, and uses them."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline
    from hydra.utils import instantiate

    from bksdm_lab.evaluation.callback import SampleImages

    cfg = compose("train", ["sampling=fast", "sampling.steps=3", "callbacks.samples.out_dir=null"])
    callback = instantiate(cfg.callbacks.samples)
    assert isinstance(callback, SampleImages)
    assert (callback.sampling["scheduler"], callback.sampling["steps"]) == ("dpm++", 3)
    cfg = compose("train", ["sampling.steps=3", "sampling.guidance=4.0", "callbacks.samples.out_dir=null"])
    callback = instantiate(cfg.callbacks.samples)
    calls = []

    def fake_call(pipe, prompt, **kwargs):
        calls.append({"scheduler": type(pipe.scheduler).__name__, **kwargs})
        return SimpleNamespace(images=["image"])

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", fake_call)
    module = SimpleNamespace(teacher=teacher, device=torch.device("cpu"))
    assert callback.generate(module, teacher.unet) == ["image"] * len(callback.prompts)
    assert {c["num_inference_steps"] for c in calls} == {3} and {c["guidance_scale"] for c in calls} == {4.0}
    assert {c["scheduler"] for c in calls} == {"PNDMScheduler"} and callback.seed == 1234


def test_reference_statistics_are_checked_before_any_image_is_generated(exported, tmp_path, capsys):
    """Issue 12, point 10: statistics of another feature width (e.g. Inception's 2048-d against the demo extractor's
    32-d) or a file that is no FID statistics fail in one line, exit 2, before the first image."""
    wide = metrics.save_stats(tmp_path / "inception.npz", np.zeros(2048), np.eye(2048))
    other, pickled = tmp_path / "other.npz", tmp_path / "pickled.npz"
    np.savez(other, a=np.zeros(3))
    pickled.write_bytes(pickle.dumps({"mu": np.zeros(32), "sigma": np.eye(32)}))
    not_stats = f"{pickled} is not a statistics file written by `python -m bksdm_lab.evaluate stats`"
    for ref, message in (
        (wide, "holds 2048-d features but feature_extractor=demo gives 32-d ones"),
        (other, "no mu"),
        (pickled, not_stats),
    ):
        out = tmp_path / f"out_{ref.stem}"
        args = [f"pipeline={exported}", "prompt=a red circle", f"ref_stats={ref}", f"out={out}", *TINY]
        with pytest.raises(SystemExit) as exc:
            app.evaluate_app(compose("evaluate", args + ["sampling.steps=1", "sampling.resolution=64"]))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "bksdm_lab.evaluate: error: ref_stats=" in err and message in err and "Traceback" not in err
        assert "allow_pickle" not in err  # no advice to load it unsafely
        assert not (out / "images").exists()  # failed before generating


def test_a_prompt_alone_does_not_add_the_coco_captions(exported, tmp_path):
    """Issue 12, point 10: `evaluate prompt=...` evaluates that prompt only; without prompt= / prompts_file= /
    metadata= the MS-COCO captions (coco_metadata) are the prompts, as the paper's protocol."""
    coco = tmp_path / "data" / "mscoco_val2014_30k" / "metadata.csv"
    coco.parent.mkdir(parents=True)
    coco.write_text("file_name,text\na.jpg,a cat on a mat\nb.jpg,a dog in the snow\nc.jpg,a red bus\n")
    common = [f"pipeline={exported}", f"paths.data_dir={tmp_path / 'data'}", "sampling.steps=1"]
    common += ["sampling.resolution=64", "progress=false", "grid=0", *TINY]

    alone = app.run_evaluation(compose("evaluate", [*common, "prompt=a red circle", f"out={tmp_path / 'a'}"]))
    with (tmp_path / "a" / "prompts.csv").open(newline="") as f:
        assert [row["text"] for row in csv.DictReader(f)] == ["a red circle"]
    assert alone["num_images"] == 1 and alone["metadata"] is None

    paper = app.run_evaluation(compose("evaluate", [*common, "num_prompts=2", f"out={tmp_path / 'b'}"]))
    with (tmp_path / "b" / "prompts.csv").open(newline="") as f:
        assert [row["text"] for row in csv.DictReader(f)] == ["a cat on a mat", "a dog in the snow"]
    assert paper["num_images"] == 2 and paper["metadata"] == str(coco)


# ---- fast evaluation ---------------------------------------------------------------------------------------
def test_scoring_beside_the_generation_equals_scoring_afterwards(exported, demo_data_dir, ref_stats, tmp_path, capsys):
    """overlap=true (the default) feeds each finished batch to the metric models in a background thread while the
    next batch generates; overlap=false generates everything, then reads the folder: the same numbers, to the last
    bit (generation batches of 3 re-cut into scoring batches of 2). Generation and scoring images/s are reported
    apart, printed and in results.json."""
    common = [a for a in eval_args(exported, demo_data_dir, ref_stats, None) if not a.startswith("out=")]
    common += ["sampling.batch_size=3", "eval_batch_size=2", "grid=0", "progress=false"]
    beside = app.run_evaluation(compose("evaluate", [*common, f"out={tmp_path / 'a'}"]))
    printed = capsys.readouterr().out
    after = app.run_evaluation(compose("evaluate", [*common, f"out={tmp_path / 'b'}", "overlap=false"]))
    for key in ("fid", "is", "is_std", "clip_score"):
        assert beside[key] == after[key], key
    assert (beside["scoring"]["overlapped"], after["scoring"]["overlapped"]) == (True, False)
    for results in (beside, after):
        assert results["scoring"]["images"] == 4 and results["scoring"]["images_per_s"] > 0
        assert results["generation"]["images_per_s"] > 0 and results["generation"]["batch_size"] == 3
        assert results["wall_seconds"] > 0
    assert "4 images generated" in printed and "images/s" in printed and "[batch size 3]" in printed
    assert "scored 4 images in" in printed and "images/s), beside the generation" in printed
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["scoring"] == json.loads(json.dumps(beside["scoring"]))


@pytest.mark.slow
def test_two_processes_split_the_prompts_and_rank_0_scores(exported, demo_data_dir, ref_stats, cache_dir, tmp_path):
    """Two `python -m bksdm_lab.evaluate` processes as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT; a gloo group): rank r generates prompts i % 2 == r into the same folder with the paper seeding
    replayed per prompt, rank 0 waits for both and scores. The images equal a one-process run's bit for bit; one
    results.json, with the generation rate of both processes."""
    import socket

    from bksdm_lab.evaluation import sampling as gen

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "two"
    args = eval_args(exported, demo_data_dir, ref_stats, out) + ["sampling.batch_size=1", "progress=false"]
    procs = []
    for rank in (0, 1):
        env = subprocess_env(cache_dir)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [PYTHON, "-m", "bksdm_lab.evaluate", *args]
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, f"STDOUT:\n{stdout[-3000:]}\nSTDERR:\n{stderr[-5000:]}"
    assert (
        "4 images generated" in outputs[0][0] and "2 processes" in outputs[0][0] and "scored 4 images" in outputs[0][0]
    )
    assert "images generated" not in outputs[1][0]  # rank 1 generates its share and leaves the report to rank 0

    prompts = gen.read_prompts(metadata=demo_data_dir / "metadata.csv", num_prompts=4)
    pipe, _ = gen.load_pipeline(pipeline=str(exported), device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1)
    try:
        gen.generate_images(pipe, prompts, tmp_path / "one", steps=2, resolution=64, batch_size=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    for i in range(4):
        one = np.asarray(Image.open(tmp_path / "one" / "images" / gen.image_name(i)))
        assert np.array_equal(one, np.asarray(Image.open(out / "images" / gen.image_name(i)))), i
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 4 and results["scoring"]["overlapped"] is False
    generation = results["generation"]
    assert generation["world_size"] == 2 and generation["generated"] == 4 and len(generation["ranks"]) == 2
    assert [r["generated"] for r in generation["ranks"]] == [2, 2] and generation["images_per_s"] > 0
    assert (out / "grid.png").is_file()


def test_a_resume_refuses_the_images_of_a_model_retrained_at_the_same_path(exported, tmp_path):
    """out= keeps a fingerprint of the U-Net's weights (sha256): the same pipeline resumes (nothing generated); the
    pipeline retrained at the same path is refused in one line, its images never scored with the old ones."""
    from diffusers import UNet2DConditionModel

    pipe_dir = tmp_path / "pipeline"
    shutil.copytree(exported, pipe_dir)
    args = [f"pipeline={pipe_dir}", "prompt=[a red circle,a green square]", "sampling.steps=1"]
    args += ["sampling.resolution=64", "grid=0", "progress=false", f"out={tmp_path / 'eval'}", *TINY]
    first = app.run_evaluation(compose("evaluate", args))
    assert app.run_evaluation(compose("evaluate", args))["generation"]["generated"] == 0

    unet = UNet2DConditionModel.from_pretrained(pipe_dir / "unet")
    with torch.no_grad():
        next(unet.parameters()).add_(0.1)
    unet.save_pretrained(pipe_dir / "unet")  # retrained, at the same path
    refused = r"holds images generated with other settings \(unet_sha256: '[0-9a-f]{64}' on disk vs '[0-9a-f]{64}' now"
    with pytest.raises(gen.GenerationError, match=refused + r"\); use another out="):
        app.run_evaluation(compose("evaluate", args))
    assert len(first["generation"]["unet_sha256"]) == 64  # the fingerprint is in results.json


def test_bad_sampling_and_scoring_values_fail_in_one_line_each_before_loading(tmp_path, capsys):
    """Every bad value at once, one line each naming the key and the allowed values, exit 2, before any model."""
    args = [f"pipeline={tmp_path / 'missing'}", "prompt=x", f"out={tmp_path / 'o'}", *TINY]
    bad = ["sampling.steps=0", "sampling.guidance=-1", "sampling.resolution=100", "is_splits=0", "eval_batch_size=0"]
    with pytest.raises(SystemExit) as exc:
        app.evaluate_app(compose("evaluate", args + bad))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "does not exist" not in err  # the values come first
    for line in (
        "bksdm_lab.evaluate: error: sampling.steps=0 is not a whole number >= 1",
        "sampling.guidance=-1 is not a number >= 1 (1: no classifier-free guidance)",
        "sampling.resolution=100 is not null (the model's) or a whole number >= 8 divisible by 8",
        "is_splits=0 is not a whole number >= 1",
        "eval_batch_size=0 is not a whole number >= 1",
    ):
        assert line in err.splitlines(), line


def test_train_checks_the_sampling_of_its_sample_callback_before_loading(compose_train, tmp_path):
    """The run's sampling group, the sample callback's own values (callbacks.samples.*) and the evaluation
    callback's reference statistics, in the train command's input check, before any model loads."""
    from bksdm_lab.train import InputError, check_inputs

    not_stats = tmp_path / "val.npz"
    not_stats.write_text("mu sigma")
    cfg = compose_train(
        "experiment=demo",
        "sampling.steps=0",
        "+callbacks.samples.guidance_scale=0.5",
        "callbacks=with_eval",
        f"callbacks.eval.ref_stats={not_stats}",
    )
    with pytest.raises(InputError) as err:
        check_inputs(cfg, None, probe_teacher_models=False)
    lines = str(err.value).splitlines()
    assert "sampling.steps=0 is not a whole number >= 1" in lines
    assert "callbacks.samples.guidance_scale=0.5 is not a number >= 1 (1: no classifier-free guidance)" in lines
    assert not any("num_inference_steps" in line for line in lines)  # the demo's own 10 steps are fine
    assert (
        f"callbacks.eval.ref_stats: {not_stats} is not a statistics file written by `python -m bksdm_lab.evaluate "
        "stats` (an .npz of mu and sigma)" in lines
    )
