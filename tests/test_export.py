"""`python -m bksdm_lab.export`: a real training checkpoint -> a plain diffusers folder + model card (+ Hub push)."""

import contextlib
import io
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PYTHON, arch_cfg, subprocess_env, train_in_process
from safetensors.torch import load_file

from bksdm_lab.common.checkpoint import read_checkpoint
from bksdm_lab.models import export

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def run_cli(args, cache_dir, cwd, check=True):
    proc = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.export", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=subprocess_env(cache_dir),
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


RUN = (
    "experiment=demo",
    "data.batch_size=4",
    "data.global_batch_size=16",  # it decides the accumulation: 4
    "trainer.accumulate_grad_batches=null",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.samples.prompts=[]",
    "callbacks.ema.decay=0.5",
    "logger=csv",
)


@pytest.fixture(scope="module")
def run_dir(cache_dir, tmp_path_factory) -> Path:
    """A real 4-step demo run (in-process) with EMA (decay 0.5, so the EMA and the raw student differ) and
    checkpoints: 2 steps, then resumed for 2 more with another feature-KD weight."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train_in_process(cache_dir, run_dir, *RUN, "trainer.max_steps=2")
    train_in_process(cache_dir, run_dir, *RUN, "trainer.max_steps=4", "loss.weights.feat_kd=0.5", "ckpt_path=last")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir


@pytest.fixture(scope="module")
def ckpt_path(run_dir) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def ckpt(ckpt_path) -> dict:
    return read_checkpoint(ckpt_path)


def export_in_process(args) -> str:
    """`python -m bksdm_lab.export <args>` in-process; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export.main([str(a) for a in args])
    return printed.getvalue()


@pytest.fixture(scope="module")
def ema_export(ckpt_path, run_dir):
    """The command with defaults: EMA weights into <run dir>/export-ema-step000004."""
    return run_dir / "export-ema-step000004", export_in_process([ckpt_path])


