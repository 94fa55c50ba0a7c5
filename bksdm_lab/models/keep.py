"""Keep patterns: a student described by the teacher blocks it keeps (``arch.keep``), and everything derived from it:
the diffusers overrides, the weight map and the feature-KD pairs, which the arch configs read through the
``keep_pattern`` resolver (``weight_map: ${keep_pattern:weight_map}``). The rules: docs/architectures.md.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

MODEL_CONFIGS = Path(__file__).parent / "configs"
DERIVED = ("unet_config", "drop_deepest_stages", "weight_map", "feature_pairs", "self_attention_pairs", "derived_from")
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attentions
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)
_SELF_ATTN = "transformer_blocks.0.attn1"


class WeightMapError(ValueError):
    """The teacher -> student weight map leaves student tensors uncovered or mismatched (raised by
    :mod:`bksdm_lab.models.students` when it copies the teacher's weights)."""


class KeepPatternError(WeightMapError, InterpolationResolutionError):
    """A keep pattern diffusers cannot express (or the teacher cannot initialise); the message is one line.

    A WeightMapError, so commands report it as one line; an InterpolationResolutionError marked initialised, so
    OmegaConf re-raises it from the resolver as it is (not wrapped in a message with its key and type)."""

    def __init__(self, msg: str):
        super().__init__(msg)
        self.msg = msg
        self._initialized = True

    def __str__(self) -> str:
        return self.msg


@dataclass(frozen=True)
class Topology:
    """What of a teacher U-Net config a keep pattern depends on."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers: tuple[int, ...]  # per down stage; up stage n-1-i has layers[i] + 1
    mid_block_type: str | None

    @classmethod
    def of(cls, unet_config: Mapping[str, Any], where: str = "the teacher") -> Topology:
        cfg = dict(unet_config)
        n = len(cfg["block_out_channels"])
        lpb = cfg.get("layers_per_block", 2)
        layers = tuple(int(v) for v in lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * n
        topo = cls(
            tuple(int(c) for c in cfg["block_out_channels"]),
            tuple(cfg["down_block_types"]),
            tuple(cfg["up_block_types"]),
            layers,
            cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
        )
        for key, types, known in (
            ("down_block_types", topo.down_block_types, _DOWN_TYPES),
            ("up_block_types", topo.up_block_types, _UP_TYPES),
        ):
            if unknown := [t for t in types if t not in known]:
                raise KeepPatternError(
                    f"{where}'s {key} holds {unknown[0]!r}: keep patterns know {', '.join(known)} (the SD U-Nets)"
                )
        if topo.mid_block_type not in _MID_TYPES:
            raise KeepPatternError(f"{where}'s mid_block_type={topo.mid_block_type!r}: keep patterns know {_MID_TYPES}")
        return topo

    @property
    def n(self) -> int:
        return len(self.block_out_channels)

    def down_attn(self, i: int) -> bool:
        return _DOWN_TYPES[self.down_block_types[i]]

    def up_attn(self, j: int) -> bool:
        return _UP_TYPES[self.up_block_types[j]]

    def structure(self) -> dict:
        """The block structure (not the widths: a pattern means the same for the demo teacher and SD-v1.4)."""
        return {
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "layers_per_block": list(self.layers),
            "mid_block_type": self.mid_block_type,
        }


@dataclass
class Derived:
    """Everything a keep pattern determines, given the teacher's topology."""

    down: list[list[int] | None]  # the explicit pattern (nulls where a stage is dropped)
    up: list[list[int] | None]
    mid: bool
    drop_deepest_stages: int
    unet_config: dict = field(default_factory=dict)
    weight_map: dict = field(default_factory=dict)
    feature_pairs: list = field(default_factory=list)
    self_attention_pairs: list = field(default_factory=list)
    derived_from: dict = field(default_factory=dict)

    @property
    def pattern(self) -> dict:
        return {"down": self.down, "up": self.up, "mid": self.mid}


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _stages(value, key: str, n: int, sizes: Sequence[int], stage: str) -> list[list[int] | None] | None:
    """A per-stage list of sorted layer indices (or null): checked, one line per problem."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise KeepPatternError(
            f"{key}={value!r} must be a list of {n} stages (each a list of teacher layer indices, or null for a "
            f"dropped stage), or null to derive it"
        )
    if len(value) != n:
        raise KeepPatternError(
            f"{key} has {len(value)} stages but the teacher has {n} ({stage}.0 .. {stage}.{n - 1}): give one "
            f"entry per stage (null for a dropped one)"
        )
    out: list[list[int] | None] = []
    for s, entry in enumerate(value):
        k = f"{key}.{s}"
        if entry is None:
            out.append(None)
            continue
        if not isinstance(entry, (list, tuple)) or not all(_int(x) for x in entry):
            raise KeepPatternError(f"{k}={entry!r} must be a list of teacher layer indices (integers), or null")
        entry = [int(x) for x in entry]
        if not entry:
            raise KeepPatternError(
                f"{k}=[] keeps no layer of {stage}.{s}: a stage needs at least one (null drops the whole stage, "
                f"which only the deepest stages can be)"
            )
        if entry != sorted(set(entry)):
            raise KeepPatternError(
                f"{k}={entry} must name each layer once, in increasing order ({sorted(set(entry))}): the student "
                f"keeps the teacher's layer order"
            )
        if entry[0] < 0 or entry[-1] >= sizes[s]:
            bad = entry[0] if entry[0] < 0 else entry[-1]
            raise KeepPatternError(
                f"{k}={entry}: layer {bad} is out of range: the teacher's {stage}.{s} has layers 0..{sizes[s] - 1}"
            )
        out.append(entry)
    return out


def _fmt(stage: list[int] | None) -> str:
    return "null" if stage is None else "[" + ", ".join(map(str, stage)) + "]"


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _fill_sides(down, up, layers: Sequence[int], up_sizes: Sequence[int], key: str) -> tuple[list, list]:
    """The pattern with its missing side derived, checked against diffusers' "up stage = mirrored down stage + 1"."""
    n = len(layers)
    if down is None and up is None:
        down, up = [list(range(m)) for m in layers], [list(range(s)) for s in up_sizes]
    elif down is None:
        down = []
        for i in range(n):
            j, ups = n - 1 - i, up[n - 1 - i]
            if ups is not None and len(ups) < 2:
                raise KeepPatternError(
                    f"{key}.up.{j}={_fmt(ups)} keeps 1 layer, so the mirrored down_blocks.{i} would keep none (diffusers "
                    f"builds an up stage with one layer more than its down stage): keep 2 or more, or give {key}.down"
                )
            down.append(None if ups is None else list(range(len(ups) - 1)))
    elif up is None:
        up = [None if down[n - 1 - j] is None else [*range(len(down[n - 1 - j])), up_sizes[j] - 1] for j in range(n)]
    for i in range(n):
        j, d_i, u_j = n - 1 - i, down[i], up[n - 1 - i]
        if (d_i is None) != (u_j is None):
            gone, kept = (f"down.{i}", f"up.{j}") if d_i is None else (f"up.{j}", f"down.{i}")
            raise KeepPatternError(
                f"{key}.{gone}=null drops a stage but {key}.{kept}={_fmt(d_i if u_j is None else u_j)} keeps its mirror: "
                f"a dropped stage drops down_blocks.{i} and up_blocks.{j} together (null in both)"
            )
        if d_i is not None and len(u_j) != len(d_i) + 1:
            raise KeepPatternError(
                f"{key}.up.{j}={_fmt(u_j)} keeps {len(u_j)} layers, but diffusers builds up_blocks.{j} with one more "
                f"than its mirrored down_blocks.{i} keeps ({key}.down.{i}={_fmt(d_i)}): keep {len(d_i) + 1}, or set "
                f"{key}.down=null to derive the down stages from the up stages"
            )
    return down, up


def derive(
    keep: Mapping[str, Any] | None,
    teacher_unet_config: Mapping[str, Any],
    source: str = "the teacher",
    key: str = "arch.keep",
    check_channels: bool = True,
) -> Derived:
    """The student a keep pattern describes, against the teacher U-Net config it was written for.

    ``check_channels=False`` skips the check that the teacher's weights fit every kept layer (for tests that show the
    weight map check refuses exactly the patterns this check refuses)."""
    keep = _plain(keep) or {}
    if not isinstance(keep, Mapping):
        raise KeepPatternError(f"{key}={keep!r} must be a mapping with keys down, up, mid")
    if unknown := sorted(set(keep) - {"down", "up", "mid"}):
        raise KeepPatternError(f"{key}.{unknown[0]} is not a keep-pattern key; the keys are: down, up, mid")
    topo = Topology.of(teacher_unet_config, source)
    n, layers = topo.n, topo.layers
    up_sizes = [layers[n - 1 - j] + 1 for j in range(n)]
    down = _stages(keep.get("down"), f"{key}.down", n, layers, "down_blocks")
    up = _stages(keep.get("up"), f"{key}.up", n, up_sizes, "up_blocks")
    mid = keep.get("mid", True)
    if not isinstance(mid, bool):
        raise KeepPatternError(f"{key}.mid={mid!r} must be true or false (keep the mid block or not)")

    down, up = _fill_sides(down, up, layers, up_sizes, key)
    dropped = [i for i in range(n) if down[i] is None]
    drop = len(dropped)
    if drop == n:
        raise KeepPatternError(
            f"{key} drops every stage of the teacher: keep at least down_blocks.0 and up_blocks.{n - 1}"
        )
    if dropped != list(range(n - drop, n)):
        i = dropped[0]
        raise KeepPatternError(
            f"{key}.down.{i}=null drops down_blocks.{i} (and up_blocks.{n - 1 - i}), which is not among the deepest stages: "
            f"the stages around it expect its channels and resolution; only the deepest stages can be dropped"
        )
    if mid and topo.mid_block_type is None:
        raise KeepPatternError(f"{key}.mid=true but {source} has no mid block: set {key}.mid=false")
    ns = n - drop
    out = topo.block_out_channels
    if check_channels and mid and drop and out[ns - 1] != out[n - 1]:
        raise KeepPatternError(
            f"{key}.mid=true with {drop} deepest stage(s) dropped: the teacher's mid block works at {out[n - 1]} channels, "
            f"the student's deepest stage at {out[ns - 1]}, so the teacher cannot initialise it: set {key}.mid=false"
        )

    if check_channels:
        _check_channels(down, up, topo, drop, key)

    result = Derived(down=down, up=up, mid=mid, drop_deepest_stages=drop)
    kept_layers = [len(down[i]) for i in range(ns)]
    result.unet_config = {"layers_per_block": kept_layers[0] if len(set(kept_layers)) == 1 else kept_layers}
    if not mid:
        result.unet_config["mid_block_type"] = None

    _fill_maps(result, topo)
    result.derived_from = {"teacher": source, **topo.structure()}
    return result


def _fill_maps(result: Derived, topo: Topology) -> None:
    """The weight map, the feature-KD pairs at block outputs and at self-attention outputs of ``result``'s pattern."""
    n, layers, down, up, drop = topo.n, topo.layers, result.down, result.up, result.drop_deepest_stages
    ns = n - drop
    wm, pairs, attn_pairs = result.weight_map, result.feature_pairs, result.self_attention_pairs
    for i in range(ns):  # down stages keep their index
        stage = f"down_blocks.{i}"
        for p, k in enumerate(down[i]):
            kinds = ("resnets", "attentions") if topo.down_attn(i) else ("resnets",)
            if p != k:
                wm.update({f"{stage}.{kind}.{p}.": f"{stage}.{kind}.{k}." for kind in kinds})
            if topo.down_attn(i):
                attn_pairs.append([f"{stage}.attentions.{k}.{_SELF_ATTN}", f"{stage}.attentions.{p}.{_SELF_ATTN}"])
        if i == ns - 1 and i < n - 1:  # the student's last stage lost its downsampler: tap before the teacher's
            kind = "attentions" if topo.down_attn(i) else "resnets"
            tail = ".proj_out" if kind == "attentions" else ""
            pairs.append([f"{stage}.{kind}.{layers[i] - 1}{tail}", f"{stage}.{kind}.{len(down[i]) - 1}{tail}"])
        else:
            pairs.append([stage, stage])
    for j in range(drop, n):  # up stages shift by the number of dropped stages
        t, s = f"up_blocks.{j}", f"up_blocks.{j - drop}"
        for p, k in enumerate(up[j]):
            kinds = ("resnets", "attentions") if topo.up_attn(j) else ("resnets",)
            if (s, p) != (t, k):
                wm.update({f"{s}.{kind}.{p}.": f"{t}.{kind}.{k}." for kind in kinds})
            if topo.up_attn(j):
                attn_pairs.append([f"{t}.attentions.{k}.{_SELF_ATTN}", f"{s}.attentions.{p}.{_SELF_ATTN}"])
        if j < n - 1 and s != t:
            wm[f"{s}.upsamplers."] = f"{t}.upsamplers."
        pairs.append([t, s])


def _check_channels(down, up, topo: Topology, drop: int, key: str) -> None:
    """Every kept resnet takes the channels of the teacher resnet it copies (else the teacher cannot initialise it,
    and the weight map check refuses even a random init): the first layer of a stage takes the previous stage's
    channels, an up stage's last layer the skip from the down stage's input."""
    n, out = topo.n, topo.block_out_channels
    for i, kept in enumerate(down):
        if kept is None or kept[0] == 0 or i == 0 or out[i - 1] == out[i]:
            continue
        raise KeepPatternError(
            f"{key}.down.{i}={_fmt(kept)}: the student's first layer of down_blocks.{i} takes the {out[i - 1]} channels "
            f"of the stage above, teacher layer {kept[0]} takes {out[i]}, so the teacher cannot initialise it: keep layer 0"
        )
    rev = list(reversed(out))
    srev = rev[drop:]
    for j in range(drop, n):
        js, kept, last = j - drop, up[j], len(up[j]) - 1 if up[j] else 0
        skip = rev[min(j + 1, n - 1)]  # the channels of the skip from the down stage's input (same in the student)
        t_prev, s_prev = rev[max(j - 1, 0)], srev[max(js - 1, 0)]
        for p, k in enumerate(kept):
            t_in = (t_prev if k == 0 else rev[j], skip if k == topo.layers[n - 1 - j] else rev[j])
            s_in = (s_prev if p == 0 else rev[j], skip if p == last else rev[j])
            if t_in == s_in:
                continue
            if t_in[0] != s_in[0] and p == 0 and k == 0:
                why = (
                    f"with {drop} deepest stage(s) dropped, the student's up_blocks.{js} takes {s_prev} channels from "
                    f"below where teacher up_blocks.{j} takes {t_prev}: drop fewer stages"
                )
            elif t_in[0] != s_in[0]:
                why = f"only layer 0 takes the {t_prev} channels from the stage below: keep layer 0"
            else:
                why = f"only the last layer ({topo.layers[n - 1 - j]}) takes the {skip}-channel skip from the stage's input: keep it"
            raise KeepPatternError(
                f"{key}.up.{j}={_fmt(kept)}: student up_blocks.{js}.resnets.{p} cannot copy teacher "
                f"up_blocks.{j}.resnets.{k} ({sum(t_in)} input channels, the student layer takes {sum(s_in)}); {why}"
            )


# ---- the teacher config a pattern is derived against, and the resolver ------------------------------------------
def teacher_unet_config(teacher: Mapping[str, Any] | None) -> tuple[dict, str]:
    """``(unet config, where it came from)``: a local ``teacher.pretrained`` folder's own ``unet/config.json``, else
    the shipped ``bksdm_lab/models/configs/<teacher.configs>/unet/config.json``."""
    if teacher is None or teacher.get("configs") is None:
        raise KeepPatternError(
            "arch.keep is derived from the teacher's U-Net config, but the config has no teacher.configs"
        )
    pretrained = teacher.get("pretrained")
    if pretrained:
        local = Path(str(pretrained)).expanduser() / "unet" / "config.json"
        if local.is_file():
            return json.loads(local.read_text()), f"teacher.pretrained={pretrained}"
    configs = str(teacher.get("configs"))
    path = MODEL_CONFIGS / configs / "unet" / "config.json"
    if not path.is_file():
        known = sorted(p.name for p in MODEL_CONFIGS.iterdir() if (p / "unet" / "config.json").is_file())
        raise KeepPatternError(f"teacher.configs={configs!r} is not shipped; known: {', '.join(known)}")
    return json.loads(path.read_text()), f"teacher.configs={configs}"


def resolver(what: str, *, _parent_, _root_):
    """``${keep_pattern:<what>}`` in an arch config: ``what`` (one of :data:`DERIVED`) of the arch's ``keep`` pattern
    against the run's teacher."""
    if what not in DERIVED:
        raise KeepPatternError(f"${{keep_pattern:{what}}}: derives one of {', '.join(DERIVED)}")
    teacher = _root_.get("teacher") if isinstance(_root_, DictConfig) else None
    unet_config, source = teacher_unet_config(teacher)
    return getattr(derive(_parent_.get("keep"), unet_config, source), what)


def same_student(a: Mapping[str, Any], b: Mapping[str, Any], teacher: Mapping[str, Any]) -> bool:
    """Whether two keep patterns derive the same student of ``teacher`` (the same teacher layers in every stage, each
    spelled out or derived), however they are written."""
    if _plain(a) == _plain(b):
        return True
    try:
        unet_config, source = teacher_unet_config(teacher)
        return derive(a, unet_config, source).pattern == derive(b, unet_config, source).pattern
    except KeepPatternError:  # one of them is not a pattern of this teacher: not the same student
        return False


def check_derived_from(arch: Mapping[str, Any], teacher_config: Mapping[str, Any]) -> None:
    """The teacher being loaded has the topology the pattern was derived against (one-line error if not)."""
    derived_from = _plain(arch.get("derived_from")) if "derived_from" in arch else None
    if not derived_from:
        return
    have = Topology.of(teacher_config, "the loaded teacher").structure()
    for k, v in have.items():
        if derived_from.get(k) != v:
            raise KeepPatternError(
                f"arch.keep was derived from {derived_from.get('teacher')} ({k} {derived_from.get(k)}), but the loaded "
                f"teacher has {k} {v}: set teacher.configs to a shipped config set of its topology, or point "
                f"teacher.pretrained at a local diffusers folder (its unet/config.json is read)"
            )
