"""The distillation LightningModule: what trains, what is frozen, what is checkpointed, the target."""

import functools
import json
import logging

import pytest
import pytorch_lightning as pl
import torch
from conftest import arch_cfg
from diffusers import DDPMScheduler
from torch.utils.data import DataLoader

from bksdm_lab.common.checkpoint import CheckpointError, read_checkpoint
from bksdm_lab.data.folder import ImageCaptionFolder
from bksdm_lab.distill.losses import FeatureKD, KDLoss, OutputKD, TaskLoss
from bksdm_lab.distill.module import FROZEN, DistillModule
from bksdm_lab.models.students import init_student_from_teacher

OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1e-4)


def make_module(teacher, arch: str = "tiny", task=None, run_config=None) -> DistillModule:
    cfg = arch_cfg(arch)
    student = init_student_from_teacher(teacher.unet, cfg)
    terms = {"task": task or TaskLoss(), "out_kd": OutputKD(), "feat_kd": FeatureKD(cfg["feature_pairs"])}
    loss = KDLoss(terms=terms, weights=dict.fromkeys(terms, 1.0))
    return DistillModule(teacher, student, loss, optimizer=OPTIMIZER, run_config=run_config)


def run_config(feat_kd: float = 1.0, **extra) -> dict:
    """A run config as train() stores it (redacted), with the options a resume may change."""
    weights = {"task": 1.0, "out_kd": 1.0, "feat_kd": feat_kd}
    return {"loss": {"weights": weights}, "hub": {"token": "<redacted>"}, "ckpt_path": None, **extra}


def make_batch(tokenizer, n: int = 2) -> dict[str, torch.Tensor]:
    captions = ["a red circle on a blue background", "a white square on a purple background"][:n]
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    pixels = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    return {"pixel_values": pixels, "input_ids": ids}


def frozen_params(module: DistillModule):
    for name in FROZEN:
        yield from getattr(module, name).named_parameters(prefix=name)


# ---- what trains --------------------------------------------------------------------------------


def test_gradients_reach_only_the_student(teacher):
    module = make_module(teacher)
    module.train()
    torch.manual_seed(0)
    total, parts = module.compute_loss(make_batch(teacher.tokenizer))
    assert set(parts) == {"task", "out_kd", "feat_kd"}
    total.backward()
    student_params = list(module.student.named_parameters())
    assert len(student_params) > 100
    missing = [n for n, p in student_params if p.grad is None]
    assert missing == []  # every tensor of the tiny student is on the loss path
    assert sum(bool(p.grad.abs().sum() > 0) for _, p in student_params) >= 0.9 * len(student_params)
    frozen = list(frozen_params(module))
    assert {n.split(".")[0] for n, _ in frozen} == set(FROZEN)
    for name, p in frozen:
        assert p.grad is None, name
        assert p.requires_grad is False, name


def test_optimizer_holds_student_params_only(teacher):
    module = make_module(teacher)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 1e-4
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.student.parameters()}
    assert not held & {id(p) for _, p in frozen_params(module)}


def test_frozen_parts_stay_in_eval_mode(teacher):
    module = make_module(teacher)
    module.train()
    assert module.training and module.student.training
    assert all(m.training for m in module.student.modules())
    for name in FROZEN:
        part = getattr(module, name)
        assert not any(m.training for m in part.modules()), name
    module.eval()
    assert not module.student.training
    module.train(True)
    assert module.student.training and not module.teacher_unet.training


def test_frozen_parts_are_the_teachers(teacher):
    module = make_module(teacher)
    assert module.teacher_unet is teacher.unet
    assert module.vae is teacher.vae and module.text_encoder is teacher.text_encoder
    assert module.noise_scheduler is teacher.noise_scheduler


# ---- the diffusion target -----------------------------------------------------------------------


class CaptureTask(TaskLoss):
    def forward(self, x):
        self.target = x.target.detach().clone()
        self.student_out = x.student_out.detach().clone()
        return super().forward(x)


