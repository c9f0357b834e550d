"""Data-parallel training with the real engines: torchrun, DDP and FSDP2 on gloo (CPU).

A 2-rank run must log the same per-step history as one process with the same global batch
(relative difference <= 1e-5) for every stabilizer that reads the gradient; every rank must hold
the same telemetry, stabilizer state and (DDP) weights; and a checkpoint must resume under
another strategy and world size. One torchrun launch trains every 2-rank job
(tests/dist_worker.py); the 1-process references train here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, cli, cli_env, compose, history, in_dir, one_line_error, tiny_overrides
from gradlab.training import train

pytestmark = pytest.mark.cluster  # torchrun (make test-cluster)

STABILIZERS = {  # settings under which each one acts within 24 steps of sgd at lr 0.3
    "clip": ["stabilizer=clip", "stabilizer.clip.max_norm=0.5"],
    "agc": ["stabilizer=agc", "stabilizer.agc.clipping=0.02"],
    "zclip": ["stabilizer=zclip", "stabilizer.zclip.warmup_steps=2", "stabilizer.zclip.z_thresh=1.0"],
    "spike_skip": ["stabilizer=spike_skip", "stabilizer.spike_skip.window=8", "stabilizer.spike_skip.min_history=4",
                   "stabilizer.spike_skip.threshold=1.5"],
}
# 33 does not divide by 2 ranks (every slice is uneven); 264 images: an epoch is 8 steps, so 12 cross its end
COMMON = ["optimizer=sgd", "optimizer.lr=0.1", "trainer.batch_size=33", "data.synthetic_size=264", "telemetry.layer_every=5"]
SERIES = ["grad/norm", "grad/norm_after", "train/loss", "grad/skipped", "grad/clip_coef"]
STEPS = 12


def overrides(tmp: Path, name: str, *extra: str, steps: int = STEPS) -> list:
    return tiny_overrides(tmp, *COMMON, *extra, f"trainer.checkpoint={tmp / name}.pt", steps=steps)


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))) if len(a) else 0.0


def series(uri: str, run_id: str, key: str) -> tuple:
    h = history(uri, run_id, key)
    return [s for s, _ in h], [v for _, v in h]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The 1-process references, then one torchrun launch with 2 gloo ranks that trains every job."""
    tmp = tmp_path_factory.mktemp("dist")
    with in_dir(tmp):
        refs = {name: train(compose(overrides(tmp, f"ref-{name}", *extra)), tmp / f"ref-{name}")
                for name, extra in STABILIZERS.items()}
        half = train(compose(overrides(tmp, "half-none", *STABILIZERS["clip"], steps=STEPS // 2)), tmp / "half")
        jobs = [{"name": f"{strategy}-{name}", "overrides": overrides(tmp, f"{strategy}-{name}", *extra,
                                                                      f"trainer.strategy={strategy}")}
                for strategy in ("ddp", "fsdp") for name, extra in STABILIZERS.items()]
        jobs += [{"name": "fsdp-half", "overrides": overrides(tmp, "fsdp-half", *STABILIZERS["clip"],
                                                              "trainer.strategy=fsdp", steps=STEPS // 2)},
                 {"name": "ddp-resumed", "overrides": overrides(tmp, "ddp-resumed", *STABILIZERS["clip"],
                                                                "trainer.strategy=ddp", f"trainer.resume={half.checkpoint}")}]
        ranks = torchrun_jobs(tmp, jobs)
        resumed = train(compose(overrides(tmp, "none-resumed", *STABILIZERS["clip"],
                                          f"trainer.resume={tmp / 'fsdp-half.pt'}")), tmp / "none-resumed")
    return {"refs": refs, "ranks": ranks, "uri": refs["clip"].tracking_uri, "resumed": resumed}


def torchrun_jobs(tmp: Path, jobs: list) -> dict:
    """Every job trained by 2 gloo ranks in one torchrun launch (tests/dist_worker.py); rank 0's records."""
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "dist_worker.py"), str(tmp / "jobs.json"), str(tmp / "out.json")],
                          cwd=tmp, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, "\n".join(ln for ln in proc.stderr.splitlines() if "rank1" not in ln)[-6000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", list(STABILIZERS))
def test_two_ranks_log_what_one_process_logs(world, strategy, name):
    """Same global batch, same order: grad/norm, grad/norm_after, train/loss (and skips, clip
    coefficients) agree with one process to 1e-5, step by step."""
    uri, ref = world["uri"], world["refs"][name]
    run = world["ranks"][f"{strategy}-{name}"]
    for key in SERIES:
        ref_steps, ref_values = series(uri, ref.run_id, key)
        steps, values = series(uri, run["run_id"], key)
        assert steps == ref_steps == list(range(STEPS)), key  # exactly one point per step: rank 0 alone logs
        assert rel_diff(values, ref_values) <= 1e-5, (key, values, ref_values)
    for key in ("train/accuracy", "val/accuracy", "val/loss"):
        assert rel_diff(series(uri, run["run_id"], key)[1], series(uri, ref.run_id, key)[1]) <= 1e-5, key


@pytest.mark.parametrize("name", list(STABILIZERS))
def test_the_stabilizer_acted(world, name):
    """The comparison above means something only if the stabilizer changed some steps."""
    uri, ref = world["uri"], world["refs"][name]
    if name == "spike_skip":
        assert sum(series(uri, ref.run_id, "grad/skipped")[1]) >= 1
    else:
        assert min(series(uri, ref.run_id, "grad/clip_coef")[1]) < 0.99


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", list(STABILIZERS))
def test_every_rank_holds_the_same_state(world, strategy, name):
    """The history every rank recorded, the stabilizers' thresholds/windows and (DDP) the weights
    are identical on both ranks: no replica drifts."""
    run = world["ranks"][f"{strategy}-{name}"]
    assert run["history_agrees"] and run["stabilizers_agree"]
    assert run.get("weights_agree", True)


def test_fsdp_norm_is_global_not_the_local_shard(world):
    """Under FSDP each rank holds half of every gradient: the norm of the local shard alone is far
    from the global norm (so the comparison above fails if the norm were computed locally), and
    what gradlab computes is the global norm."""
    run = world["ranks"]["fsdp-clip"]
    assert abs(run["shard_norm"] - run["global_norm"]) / run["global_norm"] > 0.05, run
    uri = world["uri"]
    logged = series(uri, run["run_id"], "grad/norm")[1]
    reference = series(uri, world["refs"]["clip"].run_id, "grad/norm")[1]
    local_like = np.asarray(reference) * run["shard_norm"] / run["global_norm"]
    assert rel_diff(local_like, reference) > 1e-2 and rel_diff(logged, reference) <= 1e-5


@pytest.mark.parametrize("job", ["ddp-resumed", "none-resumed"])
def test_checkpoint_resumes_under_another_world_size(world, job):
    """A 1-process checkpoint continued by 2 DDP ranks, and a 2-rank FSDP checkpoint continued by
    one process, both match the uninterrupted 1-process run."""
    uri, ref = world["uri"], world["refs"]["clip"]
    run_id = world["resumed"].run_id if job == "none-resumed" else world["ranks"][job]["run_id"]
    for key in ("grad/norm", "grad/norm_after", "train/loss"):
        steps, values = series(uri, run_id, key)
        assert steps == list(range(STEPS))
        assert rel_diff(values, series(uri, ref.run_id, key)[1]) <= 1e-5, key


def test_run_is_tagged_with_its_launch(world):
    from conftest import client

    tags = client(world["uri"]).get_run(world["ranks"]["fsdp-clip"]["run_id"]).data.tags
    assert tags["parallel"] == "fsdp x2 (gloo)"
    assert client(world["uri"]).get_run(world["refs"]["clip"].run_id).data.tags["parallel"] == "none"


def test_strategy_needs_torchrun():
    result = cli("train.py", "trainer.strategy=ddp", "data=synthetic")
    one_line_error(result, 2, "trainer.strategy", "torchrun --nproc_per_node=N")


@pytest.mark.parametrize("bad, key", [(["loss.l1=0.001"], "loss.l1"), (["trainer.strategy=none"], "trainer.strategy")])
def test_strategy_rules(monkeypatch, bad, key):
    """FSDP shards the weights, so the whole-weight L1 penalty is refused at composition; under
    torchrun with several processes, strategy=none (every rank training alone) is refused at start."""
    from gradlab import distributed
    from gradlab.config import compose_config
    from gradlab.errors import ConfigError

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg = compose_config(["data=synthetic", "trainer.strategy=fsdp", *bad])
        distributed.start(cfg.trainer.strategy, "cpu")
