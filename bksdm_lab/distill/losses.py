"""The BK-SDM loss, ``w_task * task + w_out_kd * out_kd + w_feat_kd * feat_kd`` (all weights 1.0 in the paper).

Each term is a module taking a :class:`KDInputs` and returning a scalar; a new KD term is a class here, named in
``conf/loss/*.yaml``. The options beyond the paper (README, 'Research options') are off by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

NORMALIZE = ("none", "teacher")  # FeatureKD(normalize=)
FEATURE_SITES = ("blocks", "self_attention")  # FeatureKD(at=)
OUTPUT_SPACES = ("output", "x0")  # OutputKD(space=)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class LossConfigError(ValueError):
    """A bad argument of a loss term. ``str()`` starts with the argument's name; :meth:`under` puts the config key
    of the term in front (``loss.terms.feat_kd.normalize='l1' must be one of none, teacher``)."""

    def __init__(self, argument: str, problem: str):
        super().__init__(f"{argument}{problem}")
        self.argument, self.problem = argument, problem

    def under(self, key: str) -> str:
        return f"{key}.{self.argument}{self.problem}"


def _one_of(argument: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise LossConfigError(argument, f"={value!r} must be one of {', '.join(allowed)}")
    return value


@dataclass
class KDInputs:
    """What a loss term may use: the predictions, the target, the tapped features, and the noising of this step
    (``noisy`` latents, ``timesteps``, the scheduler's ``alphas_cumprod`` and ``prediction_type``: enough to turn a
    prediction into the predicted clean latents x0)."""

    student_out: torch.Tensor
    target: torch.Tensor
    teacher_out: torch.Tensor | None = None
    student_features: Mapping[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: Mapping[str, torch.Tensor] = field(default_factory=dict)
    noisy: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    alphas_cumprod: torch.Tensor | None = None
    prediction_type: str = "epsilon"


class LossTerm(torch.nn.Module):
    needs_teacher = False
    feature_pairs: Sequence[tuple[str, str]] = ()


class TaskLoss(LossTerm):
    """MSE between the student's prediction and the diffusion target (noise or velocity)."""

    def forward(self, x: KDInputs) -> torch.Tensor:
        return F.mse_loss(x.student_out.float(), x.target.float())


def predicted_x0(prediction: torch.Tensor, x: KDInputs) -> torch.Tensor:
    """The clean latents a U-Net prediction implies, in fp32, from the step's noising
    ``noisy = sqrt(a) * x0 + sqrt(1 - a) * eps`` (``a = alphas_cumprod[t]``, per sample):

    - ``epsilon``: ``x0 = (noisy - sqrt(1 - a) * eps) / sqrt(a)``;
    - ``v_prediction`` (``v = sqrt(a) * eps - sqrt(1 - a) * x0``): ``x0 = sqrt(a) * noisy - sqrt(1 - a) * v``;
    - ``sample``: the prediction is x0.
    """
    if x.noisy is None or x.timesteps is None or x.alphas_cumprod is None:
        raise ValueError("x0-space KD needs the step's noising: KDInputs.noisy, .timesteps and .alphas_cumprod")
    _one_of("prediction_type", x.prediction_type, PREDICTION_TYPES)
    if x.prediction_type == "sample":
        return prediction.float()
    a = x.alphas_cumprod.to(device=prediction.device, dtype=torch.float32)[x.timesteps.to(prediction.device)]
    a = a.reshape(-1, *([1] * (prediction.dim() - 1)))
    noisy, prediction = x.noisy.float(), prediction.float()
    if x.prediction_type == "epsilon":
        return (noisy - (1 - a).sqrt() * prediction) / a.sqrt()
    return a.sqrt() * noisy - (1 - a).sqrt() * prediction


class OutputKD(LossTerm):
    """MSE between the student's and the teacher's predictions on the same input, in fp32.

    ``space``: ``output`` (the paper) compares the raw predictions (epsilon or v, the teacher's prediction type);
    ``x0`` compares the clean latents each prediction implies (:func:`predicted_x0`). With epsilon prediction the
    x0 error is the epsilon error times ``sqrt((1 - a) / a)`` per sample: small at low noise, large (about 14x at
    SD's t=999) at high noise, so x0-space KD stresses the noisy steps; with v prediction the factor is
    ``sqrt(1 - a)`` (at most 1). The MSE scales with the square of these factors.
    """

    needs_teacher = True

    def __init__(self, space: str = "output"):
        super().__init__()
        self.space = _one_of("space", space, OUTPUT_SPACES)

    def forward(self, x: KDInputs) -> torch.Tensor:
        student, teacher = x.student_out.float(), x.teacher_out.detach().float()
        if self.space == "x0":
            student, teacher = predicted_x0(student, x), predicted_x0(teacher, x)
        return F.mse_loss(student, teacher)


