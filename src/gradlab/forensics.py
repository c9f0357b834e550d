"""Divergence forensics: what went wrong at the bad step, and what each remedy would have done there.

During a run, ``Snapshots`` keeps in memory the engine's full state (model, optimizer,
stabilizers, schedule, scaler, RNG: ``StepEngine.state_dict``) and the data order
(``EpochOrder.state_dict``) at the start and every ``forensics.snapshot_every`` steps (the
latest ``forensics.keep``). When the run diverged (or ``spike_skip`` skipped a step, or the
explosion flag fired), ``investigate``:

* replays deterministically from the last snapshot before the bad step, with probes on every
  leaf module and parameter, and finds the first tensor that became non-finite (forward
  activation, output gradient, parameter gradient, or a parameter after the update); the
  replayed steps' losses and norms are compared with the recorded ones (bit-exact on the CPU);
* attributes the bad step's batch: per-sample gradient norms (``torch.func.vmap(grad)``), the
  top-k samples as an image grid with their labels and norms;
* re-runs the run from the first exploding step with each stabilizer in the library, through
  ``AFTER`` steps past the first non-finite one: the applied norm at the start, the largest norm
  on the way, the last loss and norm, and whether it stays finite.

"The bad step" is the update that went wrong: for a divergence, the step before the first
non-finite record (its update produced the non-finite state); for a skip or an explosion
flag, the flagged step. The counterfactual does not start there but at the first exploding
step (``explosion_onset``): the damage of an explosion is done by the updates of its run-up (the
deep-MLP preset's first update already makes step 1's weights unrecoverable, so a remedy tried
at step 1 rescues nothing that it rescues from step 0). ``python src/forensics.py run_id=<id>``
runs the same from the snapshot file a run saves when it has something to investigate.
"""
from __future__ import annotations

import copy
import csv
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call, grad, vmap

from .data import MEAN, STD, EpochOrder
from .engine import StepEngine
from .models import build_model
from .registry import STABILIZERS, Schema, need
from .sharpness import native_kernels
from .telemetry import STEP_KEYS, History, detect_explosion

HISTORY_FED = 1000  # recorded steps fed to an adaptive stabilizer before its counterfactual step
AFTER = 5  # counterfactual steps past the first non-finite one (README lead table: flag to NaN 1-19 steps, median 6.5)


