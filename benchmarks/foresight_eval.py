"""Does gradlab see it coming? The measurements behind the README's "Foresight" tables.

    python benchmarks/foresight_eval.py preflight [--seeds 0 1 2 3 4]   # preflight verdicts per config and seed
    python benchmarks/foresight_eval.py lead [--seeds 0 1 2 3 4]        # warning step vs first NaN, diverging presets
    python benchmarks/foresight_eval.py lead --scenarios spike_bad_batch # ... or any experiment presets
    python benchmarks/foresight_eval.py healthy [--seeds 0]             # the false-alarm suite: no warning expected
    ... [--device cpu]                                                  # trainer.device of every run

Every training run is a child of one MLflow parent run (experiment ``gradlab-foresight``), with
the matrix's pinned arithmetic (``trainer.deterministic=true trainer.threads=1``). Prints Markdown.
``--dump FILE`` also writes each run's loss, norm and gauge series as JSON (for calibrating the
warning's thresholds offline).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


from gradlab.foresight import FORECAST_KEY, HEALTHY_SUITE  # noqa: E402

PINNED = ["trainer.deterministic=true", "trainer.threads=1", "trainer.progress=false", "telemetry.plots=false"]
PRESETS = ["explode_deep_mlp", "explode_high_lr", "explode_rnn"]
DIVERGING = [*PRESETS, "spike_lr"]  # the lead-time table: every preset that diverges, incl. a mid-training spike
PREFLIGHT_CONFIGS = [["model=mlp"], ["model=cnn"]] + [[f"experiment={p}"] for p in PRESETS] + \
    [[f"experiment={p}", "stabilizer=clip"] for p in PRESETS]


def preflight_table(seeds) -> None:
    from gradlab.config import compose_config
    from gradlab.preflight import preflight
    from gradlab.training import Trainer

    print("| config | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for overrides in PREFLIGHT_CONFIGS:
        cells = []
        for seed in seeds:
            cfg = compose_config([*overrides, f"seed={seed}", *PINNED])
            report = preflight(Trainer(cfg, Path(tempfile.mkdtemp())))
            cells.append(f"{report.verdict} (r={report.ratio:.3g}"
                         + (f", rec={report.recurrent:.3g})" if report.recurrent is not None else ")"))
        print(f"| `{' '.join(overrides)}` | " + " | ".join(cells) + " |", flush=True)


def train_all(configs, seeds, dump):
    from gradlab.runs import ParentRun, child_config
    from gradlab.training import Trainer

    out = Path(tempfile.mkdtemp(prefix="foresight-"))
    rows, series = [], {}
    with ParentRun(None, "gradlab-foresight", "foresight-eval", "foresight", {"seeds": str(seeds)}) as parent:
        for overrides in configs:
            for seed in seeds:
                name = f"{' '.join(overrides)} s{seed}"
                cfg = child_config([*overrides, f"seed={seed}", *PINNED], out / str(len(rows)), parent.run_id,
                                   parent.uri, parent.experiment)
                trainer = Trainer(cfg, out / str(len(rows)))
                r = trainer.fit()
                w = trainer.foresight.watch.warning
                ratios = [v for k, v, _ in trainer.history.sparse if k == "sharpness/stability_ratio"]
                forecasts = [v for k, v, _ in trainer.history.sparse if k == FORECAST_KEY]
                tags = parent_client(parent).get_run(r.run_id).data.tags
                later = later_warning(trainer)
                rows.append({"config": " ".join(overrides), "seed": seed, "steps": r.steps,
                             "later_warning": later.step if later else None,
                             "first_tensor": tags.get("nonfinite/first_tensor", ""),
                             "nonfinite_kind": tags.get("nonfinite/kind", ""),
                             "finite_with": tags.get("forensics/finite_with", ""),
                             "replay_exact": tags.get("forensics/replay_exact", ""),
                             "diverged_at": r.diverged_at_step, "explosion": r.explosion_step,
                             "warning": w.step if w else None, "reason": w.reason if w else "",
                             "layer": w.layer if w else "", "val_accuracy": r.val_accuracy,
                             "max_ratio": max(ratios) if ratios else None,
                             "max_forecast": max(forecasts) if forecasts else None, "run_id": r.run_id})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                h = trainer.history
                series[name] = {"loss": h.column("train/loss").tolist(), "norm": h.column("grad/norm").tolist(),
                                "sparse": h.sparse}
    if dump:
        Path(dump).write_text(json.dumps(series))
    return rows


def parent_client(parent):
    return parent.logger.client


def later_warning(trainer):
    """The warning this run would have had without its step-0 measurement: what the in-training
    signals alone see (the gauge's later measurements, the loss)."""
    from gradlab.foresight import WarningWatch
    from gradlab.preflight import bounded_by

    later = [m for m in trainer.foresight.measured if m[0] > 0]
    watch = WarningWatch(trainer.cfg, trainer.engine.recorder.layers, bounded_by(trainer.engine.stack))
    return watch.update(trainer.history, later)


def lead_table(seeds, dump, scenarios=DIVERGING) -> None:
    rows = train_all([[f"experiment={p}"] for p in scenarios], seeds, dump)
    print("| scenario | seed | warning step | first NaN step | lead (share of steps to divergence) | explosion flag | "
          "reason | without the step-0 gauge | first non-finite tensor | counterfactual: finite with |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    leads = {}
    for r in rows:
        d, w = r["diverged_at"], r["warning"]
        lead = (d - w) / d if d and w is not None and w <= d else (1.0 if d == 0 and w == 0 else 0.0)
        if d is not None:
            leads.setdefault(r["config"], []).append(lead)
        lw = r["later_warning"]
        later = f"{lw} ({(d - lw) / d:.0%})" if lw is not None and d else str(lw) if lw is not None else "none"
        share = f"{lead:.0%}" if d is not None else f"n/a (no NaN in {r['steps']} steps)"
        print(f"| {r['config']} | {r['seed']} | {w} | {d} | {share} | {r['explosion']} | {r['reason']} | {later} | "
              f"{r['first_tensor']} ({r['nonfinite_kind']}) | {r['finite_with']} |")
    for config, values in leads.items():
        print(f"\n{config}: median lead {statistics.median(values):.0%} over {len(values)} seeds")


def healthy_table(seeds, dump) -> None:
    rows = train_all(HEALTHY_SUITE, seeds, dump)
    print("| config | seed | steps | warning | diverged | explosion flag | max stability ratio | max forecast ratio | "
          "val accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio, ahead = (f"{r[k]:.3g}" if r[k] is not None else "-" for k in ("max_ratio", "max_forecast"))
        print(f"| `{r['config']}` | {r['seed']} | {r['steps']} | {r['warning'] if r['warning'] is not None else 'none'}"
              f" | {r['diverged_at'] is not None} | {r['explosion']} | {ratio} | {ahead} | {r['val_accuracy']:.4f} |")
    warned = [r for r in rows if r["warning"] is not None]
    print(f"\n{len(warned)} warning(s) in {len(rows)} healthy runs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["preflight", "lead", "healthy"])
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--dump", default=None)
    ap.add_argument("--device", default="auto", help="trainer.device for every run (auto: CUDA when present)")
    ap.add_argument("--scenarios", nargs="+", default=DIVERGING, help="experiment presets of the lead table")
    args = ap.parse_args()
    PINNED.append(f"trainer.device={args.device}")
    if args.what == "preflight":
        preflight_table(args.seeds or [0, 1, 2, 3, 4])
    elif args.what == "lead":
        lead_table(args.seeds or [0, 1, 2, 3, 4], args.dump, args.scenarios)
    else:
        healthy_table(args.seeds or [0], args.dump)


if __name__ == "__main__":
    main()
