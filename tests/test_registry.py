"""The registries are the single source of option names and defaults: each registered option
has its YAML (which names its schema and repeats no default), its schema and its tests, every
YAML option is registered, and the README lists every option."""
from __future__ import annotations

import re

import pytest
import yaml

from conftest import CONF, ROOT
from gradlab.registry import FAULTS, MODELS, OPTIMIZERS, SCHEDULERS, STABILIZERS, Schema

GROUPS = {"model": MODELS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "stabilizer": STABILIZERS,
          "fault": FAULTS}
MULTI_SELECT = ("stabilizer", "fault")  # each option's node under its own key
TESTS = {"model": ROOT / "tests" / "test_models.py", "stabilizer": ROOT / "tests" / "test_stabilizers.py",
         "fault": ROOT / "tests" / "test_fault_injection.py"}


@pytest.mark.parametrize("group", GROUPS)
def test_registered_options_and_yaml_files_match(group):
    files = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert files == sorted(GROUPS[group].names()), f"conf/{group}/ and the {group} registry disagree"


@pytest.mark.parametrize("group,name", [(g, e.name) for g, r in GROUPS.items() for e in r])
def test_each_option_has_a_schema_and_a_yaml_without_defaults(group, name):
    entry = GROUPS[group][name]
    assert issubclass(entry.schema, Schema)
    doc = yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}
    if group in MULTI_SELECT:  # the option's node under its own key, defaults from the schema
        assert doc == {name: {}}, f"conf/{group}/{name}.yaml should be `{name}: {{}}`"
    else:
        assert doc == {"defaults": [f"/schema/{group}/{name}@_here_", "_self_"]}, \
            f"conf/{group}/{name}.yaml should name its schema and set no values (defaults live in the schema)"


def test_stabilizer_run_order_is_explicit():
    orders = [e.order for e in STABILIZERS]
    assert len(set(orders)) == len(orders), "two stabilizers share a place in the run order"
    assert STABILIZERS.names()[0] == "none"


@pytest.mark.parametrize("group,name", [(g, e.name) for g in TESTS for e in GROUPS[g] if e.name != "none"])
def test_each_model_stabilizer_and_fault_has_its_tests(group, name):
    text = TESTS[group].read_text()
    assert re.search(rf"^def test_{name}_\w+", text, re.M), f"{TESTS[group].name} has no test_{name}_... test"
    if group == "stabilizer" and STABILIZERS[name].obj is not None:
        from test_stabilizers import STATEFUL

        assert name in STATEFUL, f"{name} is missing from test_stabilizers.STATEFUL (state round trip)"


def readme_row(group: str) -> str:
    text = (ROOT / "README.md").read_text()
    row = re.search(rf"^\| `{group}`[^\n]*", text, re.M)
    assert row, f"README's command-line table has no `{group}` row"
    return row.group(0)


def test_readme_has_the_generated_options_table():
    from gradlab.config import options_table

    assert options_table() in (ROOT / "README.md").read_text(), \
        "README's options table is stale: paste the output of `python -m gradlab.config`"


@pytest.mark.parametrize("group", GROUPS)
def test_readme_lists_every_option(group):
    row = readme_row(group)
    for name in GROUPS[group].names():
        assert f"`{name}`" in row, f"README's `{group}` row does not list `{name}`"
