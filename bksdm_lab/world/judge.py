"""The world's judge: a small CNN that reads a scene's attributes off an image, and the scores built on it.

python -m bksdm_lab.world.judge                       # train (or load) the judge, print its accuracies
python -m bksdm_lab.world.judge score DIR [DIR ...]   # score folders of generated images (+ real renders)
python -m bksdm_lab.world.judge prompts --num 500     # the fixed world prompts, one a line (generate's prompts_file)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bksdm_lab.world import scenes

JUDGE_VERSION = 1  # bump when a change here changes the trained judge: cached judges of another version are not used
REAL_SEED = 20_000  # scenes of the FID reference (never the judge's training or held-out seeds)


@dataclass(frozen=True)
class JudgeConfig:
    """Everything the trained judge depends on (its cache folder is named by a hash of these)."""

    size: int = 32  # input side in px (the world's, conf/data/world.yaml); other sizes are resized to it
    width: int = 16  # channels of the first convs (doubled at each of the next two stages)
    features: int = 64  # penultimate width: the FID features
    train_images: int = 6000  # freshly rendered training scenes (one pass = one epoch)
    test_images: int = 1000  # held-out scenes (another seed) for the accuracies
    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    noise: float = 0.06  # largest std of the Gaussian pixel noise added in training (images in [0, 1])
    blur: float = 0.5  # probability of a 3x3 box blur in training
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(
            {"judge_version": JUDGE_VERSION, "world_version": scenes.WORLD_VERSION, **asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# A judge trained in seconds, for tests and `--short` recipes: colour, size, position, count and background are well
# above chance; shape (a small shape is 2 px wide at 32 px) is learned last and stays near chance.
SHORT_JUDGE = JudgeConfig(width=8, features=32, train_images=2000, test_images=300, epochs=3, lr=1e-2)
JUDGES = {"full": JudgeConfig(), "short": SHORT_JUDGE}


class Judge(nn.Module):
    """uint8 ``(N, 3, H, W)`` images -> penultimate features ``(N, features)`` and one logit head per attribute."""

    def __init__(self, cfg: JudgeConfig = JudgeConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        if cfg.size % 8:
            raise ValueError(f"JudgeConfig.size={cfg.size} must be a multiple of 8")
        chans = [3, w, 2 * w, 4 * w]
        # one extra conv at full resolution: a small shape is only a few pixels wide at 32 px
        layers: list[nn.Module] = [nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        chans[0] = w
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.convs = nn.Sequential(*layers)
        side = cfg.size // 8
        # no global pooling: position and count live in where things are
        self.embed_layer = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * side * side, cfg.features), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(cfg.features, len(scenes.VOCABULARIES[a])) for a in scenes.ATTRIBUTES})
        self.num_features = int(cfg.features)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> float in [-1, 1] at the judge's size."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.cfg.size or x.shape[-2] != self.cfg.size:
            x = F.interpolate(
                x, size=(self.cfg.size, self.cfg.size), mode="bilinear", antialias=True, align_corners=False
            )
        return x * 2 - 1

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.parameters()).device
        return self.embed_layer(self.convs(self.prepare(images.to(dev))))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = self.embed(images)
        return feats, {a: head(feats) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Each attribute's predicted label index, ``(N,)`` per attribute."""
        was = self.training
        self.eval()
        out: dict[str, list[torch.Tensor]] = {a: [] for a in scenes.ATTRIBUTES}
        for lo in range(0, len(images), batch_size):
            _, logits = self(images[lo : lo + batch_size])
            for a in scenes.ATTRIBUTES:
                out[a].append(logits[a].argmax(1).cpu())
        self.train(was)
        return {a: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for a, v in out.items()}


class JudgeFeatures(nn.Module):
    """The ``feature=`` module of torchmetrics' FID: uint8 images -> the judge's penultimate features (float64)."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.judge.eval()
        return self.judge.embed(images).double()


# ---- data ----------------------------------------------------------------------------------------------
def to_uint8(images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> uint8 ``(N, 3, H, W)`` (RGB; resized to ``size`` first if given and different)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    if not arrays:
        return torch.zeros(0, 3, size or 1, size or 1, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def render_scenes(scene_list: Sequence[scenes.Scene], size: int = 64, seed: int = 0) -> torch.Tensor:
    """Renders of ``scene_list`` (jittered by a generator seeded ``seed``) as uint8 ``(N, 3, size, size)``."""
    rng = random.Random(seed)
    return to_uint8([scenes.render(s, size, rng) for s in scene_list])


def sample_scenes(n: int, seed: int) -> list[scenes.Scene]:
    rng = random.Random(seed)
    return [scenes.sample_scene(rng) for _ in range(int(n))]


def label_tensor(scene_list: Sequence[scenes.Scene]) -> dict[str, torch.Tensor]:
    rows = [scenes.labels(s) for s in scene_list]
    return {a: torch.tensor([r[a] for r in rows], dtype=torch.long) for a in scenes.ATTRIBUTES}


def _augment(x: torch.Tensor, cfg: JudgeConfig, gen: torch.Generator) -> torch.Tensor:
    """Training-time noise and blur on float images in [0, 1], so that a diffusion model's slightly soft images are in
    the judge's range."""
    n = x.shape[0]
    if cfg.blur > 0:
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        pick = (torch.rand(n, 1, 1, 1, generator=gen) < cfg.blur).float()
        x = pick * blurred + (1 - pick) * x
    if cfg.noise > 0:
        sigma = torch.rand(n, 1, 1, 1, generator=gen) * cfg.noise
        x = x + sigma * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


