"""The comparison report on a tiny mixed matrix (2 scenarios x 4 remedies x 2 seeds, synthetic data,
8 steps): stabilizer and non-stabilizer remedies and one not-applicable cell. Every table cell
against the numbers in the MLflow runs, the files and the parent run's artifacts, run selection
and CLI errors, and exact reproduction of the accuracies on a rerun."""
from __future__ import annotations

import json
import math
import os
import re
import runpy
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import PYTHON, ROOT, TINY, artifact_paths, cli_env, client, store_uri
from gradlab.config import compose_config
from gradlab.matrix import run_matrix, spec_from_dict
from gradlab.models import build_model
from gradlab.report import ReportError, data_notes, read_runs, select_runs, stored_value, write_report
from gradlab.tracking import config_hash, flatten

EXPERIMENT = "tiny-matrix"
# calm: a 1-layer MLP, sgd at lr 0.5 trains, and clip (max_norm 1) fires; blowup: a 3-layer deep_mlp at
# lr 1e10 diverges without a remedy. Remedies: a stabilizer (clip, by its plain name), an optimization
# one (lower_lr) and an architecture one (residual: a deep_mlp knob, so not applicable to calm's MLP).
SPEC = spec_from_dict({
    "experiment": EXPERIMENT,
    "remedies": {"lower_lr": ["optimizer.lr=0.05"], "residual": ["model.residual=true"]},
    "scenarios": [
        {"name": "calm", "experiment": None, "remedies": ["none", "clip", "lower_lr", "residual"],
         "overrides": ["optimizer=sgd", "optimizer.lr=0.5", "model.hidden_sizes=[32]"]},
        {"name": "blowup", "experiment": None, "remedies": ["none", "clip", "lower_lr", "residual"],
         "overrides": ["model=deep_mlp", "model.depth=3", "model.width=32", "optimizer=sgd", "optimizer.lr=1e10"]}],
    "seeds": [0, 1],
    "overrides": ["data=synthetic", "trainer.max_steps=8", "trainer.device=cpu", "trainer.deterministic=true",
                  "telemetry.plots=false", "telemetry.log_every=4", "trainer.progress=false",
                  *[t for t in TINY if not t.startswith("model.")]]})
CELLS = [("calm", "baseline", "none"), ("calm", "gradient-side", "clip"), ("calm", "architecture", "residual"),
         ("calm", "optimization", "lower_lr"), ("blowup", "baseline", "none"), ("blowup", "gradient-side", "clip"),
         ("blowup", "architecture", "residual"), ("blowup", "optimization", "lower_lr")]  # grouped by kind
FILES = ["report.md", "report.html", "report.csv", "summary.json", "metrics.json", "accuracy.csv",
         "figures/test_accuracy.png",
         "figures/grad_norm_calm.png", "figures/grad_norm_blowup.png"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    cwd = os.getcwd()
    os.chdir(tmp)  # module-scoped: the autouse chdir fixture is function-scoped (artifacts land in tmp)
    try:
        uri = store_uri(tmp / "store")
        result = run_matrix(SPEC, tmp / "matrix_runs.json", uri=uri, log=lambda line: None)
        report = write_report(select_runs(tmp / "matrix_runs.json"), tmp / "reports")
    finally:
        os.chdir(cwd)
    return {"tmp": tmp, "uri": uri, "result": result, "report": report}


def cell_runs(uri, parent, scenario, remedy):
    c = client(uri)
    exp = c.get_experiment_by_name(EXPERIMENT).experiment_id
    return c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}' AND tags.scenario = '{scenario}' "
                                f"AND tags.remedy = '{remedy}'")


def finite_norms(uri, runs):
    values = [m.value for r in runs for m in client(uri).get_metric_history(r.info.run_id, "grad/norm")]
    return [v for v in values if math.isfinite(v) and abs(v) != sys.float_info.max]  # the SQL store's inf


