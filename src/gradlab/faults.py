"""Fault injection: the mid-training failures that knock a healthy run over (the ``fault`` group).

Real explosions are mostly spikes in a run that was going well: a bad batch, a learning-rate
jump, a shift of the input distribution. Each fault here is an option of the multi-select
``fault`` group (``fault=[bad_batch,lr_spike]``; each keeps its settings under its own key,
``fault.bad_batch.at=[300]``) and composes with any model, optimizer and remedy:

* ``bad_batch``: at given steps and/or at each step with a given probability, one batch is
  corrupted: its pixels x factor (``kind=scale``; 255 is a loader that forgot to divide by
  255), random labels (``labels``), or one sample's pixels x factor (``extreme``);
* ``lr_spike``: the learning rate x factor for ``length`` steps from step ``at`` (an LR
  factor the schedule multiplies in, as SPAM's warm-up is: it composes with every scheduler
  but ``onecycle``);
* ``shift``: from step ``at`` on, every training batch is inverted (``1 - pixel``) or its
  pixels x factor (``rescale``). Validation and test data keep the original distribution, so
  the accuracy says what the shift did to the task the model was learning.

Which steps a fault hits is decided on the host from the step number and the run's seed
(``numpy``'s SeedSequence of (seed, fault, step)): no host sync, no state, the same steps
after a resume. The corruption itself runs on the device (random labels from a device
generator seeded the same way). Each step records ``fault/active`` (1 when a fault acted on
its batch or LR), the run is tagged ``fault=<names>``, and ``grad_norm.png`` marks the faults.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .data import MEAN, STD
from .registry import FAULTS, Schema, choice, need

Span = Tuple[int, int]  # [start, end) steps


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalized model inputs back to pixel intensities in [0, 1]."""
    return x * STD + MEAN


def from_pixels(p: torch.Tensor) -> torch.Tensor:
    return (p - MEAN) / STD


class Fault:
    """Base: what a fault does at a step. ``active`` is decided on the host from the step
    alone; ``corrupt`` (called only at an active step) transforms the batch on the device."""

    name = "base"

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = int(seed), device
        self.salt = zlib.crc32(type(self).__name__.encode())  # each fault draws its own numbers

    def rng(self, step: int) -> np.random.Generator:
        """This fault's random numbers at ``step``: a function of (seed, fault, step) only."""
        return np.random.default_rng([self.seed, self.salt, step])

    def active(self, step: int) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def corrupt(self, step: int, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def lr_factor(self) -> Optional[Callable[[int], float]]:
        """A factor f(step) the LR schedule multiplies by (gradlab.optim.Schedule), or None."""
        return None

    def spans(self, total_steps: int) -> List[Span]:
        """The [start, end) step ranges this fault acts on, for the plots."""
        return [(s, s + 1) for s in range(total_steps) if self.active(s)]


@dataclass
class NoFault(Schema):
    """Selecting ``none`` selects nothing; it exists so ``fault=none`` reads naturally."""


FAULTS.add("none", NoFault)


@dataclass
class BadBatchConfig(Schema):
    at: List[int] = field(default_factory=lambda: [100])  # 0-based steps whose batch is corrupted ...
    prob: float = 0.0  # ... and/or each step's batch with this probability (seeded)
    kind: str = choice("scale", "labels", "extreme")
    factor: float = 255.0  # scale / extreme: pixels x factor (255: a loader that forgot to divide by 255)

    def check(self) -> None:
        need(bool(self.at) or self.prob > 0, "at", "no step would be corrupted: give steps (at=[...]) or prob > 0")
        need(all(s >= 0 for s in self.at), "at", f"steps must be >= 0, got {list(self.at)}")
        need(0 <= self.prob <= 1, "prob", f"must be in [0, 1], got {self.prob}")
        need(self.factor > 0, "factor", f"must be > 0, got {self.factor}")


@FAULTS.register("bad_batch", BadBatchConfig)
class BadBatch(Fault):
    """One corrupted batch at each step of ``at`` and, with ``prob``, at each step whose seeded
    draw u(seed, step) < prob. ``scale``: pixels p -> factor * p for the whole batch; ``labels``:
    every label replaced by a uniform random class; ``extreme``: one sample (a seeded index)
    gets pixels x factor. Pixels are intensities in [0, 1] before normalization, so factor 255
    is the classic loader bug (raw 0-255 bytes), ~800x the usual normalized input."""

    def __init__(self, seed, device, at: List[int], prob: float, kind: str, factor: float):
        super().__init__(seed, device)
        self.at, self.prob, self.kind, self.factor = frozenset(int(s) for s in at), float(prob), kind, float(factor)

    def active(self, step: int) -> bool:
        return step in self.at or (self.prob > 0 and self.rng(step).random() < self.prob)

    def corrupt(self, step, x, y):
        rng = self.rng(step)
        rng.random()  # the draw ``active`` used: the rest of the stream is this step's corruption
        if self.kind == "scale":
            return from_pixels(to_pixels(x) * self.factor), y
        if self.kind == "labels":
            gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2 ** 62)))
            return x, torch.randint(0, 10, y.shape, generator=gen, device=y.device, dtype=y.dtype)
        i = int(rng.integers(len(y)))
        gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2 ** 62)))
        noise = torch.rand(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype) * self.factor
        x = x.clone()
        x[i] = from_pixels(noise)
        return x, y


