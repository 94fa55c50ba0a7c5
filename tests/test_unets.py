"""Student U-Nets: exact sizes, the teacher -> student weight map, and initialisation from the teacher.

The full-size numbers (BK-SDM paper, model cards) are checked on the meta device, so no weights are
allocated; the weight copy itself is checked on the tiny demo teacher, which has the SD-v1 topology.
"""

import pytest
import torch
from conftest import arch_cfg
from diffusers import UNet2DConditionModel

from bksdm_lab.models.students import (
    WeightMapError,
    build_student,
    count_params,
    init_student_from_teacher,
    map_key,
    plan_weight_copy,
    removed_blocks,
    student_config,
)
from bksdm_lab.models.teachers import shipped_configs

# Exact U-Net parameter counts (diffusers UNet2DConditionModel built from config).
TEACHER_PARAMS = {"sd14": 859_520_964, "sd15": 859_520_964, "sd21base": 865_910_724, "sd21": 865_910_724}
STUDENT_PARAMS = {
    ("sd14", "base"): 579_384_964,
    ("sd14", "small"): 482_346_884,
    ("sd14", "tiny"): 323_384_964,
    ("sd21base", "base"): 583_480_964,
    ("sd21base", "small"): 485_787_524,
    ("sd21base", "tiny"): 326_825_604,
}
TEACHER_KEYS = 686
STUDENT_KEYS = {"base": 442, "small": 396, "tiny": 358}


def _shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def _meta_teacher(configs: str) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(shipped_configs(configs)["unet"])


