"""The input checks of a training run that need no model: they run before the teacher loads (a minute at SD-v1.4
size), and each problem is one line naming the key, the value and what is allowed: config values (:data:`RULES`),
optimizer and scheduler arguments, the checkpoint to resume, the data.
"""

from __future__ import annotations

import inspect
import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from bksdm_lab.common.checkpoint import CheckpointError, read_checkpoint
from bksdm_lab.data.common import DataError
from bksdm_lab.data.folder import check_folder, outside_root, read_metadata
from bksdm_lab.data.hf import check_local_path
from bksdm_lab.data.latents import damaged, read_meta
from bksdm_lab.data.webdataset import find_shards
from bksdm_lab.distill.fastpath import check_config as check_fast_path
from bksdm_lab.distill.losses import check_config as check_loss_config
from bksdm_lab.models.keep import same_student


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# (key pattern, test, what is allowed). A missing key (a callback turned off, another data format) is not checked.
# The loss terms' own arguments (layer weights, normalize, at, space) are checked by bksdm_lab.distill.losses.
RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("loss.weights.*", lambda v: _number(v) and v >= 0, "a number >= 0 (0 turns the term off)"),
    ("optimizer.lr", lambda v: _number(v) and v > 0, "a number > 0"),
    ("optimizer.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("data.batch_size", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("data.global_batch_size", lambda v: v is None or (_integer(v) and v >= 1), "null or an integer >= 1"),
    ("data.num_workers", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("data.max_samples", lambda v: v is None or (_integer(v) and v >= 1), "null or an integer >= 1"),
    ("data.val_samples", lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: no held-out set)"),
    ("trainer.accumulate_grad_batches", lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1 or null"),
    ("trainer.max_steps", lambda v: _integer(v) and (v >= 1 or v == -1), "an integer >= 1 (-1: max_epochs decides)"),
    ("callbacks.ema.decay", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("callbacks.checkpoint.every_n_train_steps", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
)


_MISSING = object()


def _expand(cfg: DictConfig, pattern: str) -> list[tuple[str, Any]]:
    """``(key, value)`` of every key the pattern names (``a.b.*``: each child of ``a.b``, dict or list)."""
    if not pattern.endswith(".*"):
        node = OmegaConf.select(cfg, pattern, default=_MISSING)
        return [] if node is _MISSING else [(pattern, node)]
    parent = pattern[:-2]
    node = OmegaConf.select(cfg, parent, default=None)
    if isinstance(node, DictConfig):
        return [(f"{parent}.{k}", node[k]) for k in node]
    if isinstance(node, ListConfig):
        return [(f"{parent}.{i}", v) for i, v in enumerate(node)]
    return []


def check_values(cfg: DictConfig) -> list[str]:
    """One line per config value that breaks a rule of :data:`RULES`, per bad argument of a loss term, per bad
    fast-path switch (``module.step``), and a Hub push without a repository."""
    no_repo = _select(cfg, "hub.push") and not _select(cfg, "hub.repo_id")
    hub = ["hub.push=true needs hub.repo_id=<user>/<name>"] if no_repo else []
    return (
        [
            f"{key}={value} must be {allowed}"
            for pattern, ok, allowed in RULES
            for key, value in _expand(cfg, pattern)
            if not ok(value)
        ]
        + check_loss_config(cfg)
        + check_fast_path(cfg)
        + module_problems(cfg)
        + hub
    )


def module_problems(cfg: DictConfig) -> list[str]:
    """The checks of the LightningModule's own options: ``config_problems(cfg)`` of the module class's file
    (:mod:`bksdm_lab.distill.lcm`), where it has one."""
    target = _select(cfg, "module._target_")
    if not target:
        return []
    check = getattr(get_object(target.rpartition(".")[0]), "config_problems", None)
    return check(cfg) if check is not None else []


def _select(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None)


def check_call_args(cfg: DictConfig, key: str, given_later: tuple[str, ...]) -> list[str]:
    """The keys of a ``_partial_`` config (``optimizer``, ``lr_scheduler``) its ``_target_`` does not accept;
    ``given_later`` are the arguments the module passes itself (the parameters, the optimizer)."""
    node = OmegaConf.select(cfg, key, default=None)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return []
    try:
        signature = inspect.signature(get_object(node._target_))
    except Exception as err:  # noqa: BLE001 - an unknown target: say so in one line
        return [f"{key}._target_={node._target_!r} cannot be imported: {err}"]
    params = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    accepted = [n for n, p in params.items() if n not in given_later and n != "self" and p.kind is not p.VAR_POSITIONAL]
    unknown = [k for k in node if not str(k).startswith("_") and k not in params]
    return [f"{key}.{k}: {node._target_} takes no argument {k!r}; it accepts: {', '.join(accepted)}" for k in unknown]


# ---- the checkpoint to resume from -------------------------------------------------------------------------------
def check_resume(cfg: DictConfig, path: str | Path) -> list[str]:
    """The checkpoint is readable, holds a student of this ``arch=`` and has steps left to train."""
    try:
        ckpt = read_checkpoint(path, f"ckpt_path={str(path)!r}", mmap=True)  # no tensor is read
    except CheckpointError as err:
        return [str(err)]
    meta = ckpt.get("bksdm") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in ckpt:
        return [f"ckpt_path={str(path)!r} is not a bksdm_lab.train checkpoint (it has no student and run config)"]
    problems = []
    saved = (meta.get("config") or {}).get("arch") or {}
    arch = saved.get("name")
    if arch is not None and arch != cfg.arch.name:
        problems.append(
            f"ckpt_path={str(path)!r} holds a student of arch={arch}, but this run asks for arch={cfg.arch.name}: "
            f"resume with arch={arch}"
        )
    elif saved.get("keep") is not None and "keep" in cfg.arch:  # same name (arch=keep), maybe another pattern
        asked = OmegaConf.to_container(cfg.arch.keep, resolve=True)
        if not same_student(saved["keep"], asked, cfg.teacher):
            problems.append(
                f"ckpt_path={str(path)!r} holds a student of the keep pattern arch.keep={saved['keep']}, but this run "
                f"asks for arch.keep={asked}: resume with the pattern it was trained with"
            )
    problems += _data_position(ckpt, path)
    step, max_steps = int(ckpt.get("global_step", 0)), int(cfg.trainer.get("max_steps", -1))
    if max_steps != -1 and step >= max_steps:
        problems.append(
            f"ckpt_path={str(path)!r} is at step {step}, and trainer.max_steps={max_steps}: nothing left to train; "
            f"raise trainer.max_steps to continue the run"
        )
    return problems


def _data_position(ckpt: dict, path: str | Path) -> list[str]:
    """The data position (the train loader's ``epoch`` and ``samples``, saved by Lightning) is one this version
    continues from: an earlier version's checkpoint holds another, which cannot be resumed."""
    loop = ((ckpt.get("loops") or {}).get("fit_loop") or {}).get("state_dict") or {}
    states = loop.get("combined_loader") or []
    missing = sorted({k for state in states for k in ("epoch", "samples") if k not in (state or {})})
    if not missing:
        return []
    return [
        f"ckpt_path={str(path)!r} was written by an earlier bksdm_lab version (its data position has no "
        f"{', '.join(missing)}): it cannot be resumed; export its student (`python -m bksdm_lab.export {path}`), or "
        f"start a new run"
    ]


# ---- the data -----------------------------------------------------------------------------------------------------
def world_size(cfg: DictConfig) -> int:
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1) or 1
    if isinstance(devices, int) and devices > 0:
        return devices * int(nodes)
    if isinstance(devices, (list, ListConfig)):
        return len(devices) * int(nodes)
    return int(nodes)  # "auto", -1: known once the accelerator is up; at least this many


def accumulation(global_batch: int | None, micro_batch: int, world: int, asked: int | None = None) -> int:
    """Micro-batches per optimizer step. ``data.global_batch_size`` decides when set: ``micro_batch x accumulation x
    world == global_batch``, and a ``trainer.accumulate_grad_batches`` (``asked``) set beside it must be that number;
    when it is null, ``asked`` decides (null: 1)."""
    if global_batch is None:
        return asked or 1
    if global_batch % (micro_batch * world):
        raise ValueError(
            f"data.global_batch_size={global_batch} is not a multiple of data.batch_size={micro_batch} x {world} "
            f"device(s) = {micro_batch * world}: choose a global batch, micro-batch and device count that divide"
        )
    derived = global_batch // (micro_batch * world)
    if asked is not None and asked != derived:
        raise ValueError(
            f"trainer.accumulate_grad_batches={asked} disagrees with data.global_batch_size={global_batch} (= "
            f"data.batch_size={micro_batch} x {derived} accumulation x {world} device(s)): set one of them, the other "
            f"null (trainer.accumulate_grad_batches=null, or data.global_batch_size=null)"
        )
    return derived


def check_global_batch(cfg: DictConfig) -> list[str]:
    """The accumulation is decided in one place (:func:`accumulation`): checked here when the device count is in the
    config, else once the accelerator is up (``bksdm_lab.train.set_accumulation``)."""
    global_batch, micro = cfg.data.get("global_batch_size"), cfg.data.get("batch_size")
    asked, devices = cfg.trainer.get("accumulate_grad_batches"), cfg.trainer.get("devices", 1)
    known = (_integer(devices) and devices > 0) or isinstance(devices, (list, ListConfig))
    valid = (_integer(global_batch) and global_batch >= 1) and (asked is None or (_integer(asked) and asked >= 1))
    if not (valid and _integer(micro) and micro >= 1 and known):
        return []  # off, a value RULES refuses, or a device count known only once the accelerator is up
    try:
        accumulation(global_batch, micro, world_size(cfg), asked)
    except ValueError as err:
        return [str(err)]
    return []


def check_batches(num_samples: int | None, cfg: DictConfig, what: str) -> list[str]:
    """Every rank gets at least one micro-batch per epoch (the loader drops a last incomplete one)."""
    world, batch = world_size(cfg), cfg.data.get("batch_size")
    if num_samples is None or not _integer(batch) or batch < 1 or num_samples // world >= batch:
        return []  # unknown (a stream), a batch size RULES already refuses, or enough
    ranks = f" on each of {world} ranks" if world > 1 else ""
    return [
        f"{what} has {num_samples} samples, fewer than one micro-batch (data.batch_size={batch}){ranks}: "
        f"the run would train 0 steps. Lower data.batch_size or use more data"
    ]


def uses_cached_latents(data_cfg: DictConfig) -> bool:
    return str(data_cfg.get("_target_", "")).endswith("LatentDataModule")


def check_data(cfg: DictConfig) -> list[str]:
    """The data folder and its metadata (columns, encoding), or the latent cache (complete, made with this teacher
    at this resolution), holds at least one micro-batch per rank. Streamed formats are checked when read."""
    data = cfg.data
    val = data.get("val_samples", 0)
    val = int(val) if _integer(val) and val > 0 else 0  # a bad value: RULES says so
    metric = str(cfg.get("optimized_metric") or "")
    if metric.startswith("val/") and not val:
        return [
            f"optimized_metric={metric} is the held-out loss, but data.val_samples="
            f"{data.get('val_samples', '(absent: this data format holds nothing out)')}: hold out samples "
            f"(e.g. data.val_samples=256), or optimize another metric (optimized_metric=train/loss)"
        ]
    try:
        if uses_cached_latents(data):
            meta = read_meta(data.root)
            problems = check_cache_teacher(meta, cfg) + [p for p in [damaged(data.root, meta)] if p]  # sizes only
            count = sum(int(s["count"]) for s in meta.get("shards", []))
        elif data.get("synthetic") and not Path(str(data.root)).expanduser().exists():
            problems, count = _writable(data.root), int(data.synthetic.num_images)  # written by the data module
        elif "root" in data:
            root = check_folder(data.root, data.caption_column, data.image_column)
            samples = read_metadata(root, data.caption_column, data.image_column)
            problems = [] if data.get("allow_outside_root") else _inside(root, samples)
            count = len(samples)
        else:
            problems = _stream_problems(data)
            if val:  # a stream (data=webdataset) has no "last N samples" to hold out
                problems.append(
                    f"data.val_samples={val}: {data.get('_target_', 'this data format')} streams its samples and "
                    "holds none out; use data=folder, data=hf or data=latents for a held-out loss, or "
                    "data.val_samples=0 with optimized_metric=train/loss"
                )
            return problems
    except DataError as err:
        return [str(err)]
    if data.get("max_samples"):
        count = min(count, int(data.max_samples))
    what = f"data.root={str(data.root)!r}"
    whole = check_batches(count, cfg, what)
    if not val or whole:  # nothing held out, or too small even with nothing held out: say that
        return problems + whole
    if val >= count:
        return problems + [f"data.val_samples={val} holds out all {count} samples: nothing is left to train on"]
    return problems + check_batches(count - val, cfg, f"{what} without its {val} held-out samples (data.val_samples)")


def _stream_problems(data: DictConfig) -> list[str]:
    """The shards of ``data.shards`` exist; a local ``data.path`` holds a data set (hub names are looked up when
    loaded)."""
    try:
        if data.get("shards") is not None:
            find_shards(data.shards)
        if data.get("path") is not None:
            check_local_path(data.path)
    except DataError as err:
        return [str(err)]
    return []


def _writable(root) -> list[str]:
    """A data set written at first use (the demo's): the nearest existing folder above ``root`` can be written."""
    above = Path(str(root)).expanduser().absolute()
    while not above.exists():
        above = above.parent
    if os.access(above, os.W_OK | os.X_OK):
        return []
    return [
        f"data.root={str(root)!r} does not exist and {above} cannot be written: point data.root at a writable folder"
    ]


def _inside(root: Path, samples: list) -> list[str]:
    """A folder none of whose entries resolves inside it (each one alone is skipped and counted when read)."""
    if not samples or any(outside_root(root, name) is None for name, _ in samples):
        return []
    name = samples[0][0]
    return [
        f"data.root={str(root)!r}: every entry of its metadata resolves outside it (e.g. {name!r} is "
        f"{outside_root(root, name)}): move the files into data.root, or set data.allow_outside_root=true"
    ]


def same_source(a: str, b: str) -> bool:
    """Two teacher sources (hub ids or local folders; ``~`` and relative paths as written) name the same teacher."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_cache_teacher(meta: dict, cfg: DictConfig) -> list[str]:
    """A latent cache trains only the teacher (VAE latents, tokenizer ids) and resolution it was made with."""
    root, teacher = str(cfg.data.root), cfg.teacher
    made = (meta.get("teacher"), meta.get("teacher_source"))
    if made[0] != teacher.name or (made[1] is not None and not same_source(made[1], str(teacher.pretrained))):
        return [
            f"data.root={root!r} is a latent cache made with teacher {made[0]!r} ({made[1]}), but this run's teacher "
            f"is {teacher.name!r} ({teacher.pretrained}): use teacher={made[0]} (and its teacher.pretrained), or "
            f"prepare a cache for this teacher: `python -m bksdm_lab.prepare teacher={teacher.name} out=<new folder>`"
        ]
    resolution = cfg.data.get("resolution")
    if resolution is not None and int(meta.get("resolution", resolution)) != int(resolution):
        return [
            f"data.root={root!r} is a latent cache made at {meta['resolution']} px, but the teacher trains at "
            f"{resolution} px (data.resolution): prepare it again for this teacher"
        ]
    return []
