"""How many metric points per second an MLflow tracking server takes from gradlab's logger.

    python benchmarks/tracking_throughput.py                       # a throwaway PostgreSQL + mlflow server
    python benchmarks/tracking_throughput.py --uri http://host:5000 --writers 1 4 16

Each writer is a process that does what a training run does to the store: opens a run
(``RunLogger.start``: tags, heartbeat), then logs ``--steps`` steps of the per-step series
(``STEP_METRICS`` + lr: 7 points a step) in flushes of ``telemetry.log_every`` steps, batched and
asynchronous as in training, and closes the run (waiting for every batch). All writers start
together; the figure is all points stored / wall time of the slowest writer. Every run is then
read back and must hold exactly ``--steps`` grad/norm points.
"""
import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradlab.telemetry import STEP_KEYS  # noqa: E402

KEYS = [*STEP_KEYS, "lr"]


def writer(uri: str, experiment: str, steps: int, log_every: int, barrier, out) -> None:
    from gradlab.tracking import RunLogger

    barrier.wait()
    t0 = time.perf_counter()
    run = RunLogger.start(uri, experiment, f"writer-{mp.current_process().name}", {"bench": "1"})
    for start in range(0, steps, log_every):
        points = [(k, 0.5 + step * 1e-3, step) for step in range(start, min(start + log_every, steps)) for k in KEYS]
        run.log_points(points, int(time.time() * 1000))
    run.close()
    out.put((run.run_id, time.perf_counter() - t0))


def measure(uri: str, writers: int, steps: int, log_every: int) -> dict:
    from mlflow import MlflowClient

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(writers + 1), ctx.Queue()
    experiment = f"bench-{writers}w-{time.time():.0f}"
    procs = [ctx.Process(target=writer, args=(uri, experiment, steps, log_every, barrier, out)) for _ in range(writers)]
    for p in procs:
        p.start()
    barrier.wait()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    wall = max(seconds for _, seconds in results)
    client = MlflowClient(uri)
    for run_id, _ in results:
        assert len(client.get_metric_history(run_id, "grad/norm")) == steps, run_id
    points = writers * steps * len(KEYS)
    return {"writers": writers, "points": points, "seconds": wall, "points_per_s": points / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uri", help="a running tracking server (default: start PostgreSQL + mlflow server here)")
    p.add_argument("--writers", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=2000, help="steps each writer logs (7 points a step)")
    p.add_argument("--log-every", type=int, default=50, help="steps per flush, as telemetry.log_every")
    p.add_argument("--server-workers", type=int, default=2, help="mlflow server worker processes (own server only)")
    a = p.parse_args()
    pair, tmp = None, None
    uri = a.uri
    if uri is None:
        from gradlab.server import free_port, start_pair

        tmp = Path(tempfile.mkdtemp(prefix="gradlab-bench-"))
        tmp.chmod(0o755)
        pair = start_pair(tmp, free_port(), free_port(), workers=a.server_workers)
        uri = pair[1].uri
    try:
        print(f"| writers | points | seconds | points/s |  ({uri}, {a.steps} steps x {len(KEYS)} points per writer)")
        print("|---|---|---|---|")
        for n in a.writers:
            r = measure(uri, n, a.steps, a.log_every)
            print(f"| {r['writers']} | {r['points']} | {r['seconds']:.1f} | {r['points_per_s']:.0f} |", flush=True)
    finally:
        if pair is not None:
            pair[1].stop()
            pair[0].stop()


if __name__ == "__main__":
    main()
