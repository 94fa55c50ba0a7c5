"""The lean training entry, in-process: the module from its config group, the side jobs as callbacks (EMA,
data quality, export), the data position as loader state, and main() returning the metric a sweeper needs."""

import csv
import functools
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import arch_cfg
from hydra.utils import instantiate
from test_module import make_batch

from bksdm_lab import train as train_app
from bksdm_lab.common.checkpoint import AtomicCheckpointIO, read_checkpoint
from bksdm_lab.data.common import DataError, ResumableSampler, StatefulLoader
from bksdm_lab.distill.callbacks import EMA, DataQuality
from bksdm_lab.distill.losses import FeatureKD, KDLoss, OutputKD, TaskLoss
from bksdm_lab.distill.module import DistillModule
from bksdm_lab.models.students import init_student_from_teacher


def test_the_module_is_built_from_its_config_group(compose_train, teacher):
    cfg = compose_train("experiment=demo", "nonfinite=skip", "optimizer.lr=0.25")
    student = init_student_from_teacher(teacher.unet, arch_cfg("tiny"))
    loss = KDLoss({"task": TaskLoss()}, {"task": 1.0})
    module = instantiate(cfg.module)(teacher=teacher, student=student, loss=loss, run_config={"a": 1})
    assert isinstance(module, DistillModule) and module.student is student
    assert module.nonfinite == "skip" and module.seed == cfg.seed and module.run_config == {"a": 1}
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 0.25


def fit(module, callbacks, tmp_path, steps=3, ckpt_path=None):
    batches = [make_batch(module.teacher.tokenizer) for _ in range(steps)]
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[*callbacks, pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def tiny_module(teacher):
    student = init_student_from_teacher(teacher.unet, arch_cfg("tiny"))
    loss = KDLoss({"task": TaskLoss(), "out_kd": OutputKD()}, {"task": 1.0, "out_kd": 1.0})
    return DistillModule(teacher, student, loss, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_ema_callback_averages_the_student_only_and_checkpoints_it_beside_it(teacher, tmp_path):
    module = tiny_module(teacher)
    initial = {k: v.clone() for k, v in module.student.state_dict().items()}
    frozen, follow, start_late = EMA(decay=1.0), EMA(decay=0.0), EMA(decay=1.0, start_step=100)
    fit(module, [frozen, follow, start_late], tmp_path)
    assert all(torch.equal(frozen.model.state_dict()[k], v) for k, v in initial.items())  # decay 1: never moves
    assert not same(frozen.model, module.student)
    assert same(follow.model, module.student)  # decay 0: the student itself
    assert same(start_late.model, module.student)  # before start_step the EMA copies the student
    ckpt = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    prefixes = {k.split(".")[0] for k in ckpt["state_dict"]}
    assert prefixes == {"student", "ema_student"}  # no teacher, VAE or text encoder
    assert ckpt["bksdm"]["ema"] is True


def test_the_ema_copy_does_not_fire_the_students_feature_taps(teacher):
    arch = arch_cfg("tiny")
    student = init_student_from_teacher(teacher.unet, arch)
    loss = KDLoss({"feat_kd": FeatureKD(arch["feature_pairs"])}, {"feat_kd": 1.0})
    module = DistillModule(teacher, student, loss, optimizer=torch.optim.AdamW)
    ema = EMA(decay=0.5)
    ema.setup(None, module, "fit")
    latents = torch.randn(1, 4, 8, 8)
    cond = torch.randn(1, 77, teacher.unet.config.cross_attention_dim)
    with torch.no_grad():
        ema.model(latents, torch.tensor([10]), cond)
    assert module.student_taps.pop() == {}  # sampling with the EMA leaves the student's taps alone
    with torch.no_grad():
        module.student(latents, torch.tensor([10]), cond)
    assert set(module.student_taps.pop()) == {s for _, s in arch["feature_pairs"]}


def test_ema_resumes_from_the_checkpoint(teacher, tmp_path):
    module = tiny_module(teacher)
    first = EMA(decay=0.5)
    fit(module, [first], tmp_path, steps=2)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    resumed = EMA(decay=0.5)
    fit(tiny_module(teacher), [resumed], tmp_path / "resumed", steps=2, ckpt_path=ckpt)  # already at max_steps
    assert same(resumed.model, first.model)


def batch_report(seen, **skipped):
    return {"num_samples": seen, "skipped": skipped, "converted": {}}


def test_data_quality_counts_keeps_its_state_and_stops_past_the_limit():
    module = SimpleNamespace(logged={}, log=lambda key, value, **kw: module.logged.__setitem__(key, value))
    data = SimpleNamespace(max_skipped_fraction=0.25, skip_check_after=8)
    steps = dict(log_every_n_steps=1, accumulate_grad_batches=1, num_training_batches=3, global_step=0)  # all logged
    trainer = SimpleNamespace(datamodule=data, should_stop=False, **steps)
    quality = DataQuality()
    quality.on_train_batch_start(trainer, module, batch_report(4, corrupt=1), 0)
    assert module.logged == {"data/skipped_corrupt": 1.0}
    state = quality.state_dict()
    resumed = DataQuality()
    resumed.load_state_dict(state)
    resumed.on_train_batch_start(trainer, module, batch_report(4, corrupt=1), 1)  # 2 of 8: under the limit
    assert resumed.counts == {"seen": 8, "skipped_corrupt": 2}
    with pytest.raises(DataError, match=r"4 of the 12 samples .* data.max_skipped_fraction=0.25"):
        resumed.on_train_batch_start(trainer, module, batch_report(4, missing=2), 2)


def test_the_loader_state_is_the_data_position_in_samples():
    class Indices(torch.utils.data.Dataset):  # ResumableSampler yields (index, flip)
        def __len__(self):
            return 24

        def __getitem__(self, item):
            return item

    data = Indices()
    trained = {"batches": 0}  # Lightning's count of the batches this rank has trained on (only ever increases)

    def loader(batch_size):
        return StatefulLoader(
            data,
            batch_size=batch_size,
            sampler=ResumableSampler(len(data), seed=3, random_flip=False),
            position_fn=lambda: trained["batches"],
            collate_fn=lambda samples: [index for index, _flip in samples],
        )

    straight = loader(4)
    assert len([i for batch in straight for i in batch]) == 24  # data epoch 0: 6 batches
    trained["batches"] = 6
    batches = iter(straight)  # the next pass reads data epoch 1
    order = next(batches) + next(batches)
    trained["batches"] = 8
    assert straight.state_dict() == {"epoch": 1, "samples": 8}
    order += [i for batch in batches for i in batch]
    resumed = loader(2)  # another batch size: still exact in samples
    resumed.load_state_dict(straight.state_dict())
    trained["batches"] = 3  # whatever Lightning's counter says in the resumed process
    assert [i for batch in resumed for i in batch] == order[8:]


def test_main_returns_the_optimized_metric(compose_train, tmp_path):
    cfg = compose_train(
        "experiment=demo",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "~callbacks.export",
        "callbacks.samples.prompts=[]",
        "data.max_samples=32",
    )
    value = train_app.main(cfg)  # hydra.main passes a composed config straight through
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    logged = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert isinstance(value, float) and value == pytest.approx(logged[-1], rel=1e-6)
    assert not (tmp_path / "run" / "pipeline").exists()  # ~callbacks.export: nothing exported