def test_stored_infinity_reads_back_as_infinity(tmp_store):
    from mlflow.entities import Metric

    c = client(tmp_store)
    run = c.create_run(c.create_experiment("inf"))
    c.log_batch(run.info.run_id, metrics=[Metric("grad/norm", v, 0, i) for i, v in enumerate([1.5, math.inf, -math.inf])])
    stored = [m.value for m in sorted(c.get_metric_history(run.info.run_id, "grad/norm"), key=lambda m: m.step)]
    assert stored[1] == sys.float_info.max  # what MLflow's SQL store does with inf
    assert [stored_value(v) for v in stored] == [1.5, math.inf, -math.inf]


def median_or_nan(values):
    return statistics.median(values) if values else math.nan


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12)


# ---------------------------------------------------------------- the table against the runs
def test_every_cell_matches_the_mlflow_runs(matrix):
    uri, parent, table = matrix["uri"], matrix["result"]["parent_run_id"], matrix["report"].table
    assert list(zip(table.scenario, table.kind, table.remedy)) == CELLS
    assert list(table.applicable) == [True, True, False, True, True, True, True, True]
    for row in table[table.applicable].itertuples():
        runs = cell_runs(uri, parent, row.scenario, row.remedy)
        assert row.runs == len(runs) == 2
        assert {(r.data.tags["remedy_kind"], r.data.tags["stabilizer"]) for r in runs} == \
            {(row.kind, "clip" if row.remedy == "clip" else "none")}
        metric = lambda key: [r.data.metrics.get(key, math.nan) for r in runs]  # noqa: E731
        acc = metric("test/accuracy")
        assert same(row.test_accuracy_mean, statistics.mean(acc))
        assert same(row.test_accuracy_std, statistics.stdev(acc))
        diverged = [r.data.tags["diverged"] == "true" for r in runs]
        assert row.diverged_runs == sum(diverged) and same(row.divergence_rate, sum(diverged) / len(runs))
        assert same(row.diverged_at_step_median, median_or_nan([v for v in metric("diverged_at_step") if not math.isnan(v)]))
        assert row.exploded_runs == sum(r.data.tags["exploding"] == "true" for r in runs)
        assert same(row.explosion_step_median, median_or_nan([v for v in metric("explosion/step") if not math.isnan(v)]))
        norms = finite_norms(uri, runs)
        assert same(row.grad_norm_max, max(norms)) and same(row.grad_norm_median, statistics.median(norms))
        assert same(row.grad_norm_max, max(metric("grad/norm_max")))  # what training summarised
        assert same(row.clip_rate, statistics.mean(metric("clip_rate")))
        assert same(row.ms_per_step, statistics.mean(metric("time/step_ms")))
        scenario = next(s for s in SPEC.scenarios if s.name == row.scenario)
        cfg = compose_config([*scenario.overrides, *SPEC.resolve([row.remedy], "")[0].overrides, *SPEC.overrides])
        built = sum(p.numel() for p in build_model(cfg.model, cfg.data).parameters())
        assert row.parameters == built == metric("model/parameters")[0] == metric("model/parameters")[1]
        hashes = {config_hash(r.data.params) for r in runs}
        assert hashes == {row.config_hash}  # every seed of a cell shares the hash
        assert row.git_commit == runs[0].data.tags["git_commit"]
        assert row.data_checksum == "synthetic-512-256-1234"
    assert table[table.applicable].config_hash.nunique() == 7  # ... and the cells differ
    ran = table[table.applicable]
    assert table.parameters[table.scenario == "blowup"].nunique() == 1  # residual adds no parameter ...
    assert ran.parameters[ran.scenario == "calm"].iloc[0] < ran.parameters[ran.scenario == "blowup"].iloc[0]


