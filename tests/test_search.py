"""Sweeps and search: a parallel Hydra multirun into a new store, random/TPE searches with Optuna."""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, TINY, cli_env, client, history, run_script, store_uri

from gradlab.search import SearchSpecError, parse_param, parse_space

FAST = ["data=synthetic", "trainer.device=cpu", "telemetry.plots=false", "trainer.progress=false", *TINY]
SQL_NEG_INF = -1.7976931348623157e308  # how MLflow's SQL store keeps -inf


def _search_cli():
    spec = importlib.util.spec_from_file_location("search_cli", ROOT / "pipelines" / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _runs(uri: str, experiment: str):
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "search"]
    children = {p.info.run_id: sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id),
                                      key=lambda r: int(r.data.tags["trial"])) for p in parents}
    return parents, children


def _trials_csv(uri: str, run_id: str, tmp_path: Path):
    path = client(uri).download_artifacts(run_id, "search/trials.csv", str(tmp_path))
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- grid: Hydra multirun
@pytest.mark.slow  # the default suite's time budget (README: Tests)
def test_joblib_multirun_into_a_new_store_loses_no_point(tmp_path):
    db = tmp_path / "new" / "mlflow.db"  # the file does not exist yet
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    proc = run_script("train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST,
                      "trainer.max_steps=20", "telemetry.log_every=7", "seed=0,1,2,3", f"tracking.uri={uri}",
                      cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("gradlab").experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2", "3"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert [s for s, _ in history(uri, r.info.run_id, "grad/norm")] == list(range(20))
    assert len(list((tmp_path / "multirun").glob("*/*/[0-3]"))) == 4  # one output dir per job


def test_multirun_under_mlflow_run_nests_jobs_instead_of_sharing_its_run(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from gradlab.callbacks import PrepareTrackingStore

    monkeypatch.setenv("MLFLOW_RUN_ID", "0123abc")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", [f"tracking.uri={store_uri(tmp_path)}"], return_hydra_config=True)
    PrepareTrackingStore().on_multirun_start(cfg)
    assert "MLFLOW_RUN_ID" not in os.environ  # no job process inherits it
    assert cfg.hydra.overrides.task[-1] == "tracking.parent_run_id='0123abc'"  # quoted: stays a string


# ---------------------------------------------------------------- random and TPE searches
def test_random_search_logs_child_runs_and_reports_divergence_as_worst(tmp_path, capsys):
    uri = store_uri(tmp_path / "store")
    # seed 0 draws 1e10 (diverges within steps), 0.05 (learns), 1e10
    code = _search_cli()(["--sampler", "random", "--trials", "3", "--seed", "0", "--tracking-uri", uri,
                          "--param", "optimizer.lr=choice:1e10,0.05", "--", *FAST, "optimizer=sgd", "trainer.max_steps=8"])
    out = capsys.readouterr().out
    assert code == 0, out
    parents, children = _runs(uri, "gradlab-search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent, kids = parents[0], children[parents[0].info.run_id]
    study = parent.data.params["study"]
    assert [(k.data.tags["trial"], k.data.tags["study"], k.info.status) for k in kids] == \
        [(str(i), study, "FINISHED") for i in range(3)]
    diverged = [k.data.tags["diverged"] == "true" for k in kids]
    assert any(diverged) and not all(diverged)
    for k, div in zip(kids, diverged):
        expected = SQL_NEG_INF if div else k.data.metrics["val/accuracy"]
        assert k.data.metrics["search/objective"] == expected
    best = max(k.data.metrics["val/accuracy"] for k, div in zip(kids, diverged) if not div)
    assert parent.data.metrics["best/value"] == best and parent.data.params["best.optimizer.lr"] == "0.05"
    assert parent.data.metrics["trials/diverged"] == sum(diverged)
    rows = _trials_csv(uri, parent.info.run_id, tmp_path)
    assert [r["user_attrs_run_id"] for r in rows] == [k.info.run_id for k in kids]
    assert [math.isinf(float(r["value"])) for r in rows] == diverged
    assert "best val/accuracy" in out


def test_tpe_search_with_shared_storage_and_a_joining_worker(tmp_path, capsys):
    uri = store_uri(tmp_path / "store")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def worker(trials: int, seed: int, *extra: str):
        return main(["--sampler", "tpe", "--trials", str(trials), "--startup-trials", "1", "--seed", str(seed),
                     "--metric", "val/loss", "--storage", storage, "--study-name", "shared", "--tracking-uri", uri,
                     "--param", "optimizer.lr=loguniform:1e-3:0.1", "--param", "model.hidden_sizes=choice:[16],[32]",
                     *extra, "--", *FAST, "trainer.max_steps=8"])

    main = _search_cli()
    assert worker(3, seed=0) == 0
    assert worker(1, seed=7) == 0  # a second worker joins the study (its own seed: no duplicate draws)
    import optuna

    study = optuna.load_study(study_name="shared", storage=storage)
    assert len(study.trials) == 4 and study.direction.name == "MINIMIZE"  # inferred from the metric name
    parents, children = _runs(uri, "gradlab-search")
    assert len(parents) == 2
    first = next(p for p in parents if p.data.params["trials"] == "3")
    kids = children[first.info.run_id]
    assert [k.data.tags["trial"] for k in kids] == ["0", "1", "2"]
    for k in kids:
        assert k.data.metrics["search/objective"] == k.data.metrics["val/loss"]
        assert k.data.params["model.hidden_sizes"] in ("[16]", "[32]")
    joined = children[next(p for p in parents if p is not first).info.run_id]
    assert [k.data.tags["trial"] for k in joined] == ["3"]
    assert len(_trials_csv(uri, joined[0].data.tags["mlflow.parentRunId"], tmp_path)) == 4  # the whole study
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # joining with the opposite direction is refused
        worker(1, 7, "--direction", "maximize")
    assert exit_info.value.code == 2
    assert "study 'shared' exists and is to minimize" in capsys.readouterr().err


# ---------------------------------------------------------------- bad search definitions
@pytest.mark.parametrize("text, message", [
    ("optimizer.lr", "expected KEY=KIND:ARGS"),
    ("optimizer.lr=normal:0:1", "unknown kind 'normal'"),
    ("optimizer.lr=loguniform:0:1", "LOW > 0"),
    ("optimizer.lr=uniform:1:0.1", "LOW < HIGH"),
    ("model.depth=int:2:x", "two integers"),
    ("optimizer=choice:sgd", "at least two"),
])
def test_bad_param_syntax_names_the_param(text, message):
    with pytest.raises(SearchSpecError, match=message) as err:
        parse_param(text)
    assert f"--param '{text}'" in str(err.value)


def test_choice_values_keep_their_brackets():
    p = parse_param("stabilizer=choice:none,[warmup,clip]")
    assert p.choices == ("none", "[warmup,clip]")
    with pytest.raises(SearchSpecError, match="searched twice"):
        parse_space(["optimizer.lr=uniform:0.1:1", "optimizer.lr=loguniform:0.1:1"])


def test_cli_bad_param_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([PYTHON, str(ROOT / "pipelines" / "search.py"), "--param", "optimizer.lr=uniform:0.1:1",
                           "--param", "optimizer.lrr=uniform:0.1:1", "--", "data=synthetic"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("gradlab: bad --param 'optimizer.lrr=uniform:0.1:1'") and "lrr" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran, no store created


# ---------------------------------------------------------------- named remedies
REMEDIES_PARAMS = "matrix:\n  remedies:\n    lower_lr: [optimizer.lr=0.01]\n    layernorm: [model.norm=layernorm]\n"


def test_search_samples_named_remedies_and_tags_the_trials(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(REMEDIES_PARAMS)
    uri = store_uri(tmp_path / "store")
    code = _search_cli()(["--sampler", "random", "--trials", "4", "--seed", "1", "--tracking-uri", uri, "--params",
                          str(params), "--param", "remedy=choice:clip,lower_lr,layernorm", "--", *FAST, "optimizer=sgd",
                          "trainer.max_steps=4"])
    assert code == 0, capsys.readouterr()
    parents, children = _runs(uri, "gradlab-search")
    kids = children[parents[0].info.run_id]
    expected = {"clip": ("gradient-side", "clip", "0.05", "none"), "lower_lr": ("optimization", "none", "0.01", "none"),
                "layernorm": ("architecture", "none", "0.05", "layernorm")}
    for k in kids:
        tags, p = k.data.tags, k.data.params
        assert (tags["remedy_kind"], tags["stabilizer"], p["optimizer.lr"], p["model.norm"]) == expected[tags["remedy"]]
    assert len({k.data.tags["remedy"] for k in kids}) >= 2
    assert parents[0].data.params["space.remedy"] == "choice:clip,lower_lr,layernorm"


def test_remedy_params_are_checked_before_anything_runs(tmp_path):
    from gradlab.remedies import define
    from gradlab.search import check_space

    remedies = define({"residual": ["model.residual=true"], "lower_lr": ["optimizer.lr=0.01"]})
    with pytest.raises(SearchSpecError, match="remedies are sampled by name"):
        parse_space(["remedy=uniform:0:1"], remedies)
    with pytest.raises(SearchSpecError, match="'he_init' is neither a remedy"):
        parse_space(["remedy=choice:lower_lr,he_init"], remedies)
    space = parse_space(["remedy=choice:lower_lr,residual,[warmup,clip]"], remedies)
    assert space[0].overrides("[warmup,clip]") == ["stabilizer=[warmup,clip]"]
    with pytest.raises(SearchSpecError, match=r"Key 'residual' not in 'MLPConfig' \(with remedy=residual: "
                                              r"model.residual=true\)"):
        check_space(space, ["data=synthetic"])
    check_space(space, ["data=synthetic", "model=deep_mlp"])  # deep_mlp has the knob