@dataclass
class ForensicsConfig(Schema):
    snapshot_every: int = 100  # steps between in-memory snapshots for the replay (0: none, no forensics)
    keep: int = 2  # snapshots kept besides the first one (older ones are dropped)
    top_k: int = 16  # samples in the attribution grid
    investigate: bool = True  # at the end of a run that diverged, skipped a step or exploded

    def check(self) -> None:
        need(self.snapshot_every >= 0, "snapshot_every", f"must be >= 0 (0: off), got {self.snapshot_every}")
        need(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")
        need(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")


# ---------------------------------------------------------------- snapshots
class Snapshots:
    """The run's state at its start and at the latest ``keep`` snapshot steps, in memory."""

    def __init__(self, every: int, keep: int):
        self.every = every
        self.first: Optional[dict] = None
        self.recent: deque = deque(maxlen=keep)

    @property
    def last_step(self) -> Optional[int]:
        return self.recent[-1]["step"] if self.recent else (self.first["step"] if self.first else None)

    def due(self, step: int) -> bool:
        return self.every > 0 and (self.last_step is None or step - self.last_step >= self.every)

    def take(self, engine: StepEngine, order: EpochOrder) -> None:
        """A deep copy (the state dicts alias the live tensors). Called between steps, at a flush."""
        snap = {"step": engine.step_count, "engine": copy.deepcopy(engine.state_dict()),
                "order": copy.deepcopy(order.state_dict())}
        if self.first is None:
            self.first = snap
        else:
            self.recent.append(snap)

    def before(self, step: int) -> Optional[dict]:
        """The latest snapshot taken at or before ``step``."""
        found = [s for s in [self.first, *self.recent] if s is not None and s["step"] <= step]
        return max(found, key=lambda s: s["step"]) if found else None

    def start_for(self, onset: int, bad: int) -> Optional[dict]:
        """Where the replay of a bad step starts: the latest snapshot at or before the first exploding
        step when one is kept (the counterfactual then runs from the onset itself), else the latest
        before the bad step."""
        return self.before(onset) or self.before(bad)


# ---------------------------------------------------------------- the bad step
@dataclass
class BadStep:
    step: int  # the update re-run with each remedy
    kind: str  # diverged | skipped | exploded | requested
    observed: int  # where it showed: the first non-finite record, the skip, the flag

    def to_dict(self) -> dict:
        return {"step": self.step, "kind": self.kind, "observed": self.observed}


def explosion_onset(history: History, bad: BadStep, factor: float, window: int) -> int:
    """The first exploding step of ``bad``: where the run-up the explosion flag measured began, the step
    with the smallest gradient norm in the ``window`` steps before the flag (the flag says the norm grew
    ``factor`` x from there; its update is the first of the run-up). ``bad.step`` when no flag came at
    or before the bad record, or for a requested step."""
    if bad.kind == "requested" or not history.steps:
        return bad.step
    flag = detect_explosion(history, history.layers, factor, window).step
    if flag is None or flag > bad.observed:
        return bad.step
    norms = history.column("grad/norm")
    i = history.steps.index(flag)
    before = norms[max(0, i - window):i]
    base = np.where(np.isfinite(before) & (before > 0), before, np.inf)
    return min(history.steps[max(0, i - window) + int(np.argmin(base))], bad.step) if base.size else bad.step


def find_bad_step(history: History, diverged_at: Optional[int], explosion_step: Optional[int]) -> Optional[BadStep]:
    if diverged_at is not None:
        return BadStep(max(diverged_at - 1, 0), "diverged", diverged_at)
    skipped = np.flatnonzero(history.column("grad/skipped") > 0.5)
    if skipped.size:
        step = history.steps[int(skipped[0])]
        return BadStep(step, "skipped", step)
    if explosion_step is not None:
        return BadStep(explosion_step, "exploded", explosion_step)
    return None


# ---------------------------------------------------------------- replay with probes
def _first_tensor(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out if torch.is_tensor(out) else None


class Probe:
    """Statistics of every leaf module's output and output gradient, every parameter's gradient
    and every parameter after the update, in the order they happen; remembers the first that is
    not finite. Reads values only: the replayed numbers are the run's."""

    def __init__(self, model: nn.Module):
        self.step = -1
        self.rows: List[tuple] = []  # (step, tensor, kind, rms, max_abs, finite)
        self.first: Optional[tuple] = None  # (step, tensor, kind)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        leaves = [(n, m) for n, m in model.named_modules()
                  if not any(True for _ in m.children()) and not isinstance(m, nn.Identity)]
        self.handles = [m.register_forward_hook(self._forward(n)) for n, m in leaves]
        self.handles += [p.register_post_accumulate_grad_hook(self._param_grad(n)) for n, p in self.params]

    def record(self, name: str, kind: str, t: torch.Tensor) -> None:
        t = t.detach().float()
        finite = bool(torch.isfinite(t).all())
        rms, top = (float(t.pow(2).mean().sqrt()), float(t.abs().max())) if t.numel() else (0.0, 0.0)
        self.rows.append((self.step, name, kind, rms, top, finite))
        if not finite and self.first is None:
            self.first = (self.step, name, kind)

    def _forward(self, name: str):
        def hook(module, args, out):
            t = _first_tensor(out)
            if t is None:
                return
            self.record(name, "activation", t)
            if t.requires_grad:
                t.register_hook(lambda g: self.record(name, "output gradient", g))
        return hook

    def _param_grad(self, name: str):
        return lambda p: self.record(name, "parameter gradient", p.grad)

    def after_update(self) -> None:
        for n, p in self.params:
            self.record(n, "parameter after update", p)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def build_engine(cfg, device: torch.device, n_train: int) -> tuple[StepEngine, EpochOrder]:
    """A fresh engine and data order for ``cfg``, as the run's Trainer builds them."""
    order = EpochOrder(cfg.seed, n_train, cfg.trainer.batch_size)
    total = order.total_steps(cfg.trainer.epochs, cfg.trainer.max_steps)
    model = build_model(cfg.model, cfg.data).to(device)
    return StepEngine(cfg, model, device, total, order.batches_per_epoch), order


@dataclass
class Replay:
    start: int
    states: Dict[int, dict]  # engine state before the steps asked for
    batches: Dict[int, tuple]  # (x, y, training-set indices) of those steps and of ``batch_steps``
    history: History  # the replayed steps' telemetry
    probe: Probe


def replay(cfg, snapshot: dict, data, history: History, until: int, keep: List[int], device,
           batch_steps: Sequence[int] = ()) -> Replay:
    """Steps ``snapshot['step']`` .. ``until`` again, probed; keeps the state before and the batch of
    each step in ``keep``, and the batch of each in ``batch_steps``. Epoch ends replay the recorded
    validation loss into the schedule."""
    engine, order = build_engine(cfg, device, len(data))
    engine.load_state_dict(copy.deepcopy(snapshot["engine"]))  # the optimizer would alias the snapshot
    order.load_state_dict(copy.deepcopy(snapshot["order"]))
    val_loss = {s: v for k, v, s in history.epoch_points if k == "val/loss"}
    probe = Probe(engine.model)
    states, batches, batch_steps = {}, {}, set(batch_steps) | set(keep)
    try:
        while engine.step_count <= until:
            for x, y in order.batches(data):
                step = engine.step_count
                if step in keep:
                    states[step] = copy.deepcopy(engine.state_dict())
                if step in batch_steps:
                    bs = cfg.trainer.batch_size
                    batches[step] = (x, y, order.perm[(order.batch - 1) * bs: order.batch * bs].tolist())
                probe.step = step
                engine.step(x, y)
                probe.after_update()
                if engine.recorder.full:
                    engine.recorder.flush()
                if engine.step_count > until:
                    break
            if order.epoch_done:
                if engine.step_count in val_loss:
                    engine.schedule.epoch_end(val_loss[engine.step_count])
                order.next_epoch()
    finally:
        probe.close()
    engine.recorder.flush()
    return Replay(snapshot["step"], states, batches, engine.recorder.history, probe)


def overflowed_norm(rep: Replay) -> Optional[tuple]:
    """When every tensor stayed finite but a step's recorded gradient norm did not, the norm itself
    overflowed: float32 squares of gradients past ~1.8e19 exceed its range. Names the parameter with
    the largest gradient at that step (step, tensor, kind), else None."""
    rows = np.concatenate(rep.history.rows) if rep.history.rows else np.zeros((0, len(STEP_KEYS)))
    bad = [s for s, row in zip(rep.history.steps, rows) if not np.isfinite(row[STEP_KEYS.index("grad/norm")])]
    grads = [r for r in rep.probe.rows if bad and r[0] == bad[0] and r[2] == "parameter gradient"]
    if not grads:
        return None
    return bad[0], max(grads, key=lambda r: r[4])[1], "gradient norm overflow (every tensor finite)"


def replay_matches(recorded: History, replayed: History) -> bool:
    """Whether every replayed step's loss and gradient norm equal the recorded ones exactly."""
    rec = dict(zip(recorded.steps, np.concatenate(recorded.rows))) if recorded.rows else {}
    cols = [STEP_KEYS.index("train/loss"), STEP_KEYS.index("grad/norm")]
    rows = np.concatenate(replayed.rows) if replayed.rows else np.zeros((0, len(STEP_KEYS)))
    pairs = [(rec[s][cols], row[cols]) for s, row in zip(replayed.steps, rows) if s in rec]
    return bool(pairs) and all(np.array_equal(a, b, equal_nan=True) for a, b in pairs)


# ---------------------------------------------------------------- attribution
def per_sample_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
                          chunk: int = 16) -> torch.Tensor:
    """||d loss_i / d theta|| of every sample, with ``torch.func.vmap(grad)`` in chunks (memory: chunk x
    parameters). nn.RNN does not run under vmap (its hidden-state init, torch 2.14): then one grad per sample."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def sample_loss(p, xi, yi):
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits.float(), yi.unsqueeze(0), label_smoothing=label_smoothing)

    def norms(g: Dict[str, torch.Tensor], batched: bool) -> torch.Tensor:
        sq = [t.flatten(1).pow(2).sum(1) if batched else t.pow(2).sum() for t in g.values()]
        return torch.stack(sq).sum(0).sqrt()

    try:
        per_chunk = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        return torch.cat([norms(per_chunk(params, x[i:i + chunk], y[i:i + chunk]), True)
                          for i in range(0, len(x), chunk)])
    except (RuntimeError, NotImplementedError):
        return torch.stack([norms(grad(sample_loss)(params, xi, yi), False) for xi, yi in zip(x, y)])


def attribute(cfg, state: dict, batch: tuple, device, top_k: int, out_dir: Path, title: str) -> List[Path]:
    """Per-sample gradient norms of the bad step's batch at the state before it (eval mode: dropout off,
    BatchNorm on its running statistics): a CSV of every sample, the top-k as an image grid."""
    from . import plots

    x, y, index = batch
    model = build_model(cfg.model, cfg.data).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    with native_kernels():  # cuDNN's RNN does not run under torch.func
        norms = per_sample_grad_norms(model, x, y, cfg.loss.label_smoothing).detach().cpu().double().numpy()
    with torch.no_grad():
        logits = model(x).float()
        losses = F.cross_entropy(logits, y, reduction="none").cpu().double().numpy()
        preds = logits.argmax(1).cpu().numpy()
    share = norms / np.nansum(np.where(np.isfinite(norms), norms, 0)) if np.isfinite(norms).any() else norms
    order = np.argsort(np.where(np.isnan(norms), -np.inf, norms))[::-1]
    rows = [{"rank": r + 1, "batch_position": int(i), "train_index": index[i], "label": int(y[i]),
             "prediction": int(preds[i]), "loss": losses[i], "grad_norm": norms[i], "share": share[i]}
            for r, i in enumerate(order)]
    csv_path = write_csv(out_dir / "attribution.csv", rows)
    top = order[:top_k]
    images = (x[torch.as_tensor(top.copy(), device=x.device)].float() * STD + MEAN).squeeze(1).cpu().numpy()
    captions = [f"#{r + 1} label {int(y[i])} pred {int(preds[i])}\n|g| {norms[i]:.3g} ({share[i]:.1%})"
                for r, i in enumerate(top)]
    return [csv_path, plots.sample_grid(images, captions, out_dir / "attribution.png", title)]


# ---------------------------------------------------------------- counterfactual
def candidates(cfg) -> List[tuple]:
    """(label, selection) for each stabilizer in the library alone, plus the run's own selection when
    it combines several. A run's warmup stays in every candidate (it is part of its schedule)."""
    own = [e.name for e in STABILIZERS if e.name != "none" and cfg.stabilizer.get(e.name) is not None]
    base = ["warmup"] if "warmup" in own else []
    out = [(name, sorted(set(base + ([name] if name != "none" else [])), key=STABILIZERS.names().index))
           for name in STABILIZERS.names()]
    if len(own) > 1 and own not in [sel for _, sel in out]:
        out.append(("+".join(own) + " (this run)", own))
    return out