@dataclass
class LRSpikeConfig(Schema):
    at: int = 100  # first step with the spiked LR (>= 1: step 0's LR is the schedule's own start)
    length: int = 10  # steps at the spiked LR
    factor: float = 10.0  # LR multiplier

    def check(self) -> None:
        need(self.at >= 1, "at", f"must be >= 1 (the LR of step 0 is the schedule's start), got {self.at}")
        need(self.length >= 1, "length", f"must be >= 1, got {self.length}")
        need(self.factor > 0, "factor", f"must be > 0, got {self.factor}")


@FAULTS.register("lr_spike", LRSpikeConfig)
class LRSpike(Fault):
    """The learning rate x ``factor`` at steps at .. at + length - 1, then back to the schedule:
    an LR factor the schedule multiplies in (torch's MultiplicativeLR), so it composes with any
    scheduler and with warmup (not with onecycle, which sets the LR from scratch every step)."""

    def __init__(self, seed, device, at: int, length: int, factor: float):
        super().__init__(seed, device)
        self.start, self.end, self.factor = int(at), int(at) + int(length), float(factor)

    def active(self, step: int) -> bool:
        return self.start <= step < self.end

    def lr_factor(self):
        return lambda t: self.factor if self.active(t) else 1.0

    def spans(self, total_steps: int) -> List[Span]:
        return [(self.start, min(self.end, total_steps))] if self.start < total_steps else []


@dataclass
class ShiftConfig(Schema):
    at: int = 100  # first shifted step
    kind: str = choice("invert", "rescale")  # invert: p -> 1 - p; rescale: p -> factor * p
    factor: float = 0.5  # rescale's pixel multiplier

    def check(self) -> None:
        need(self.at >= 0, "at", f"must be >= 0, got {self.at}")
        need(self.factor > 0, "factor", f"must be > 0, got {self.factor}")


@FAULTS.register("shift", ShiftConfig)
class Shift(Fault):
    """From step ``at`` on, every training batch's pixels p (in [0, 1]) become 1 - p (``invert``)
    or factor * p (``rescale``); validation and test data stay as they were."""

    def __init__(self, seed, device, at: int, kind: str, factor: float):
        super().__init__(seed, device)
        self.start, self.kind, self.factor = int(at), kind, float(factor)

    def active(self, step: int) -> bool:
        return step >= self.start

    def corrupt(self, step, x, y):
        p = to_pixels(x)
        return from_pixels(1.0 - p if self.kind == "invert" else p * self.factor), y

    def spans(self, total_steps: int) -> List[Span]:
        return [(self.start, total_steps)] if self.start < total_steps else []


def selected_faults(cfg_fault) -> List[str]:
    """The faults the config selects, in the registry's order (``none`` selects nothing)."""
    return [e.name for e in FAULTS if e.name != "none" and cfg_fault is not None and cfg_fault.get(e.name) is not None]


def fault_label(cfg_fault) -> str:
    """What a run's ``fault`` tag calls its selection: ``bad_batch+lr_spike``, or ``none``."""
    return "+".join(selected_faults(cfg_fault)) or "none"


class Faults:
    """The selected faults of a run, applied by the step engine before the forward pass."""

    def __init__(self, cfg_fault, seed: int, device: torch.device):
        self.faults: List[Fault] = []
        for name in selected_faults(cfg_fault):
            fault = FAULTS[name].obj(seed, device, **dict(cfg_fault[name]))
            fault.name = name
            self.faults.append(fault)
        # fault/active per step: constant device scalars (no allocation, no sync); NaN: no fault selected
        self.flags = {True: torch.ones((), device=device), False: torch.zeros((), device=device)}
        self.unused = torch.full((), float("nan"), device=device)

    def apply(self, step: int, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch this step trains on, and its ``fault/active`` flag."""
        if not self.faults:
            return x, y, self.unused
        hit = False
        for fault in self.faults:
            if fault.active(step):
                x, y = fault.corrupt(step, x, y)
                hit = True
        return x, y, self.flags[hit]

    def lr_factors(self) -> List[Callable[[int], float]]:
        return [f for f in (fault.lr_factor() for fault in self.faults) if f is not None]

    def spans(self, total_steps: int) -> Dict[str, List[Span]]:
        """Per fault, the step ranges it acts on (plots)."""
        return {fault.name: fault.spans(total_steps) for fault in self.faults}
