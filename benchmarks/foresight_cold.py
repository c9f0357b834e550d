"""The cold (first) sharpness measurement: Lanczos with few products against power iteration.

    python benchmarks/foresight_cold.py [--seeds 0 1] [--products 8 10] [--rounds 3] [--device cpu]
    python benchmarks/foresight_cold.py --gauge [--rounds 5]   # the whole first gauge measurement, mlp and cnn

On each config's first training batch at step 0 (the gauge's first measurement: the preconditioned
operator for Adam-type optimizers), from the same random start: power iteration with 20 products
(the cold start before Lanczos) and Lanczos with each ``--products``, against a reference of 200
power iterations (its sign: the top eigenvalue by magnitude, which Lanczos does not look for). Cost:
the median over ``--rounds`` interleaved rounds of each estimate's wall time (one torch thread), and
its ratio to the 20 power iterations in the same rounds. Prints Markdown.

``--gauge``: the gauge's whole cold measurement (``Gauge.measure`` with no warm start, then the flush
that reads it back: the gradient graph, the preconditioner, the products) with Lanczos against the
same with 20 power iterations, on the benchmarks' synthetic batch, interleaved rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

CONFIGS = [["model=mlp"], ["model=cnn"], ["model=cnn", "optimizer=sgd"], ["model=rnn"], ["model=lstm"],
           ["experiment=explode_deep_mlp"], ["experiment=explode_high_lr"], ["experiment=explode_rnn"]]
REFERENCE = 200


def estimates(overrides, seed: int, products, rounds: int, device: str) -> dict:
    from gradlab import sharpness
    from gradlab.config import compose_config
    from gradlab.preflight import first_batches
    from gradlab.training import Trainer

    cfg = compose_config([*overrides, f"seed={seed}", f"trainer.device={device}", "trainer.threads=1",
                          "trainer.progress=false"])
    trainer = Trainer(cfg, Path(tempfile.mkdtemp()))
    e = trainer.engine
    x, y = first_batches(trainer, 1)[0]
    params = [p for p in e.model.parameters() if p.requires_grad]
    with sharpness.native_kernels():
        grads, hvp = sharpness.loss_hvp(e.model, x, y, cfg.loss.label_smoothing)
        hvp = sharpness.scaled(hvp, sharpness.preconditioner(e.optimizer, params, cfg.optimizer,
                                                             [g.detach() ** 2 for g in grads]))
        v0 = sharpness.random_vector(grads, torch.Generator().manual_seed(seed))
        methods = {"power 20": lambda: sharpness.power_iteration(hvp, v0, 20)[0],
                   **{f"Lanczos {k}": (lambda k=k: sharpness.lanczos(hvp, v0, k)[0]) for k in products}}
        ref = float(sharpness.power_iteration(hvp, v0, REFERENCE)[0])
        values, times = {}, {name: [] for name in methods}
        for _ in range(rounds):
            for name, f in methods.items():
                t0 = time.perf_counter()
                values[name] = float(f())  # the read-back is the sync: the estimate is done
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"ref": ref, "values": values, "ms": {n: m * 1000 for n, m in med.items()},
            "ratio": {n: m / med["power 20"] for n, m in med.items()}}


def gauge_table(rounds: int, device: str) -> None:
    from bench import one_batch, trainers
    from gradlab import sharpness

    lanczos = sharpness.lanczos
    power20 = lambda hvp, v0, steps: sharpness.power_iteration(hvp, v0, 20)  # noqa: E731
    print(f"| model | cold gauge, Lanczos {sharpness.COLD_PRODUCTS} (ms) | cold gauge, 20 power iterations (ms) | "
          f"ratio (median of {rounds} rounds) |")
    print("|---|---|---|---|")
    for model in ("mlp", "cnn"):
        trainer = trainers({"f": []}, [f"model={model}", f"trainer.device={device}", "trainer.batch_size=128"])["f"]
        x, y = one_batch(trainer, 128)
        gauge = trainer.foresight.gauge

        def cold(estimate) -> float:
            sharpness.lanczos, gauge.vector = estimate, None
            t0 = time.perf_counter()
            gauge.measure(0, x, y)
            gauge.flush()
            return time.perf_counter() - t0

        try:
            cold(lanczos), cold(power20)  # warm-up
            times = {"lanczos": [], "power": []}
            for _ in range(rounds):
                times["lanczos"].append(cold(lanczos))
                times["power"].append(cold(power20))
        finally:
            sharpness.lanczos = lanczos
        ratio = statistics.median(a / b for a, b in zip(times["lanczos"], times["power"]))
        print(f"| {model} | {statistics.median(times['lanczos']) * 1000:.0f} | "
              f"{statistics.median(times['power']) * 1000:.0f} | {ratio:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--products", type=int, nargs="+", default=[8, 10])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gauge", action="store_true", help="time the whole first gauge measurement instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.gauge:
        return gauge_table(args.rounds, args.device)
    names = ["power 20", *[f"Lanczos {k}" for k in args.products]]
    print(f"| config | seed | reference ({REFERENCE} power iterations) | "
          + " | ".join(f"{n}: error, ms (x power 20)" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for overrides in CONFIGS:
        for seed in args.seeds:
            r = estimates(overrides, seed, args.products, args.rounds, args.device)
            cells = [f"{r['values'][n] / abs(r['ref']) - (1 if r['ref'] > 0 else -1):+.2%}, {r['ms'][n]:.0f} "
                     f"(x{r['ratio'][n]:.2f})" for n in names]
            print(f"| `{' '.join(overrides)}` | {seed} | {r['ref']:.5g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
