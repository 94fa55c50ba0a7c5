"""`bksdm_lab.generate`: repeatable, resumable (the paper's one-generator seeding included), and the real command."""

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, arch_cfg, run_app, subprocess_env
from omegaconf import OmegaConf
from PIL import Image

from bksdm_lab.evaluation import sampling as gen

PROMPTS = ["a red circle on a blue background", "a green square", "a yellow triangle on black", "a white circle"]
FAST = {"steps": 2, "resolution": 64, "progress": False}


@pytest.fixture(scope="module")
def exported(demo_export_dir) -> Path:
    """The demo teacher with a BK-SDM-Tiny student, exported once per session into a folder of its own."""
    return demo_export_dir


@pytest.fixture(scope="module")
def pipe(exported):
    pipe, _ = gen.load_pipeline(pipeline=str(exported), device="cpu")
    return pipe


@pytest.fixture()
def pndm(pipe):
    gen.set_scheduler(pipe, "pndm")
    return pipe


def pixels(folder: Path, n: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / "images" / gen.image_name(i))) for i in range(n)]


def assert_same_images(a: Path, b: Path, n: int) -> None:
    for i, (x, y) in enumerate(zip(pixels(a, n), pixels(b, n))):
        assert np.array_equal(x, y), f"image {i} differs (max |diff| {np.abs(x.astype(int) - y).max()})"


def assert_round_off_close(a: Path, b: Path, n: int) -> None:
    """Equal up to float round-off of batched vs single kernels: a few pixels one level apart."""
    for i, (x, y) in enumerate(zip(pixels(a, n), pixels(b, n))):
        diff = np.abs(x.astype(int) - y)
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, f"image {i}: max |diff| {diff.max()}"


def test_fixed_seed_is_repeatable(pndm, tmp_path):
    first = gen.generate_images(pndm, PROMPTS[:2], tmp_path / "a", **FAST)
    gen.generate_images(pndm, PROMPTS[:2], tmp_path / "b", **FAST)
    gen.generate_images(pndm, PROMPTS[:2], tmp_path / "c", seed=7, **FAST)
    assert first.generated == 2 and first.skipped == 0
    assert Image.open(first.paths[0]).size == (64, 64)
    assert_same_images(tmp_path / "a", tmp_path / "b", 2)
    assert not np.array_equal(pixels(tmp_path / "a", 1)[0], pixels(tmp_path / "c", 1)[0])
    # paper mode: the second prompt continues the one generator, it does not restart it
    gen.generate_images(pndm, PROMPTS[:1] * 2, tmp_path / "twice", **FAST)
    assert not np.array_equal(*pixels(tmp_path / "twice", 2))


class Crash(RuntimeError):
    pass


