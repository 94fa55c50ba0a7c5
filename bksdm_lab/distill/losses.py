"""The BK-SDM loss: a weighted sum of small named terms.

    loss = w_task * task + w_out_kd * out_kd + w_feat_kd * feat_kd      (all weights 1.0 in the paper)

Each term is a module called with a :class:`KDInputs` and returning a scalar. :class:`KDLoss` holds
the terms by name, skips those weighted 0 (they contribute nothing and cost nothing), and returns
``(total, parts)`` where ``parts`` maps each active term's name to its unweighted value. Adding a KD
term means writing a class here and naming it in ``conf/loss/*.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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


class OutputKD(LossTerm):
    """MSE between the student's and the teacher's predictions on the same input."""

    needs_teacher = True

    def forward(self, x: KDInputs) -> torch.Tensor:
        return F.mse_loss(x.student_out.float(), x.teacher_out.float())


class FeatureKD(LossTerm):
    """Sum over (teacher module, student module) pairs of the MSE between their outputs, in fp32.

    ``layer_weights`` (one per pair, default 1) weights the pairs; the per-pair values of the last
    call are kept in ``last_layer_losses`` (keyed by student module) for logging.
    """

    needs_teacher = True

    def __init__(self, pairs: Sequence[Sequence[str]], layer_weights: Sequence[float] | None = None):
        super().__init__()
        self.feature_pairs = [(str(t), str(s)) for t, s in pairs]
        if not self.feature_pairs:
            raise ValueError("loss.terms.feat_kd.pairs is empty: give [teacher module, student module] pairs")
        weights = [1.0] * len(self.feature_pairs) if layer_weights is None else [float(w) for w in layer_weights]
        if len(weights) != len(self.feature_pairs):
            raise ValueError(
                f"loss.terms.feat_kd.layer_weights has {len(weights)} values for {len(self.feature_pairs)} pairs"
            )
        self.layer_weights = weights
        self.last_layer_losses: dict[str, torch.Tensor] = {}

    def forward(self, x: KDInputs) -> torch.Tensor:
        total, self.last_layer_losses = 0.0, {}
        for (tname, sname), weight in zip(self.feature_pairs, self.layer_weights):
            s, t = x.student_features[sname], x.teacher_features[tname]
            if s.shape != t.shape:
                raise ValueError(
                    f"feature pair {tname} -> {sname}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}"
                )
            value = F.mse_loss(s.float(), t.float())
            self.last_layer_losses[sname] = value.detach()
            total = total + weight * value
        return total


class KDLoss(torch.nn.Module):
    """Weighted sum of named :class:`LossTerm` s; returns ``(total, parts)``."""

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
