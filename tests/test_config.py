"""Every option of every config group composes against the schemas; config mistakes on the
command line end in ONE line on stderr, exit code 2, and no traceback."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from conftest import CONF, PYTHON, SRC, cli, cli_env, compose, one_line_error
from gradlab.config import ConfigError, check, compose_config
from gradlab.models import build_model
from gradlab.registry import MODELS, OPTIMIZERS, SCHEDULERS, STABILIZERS
from gradlab.stabilizers import selected_names


def options(group: str):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_are_not_empty():
    assert options("data") == ["fashion_mnist", "mnist", "synthetic"]
    assert options("model") == sorted(MODELS.names())
    assert options("optimizer") == sorted(OPTIMIZERS.names())
    assert options("scheduler") == sorted(SCHEDULERS.names())
    assert options("stabilizer") == sorted(STABILIZERS.names())
    assert options("experiment"), "no experiment presets in conf/experiment/"


def test_defaults():
    cfg = compose()
    assert (cfg.data.name, cfg.model.name, cfg.optimizer.name, cfg.scheduler.name) == ("mnist", "mlp", "adam", "none")
    assert selected_names(cfg.stabilizer) == []
    assert cfg.scenario == "default" and cfg.seed == 0
    check(cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g in ("data", "model", "optimizer", "scheduler")
                                          for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg[group].name == option
    check(cfg)


@pytest.mark.parametrize("option", options("model"))
def test_every_model_builds_and_runs(option):
    cfg = compose([f"model={option}", "data=synthetic"])
    model = build_model(cfg.model, cfg.data)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert any(n.startswith("head.") for n, _ in model.named_parameters())  # AGC's "auto" exclusion


STABILIZER_SELECTIONS = [[o] for o in options("stabilizer")] + [
    ["warmup", "clip"], ["agc", "zclip", "spike_skip"], ["clip_value", "autoclip"],
    ["warmup", "clip_value", "agc", "clip", "autoclip", "zclip", "spike_skip"], ["adagc", "spam", "spike_skip"],
]


@pytest.mark.parametrize("selection", STABILIZER_SELECTIONS, ids=lambda s: "+".join(s))
def test_stabilizer_selection_composes(selection):
    cfg = compose([f"stabilizer=[{','.join(selection)}]"])
    check(cfg)
    chosen = [s for s in selection if s != "none"]
    assert sorted(selected_names(cfg.stabilizer)) == sorted(chosen)
    # each option keeps its own node with its own defaults; unselected ones stay null
    for name, node in cfg.stabilizer.items():
        if name == "none":
            continue
        assert (node is not None) == (name in chosen), name


def test_stabilizer_options_keep_their_values_in_a_multi_select():
    cfg = compose(["stabilizer=[warmup,clip]", "stabilizer.clip.max_norm=0.5", "stabilizer.warmup.steps=7"])
    assert cfg.stabilizer.clip.max_norm == 0.5 and cfg.stabilizer.clip.norm_type == 2.0
    assert cfg.stabilizer.warmup.steps == 7
    # applied in the schema's order whatever the command-line order
    assert selected_names(compose(["stabilizer=[spike_skip,clip,agc]"]).stabilizer) == ["agc", "clip", "spike_skip"]
    assert compose(["stabilizer=clip", "stabilizer.clip.norm_type=inf"]).stabilizer.clip.norm_type == float("inf")


def cuda_only(cfg) -> bool:
    return cfg.trainer.precision == "fp16"


@pytest.mark.parametrize("preset", options("experiment"))
def test_experiment_presets_compose(preset):
    cfg = compose([f"experiment={preset}"])
    runnable = not cuda_only(cfg) or torch.cuda.is_available()
    if runnable:
        check(cfg)
    else:  # a CUDA-only scenario on the CPU: a config error naming the key, before anything runs
        with pytest.raises(ConfigError) as err:
            check(cfg)
        assert err.value.key == "trainer.precision" and "CUDA" in err.value.message
    assert cfg.scenario == preset
    assert selected_names(cfg.stabilizer) == []  # presets show the failure; remedies are added on top
    assert cfg.trainer.max_steps and cfg.trainer.max_steps > 0
    # a remedy and a preset value can still be overridden on the command line
    cfg = compose([f"experiment={preset}", "stabilizer=[warmup,clip]", "optimizer.lr=0.123", "trainer.max_steps=7"])
    if runnable:
        check(cfg)
    assert selected_names(cfg.stabilizer) == ["warmup", "clip"]
    assert cfg.optimizer.lr == 0.123 and cfg.trainer.max_steps == 7
    assert cfg.scenario == preset


def test_preset_values_reach_the_config():
    cfg = compose(["experiment=explode_deep_mlp"])
    assert (cfg.model.name, cfg.optimizer.name) == ("deep_mlp", "sgd")
    assert cfg.model.depth == 20 and cfg.model.gain == pytest.approx(1.2247) and cfg.model.init == "kaiming"
    assert cfg.trainer.max_steps == 400 and cfg.trainer.epochs == 1
    cfg = compose(["experiment=explode_rnn"])
    assert (cfg.model.name, cfg.model.nonlinearity, cfg.model.recurrent_gain) == ("rnn", "relu", 1.5)


@pytest.mark.parametrize("override", ["trainer.epoch=3", "trainer.epochs=abc", "model=foo",
                                      "stabilizer=[clip,foo]"])
def test_schema_rejects_at_composition(override):
    with pytest.raises((HydraException, OmegaConfBaseException)):
        compose([override])


@pytest.mark.parametrize("overrides,key", [
    (["model.activation=swish"], "model.activation"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["trainer.max_steps=-1"], "trainer.max_steps"),
    (["stabilizer=clip", "stabilizer.clip.max_norm=-1"], "stabilizer.clip.max_norm"),
    (["stabilizer=zclip", "stabilizer.zclip.warmup_steps=0"], "stabilizer.zclip.warmup_steps"),
    (["stabilizer=zclip", "stabilizer.zclip.alpha=1.5"], "stabilizer.zclip.alpha"),
    (["optimizer.lr=nan"], "optimizer.lr"),
    (["stabilizer=clip", "stabilizer.clip.max_norm=nan"], "stabilizer.clip.max_norm"),
    (["stabilizer=clip", "stabilizer.clip.max_norm=inf"], "stabilizer.clip.max_norm"),
    (["trainer.epochs=0"], "trainer.epochs"),
    (["telemetry.explosion_window=0"], "telemetry.explosion_window"),
    (["data.val_size=60000"], "data.val_size"),
    (["stabilizer=clip_value", "stabilizer.clip_value.clip_value=0"], "stabilizer.clip_value.clip_value"),
    (["model.name=cnn"], "model.name"),
    (["trainer.device=tpu"], "trainer.device"),
    (["trainer.grad_scaler=false"], "trainer.grad_scaler"),
    (["loss.z_loss=-1"], "loss.z_loss"),
    (["model=vit", "model.heads=3"], "model.heads"),
    (["model=vit", "model.patch=5"], "model.patch"),
    (["model=vit", "model.logit_softcap=0"], "model.logit_softcap"),
    (["model=rnn", "model.downsample=3"], "model.downsample"),
    (["stabilizer=autoclip", "stabilizer.autoclip.percentile=0"], "stabilizer.autoclip.percentile"),
    (["stabilizer=warmup", "scheduler=onecycle"], "stabilizer.warmup"),
    (["model.dropout=1.0"], "model.dropout"),
    (["stabilizer=spam", "optimizer=sgd"], "stabilizer.spam"),
    (["stabilizer=spam", "scheduler=onecycle"], "stabilizer.spam.reset_interval"),
    (["stabilizer=spam", "stabilizer.spam.reset_interval=1"], "stabilizer.spam.reset_interval"),
    (["stabilizer=adagc", "stabilizer.adagc.beta=1.0"], "stabilizer.adagc.beta"),
    (["stabilizer=zclip", "stabilizer.zclip.mode=mean"], "stabilizer.zclip.mode"),
    (["stabilizer=zclip", "stabilizer.zclip.clip_factor=0"], "stabilizer.zclip.clip_factor"),
    (["stabilizer=spike_skip", "stabilizer.spike_skip.sided=up"], "stabilizer.spike_skip.sided"),
    (["stabilizer=spike_skip", "stabilizer.spike_skip.min_history=1"], "stabilizer.spike_skip.min_history"),
    (["optimizer=stable_adamw", "optimizer.clip_thresh=0"], "optimizer.clip_thresh"),
])
def test_semantic_checks(overrides, key):
    with pytest.raises(ConfigError) as err:
        check(compose(overrides))
    assert err.value.key == key
    with pytest.raises(ConfigError):  # compose_config (matrix, search) applies the same rules
        compose_config(overrides)


def test_infinite_norm_type_is_allowed():
    check(compose(["stabilizer=clip", "stabilizer.clip.norm_type=inf"]))


@pytest.mark.parametrize("overrides,key", [
    (["optimizer=sgd", "optimizer.decoupled_weight_decay=true"], "optimizer.decoupled_weight_decay"),
    (["model=rnn", "model.residual=true"], "model.residual"),
    (["optimizer=adam", "optimizer.momentum=0.9"], "optimizer.momentum"),
])
def test_a_knob_the_selected_option_lacks_fails_at_composition(overrides, key):
    """Each option has its own schema: what it does not have is an unknown key, not a silent no-op."""
    with pytest.raises((HydraException, OmegaConfBaseException)) as err:
        compose(overrides)
    assert key in str(err.value)


# ---------------------------------------------------------------- the CLI's one-line errors
CLI_ERRORS = {
    "typo": (["trainer.epoch=3"], "trainer.epoch"),
    "typo_nested": (["stabilizer=clip", "stabilizer.clip.max_nrom=2"], "stabilizer.clip.max_nrom"),
    "wrong_type": (["trainer.epochs=abc"], "trainer.epochs"),
    "unknown_option": (["model=foo"], "model"),
    "invalid_choice": (["model.activation=swish"], "model.activation"),
    "unselected_stabilizer": (["stabilizer.clip.max_norm=2"], "stabilizer.clip"),
    "zclip_no_warmup": (["stabilizer=zclip", "stabilizer.zclip.warmup_steps=0"], "stabilizer.zclip.warmup_steps"),
    "sgd_decoupled_decay": (["optimizer=sgd", "optimizer.decoupled_weight_decay=true"],
                            "optimizer.decoupled_weight_decay"),
    "nan_lr": (["optimizer.lr=nan"], "optimizer.lr"),
    "spam_with_sgd": (["stabilizer=spam", "optimizer=sgd"], "stabilizer.spam"),
    "malformed_list": (["stabilizer=[clip,"], "stabilizer"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Each error case through src/train.py, in this process (what the CLI prints and its exit
    code, without paying a Python start-up per case); test_cli_error_in_a_real_process checks one
    case as a separate process."""
    cwd = tmp_path_factory.mktemp("cli_errors")
    out = {name: cli("train.py", *args, "trainer.device=cpu", cwd=cwd) for name, (args, _) in CLI_ERRORS.items()}
    assert not (Path(cwd) / "mlflow.db").exists()  # nothing started
    return out


def test_cli_error_in_a_real_process(tmp_path):
    proc = subprocess.run([PYTHON, str(SRC / "train.py"), "trainer.epoch=3"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    one_line_error((proc.returncode, proc.stdout, proc.stderr), 2, "'trainer.epoch'")


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_config_error_is_one_line(cli_results, case):
    rc, stdout, stderr = cli_results[case]
    key = CLI_ERRORS[case][1]
    assert "Traceback" not in stderr + stdout
    assert rc == 2, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("gradlab:")
    assert f"'{key}" in lines[0]


def test_cli_unknown_option_lists_the_choices(cli_results):
    _, _, stderr = cli_results["unknown_option"]
    line = stderr.strip()
    assert "model/foo" in line
    assert "available: cnn, deep_mlp, lstm, mlp, rnn, vit)" in line
    assert "search path" not in line  # Hydra's search-path dump is not an option list


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA-only scenario runs where CUDA is")
def test_cuda_only_scenario_on_the_cpu_is_one_line(tmp_path):
    one_line_error(cli("train.py", "experiment=fp16_overflow", cwd=tmp_path), 2, "'trainer.precision'", "CUDA")
    assert not (tmp_path / "mlflow.db").exists()  # nothing started