def candidate_config(cfg, selection: List[str]):
    """``cfg`` with exactly ``selection`` selected (the run's own settings where it had the option,
    else the option's defaults)."""
    c = copy.deepcopy(cfg)
    for entry in STABILIZERS:
        if entry.name == "none":
            continue
        keep = entry.name in selection
        c.stabilizer[entry.name] = (cfg.stabilizer[entry.name] if cfg.stabilizer.get(entry.name) is not None
                                    else OmegaConf.structured(entry.schema)) if keep else None
    return c


FED_BY_GLOBAL_NORMS = ("autoclip", "zclip", "spike_skip")  # their history is of global norms / losses only


def feed_history(engine: StepEngine, fresh: List[str], history: History, step: int) -> None:
    """Give the adaptive stabilizers the run did not have the recorded losses and raw norms of the
    steps before ``step`` (at most HISTORY_FED), as if they had watched the run. Only those whose
    history is of global values (FED_BY_GLOBAL_NORMS): AdaGC's is per tensor and SPAM's is the
    optimizer's moments, which the record does not hold; they start from their warm-up."""
    from .stabilizers import GradStep

    keep = [s for s in engine.stack.stabilizers if s.name in fresh and s.name in FED_BY_GLOBAL_NORMS]
    if not keep:
        return
    rows = np.concatenate(history.rows) if history.rows else np.zeros((0, len(STEP_KEYS)))
    before = [i for i, s in enumerate(history.steps) if s < step][-HISTORY_FED:]
    dummy = [torch.zeros(1, device=engine.device)]
    for i in before:
        loss = torch.tensor(rows[i, STEP_KEYS.index("train/loss")], dtype=torch.float32, device=engine.device)
        norm = torch.tensor(rows[i, STEP_KEYS.index("grad/norm")], dtype=torch.float32, device=engine.device)
        for s in keep:
            s.apply(GradStep(loss=loss, grads=dummy, per_tensor=[norm], pre_norm=norm, norm=norm))


