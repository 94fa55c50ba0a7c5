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


# ---- keep patterns: base, small and tiny are three of them ------------------------------------------------------

# conf/arch/{base,small,tiny}.yaml as they were written by hand before keep patterns (the weight maps and pairs the
# paper's students were trained with): the patterns must derive exactly these.
_BASE_MAP = {
    **{f"up_blocks.{j}.resnets.1.": f"up_blocks.{j}.resnets.2." for j in range(4)},
    **{f"up_blocks.{j}.attentions.1.": f"up_blocks.{j}.attentions.2." for j in (1, 2, 3)},
}
_BASE_PAIRS = [[f"down_blocks.{i}"] * 2 for i in range(4)] + [[f"up_blocks.{j}"] * 2 for j in range(4)]
HAND_WRITTEN = {
    "base": {"unet_config": {"layers_per_block": 1}, "drop_deepest_stages": 0, "weight_map": _BASE_MAP},
    "small": {
        "unet_config": {"layers_per_block": 1, "mid_block_type": None},
        "drop_deepest_stages": 0,
        "weight_map": _BASE_MAP,
    },
    "tiny": {
        "unet_config": {"layers_per_block": 1, "mid_block_type": None},
        "drop_deepest_stages": 1,
        "weight_map": {
            "up_blocks.0.resnets.0.": "up_blocks.1.resnets.0.",
            "up_blocks.0.attentions.0.": "up_blocks.1.attentions.0.",
            "up_blocks.0.resnets.1.": "up_blocks.1.resnets.2.",
            "up_blocks.0.attentions.1.": "up_blocks.1.attentions.2.",
            "up_blocks.0.upsamplers.": "up_blocks.1.upsamplers.",
            "up_blocks.1.resnets.0.": "up_blocks.2.resnets.0.",
            "up_blocks.1.attentions.0.": "up_blocks.2.attentions.0.",
            "up_blocks.1.resnets.1.": "up_blocks.2.resnets.2.",
            "up_blocks.1.attentions.1.": "up_blocks.2.attentions.2.",
            "up_blocks.1.upsamplers.": "up_blocks.2.upsamplers.",
            "up_blocks.2.resnets.0.": "up_blocks.3.resnets.0.",
            "up_blocks.2.attentions.0.": "up_blocks.3.attentions.0.",
            "up_blocks.2.resnets.1.": "up_blocks.3.resnets.2.",
            "up_blocks.2.attentions.1.": "up_blocks.3.attentions.2.",
        },
        "feature_pairs": [
            ["down_blocks.0", "down_blocks.0"],
            ["down_blocks.1", "down_blocks.1"],
            ["down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"],
            ["up_blocks.1", "up_blocks.0"],
            ["up_blocks.2", "up_blocks.1"],
            ["up_blocks.3", "up_blocks.2"],
        ],
    },
}


