"""ControlNets for BK-SDM students: what diffusers' own builder refuses, what student_controlnet copies from the student,
and that its residuals reach the student's layers (no change at init, a change once the zero convs are not zero)."""

import numpy as np
import pytest
import torch
from conftest import arch_cfg, student_pipeline
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

from bksdm_lab.models.controlnet import student_controlnet
from bksdm_lab.models.students import build_student
from bksdm_lab.models.teachers import shipped_configs

PROMPT = "a red square on a blue background"


def _student(arch: str):
    torch.manual_seed(0)
    return build_student(shipped_configs("demo")["unet"], arch_cfg(arch))


@pytest.mark.parametrize("arch", ["small", "tiny"])
def test_diffusers_from_unet_refuses_a_student_without_mid_block(arch):
    with pytest.raises(ValueError, match="unknown mid_block_type"):
        ControlNetModel.from_unet(_student(arch))


def test_a_student_with_uneven_layers_per_stage_is_one_line():
    unet = build_student(shipped_configs("demo")["unet"], {"unet_config": {"layers_per_block": [2, 1, 1, 1]}})
    with pytest.raises(ValueError, match=r"\[2, 1, 1, 1\] layers per down stage"):
        student_controlnet(unet)


def test_a_student_with_a_guidance_input_is_one_line():
    unet = build_student({**shipped_configs("demo")["unet"], "time_cond_proj_dim": 32}, arch_cfg("tiny"))  # an LCM
    with pytest.raises(ValueError, match="no place for the student's time_embedding.cond_proj.weight"):
        student_controlnet(unet)


def _residual_count(unet) -> list[int]:
    """Hooks counting the down-block residuals the student's forward makes (conv_in's output is the first)."""
    counts = [1]
    for block in unet.down_blocks:
        block.register_forward_hook(lambda _m, _i, out: counts.append(len(out[1])))
    return counts


def _generate(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=generator, output_type="np", **kwargs)[
        "images"
    ]


@pytest.mark.parametrize(
    "version, arch", [("v1", "base"), ("v1", "small"), ("v1", "tiny"), ("v2", "small"), ("v2", "tiny")]
)
def test_student_controlnet_copies_the_student_and_reaches_its_layers(demo_teachers, version, arch):
    pipe = student_pipeline(demo_teachers[version], arch)
    unet = pipe.unet
    controlnet = student_controlnet(unet)

    assert type(controlnet) is ControlNetModel
    assert len(controlnet.down_blocks) == len(unet.down_blocks) == (3 if arch == "tiny" else 4)
    student, copied = unet.state_dict(), controlnet.state_dict()
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # cross-attention from the text
    for key in ["conv_in.weight", "time_embedding.linear_2.weight", attn, "down_blocks.2.resnets.0.conv1.weight"]:
        assert torch.equal(copied[key], student[key]), key
    if arch == "base":
        assert controlnet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
        assert torch.equal(
            copied["mid_block.attentions.0.proj_out.weight"], student["mid_block.attentions.0.proj_out.weight"]
        )
    else:
        assert unet.mid_block is None and controlnet.config.mid_block_type == "UNetMidBlock2D"
    assert all(
        not p.any()
        for p in [*controlnet.controlnet_down_blocks.parameters(), *controlnet.controlnet_mid_block.parameters()]
    )

    plain = _generate(pipe)
    control = StableDiffusionControlNetPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    control.set_progress_bar_config(disable=True)
    condition = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    expected = _residual_count(unet)
    yielded = []
    controlnet.register_forward_hook(lambda _m, _i, out: yielded.append(len(out[0])))
    at_init = _generate(control, image=condition)
    assert plain.shape == at_init.shape == (1, 64, 64, 3)
    assert np.allclose(at_init, plain, atol=1e-5), np.abs(at_init - plain).max()
    # one ControlNet residual per student down residual (the U-Net's forward zips them, silently dropping extras)
    assert yielded[0] == sum(expected[: 1 + len(unet.down_blocks)])

    with torch.no_grad():  # the mid residual alone reaches the student (its deepest down output where it has no mid)
        torch.nn.init.normal_(
            controlnet.controlnet_mid_block.weight, std=0.1, generator=torch.Generator().manual_seed(2)
        )
        mid_only = _generate(control, image=condition)
        for conv in controlnet.controlnet_down_blocks:
            torch.nn.init.normal_(conv.weight, std=0.1, generator=torch.Generator().manual_seed(3))
        all_convs = _generate(control, image=condition)
    assert np.abs(mid_only - plain).max() > 1e-3
    assert np.abs(all_convs - mid_only).max() > 1e-3


@pytest.mark.parametrize("arch, fresh_mid_block", [("small", "UNetMidBlock2D"), ("tiny", "UNetMidBlock2DCrossAttn")])
def test_the_controlnet_round_trips_through_save_pretrained(tmp_path, arch, fresh_mid_block):
    controlnet = student_controlnet(_student(arch), fresh_mid_block=fresh_mid_block)
    controlnet.save_pretrained(tmp_path / "controlnet")
    loaded = ControlNetModel.from_pretrained(tmp_path / "controlnet")
    assert loaded.config.mid_block_type == fresh_mid_block
    assert type(loaded.mid_block).__name__ == fresh_mid_block
    original, reloaded = controlnet.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