def counterfactual(cfg, state: dict, start: int, end: int, batches: Dict[int, tuple], history: History, device,
                   n_train: int, val_loss: Optional[Dict[int, float]] = None) -> List[dict]:
    """The run re-run from ``state`` (the state before ``start``) through step ``end`` under each candidate
    stabilizer selection: at ``start`` the raw and applied norm; on the way the steps skipped, the largest
    raw norm and the first non-finite step; at the end the loss and norm; whether it all stayed finite.
    Epoch ends on the way feed the recorded validation loss (``val_loss``: step -> loss) to the schedule."""
    own = [e.name for e in STABILIZERS if cfg.stabilizer.get(e.name) is not None]
    col = {k: STEP_KEYS.index(k) for k in STEP_KEYS}
    rows = []
    for label, selection in candidates(cfg):
        warmup_added = "warmup" in selection and "warmup" not in own
        c = candidate_config(cfg, [s for s in selection if not warmup_added or s != "warmup"])
        engine, _ = build_engine(c, device, n_train)
        engine.load_state_dict(copy.deepcopy(state))
        feed_history(engine, [s for s in selection if s not in own], history, start)
        steps = 0  # the steps each row ran: a run that goes non-finite is stopped there
        for step in range(start, end + 1):
            if warmup_added:  # warmup from the run's start: lr x (t+1)/N at step t (a factor, as the schedule's)
                n = OmegaConf.structured(STABILIZERS["warmup"].schema).steps
                factor = min(1.0, (step + 1) / n) / (min(1.0, step / n) if step > start else 1.0)
                for g in engine.optimizer.param_groups:
                    g["lr"] *= factor
            engine.step(*batches[step][:2])
            steps += 1
            if val_loss and engine.step_count in val_loss:
                engine.schedule.epoch_end(val_loss[engine.step_count])
            if engine.recorder.full:
                engine.recorder.flush()
            if step < end and not all(bool(torch.isfinite(p).all()) for p in engine.model.parameters()):
                break  # the rest would be NaN: the verdict is in
        weights_finite = all(bool(torch.isfinite(p).all()) for p in engine.model.parameters())
        engine.recorder.flush()
        r = np.concatenate(engine.recorder.history.rows)[-steps:]
        losses, norms = r[:, col["train/loss"]], r[:, col["grad/norm"]]
        bad = np.flatnonzero(~(np.isfinite(losses) & np.isfinite(norms)))
        first_bad = start + int(bad[0]) if bad.size else (start + steps if not weights_finite else None)
        rows.append({"remedy": label, "from_step": start, "to_step": end,
                     "raw_norm": r[0, col["grad/norm"]], "applied_norm": r[0, col["grad/norm_after"]],
                     "skipped_steps": int((r[:, col["grad/skipped"]] > 0.5).sum()),
                     "max_norm": float(np.max(np.where(np.isnan(norms), np.inf, norms))),
                     "first_nonfinite": "" if first_bad is None else first_bad,
                     "last_loss": losses[-1], "last_norm": norms[-1],
                     "stays_finite": first_bad is None})
    return rows


