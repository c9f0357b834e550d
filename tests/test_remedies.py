"""Remedies as named overrides: their kind, their definitions (typos fail, naming the remedy), the
matrix's plan (not applicable vs a broken scenario), the command line, and the presets that let
another model or optimizer replace the scenario's own."""
from __future__ import annotations

import runpy
import sys

import pytest

from conftest import ROOT, compose
from gradlab.config import ConfigError
from gradlab.matrix import load_spec, narrow, plan, spec_from_dict
from gradlab.models import build_model
from gradlab.remedies import Remedy, define, load, remedy_kind, resolve, stabilizer_remedy


@pytest.mark.parametrize("overrides, kind", [
    ([], "baseline"),
    (["stabilizer=none"], "baseline"),
    (["stabilizer=clip"], "gradient-side"),
    (["stabilizer=[agc,zclip]", "stabilizer.agc.clipping=0.02"], "gradient-side"),
    (["stabilizer=warmup", "stabilizer.warmup.steps=100"], "optimization"),  # it schedules the LR
    (["stabilizer=[warmup,clip]"], "combined"),
    (["model.init=kaiming", "model.gain=1.0"], "initialization"),
    (["model.recurrent_init=identity"], "initialization"),
    (["model=lstm"], "architecture"),
    (["model.norm=layernorm"], "architecture"),
    (["model.residual=true", "model.depth=4"], "architecture"),
    (["optimizer=adam", "optimizer.lr=0.001"], "optimization"),
    (["scheduler=cosine"], "optimization"),
    (["trainer.batch_size=512", "trainer.epochs=4"], "optimization"),
    (["loss.l1=1e-5"], "optimization"),
    (["stabilizer=clip", "model.norm=layernorm"], "combined"),
    (["data.sequence=pixels"], "other"),
])
def test_remedy_kind_follows_from_its_keys(overrides, kind):
    assert remedy_kind(overrides) == kind


def test_stabilizer_values_are_remedies_named_by_themselves():
    assert stabilizer_remedy("clip") == Remedy("clip", ("stabilizer=clip",))
    assert stabilizer_remedy(["warmup", "clip"]) == Remedy("[warmup,clip]", ("stabilizer=[warmup,clip]",))
    assert stabilizer_remedy("he_init") is None
    defined = define({"he_init": ["model.gain=1.0"], "lstm": "model=lstm"})
    assert resolve("lstm", defined, "k").overrides == ("model=lstm",)  # a string is split like a command line
    assert resolve("[warmup,clip]", defined, "k").kind == "combined"
    with pytest.raises(ConfigError, match="'hee_init' is neither a remedy of matrix.remedies"):
        resolve("hee_init", defined, "matrix.scenarios.x.remedies")


@pytest.mark.parametrize("definition, message", [
    ({"he_init": ["model.inti=kaiming"]}, "'model.inti=kaiming': no model option has a key 'inti'"),
    ({"big": ["trainer.batch_sise=512"]}, "'trainer' has no key 'batch_sise'"),
    ({"gated": ["model=gru"]}, "'gru' is not a model option"),
    ({"clip2": ["stabilizer=[clip,clp]"]}, "'clp' is not a stabilizer option"),
    ({"clip2": ["stabilizer.clip.max_nrom=2"]}, "'stabilizer.clip' has no key 'max_nrom'"),
    ({"bad": ["model.norm=="]}, "cannot parse"),
    ({"bad": [{"model": 1}]}, "expected a list of Hydra overrides"),
])
def test_a_remedy_no_config_could_take_is_an_error_naming_it(definition, message):
    with pytest.raises(ConfigError, match=message) as err:
        define(definition)
    assert err.value.key == f"matrix.remedies.{next(iter(definition))}"


def test_a_knob_of_another_option_is_not_a_typo():
    # residual is a deep_mlp knob, recurrent_init an rnn/lstm one: fine to define, n/a elsewhere
    assert set(define({"residual": ["model.residual=true"], "irnn": ["model.recurrent_init=identity"]})) == \
        {"residual", "irnn"}


