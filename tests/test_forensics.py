"""Divergence forensics: snapshots, a bit-exact replay, the first non-finite tensor, per-sample
attribution, the counterfactual table, and src/forensics.py after the fact."""
from __future__ import annotations

import contextlib
import csv
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import artifact_paths, cli, client, one_line_error, store_uri, tiny_cfg
from gradlab.forensics import (AFTER, BadStep, Snapshots, explosion_onset, find_bad_step, per_sample_grad_norms,
                               replay, replay_matches)
from gradlab.telemetry import STEP_KEYS, History
from gradlab.training import Trainer, train

# the deep-MLP preset shrunk to seconds: it overflows at step 2
DIVERGING = ["experiment=explode_deep_mlp", "model.width=32", "model.depth=8", "model.gain=2"]


# ---------------------------------------------------------------- snapshots and the bad step
def test_snapshots_keep_the_first_and_the_latest(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path), tmp_path / "out")
    snaps = Snapshots(every=5, keep=2)
    batches = list(trainer.order.batches(trainer.train_data))
    for step in range(16):
        if snaps.due(step):
            snaps.take(trainer.engine, trainer.order)
        trainer.engine.step(*batches[step])
    assert snaps.first["step"] == 0 and [s["step"] for s in snaps.recent] == [10, 15]
    assert snaps.before(12)["step"] == 10 and snaps.before(9)["step"] == 0 and snaps.before(15)["step"] == 15
    # the replay starts at or before the first exploding step when a snapshot there is kept ...
    assert [snaps.start_for(onset, 16)["step"] for onset in (12, 8, 16)] == [10, 0, 15]
    resumed = Snapshots(every=5, keep=2)  # ... else before the bad step (a resumed run's first snapshot)
    resumed.first = {"step": 10}
    assert resumed.start_for(5, 12)["step"] == 10
    # a deep copy: training on did not change the snapshot
    assert not torch.equal(snaps.first["engine"]["model"]["head.weight"], trainer.engine.model.head.weight)


def test_bad_step_priority():
    h = History(layers=["a"])
    rows = np.zeros((6, len(STEP_KEYS)))
    rows[3, STEP_KEYS.index("grad/skipped")] = 1
    h.steps, h.rows = list(range(6)), [rows]
    assert find_bad_step(h, 5, 2) == BadStep(4, "diverged", 5)
    assert find_bad_step(h, None, 2) == BadStep(3, "skipped", 3)
    h.rows = [np.zeros((6, len(STEP_KEYS)))]
    assert find_bad_step(h, None, 2) == BadStep(2, "exploded", 2)
    assert find_bad_step(h, None, None) is None


def test_the_first_exploding_step_is_where_the_flagged_run_up_began():
    h = History(layers=["a"])
    norms = [5.0, 4.0, 3.0, 1.0, 2.0, 40.0, 900.0, np.inf, np.nan]  # x100 over the window's minimum at step 6
    rows = np.zeros((len(norms), len(STEP_KEYS)))
    rows[:, STEP_KEYS.index("grad/norm")] = norms
    h.steps, h.rows, h.layer_grad = list(range(len(norms))), [rows], [np.ones((len(norms), 1))]
    assert explosion_onset(h, BadStep(7, "diverged", 8), 100.0, 10) == 3  # the smallest norm before the flag
    assert explosion_onset(h, BadStep(7, "diverged", 8), 100.0, 2) == 4  # ... within the window
    assert explosion_onset(h, BadStep(5, "requested", 5), 100.0, 10) == 5  # a requested step is re-run itself
    assert explosion_onset(h, BadStep(4, "diverged", 5), 100.0, 10) == 4  # no flag up to the bad record


# ---------------------------------------------------------------- replay
@pytest.mark.parametrize("extra", [["stabilizer=[zclip,spike_skip]", "stabilizer.zclip.warmup_steps=3",
                                    "stabilizer.spike_skip.min_history=3", "stabilizer.spike_skip.window=4"],
                                   ["model=rnn", "model.hidden=16", "optimizer=sgd", "scheduler=cosine"]])
def test_replay_reproduces_the_recorded_steps_bit_exactly(tmp_path, extra):
    # 8 batches per epoch: the replay from a snapshot before step 8 crosses an epoch boundary
    cfg = tiny_cfg(tmp_path, *extra, "forensics.snapshot_every=5", "telemetry.log_every=5",
                   "data.synthetic_size=512", "trainer.batch_size=32", steps=14)
    trainer = Trainer(cfg, tmp_path / "out")
    trainer.fit()
    snap = trainer.snapshots.before(7)
    start = snap["step"]  # snapshots are taken at flushes: every 5 steps after the gauge's flush at step 0
    assert 0 < start < 8
    rep = replay(cfg, snap, trainer.train_data, trainer.history, 13, [9], torch.device("cpu"))
    assert rep.history.steps == list(range(start, 14))
    assert replay_matches(trainer.history, rep.history)
    recorded = np.concatenate(trainer.history.rows)[start:14]
    replayed = np.concatenate(rep.history.rows)
    for key in ("train/loss", "grad/norm", "grad/norm_after"):
        i = STEP_KEYS.index(key)
        assert np.array_equal(recorded[:, i], replayed[:, i]), key
    assert set(rep.states) == {9} and len(rep.batches[9][2]) == 32


