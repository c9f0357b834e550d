"""Data-parallel training under torchrun: DDP or FSDP2 (``fully_shard``), gloo on the CPU, NCCL on GPUs.

``torchrun --nproc_per_node=N src/train.py trainer.strategy=ddp|fsdp ...`` starts N ranks. Every
rank holds the whole device-resident data and walks the same seeded batch order; each step it
takes its slice of the global batch (``Parallel.shard``), so N ranks see exactly the batches one
process with the same ``trainer.batch_size`` sees.

What the stabilizers see is the gradient the optimizer applies. Under DDP that is the
all-reduced gradient, identical on every rank. Under FSDP2 every rank holds a shard of each
gradient (a DTensor): the global norm needs the shards combined, which ``tensor_norms`` does in
one all-reduce (a norm of the local shard alone is too small by about sqrt(N): pytorch#170862,
torchtitan#766). The loss the stabilizers and telemetry see is the global batch's mean loss
(``Parallel.global_loss``). So thresholds, skip decisions and AGC's per-unit norms are the same
on every rank, and the replicas never drift apart.

Rank 0 alone talks to MLflow and writes checkpoints. A checkpoint holds the full (unsharded)
model and optimizer state in the single-process layout, so a run resumes with any strategy
and any world size. A single process (``strategy=none``) gets ``SINGLE``, whose methods are
identities: the one-process path is unchanged.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_world_size() -> int:
    """The number of processes torchrun started (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def missing_launch_env() -> List[str]:
    return [k for k in TORCHRUN_ENV if k not in os.environ]


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def plain(t: torch.Tensor) -> torch.Tensor:
    """A value every rank agrees on, as an ordinary tensor (a sharded or partial DTensor is reduced)."""
    return t.full_tensor() if _is_dtensor(t) else t


def tensor_norms(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """Per-tensor L2 norms, as ordinary tensors. For FSDP's sharded tensors the shards' norms are
    combined in one all-reduce, so every rank gets the global values, not its shard's."""
    norms = torch._foreach_norm(tensors)
    if norms and _is_dtensor(norms[0]):
        return list(plain(torch.stack(norms)).unbind())
    return list(norms)


@dataclass
class Parallel:
    """Where this process stands among the ranks, and the few collective operations training needs."""

    strategy: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL: the GPU)

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------- the step
    def shard(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's slice of the global batch and its loss weight (n_local * world / n_global):
        DDP and FSDP average the ranks' gradients, so with uneven slices (an epoch's last batch)
        the weighted losses still average to the global batch's mean loss."""
        if not self.active:
            return x, y, 1.0
        n = len(y)
        xs, ys = x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]
        return xs, ys, len(ys) * self.world / n

    def global_loss(self, loss: torch.Tensor, weight: float) -> torch.Tensor:
        """The global batch's mean loss on every rank (one all-reduce, no host sync)."""
        if not self.active:
            return loss
        total = loss.detach() * weight
        torch.distributed.all_reduce(total)
        return total / self.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a tensor each rank holds (a copy; one all-reduce)."""
        t = t.clone()
        if self.active:
            torch.distributed.all_reduce(t)
        return t

    def agree(self, value: int) -> int:
        """The largest of the ranks' values (e.g. a stop signal one rank received): all stop together."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t[0])

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a run id, a resolved config)."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on rank 0 only (an MLflow query), its result on every rank. An exception on
        rank 0 is raised on every rank, so none waits forever."""
        if not self.active:
            return fn()
        outcome = (False, None)
        if self.main:
            try:
                outcome = (True, fn())
            except Exception as exc:  # noqa: BLE001 - raised on every rank below
                outcome = (False, exc)
        ok, value = self.share(outcome)
        if not ok:
            raise value
        return value

    # ---------------------------------------------------------- the model
    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP around the model, or FSDP2: every layer that owns parameters sharded on its own, then the root."""
        if not self.active:
            return model
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # CPU has no SyncBatchNorm: per-rank statistics
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules())[1:]:
            if any(True for _ in module.parameters(recurse=False)):
                fully_shard(module)
        fully_shard(model)
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The user's module (DDP keeps it as ``.module``; fully_shard changes it in place)."""
        from torch.nn.parallel import DistributedDataParallel

        return model.module if isinstance(model, DistributedDataParallel) else model

    # ---------------------------------------------------------- checkpoints (single-process layout)
    def model_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The full model state on rank 0 (FSDP gathers it: every rank must call this)."""
        if self.strategy != "fsdp":
            return self.unwrap(model).state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_state())

    def optimizer_state(self, model: nn.Module, optimizer) -> dict:
        """The full optimizer state on rank 0, keyed by parameter index like ``Optimizer.state_dict``."""
        if self.strategy != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=_full_state())
        if not state:  # ranks other than 0 receive nothing
            return {}
        index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        return {"state": {index[k]: v for k, v in state["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}

    def load_model_state(self, model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
        if self.strategy != "fsdp":
            self.unwrap(model).load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_full_state(offload=False))

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        if self.strategy != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        names = [name for name, _ in model.named_parameters()]
        by_name = {"state": {names[i]: v for i, v in state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=_full_state(offload=False))


SINGLE = Parallel()


def _full_state(offload: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=offload)


def start(strategy: str, device_name: str):
    """(Parallel, device) for this process: joins torchrun's process group once (gloo on the CPU,
    NCCL on CUDA, each rank on its LOCAL_RANK's GPU); ``none`` is a single process."""
    from .config import resolve_device
    from .errors import ConfigError

    if strategy == "none":
        if launched_world_size() > 1:
            raise ConfigError("trainer.strategy", f"torchrun started {launched_world_size()} processes: choose "
                                                  "trainer.strategy=ddp or fsdp (with none each would train alone)")
        return SINGLE, resolve_device(device_name)
    import torch.distributed as dist

    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        atexit.register(_leave)
    return Parallel(strategy, dist.get_rank(), dist.get_world_size(), device), device


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def describe(parallel: Parallel, device: torch.device) -> str:
    """How the run was launched, for its ``parallel`` tag: ``none``, or e.g. ``ddp x2 (gloo)``."""
    if not parallel.active:
        return "none"
    return f"{parallel.strategy} x{parallel.world} ({'nccl' if device.type == 'cuda' else 'gloo'})"
