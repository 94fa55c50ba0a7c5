"""Latent consistency distillation (LCM; Luo et al., arXiv 2310.04378): a few-step student.

The online student learns to map a noisy latent at DDIM step ``t_n`` straight to the trajectory's end, consistent
with the target network's map of the point one solver step earlier, ``t_{n-k}``, which the frozen ODE teacher reaches
with guided DDIM. The target network is the EMA callback's copy (``callbacks.ema``, decay 0.95 in the paper), or
the online student itself without one (LCM-LoRA). The exported pipeline samples with ``LCMScheduler`` in 2-8 steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from bksdm_lab.distill.callbacks import find_ema
from bksdm_lab.distill.module import DistillModule
from bksdm_lab.models.teachers import Teacher

LOSS_KINDS = ("l2", "huber")
SIGMA_DATA = 0.5  # the consistency boundary condition's (LCMScheduler's)


class ConsistencyLoss(torch.nn.Module):
    """``l2`` (MSE) or the pseudo-Huber ``sqrt(d^2 + c^2) - c`` between the online prediction and the target."""

    feature_pairs: Sequence[tuple[str, str]] = ()
    needs_teacher = True
    active: Sequence[str] = ()  # no per-layer terms (DistillModule._log_losses)

    def __init__(self, kind: str = "l2", huber_c: float = 0.001):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind={kind!r} is not one of {', '.join(LOSS_KINDS)}")
        self.kind, self.huber_c = kind, float(huber_c)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prediction, target = prediction.float(), target.float()
        if self.kind == "l2":
            loss = F.mse_loss(prediction, target)
        else:
            loss = (torch.sqrt((prediction - target) ** 2 + self.huber_c**2) - self.huber_c).mean()
        return loss, {"consistency": loss}


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The embedding of the guidance ``w`` that diffusers' pipelines give a U-Net with ``time_cond_proj_dim`` (of
    ``guidance_scale - 1``), so the student is trained on what it is driven by (the method uses no pipeline state)."""
    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w.float().cpu(), embedding_dim=dim).to(w.device)


def with_guidance_input(unet: UNet2DConditionModel, dim: int) -> UNet2DConditionModel:
    """``unet`` with a guidance input (``time_cond_proj_dim=dim``): the same weights and a zero-initialised
    projection, so that before training it predicts exactly what ``unet`` does, at every ``w``."""
    conditioned = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": int(dim)})
    missing, unexpected = conditioned.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("time_embedding.cond_proj.") for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(conditioned.time_embedding.cond_proj.weight)  # diffusers builds it without a bias
    conditioned.to(unet.device)
    return conditioned if unet.dtype == conditioned.dtype else conditioned.to(unet.dtype)


