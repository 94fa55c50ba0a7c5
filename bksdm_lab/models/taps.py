"""Forward-hook taps that keep the outputs of named submodules for feature KD.

Hooks are registered on the module objects of the *unwrapped* model, found by name once. Wrapping the
model afterwards (DDP adds ``module.``, ``torch.compile`` adds ``_orig_mod.``) renames the modules
but does not replace them, so the taps keep working.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def valid_names(model: torch.nn.Module, name: str, n: int = 8) -> str:
    """Where a submodule name ``model`` does not have goes wrong: the children of its longest prefix it has."""
    modules, parts = dict(model.named_modules()), name.split(".")
    prefix = next(p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)) if p in modules)
    children = [f"{prefix}.{c}".lstrip(".") for c, _ in modules[prefix].named_children()]
    return ", ".join(children[:n]) + (", ..." if len(children) > n else "")


class FeatureTaps:
    """Keeps the latest output of each named submodule of ``model``.

    A module returning a tuple (a diffusers down block returns ``(hidden, skips)``) contributes its
    first element.
    """

    def __init__(self, model: torch.nn.Module, names: Iterable[str]):
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in dict.fromkeys(names):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"feature tap {name!r} names no submodule of {type(model).__name__}; the names there: "
                    f"{valid_names(model, name)}"
                ) from None
            self._handles.append(module.register_forward_hook(self._keep(name)))

    def _keep(self, name: str):
        def hook(_module, _args, output):
            self.features[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """Return the features captured since the last call and forget them."""
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features.clear()