def crash_after(pipe, calls: int, monkeypatch):
    """Make the pipeline raise on its (calls + 1)-th call, as a run killed half-way."""
    real = type(pipe).__call__
    count = {"n": 0}

    def call(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise Crash("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", call)
    return lambda: monkeypatch.setattr(type(pipe), "__call__", real)


@pytest.mark.parametrize("scheduler,batch_size", [("pndm", 1), ("euler_ancestral", 2)])
def test_paper_seed_mode_resumed_half_way_gives_the_same_images(pipe, tmp_path, monkeypatch, scheduler, batch_size):
    if scheduler == "euler_ancestral":  # draws noise at every step: the replay must run the scheduler too
        from diffusers import EulerAncestralDiscreteScheduler

        monkeypatch.setattr(pipe, "scheduler", EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config))
    else:
        gen.set_scheduler(pipe, scheduler)
    kw = {**FAST, "batch_size": batch_size, "seed_mode": "paper"}
    whole = gen.generate_images(pipe, PROMPTS, tmp_path / "whole", **kw)
    assert whole.generated == 4

    restore = crash_after(pipe, 2 // batch_size, monkeypatch)
    with pytest.raises(Crash):
        gen.generate_images(pipe, PROMPTS, tmp_path / "resumed", **kw)
    restore()
    on_disk = sorted(p.name for p in (tmp_path / "resumed" / "images").iterdir())
    assert on_disk == ["00000.png", "00001.png"]
    mtimes = [p.stat().st_mtime_ns for p in sorted((tmp_path / "resumed" / "images").iterdir())]

    resumed = gen.generate_images(pipe, PROMPTS, tmp_path / "resumed", **kw)
    assert (resumed.generated, resumed.skipped) == (2, 2)
    assert [p.stat().st_mtime_ns for p in resumed.paths[:2]] == mtimes  # not generated again
    assert_same_images(tmp_path / "whole", tmp_path / "resumed", 4)

    again = gen.generate_images(pipe, PROMPTS, tmp_path / "resumed", **kw)
    assert (again.generated, again.skipped) == (0, 4)


def test_a_replay_that_misses_draws_is_caught(pipe, tmp_path, monkeypatch):
    from diffusers import EulerAncestralDiscreteScheduler

    monkeypatch.setattr(pipe, "scheduler", EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config))

    def latents_only(pipe, generator, batch, height, width, steps):
        pipe.prepare_latents(batch, 4, height, width, pipe.unet.dtype, pipe._execution_device, generator)

    monkeypatch.setattr(gen, "replay_draws", latents_only)
    with pytest.raises(gen.GenerationError, match="does not reproduce"):
        gen.generate_images(pipe, PROMPTS[:1], tmp_path / "x", **FAST)


def test_per_prompt_seeds_do_not_depend_on_batch_size_or_other_prompts(pndm, tmp_path):
    kw = {**FAST, "seed_mode": "per-prompt"}
    gen.generate_images(pndm, PROMPTS, tmp_path / "b1", batch_size=1, **kw)
    gen.generate_images(pndm, PROMPTS, tmp_path / "b2", batch_size=2, **kw)
    gen.generate_images(pndm, PROMPTS[3:], tmp_path / "last", batch_size=1, seed=1234 + 3, **kw)
    # the same noise for each prompt; batched kernels may round differently (CPU: ~1e-4 of pixels, 1 level)
    assert_round_off_close(tmp_path / "b1", tmp_path / "b2", 4)
    assert np.array_equal(pixels(tmp_path / "b1", 4)[3], pixels(tmp_path / "last", 1)[0])  # prompt 3: seed 1234 + 3
    # a resumed per-prompt run in another batch size is the same run
    gen.generate_images(pndm, PROMPTS[:3], tmp_path / "mixed", batch_size=3, **kw)
    (tmp_path / "mixed" / "images" / gen.image_name(1)).unlink()
    resumed = gen.generate_images(pndm, PROMPTS, tmp_path / "mixed", batch_size=1, **kw)
    assert (resumed.generated, resumed.skipped) == (2, 2)
    for i in (1, 3):  # generated one at a time, as in b1
        assert np.array_equal(pixels(tmp_path / "b1", 4)[i], pixels(tmp_path / "mixed", 4)[i])
    assert_round_off_close(tmp_path / "b1", tmp_path / "mixed", 4)


def test_resume_refuses_other_settings_or_prompts(pndm, tmp_path):
    gen.generate_images(pndm, PROMPTS[:2], tmp_path / "run", **FAST)
    with pytest.raises(gen.GenerationError, match=r"other settings \(seed: 1234 on disk vs 5 now\)"):
        gen.generate_images(pndm, PROMPTS[:2], tmp_path / "run", seed=5, **FAST)
    with pytest.raises(gen.GenerationError, match="was generated for prompt"):
        gen.generate_images(pndm, ["another prompt", PROMPTS[1]], tmp_path / "run", **FAST)
    more = gen.generate_images(pndm, PROMPTS, tmp_path / "run", **FAST)  # more prompts of the same run: fine
    assert (more.generated, more.skipped) == (2, 2)