class LCMModule(DistillModule):
    """:class:`DistillModule` with the latent consistency loss; the frozen ``teacher_unet`` is the ODE teacher.

    ``init_from``: where the online student starts (``None``: ``student`` as built, a copy of the teacher's U-Net by
    ``arch=same``; or the ``unet/`` of a pipeline folder or hub id, e.g. a BK-SDM student with ``teacher=`` its SD
    teacher). ``guidance``: the ODE teacher's classifier-free guidance ``w`` (``cond + w (cond - uncond)``), drawn
    per sample from ``[min, max]``. ``guidance_embedding``: the student's guidance-input size (the LCM paper), or
    ``None`` to distil the guidance in (LCM-LoRA). ``ode_solver_steps``: the DDIM skipping-step solver's number of
    steps over the training timesteps. ``lora``: ``{rank, alpha}`` trains LoRA adapters only (LCM-LoRA).
    """

    def __init__(
        self,
        teacher: Teacher,
        student: torch.nn.Module,
        loss: ConsistencyLoss,
        lcm: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        lcm = dict(lcm or {})
        if lcm.get("init_from"):
            student = UNet2DConditionModel.from_pretrained(str(lcm["init_from"]), subfolder="unet").to(student.dtype)
        self.w_dim = lcm.get("guidance_embedding")
        if self.w_dim:
            student = with_guidance_input(student, self.w_dim)
        if lcm.get("lora"):
            from bksdm_lab.models.lora import UNET_TARGETS, add_lora

            student = add_lora(student, int(lcm["lora"]["rank"]), float(lcm["lora"]["alpha"]), UNET_TARGETS)
        super().__init__(teacher=teacher, student=student, loss=loss, **kwargs)
        self.w_min, self.w_max = (float(w) for w in lcm.get("guidance", (5.0, 15.0)))
        self.timestep_scaling = float(lcm.get("timestep_scaling", 10.0))
        num_train = self.noise_scheduler.config.num_train_timesteps
        solver_steps = int(lcm.get("ode_solver_steps", 50))
        self.skip = num_train // solver_steps
        self.register_buffer("solver_timesteps", torch.arange(1, solver_steps + 1) * self.skip - 1, persistent=False)
        # the exported pipeline (and the sample images) generate as the student was trained to
        teacher.scheduler = LCMScheduler.from_config(
            teacher.scheduler.config, original_inference_steps=solver_steps, timestep_scaling=self.timestep_scaling
        )
        self._uncond: dict[int, torch.Tensor] = {}

    def boundary(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The consistency parametrisation's ``c_skip``, ``c_out`` at timesteps ``t`` (LCMScheduler's)."""
        scaled = t.float() * self.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)

    def x0_and_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean latents and the noise a U-Net prediction implies at ``x``, ``t``."""
        a = self.noise_scheduler.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1).float()
        out, x = out.float(), x.float()
        if self.noise_scheduler.config.prediction_type == "epsilon":
            return (x - (1 - a).sqrt() * out) / a.sqrt(), out
        return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x  # v_prediction

    def consistency(self, unet, x: torch.Tensor, t: torch.Tensor, cond, w_emb) -> torch.Tensor:
        """A consistency function's value: ``c_skip x + c_out x0(unet(x, t))``."""
        out = unet(x.to(first := next(unet.parameters()).dtype), t, cond.to(first), timestep_cond=w_emb).sample
        c_skip, c_out = self.boundary(t)
        return c_skip * x.float() + c_out * self.x0_and_eps(out, x, t)[0]

    def unconditional(self, length: int) -> torch.Tensor:
        """The empty caption's text encoding (the ODE teacher's unconditional branch), computed once."""
        if length not in self._uncond:
            ids = self.teacher.tokenizer([""], padding="max_length", max_length=length, return_tensors="pt").input_ids
            with torch.no_grad():
                self._uncond[length] = self.text_encoder(ids.to(self.device))[0]
        return self._uncond[length]

    def compute_loss(self, batch: dict[str, torch.Tensor], step: int | None = None):
        generators = self.sample_generators(batch, step)
        latents, cond = self.encode(batch, generators)
        b, device = latents.shape[0], latents.device
        noise = randn_tensor(latents.shape, generator=generators, device=device, dtype=latents.dtype)
        gens = generators if isinstance(generators, list) else [generators] * b
        index = torch.cat(
            [torch.randint(0, len(self.solver_timesteps), (1,), generator=g, device=device) for g in gens]
        )
        w = self.w_min + (self.w_max - self.w_min) * torch.cat(
            [torch.rand(1, generator=g, device=device) for g in gens]
        )
        t = self.solver_timesteps.to(device)[index]
        t_prev = (t - self.skip).clamp(min=0)
        w_emb = guidance_embedding(w, self.w_dim).to(latents.dtype) if self.w_dim else None
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        prediction = self.consistency(self.fast.model("student", self.student), noisy, t, cond, w_emb)

        with torch.no_grad():  # one guided DDIM step of the ODE teacher, t -> t_prev
            teacher = self.fast.model("teacher", self.teacher_unet)
            dtype = next(self.teacher_unet.parameters()).dtype
            both = teacher(
                torch.cat([noisy, noisy]).to(dtype),
                torch.cat([t, t]),
                torch.cat([cond, self.unconditional(cond.shape[1]).expand_as(cond)]).to(dtype),
            ).sample
            x0, eps = self.x0_and_eps(both, torch.cat([noisy, noisy]), torch.cat([t, t]))
            wv = w.view(-1, 1, 1, 1)
            x0 = x0[:b] + wv * (x0[:b] - x0[b:])
            eps = eps[:b] + wv * (eps[:b] - eps[b:])
            a_prev = self.noise_scheduler.alphas_cumprod.to(device)[t_prev].view(-1, 1, 1, 1).float()
            x_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            target_net = find_ema(self.trainer) if self._trainer is not None else None
            target = self.consistency(target_net or self.student, x_prev, t_prev, cond, w_emb)
        return self.loss(prediction, target)


def config_problems(cfg) -> list[str]:
    """One line per bad ``module.lcm`` / ``loss`` value of an LCM run, and a ``module.lcm.init_from`` whose U-Net
    config cannot be found: from the config alone, before anything loads."""
    lcm, problems = cfg.module.get("lcm") or {}, []
    guidance = list(lcm.get("guidance") or [])
    if (
        len(guidance) != 2
        or not all(isinstance(w, (int, float)) and w >= 0 for w in guidance)
        or guidance[0] > guidance[1]
    ):
        problems.append(f"module.lcm.guidance={guidance} must be [min, max] with 0 <= min <= max")
    steps = lcm.get("ode_solver_steps")
    if not isinstance(steps, int) or not 1 <= steps <= 1000:
        problems.append(f"module.lcm.ode_solver_steps={steps!r} must be an integer in [1, 1000]")
    dim = lcm.get("guidance_embedding")
    if dim is not None and (not isinstance(dim, int) or dim < 2 or dim % 2):
        problems.append(f"module.lcm.guidance_embedding={dim!r} must be null or an even integer >= 2")
    lora = lcm.get("lora")
    if lora is not None:
        for key in ("rank", "alpha"):
            value = lora.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                problems.append(f"module.lcm.lora.{key}={value!r} must be a number > 0")
        if dim is not None:
            problems.append(
                "module.lcm.lora needs module.lcm.guidance_embedding=null (LCM-LoRA distils the guidance in)"
            )
    kind = cfg.loss.get("kind")
    if kind not in LOSS_KINDS:
        problems.append(f"loss.kind={kind!r} is not one of {', '.join(LOSS_KINDS)}")
    if lcm.get("init_from"):
        try:
            UNet2DConditionModel.load_config(str(lcm["init_from"]), subfolder="unet")
        except Exception as err:  # noqa: BLE001 - a missing folder, no hub, no unet/: one line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problems.append(f"module.lcm.init_from={lcm['init_from']!r}: no U-Net config found there: {reason}")
    return problems