def test_not_applicable_cell_is_a_row_with_the_reason(matrix):
    table, result = matrix["report"].table, matrix["result"]
    na = table[~table.applicable]
    assert list(zip(na.scenario, na.remedy, na.runs)) == [("calm", "residual", 0)]
    reason = "invalid config 'model.residual': Key 'residual' not in 'MLPConfig'"
    assert na.reason.iloc[0] == reason
    assert [(c["scenario"], c["remedy"], c["reason"]) for c in result["not_applicable"]] == [("calm", "residual", reason)]
    assert not na.best.iloc[0] and math.isnan(na.test_accuracy_mean.iloc[0])
    assert len(result["runs"]) == 14  # 7 applicable cells x 2 seeds: nothing ran for the n/a cell
    md = (matrix["tmp"] / "reports" / "report.md").read_text()
    assert re.search(r"^\| calm +\| architecture +\| residual +\| n/a +\| not applicable +\| — +\|", md, re.M)
    assert f"## Not applicable\n\n- calm / residual: {reason}" in md


def test_best_of_each_kind_shows_its_cost(matrix):
    table = matrix["report"].table
    md = (matrix["tmp"] / "reports" / "report.md").read_text()
    for scenario in ("calm", "blowup"):
        cells = table[(table.scenario == scenario) & table.applicable].set_index("remedy")
        none = cells.loc["none"]
        for remedy in ("clip", "lower_lr"):  # the only remedy of its kind here: the best of it
            row = cells.loc[remedy]
            line = (f"  - {row.kind}: {remedy} — test accuracy {row.test_accuracy_mean:.4f} ± "
                    f"{row.test_accuracy_std:.4f}, diverged {row.diverged_runs}/2; {row.ms_per_step:.2f} ms/step "
                    f"({row.ms_per_step / none.ms_per_step:.2f}× none), {int(row.parameters):,} parameters (1.00× none)")
            assert line in md


def test_config_hash_of_the_composed_config_is_the_read_back_one(matrix):
    """A training-time ``config_hash(flatten(cfg))`` tag would agree with the hash the report
    computes from the logged params, whatever the seed, checkpoint path or tracking settings."""
    combo = SPEC.combinations()[2]  # calm / clip / seed 0
    cfg = compose_config([*combo.overrides, *SPEC.overrides, "seed=7", "trainer.checkpoint=/elsewhere/model.pt",
                          "tracking.experiment=other", "tracking.parent_run_id=abc"])
    row = matrix["report"].table.iloc[1]
    assert (row.scenario, row.remedy) == ("calm", "clip")
    assert config_hash(flatten(cfg)) == row.config_hash


def test_divergence_columns_are_exercised(matrix):
    table = matrix["report"].table.set_index(["scenario", "remedy"])
    assert table.loc[("blowup", "none"), "divergence_rate"] == 1.0
    assert table.loc[("blowup", "lower_lr"), "divergence_rate"] == 0.0  # a non-gradient remedy rescues it
    assert table.loc[("blowup", "none"), "diverged_at_step_median"] >= 1
    assert table.loc[("calm", "none"), "divergence_rate"] == 0.0
    assert math.isnan(table.loc[("calm", "none"), "diverged_at_step_median"])  # no diverged run: no step
    assert table.loc[("calm", "clip"), "clip_rate"] > 0


def test_best_remedy_is_the_highest_mean_accuracy(matrix):
    table = matrix["report"].table
    for scenario, group in table[table.applicable].groupby("scenario"):
        best = group[group.best]
        assert len(best) == 1
        assert best.test_accuracy_mean.iloc[0] == group.test_accuracy_mean.max()