def _pairs(argument: str, pairs: Any) -> list[tuple[str, str]]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise LossConfigError(argument, f"={pairs!r} must be a list of [teacher module, student module] pairs")
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise LossConfigError(f"{argument}.{i}", f"={pair!r} must be a [teacher module, student module] pair")
        out.append((str(pair[0]), str(pair[1])))
    return out


class FeatureKD(LossTerm):
    """Sum over (teacher module, student module) pairs of a per-pair feature distance, in fp32.

    - ``at``: which pairs. ``blocks`` (the paper): ``pairs``, the block outputs (``arch.feature_pairs``);
      ``self_attention``: ``self_attention_pairs``, the outputs of the self-attention layers
      (``...attentions.{i}.transformer_blocks.0.attn1``, ``arch.self_attention_pairs``), the self-attention
      feature distillation of KOALA (Lee et al., 2023).
    - ``normalize``: ``none`` (the paper): the MSE of the pair. ``teacher``: the MSE divided by the mean square of the
      teacher feature, i.e. ``||s - t||^2 / ||t||^2`` over the micro-batch, the normalised feature distillation of
      LAPTOP-Diff (Zhang et al., 2024). Feature scales differ by orders of magnitude between layers (and between
      feature KD and output KD), so the raw MSE lets the largest layers dominate; the ratio is scale-free: a student
      feature equal to 0 scores 1 at every layer. The teacher's norm is a constant (no gradient).
    - ``layer_weights``: a weight per pair, ``null`` (all 1), a list (one per pair, in order) or a mapping
      ``{student module: weight}`` (pairs not named keep 1).

    The per-pair (unweighted) values of the last call are kept in ``last_layer_losses`` (keyed by student module)
    for logging (``train/<term>/<student module>``).
    """

    needs_teacher = True

    def __init__(
        self,
        pairs: Sequence[Sequence[str]] | None = None,
        layer_weights: Sequence[float] | Mapping[str, float] | None = None,
        normalize: str = "none",
        at: str = "blocks",
        self_attention_pairs: Sequence[Sequence[str]] | None = None,
    ):
        super().__init__()
        self.normalize = _one_of("normalize", normalize, NORMALIZE)
        self.at = _one_of("at", at, FEATURE_SITES)
        if at == "self_attention":
            if not self_attention_pairs:
                raise LossConfigError(
                    "at",
                    "=self_attention needs self_attention_pairs, [teacher module, student module] pairs at the "
                    "self-attention layers (...attentions.<i>.transformer_blocks.0.attn1); the config takes them from "
                    "arch.self_attention_pairs, which this arch does not define",
                )
            self.feature_pairs = _pairs("self_attention_pairs", self_attention_pairs)
        else:
            if not pairs:
                raise LossConfigError("pairs", " is empty: give [teacher module, student module] pairs")
            self.feature_pairs = _pairs("pairs", pairs)
        self.layer_weights = self._weights(layer_weights)
        self.last_layer_losses: dict[str, torch.Tensor] = {}

    def _weights(self, layer_weights) -> list[float]:
        students = [s for _, s in self.feature_pairs]
        if layer_weights is None:
            return [1.0] * len(students)
        if isinstance(layer_weights, Mapping):
            unknown = [str(k) for k in layer_weights if k not in students]
            if unknown:
                raise LossConfigError(
                    "layer_weights",
                    f" names {', '.join(unknown)}, not a student module of the pairs; they are: {', '.join(students)}",
                )
            weights = [layer_weights.get(s, 1.0) for s in students]
        elif isinstance(layer_weights, Sequence) and not isinstance(layer_weights, (str, bytes)):
            weights = list(layer_weights)
            if len(weights) != len(students):
                raise LossConfigError(
                    "layer_weights",
                    f" has {len(weights)} values for {len(students)} pairs: give one per pair, or a mapping "
                    f"{{student module: weight}} (the student modules: {', '.join(students)})",
                )
        else:
            raise LossConfigError(
                "layer_weights", f"={layer_weights!r} must be null, a list (one per pair) or {{student module: weight}}"
            )
        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0]
        if bad:
            raise LossConfigError("layer_weights", f" holds {bad[0]!r}: each weight must be a number >= 0")
        return [float(w) for w in weights]

    def pair_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = s.float(), t.detach().float()
        value = F.mse_loss(s, t)
        if self.normalize == "teacher":
            value = value / t.square().mean().clamp_min(torch.finfo(torch.float32).tiny)
        return value

    def forward(self, x: KDInputs) -> torch.Tensor:
        total, self.last_layer_losses = 0.0, {}
        for (tname, sname), weight in zip(self.feature_pairs, self.layer_weights):
            s, t = x.student_features[sname], x.teacher_features[tname]
            if s.shape != t.shape:
                raise ValueError(
                    f"feature pair {tname} -> {sname}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}"
                )
            value = self.pair_loss(s, t)
            self.last_layer_losses[sname] = value.detach()
            total = total + weight * value
        return total