# ---- training and the cache ----------------------------------------------------------------------------
def accuracies(judge: Judge, images: torch.Tensor, scene_list: Sequence[scenes.Scene]) -> dict[str, float]:
    """Per-attribute accuracy and ``all`` (every attribute right) of the judge on ``images`` of ``scene_list``."""
    pred = judge.predict(images)
    want = label_tensor(scene_list)
    right = torch.stack([pred[a] == want[a] for a in scenes.ATTRIBUTES])
    out = {a: float(right[i].float().mean()) for i, a in enumerate(scenes.ATTRIBUTES)}
    out["all"] = float(right.all(0).float().mean())
    return out


def train_judge(cfg: JudgeConfig = JudgeConfig(), log=None) -> tuple[Judge, dict]:
    """Train a judge from scratch (seeded by ``cfg.seed``); returns it and a report (held-out accuracies, time)."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_scenes = sample_scenes(cfg.train_images, cfg.seed * 1000 + 1)
    test_scenes = sample_scenes(cfg.test_images, cfg.seed * 1000 + 2)
    x_train = render_scenes(train_scenes, cfg.size, cfg.seed * 1000 + 3)
    x_test = render_scenes(test_scenes, cfg.size, cfg.seed * 1000 + 4)
    y_train = label_tensor(train_scenes)
    judge = Judge(cfg)
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * math.ceil(cfg.train_images / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.2)
    judge.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(cfg.train_images, generator=gen)
        total = 0.0
        for lo in range(0, cfg.train_images, cfg.batch_size):
            idx = order[lo : lo + cfg.batch_size]
            x = _augment(x_train[idx].float() / 255.0, cfg, gen)
            _, logits = judge(x)
            loss = sum(F.cross_entropy(logits[a], y_train[a][idx]) for a in scenes.ATTRIBUTES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log:
            log(f"judge epoch {epoch + 1}/{cfg.epochs}: loss {total / cfg.train_images:.4f}")
    judge.eval()
    report = {
        "config": asdict(cfg),
        "judge_version": JUDGE_VERSION,
        "world_version": scenes.WORLD_VERSION,
        "held_out_accuracy": accuracies(judge, x_test, test_scenes),
        "chance": {a: 1 / len(scenes.VOCABULARIES[a]) for a in scenes.ATTRIBUTES},
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    return judge, report


def default_cache_dir() -> Path:
    return Path(os.environ.get("BKSDM_CACHE_DIR") or "~/.cache/bksdm_lab").expanduser()


def judge_dir(cfg: JudgeConfig = JudgeConfig(), cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "world" / f"judge-{cfg.key()}"


def load_judge(cfg: JudgeConfig = JudgeConfig(), cache_dir: str | Path | None = None, log=None) -> tuple[Judge, dict]:
    """The judge of ``cfg`` from its cache folder, trained and cached there first if missing: (judge, report)."""
    from bksdm_lab.common.publish import publish

    out = judge_dir(cfg, cache_dir)

    def build(tmp: Path) -> None:
        judge, report = train_judge(cfg, log=log)
        tmp.mkdir(parents=True)
        torch.save(judge.state_dict(), tmp / "judge.pt")
        (tmp / "judge.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    if not (out / "judge.pt").is_file():
        if out.exists():
            raise RuntimeError(f"{out} exists but holds no judge.pt: move it away, or delete it to have it rebuilt")
        publish(build, out)
    report = json.loads((out / "judge.json").read_text(encoding="utf-8"))
    if report.get("config") != asdict(cfg):
        raise RuntimeError(f"{out / 'judge.json'} records another judge configuration: delete {out} to rebuild it")
    judge = Judge(cfg)
    judge.load_state_dict(torch.load(out / "judge.pt", map_location="cpu", weights_only=True))
    judge.eval()
    report["path"] = str(out)
    return judge, report


# ---- scores ---------------------------------------------------------------------------------------------
def fid_against(judge: Judge, images: torch.Tensor, reference: torch.Tensor, batch_size: int = 256) -> float:
    """FID in this world between ``images`` and ``reference`` (uint8 batches): torchmetrics' FID, judge features."""
    from bksdm_lab.evaluation.metrics import fid_metric

    fid = fid_metric(JudgeFeatures(judge))
    for lo in range(0, len(reference), batch_size):
        fid.update(reference[lo : lo + batch_size], real=True)
    for lo in range(0, len(images), batch_size):
        fid.update(images[lo : lo + batch_size], real=False)
    return float(fid.compute())