def test_replay_mismatch_is_detected():
    a, b = History(), History()
    rows = np.ones((3, len(STEP_KEYS)))
    a.steps, a.rows = [0, 1, 2], [rows]
    changed = rows.copy()
    changed[1, STEP_KEYS.index("grad/norm")] = np.nextafter(1.0, 2.0)
    b.steps, b.rows = [0, 1, 2], [changed]
    assert replay_matches(a, a) and not replay_matches(a, b)


# ---------------------------------------------------------------- attribution
@pytest.mark.parametrize("model", ["mlp", "rnn"])  # rnn: the per-sample loop (nn.RNN does not run under vmap)
def test_per_sample_norms_match_a_loop_over_samples(tmp_path, model):
    over = ["model=rnn", "model.hidden=16"] if model == "rnn" else []
    trainer = Trainer(tiny_cfg(tmp_path, *over), tmp_path / "out")
    net = trainer.engine.model
    x, y = trainer.train_data.x[:20], trainer.train_data.y[:20]
    expected = []
    for xi, yi in zip(x, y):
        net.zero_grad()
        F.cross_entropy(net(xi[None]), yi[None]).backward()
        expected.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in net.parameters())))
    got = per_sample_grad_norms(net, x, y, chunk=8)
    assert torch.allclose(got, torch.stack(expected), rtol=1e-4)


# ---------------------------------------------------------------- a diverged run, investigated
@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diverged")
    with contextlib.chdir(tmp):  # module-scoped: the autouse chdir fixture is function-scoped
        return train(tiny_cfg(tmp, *DIVERGING, steps=20), tmp / "out"), tmp


def test_diverged_run_names_the_first_nonfinite_tensor(diverged):
    r, _ = diverged
    assert r.diverged and r.diverged_at_step == 2
    tags = client(r.tracking_uri).get_run(r.run_id).data.tags
    assert tags["nonfinite/first_tensor"].split(".")[0] in ("stem", "blocks", "head")
    assert tags["nonfinite/kind"] in ("activation", "output gradient", "parameter gradient", "parameter after update")
    assert int(tags["nonfinite/step"]) <= 2
    assert tags["forensics/kind"] == "diverged" and tags["forensics/step"] == "1"
    assert tags["forensics/replay_exact"] == "true" and tags["forensics/replayed_from"] == "0"
    arts = artifact_paths(r.tracking_uri, r.run_id)
    for name in ("snapshot.pt", "attribution.png", "attribution.csv", "counterfactual.csv", "counterfactual.md",
                 "layer_stats.csv", "summary.txt"):
        assert f"forensics/{name}" in arts, name


def read_csv(uri, run_id, name):
    path = client(uri).download_artifacts(run_id, f"forensics/{name}")
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_counterfactual_runs_from_the_first_exploding_step(diverged):
    """The norm exploded from step 0 (flag at 1, NaN at 2): each remedy is run from step 0, not from the
    bad step 1 (where the run's first update had already done the damage), through AFTER steps past
    the NaN; clip keeps all of it finite, the run's own selection (none) meets its NaN again."""
    r, _ = diverged
    tags = client(r.tracking_uri).get_run(r.run_id).data.tags
    assert tags["forensics/onset"] == "0" and tags["forensics/counterfactual_from"] == "0"
    assert tags["forensics/counterfactual_to"] == str(2 + AFTER)
    rows = {row["remedy"]: row for row in read_csv(r.tracking_uri, r.run_id, "counterfactual.csv")}
    assert set(rows) >= {"none", "warmup", "clip_value", "agc", "clip", "autoclip", "zclip", "spike_skip"}
    assert all(row["from_step"] == "0" and row["to_step"] == str(2 + AFTER) for row in rows.values())
    assert rows["none"]["stays_finite"] == "False" and rows["none"]["first_nonfinite"] == "2"
    assert rows["clip"]["stays_finite"] == "True" and rows["clip"]["first_nonfinite"] == ""
    assert float(rows["clip"]["applied_norm"]) == pytest.approx(1.0, rel=1e-5)
    assert np.isfinite(float(rows["clip"]["last_norm"])) and np.isfinite(float(rows["clip"]["max_norm"]))
    assert float(rows["none"]["applied_norm"]) == float(rows["none"]["raw_norm"]) > 1e3
    assert "clip" in tags["forensics/finite_with"].split(",")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GRADLAB_DATA_MIRROR"), reason="set GRADLAB_DATA_MIRROR to the MNIST IDX files")
