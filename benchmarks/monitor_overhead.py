"""What GradientMonitor costs in a user's own loop, measured side by side in one run.

    python benchmarks/monitor_overhead.py [--models mlp cnn] [--steps 40] [--rounds 7] [--device auto]

The loop is a plain PyTorch one (forward, cross-entropy, backward, Adam step) on gradlab's
models and synthetic batches. Variants: nothing else (`bare`), torch's `clip_grad_norm_`, and
`monitor.step(loss)` with no stabilizer (telemetry only) or with `clip` (MLflow off; the
once-per-`log_every` host copy included). Each variant has its own model and optimizer; the
rounds interleave them, and the table gives the median over rounds of (variant / bare) step time.
"""
from __future__ import annotations

import copy
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from gradlab.config import register_configs, resolve_device  # noqa: E402
from gradlab.models import build_model  # noqa: E402
from gradlab.monitor import GradientMonitor  # noqa: E402
from bench import arguments, interleaved, median_ratios  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")
VARIANTS = ["bare", "clip_grad_norm_", "monitor (telemetry only)", "monitor (clip)"]


def make_step(variant: str, model, x, y, out_dir: Path):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = None
    if variant.startswith("monitor"):
        monitor = GradientMonitor(model, optimizer, ["clip"] if "clip" in variant else None, tracking=False,
                                  out_dir=out_dir, telemetry={"plots": False})

    def step():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if variant == "clip_grad_norm_":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        if monitor is not None:
            monitor.step(loss)
        optimizer.step()

    return step


def main() -> None:
    args = arguments(__doc__, steps=40, rounds=7)
    register_configs()
    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    rows = []
    with initialize_config_dir(CONF, version_base="1.3"):
        for name in args.models:
            cfg = compose("config", overrides=[f"model={name}", "data=synthetic"])
            model = build_model(cfg.model, cfg.data).to(device)
            steps = {v: make_step(v, copy.deepcopy(model), x, y, tmp / name / str(i)) for i, v in enumerate(VARIANTS)}
            for step in steps.values():  # warm up: allocator, optimizer state
                for _ in range(10):
                    step()
            runs = {v: (lambda step=step: [step() for _ in range(args.steps)]) for v, step in steps.items()}
            times = interleaved(runs, args.rounds, device)
            rows.append((name, statistics.median(times["bare"]) / args.steps * 1000, median_ratios(times, "bare")))
    print(f"device: {device}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps\n")
    print("| variant | " + " | ".join(f"{m} (bare: {ms:.2f} ms/step)" for m, ms, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for v in VARIANTS[1:]:
        print(f"| {v} | " + " | ".join(f"{r[v]:.3f}x" for _, _, r in rows) + " |")


if __name__ == "__main__":
    main()