# ---------------------------------------------------------------- files, DVC metrics/plots, parent run
def test_report_files(matrix):
    out, table = matrix["tmp"] / "reports", matrix["report"].table
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    for row in table[table.applicable].itertuples():
        assert f"{row.test_accuracy_mean:.4f} ± {row.test_accuracy_std:.4f}" in md
        assert f"| {row.config_hash} |" in md
    assert "| —" in md  # e.g. the calm scenario's step of divergence
    assert "Best remedy (★)" in md and "★" in (out / "report.html").read_text()
    assert "data:image/png;base64," in (out / "report.html").read_text()  # self-contained
    csv = pd.read_csv(out / "report.csv")
    assert np.allclose(csv.test_accuracy_mean, table.test_accuracy_mean, equal_nan=True)  # NaN: the n/a cell
    acc = pd.read_csv(out / "accuracy.csv")
    assert list(acc.scenario_remedy) == [f"{s}/{r}" for s, _, r in CELLS if (s, r) != ("calm", "residual")]
    assert np.allclose(acc.test_accuracy, table[table.applicable].test_accuracy_mean, atol=1e-6)


def test_summary_and_metrics_json_are_strict_and_match_the_table(matrix):
    def strict(name):
        text = (matrix["tmp"] / "reports" / name).read_text()
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c} in {name}"))

    summary, metrics = strict("summary.json"), strict("metrics.json")
    table = matrix["report"].table.set_index(["scenario", "remedy"])
    assert summary["runs"] == metrics["runs"] == 14
    assert summary["diverged_runs"] == metrics["diverged_runs"] == int(table.diverged_runs.sum())
    assert summary["not_applicable"] == metrics["not_applicable"] == 1
    for scenario, figs in summary["scenarios"].items():
        best = table.loc[scenario][table.loc[scenario].best]
        assert figs["best_remedy"] == best.index[0] and figs["best_kind"] == best.kind.iloc[0]
        assert figs["best_test_accuracy"] == pytest.approx(best.test_accuracy_mean.iloc[0])
        assert figs["none_divergence_rate"] == table.loc[(scenario, "none"), "divergence_rate"]
        assert figs["best_of_kind"]["optimization"]["remedy"] == "lower_lr"
        assert figs["best_of_kind"]["optimization"]["parameters"] == table.loc[(scenario, "lower_lr"), "parameters"]
        assert figs["not_applicable"] == (scenario == "calm")
        # dvc metrics show: two columns per scenario, nothing else
        assert metrics[scenario] == {"best": pytest.approx(figs["best_test_accuracy"]),
                                     "none": pytest.approx(figs["none_test_accuracy"])}
    assert set(metrics) == {"runs", "diverged_runs", "not_applicable", *summary["scenarios"]}


def test_report_is_logged_on_the_parent_run(matrix):
    parent = matrix["result"]["parent_run_id"]
    assert matrix["report"].parent_run_id == parent
    assert sorted(artifact_paths(matrix["uri"], parent)) == sorted(["matrix/not_applicable.json",
                                                                    *(f"report/{name}" for name in FILES)])


# ---------------------------------------------------------------- selecting runs
def test_selection_by_parent_experiment_and_filter(matrix):
    uri, parent = matrix["uri"], matrix["result"]["parent_run_id"]
    listed = set(matrix["result"]["run_ids"])
    by_parent = select_runs(parent=parent, uri=uri)
    assert {r.info.run_id for r in by_parent.runs} == listed and by_parent.parent_run_id == parent
    by_experiment = select_runs(experiment=EXPERIMENT, uri=uri)  # the matrix parent run itself is left out
    assert {r.info.run_id for r in by_experiment.runs} == listed and by_experiment.parent_run_id is None
    assert [c["remedy"] for c in by_parent.not_applicable] == ["residual"]  # read from the parent run
    assert by_experiment.not_applicable == []  # not one matrix: no parent to read them from
    calm = select_runs(parent=parent, filter_string="tags.scenario = 'calm'", uri=uri)
    assert {r.data.tags["scenario"] for r in calm.runs} == {"calm"} and len(calm.runs) == 6
    assert calm.parent_run_id is None  # a subset is never logged over the matrix's report
    everywhere = select_runs(filter_string="tags.stabilizer = 'clip' AND tags.seed = '1'", uri=uri)
    assert len(everywhere.runs) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"runs_file": "missing.json"}, "missing.json not found"),
    ({"parent": "0" * 32}, "parent run 00000000000000000000000000000000 not found"),
    ({"experiment": "nope"}, "experiment 'nope' not found"),
    ({"experiment": EXPERIMENT, "filter_string": "tags.scenario = 'none-such'"}, "no finished training runs match"),
    ({"experiment": EXPERIMENT, "filter_string": "tags.scenario =="}, "cannot search runs with filter"),
])
def test_bad_selections_are_report_errors(matrix, kwargs, message):
    with pytest.raises(ReportError, match=message):
        select_runs(uri=matrix["uri"], **kwargs)