def agreement(judge: Judge, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose predicted attributes match their prompt's, per attribute and ``all`` at once."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    return accuracies(judge, images, [scenes.parse_caption(p) for p in prompts])


def reference_images(num: int, size: int | None = None, seed: int = REAL_SEED) -> torch.Tensor:
    """Renders of ``num`` freshly sampled scenes: the FID reference ("real" images of the world)."""
    return render_scenes(sample_scenes(num, seed), size or JudgeConfig.size, seed + 1)


def score_images(judge: Judge, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor) -> dict:
    """``{"n", "fid", "agree/<attribute>", "agree/all"}`` of uint8 ``images`` generated for ``prompts``."""
    agree = agreement(judge, images, prompts)
    return {
        "n": len(images),
        "fid": fid_against(judge, images, reference),
        **{f"agree/{k}": v for k, v in agree.items()},
    }


def read_folder(folder: str | Path) -> tuple[list[Image.Image], list[str]]:
    """Images and prompts of a ``generate`` output folder (``prompts.csv`` + ``images/``) or a world set
    (``metadata.csv``)."""
    folder = Path(folder)
    if (folder / "prompts.csv").is_file():
        index, base = folder / "prompts.csv", folder / "images"
    elif (folder / "metadata.csv").is_file():
        index, base = folder / "metadata.csv", folder
    else:
        raise FileNotFoundError(f"{folder} holds neither prompts.csv (python -m bksdm_lab.generate) nor metadata.csv")
    with index.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [r["file_name"] for r in rows if not (base / r["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {index} are missing, e.g. {base / missing[0]}")
    images = []
    for r in rows:
        with Image.open(base / r["file_name"]) as im:
            images.append(im.convert("RGB"))
    return images, [r["text"] for r in rows]


def score_folder(judge: Judge, folder: str | Path, reference: torch.Tensor) -> dict:
    images, prompts = read_folder(folder)
    return score_images(judge, to_uint8(images), prompts, reference)


def score_real(judge: Judge, prompts: Sequence[str], reference: torch.Tensor, seed: int = 7) -> dict:
    """The judge's ceiling: real renders of the prompts' own scenes, scored like generated images."""
    images = render_scenes([scenes.parse_caption(p) for p in prompts], judge.cfg.size, seed)
    return score_images(judge, images, prompts, reference)


def world_prompts(num: int, seed: int = 1234) -> list[str]:
    """A fixed set of ``num`` world captions (sampled scenes, seeded): the ablation's evaluation prompts."""
    return [scenes.caption(s) for s in sample_scenes(num, seed)]


# ---- command line ----------------------------------------------------------------------------------------
def _format_row(name: str, row: dict) -> str:
    agree = " ".join(f"{a}={row[f'agree/{a}']:.3f}" for a in (*scenes.ATTRIBUTES, "all"))
    return f"{name}: n={row['n']} fid={row['fid']:.3f} {agree}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bksdm_lab.world.judge", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="train", choices=["train", "score", "prompts"])
    parser.add_argument("folders", nargs="*", help="score: folders of generated images (generate's layout)")
    parser.add_argument("--cache-dir", default=None, help="default: $BKSDM_CACHE_DIR or ~/.cache/bksdm_lab")
    parser.add_argument("--reference", type=int, default=1000, help="real renders in the FID reference")
    parser.add_argument("--json", default=None, help="score: write the scores to this file")
    parser.add_argument("--num", type=int, default=500, help="prompts: how many (world_prompts, seed 1234)")
    parser.add_argument("--judge", default="full", choices=sorted(JUDGES), help="the judge's settings (then --<field>)")
    for f in fields(JudgeConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, help=f"({f.default})")
    args = parser.parse_args(argv)
    cfg = replace(
        JUDGES[args.judge],
        **{f.name: getattr(args, f.name) for f in fields(JudgeConfig) if getattr(args, f.name) is not None},
    )
    if args.command == "score" and not args.folders:
        parser.error("score needs at least one folder")
    if args.command == "prompts":
        print("\n".join(world_prompts(args.num)))
        return 0
    judge, report = load_judge(cfg, args.cache_dir, log=lambda m: print(m, file=sys.stderr))
    acc = report["held_out_accuracy"]
    print(f"judge: {report['path']} (trained in {report['train_seconds']} s)")
    print("held-out accuracy: " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
    if args.command == "train":
        return 0
    reference = reference_images(args.reference, cfg.size)
    rows = {}
    for folder in args.folders:
        rows[folder] = score_folder(judge, folder, reference)
        print(_format_row(folder, rows[folder]))
    _, prompts = read_folder(args.folders[0])
    rows["real renders"] = score_real(judge, prompts, reference)
    print(_format_row("real renders", rows["real renders"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"judge": report, "scores": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