def test_generate_images_checks_the_sampling_values_too(pndm, tmp_path):
    with pytest.raises(gen.GenerationError, match=r"^sampling.steps=0 is not a whole number >= 1\nsampling.guidance"):
        gen.generate_images(pndm, PROMPTS[:1], tmp_path / "run", **{**FAST, "steps": 0, "guidance": -1})
    assert not (tmp_path / "run").exists()


def test_teacher_plus_student_unet_source(exported, demo_teacher_dir):
    pipe, name = gen.load_pipeline(teacher=str(demo_teacher_dir), unet=str(exported), device="cpu")
    assert f"+ unet {exported}" in name
    n = sum(p.numel() for p in pipe.unet.parameters())
    assert n == 1_476_484  # the demo's BK-SDM-Tiny, not the teacher's U-Net
    assert gen.default_resolution(pipe) == 64
    with pytest.raises(gen.GenerationError, match="one pipeline source"):
        gen.load_pipeline(pipeline=str(exported), checkpoint="x.ckpt")


def test_checkpoint_source(exported, demo_teacher_dir, tmp_path):
    """A checkpoint in the layout `python -m bksdm_lab.train` writes (the student's tensors and the run config)."""
    import torch
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_pretrained(exported, subfolder="unet")
    config = {"teacher": {"name": "demo", "pretrained": str(demo_teacher_dir)}, "arch": arch_cfg("tiny")}
    ckpt = {
        "state_dict": {f"student.{k}": v for k, v in student.state_dict().items()},
        "bksdm": {"config": config, "ema": False},
        "global_step": 3,
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    pipe, name = gen.load_pipeline(checkpoint=str(tmp_path / "last.ckpt"), device="cpu")
    assert "student weights" in name and "BK-SDM-Tiny" in name
    for key, value in student.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[key], value), key
    result = gen.generate_images(pipe, PROMPTS[:1], tmp_path / "out", **FAST)
    assert result.generated == 1