def test_counterfactual_of_the_deep_mlp_preset_finds_clip(tmp_path):
    """experiment=explode_deep_mlp on MNIST: step 0's update leaves step 1 at a norm of ~4e18, where no
    remedy rescues anything (the counterfactual of step 1 said "nothing"); from step 0, clip does."""
    from gradlab.config import compose_config

    cfg = compose_config(["experiment=explode_deep_mlp", "trainer.device=cpu", "trainer.threads=1",
                          "trainer.progress=false", "telemetry.plots=false",
                          f"data.root={os.environ.get('GRADLAB_DATA_ROOT', tmp_path / 'data')}",
                          f"tracking.uri={store_uri(tmp_path / 'store')}", f"trainer.checkpoint={tmp_path / 'model.pt'}"])
    r = train(cfg, tmp_path / "out")
    tags = client(r.tracking_uri).get_run(r.run_id).data.tags
    assert r.diverged_at_step == 2 and tags["forensics/step"] == "1" and tags["forensics/counterfactual_from"] == "0"
    assert "clip" in tags["forensics/finite_with"].split(",")


def test_attribution_ranks_the_batch(diverged):
    r, _ = diverged
    rows = read_csv(r.tracking_uri, r.run_id, "attribution.csv")
    assert len(rows) == 32  # the tiny batch
    norms = [float(row["grad_norm"]) for row in rows]
    assert norms == sorted(norms, reverse=True)
    assert sum(float(row["share"]) for row in rows) == pytest.approx(1.0)


def test_forensics_cli_after_the_fact(diverged):
    r, tmp = diverged
    tags = client(r.tracking_uri).get_run(r.run_id).data.tags
    rc, out, err = cli("forensics.py", f"run_id={r.run_id}", f"tracking_uri={r.tracking_uri}", "device=cpu",
                       cwd=tmp)
    assert rc == 0, err[-3000:]
    assert f"first non-finite tensor: {tags['nonfinite/first_tensor']}" in out
    assert f"re-running steps 0-{2 + AFTER} (the first exploding step 0), finite through step {2 + AFTER} with:" in out
    assert "clip" in out
    # a requested step with no snapshot before it
    result = cli("forensics.py", f"snapshot={tmp / 'model.pt'}", "step=0", "device=cpu", cwd=tmp)
    one_line_error(result, 2, "step", "nothing to replay from")


def test_forensics_cli_bad_input_is_one_line(tmp_path):
    one_line_error(cli("forensics.py", cwd=tmp_path), 2, "run_id")
    uri = store_uri(tmp_path / "store")
    one_line_error(cli("forensics.py", "run_id=nope", f"tracking_uri={uri}", cwd=tmp_path), 2, "run_id", "no run nope")


def test_healthy_run_has_no_forensics(tmp_path):
    r = train(tiny_cfg(tmp_path), tmp_path / "out")
    tags = client(r.tracking_uri).get_run(r.run_id).data.tags
    assert not any(k.startswith(("forensics/", "nonfinite/")) for k in tags)


def test_a_norm_that_overflowed_with_every_tensor_finite_names_the_largest_gradient():
    from types import SimpleNamespace

    from gradlab.forensics import Replay, overflowed_norm

    h = History(layers=["a", "b"])
    rows = np.ones((3, len(STEP_KEYS)))
    rows[2, STEP_KEYS.index("grad/norm")] = np.inf  # sqrt(sum of squares) past float32's range
    h.steps, h.rows = [0, 1, 2], [rows]
    probe = SimpleNamespace(first=None, rows=[(2, "a.weight", "parameter gradient", 1e18, 3e19, True),
                                              (2, "b.weight", "parameter gradient", 1e19, 9e19, True),
                                              (1, "b.weight", "parameter gradient", 1.0, 1.0, True)])
    rep = Replay(0, {}, {}, h, probe)
    assert overflowed_norm(rep) == (2, "b.weight", "gradient norm overflow (every tensor finite)")
    h.rows = [np.ones((3, len(STEP_KEYS)))]
    assert overflowed_norm(rep) is None


def test_history_is_fed_only_to_stabilizers_that_keep_global_values(tmp_path):
    """AdaGC keeps one gamma per tensor and SPAM reads the optimizer's moments: the counterfactual
    cannot feed them the recorded global norms (it raised "Tensor lists must have the same number
    of tensors" for every diverged run once adagc was in the library); autoclip is fed."""
    from gradlab.forensics import build_engine, feed_history

    cfg = tiny_cfg(tmp_path, "stabilizer=[adagc,autoclip,spam]", "optimizer=adam")
    engine, _ = build_engine(cfg, torch.device("cpu"), 64)
    h = History(layers=["a"])
    rows = np.zeros((5, len(STEP_KEYS)))
    rows[:, STEP_KEYS.index("train/loss")], rows[:, STEP_KEYS.index("grad/norm")] = 2.0, [1, 2, 3, 4, 5]
    h.steps, h.rows = list(range(5)), [rows]
    feed_history(engine, ["adagc", "autoclip", "spam"], h, 5)
    autoclip = next(s for s in engine.stack.stabilizers if s.name == "autoclip")
    assert int(autoclip.history.count) == 5  # it saw the five recorded norms