class KDLoss(torch.nn.Module):
    """Weighted sum of named :class:`LossTerm` s; returns ``(total, parts)``, ``parts`` the unweighted value of each
    active term. A term weighted 0 is not computed."""

    def __init__(self, terms: Mapping[str, LossTerm], weights: Mapping[str, float]):
        super().__init__()
        unknown = sorted(set(weights) - set(terms))
        unweighted = sorted(set(terms) - set(weights))
        if unknown or unweighted:
            raise ValueError(
                f"loss.weights must name exactly the terms {sorted(terms)}: "
                f"unknown {unknown or 'none'}, missing {unweighted or 'none'}"
            )
        self.terms = torch.nn.ModuleDict(dict(terms))
        self.weights = {name: float(w) for name, w in weights.items()}
        self.active = [name for name in self.terms if self.weights[name] != 0.0]
        if not self.active:
            raise ValueError(f"every loss weight is 0 (loss.weights={self.weights}): nothing to train")

    @property
    def needs_teacher(self) -> bool:
        return any(self.terms[n].needs_teacher for n in self.active)

    @property
    def feature_pairs(self) -> list[tuple[str, str]]:
        """(teacher module, student module) pairs whose outputs the active terms need."""
        pairs: dict[tuple[str, str], None] = {}
        for name in self.active:
            pairs.update(dict.fromkeys(self.terms[name].feature_pairs))
        return list(pairs)

    def forward(self, x: KDInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: self.terms[name](x) for name in self.active}
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, parts


def check_config(cfg) -> list[str]:
    """One line per problem of a run config's ``loss`` (its terms' arguments, the weights' names), found by building
    the terms from the config (cheap: no model is loaded). A config without ``loss`` has no problem here."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.select(cfg, "loss", default=None)
    if not isinstance(node, DictConfig) or not isinstance(node.get("terms"), DictConfig):
        return []
    problems, terms = [], {}
    for name in node.terms:
        key = f"loss.terms.{name}"
        try:
            terms[name] = instantiate(node.terms[name])
        except InstantiationException as err:
            cause = err.__cause__ or err
            if isinstance(cause, LossConfigError):
                problems.append(cause.under(key))
            else:
                problems.append(f"{key}: {str(cause).strip().splitlines()[0] if str(cause).strip() else cause!r}")
        except Exception as err:  # noqa: BLE001 - an interpolation or import error: one line naming the term
            problems.append(f"{key}: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}")
    if not problems:
        weights = node.get("weights")
        try:
            loss = KDLoss(terms, dict(weights) if isinstance(weights, DictConfig) else {})
        except (ValueError, TypeError) as err:
            return [str(err)]
        problems += check_taps(cfg, loss)
    return problems


def check_taps(cfg, loss: KDLoss) -> list[str]:
    """One line per feature pair of an active term naming a module the student or the teacher does not have, found on
    the models built from their configs on the meta device (no weights: a fraction of a second at SD-v1.4 size)."""
    from diffusers import UNet2DConditionModel
    from omegaconf import OmegaConf

    from bksdm_lab.models.keep import teacher_unet_config
    from bksdm_lab.models.students import build_student
    from bksdm_lab.models.taps import valid_names

    try:
        arch = OmegaConf.to_container(cfg.arch, resolve=True)
        teacher_config, _ = teacher_unet_config(cfg.teacher)
        with torch.device("meta"):
            models = {"teacher": UNet2DConditionModel.from_config(teacher_config)}
            models["student"] = build_student(teacher_config, arch)
    except Exception:  # noqa: BLE001 - a bad arch or teacher: their own checks say so, before loading too
        return []
    names = {role: dict(model.named_modules()) for role, model in models.items()}
    problems = []
    for term in loss.active:
        argument = "self_attention_pairs" if getattr(loss.terms[term], "at", None) == "self_attention" else "pairs"
        for i, pair in enumerate(loss.terms[term].feature_pairs):
            for role, name in zip(("teacher", "student"), pair):
                if name not in names[role]:
                    problems.append(
                        f"loss.terms.{term}.{argument}.{i}: the {role} U-Net has no module {name!r}; the names there: "
                        f"{valid_names(models[role], name)}"
                    )
    return problems
