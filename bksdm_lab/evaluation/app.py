"""What the evaluation commands (``python -m bksdm_lab.generate``, ``python -m bksdm_lab.evaluate``) share: the
checks of their values, where a run's folder is, and this process's place among several launched by ``torchrun``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

Rule = tuple[Callable[[Any], bool], str]  # a value's test, and the allowed values in words
BOOL: Rule = (lambda v: isinstance(v, bool), "one of [true, false]")


def is_whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def whole(low: int, null: bool = False) -> Rule:
    """The rule "a whole number >= low" (or null)."""
    return (lambda v: (null and v is None) or is_whole(v, low)), f"{'null or ' if null else ''}a whole number >= {low}"


def _device(value) -> bool:
    import torch

    try:
        device = torch.device(value) if value is not None else None
    except (RuntimeError, TypeError):
        return False
    cuda = device is not None and device.type == "cuda"
    return not cuda or (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count())


DEVICE: Rule = (_device, "null (cuda if available, else cpu), cpu, or cuda[:N] of a GPU here")


def rule_problems(values: Mapping, rules: Mapping[str, Rule], prefix: str = "") -> list[str]:
    """One line per value that breaks its rule (key -> rule, for the keys ``values`` has): the key, the value and
    the allowed values."""
    return [
        f"{prefix}{k}={values[k]!r} is not {allowed}"
        for k, (ok, allowed) in rules.items()
        if k in values and not ok(values[k])
    ]


def run_dir(cfg) -> Path:
    """This run's folder: Hydra's output dir (``hydra.run.dir``, or the job's folder of a sweep); without Hydra
    (a config composed in Python), ``cfg.out``."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.out)


# ---- several processes (torchrun) ----------------------------------------------------------------------
class LaunchError(RuntimeError):
    """The process environment (RANK / WORLD_SIZE / ...) is wrong; the message says what to do."""


class Processes:
    """This process's place among several launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): a
    gloo process group (CPU tensors only: a barrier and small objects) when ``WORLD_SIZE`` > 1, none otherwise."""

    def __init__(self, env: dict[str, str] | None = None):
        import os

        env = os.environ if env is None else env
        try:
            self.world_size = int(env.get("WORLD_SIZE", "1"))
            self.rank = int(env.get("RANK", "0"))
            self.local_rank = int(env.get("LOCAL_RANK", str(self.rank)))
        except ValueError as err:
            raise LaunchError(f"RANK / WORLD_SIZE / LOCAL_RANK must be whole numbers: {err}") from None
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise LaunchError(f"RANK={self.rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={self.world_size})")
        self._group = False
        if self.world_size > 1:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
            if missing:
                raise LaunchError(
                    f"WORLD_SIZE={self.world_size} but {' and '.join(missing)} not set: launch with "
                    "`torchrun --nproc_per_node N -m bksdm_lab.<command> ...`"
                )
            import datetime

            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
                self._group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False
