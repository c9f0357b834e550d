"""Vectorized ensembles: the seeds of one matrix cell trained together, each member still its own run.

Why: the seeds of a cell differ only in the seed, so their models have the same shapes. One
forward and one backward over the stacked parameters (``torch.func.functional_call`` under
``torch.func.vmap``) serve every member, and the process, the data and the test split are
loaded once for all of them (gradlab.data keeps a process's verified splits and their device copies).

How a member stays its individual run: every member is a whole ``Trainer``, built in seed
order exactly as its individual run builds it (``seed_everything(seed)`` before ``build_model``:
the same initial weights), with its own EpochOrder (its batches), Faults, StabilizerStack,
optimizer, schedule, Recorder, Foresight, divergence watch, checkpoint and MLflow run. Only
the storage of its parameters moves: ``p.data`` becomes the view ``stacked[name][i]`` and
``p.grad`` the view ``grads[name][i]``, so after the batched backward each member's own
``StepEngine.update`` (stabilizers, optimizer step, telemetry row, schedule) runs unchanged on
its own views. The members' losses are summed only to call backward once: the gradient of a
sum of independent terms is each term's own gradient, so a member's NaN never reaches another
member. A member that diverges (or reaches its budget) ends as its individual run ends (flush,
validation, ``finish``: summary, tags, plots, checkpoint) and leaves the stack; the others go on.
Each member's run carries the tag ``gradlab.ensemble=<members>`` and its ``time/step_ms`` is its
share of the ensemble's wall time.

Histories equal the individual runs' within float tolerance, not bit for bit: a batched matrix
product may sum in another order (tests/test_ensemble.py).
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from .engine import z_penalty
from .training import StopSignal, Trainer, TrainResult


def unsupported(cfg) -> Optional[str]:
    """Why the runs of ``cfg``'s cell cannot be stacked (they then train one at a time), or None."""
    m = cfg.model
    if m.name in ("rnn", "lstm"):
        return f"model={m.name}: torch.func.vmap has no batching rule for torch's fused RNN kernels"
    if m.name == "vit":
        return "model=vit: the attention-logit probes are not recorded under vmap"
    if m.get("norm") == "batchnorm":
        return "model.norm=batchnorm: running statistics are buffers updated in place"
    if (m.get("dropout") or 0) > 0:
        return "model.dropout > 0: dropout's masks would not match the individual runs' RNG"
    t = cfg.trainer
    if t.strategy != "none":
        return f"trainer.strategy={t.strategy}: an ensemble is one process"
    if t.precision != "32":
        return f"trainer.precision={t.precision}: ensembles train in float32"
    if t.resume:
        return "trainer.resume: a resumed run continues alone"
    if t.preflight:
        return "trainer.preflight: the preflight runs the model outside the step"
    if cfg.loss.l1 > 0:
        return "loss.l1 > 0: the L1 penalty reads the module's parameters"
    if cfg.scheduler.name == "plateau":
        return "scheduler=plateau: fine per member, but not tested in an ensemble"
    return None


def shapes_key(cfg) -> tuple:
    """What members must agree on: what shapes the batched step (the rest, seed, stabilizers,
    optimizer, schedule, faults, is each member's own)."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    return (repr(c["model"]), repr(c["data"]), c["trainer"]["batch_size"], c["trainer"]["device"],
            repr(c["loss"]))


class Stack:
    """The active members' parameters as one tensor per name, [members, *shape]; each member's
    parameters and gradients are views into it."""

    def __init__(self, template: torch.nn.Module):
        self.template = template  # a copy of a member's module: functional_call's structure only
        self.names = [n for n, p in template.named_parameters() if p.requires_grad]
        self.params: List[torch.Tensor] = []
        self.grads: List[torch.Tensor] = []

    def build(self, members: Sequence[Trainer]) -> None:
        """Stack the members' current parameters (copies) and point each member at its views."""
        named = [dict(m.engine.model.named_parameters()) for m in members]
        self.params = [torch.stack([n[name].detach() for n in named]) for name in self.names]
        self.grads = [torch.zeros_like(w) for w in self.params]
        for i, n in enumerate(named):
            for name, w, g in zip(self.names, self.params, self.grads):
                n[name].data = w[i]
                n[name].grad = g[i]

    @staticmethod
    def release(member: Trainer) -> None:
        """Give a leaving member storage of its own (its checkpoint then holds its weights only)."""
        for p in member.engine.model.parameters():
            p.data = p.data.clone()
            if p.grad is not None:
                p.grad = p.grad.clone()


