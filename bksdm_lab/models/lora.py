"""LoRA adapters (peft) on a diffusers U-Net or a transformers text encoder, saved in the diffusers LoRA format:
``StableDiffusionPipeline.from_pretrained(base).load_lora_weights(folder)`` loads what :func:`save_lora` writes."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of the U-Net's transformer blocks
TEXT_TARGETS = ("q_proj", "v_proj")  # the CLIP text encoder's query and value projections
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and load_lora_weights looks for


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> torch.nn.Module:
    """``model`` with a LoRA adapter (``rank``, ``alpha``: the update is scaled ``alpha / rank``) on the modules named
    ``targets``; the adapter's tensors are the only trainable ones. Returns ``model`` (changed in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    if int(rank) < 1:
        raise ValueError(f"LoRA rank {rank} must be at least 1")
    config = LoraConfig(r=int(rank), lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    model.requires_grad_(False)
    try:
        model.add_adapter(config)
    except ValueError as err:
        # transformers 5 refuses peft releases before 0.22 in add_adapter, which only injects the adapter (as here)
        if "version of PEFT" not in str(err):
            raise
        inject_adapter_in_model(config, model, "default")
    return model


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a model given an adapter by :func:`add_lora`, named as diffusers saves them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def save_lora(
    out_dir: str | Path, unet: torch.nn.Module | None = None, text_encoder: torch.nn.Module | None = None
) -> Path:
    """Write ``<out_dir>/pytorch_lora_weights.safetensors`` with the adapters of ``unet`` and/or ``text_encoder`` and
    their rank and alpha (without them a loader would scale the update by 1); returns the file."""
    from diffusers import StableDiffusionPipeline

    parts = {}
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is not None:
            parts[f"{name}_lora_layers"] = lora_state(model)
            parts[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    if not parts:
        raise ValueError("save_lora needs a unet or a text_encoder with a LoRA adapter")
    StableDiffusionPipeline.save_lora_weights(str(out_dir), safe_serialization=True, **parts)
    return Path(out_dir) / WEIGHT_NAME


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a diffusers ``model`` with its LoRA adapters merged into the weights and removed: a plain model."""
    import copy

    plain = copy.deepcopy(model)
    plain.fuse_lora()
    plain.unload_lora()
    return plain


# ---- a LoRA made for the teacher, carried onto a student through the student's weight map ----------------------
LAYER = re.compile(r"[._]lora[._]")  # where a LoRA tensor's name leaves its layer's: to_q.lora_A., to_k_lora.down.


class LoraTransferError(ValueError):
    """A LoRA that cannot be carried onto the student: unreadable, or not made for this teacher."""


@dataclass
class TransferredLora:
    """A teacher LoRA renamed to a student's layers, per component (``unet``, ``text_encoder``), and what happened
    to each teacher block: ``blocks`` rows ``{block, student, layers}`` (``student`` None: the block was removed)."""

    layers: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, dict]
    blocks: list[dict]

    def counts(self) -> tuple[int, int]:
        """(LoRA layers kept, dropped) in the U-Net."""
        kept = sum(b["layers"] for b in self.blocks if b["student"] is not None)
        return kept, sum(b["layers"] for b in self.blocks) - kept

    def save(self, out_dir: str | Path) -> Path:
        """Write ``<out_dir>/pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(out_dir)`` loads it."""
        from diffusers import StableDiffusionPipeline

        parts = {f"{name}_lora_layers": layers for name, layers in self.layers.items()}
        parts |= {f"{name}_lora_adapter_metadata": md for name, md in self.metadata.items() if name in self.layers}
        StableDiffusionPipeline.save_lora_weights(str(out_dir), safe_serialization=True, **parts)
        return Path(out_dir) / WEIGHT_NAME


def _read_lora(source: str | Path) -> tuple[dict, dict | None, dict | None]:
    """diffusers' reader (diffusers, peft or kohya/A1111 names; safetensors are read without pickle), with each
    kohya layer's alpha / rank scale folded into its up weights, so the result needs no alphas."""
    from diffusers import StableDiffusionPipeline

    path = Path(source).expanduser()
    if not path.exists():
        raise LoraTransferError(f"lora={source}: no such file or folder")
    where = {"weight_name": path.name} if path.is_file() else {}
    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(path.parent if path.is_file() else path), return_lora_metadata=True, **where
        )
    except (OSError, ValueError) as err:
        raise LoraTransferError(f"lora={source}: not a readable LoRA ({str(err).splitlines()[0]})") from None
    for key, alpha in (alphas or {}).items():
        down = key.removesuffix(".alpha")
        up = re.sub(r"(lora_A|lora_down|down)(?=\.weight$)", lambda m: {"lora_A": "lora_B"}.get(m[1], "up"), down)
        state[up] = state[up] * (float(alpha) / state[down].shape[0])
    return state, alphas, metadata


def transfer_lora(source: str | Path, teacher_config: Mapping, arch: Mapping) -> TransferredLora:
    """The LoRA at ``source`` (a file, or a folder with one), made for a teacher of U-Net config ``teacher_config``,
    renamed onto the ``arch`` student: a key of a kept layer takes the student's name of that layer (the weight map
    read backwards), a key of a removed layer is dropped, text-encoder keys are kept as they are (students share
    the teacher's text encoder). A key of no block of this teacher, or of another width, is an error."""
    from diffusers import UNet2DConditionModel

    from bksdm_lab.models.students import block_of, build_student, student_names, teacher_blocks

    state, _, metadata = _read_lora(source)
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(dict(teacher_config))
        student = build_student(teacher_config, arch)
    names = student_names(student.state_dict(), arch.get("weight_map") or {})
    moved = {block_of(t): block_of(s) for t, s in names.items() if block_of(t)}
    modules = dict(teacher.named_modules())
    layers: dict[str, dict[str, torch.Tensor]] = {}
    per_block: dict[str, set[str]] = {b: set() for b in teacher_blocks(teacher.state_dict())}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part != "unet":
            layers.setdefault(part, {})[rest] = value
            continue
        layer = LAYER.split(rest, maxsplit=1)[0]
        module, block = modules.get(layer), block_of(rest)
        width = getattr(module, "in_features", getattr(module, "in_channels", None))
        if layer.split(".")[0] not in modules or (block is not None and block not in per_block):
            raise LoraTransferError(f"lora={source}: {key} names no layer of this teacher's U-Net")
        if width is not None and re.search(r"(lora_A|down)\.weight$", rest) and value.shape[1] != width:
            raise LoraTransferError(
                f"lora={source}: {key} takes {value.shape[1]} features, the teacher's {layer} {width}: "
                "a LoRA for another model"
            )
        if block is None:  # conv_in, time_embedding, ...: every student keeps them under the same name
            layers.setdefault("unet", {})[rest] = value
            continue
        per_block[block].add(layer)
        if block in moved:
            layers.setdefault("unet", {})[moved[block] + rest[len(block) :]] = value
    blocks = [{"block": b, "student": moved.get(b), "layers": len(ls)} for b, ls in per_block.items() if ls]
    return TransferredLora(layers, _split_metadata(metadata, moved), blocks)


def _split_metadata(metadata: dict | None, moved: Mapping[str, str]) -> dict[str, dict]:
    """The reader's flat ``{"unet.r": ..}`` adapter metadata per component, with the U-Net's per-layer patterns and
    target names renamed like its tensors (those of removed blocks dropped)."""
    from bksdm_lab.models.students import block_of

    def rename(name: str) -> str | None:
        block = block_of(name + ".")
        return name if block is None else moved[block] + name[len(block) :] if block in moved else None

    parts: dict[str, dict] = {}
    for key, value in (metadata or {}).items():
        part, _, field = key.partition(".")
        parts.setdefault(part, {})[field] = value
    if "unet" in parts:
        md = parts["unet"]
        for field in ("rank_pattern", "alpha_pattern"):
            md[field] = {new: v for k, v in (md.get(field) or {}).items() if (new := rename(k))}
        if isinstance(md.get("target_modules"), list):
            md["target_modules"] = [new for k in md["target_modules"] if (new := rename(k))]
    return parts