# ---------------------------------------------------------------- the investigation
@dataclass
class Findings:
    bad: BadStep
    snapshot_step: int
    first_tensor: Optional[tuple]  # (step, tensor name, kind), None when everything stayed finite
    replay_exact: bool
    counterfactual: List[dict]
    onset: int  # the first exploding step (explosion_onset)
    artifacts: List[Path] = field(default_factory=list)

    @property
    def span(self) -> tuple[int, int]:
        """The steps the counterfactual ran: from the onset (or the snapshot after it) through AFTER past the bad record."""
        row = self.counterfactual[0] if self.counterfactual else {"from_step": self.bad.step, "to_step": self.bad.step}
        return row["from_step"], row["to_step"]

    def tags(self) -> Dict[str, str]:
        tags = {"forensics/kind": self.bad.kind, "forensics/step": str(self.bad.step),
                "forensics/observed_step": str(self.bad.observed), "forensics/replayed_from": str(self.snapshot_step),
                "forensics/replay_exact": str(self.replay_exact).lower(), "forensics/onset": str(self.onset),
                "forensics/counterfactual_from": str(self.span[0]), "forensics/counterfactual_to": str(self.span[1]),
                "forensics/finite_with": ",".join(r["remedy"] for r in self.counterfactual if r["stays_finite"])
                or "nothing"}
        if self.first_tensor is not None:
            step, name, kind = self.first_tensor
            tags.update({"nonfinite/first_tensor": name, "nonfinite/kind": kind, "nonfinite/step": str(step)})
        return tags

    def summary(self) -> str:
        first = ("everything stayed finite" if self.first_tensor is None else
                 "first non-finite tensor: {1} ({2}) at step {0}".format(*self.first_tensor))
        finite = [r["remedy"] for r in self.counterfactual if r["stays_finite"]]
        start, end = self.span
        since = f"the first exploding step {self.onset}" + (f", snapshot {start}" if start != self.onset else "")
        return (f"{self.bad.kind} at step {self.bad.observed}; replayed from step {self.snapshot_step} "
                f"({'bit-exact' if self.replay_exact else 'NOT bit-exact'}); {first}; re-running steps "
                f"{start}-{end} ({since}), finite through step {end} with: {', '.join(finite) or 'nothing'}")