def test_read_prompts(demo_data_dir, tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n  second  \n")
    got = gen.read_prompts(["cli"], txt, demo_data_dir / "metadata.csv")
    with (demo_data_dir / "metadata.csv").open() as f:
        captions = [row["text"] for row in csv.DictReader(f)]
    assert got == ["cli", "first", "second", *captions]
    assert gen.read_prompts(metadata=demo_data_dir / "metadata.csv", num_prompts=3) == captions[:3]
    with pytest.raises(gen.GenerationError, match="no 'caption' column"):
        gen.read_prompts(metadata=demo_data_dir / "metadata.csv", column="caption")
    with pytest.raises(gen.GenerationError, match="no prompts"):
        gen.read_prompts()


def compose(command: str, overrides: list[str]):
    """conf/<command>.yaml composed as the command line would (for the in-process tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bksdm_lab import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=command, overrides=overrides)


def test_app_in_process(exported, tmp_path):
    """The Hydra app's function on a composed config: the sampling group's values reach the pipeline."""
    from bksdm_lab import generate as app

    out = tmp_path / "run"
    cfg = compose(
        "generate",
        [f"pipeline={exported}", "prompt=[a red circle,a blue square]", f"out={out}", "sampling=fast"]
        + ["sampling.steps=2", "sampling.batch_size=2", "grid=0", "progress=false"],
    )
    record = app.generate(cfg)
    settings = record["generation"]
    assert settings["scheduler"] == "DPMSolverMultistepScheduler" and settings["steps"] == 2
    assert settings["seed_mode"] == "per-prompt" and settings["generated"] == 2
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(record))
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]


def test_paper_sampling_is_the_default_everywhere():
    """conf/sampling/paper.yaml is the one source of the paper's settings: commands and function defaults."""
    import inspect

    from bksdm_lab.evaluation.paper import PAPER_SAMPLING, PAPER_SETTINGS

    cfg = compose("generate", [])
    assert OmegaConf.to_container(cfg.sampling) == PAPER_SAMPLING
    assert (PAPER_SAMPLING["scheduler"], PAPER_SAMPLING["steps"], PAPER_SAMPLING["guidance"]) == ("pndm", 25, 7.5)
    assert (PAPER_SAMPLING["seed"], PAPER_SAMPLING["seed_mode"], PAPER_SETTINGS["resolution"]) == (1234, "paper", 512)
    defaults = inspect.signature(gen.GenerateOptions).parameters
    for key in gen.SAMPLING_KEYS:
        assert defaults[key].default == PAPER_SAMPLING[key], key


def cli_args(exported, tmp_path) -> tuple[list[str], Path]:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a blue square\na purple triangle, on white\n")
    out = tmp_path / "out"
    args = [f"pipeline={exported}", "prompt=a red circle", f"prompts_file={prompts_file}", "sampling.steps=2"]
    return [*args, "sampling.scheduler=dpm++", f"out={out}", "grid=2"], out


def test_cli_end_to_end(exported, tmp_path, capsys, monkeypatch):
    """The command line (sys.argv through hydra.main), in-process."""
    from bksdm_lab import generate as app

    args, out = cli_args(exported, tmp_path)
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_app(app.main, args, capsys, monkeypatch)
    assert code == 0, stderr[-3000:]
    check_cli_outputs(out, stdout, stderr)


@pytest.mark.slow
def test_real_cli_end_to_end(exported, cache_dir, tmp_path):
    """The same as a real `python -m bksdm_lab.generate` process."""
    args, out = cli_args(exported, tmp_path)
    proc = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.generate", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(cache_dir),
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_cli_outputs(out, proc.stdout, proc.stderr)


def check_cli_outputs(out: Path, stdout: str, stderr: str) -> None:
    assert "3 images generated" in stdout and "images/s" in stdout
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(out / "images" / "00000.png").size == (64, 64)  # sample_size 8 x 8
    assert Image.open(out / "grid.png").size == (128, 64)
    with (out / "prompts.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["index"], r["file_name"], r["text"]) for r in rows] == [
        ("0", "00000.png", "a red circle"),
        ("1", "00001.png", "a blue square"),
        ("2", "00002.png", "a purple triangle, on white"),
    ]
    assert "generate:" in stderr  # the tqdm bar
    # the run folder holds the resolved config and the results
    saved = OmegaConf.load(out / ".hydra" / "config.yaml")
    assert saved.sampling.steps == 2 and saved.sampling.scheduler == "dpm++"
    assert json.loads((out / "results.json").read_text())["generation"]["generated"] == 3


def test_cli_errors_exit_2_without_traceback(capsys, tmp_path):
    from bksdm_lab import generate as app

    cfg = compose("generate", [f"pipeline={tmp_path / 'missing'}", "prompt=x", f"out={tmp_path / 'o'}"])
    with pytest.raises(SystemExit) as exc:
        app.main(cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "bksdm_lab.generate: error: pipeline=" in err and "does not exist" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        app.main(compose("generate", [f"unet={tmp_path}", "prompt=x", f"out={tmp_path / 'o'}"]))
    assert "unet= needs teacher=" in capsys.readouterr().err


def test_a_missing_local_source_is_named_as_a_missing_folder(tmp_path, capsys):
    """Issue 12, point 10: a local folder that is not there is said to be missing (not "Repo id must use
    alphanumeric chars"), before anything loads or is written; a hub-id-shaped name says it is no local folder."""
    from bksdm_lab import generate as app

    def error(*overrides) -> str:
        with pytest.raises(SystemExit) as exc:
            app.main(compose("generate", [*overrides, "prompt=x", f"out={tmp_path / 'o'}"]))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "repo id" not in err.lower()
        (line,) = [line for line in err.splitlines() if line.startswith("bksdm_lab.generate: error: ")]
        return line

    missing = tmp_path / "runs" / "demo" / "pipeline"
    assert error(f"pipeline={missing}") == (
        f"bksdm_lab.generate: error: pipeline={str(missing)!r}: the folder {missing} does not exist "
        "(a local folder, or a hub id like nota-ai/bk-sdm-tiny)"
    )
    assert "is not a diffusers pipeline folder (no model_index.json" in error(f"pipeline={tmp_path}")
    assert f"unet={str(missing)!r}: the folder {missing} does not exist" in error("teacher=sd14", f"unet={missing}")
    line = error(f"checkpoint={tmp_path / 'last.ckpt'}")
    assert f"checkpoint={str(tmp_path / 'last.ckpt')!r}: the file" in line and line.endswith("does not exist")
    line = error("pipeline=runs/pipeline")  # hub-id shaped: tried on the hub (offline here), and said to be no folder
    assert "pipeline='runs/pipeline' is no local folder (no " in line and "does not load from the hub" in line
    assert not (tmp_path / "o" / "images").exists()


# ---- fast generation ---------------------------------------------------------------------------------------
def test_paper_seeding_is_replayed_per_prompt_at_any_batch_size_and_rank(pipe, tmp_path, monkeypatch):
    """Paper mode: prompt i draws from the one generator's state after prompts 0..i-1 (as at batch 1), so a batch
    of 3 gives the batch-1 images (up to round-off of batched kernels), and two ranks splitting the prompts
    (i % 2) into one folder give them bit for bit; Euler ancestral draws at every step too (replayed)."""
    from diffusers import EulerAncestralDiscreteScheduler

    monkeypatch.setattr(pipe, "scheduler", EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config))
    kw = {**FAST, "seed_mode": "paper"}
    gen.generate_images(pipe, PROMPTS, tmp_path / "b1", batch_size=1, **kw)
    gen.generate_images(pipe, PROMPTS, tmp_path / "b3", batch_size=3, **kw)
    assert_round_off_close(tmp_path / "b1", tmp_path / "b3", 4)
    for rank in (1, 0):  # rank 1 first: it replays prompt 0's draws without generating it
        result = gen.generate_images(pipe, PROMPTS, tmp_path / "ranks", batch_size=1, rank=rank, world_size=2, **kw)
        assert (result.generated, result.skipped, result.world_size) == (2, 0, 2)
    assert not (tmp_path / "ranks" / "grid.png").exists()  # several processes: write_grid once all are done
    assert_same_images(tmp_path / "b1", tmp_path / "ranks", 4)
    # a generation.json of today's settings carries no batch size: a rerun in another batch size resumes
    again = gen.generate_images(pipe, PROMPTS, tmp_path / "b1", batch_size=2, **kw)
    assert (again.generated, again.skipped) == (0, 4)


def test_a_pipeline_out_of_memory_halves_an_auto_batch_and_remembers_it(pndm, tmp_path, monkeypatch):
    """batch_size=auto: a batch that raises torch.OutOfMemoryError is retried at half the size (the same noise: the
    images are the batch-1 run's), and the run goes on at that size; a fixed batch size fails in one line."""
    real, sizes = type(pndm).__call__, []

    def call(self, prompt, **kwargs):
        sizes.append(len(prompt))
        if len(prompt) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, prompt, **kwargs)

    gen.generate_images(pndm, PROMPTS, tmp_path / "b1", batch_size=1, **FAST)
    monkeypatch.setattr(type(pndm), "__call__", call)
    monkeypatch.setattr(gen, "AUTO_CPU_BATCH", 4)
    result = gen.generate_images(pndm, PROMPTS, tmp_path / "auto", batch_size="auto", **FAST)
    assert sizes == [4, 2, 1, 1, 1, 1]
    assert (result.batch_size, result.batch_size_auto, result.oom_halvings) == (1, True, 2)
    record = gen.result_record(result)
    assert (record["batch_size"], record["oom_halvings"], record["generated"]) == (1, 2, 4)
    assert_same_images(tmp_path / "b1", tmp_path / "auto", 4)
    with pytest.raises(gen.GenerationError, match=r"out of GPU memory at sampling.batch_size=2: use sampling.batch_si"):
        gen.generate_images(pndm, PROMPTS, tmp_path / "fixed", batch_size=2, **FAST)


