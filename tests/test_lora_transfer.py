"""A LoRA made for the teacher, carried onto Base/Small/Tiny students (bksdm_lab.models.lora.transfer_lora and
`python -m bksdm_lab.lora_transfer`): every kept layer changes the student exactly as it changes the teacher."""

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import PYTHON, arch_cfg, run_app, student_pipeline, subprocess_env
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from bksdm_lab import lora_transfer
from bksdm_lab.models.lora import TEXT_TARGETS, UNET_TARGETS, WEIGHT_NAME, add_lora, save_lora, transfer_lora
from bksdm_lab.models.students import map_key

RANK, ALPHA = 4, 8  # a scale of 2, so a transfer that forgot the alpha would be caught


def kohya_file(diffusers_file, out):
    """The U-Net part of a diffusers LoRA file in kohya/A1111 names (lora_unet_..., lora_down/lora_up, alpha)."""
    tensors = {}
    for key, value in load_file(diffusers_file).items():
        if key.startswith("unet."):
            layer, _, part = key[len("unet.") :].partition(".lora.")
            name = "lora_unet_" + layer.replace(".", "_")
            tensors[f"{name}.lora_{part.split('.')[0]}.weight"] = value
            tensors[f"{name}.alpha"] = torch.tensor(float(ALPHA))
    save_file(tensors, out)
    return out


@pytest.fixture(scope="module")
def teacher_loras(demo_teachers, tmp_path_factory):
    """Per SD version, a LoRA made for the demo teacher (U-Net and text encoder, non-zero updates) in diffusers'
    format (a folder), and its U-Net part as a kohya file."""
    loras = {}
    for version, teacher_dir in demo_teachers.items():
        pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None)
        add_lora(pipe.unet, RANK, ALPHA, UNET_TARGETS)
        add_lora(pipe.text_encoder, RANK, RANK, TEXT_TARGETS)
        torch.manual_seed(0)
        for name, param in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:  # peft starts B at zero (no change); a trained LoRA's is not
                param.data.normal_(0, 0.1)
        out = tmp_path_factory.mktemp(f"teacher_lora_{version}")
        save_lora(out / "diffusers", unet=pipe.unet, text_encoder=pipe.text_encoder)
        loras[version] = {
            "diffusers": out / "diffusers",
            "kohya": kohya_file(out / "diffusers" / WEIGHT_NAME, out / "k.safetensors"),
        }
    return loras


def teacher_config(teacher_dir):
    return json.loads((teacher_dir / "unet" / "config.json").read_text())


CASES = [(v, a, f) for a in ("base", "small", "tiny") for f in ("diffusers", "kohya") for v in ("v1",)]
CASES += [("v2", "tiny", "diffusers"), ("v2", "small", "kohya")]


@pytest.mark.parametrize(("version", "arch", "fmt"), CASES)
def test_each_kept_layer_changes_the_student_as_it_changes_the_teacher(
    version, arch, fmt, demo_teachers, teacher_loras, tmp_path
):
    teacher_dir, lora = demo_teachers[version], teacher_loras[version][fmt]
    result = transfer_lora(lora, teacher_config(teacher_dir), arch_cfg(arch))
    result.save(tmp_path / "student_lora")
    student = student_pipeline(teacher_dir, arch)
    student.load_lora_weights(tmp_path / "student_lora")
    teacher = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None)
    teacher.load_lora_weights(lora)
    teacher_layers, weight_map = dict(teacher.unet.named_modules()), arch_cfg(arch)["weight_map"]
    checked = 0
    torch.manual_seed(1)
    with torch.no_grad():
        for name, layer in student.unet.named_modules():
            if not hasattr(layer, "lora_A"):
                continue
            x = torch.randn(3, layer.in_features)
            twin = teacher_layers[map_key(name + ".", weight_map)[:-1]]  # the teacher layer it was copied from
            assert hasattr(twin, "lora_A"), name
            assert (layer(x) - layer.base_layer(x)).abs().max() > 1e-3, f"{name}: the LoRA changes nothing"
            torch.testing.assert_close(layer(x), twin(x), rtol=1e-5, atol=1e-6, msg=name)
            checked += 1
    assert checked == result.counts()[0] > 0


# LoRA layers per demo teacher: 16 transformer blocks x 8 targets (to_q/k/v/out.0 of attn1 and attn2)
COUNTS = {"base": (80, 48), "small": (72, 56), "tiny": (72, 56)}
REMOVED = {
    "base": [f"down_blocks.{i}.attentions.1" for i in range(3)] + [f"up_blocks.{i}.attentions.1" for i in (1, 2, 3)],
    "tiny": [f"down_blocks.{i}.attentions.1" for i in range(3)]
    + [f"up_blocks.{i}.attentions.1" for i in (1, 2, 3)]
    + ["mid_block"],
}
REMOVED["small"] = REMOVED["tiny"]