def _reference(module: DistillModule, batch):
    """Latents, noise and timesteps drawn exactly as compute_loss draws them, from the module's own generator."""
    module._rng = None  # re-seeded from module.seed on next use
    latents, _ = module.encode(batch)
    noise = torch.randn(latents.shape, generator=module.rng)
    t = torch.randint(0, module.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=module.rng)
    return latents, noise, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_task_target_follows_prediction_type(teacher, prediction_type):
    teacher.noise_scheduler = DDPMScheduler.from_config(teacher.noise_scheduler.config, prediction_type=prediction_type)
    assert teacher.prediction_type == prediction_type
    capture = CaptureTask()
    module = make_module(teacher, task=capture)
    seen = {}
    module.student.register_forward_pre_hook(lambda _m, args: seen.update(noisy=args[0].detach(), t=args[1]))
    batch = make_batch(teacher.tokenizer)

    module._rng = None
    _, parts = module.compute_loss(batch)
    latents, noise, t = _reference(module, batch)
    sched = module.noise_scheduler
    velocity = sched.get_velocity(latents, noise, t)

    assert latents.shape == (2, 4, 8, 8)
    assert torch.equal(seen["t"], t)
    assert torch.equal(seen["noisy"], sched.add_noise(latents, noise, t))
    assert not torch.allclose(velocity, noise, atol=1e-3)  # swapping the two targets would be caught
    if prediction_type == "v_prediction":
        assert torch.equal(capture.target, velocity)
        assert not torch.equal(capture.target, noise)
    else:
        assert torch.equal(capture.target, noise)
        assert not torch.equal(capture.target, velocity)
    assert parts["task"] == torch.nn.functional.mse_loss(capture.student_out, capture.target)