def count_calls(pipe, mp) -> list[int]:
    """The number of prompts of each call of ``pipe`` (patched on its class through ``mp``)."""
    sizes, real = [], type(pipe).__call__

    def call(self, prompt, **kwargs):
        sizes.append(len(prompt))
        return real(self, prompt, **kwargs)

    mp.setattr(type(pipe), "__call__", call)
    return sizes


def test_channels_last_and_a_compiled_unet_change_nothing_but_speed(exported, pndm, tmp_path, monkeypatch):
    """sampling.channels_last: the images of the plain pipeline (round-off of another memory layout aside). A
    compiled U-Net (flagged here; the real compile is the slow test below) gets a warm-up call at the batch size,
    timed apart, and its last batch is padded to the compiled shape: no recompile."""
    gen.generate_images(pndm, PROMPTS[:3], tmp_path / "plain", batch_size=2, **FAST)
    fast, _ = gen.load_pipeline(pipeline=str(exported), device="cpu")
    gen.set_scheduler(fast, "pndm")
    gen.speed_up(fast, channels_last=True)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(gen, "_is_compiled", lambda unet: True)
    sizes = count_calls(fast, monkeypatch)
    result = gen.generate_images(fast, PROMPTS[:3], tmp_path / "fast", batch_size=2, **FAST)
    assert sizes == [2, 2, 2]  # warm-up, then 2 + 1 padded to 2
    assert result.generated == 3 and result.warmup_seconds > 0 and result.seconds > 0
    assert_round_off_close(tmp_path / "plain", tmp_path / "fast", 3)