def test_missing_store_is_not_created(tmp_path):
    with pytest.raises(ReportError, match="no MLflow store"):
        select_runs(experiment=EXPERIMENT, uri=f"sqlite:///{tmp_path / 'nowhere.db'}")
    assert not (tmp_path / "nowhere.db").exists()


# ---------------------------------------------------------------- the command line
def compare(*args, cwd):
    return subprocess.run([PYTHON, str(ROOT / "pipelines" / "compare.py"), *args], cwd=str(cwd), env=cli_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # the default suite's time budget (README: Tests)
def test_cli_filter_report(matrix, tmp_path):
    proc = compare("--experiment", EXPERIMENT, "--filter", "tags.scenario = 'blowup'", "--tracking-uri", matrix["uri"],
                   "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report: 8 runs" in proc.stderr
    table = pd.read_csv(tmp_path / "out" / "report.csv")
    assert list(table.scenario.unique()) == ["blowup"]
    assert not (tmp_path / "out" / "figures" / "grad_norm_calm.png").exists()


def test_cli_missing_run_list_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    # in-process (the script's own __main__ path, run_cli included): a subprocess would spend seconds importing
    monkeypatch.setattr(sys, "argv", ["compare.py", "--runs", str(tmp_path / "nope.json")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "pipelines" / "compare.py"), run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"gradlab: {tmp_path / 'nope.json'} not found (run pipelines/matrix.py first, or select runs with "
        "--parent, --experiment or --filter)"]


# ---------------------------------------------------------------- reproducibility
@pytest.mark.slow  # the default suite's time budget (README: Tests)
def test_rerun_reproduces_the_accuracies_exactly(matrix):
    tmp = matrix["tmp"]
    (tmp / "store_rerun").mkdir()
    shutil.copyfile(tmp / "store" / "mlflow.db", tmp / "store_rerun" / "mlflow.db")  # the other tests' store stays as it is
    uri = store_uri(tmp / "store_rerun")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        # in two joblib workers (as the default matrix runs; they freeze their objects out of the GC
        # after their first run): the same figures as the first matrix's in-process loop
        again = run_matrix(SPEC, tmp / "rerun.json", uri=uri, log=lambda line: None, jobs=2)
        second = write_report(select_runs(tmp / "rerun.json"), tmp / "reports_rerun").table
    finally:
        os.chdir(cwd)
    first = matrix["report"].table
    assert again["parent_run_id"] != matrix["result"]["parent_run_id"]
    for column in ("test_accuracy_mean", "test_accuracy_std", "divergence_rate", "diverged_at_step_median",
                   "grad_norm_max", "grad_norm_median", "clip_rate"):
        assert first[column].equals(second[column]), column  # exact, NaN where NaN
    assert list(first.config_hash) == list(second.config_hash)
    assert list(first.best) == list(second.best)
    # an experiment holding both matrices: the report says so instead of silently pooling them
    both = select_runs(experiment=EXPERIMENT, uri=uri)
    runs, _ = read_runs(client(uri), both.runs)
    notes = data_notes(runs)
    assert len(notes) == 7 and all("more than once" in n for n in notes)
