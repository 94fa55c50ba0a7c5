"""python -m bksdm_lab.lora_transfer: a LoRA made for the teacher, carried onto a student (a Hydra app).

python -m bksdm_lab.lora_transfer lora=pixel-art.safetensors arch=tiny teacher=sd14 out=pixel-art-tiny
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bksdm_lab import CONF_DIR
from bksdm_lab.common.cli import check_group_choices, guarded
from bksdm_lab.common.publish import publish
from bksdm_lab.common.quiet import quiet_libraries
from bksdm_lab.models.keep import WeightMapError, check_derived_from, teacher_unet_config
from bksdm_lab.models.lora import LAYER, WEIGHT_NAME, LoraTransferError, TransferredLora, transfer_lora
from bksdm_lab.models.report import resolve_arch


def out_dir(cfg: DictConfig) -> Path:
    """``out=``, else ``./<the LoRA's file or folder name>-<arch.name>``; an existing one only with overwrite=true."""
    out = Path(cfg.out or f"{Path(str(cfg.lora)).stem}-{cfg.arch.name}").expanduser()
    if out.exists() and not cfg.overwrite:
        raise LoraTransferError(f"out={out} exists: choose another out=, or pass overwrite=true to replace it")
    return out


def table(result: TransferredLora) -> str:
    """What each teacher block became, one line each, then the totals."""
    rows = [
        f"  {b['block']:<28} {'-> ' + b['student'] if b['student'] else 'removed':<31} {b['layers']:>4}"
        f" {'kept' if b['student'] else 'dropped'}"
        for b in result.blocks
    ]
    kept, dropped = result.counts()
    text = {k: len({LAYER.split(key)[0] for key in v}) for k, v in result.layers.items() if k != "unet"}
    extra = "".join(f", {n} {part} LoRA layers kept as they are" for part, n in text.items())
    return "\n".join([f"  {'teacher block':<28} {'student block':<31} LoRA layers", *rows]) + (
        f"\n  U-Net LoRA layers: {kept} kept, {dropped} dropped{extra}"
    )


def run(cfg: DictConfig) -> dict:
    out = out_dir(cfg)
    arch = resolve_arch(cfg.arch, cfg.teacher)
    unet_config, source = teacher_unet_config(cfg.teacher)
    check_derived_from(arch, unet_config)
    result = transfer_lora(str(cfg.lora), unet_config, arch)
    if not result.counts()[0] and not set(result.layers) - {"unet"}:
        raise LoraTransferError(f"lora={cfg.lora}: none of its layers is in the {arch['name']} student")
    kept, dropped = result.counts()
    record = {"lora": str(cfg.lora), "teacher": source, "arch": arch["name"], "kept": kept, "dropped": dropped}
    record["blocks"] = result.blocks

    def build(tmp: Path) -> None:
        result.save(tmp)
        (tmp / "transfer.json").write_text(json.dumps(record, indent=2) + "\n")

    if out.exists():  # overwrite=true: replaced only once the new folder is complete
        old = out.with_name(f".{out.name}.old")
        out.rename(old)
        publish(build, out)
        shutil.rmtree(old)
    else:
        publish(build, out)
    print(f"bksdm_lab.lora_transfer: {cfg.lora} -> {arch['name']} student ({source})\n{table(result)}")
    print(f"bksdm_lab.lora_transfer: wrote {out / WEIGHT_NAME}")
    return record


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="lora_transfer")
def main(cfg: DictConfig) -> dict | None:
    quiet_libraries()
    return guarded("lora_transfer", run, cfg, (LoraTransferError, WeightMapError))


if __name__ == "__main__":
    check_group_choices("lora_transfer")
    main()