def test_velocity_definition_on_the_demo_scheduler(teacher):
    """v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 (the SD-v2 768 px target)."""
    sched = DDPMScheduler.from_config(teacher.noise_scheduler.config, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sched.get_velocity(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_unsupported_prediction_type_raises(teacher):
    teacher.noise_scheduler = DDPMScheduler.from_config(teacher.noise_scheduler.config, prediction_type="sample")
    module = make_module(teacher)
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'"):
        module.compute_loss(make_batch(teacher.tokenizer))


def test_a_teacher_of_another_prediction_type_is_one_line_before_loading(demo_teacher_dir, tmp_path, monkeypatch):
    """The teacher's scheduler config is read first: its U-Net is never loaded."""
    from diffusers import UNet2DConditionModel
    from omegaconf import OmegaConf

    from bksdm_lab.models import teachers

    folder = tmp_path / "sample_teacher"
    folder.mkdir()
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (folder / part).symlink_to(demo_teacher_dir / part)
    config = json.loads((demo_teacher_dir / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "sample"}))
    cfg = OmegaConf.create({"name": "mine", "pretrained": str(folder)})
    line = f"Teacher 'mine': prediction_type='sample' ({folder}/scheduler) is not supported: bksdm_lab trains "
    line += "teachers that predict epsilon or v_prediction"
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", lambda *a, **k: pytest.fail("loaded the U-Net"))
    for check in (teachers.probe_teacher, teachers.load_teacher):
        with pytest.raises(teachers.TeacherLoadError) as err:
            check(cfg)
        assert str(err.value) == line


def test_latents_are_scaled_vae_samples(teacher):
    module = make_module(teacher)
    batch = make_batch(teacher.tokenizer)
    latents, cond = module.encode(batch)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(module.seed)  # the module's noise generator, fresh
        expected = teacher.vae.encode(batch["pixel_values"]).latent_dist.sample(generator=generator) * 0.18215
        expected_cond = teacher.text_encoder(batch["input_ids"])[0]
    assert teacher.vae.config.scaling_factor == 0.18215
    assert torch.equal(latents, expected)
    assert torch.equal(cond, expected_cond)
    assert cond.shape == (2, 77, 32)
    assert not latents.requires_grad


# ---- feature taps under a wrapper ---------------------------------------------------------------


class Wrapper(torch.nn.Module):
    """Stands in for DDP / torch.compile: the student becomes `module.*` in named_modules()."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_feature_taps_survive_wrapping_the_student(teacher):
    module = make_module(teacher)
    student_names = [s for _, s in module.loss.feature_pairs]
    batch = make_batch(teacher.tokenizer)

    module._rng = None
    _, plain = module.compute_loss(batch)
    plain_layers = dict(module.loss.terms["feat_kd"].last_layer_losses)

    wrapped = Wrapper(module.student)
    assert "module.down_blocks.0" in dict(wrapped.named_modules())
    size = teacher.unet.config.sample_size
    with torch.no_grad():
        wrapped(torch.randn(1, 4, size, size), torch.tensor([10]), torch.randn(1, 77, 32))
    features = module.student_taps.pop()
    assert set(features) == set(student_names)  # unwrapped names, no "module." prefix
    assert features["down_blocks.2.attentions.0.proj_out"].shape == (1, 64, 2, 2)
    module.teacher_taps.pop()

    module.student = wrapped
    module._rng = None
    _, through_wrapper = module.compute_loss(batch)
    assert through_wrapper["feat_kd"] == plain["feat_kd"]
    assert plain["feat_kd"].item() > 0
    assert module.loss.terms["feat_kd"].last_layer_losses.keys() == plain_layers.keys()


def test_unknown_feature_tap_fails_at_construction(teacher):
    cfg = arch_cfg("tiny")
    student = init_student_from_teacher(teacher.unet, cfg)
    terms = {"task": TaskLoss(), "feat_kd": FeatureKD([("down_blocks.0", "down_blocks.3")])}  # tiny has 3 stages
    loss = KDLoss(terms=terms, weights={"task": 1.0, "feat_kd": 1.0})
    with pytest.raises(ValueError, match="'down_blocks.3' names no submodule"):
        DistillModule(teacher, student, loss, optimizer=OPTIMIZER)


# ---- checkpoints hold the student only ----------------------------------------------------------


def _trainer(tmp_path, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )


def test_checkpoint_holds_student_only_and_resumes(teacher, demo_data_dir, tmp_path, caplog):
    dataset = ImageCaptionFolder(demo_data_dir, teacher.tokenizer, resolution=64, max_samples=8)
    loader = DataLoader(dataset, batch_size=2, shuffle=False)
    pl.seed_everything(0)
    module = make_module(teacher, run_config=run_config())
    initial = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, loader)
    assert trainer.global_step == 2
    assert not torch.equal(module.student.conv_in.weight, initial["conv_in.weight"])  # it trained
    path = tmp_path / "two_steps.ckpt"
    trainer.save_checkpoint(path)

    ckpt = read_checkpoint(path)
    keys = list(ckpt["state_dict"])
    assert all(k.startswith("student.") for k in keys), [k for k in keys if not k.startswith("student.")][:5]
    assert len(keys) == len(module.student.state_dict()) == 356
    for k, v in module.student.state_dict().items():
        assert torch.equal(ckpt["state_dict"][f"student.{k}"], v)
    assert ckpt["global_step"] == 2
    assert len(ckpt["optimizer_states"]) == 1
    module.student_taps.remove()
    module.teacher_taps.remove()

    # Resume into a fresh module (fresh student from the teacher): the step count and optimizer state carry on.
    # It changes a loss weight: warned of, recorded in the run config (and so in later checkpoints and on the card).
    resumed = make_module(teacher, run_config=run_config(feat_kd=0.5, ckpt_path="last"))
    trainer2 = _trainer(tmp_path, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="bksdm_lab"):
        trainer2.fit(resumed, loader, ckpt_path=str(path))
    assert trainer2.global_step == 3
    state = trainer2.optimizers[0].state[resumed.student.conv_in.weight]
    assert int(state["step"]) == 3  # 2 restored + 1 new; a fresh optimizer would say 1
    assert "resumed at step 2 with changed options: loss.weights.feat_kd 1.0 -> 0.5" in caplog.text
    first_resume = {"step": 2, "changes": {"loss.weights.feat_kd": [1.0, 0.5]}}  # ckpt_path is no option
    assert resumed.run_config["resumes"] == [first_resume]
    trainer2.save_checkpoint(path := tmp_path / "three_steps.ckpt")
    assert read_checkpoint(path)["bksdm"]["config"]["resumes"] == [first_resume]
    resumed.student_taps.remove()
    resumed.teacher_taps.remove()
    again = make_module(teacher, run_config=run_config(feat_kd=0.5, optimizer={"lr": 1e-5}))
    _trainer(tmp_path, max_steps=3).fit(again, loader, ckpt_path=str(path))  # at max_steps: loads, trains nothing
    assert again.run_config["resumes"] == [first_resume, {"step": 3, "changes": {"optimizer.lr": ["(unset)", 1e-5]}}]
    again.student_taps.remove()
    again.teacher_taps.remove()

    # A checkpoint of another architecture is refused with a clear message.
    wrong = make_module(teacher, arch="base")
    with pytest.raises(CheckpointError, match="does not fit this run's student: it lacks 136 student tensors"):
        _trainer(tmp_path, max_steps=3).fit(wrong, loader, ckpt_path=str(path))


# ---- the EMA the export ships -------------------------------------------------------------------


class StudentAfterEachStep(pl.Callback):
    """The student's parameters after each optimizer step (run before the EMA callback's update)."""

    def __init__(self):
        self.steps: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps.append([p.detach().clone() for p in module.student.parameters()])


def test_ema_is_the_exact_moving_average_of_the_students_steps(teacher, tmp_path):
    """ema_0 = the initial student; after step s: ema_s = decay * ema_(s-1) + (1 - decay) * student_s."""
    from bksdm_lab.distill.callbacks import EMA

    module = make_module(teacher)
    initial = [p.detach().clone() for p in module.student.parameters()]
    recorder, emas = StudentAfterEachStep(), {decay: EMA(decay=decay) for decay in (0.5, 0.9)}
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.callbacks = [recorder, *emas.values()]  # the recorder first: it sees what the EMA averages
    batches = DataLoader([make_batch(teacher.tokenizer) for _ in range(3)], batch_size=None)
    trainer.fit(module, batches)
    assert len(recorder.steps) == 3
    for decay, ema in emas.items():
        expected = initial
        for student in recorder.steps:
            expected = [decay * e + (1 - decay) * p for e, p in zip(expected, student, strict=True)]
        for got, want in zip(ema.model.parameters(), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    module.student_taps.remove()
    module.teacher_taps.remove()


def test_a_checkpoint_of_an_earlier_version_is_one_line_before_loading(compose_train, tmp_path):
    """Its data position (Lightning's saved train-loader state) has no `samples`: refused, not a KeyError mid-resume."""
    from bksdm_lab.distill.checks import check_resume

    cfg = compose_train("experiment=demo", "trainer.max_steps=4")

    def checkpoint(position: dict) -> str:
        path = tmp_path / f"{'_'.join(position)}.ckpt"
        loops = {"fit_loop": {"state_dict": {"combined_loader": [position]}}}
        torch.save({"state_dict": {}, "global_step": 2, "bksdm": {"config": {}}, "loops": loops}, path)
        return str(path)

    assert check_resume(cfg, checkpoint({"epoch": 0, "samples": 32})) == []
    old = checkpoint({"epoch": 0, "batches": 4})
    assert check_resume(cfg, old) == [
        f"ckpt_path={old!r} was written by an earlier bksdm_lab version (its data position has no samples): it cannot "
        f"be resumed; export its student (`python -m bksdm_lab.export {old}`), or start a new run"
    ]