def composed_arch(name: str, *overrides: str) -> dict:
    """conf/arch/<name>.yaml composed in conf/arch.yaml with ``overrides`` (teacher=...), resolved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import bksdm_lab

    with initialize_config_dir(config_dir=str(bksdm_lab.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="arch", overrides=[*overrides, f"+arch={name}"])
    return OmegaConf.to_container(cfg.arch, resolve=True)


@pytest.mark.parametrize("teacher_name", ["sd14", "sd21base", "demo"])
def test_paper_variants_are_keep_patterns_deriving_the_hand_written_configs(teacher_name):
    for name, expected in HAND_WRITTEN.items():
        arch = composed_arch(name, f"teacher={teacher_name}")
        assert "keep" in arch, name
        assert arch["unet_config"] == expected["unet_config"], name
        assert arch["drop_deepest_stages"] == expected["drop_deepest_stages"], name
        assert arch["weight_map"] == expected["weight_map"], name
        assert arch["feature_pairs"] == expected.get("feature_pairs", _BASE_PAIRS), name
        if teacher_name != "demo":  # the demo teacher's folder, once built, is read instead (the same config)
            assert arch["derived_from"]["teacher"] == f"teacher.configs={teacher_name}"


def test_self_attention_pairs_of_every_kept_attention_layer():
    attn1 = "transformer_blocks.0.attn1"
    tiny = composed_arch("tiny")["self_attention_pairs"]
    assert tiny == [
        *([f"down_blocks.{i}.attentions.0.{attn1}"] * 2 for i in range(3)),
        *(
            [f"up_blocks.{j}.attentions.{k}.{attn1}", f"up_blocks.{j - 1}.attentions.{p}.{attn1}"]
            for j in (1, 2, 3)
            for p, k in enumerate((0, 2))
        ),
    ]
    base = composed_arch("base")["self_attention_pairs"]
    assert len(base) == 3 + 3 * 2  # down_blocks.3 and up_blocks.0 have no attentions; the mid block is not paired
    assert [f"up_blocks.1.attentions.2.{attn1}", f"up_blocks.1.attentions.1.{attn1}"] in base
    assert len(composed_arch("keep")["self_attention_pairs"]) == 3 * 2 + 3 * 3  # keep's default: the whole teacher


@pytest.mark.parametrize("name", ["base", "small", "tiny", "keep"])
def test_every_pair_names_modules_of_demo_teacher_and_student(teacher, name):
    from bksdm_lab.models.taps import FeatureTaps

    arch = arch_cfg(name)
    with torch.device("meta"):
        student = build_student(teacher.unet.config, arch)
    for key in ("feature_pairs", "self_attention_pairs"):
        FeatureTaps(teacher.unet, [t for t, _ in arch[key]]).remove()
        FeatureTaps(student, [s for _, s in arch[key]]).remove()


def test_example_pattern_sizes_and_config_on_sd14():
    arch = composed_arch("keep", "+arch.keep.up=[[0,2],[0,2],[0,1,2],[0,2]]".lstrip("+"))
    assert arch["unet_config"] == {"layers_per_block": [1, 2, 1, 1]}  # down derived: [[0], [0, 1], [0], [0]]
    teacher, student = _meta_teacher("sd14"), _meta_student("sd14", arch)
    assert count_params(student) == 618_662_404  # between Base (579,384,964) and the teacher
    assert [len(b.resnets) for b in student.up_blocks] == [2, 2, 3, 2]
    plan = plan_weight_copy(_shapes(student), _shapes(teacher), arch["weight_map"])
    assert plan["up_blocks.2.resnets.2.conv1.weight"] == "up_blocks.2.resnets.2.conv1.weight"
    assert plan["up_blocks.1.resnets.1.conv1.weight"] == "up_blocks.1.resnets.2.conv1.weight"
    assert len(set(plan.values())) == len(plan)


# Patterns around Base, one stage changed at a time: the channel check refuses exactly those the weight map check refuses.
_PROBES = [
    *({"up": [[0, 2]] * j + [kept] + [[0, 2]] * (3 - j)} for j in (1, 2, 3) for kept in ([0, 1], [1, 2])),
    {"up": [[0, 2], [0, 2], [0, 1, 2], [0, 2]]},
    *({"down": [[0]] * i + [[1]] + [[0]] * (3 - i)} for i in (1, 2)),
    {"down": [[0], [0], None, None], "mid": True},
    {"down": [[0], [0, 1], None, None], "mid": False},
]


@pytest.mark.parametrize("configs", ["demo", "sd14"])
def test_keep_errors_match_the_weight_map_check_exactly(configs):
    from bksdm_lab.models.keep import KeepPatternError, derive

    unet_config = shipped_configs(configs)["unet"]
    teacher_shapes = _shapes(_meta_teacher(configs))
    refused = []
    for keep in _PROBES:
        derived = derive(keep, unet_config, check_channels=False)
        arch = {"unet_config": derived.unet_config, "drop_deepest_stages": derived.drop_deepest_stages}
        with torch.device("meta"):
            shapes = _shapes(build_student(unet_config, arch))
        try:
            plan_weight_copy(shapes, teacher_shapes, derived.weight_map)
            fits = True
        except WeightMapError:
            fits = False
        why = "accepted, but the weight map does not fit"
        try:
            derive(keep, unet_config)
            accepted = True
        except KeepPatternError as err:
            accepted, why = False, str(err)
            assert "\n" not in why and why.startswith("arch.keep.")
        assert accepted == fits, (keep, why)
        refused += [] if accepted else [keep]
    assert refused  # both teachers refuse some ([0, 1] in an up stage whose skip is narrower)


def _demo_unet():
    return shipped_configs("demo")["unet"]


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (
            {"up": [[0, 2], [0, 3], [0, 2], [0, 2]]},
            "arch.keep.up.1=[0, 3]: layer 3 is out of range: the teacher's up_blocks.1 has layers 0..2",
        ),
        ({"down": [[0], [], [0], [0]]}, "arch.keep.down.1=[] keeps no layer of down_blocks.1"),
        (
            {"up": [[0, 2], [2, 0], [0, 2], [0, 2]]},
            "arch.keep.up.1=[2, 0] must name each layer once, in increasing order",
        ),
        ({"up": [[0, 2], [0, 0, 2], [0, 2], [0, 2]]}, "arch.keep.up.1=[0, 0, 2] must name each layer once"),
        ({"up": [[0, 2], [0, 2], [0, 2]]}, "arch.keep.up has 3 stages but the teacher has 4"),
        (
            {"up": [[0, 2], [0, 2], [2], [0, 2]]},
            "arch.keep.up.2=[2] keeps 1 layer, so the mirrored down_blocks.1 would keep none",
        ),
        (
            {"down": [[0], [0], [0], [0]], "up": [[0, 1, 2], [0, 2], [0, 2], [0, 2]]},
            "arch.keep.up.0=[0, 1, 2] keeps 3 layers, but diffusers builds up_blocks.0 with one more than its mirrored "
            "down_blocks.3 keeps (arch.keep.down.3=[0]): keep 2",
        ),
        (
            {"down": [[0], None, [0], [0]], "up": [[0, 2], [0, 2], None, [0, 2]]},
            "arch.keep.down.1=null drops down_blocks.1 (and up_blocks.2), which is not among the deepest",
        ),
        (
            {"down": [[0], [0], [0], None], "up": [[0, 2], [0, 2], [0, 2], [0, 2]]},
            "arch.keep.down.3=null drops a stage but arch.keep.up.0=[0, 2] keeps its mirror",
        ),
        ({"down": [None] * 4}, "arch.keep drops every stage of the teacher"),
        ({"up": [[0, "a"], [0, 2], [0, 2], [0, 2]]}, "arch.keep.up.0=[0, 'a'] must be a list of teacher layer indices"),
        ({"up": 3}, "arch.keep.up=3 must be a list of 4 stages"),
        ({"mid": "no"}, "arch.keep.mid='no' must be true or false"),
        ({"middle": False}, "arch.keep.middle is not a keep-pattern key; the keys are: down, up, mid"),
        (
            {"up": [[0, 2], [0, 2], [0, 1], [0, 2]]},
            "arch.keep.up.2=[0, 1]: student up_blocks.2.resnets.1 cannot copy teacher up_blocks.2.resnets.1",
        ),
        ({"down": [[0], [0], None, None], "mid": True}, None),  # fine on the demo teacher (64 channels at both depths)
    ],
)
def test_keep_pattern_errors_name_the_key_and_why(keep, message):
    from bksdm_lab.models.keep import KeepPatternError, derive

    if message is None:
        assert derive(keep, _demo_unet()).drop_deepest_stages == 2
        return
    with pytest.raises(KeepPatternError) as info:
        derive(keep, _demo_unet())
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, WeightMapError)  # train reports it as one line, exit 2


def test_keep_error_passes_through_omegaconf_as_one_line():
    from bksdm_lab.models.keep import KeepPatternError

    with pytest.raises(KeepPatternError) as info:
        composed_arch("keep", "arch.keep.up=[[0,2],[0,2],[0,2]]")
    assert str(info.value).startswith("arch.keep.up has 3 stages but the teacher has 4")
    assert "\n" not in str(info.value) and "full_key" not in str(info.value)


def test_local_teacher_folder_config_is_read(tmp_path):
    """teacher.pretrained=<local folder>: the pattern derives from that folder's unet/config.json (3 layers a stage
    here), so a pattern that fits it works and one that does not fails clearly."""
    import json

    config = {**_demo_unet(), "layers_per_block": 3}
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    over = ("teacher=demo", f"teacher.pretrained={tmp_path}")
    arch = composed_arch("keep", *over, "arch.keep.down=[[0],[0],[0],[0]]")  # up derived: [0, 3] (first + last)
    assert arch["derived_from"]["teacher"] == f"teacher.pretrained={tmp_path}"
    assert arch["derived_from"]["layers_per_block"] == [3, 3, 3, 3]
    assert arch["weight_map"]["up_blocks.2.resnets.1."] == "up_blocks.2.resnets.3."
    with torch.device("meta"):
        teacher_shapes = _shapes(UNet2DConditionModel.from_config(config))
        student_shapes = _shapes(build_student(config, arch))
    plan_weight_copy(student_shapes, teacher_shapes, arch["weight_map"])
    from bksdm_lab.models.keep import KeepPatternError

    with pytest.raises(KeepPatternError, match=r"arch\.keep\.up\.2=\[0, 2\]: .*only the last layer \(3\)"):
        composed_arch("base", *over)


def test_teacher_of_another_topology_than_derived_from_is_a_clear_error(teacher):
    arch = arch_cfg("tiny")
    arch["derived_from"] = {**arch["derived_from"], "layers_per_block": [3, 3, 3, 3]}
    with pytest.raises(WeightMapError) as info:
        init_student_from_teacher(teacher.unet, arch)
    assert "(layers_per_block [3, 3, 3, 3]), but the loaded teacher has layers_per_block [2, 2, 2, 2]" in str(
        info.value
    )
    assert "\n" not in str(info.value)