def write_csv(path: Path, rows: List[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def counterfactual_markdown(rows: List[dict]) -> str:
    start, end = (rows[0]["from_step"], rows[0]["to_step"]) if rows else (0, 0)
    head = (f"What each remedy would have done from step {start} through step {end} (re-run from the same state "
            f"with it on):\n\n| remedy | raw norm at {start} | applied norm at {start} | steps skipped | largest raw "
            f"norm | first non-finite step | loss at {end} | grad norm at {end} | stays finite |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['remedy']} | {r['raw_norm']:.4g} | {r['applied_norm']:.4g} | {r['skipped_steps']} | "
             f"{r['max_norm']:.4g} | {r['first_nonfinite'] if r['first_nonfinite'] != '' else '-'} | "
             f"{r['last_loss']:.4g} | {r['last_norm']:.4g} | {'yes' if r['stays_finite'] else 'NO'} |" for r in rows]
    return "\n".join([head, *lines]) + "\n"


def investigate(cfg, snapshot: dict, history: History, bad: BadStep, data, device, out_dir: Path,
                top_k: int = 16, title: str = "") -> Findings:
    """Replay, attribution and counterfactual for ``bad`` from ``snapshot`` (its step <= bad.step);
    the artifacts go to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onset = explosion_onset(history, bad, cfg.telemetry.explosion_factor, cfg.telemetry.explosion_window)
    start = max(onset, snapshot["step"])  # a replay cannot start before its snapshot
    last = EpochOrder(cfg.seed, len(data), cfg.trainer.batch_size).total_steps(cfg.trainer.epochs,
                                                                              cfg.trainer.max_steps) - 1
    end = min(max(bad.observed, bad.step + 1) + AFTER, last)
    rep = replay(cfg, snapshot, data, history, end, [start, bad.step], device, range(start, end + 1))
    stats = [{"step": s, "tensor": n, "kind": k, "rms": rms, "max_abs": top, "finite": fin}
             for s, n, k, rms, top, fin in rep.probe.rows]
    val_loss = {s: v for k, v, s in history.epoch_points if k == "val/loss"}
    rows = counterfactual(cfg, rep.states[start], start, end, rep.batches, history, device, len(data), val_loss)
    first = rep.probe.first or overflowed_norm(rep)
    findings = Findings(bad, snapshot["step"], first, replay_matches(history, rep.history), rows, onset)
    findings.artifacts += [write_csv(out_dir / "layer_stats.csv", stats), write_csv(out_dir / "counterfactual.csv", rows)]
    (out_dir / "counterfactual.md").write_text(counterfactual_markdown(rows))
    findings.artifacts.append(out_dir / "counterfactual.md")
    findings.artifacts += attribute(cfg, rep.states[bad.step], rep.batches[bad.step], device, top_k, out_dir,
                                    f"{title} step {bad.step}: top {top_k} samples by gradient norm".strip())
    (out_dir / "summary.txt").write_text(findings.summary() + "\n")
    findings.artifacts.append(out_dir / "summary.txt")
    return findings


# ---------------------------------------------------------------- after the fact (src/forensics.py)
def snapshot_file(client, run, out_dir: Path) -> str:
    """The file a replay of ``run`` starts from: the snapshot it saved (its tag, else its artifact),
    else its checkpoint (any checkpoint before the bad step is a snapshot)."""
    from .errors import ConfigError

    tags = run.data.tags
    for key in ("forensics/snapshot", "gradlab.checkpoint"):
        if tags.get(key) and Path(tags[key]).is_file():
            return tags[key]
    try:
        return client.download_artifacts(run.info.run_id, "forensics/snapshot.pt", str(out_dir))
    except Exception:  # noqa: BLE001 - any failure means the same: the run kept no snapshot
        raise ConfigError("run_id", f"run {run.info.run_id} kept no snapshot or checkpoint to replay from "
                                    "(give snapshot=<file>)") from None


def after_the_fact(args, out_dir: Path) -> Findings:
    """Investigate from a saved snapshot (``args``: gradlab.config.ForensicsRunConfig); logs into the run
    when ``args.run_id`` is given."""
    from mlflow.exceptions import MlflowException

    from . import checkpoint
    from .config import config_from_dict, resolve_device
    from .data import DeviceData, load_splits
    from .errors import ConfigError
    from .tracking import RunLogger, ensure_store, run_name, tracking_uri
    from .training import seed_everything

    device, logger, path = resolve_device(args.device), None, args.snapshot
    if args.run_id:
        client = ensure_store(tracking_uri(args.tracking_uri))
        try:
            run = client.get_run(args.run_id)
        except MlflowException:
            raise ConfigError("run_id", f"no run {args.run_id} in {client.tracking_uri}") from None
        logger = RunLogger(client, args.run_id)
        path = path or snapshot_file(client, run, out_dir)
    state = checkpoint.load(path, device, "snapshot")
    cfg = config_from_dict(state["config"])
    if args.step is not None:
        bad = BadStep(args.step, "requested", args.step)
    elif state.get("forensics"):
        bad = BadStep(**state["forensics"])
    else:
        raise ConfigError("step", f"{path} names no bad step: give step=<n>")
    if state["engine"]["step"] > bad.step:
        raise ConfigError("step", f"{path} holds the state at step {state['engine']['step']}, after step {bad.step}: "
                                  "nothing to replay from")
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.seed, cfg.trainer.deterministic)  # the flags; the RNG itself comes from the snapshot
    splits = load_splits(cfg.data)
    if splits["checksum"] != state["data_checksum"]:
        raise ConfigError("snapshot", f"{path} was trained on data {state['data_checksum']}, the data here is "
                                      f"{splits['checksum']}")
    history = History()
    history.load_state_dict(state["history"])
    snap = {"step": state["engine"]["step"], "engine": state["engine"], "order": state["order"]}
    data = DeviceData(splits["train_x"], splits["train_y"], device)
    findings = investigate(cfg, snap, history, bad, data, device, Path(out_dir) / "forensics", args.top_k,
                           run_name(cfg))
    if logger is not None:
        logger.set_tags(findings.tags())
        for artifact in findings.artifacts:
            logger.log_artifact(artifact, "forensics")
    return findings