# ---------------------------------------------------------------- the matrix's definition and plan
def test_spec_keeps_the_older_stabilizers_list_and_per_scenario_lists():
    spec = spec_from_dict({"stabilizers": ["none", "clip", ["warmup", "clip"]],
                           "remedies": {"he_init": ["model.gain=1.0"]},
                           "scenarios": ["explode_high_lr", {"name": "explode_deep_mlp", "remedies": ["clip", "he_init"]}]})
    assert list(spec.remedies) == ["none", "clip", "[warmup,clip]", "he_init"]
    high_lr, deep = spec.scenarios
    assert [r.name for r in spec.remedies_of(high_lr)] == ["none", "clip", "[warmup,clip]", "he_init"]  # no list: all
    assert [r.name for r in spec.remedies_of(deep)] == ["clip", "he_init"]
    assert deep.overrides == ["experiment=explode_deep_mlp", "scenario=explode_deep_mlp"]
    combo = spec.combinations()[-1]
    assert combo.overrides == ["experiment=explode_deep_mlp", "scenario=explode_deep_mlp", "model.gain=1.0", "seed=0"]


@pytest.mark.parametrize("matrix, key, message", [
    ({"stabilizers": ["clip"], "remedies": {"clip": ["stabilizer=clip"]}, "scenarios": ["x"]},
     "matrix.remedies.clip", "defined twice"),
    ({"remedies": {"a": []}, "scenarios": [{"name": "s", "remedies": ["b"]}]}, "matrix.scenarios.s.remedies",
     "'b' is neither"),
    ({"scenarios": [{"name": "s", "remedy": ["clip"]}]}, "matrix.scenarios.s.remedy", "unknown key"),
    ({"remedies": ["he_init"], "scenarios": ["x"]}, "matrix.remedies", "not a stabilizer value"),
    ({"scenarios": ["x"], "seeds": [0, -1]}, "matrix.seeds", ">= 0"),
])
def test_bad_matrix_definitions_name_the_key(matrix, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        spec_from_dict(matrix)
    assert err.value.key == key


def test_plan_marks_cells_that_do_not_compose_as_not_applicable():
    spec = spec_from_dict({"remedies": {"none": [], "residual": ["model.residual=true"], "lstm": ["model=lstm"],
                                        "adam": ["optimizer=adam", "optimizer.lr=0.001"]},
                           "scenarios": ["explode_deep_mlp", "explode_rnn", "explode_high_lr"], "seeds": [0, 1]})
    lines = []
    combos, not_applicable = plan(spec, lines.append)
    cells = {(c.scenario.name, c.remedy.name) for c in combos}
    assert ("explode_deep_mlp", "residual") in cells and ("explode_rnn", "lstm") in cells
    assert ("explode_high_lr", "adam") in cells and ("explode_rnn", "adam") in cells
    na = {(c["scenario"], c["remedy"]): c for c in not_applicable}
    assert set(na) == {("explode_rnn", "residual"), ("explode_high_lr", "residual"), ("explode_deep_mlp", "lstm")}
    assert na[("explode_rnn", "residual")]["reason"] == \
        "invalid config 'model.residual': Key 'residual' not in 'RNNConfig'"
    assert na[("explode_deep_mlp", "lstm")]["remedy_kind"] == "architecture"
    assert len(combos) == 2 * (3 * 4 - 3) and [c.index for c in combos] == list(range(len(combos)))
    assert sum("not applicable" in line for line in lines) == 3


def test_plan_fails_for_a_scenario_that_does_not_compose_and_warns_for_a_remedy_that_fits_none():
    spec = spec_from_dict({"remedies": {"none": []}, "scenarios": ["explode_nothing"]})
    with pytest.raises(Exception, match="explode_nothing"):
        plan(spec)
    spec = spec_from_dict({"remedies": {"slow": ["optimizer.lr=1e-4", "optimizer.momentum=0.5"]},
                           "scenarios": [{"name": "adam", "experiment": None, "overrides": ["optimizer=adam"]}]})
    lines = []
    combos, not_applicable = plan(spec, lines.append)
    assert combos == [] and len(not_applicable) == 1
    assert lines[-1] == "matrix: warning: remedy 'slow' applies to no scenario of this matrix (check its overrides)"


def test_command_line_narrows_the_matrix():
    spec = load_spec(ROOT / "params.yaml")
    rnn = narrow(load_spec(ROOT / "params.yaml"), ["explode_rnn", "explode_high_lr_copy"], None)
    assert [s.name for s in rnn.scenarios] == ["explode_rnn", "explode_high_lr_copy"]
    assert rnn.scenarios[0].remedies == next(s for s in spec.scenarios if s.name == "explode_rnn").remedies
    assert rnn.scenarios[1].remedies is None  # not in params.yaml: a preset name, every remedy
    both = narrow(spec, None, ["none", "lstm", "[warmup,clip]"])
    for sc in both.scenarios:
        assert [r.name for r in sc.remedies] == ["none", "lstm", "[warmup,clip]"]


def test_default_matrix_compares_at_least_four_non_gradient_remedies_per_scenario():
    spec = load_spec(ROOT / "params.yaml")
    combos, not_applicable = plan(spec)
    for sc in spec.scenarios:
        kinds = {c.remedy.name: c.remedy.kind for c in combos if c.scenario is sc}
        assert sum(k in ("initialization", "architecture", "optimization") for k in kinds.values()) >= 4, sc.name
        assert {"none", "clip"} <= set(kinds)
    assert not_applicable, "the default report shows how a not-applicable cell reads"
    assert load(ROOT / "params.yaml") == spec.remedies


def test_matrix_cli_typo_in_a_remedy_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("matrix:\n  remedies:\n    he_init: [model.inti=kaiming]\n  scenarios: [explode_deep_mlp]\n")
    monkeypatch.setattr(sys, "argv", ["matrix.py", "--params", str(params)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "pipelines" / "matrix.py"), run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "gradlab: invalid config 'matrix.remedies.he_init': 'model.inti=kaiming': no model option has a key 'inti'"]
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------- presets another option can replace
def test_lstm_remedy_keeps_the_rnn_scenario_but_the_cell():
    rnn, lstm = compose(["experiment=explode_rnn"]), compose(["experiment=explode_rnn", "model=lstm"])
    assert (rnn.model.nonlinearity, rnn.model.recurrent_init, rnn.model.recurrent_gain) == ("relu", "orthogonal", 1.5)
    assert lstm.model.name == "lstm" and lstm.model.hidden == rnn.model.hidden == 128
    assert (lstm.model.recurrent_init, lstm.model.recurrent_gain) == ("default", 1.0)  # the LSTM's own init
    for key in ("data", "optimizer", "trainer", "scenario", "stabilizer", "seed"):
        assert lstm[key] == rnn[key], key
    assert type(build_model(lstm.model, lstm.data).rnn).__name__ == "LSTM"


def test_adam_remedy_keeps_the_high_lr_scenario_but_the_optimizer():
    sgd = compose(["experiment=explode_high_lr"])
    adam = compose(["experiment=explode_high_lr", "optimizer=adam", "optimizer.lr=0.001"])
    assert (sgd.optimizer.name, sgd.optimizer.lr, sgd.optimizer.momentum) == ("sgd", 1.0, 0.0)
    assert (adam.optimizer.name, adam.optimizer.lr) == ("adam", 0.001)
    for key in ("data", "model", "trainer", "scenario"):
        assert adam[key] == sgd[key], key
    assert compose(["experiment=explode_deep_mlp"]).optimizer.momentum == 0.9
