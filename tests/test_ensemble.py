"""Vectorized ensembles (gradlab.ensemble): each member's history equals its individual run's within
float tolerance, per-member stabilizer state and skips included; a diverging member stops at its
own step while the others finish; the members' MLflow runs read like individual runs; the matrix switch."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import client, tiny_cfg
from gradlab.config import ConfigError
from gradlab.ensemble import Ensemble, unsupported
from gradlab.matrix import spec_from_dict
from gradlab.telemetry import STEP_KEYS
from gradlab.training import Trainer

RTOL, ATOL = 1e-4, 1e-6  # batched matrix products may sum in another order: not bit-exact
SPIKE = ["fault=bad_batch", "fault.bad_batch.at=[12]", "fault.bad_batch.kind=scale", "fault.bad_batch.factor=255"]


def member_cfg(tmp_path, name, seed, *overrides, steps=30):
    return tiny_cfg(tmp_path, f"seed={seed}", "telemetry.log_every=7", "telemetry.layer_every=3",
                    f"trainer.checkpoint={tmp_path / name / 'model.pt'}", *overrides, steps=steps)


def train_both(tmp_path, seeds, overrides_of, steps=30):
    """Each seed trained alone (Trainer.fit) and all of them as one Ensemble; overrides_of(seed) -> list."""
    alone = []
    for s in seeds:
        t = Trainer(member_cfg(tmp_path, f"alone{s}", s, *overrides_of(s), steps=steps), tmp_path / f"alone{s}")
        alone.append((t, t.fit()))
    cfgs = [member_cfg(tmp_path, f"ens{s}", s, *overrides_of(s), steps=steps) for s in seeds]
    ens = Ensemble(cfgs, [tmp_path / f"ens{s}" for s in seeds])
    return alone, list(zip(ens.members, ens.fit()))


def close(a, b) -> bool:
    return a.shape == b.shape and np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True)


def assert_same_history(a, b):
    """Steps, every per-step series (loss, norms, clip coefficient, skipped, threshold, fault), the
    per-layer norms, lr, update ratios, the validation points and the gauge's points."""
    ha, hb = a.history, b.history
    assert ha.steps == hb.steps
    ra, rb = np.concatenate(ha.rows), np.concatenate(hb.rows)
    for j, key in enumerate(STEP_KEYS):
        assert close(ra[:, j], rb[:, j]), (key, np.abs(ra[:, j] - rb[:, j]).max())
    assert close(ha.layer_grid(len(ha.layers)), hb.layer_grid(len(hb.layers)))
    assert np.allclose(ha.lr, hb.lr)
    assert ha.ratio_steps == hb.ratio_steps and close(np.array(ha.layer_ratio), np.array(hb.layer_ratio))
    for pa, pb in ((ha.epoch_points, hb.epoch_points), (ha.sparse, hb.sparse)):
        assert [(k, s) for k, _, s in pa] == [(k, s) for k, _, s in pb]
        assert close(np.array([v for _, v, _ in pa]), np.array([v for _, v, _ in pb]))


@pytest.mark.parametrize("stabilizer", [["stabilizer=none"], ["stabilizer=clip", "stabilizer.clip.max_norm=0.5"],
                                        ["stabilizer=zclip", "stabilizer.zclip.warmup_steps=5", *SPIKE],
                                        ["stabilizer=spike_skip", "stabilizer.spike_skip.window=5", *SPIKE]],
                         ids=["none", "clip", "zclip", "spike_skip"])
def test_each_member_equals_its_individual_run(tmp_path, stabilizer):
    alone, together = train_both(tmp_path, (0, 1), lambda s: stabilizer)
    for (a, ra), (b, rb) in zip(alone, together):
        assert_same_history(a, b)
        assert ra.steps == rb.steps == 30 and not rb.diverged
        assert ra.val_accuracy == pytest.approx(rb.val_accuracy, abs=1e-6)
    # the comparison has teeth: two seeds' histories are far apart
    assert not close(np.concatenate(alone[0][0].history.rows)[:, 0], np.concatenate(alone[1][0].history.rows)[:, 0])
    if "stabilizer=spike_skip" in stabilizer:  # the spike was skipped, by each member on its own
        assert all(np.concatenate(b.history.rows)[12, STEP_KEYS.index("grad/skipped")] == 1 for b, _ in together)
    if "stabilizer=clip" in stabilizer:
        clip = np.concatenate(together[0][0].history.rows)[:, STEP_KEYS.index("grad/clip_coef")]
        assert (clip < 1).any()


def test_a_diverging_member_stops_alone_and_the_others_finish(tmp_path):
    """Seed 1 gets a batch of pixels x 1e38 at step 9 (non-finite loss): it diverges there, ends
    its run as its individual run does, and leaves the stack; seeds 0 and 2 train all 30 steps,
    as they would alone (its NaN never reaches them)."""
    bad = ["fault=bad_batch", "fault.bad_batch.at=[9]", "fault.bad_batch.kind=scale", "fault.bad_batch.factor=1e38"]
    alone, together = train_both(tmp_path, (0, 1, 2), lambda s: bad if s == 1 else [])
    for (a, ra), (b, rb) in zip(alone, together):
        assert_same_history(a, b)
        assert (ra.diverged, ra.diverged_at_step, ra.steps) == (rb.diverged, rb.diverged_at_step, rb.steps)
    assert [r.diverged_at_step for _, r in together] == [None, 9, None]
    assert [r.steps for _, r in together] == [30, 10, 30]
    uri = together[1][1].tracking_uri
    run = client(uri).get_run(together[1][1].run_id)
    assert run.data.tags["diverged"] == "true" and run.data.metrics["diverged_at_step"] == 9
    assert run.info.status == "FINISHED"