def _meta_student(configs: str, arch: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return build_student(shipped_configs(configs)["unet"], arch)


# ---- exact sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("configs", sorted(TEACHER_PARAMS))
def test_teacher_unet_param_count(configs):
    unet = _meta_teacher(configs)
    assert next(unet.parameters()).device.type == "meta"
    assert count_params(unet) == TEACHER_PARAMS[configs]
    assert len(unet.state_dict()) == TEACHER_KEYS


@pytest.mark.parametrize(("configs", "arch"), sorted(STUDENT_PARAMS))
def test_student_unet_param_count(configs, arch):
    student = _meta_student(configs, arch_cfg(arch))
    assert next(student.parameters()).device.type == "meta"
    assert count_params(student) == STUDENT_PARAMS[(configs, arch)]
    assert count_params(student, trainable_only=True) == STUDENT_PARAMS[(configs, arch)]


def test_sd21_768_teacher_matches_sd21base_unet_size_but_not_config():
    v, base = _meta_teacher("sd21"), _meta_teacher("sd21base")
    assert count_params(v) == count_params(base) == 865_910_724
    # 768 px v-prediction teacher: 96x96 latent and upcast attention; otherwise the same U-Net.
    assert v.config.sample_size == 96 and base.config.sample_size == 64
    assert v.config.upcast_attention is True and base.config.upcast_attention is False


def test_tiny_without_mid_block_removal_would_be_larger():
    """0.33B needs the mid block removed too; Tiny with it would be 420,423,044."""
    arch = arch_cfg("tiny")
    arch["unet_config"]["mid_block_type"] = "UNetMidBlock2DCrossAttn"
    assert count_params(_meta_student("sd14", arch)) == 420_423_044


def test_small_and_tiny_have_no_mid_block_base_keeps_it():
    assert _meta_student("sd14", arch_cfg("base")).mid_block is not None
    assert _meta_student("sd14", arch_cfg("small")).mid_block is None
    assert _meta_student("sd14", arch_cfg("tiny")).mid_block is None


def test_tiny_student_config_on_sd21base():
    cfg = student_config(shipped_configs("sd21base")["unet"], arch_cfg("tiny"))
    assert cfg["attention_head_dim"] == [5, 10, 20]
    assert cfg["block_out_channels"] == [320, 640, 1280]
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert cfg["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    assert cfg["layers_per_block"] == 1
    assert cfg["mid_block_type"] is None
    assert cfg["cross_attention_dim"] == 1024
    assert cfg["use_linear_projection"] is True
    assert not any(k.startswith("_") for k in cfg)


def test_tiny_student_config_on_sd14():
    cfg = student_config(shipped_configs("sd14")["unet"], arch_cfg("tiny"))
    assert cfg["block_out_channels"] == [320, 640, 1280]
    assert cfg["attention_head_dim"] == 8  # a scalar in v1: left alone by the stage drop
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert cfg["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    # Tiny's last down block has no downsampler: deepest resolution 16x16 for a 64x64 latent.
    student = _meta_student("sd14", arch_cfg("tiny"))
    assert student.down_blocks[-1].downsamplers is None
    assert [b.downsamplers is not None for b in student.down_blocks] == [True, True, False]


def test_student_config_rejects_dropping_every_stage():
    arch = {"name": "none", "unet_config": {}, "drop_deepest_stages": 4}
    with pytest.raises(ValueError, match="drop_deepest_stages=4"):
        student_config(shipped_configs("sd14")["unet"], arch)


# ---- the weight map on full-size models ------------------------------------------------------------


@pytest.mark.parametrize("configs", ["sd14", "sd21base"])
@pytest.mark.parametrize("arch", ["base", "small", "tiny"])
def test_weight_map_covers_every_student_key(configs, arch):
    cfg = arch_cfg(arch)
    teacher, student = _meta_teacher(configs), _meta_student(configs, cfg)
    tshapes, sshapes = _shapes(teacher), _shapes(student)
    assert len(tshapes) == TEACHER_KEYS
    assert len(sshapes) == STUDENT_KEYS[arch]
    plan = plan_weight_copy(sshapes, tshapes, cfg["weight_map"])
    assert set(plan) == set(sshapes)
    assert len(plan) == STUDENT_KEYS[arch]
    for skey, tkey in plan.items():
        assert tshapes[tkey] == sshapes[skey], (skey, tkey)
    # No teacher tensor is copied twice: the map is injective.
    assert len(set(plan.values())) == len(plan)


def test_tiny_map_specifics():
    wm = arch_cfg("tiny")["weight_map"]
    assert map_key("up_blocks.0.resnets.1.conv1.weight", wm) == "up_blocks.1.resnets.2.conv1.weight"
    assert map_key("up_blocks.0.resnets.0.conv1.weight", wm) == "up_blocks.1.resnets.0.conv1.weight"
    assert map_key("up_blocks.1.upsamplers.0.conv.weight", wm) == "up_blocks.2.upsamplers.0.conv.weight"
    assert map_key("up_blocks.0.upsamplers.0.conv.bias", wm) == "up_blocks.1.upsamplers.0.conv.bias"
    assert (
        map_key("up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight", wm)
        == "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"
    )
    assert map_key("down_blocks.2.attentions.0.proj_out.weight", wm) == "down_blocks.2.attentions.0.proj_out.weight"
    assert map_key("conv_in.weight", wm) == "conv_in.weight"


def test_base_map_specifics():
    wm = arch_cfg("base")["weight_map"]
    assert map_key("up_blocks.3.attentions.1.proj_in.weight", wm) == "up_blocks.3.attentions.2.proj_in.weight"
    assert map_key("up_blocks.0.resnets.1.conv2.bias", wm) == "up_blocks.0.resnets.2.conv2.bias"
    assert map_key("up_blocks.3.resnets.0.norm1.weight", wm) == "up_blocks.3.resnets.0.norm1.weight"
    for key in (
        "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.0.resnets.0.norm1.bias",
        "mid_block.resnets.0.conv1.weight",
    ):
        assert map_key(key, wm) == key


def test_small_uses_base_map():
    assert arch_cfg("small")["weight_map"] == arch_cfg("base")["weight_map"]


def test_map_key_prefers_longest_prefix():
    wm = {"a.": "x.", "a.b.": "y."}
    assert map_key("a.b.c", wm) == "y.c"
    assert map_key("a.c", wm) == "x.c"
    assert map_key("z.c", wm) == "z.c"


def test_tiny_removed_blocks_on_sd14():
    wm = arch_cfg("tiny")["weight_map"]
    teacher, student = _meta_teacher("sd14"), _meta_student("sd14", arch_cfg("tiny"))
    removed = removed_blocks(student.state_dict(), teacher.state_dict(), wm)
    for block in ("mid_block", "down_blocks.3.resnets.0", "up_blocks.0.upsamplers.0", "down_blocks.2.downsamplers.0"):
        assert block in removed
    assert "down_blocks.0.resnets.0" not in removed
    assert sorted(removed) == sorted(
        [
            *(f"down_blocks.{i}.{kind}.1" for i in range(3) for kind in ("resnets", "attentions")),
            "down_blocks.2.downsamplers.0",
            "down_blocks.3.resnets.0",
            "down_blocks.3.resnets.1",
            "mid_block",
            "up_blocks.0.resnets.0",
            "up_blocks.0.resnets.1",
            "up_blocks.0.resnets.2",
            "up_blocks.0.upsamplers.0",
            *(f"up_blocks.{j}.{kind}.1" for j in (1, 2, 3) for kind in ("resnets", "attentions")),
        ]
    )


def test_base_removed_blocks_on_sd14():
    wm = arch_cfg("base")["weight_map"]
    teacher, student = _meta_teacher("sd14"), _meta_student("sd14", arch_cfg("base"))
    removed = removed_blocks(student.state_dict(), teacher.state_dict(), wm)
    expected = [f"down_blocks.{i}.attentions.1" for i in range(3)] + [f"down_blocks.{i}.resnets.1" for i in range(4)]
    expected += [f"up_blocks.{j}.resnets.1" for j in range(4)] + [f"up_blocks.{j}.attentions.1" for j in (1, 2, 3)]
    assert sorted(removed) == sorted(expected)


# ---- broken maps -------------------------------------------------------------------------------


def test_dropped_map_entry_names_the_uncovered_student_keys():
    cfg = arch_cfg("tiny")
    wm = dict(cfg["weight_map"])
    del wm["up_blocks.0.attentions.0."]  # teacher up_blocks.0 is an UpBlock2D: it has no attentions
    tshapes, sshapes = _shapes(_meta_teacher("sd14")), _shapes(_meta_student("sd14", cfg))
    uncovered = [k for k in sshapes if k.startswith("up_blocks.0.attentions.0.")]
    assert len(uncovered) > 5
    with pytest.raises(WeightMapError) as info:
        plan_weight_copy(sshapes, tshapes, wm)
    msg = str(info.value)
    assert f"{len(uncovered)} uncovered, 0 mismatched" in msg
    assert "up_blocks.0.attentions.0.proj_in.weight <- up_blocks.0.attentions.0.proj_in.weight" in msg
    for key in uncovered:
        assert key in msg
    assert "up_blocks.0.resnets.0." not in msg  # covered keys are not listed


def test_dropped_map_entry_with_same_named_teacher_block_gives_shape_mismatch():
    cfg = arch_cfg("tiny")
    wm = dict(cfg["weight_map"])
    del wm["up_blocks.2.resnets.1."]  # falls back to teacher up_blocks.2.resnets.1 (a 640-wide stage)
    tshapes, sshapes = _shapes(_meta_teacher("sd14")), _shapes(_meta_student("sd14", cfg))
    with pytest.raises(WeightMapError) as info:
        plan_weight_copy(sshapes, tshapes, wm)
    msg = str(info.value)
    assert "0 uncovered" in msg
    assert (
        "shape mismatch: up_blocks.2.resnets.1.conv1.weight (320, 640, 3, 3) <- up_blocks.2.resnets.1.conv1.weight"
        in msg
    )


def test_resnet_mapped_onto_attention_is_a_shape_mismatch():
    cfg = arch_cfg("base")
    wm = dict(cfg["weight_map"])
    wm["up_blocks.1.resnets.1.conv1."] = "up_blocks.1.attentions.2.proj_in."
    tshapes, sshapes = _shapes(_meta_teacher("sd14")), _shapes(_meta_student("sd14", cfg))
    with pytest.raises(WeightMapError) as info:
        plan_weight_copy(sshapes, tshapes, wm)
    msg = str(info.value)
    # Only the kernel's shape differs; the bias (1280,) fits the attention's proj_in bias.
    assert "0 uncovered, 1 mismatched" in msg
    assert (
        "shape mismatch: up_blocks.1.resnets.1.conv1.weight (1280, 1920, 3, 3) <- "
        "up_blocks.1.attentions.2.proj_in.weight (1280, 1280, 1, 1)" in msg
    )


def test_whole_resnet_mapped_onto_attention_is_uncovered_and_mismatched():
    cfg = arch_cfg("base")
    wm = dict(cfg["weight_map"])
    wm["up_blocks.1.resnets.1."] = "up_blocks.1.attentions.2."
    tshapes, sshapes = _shapes(_meta_teacher("sd14")), _shapes(_meta_student("sd14", cfg))
    with pytest.raises(WeightMapError) as info:
        plan_weight_copy(sshapes, tshapes, wm)
    msg = str(info.value)
    # A resnet shares no tensor name with an attention, so every one of its keys is uncovered.
    resnet_keys = [k for k in sshapes if k.startswith("up_blocks.1.resnets.1.")]
    assert f"{len(resnet_keys)} uncovered, 0 mismatched" in msg
    assert (
        "uncovered: up_blocks.1.resnets.1.conv1.weight <- up_blocks.1.attentions.2.conv1.weight (no such teacher tensor)"
        in msg
    )


def test_weight_map_error_is_a_value_error_and_raised_by_init(teacher):
    arch = arch_cfg("tiny")
    del arch["weight_map"]["up_blocks.0.attentions.0."]  # the teacher's up_blocks.0 has no attentions
    assert issubclass(WeightMapError, ValueError)
    with pytest.raises(WeightMapError, match=r"uncovered: up_blocks\.0\.attentions\.0\.proj_in\.weight"):
        init_student_from_teacher(teacher.unet, arch)


# ---- real weight copy on the tiny demo teacher ---------------------------------------------------

# (student key, teacher key of the same name) whose values must differ because the map redirects them.
REMAPPED_PROBES = {
    "base": ["up_blocks.3.attentions.1.proj_in.weight", "up_blocks.0.resnets.1.conv1.weight"],
    "small": ["up_blocks.2.attentions.1.proj_out.weight", "up_blocks.1.resnets.1.conv2.weight"],
    "tiny": ["up_blocks.0.resnets.1.conv1.weight", "up_blocks.1.upsamplers.0.conv.weight"],
}


@pytest.mark.parametrize("arch", ["base", "small", "tiny"])
def test_init_student_copies_every_tensor_by_the_map(teacher, arch):
    cfg = arch_cfg(arch)
    wm = cfg["weight_map"]
    student = init_student_from_teacher(teacher.unet, cfg)
    assert isinstance(student, UNet2DConditionModel)
    sstate, tstate = student.state_dict(), teacher.unet.state_dict()
    # The demo teacher has the SD-v1 topology; with widths 32/64/64/64 its down_blocks.2.resnets.0 needs no
    # conv_shortcut, so teacher and students have two keys fewer than at full size.
    assert len(sstate) == STUDENT_KEYS[arch] - (TEACHER_KEYS - len(tstate))
    for skey, value in sstate.items():
        tkey = map_key(skey, wm)
        assert torch.equal(value, tstate[tkey]), f"{skey} != teacher {tkey}"
    # The remap matters: the same-named teacher tensor holds different values.
    remapped_same_shape = [
        k for k in sstate if map_key(k, wm) != k and k in tstate and tstate[k].shape == sstate[k].shape
    ]
    assert remapped_same_shape
    differ = [k for k in remapped_same_shape if not torch.equal(sstate[k], tstate[k])]
    assert differ
    for key in REMAPPED_PROBES[arch]:
        assert map_key(key, wm) != key
        assert key in tstate and tstate[key].shape == sstate[key].shape
        assert not torch.equal(sstate[key], tstate[key]), key
        assert torch.equal(sstate[key], tstate[map_key(key, wm)])


def test_init_student_is_independent_of_teacher(teacher):
    student = init_student_from_teacher(teacher.unet, arch_cfg("tiny"))
    before = teacher.unet.conv_in.weight.clone()
    with torch.no_grad():
        student.conv_in.weight.add_(1.0)
    assert torch.equal(teacher.unet.conv_in.weight, before)
    assert student.dtype == teacher.unet.dtype
    assert student.device == teacher.unet.device


def test_student_forward_shape_matches_teacher(teacher):
    torch.manual_seed(0)
    student = init_student_from_teacher(teacher.unet, arch_cfg("tiny"))
    size = teacher.unet.config.sample_size
    x = torch.randn(2, 4, size, size)
    cond = torch.randn(2, 77, teacher.unet.config.cross_attention_dim)
    t = torch.tensor([1, 999])
    with torch.no_grad():
        out = student(x, t, cond).sample
    assert out.shape == (2, 4, size, size)
    assert torch.isfinite(out).all()


# ---- arch.init: teacher (the paper) or random (the ablation) ---------------------------------------


def _marked_teacher(teacher) -> dict[str, float]:
    """Fill teacher tensor i with the constant 1000 + i (no default initialisation draws such values)."""
    marks = {}
    with torch.no_grad():
        for i, (key, value) in enumerate(teacher.unet.state_dict().items()):
            marks[key] = 1000.0 + i
            value.fill_(marks[key])
    return marks


def test_every_arch_config_says_teacher_init():
    for name in ("base", "small", "tiny"):
        assert arch_cfg(name)["init"] == "teacher", name


@pytest.mark.parametrize("arch", ["base", "tiny"])
def test_random_init_copies_nothing_teacher_init_copies_every_mapped_tensor(teacher, arch):
    marks = _marked_teacher(teacher)
    cfg = arch_cfg(arch)
    wm = cfg["weight_map"]
    torch.manual_seed(0)
    copied = init_student_from_teacher(teacher.unet, cfg)
    torch.manual_seed(0)
    random = init_student_from_teacher(teacher.unet, {**cfg, "init": "random"})
    cstate, rstate = copied.state_dict(), random.state_dict()
    # The same architecture: same keys, shapes, dtype, device and parameter counts.
    assert {k: v.shape for k, v in cstate.items()} == {k: v.shape for k, v in rstate.items()}
    assert count_params(random) == count_params(copied) == count_params(random, trainable_only=True)
    assert (random.dtype, random.device) == (teacher.unet.dtype, teacher.unet.device)
    for key in cstate:
        mark = marks[map_key(key, wm)]
        assert torch.all(cstate[key] == mark), f"teacher init: {key} is not teacher {map_key(key, wm)}"
        assert not torch.any(rstate[key] >= 1000.0), f"random init: {key} holds teacher values"
    # diffusers' default initialisation, untouched: norms start at weight 1 / bias 0, convolutions are random.
    assert torch.all(rstate["conv_norm_out.weight"] == 1) and torch.all(rstate["conv_norm_out.bias"] == 0)
    assert rstate["conv_in.weight"].std() > 0


def test_random_init_is_seeded(teacher):
    cfg = {**arch_cfg("tiny"), "init": "random"}

    def weights(student):
        return torch.cat([p.detach().flatten() for p in student.parameters()])

    torch.manual_seed(3)
    a = weights(init_student_from_teacher(teacher.unet, cfg))
    torch.manual_seed(3)
    b = weights(init_student_from_teacher(teacher.unet, cfg))
    torch.manual_seed(4)
    c = weights(init_student_from_teacher(teacher.unet, cfg))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # An explicit seed: the same student whatever the global RNG holds, and the global RNG is left as it was.
    torch.manual_seed(123)
    state = torch.get_rng_state()
    d = weights(init_student_from_teacher(teacher.unet, cfg, seed=3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(d, a)


def test_random_init_still_checks_the_weight_map(teacher):
    cfg = {**arch_cfg("tiny"), "init": "random"}
    del cfg["weight_map"]["up_blocks.0.attentions.0."]
    with pytest.raises(WeightMapError, match=r"uncovered: up_blocks\.0\.attentions\.0\.proj_in\.weight"):
        init_student_from_teacher(teacher.unet, cfg)


def test_unknown_init_names_the_key_and_the_choices(teacher):
    with pytest.raises(WeightMapError) as info:
        init_student_from_teacher(teacher.unet, {**arch_cfg("tiny"), "init": "imagenet"})
    assert str(info.value) == "arch.init='imagenet' is not one of: teacher, random"
    assert "\n" not in str(info.value)