@pytest.mark.slow
def test_torch_compile_of_the_unet_changes_nothing(exported, pndm, tmp_path, monkeypatch):
    """sampling.compile with backend eager (dynamo traces the U-Net, no code generation: ~25 s on a 2-core CPU,
    hence the slow tier; inductor is for GPUs): the pipeline keeps its UNet2DConditionModel and the images are
    the plain pipeline's."""
    from diffusers import UNet2DConditionModel

    gen.generate_images(pndm, PROMPTS[:1], tmp_path / "plain", batch_size=1, **FAST)
    fast, _ = gen.load_pipeline(pipeline=str(exported), device="cpu")
    gen.set_scheduler(fast, "pndm")
    gen.speed_up(fast, compile=True, backend="eager")
    assert isinstance(fast.unet, UNet2DConditionModel) and gen._is_compiled(fast.unet)
    sizes = count_calls(fast, monkeypatch)
    result = gen.generate_images(fast, PROMPTS[:1], tmp_path / "fast", batch_size=1, **FAST)
    assert sizes == [1, 1] and result.warmup_seconds > 0
    assert_round_off_close(tmp_path / "plain", tmp_path / "fast", 1)


@pytest.mark.parametrize(
    "override,message",
    [
        ("sampling.batch_size=0", "sampling.batch_size=0 is not one of: auto, a whole number >= 1"),
        ("sampling.batch_size=big", "sampling.batch_size='big' is not one of: auto, a whole number >= 1"),
        ("sampling.compile=true sampling.compile_backend=nope", "sampling.compile_backend='nope' is not one of ["),
        ("sampling.compile=yes", "sampling.compile='yes' is not one of [true, false]"),
        ("sampling.steps=0", "sampling.steps=0 is not a whole number >= 1"),
        ("sampling.guidance=0.5", "sampling.guidance=0.5 is not a number >= 1 (1: no classifier-free guidance)"),
        ("sampling.seed=1.5", "sampling.seed=1.5 is not a whole number from 0 to 2**63 - 1"),
        ("grid=-1", "grid=-1 is not a whole number >= 0"),
    ],
)
def test_wrong_speed_settings_fail_in_one_line_before_loading(tmp_path, capsys, override, message):
    from bksdm_lab import generate as app

    args = [*override.split(), f"pipeline={tmp_path / 'missing'}", "prompt=x", f"out={tmp_path / 'o'}"]
    with pytest.raises(SystemExit) as exc:
        app.main(compose("generate", args))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"bksdm_lab.generate: error: {message}" in err and "Traceback" not in err