@pytest.fixture(scope="module")
def student_export(ckpt_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "export"
    return out, export_in_process([ckpt_path, "--weights", "student", "--out", out])


def prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def assert_same_tensors(exported: dict, expected: dict) -> None:
    assert set(exported) == set(expected)
    for key, value in expected.items():
        assert exported[key].dtype == torch.float32, key
        assert torch.equal(exported[key], value), key


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


PLAIN_DIFFUSERS = """
import sys, torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
unet = UNet2DConditionModel.from_pretrained(sys.argv[1], subfolder="unet")
image = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
             generator=torch.Generator().manual_seed(0)).images[0]
assert not any(m.startswith("bksdm_lab") for m in sys.modules)
print(image.size, sum(p.numel() for p in unet.parameters()))
"""


def test_default_export_is_the_ema(ema_export, ckpt):
    folder, stdout = ema_export
    assert f"wrote {folder}" in stdout, stdout
    assert (folder / "model_index.json").is_file() and (folder / "README.md").is_file()
    assert_same_tensors(load_file(folder / UNET_FILE), prefixed(ckpt["state_dict"], "ema_student."))


@pytest.mark.slow
def test_real_export_command_loads_in_plain_diffusers(ckpt_path, ckpt, cache_dir, tmp_path):
    """The real `python -m bksdm_lab.export`, then the folder in a process that never imports bksdm_lab."""
    folder = tmp_path / "export"
    proc = run_cli([ckpt_path, "--out", folder], cache_dir, cwd=tmp_path)
    assert f"wrote {folder}" in proc.stdout, proc.stdout
    assert_same_tensors(load_file(folder / UNET_FILE), prefixed(ckpt["state_dict"], "ema_student."))
    env = subprocess_env(cache_dir)
    env.pop("PYTHONPATH")
    out = subprocess.run(
        [PYTHON, "-c", PLAIN_DIFFUSERS, str(folder)], capture_output=True, text=True, env=env, cwd="/", check=True
    ).stdout.strip()
    n_params = sum(v.numel() for v in prefixed(ckpt["state_dict"], "ema_student.").values())
    assert out == f"(64, 64) {n_params}", out


def test_student_weights_are_the_raw_student_not_the_ema(student_export, ckpt):
    folder, stdout = student_export
    assert f"wrote {folder}" in stdout
    exported = load_file(folder / UNET_FILE)
    assert_same_tensors(exported, prefixed(ckpt["state_dict"], "student."))
    ema = prefixed(ckpt["state_dict"], "ema_student.")
    assert any(not torch.equal(exported[k], ema[k]) for k in ema), "EMA (decay 0.5) equals the student after 4 steps?"
    card = (folder / "README.md").read_text()
    assert "raw student weights (no EMA)" in card


def test_model_card(ema_export, ckpt):
    from diffusers import UNet2DConditionModel

    folder, _ = ema_export
    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "creativeml-openrail-m"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["tags"] == ["stable-diffusion", "text-to-image", "bk-sdm", "knowledge-distillation"]
    assert "base_model" not in meta  # the demo teacher is a local folder, not a Hub model

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    n_student = sum(p.numel() for p in unet.parameters())
    assert n_student == 1_476_484  # the demo's BK-SDM-Tiny
    assert f"**{n_student:,}** (student)" in card
    assert "2305.15798" in card and "BK-SDM-Tiny" in card
    assert "`down_blocks.3`: the whole stage" in card and "`mid_block`: removed" in card
    assert "Steps: 4 optimizer steps" in card
    assert "Batch: 4 per device x 4 accumulation = 16" in card  # the accumulation data.global_batch_size decided
    assert "Loss weights: task 1, out_kd 1, feat_kd 0.5" in card  # the last options, and before them:
    assert "- Resumed at step 2: loss.weights.feat_kd 1 -> 0.5; trainer.max_steps 2 -> 4\n" in card
    assert "exponential moving average of the student (decay 0.5)" in card
    assert "CreativeML OpenRAIL-M" in card and "https://huggingface.co/spaces/CompVis/stable-diffusion-license" in card
    assert "same use restrictions" in card and "You are responsible" in card
    assert 'StableDiffusionPipeline.from_pretrained("' in card
    assert "- Data: `<local>/data`" in card and "- Teacher: tiny SD-v1 (demo) (`<local>/teacher`)" in card
    local = {"~/", str(Path.home()), ckpt["bksdm"]["config"]["data"]["root"], str(folder.parent.parent.parent)}
    assert [path for path in local if path in card] == []  # a card is shared: no local path on it
    assert "No safety checker is included" in card  # the demo teacher has none


def test_model_card_base_model_is_a_hub_teacher():
    info = {
        "base_model": "CompVis/stable-diffusion-v1-4",
        "arch_title": "BK-SDM-Small",
        "teacher_title": "SD-v1.4",
        "kd_weights": {"task": 1.0, "out_kd": 1.0, "feat_kd": 1.0},
        "batch_size": 64,
        "accumulate_grad_batches": 4,
        "devices": 2,
        "repo_id": "me/bk-sdm-small",
        "resolution": 512,
    }
    card = export.model_card(info)
    assert front_matter(card)["base_model"] == "CompVis/stable-diffusion-v1-4"
    assert "64 per device x 4 accumulation x 2 devices = 512" in card
    auto = export.model_card({**info, "devices": None, "global_batch_size": 512})  # devices=auto: the global batch
    assert "64 per device x 4 accumulation x 2 ranks = 512" in auto
    assert 'from_pretrained("me/bk-sdm-small"' in card and "height=512, width=512" in card


class FakeHfApi:
    calls: list = []

    def __init__(self, token=None, **kwargs):
        self.calls.append(("init", {"token": token, **kwargs}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        files = sorted(str(p.relative_to(kwargs["folder_path"])) for p in Path(kwargs["folder_path"]).rglob("*"))
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123"})()


@pytest.fixture()
def fake_hub(monkeypatch):
    FakeHfApi.calls = []
    monkeypatch.setattr(export, "HfApi", FakeHfApi)
    return FakeHfApi.calls


def test_push_to_hub(ckpt_path, tmp_path, fake_hub, capsys):
    out = tmp_path / "pushed"
    export.main([str(ckpt_path), "--out", str(out), "--push-to-hub", "me/bk-sdm-demo", "--token", "hf_secret"])
    assert [name for name, _ in fake_hub] == ["init", "create_repo", "upload_folder"]
    init, create, upload = (kwargs for _, kwargs in fake_hub)
    assert init["token"] == "hf_secret"
    assert create["repo_id"] == "me/bk-sdm-demo" and create["private"] is True and create["repo_type"] == "model"
    assert create["exist_ok"] is True
    assert upload["repo_id"] == "me/bk-sdm-demo" and upload["repo_type"] == "model"
    assert Path(upload["folder_path"]) == out
    assert "model_index.json" in upload["files"] and "README.md" in upload["files"]
    assert str(UNET_FILE) in upload["files"]
    assert 'from_pretrained("me/bk-sdm-demo"' in (out / "README.md").read_text()
    captured = capsys.readouterr()
    assert "https://huggingface.co/me/bk-sdm-demo/commit/abc123" in captured.out
    assert "hf_secret" not in captured.out + captured.err


def test_push_failure_is_a_clear_error_without_the_token(ckpt_path, tmp_path, monkeypatch, capsys):
    class Unauthorized(FakeHfApi):
        def create_repo(self, repo_id, **kwargs):
            raise RuntimeError("401 Unauthorized for token hf_secret")

    monkeypatch.setattr(export, "HfApi", Unauthorized)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")  # the default of --token
    with pytest.raises(SystemExit) as exc:
        export.main([str(ckpt_path), "--out", str(tmp_path / "out"), "--push-to-hub", "me/x", "--public"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "push to me/x failed" in captured.err and "401 Unauthorized" in captured.err
    assert "hf_secret" not in captured.out + captured.err
    assert (tmp_path / "out" / "model_index.json").is_file()  # the export itself is kept


# ---- bad inputs --------------------------------------------------------------------------------------
def test_missing_checkpoint_exits_2_without_traceback(tmp_path, capsys):
    err = main_error([tmp_path / "nope.ckpt"], capsys)
    assert err == f"bksdm_lab.export: error: checkpoint '{tmp_path / 'nope.ckpt'}' does not exist"


def main_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        export.main([str(a) for a in args])
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bksdm_lab.export: error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_not_a_bksdm_checkpoint(tmp_path, capsys):
    path = tmp_path / "other.ckpt"
    torch.save({"x": 1}, path)
    assert "is not a bksdm_lab training checkpoint" in main_error([path], capsys)
    path.write_text("not a checkpoint at all")
    assert "is not a readable PyTorch checkpoint" in main_error([path], capsys)


@pytest.fixture(scope="module")
def no_ema_ckpt(ckpt, tmp_path_factory) -> Path:
    """The real checkpoint as a run with ~callbacks.ema would have written it."""
    data = dict(ckpt)
    data["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema_student.")}
    data["bksdm"] = {**ckpt["bksdm"], "ema": False}
    path = tmp_path_factory.mktemp("noema") / "checkpoints" / "no_ema.ckpt"
    path.parent.mkdir()
    torch.save(data, path)
    return path


def test_ema_asked_but_absent(no_ema_ckpt, capsys):
    err = main_error([no_ema_ckpt, "--weights", "ema"], capsys)
    assert "has no EMA weights" in err and "--weights student" in err


def test_without_ema_the_default_is_the_student(no_ema_ckpt, ckpt):
    _, unet, info = export.load_checkpoint_student(no_ema_ckpt)
    assert info["weights"] == "student" and info["ema"] is False
    assert_same_tensors(unet.state_dict(), prefixed(ckpt["state_dict"], "student."))


def test_teacher_not_loadable(ckpt_path, tmp_path, capsys):
    err = main_error([ckpt_path, "--teacher", tmp_path / "no_teacher"], capsys)
    assert f"local folder {tmp_path / 'no_teacher'} does not exist" in err and "--teacher" in err


def test_checkpoint_of_another_arch_is_named(ckpt, tmp_path, capsys):
    data = dict(ckpt)
    config = {
        **ckpt["bksdm"]["config"],
        "arch": {**ckpt["bksdm"]["config"]["arch"], "name": "small", "drop_deepest_stages": 0},
    }
    data["bksdm"] = {**ckpt["bksdm"], "config": config}
    path = tmp_path / "wrong_arch.ckpt"
    torch.save(data, path)
    err = main_error([path], capsys)
    assert "do not fit a 'small' student" in err and "missing" in err


# ---- the teacher's safety checker ----------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_with_safety_checker(demo_teacher_dir, tmp_path_factory) -> Path:
    """The demo teacher's folder with a tiny real safety checker and its feature extractor, as SD-v1.4 ships them."""
    import json
    import shutil

    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = tmp_path_factory.mktemp("checked") / "teacher"
    shutil.copytree(demo_teacher_dir, folder)
    tiny = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 16}, projection_dim=8)
    torch.manual_seed(0)
    StableDiffusionSafetyChecker(config).save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor"
    )
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"])
    index.update(feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "dropped"])
def test_the_export_keeps_the_teachers_safety_checker_unless_asked(teacher_with_safety_checker, tmp_path, keep):
    from diffusers import StableDiffusionPipeline
    from omegaconf import OmegaConf

    from bksdm_lab.models.students import init_student_from_teacher
    from bksdm_lab.models.teachers import load_teacher

    teacher = load_teacher(OmegaConf.create({"name": "checked", "pretrained": str(teacher_with_safety_checker)}))
    student = init_student_from_teacher(teacher.unet, arch_cfg("tiny"))
    out = export.export_pipeline(teacher, student, tmp_path / "out", card={}, safety_checker=keep)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    card = (out / "README.md").read_text()
    if keep:
        shipped = load_file(teacher_with_safety_checker / "safety_checker" / "model.safetensors")
        assert_same_tensors(load_file(out / "safety_checker" / "model.safetensors"), shipped)
        assert pipe.safety_checker is not None and pipe.feature_extractor.crop_size == {"height": 32, "width": 32}
        assert pipe.config.requires_safety_checker is True
        assert "The teacher's safety checker and its feature extractor are included" in card
    else:
        assert pipe.safety_checker is None and pipe.feature_extractor is None
        assert not (out / "safety_checker").exists() and "No safety checker is included" in card