class Ensemble:
    """Trains ``cfgs`` (runs that agree on ``shapes_key``: a cell's seeds, or a scenario's remedies
    that leave the model alone) as one ensemble; ``fit`` returns each member's TrainResult, in the
    order of ``cfgs``."""

    def __init__(self, cfgs: Sequence[Any], output_dirs: Sequence[Path], test: bool = False):
        keys = {shapes_key(c) for c in cfgs}
        if len(keys) > 1:
            raise ValueError("ensemble members must share the model, data, batch size, device and loss (these differ)")
        for cfg in cfgs:
            reason = unsupported(cfg)
            if reason:
                raise ValueError(f"cannot train as an ensemble: {reason}")
        self.members = [Trainer(cfg, Path(out), test=test) for cfg, out in zip(cfgs, output_dirs)]
        for m in self.members:
            _own_model_state(m)
        self.loss_cfg = cfgs[0].loss
        self.stack = Stack(copy.deepcopy(self.members[0].engine.model))
        self.results: Dict[int, TrainResult] = {}

    # ------------------------------------------------------------ one batched step
    def _losses(self, params: List[torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        names, template, cfg = self.stack.names, self.stack.template, self.loss_cfg

        def member(p, xi, yi):
            logits = functional_call(template, dict(zip(names, p)), (xi,)).float()
            loss = F.cross_entropy(logits, yi, label_smoothing=cfg.label_smoothing)
            total = loss + cfg.z_loss * z_penalty(logits) if cfg.z_loss > 0 else loss
            return total, loss, logits

        return vmap(member)(params, x, y)

    def step(self, active: List[Trainer], batches: List[tuple]) -> None:
        """Each active member's faults on its own batch, one forward/backward for all, then each
        member's own update on its views (``StepEngine.update``)."""
        xs, ys, faults = [], [], []
        for m, (x, y) in zip(active, batches):
            x, y, fault = m.engine.faults.apply(m.engine.step_count, x, y)
            xs.append(x), ys.append(y), faults.append(fault)
        leaves = [w.detach().requires_grad_() for w in self.stack.params]  # aliases of the stacked storage
        totals, losses, logits = self._losses(leaves, torch.stack(xs), torch.stack(ys))
        for g, new in zip(self.stack.grads, torch.autograd.grad(totals.sum(), leaves)):
            g.copy_(new)  # the members' .grad views: what zero_grad + backward leave in an individual run
        losses, logits = losses.detach(), logits.detach()
        for i, m in enumerate(active):
            m.engine.update(losses[i], logits[i], ys[i], len(ys[i]), faults[i])

    # ------------------------------------------------------------ the loop (Trainer.fit, member by member)
    def fit(self) -> List[TrainResult]:
        runs = {}
        try:
            for m in self.members:
                runs[id(m)] = m.start_run()
                runs[id(m)].set_tags({"gradlab.ensemble": str(len(self.members))})
            with StopSignal() as stop:
                self._loop(runs, stop)
        except BaseException:
            for m in self.members:
                if id(m) in runs and self._index(m) not in self.results:
                    runs[id(m)].close_after_error("FAILED")
            raise
        finally:
            for m in self.members:
                if m.bar is not None:
                    m.bar.close()
        return [self.results[i] for i in range(len(self.members))]

    def _index(self, m: Trainer) -> int:
        return next(i for i, x in enumerate(self.members) if x is m)

    def _loop(self, runs: dict, stop: StopSignal) -> None:
        active = [m for m in self.members if not m.done]
        for m in [m for m in self.members if m.done]:
            self._end(m, runs[id(m)])
        self.stack.build(active)
        for m in active:
            if m.snapshots.due(m.engine.step_count):
                m.snapshots.take(m.engine, m.order)
        while active:
            iters = [m.order.batches(m.train_data) for m in active]
            while active:
                t0 = time.perf_counter()
                batches = [next(it, None) for it in iters]
                if any(b is None for b in batches):  # the members' epochs are equally long
                    break
                measured = [m.foresight.before_step(m.engine.step_count, x, y) for m, (x, y) in zip(active, batches)]
                self.step(active, batches)
                for m, meas in zip(active, measured):
                    diverging = m.diverging.raised(m.engine.pipeline.diverged)
                    if m.engine.recorder.full or meas or diverging:
                        m.flush(runs[id(m)])
                share = (time.perf_counter() - t0) / len(active)
                for m in active:
                    m.train_seconds += share
                if stop.signum:
                    self._stop(active, runs, stop.signum)
                leaving = [m for m in active if m.done]
                if leaving:
                    keep = [(m, it) for m, it in zip(active, iters) if not m.done]
                    for m in leaving:
                        self._end(m, runs[id(m)])
                    active, iters = [m for m, _ in keep], [it for _, it in keep]
                    if active:
                        self.stack.build(active)
            for m in list(active):
                t0 = time.perf_counter()
                m.flush(runs[id(m)])
                if m.order.epoch_done and m.divergence.step is None:
                    m.end_epoch(runs[id(m)])
                m.train_seconds += time.perf_counter() - t0
            leaving = [m for m in active if m.done]
            for m in leaving:
                self._end(m, runs[id(m)], flushed=True)
            if leaving:
                active = [m for m in active if not m.done]
                if active:
                    self.stack.build(active)

    def _end(self, m: Trainer, run, flushed: bool = False) -> None:
        """What ``Trainer.fit`` does after its loop: the last flush, the epoch's validation if the
        epoch just ended, then ``finish`` (summary, tags, plots, checkpoint, run closed)."""
        Stack.release(m)
        if not flushed:
            m.flush(run)
            if m.order.epoch_done and m.divergence.step is None:
                m.end_epoch(run)
        self.results[self._index(m)] = m.finish(run)

    def _stop(self, active: List[Trainer], runs: dict, signum: int) -> None:
        """A signal: every active member saves and is closed KILLED (``Trainer.stop``), then the process exits."""
        for m in active:
            Stack.release(m)
            try:
                m.stop(runs[id(m)], signum, time.perf_counter())
            except SystemExit:
                self.results[self._index(m)] = None  # closed: not to be marked FAILED
        raise SystemExit(128 + signum)


def _own_model_state(member: Trainer) -> None:
    """A member's state_dict (checkpoints, forensics snapshots) with its own copies of the weights:
    a view's torch.save / deepcopy would carry the whole stacked storage."""
    engine = member.engine
    state_dict = engine.state_dict

    def owned() -> dict:
        state = state_dict()
        state["model"] = {k: v.clone() for k, v in state["model"].items()}
        return state

    engine.state_dict = owned


# ---------------------------------------------------------------- the matrix's unit of work
def _finite(x: Optional[float]) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None


def run_cell(combos: Sequence[Any], spec_overrides: Sequence[str], experiment: str, parent_run_id: str, uri: str,
             workdir: str, threads: Optional[int] = None) -> List[Dict]:
    """One unit of a matrix (``gradlab.matrix.Combination``s: a cell's seeds, or a scenario's stackable
    remedies) as one ensemble, each member logging its test-set result before its run closes; the
    same records as ``gradlab.matrix.run_one`` gives, one per run. Runs that cannot be stacked
    (``unsupported``) train one at a time, as without ``matrix.ensemble``; their records say why
    (``ensemble``). Never raises for a failed run."""
    from .matrix import run_one
    from .runs import child_config

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out_dirs = [Path(workdir) / f"run{c.index:03d}" for c in combos]
    records = [{"index": c.index, "scenario": c.scenario.name, "remedy": c.remedy.name, "remedy_kind": c.remedy.kind,
                "seed": c.seed, "overrides": [*c.overrides, *spec_overrides]} for c in combos]
    try:
        cfgs = [child_config(rec["overrides"], out, parent_run_id, uri, experiment,
                             run_name=f"{c.scenario.name}-{c.remedy.name}-s{c.seed}",
                             tags={"matrix": parent_run_id, "matrix/cell": c.index, **c.remedy.tags()})
                for c, rec, out in zip(combos, records, out_dirs)]
        reason = unsupported(cfgs[0]) if len(cfgs) > 1 else "one run"
    except Exception as exc:  # noqa: BLE001 - a config error: run_one records it per run
        cfgs, reason = [], f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    if reason:
        out = [run_one(c, spec_overrides, experiment, parent_run_id, uri, workdir) for c in combos]
        for rec in out:
            rec["ensemble"] = f"individual runs ({reason})"
        return out
    try:
        ensemble = Ensemble(cfgs, out_dirs, test=True)
        results = ensemble.fit()
    except Exception as exc:  # noqa: BLE001 - one broken cell must not lose the other cells
        for rec in records:
            rec.update(status="FAILED", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                       wall_seconds=round((time.perf_counter() - t0) / len(records), 3))
        return records
    for rec, result in zip(records, results):
        rec.update(run_id=result.run_id, steps=result.steps, diverged=result.diverged,
                   diverged_at_step=result.diverged_at_step, explosion_step=result.explosion_step,
                   val_accuracy=_finite(result.val_accuracy), test_accuracy=_finite(result.test_accuracy),
                   ensemble=len(records), status="FINISHED")
    wall = time.perf_counter() - t0
    for rec in records:
        rec["wall_seconds"] = round(wall / len(records), 3)  # each member's share of the cell
    return records
