"""ControlNets for BK-SDM students: a plain diffusers ``ControlNetModel`` whose encoder mirrors a student's down path.

``ControlNetModel.from_unet`` refuses a student without a mid block (BK-SDM-Small, -Tiny: "unknown mid_block_type :
None"); :func:`student_controlnet` builds one for every student, its weights copied from the student as ``from_unet``
copies them (conv_in, the time embedding, the down blocks, the mid block where the student has one).
Initialised fresh: the conditioning embedding and the zero convs always; the mid block where the student has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict

FRESH = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")  # never in a U-Net
# The U-Net's modules before its up path: what a ControlNet copies (``from_unet``'s list, and ``encoder_hid_proj``).
ENCODER = (
    "conv_in",
    "time_embedding",
    "class_embedding",
    "add_embedding",
    "encoder_hid_proj",
    "down_blocks",
    "mid_block",
)


def student_controlnet(
    unet: UNet2DConditionModel,
    conditioning_channels: int = 3,
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
    fresh_mid_block: str = "UNetMidBlock2D",
) -> ControlNetModel:
    """A ControlNet for the student ``unet``, on its device and in its dtype.

    ``conditioning_embedding_out_channels``: the conditioning image's embedding, which downsamples by
    ``2 ** (len - 1)``: the VAE's scale factor (8 for SD, as the default). ``fresh_mid_block``: the ControlNet's mid
    block where the student has none, ``UNetMidBlock2D`` (one resnet, the lightest diffusers builds) or
    ``UNetMidBlock2DCrossAttn`` (the teacher's kind); its output reaches the student through the zero-initialised
    ``controlnet_mid_block``, added to the student's deepest down-block output, so at first it changes nothing.
    """
    layers = unet.config.layers_per_block
    if isinstance(layers, (list, tuple)):  # ControlNetModel takes one layer count for every stage
        if len(set(layers)) != 1:
            raise ValueError(
                f"the student has {list(layers)} layers per down stage: a diffusers ControlNet has the same number "
                "in every stage"
            )
        layers = layers[0]
    has_mid = unet.mid_block is not None
    config = {**unet.config, "layers_per_block": int(layers)}
    if not has_mid:
        config["mid_block_type"] = fresh_mid_block
    controlnet = ControlNetModel.from_unet(
        SimpleNamespace(config=FrozenDict(config)),  # from_unet reads only the config when it loads no weights
        conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        load_weights_from_unet=False,
        conditioning_channels=conditioning_channels,
    )
    own, state = controlnet.state_dict(), unet.state_dict()
    if lost := [k for k in state if k not in own and k.split(".")[0] in ENCODER]:
        raise ValueError(f"a diffusers ControlNet has no place for the student's {', '.join(lost[:3])}")
    missing = controlnet.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)[0]
    fresh = FRESH if has_mid else (*FRESH, "mid_block")
    if uncopied := [k for k in missing if k.split(".")[0] not in fresh]:
        raise RuntimeError(f"the student holds no tensor for the ControlNet's {', '.join(uncopied[:3])}")
    controlnet.to(unet.device)
    if controlnet.dtype != unet.dtype:  # diffusers warns on any cast to a dtype, even a no-op one
        controlnet.to(unet.dtype)
    return controlnet