@pytest.mark.parametrize("arch", ["base", "small", "tiny"])
def test_counts_per_block(arch, demo_teacher_dir, teacher_loras):
    result = transfer_lora(teacher_loras["v1"]["diffusers"], teacher_config(demo_teacher_dir), arch_cfg(arch))
    assert result.counts() == COUNTS[arch]
    assert [b["block"] for b in result.blocks if b["student"] is None] == REMOVED[arch]
    assert all(b["layers"] == 8 for b in result.blocks)
    assert len(result.layers["text_encoder"]) == 2 * len(TEXT_TARGETS) * 2  # A and B, 2 layers: all kept
    if arch == "tiny":  # the teacher's up stage 1 is the student's up stage 0
        moved = {b["block"]: b["student"] for b in result.blocks}
        assert moved["up_blocks.1.attentions.2"] == "up_blocks.0.attentions.1"


def test_the_loaded_lora_changes_the_students_images(demo_teacher_dir, teacher_loras, tmp_path):
    transfer_lora(teacher_loras["v1"]["diffusers"], teacher_config(demo_teacher_dir), arch_cfg("tiny")).save(tmp_path)
    pipe = student_pipeline(demo_teacher_dir, "tiny")

    def image():
        generator = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np")

    before = image().images
    pipe.load_lora_weights(tmp_path)
    after = image().images
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-3
    assert any(hasattr(m, "lora_A") for m in pipe.text_encoder.modules())


def test_command_reports_each_block_and_refuses_to_overwrite(
    demo_teacher_dir, teacher_loras, tmp_path, capsys, monkeypatch, no_hydra_state_left
):
    lora, out = teacher_loras["v1"]["diffusers"], tmp_path / "tiny_lora"
    argv = [f"lora={lora}", "arch=tiny", "teacher=demo", f"teacher.pretrained={demo_teacher_dir}", f"out={out}"]
    code, stdout, _ = run_app(lora_transfer.main, argv, capsys, monkeypatch)
    assert code == 0
    assert "up_blocks.1.attentions.2     -> up_blocks.0.attentions.1        8 kept" in stdout
    assert "mid_block                    removed                            8 dropped" in stdout
    assert "U-Net LoRA layers: 72 kept, 56 dropped" in stdout
    record = json.loads((out / "transfer.json").read_text())
    assert (record["kept"], record["dropped"], record["arch"]) == (72, 56, "tiny")
    written = (out / WEIGHT_NAME).stat().st_mtime_ns
    code, _, stderr = run_app(lora_transfer.main, argv, capsys, monkeypatch)
    assert code == 2 and stderr.count("\n") == 1 and "exists" in stderr and "overwrite=true" in stderr
    assert (out / WEIGHT_NAME).stat().st_mtime_ns == written
    code, _, _ = run_app(lora_transfer.main, [*argv, "arch=small", "overwrite=true"], capsys, monkeypatch)
    assert code == 0 and json.loads((out / "transfer.json").read_text())["arch"] == "small"


def test_refuses_what_is_not_a_lora_of_this_teacher(
    demo_teacher_dir, tmp_path, capsys, monkeypatch, no_hydra_state_left
):
    student_lora = student_pipeline(demo_teacher_dir, "tiny").unet  # a LoRA made for the student, not the teacher
    save_lora(tmp_path / "student_made", unet=add_lora(student_lora, RANK, ALPHA, UNET_TARGETS))
    wide = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file(
        {f"{wide}.lora_A.weight": torch.zeros(4, 99), f"{wide}.lora_B.weight": torch.zeros(32, 4)},
        tmp_path / "w.safetensors",
    )
    base = ["arch=tiny", "teacher=demo", f"teacher.pretrained={demo_teacher_dir}", f"out={tmp_path / 'out'}"]
    for lora, says in [
        (tmp_path / "student_made", "up_blocks.0.attentions.0"),
        (tmp_path / "w.safetensors", "takes 99 features, the teacher's"),
        (tmp_path / "missing", "no such file or folder"),
    ]:
        code, _, stderr = run_app(lora_transfer.main, [f"lora={lora}", *base], capsys, monkeypatch)
        assert code == 2 and stderr.count("\n") == 1 and says in stderr, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_command_onto_an_exported_student(cache_dir, demo_teacher_dir, demo_export_dir, teacher_loras, tmp_path):
    out = tmp_path / "for_tiny"
    cmd = [PYTHON, "-m", "bksdm_lab.lora_transfer", f"lora={teacher_loras['v1']['kohya']}", "arch=tiny", "teacher=demo"]
    done = subprocess.run(
        [*cmd, f"out={out}"], env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "U-Net LoRA layers: 72 kept, 56 dropped" in done.stdout
    pipe = StableDiffusionPipeline.from_pretrained(demo_export_dir, safety_checker=None)
    pipe.load_lora_weights(out)
    assert sum(hasattr(m, "lora_A") for m in pipe.unet.modules()) == 72