def test_member_runs_read_like_individual_runs(tmp_path):
    alone, together = train_both(tmp_path, (0, 1), lambda s: ["stabilizer=clip"], steps=10)
    c = client(together[0][1].tracking_uri)
    for (_, ra), (_, rb) in zip(alone, together):
        a, b = c.get_run(ra.run_id), c.get_run(rb.run_id)
        skip = {"trainer.checkpoint"}  # each run's own file
        assert {k: v for k, v in a.data.params.items() if k not in skip} == \
            {k: v for k, v in b.data.params.items() if k not in skip}
        assert set(a.data.metrics) == set(b.data.metrics)
        assert b.data.tags["gradlab.ensemble"] == "2" and "gradlab.ensemble" not in a.data.tags
        for key in ("outcome", "diverged", "stabilizer", "seed", "model", "data_checksum"):
            assert a.data.tags[key] == b.data.tags[key]
        assert len(c.get_metric_history(rb.run_id, "grad/norm")) == 10


def test_what_cannot_be_stacked_says_why(tmp_path):
    assert unsupported(tiny_cfg(tmp_path)) is None
    assert "vmap" in unsupported(tiny_cfg(tmp_path, "model=rnn"))
    assert "batchnorm" in unsupported(tiny_cfg(tmp_path, "model.norm=batchnorm"))
    with pytest.raises(ValueError, match="must share the model"):
        Ensemble([tiny_cfg(tmp_path), tiny_cfg(tmp_path, "model.hidden_sizes=[16]")], [tmp_path / "a", tmp_path / "b"])


def test_matrix_ensemble_key_is_checked():
    spec = spec_from_dict({"scenarios": ["explode_high_lr"], "ensemble": "seeds"})
    assert spec.ensemble == "seeds"
    assert spec_from_dict({"scenarios": ["explode_high_lr"], "ensemble": "remedies"}).ensemble == "remedies"
    with pytest.raises(ConfigError, match="matrix.ensemble"):
        spec_from_dict({"scenarios": ["explode_high_lr"], "ensemble": "params"})
    with pytest.raises(ConfigError, match="matrix.ensemble"):
        spec_from_dict({"scenarios": ["explode_high_lr"], "ensemble": "seeds", "executor": "slurm"})


# ---------------------------------------------------------------- ensemble: remedies (a scenario's stackable runs)
REMEDY_SPEC = {
    "experiment": "tiny-ensembles",
    "remedies": {"lower_lr": ["optimizer.lr=0.02"], "residual": ["model.residual=true"]},
    "scenarios": [{"name": "deep", "experiment": None, "remedies": ["none", "clip", "zclip", "lower_lr", "residual"],
                   "overrides": ["model=deep_mlp", "model.depth=3", "model.width=32", "optimizer=sgd",
                                 "optimizer.lr=0.1"]}],
    "seeds": [0, 1],
    "overrides": ["data=synthetic", "trainer.max_steps=12", "trainer.device=cpu", "trainer.deterministic=true",
                  "telemetry.plots=false", "telemetry.log_every=5", "trainer.progress=false", "trainer.batch_size=32",
                  "data.synthetic_size=512"]}


def test_matrix_remedies_ensemble_stacks_a_scenarios_remedies_and_matches_individual_runs(tmp_path, monkeypatch):
    """ensemble: remedies groups none, clip, zclip and lower_lr (stabilizers and an optimizer setting:
    the same model) with their seeds into one 8-member ensemble; residual changes the model, so its
    seeds are a unit of their own. Every record equals the individual matrix's (ensemble: none)."""
    from gradlab.matrix import ensemble_units, plan, run_matrix

    monkeypatch.chdir(tmp_path)
    spec = spec_from_dict({**REMEDY_SPEC, "ensemble": "remedies"})
    combos, _ = plan(spec)
    units = ensemble_units(combos, spec.overrides, "remedies")
    assert [sorted({c.remedy.name for c in u}) for u in units] == [["clip", "lower_lr", "none", "zclip"], ["residual"]]
    assert [len(u) for u in units] == [8, 2]
    assert [{c.remedy.name for c in u} for u in ensemble_units(combos, spec.overrides, "seeds")] == \
        [{"none"}, {"clip"}, {"zclip"}, {"lower_lr"}, {"residual"}]  # seeds: a cell's seeds, 2 each
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    together = run_matrix(spec, tmp_path / "together.json", uri=uri, log=lambda m: None)["runs"]
    alone = run_matrix(spec_from_dict(REMEDY_SPEC), tmp_path / "alone.json", uri=uri, log=lambda m: None)["runs"]
    assert [r["status"] for r in together] == ["FINISHED"] * 10
    assert [r["ensemble"] for r in together] == [8] * 8 + [2] * 2
    for a, b in zip(alone, together):
        assert (a["remedy"], a["seed"], a["steps"], a["diverged"]) == (b["remedy"], b["seed"], b["steps"], b["diverged"])
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1e-6)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
        ha = client(uri).get_metric_history(a["run_id"], "grad/norm")
        hb = client(uri).get_metric_history(b["run_id"], "grad/norm")
        assert close(np.array([m.value for m in ha]), np.array([m.value for m in hb])), a["remedy"]
    # the remedies really differ inside the one ensemble: clip bounded the norm that none applied
    after = {r["remedy"]: client(uri).get_run(r["run_id"]).data.metrics for r in together if r["seed"] == 0}
    assert after["clip"]["clip_rate"] > 0 and after["none"]["clip_rate"] == 0
