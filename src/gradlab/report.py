"""The comparison report: matrix runs read back from MLflow, one row per scenario x remedy.

The numbers come from the MLflow store, not from ``reports/matrix_runs.json``, so the same
code reports on any selection: the runs listed in a run list, the children of a parent run,
a whole experiment, or an MLflow filter string. ``write_report`` writes into one folder::

    report.md, report.html      the table (remedies grouped by kind, with their cost), the best
                                remedy per scenario and of each kind, the figures
                                (the HTML embeds the figures: it renders in the MLflow UI too)
    report.csv                  the table with full-precision numbers
    summary.json                key figures per scenario: best remedy, best of each kind and its cost
    metrics.json                the DVC metrics: per scenario the best and the none test accuracy
    accuracy.csv                mean test accuracy per scenario/remedy (a DVC plot)

A row is a remedy (the run's ``remedy`` tag; a run without one, e.g. from before remedies
existed, counts as the remedy named by its ``stabilizer`` tag). Cells the matrix found not
applicable (its parent run's ``matrix/not_applicable.json``) are rows too, with the reason,
when the whole matrix is selected.
    figures/grad_norm_<scenario>.png, figures/test_accuracy.png

Column definitions (``DEFINITIONS``) and the best-remedy rule (``BEST_RULE``) are printed in
the report itself.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.artifacts import download_artifacts  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from .remedies import KINDS, stabilizer_kind  # noqa: E402
from .tracking import config_hash, tracking_uri  # noqa: E402

NORM_KEYS = {"grad/norm": "before the stabilizers (raw)", "grad/norm_after": "after the stabilizers (applied)"}
BEST_RULE = ("Best remedy (★): in each scenario, the remedy of any kind with the highest mean test accuracy; exact "
             "ties go to the lower divergence rate, then to the lower wall time per step. `none` competes too, so a "
             "scenario where no remedy beats doing nothing says so; a not-applicable cell does not compete.")
KIND_COLORS = {"baseline": "tab:gray", "gradient-side": "tab:blue", "initialization": "tab:orange",
               "architecture": "tab:green", "optimization": "tab:purple", "combined": "tab:brown", "other": "tab:olive"}
DEFINITIONS = [
    ("kind", "what the remedy changes, from the keys it sets: gradient-side (a stabilizer that transforms the "
             "gradient), initialization (model init/gain), architecture (any other model change), optimization "
             "(optimizer, learning rate and its schedule incl. warmup, batch size, loss), combined (several kinds)"),
    ("runs", "finished runs in the cell (one per seed); n/a: the remedy does not compose with the scenario "
             "(the reason is listed under *Not applicable*)"),
    ("test accuracy", "mean ± sample standard deviation (n-1) over the runs; a diverged run counts with the "
                      "accuracy of its last (diverged) weights"),
    ("diverged", "runs whose loss or applied gradient became non-finite (training stopped there)"),
    ("diverged at", "median step of divergence over the diverged runs"),
    ("exploded / at", "runs whose gradient norm grew past the explosion threshold, and the median step it was flagged"),
    ("grad norm max / median", "raw (pre-stabilizer) global gradient norm: the largest, and the median, of every "
                               "finite per-step value of every run in the cell"),
    ("clip rate", "mean over the runs of the fraction of steps a stabilizer scaled the gradient down"),
    ("ms/step", "mean wall time per optimizer step (the training loop divided by its steps, as measured next to "
                "whatever else the machine ran; in a run that diverged within a few steps, fixed costs dominate)"),
    ("parameters", "trainable and non-trainable parameters of the model"),
    ("config / commit / data", "config hash (resolved config less seed, paths and tracking.*), git commit and "
                               "data checksum of the runs"),
]


class ReportError(ValueError):
    """Bad input (missing run list, unknown run or experiment, no runs): one line for the CLI."""


@dataclass
class Selection:
    uri: str
    runs: List[Run]  # finished child runs, oldest first
    source: str  # how they were chosen, for the report header
    parent_run_id: Optional[str]  # the run the report is logged to (None: not logged)
    notes: List[str] = field(default_factory=list)  # runs left out, and why
    not_applicable: List[dict] = field(default_factory=list)  # the matrix's cells that did not compose


# ---------------------------------------------------------------- selecting runs
def _client(uri: str) -> MlflowClient:
    """A client on an existing store: opening a missing SQLite file would create an empty one."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ReportError(f"no MLflow store at {uri[len('sqlite:///'):]} (pass --tracking-uri)")
    return MlflowClient(uri)


def _search(client: MlflowClient, experiment_ids: List[str], filter_string: str) -> List[Run]:
    runs: List[Run] = []
    token = None
    try:
        while True:
            page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token,
                                      order_by=["attributes.start_time ASC"])
            runs += list(page)
            token = page.token
            if not token:
                return runs
    except MlflowException as exc:
        raise ReportError(f"cannot search runs with filter {filter_string!r}: {exc.message.splitlines()[0]}") from None


def read_run_list(path: str | Path) -> dict:
    """The run list written by ``gradlab.matrix.run_matrix``."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path} not found (run pipelines/matrix.py first, or select runs with "
                          "--parent, --experiment or --filter)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or not doc.get("parent_run_id") or not isinstance(doc.get("run_ids"), list):
        raise ReportError(f"{path} is not a matrix run list (needs parent_run_id and run_ids)")
    return doc


def select_runs(runs_file: Optional[str | Path] = None, parent: Optional[str] = None,
                experiment: Optional[str] = None, filter_string: Optional[str] = None,
                uri: Optional[str] = None) -> Selection:
    """The finished matrix child runs picked by one of runs_file / parent / experiment, narrowed by
    ``filter_string`` (alone, it searches every experiment). The report goes to the parent run only
    when the whole matrix is selected (run list or parent, no filter): a subset must not overwrite it."""
    if sum(x is not None for x in (runs_file, parent, experiment)) > 1:
        raise ReportError("select runs by one of a run list, --parent or --experiment")
    clauses = [filter_string] if filter_string else []
    listed: Optional[Dict[str, int]] = None
    notes: List[str] = []
    if runs_file is not None:
        doc = read_run_list(runs_file)
        uri = uri or doc.get("tracking_uri")
        parent = doc["parent_run_id"]
        listed = {run_id: i for i, run_id in enumerate(doc["run_ids"])}  # the matrix's cell order
        notes += [f"failed in the matrix: {r.get('scenario')} remedy={r.get('remedy')} seed={r.get('seed')} "
                  f"({r.get('error', 'no error recorded')})" for r in doc.get("failed", [])]
        source = f"runs listed in {runs_file} (parent run {parent})"
    uri = tracking_uri(uri)
    client = _client(uri)
    if parent is not None:
        try:
            experiment_ids = [client.get_run(parent).info.experiment_id]
        except MlflowException:
            raise ReportError(f"parent run {parent} not found in {uri}") from None
        clauses.append(f"tags.mlflow.parentRunId = '{parent}'")
        if runs_file is None:
            source = f"children of parent run {parent}"
    elif experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ReportError(f"experiment '{experiment}' not found in {uri}")
        experiment_ids = [exp.experiment_id]
        source = f"experiment '{experiment}'"
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        source = "all experiments"
    if filter_string:
        source += f", filter {filter_string!r}"
    found = _search(client, experiment_ids, " AND ".join(clauses)) if experiment_ids else []
    runs = []
    for run in found:
        tags = run.data.tags
        if (listed is not None and run.info.run_id not in listed) or "scenario" not in tags or "stabilizer" not in tags:
            continue  # not in the run list, or not a training run (e.g. a matrix parent)
        if run.info.status != "FINISHED":
            notes.append(f"left out ({run.info.status}): run {run.info.run_id} {tags['scenario']} "
                         f"stabilizer={tags['stabilizer']} seed={tags.get('seed')}")
            continue
        runs.append(run)
    if not runs:
        raise ReportError(f"no finished training runs match {source} in {uri}")
    if listed is not None:  # the run list's order, not the start order (parallel jobs interleave)
        runs.sort(key=lambda r: listed[r.info.run_id])
    whole = parent if not filter_string else None
    return Selection(uri, runs, source, whole, notes, read_not_applicable(uri, whole) if whole else [])


def read_not_applicable(uri: str, parent: str) -> List[dict]:
    """The cells a matrix found not applicable, from its parent run (none for older matrices)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = download_artifacts(run_id=parent, artifact_path="matrix/not_applicable.json", dst_path=tmp,
                                      tracking_uri=uri)
        except (MlflowException, OSError):
            return []
        return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- reading and aggregating
def _metric(run: Run, key: str) -> float:
    return float(run.data.metrics.get(key, math.nan))


def stored_value(value: float) -> float:
    """The value logged: MLflow's SQL store keeps +/-inf as +/-max float (SQL has no infinity),
    which would otherwise read back as a finite, astronomically large gradient norm."""
    return math.copysign(math.inf, value) if abs(value) == sys.float_info.max else value


def read_runs(client: MlflowClient, runs: List[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per run (tags, summary metrics, config hash) and its per-step gradient norms
    (long format: run_id, key, step, value)."""
    rows, steps = [], []
    for run in runs:
        tags = run.data.tags
        rows.append({
            "run_id": run.info.run_id, "scenario": tags["scenario"], "remedy": tags.get("remedy", tags["stabilizer"]),
            "kind": tags.get("remedy_kind") or stabilizer_kind(tags["stabilizer"].split("+")),
            "stabilizer": tags["stabilizer"], "parameters": _metric(run, "model/parameters"),
            "seed": int(tags.get("seed", -1)), "test_accuracy": _metric(run, "test/accuracy"),
            "diverged": tags.get("diverged") == "true", "diverged_at_step": _metric(run, "diverged_at_step"),
            "exploded": tags.get("exploding") == "true", "explosion_step": _metric(run, "explosion/step"),
            "clip_rate": _metric(run, "clip_rate"), "ms_per_step": _metric(run, "time/step_ms"),
            "config_hash": tags.get("config_hash") or config_hash(run.data.params),
            "git_commit": tags.get("git_commit", "unknown"), "data_checksum": tags.get("data_checksum", "unknown"),
        })
        for key in NORM_KEYS:
            steps += [(run.info.run_id, key, m.step, stored_value(m.value))
                      for m in client.get_metric_history(run.info.run_id, key)]
    per_step = pd.DataFrame(steps, columns=["run_id", "key", "step", "value"]).sort_values(["run_id", "key", "step"])
    return pd.DataFrame(rows), per_step


def _joined(values: pd.Series) -> str:
    return ", ".join(dict.fromkeys(values))  # distinct, in order: one value unless the cell mixes runs


COLUMNS = ["scenario", "kind", "remedy", "best", "applicable", "runs", "test_accuracy_mean", "test_accuracy_std",
           "diverged_runs", "divergence_rate", "diverged_at_step_median", "exploded_runs", "explosion_step_median",
           "grad_norm_max", "grad_norm_median", "clip_rate", "ms_per_step", "parameters", "stabilizer", "config_hash",
           "git_commit", "data_checksum", "reason"]


def summarize(runs: pd.DataFrame, per_step: pd.DataFrame, not_applicable: Sequence[dict] = ()) -> pd.DataFrame:
    """The report table: one row per scenario x remedy, the not-applicable cells included, grouped by
    kind within each scenario (``KINDS`` order, then the order the runs started), and the best
    remedy of each scenario flagged."""
    cell = ["scenario", "remedy"]
    table = runs.groupby(cell, sort=False).agg(
        kind=("kind", "first"), runs=("run_id", "size"), test_accuracy_mean=("test_accuracy", "mean"),
        test_accuracy_std=("test_accuracy", "std"), diverged_runs=("diverged", "sum"),
        divergence_rate=("diverged", "mean"), diverged_at_step_median=("diverged_at_step", "median"),
        exploded_runs=("exploded", "sum"), explosion_step_median=("explosion_step", "median"),
        clip_rate=("clip_rate", "mean"), ms_per_step=("ms_per_step", "mean"), parameters=("parameters", "mean"),
        stabilizer=("stabilizer", _joined), config_hash=("config_hash", _joined), git_commit=("git_commit", _joined),
        data_checksum=("data_checksum", _joined))
    raw = per_step[(per_step.key == "grad/norm") & np.isfinite(per_step.value)].merge(runs[["run_id", *cell]])
    norms = raw.groupby(cell, sort=False).value.agg(grad_norm_max="max", grad_norm_median="median")
    table = table.join(norms).reset_index().assign(applicable=True, reason="")
    missing = pd.DataFrame([{"scenario": c["scenario"], "remedy": c["remedy"], "kind": c["remedy_kind"],
                             "applicable": False, "reason": c["reason"], "runs": 0, "diverged_runs": 0,
                             "exploded_runs": 0} for c in not_applicable])
    if len(missing):
        table = pd.concat([table, missing], ignore_index=True)
        table[["stabilizer", "config_hash", "git_commit", "data_checksum"]] = \
            table[["stabilizer", "config_hash", "git_commit", "data_checksum"]].fillna("")
    table = _by_kind(table).assign(best=False)
    for _, group in table[table.applicable].groupby("scenario", sort=False):
        table.loc[_ranked(group).index[0], "best"] = True
    return table[COLUMNS]


def _by_kind(table: pd.DataFrame) -> pd.DataFrame:
    """Scenarios in the order they appear; within one, kinds in ``KINDS`` order, then as they appear."""
    scenarios = {s: i for i, s in enumerate(dict.fromkeys(table.scenario))}
    keys = pd.DataFrame({"s": table.scenario.map(scenarios), "k": table.kind.map(_kind_rank),
                         "i": np.arange(len(table))}, index=table.index)
    return table.loc[keys.sort_values(["s", "k", "i"]).index].reset_index(drop=True)


def _kind_rank(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def _ranked(group: pd.DataFrame) -> pd.DataFrame:
    """Cells best first: the best-remedy rule (BEST_RULE)."""
    return group.sort_values(["test_accuracy_mean", "divergence_rate", "ms_per_step"], ascending=[False, True, True],
                             na_position="last")


def best_of_kind(group: pd.DataFrame) -> pd.DataFrame:
    """One scenario's best applicable cell of each kind, in the table's (kind) order."""
    ran = group[group.applicable]
    return pd.DataFrame([_ranked(cells).iloc[0] for _, cells in ran.groupby("kind", sort=False)])


def data_notes(runs: pd.DataFrame) -> List[str]:
    """Cells that mix configurations or repeat a seed (an experiment holding several matrices)."""
    notes = []
    for (scenario, remedy), group in runs.groupby(["scenario", "remedy"], sort=False):
        if group.config_hash.nunique() > 1:
            notes.append(f"{scenario} / {remedy} mixes {group.config_hash.nunique()} configurations")
        repeated = sorted(group.seed[group.seed.duplicated()].unique())
        if repeated:
            notes.append(f"{scenario} / {remedy} has seed(s) {repeated} more than once")
    return notes


def key_figures(table: pd.DataFrame) -> dict:
    """Per scenario: the best remedy and its numbers, the best of each kind with its cost, the
    `none` baseline's numbers (when in the matrix) and how many cells were not applicable."""
    out: Dict[str, dict] = {}
    for scenario, group in table.groupby("scenario", sort=False):
        best = group[group.best].iloc[0]
        fig = {"best_remedy": best.remedy, "best_kind": best.kind, "best_test_accuracy": best.test_accuracy_mean,
               "best_divergence_rate": best.divergence_rate}
        baseline = group[group.applicable & (group.remedy == "none")]
        if len(baseline):
            fig["none_test_accuracy"] = baseline.test_accuracy_mean.iloc[0]
            fig["none_divergence_rate"] = baseline.divergence_rate.iloc[0]
        fig["best_of_kind"] = {row.kind: {"remedy": row.remedy, "test_accuracy": row.test_accuracy_mean,
                                          "ms_per_step": row.ms_per_step, "parameters": row.parameters}
                               for row in best_of_kind(group).itertuples()}
        fig["not_applicable"] = int((~group.applicable).sum())
        out[scenario] = fig
    return {"runs": int(table.runs.sum()), "diverged_runs": int(table.diverged_runs.sum()),
            "not_applicable": int((~table.applicable).sum()), "scenarios": out}


def dvc_metrics(figures: dict) -> dict:
    """The few numbers ``dvc metrics show`` and ``dvc exp show`` tabulate, one column each: per
    scenario the best remedy's and ``none``'s mean test accuracy (the rest is in summary.json)."""
    out = {k: figures[k] for k in ("runs", "diverged_runs", "not_applicable")}
    for scenario, fig in figures["scenarios"].items():
        out[scenario] = {"best": fig["best_test_accuracy"],
                         **({"none": fig["none_test_accuracy"]} if "none_test_accuracy" in fig else {})}
    return out


def _strict(value):
    """JSON-safe: NaN/inf become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


# ---------------------------------------------------------------- figures
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _colors(remedies: List[str]) -> Dict[str, str]:
    cycle = plt.get_cmap("tab20").colors
    return {s: to_hex(cycle[i % len(cycle)]) for i, s in enumerate(remedies)}


def grad_norm_figure(scenario: str, runs: pd.DataFrame, per_step: pd.DataFrame, path: Path) -> Path:
    """Per remedy: the median norm across seeds at each step, the min-max band, and an x on
    the top edge where a seed diverged. Non-finite and zero norms (skipped steps) are gaps."""
    runs = runs[runs.scenario == scenario]
    colors = _colors(list(dict.fromkeys(runs.remedy)))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    for ax, (key, label) in zip(axes, NORM_KEYS.items()):
        top = blended_transform_factory(ax.transData, ax.transAxes)
        for remedy, group in runs.groupby("remedy", sort=False):
            series = per_step[(per_step.key == key) & per_step.run_id.isin(group.run_id)]
            grid = series.pivot(index="step", columns="run_id", values="value")
            grid = grid.where(np.isfinite(grid) & (grid > 0))
            color = colors[remedy]
            seeds = f"{len(group)} seed{'s' if len(group) > 1 else ''}"
            ax.plot(grid.index, grid.median(axis=1), color=color, lw=1.1, label=f"{remedy} ({seeds})")
            ax.fill_between(grid.index, grid.min(axis=1), grid.max(axis=1), color=color, alpha=0.18, lw=0)
            at = group.diverged_at_step.dropna()
            ax.scatter(at, np.ones(len(at)), transform=top, marker="x", color=color, s=40, clip_on=False, zorder=5)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"global gradient norm {label}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("L2 norm (log scale)")
    axes[0].legend(fontsize=7, loc="best", ncol=2)
    fig.suptitle(f"{scenario}: line = median over seeds, band = min-max, x on top = a seed diverged", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_figure(runs: pd.DataFrame, table: pd.DataFrame, path: Path) -> Path:
    """Per scenario: mean test accuracy per remedy (bar, ± std, coloured by kind), each seed a dot
    (x: diverged); a not-applicable cell is a row without a bar."""
    from matplotlib.patches import Patch

    scenarios = list(dict.fromkeys(table.scenario))
    cols = min(3, len(scenarios))
    rows = math.ceil(len(scenarios) / cols)
    height = 0.32 * table.groupby("scenario").size().max() + 1.6
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.0, 4.8 * cols), height * rows + 0.8), squeeze=False)
    for ax, scenario in zip(axes.flat, scenarios):
        cells = table[table.scenario == scenario].reset_index(drop=True)
        y = np.arange(len(cells))
        ax.barh(y, cells.test_accuracy_mean.fillna(0), xerr=cells.test_accuracy_std.fillna(0),
                color=[KIND_COLORS.get(k, "tab:olive") for k in cells.kind], alpha=0.6, error_kw={"lw": 1},
                edgecolor="black", linewidth=[1.5 if b else 0 for b in cells.best])
        for i, cell in cells.iterrows():
            if not cell.applicable:
                ax.text(0.01, i, "not applicable", va="center", fontsize=7, color="dimgray")
            seeds = runs[(runs.scenario == scenario) & (runs.remedy == cell.remedy)]
            for diverged, marker in ((False, "o"), (True, "x")):
                acc = seeds.test_accuracy[seeds.diverged == diverged]
                ax.scatter(acc, np.full(len(acc), i), marker=marker, s=14, color="black", zorder=3)
        ax.set_yticks(y)
        ax.set_yticklabels([f"★ {r}" if b else r for r, b in zip(cells.remedy, cells.best)], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("test accuracy")
        ax.set_title(scenario, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(scenarios):]:
        ax.set_visible(False)
    kinds = [k for k in KIND_COLORS if k in set(table.kind)]
    fig.legend(handles=[Patch(color=KIND_COLORS[k], alpha=0.6, label=k) for k in kinds], loc="lower center",
               ncol=len(kinds), fontsize=8, frameon=False)
    fig.suptitle("test accuracy: bar = mean ± std over seeds (colour = kind), o = a seed, x = a diverged seed\n"
                 "★ = best remedy", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- writing
def _number(value: float, fmt: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, fmt)


def _count(value: float) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{int(value):,}"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as readers see it: formatted strings, — for no value, n/a for a not-applicable cell."""
    def step(v):
        return _number(v, ".0f")

    def of_runs(counts, ok):
        return [f"{c}/{n}" if a else "—" for c, n, a in zip(counts, table.runs, ok)]

    ok = table.applicable
    return pd.DataFrame({
        "scenario": table.scenario,
        "kind": table.kind,
        "remedy": [f"{r} ★" if b else r for r, b in zip(table.remedy, table.best)],
        "runs": [str(n) if a else "n/a" for n, a in zip(table.runs, ok)],
        "test accuracy": [f"{_number(m, '.4f')} ± {_number(s, '.4f')}" if a else "not applicable"
                          for m, s, a in zip(table.test_accuracy_mean, table.test_accuracy_std, ok)],
        "diverged": of_runs(table.diverged_runs, ok),
        "diverged at": table.diverged_at_step_median.map(step),
        "exploded": of_runs(table.exploded_runs, ok),
        "exploded at": table.explosion_step_median.map(step),
        "grad norm max": table.grad_norm_max.map(lambda v: _number(v, ".3g")),
        "grad norm median": table.grad_norm_median.map(lambda v: _number(v, ".3g")),
        "clip rate": table.clip_rate.map(lambda v: _number(v, ".2f")),
        "ms/step": table.ms_per_step.map(lambda v: _number(v, ".2f")),
        "parameters": table.parameters.map(_count),
        "config": table.config_hash,
        "commit": table.git_commit.map(lambda c: re.sub(r"\b([0-9a-f]{10})[0-9a-f]{30}", r"\1", c)),
        "data": table.data_checksum,
    })


def _best_lines(table: pd.DataFrame) -> List[str]:
    lines = []
    for _, row in table[table.best].iterrows():
        lines.append(f"{row.scenario}: {row.remedy} ({row.kind}; test accuracy {_number(row.test_accuracy_mean, '.4f')}, "
                     f"diverged {row.diverged_runs}/{row.runs})")
    return lines


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}× none" if math.isfinite(value) and math.isfinite(base) and base > 0 else "—"


def kind_lines(table: pd.DataFrame) -> Dict[str, List[str]]:
    """Per scenario: the best remedy of each kind, its accuracy next to its cost (time per step and
    parameters, also relative to `none`)."""
    out: Dict[str, List[str]] = {}
    for scenario, group in table.groupby("scenario", sort=False):
        none = group[group.applicable & (group.remedy == "none")]
        base_ms, base_p = (none.ms_per_step.iloc[0], none.parameters.iloc[0]) if len(none) else (math.nan, math.nan)
        out[scenario] = [
            f"{row.kind}: {row.remedy} — test accuracy {_number(row.test_accuracy_mean, '.4f')} ± "
            f"{_number(row.test_accuracy_std, '.4f')}, diverged {row.diverged_runs}/{row.runs}; "
            f"{_number(row.ms_per_step, '.2f')} ms/step ({_ratio(row.ms_per_step, base_ms)}), "
            f"{_count(row.parameters)} parameters ({_ratio(row.parameters, base_p)})"
            for row in best_of_kind(group).itertuples()]
    return out


def _not_applicable_lines(table: pd.DataFrame) -> List[str]:
    return [f"{r.scenario} / {r.remedy}: {r.reason}" for r in table[~table.applicable].itertuples()]


def _sections(table: pd.DataFrame, notes: List[str]) -> List[tuple]:
    """(heading, lines, nested lines per line or None) of the report's lists, shared by Markdown and HTML."""
    kinds = kind_lines(table)
    return [("Best remedy per scenario", _best_lines(table), None),
            ("Best of each kind: rescued at what price", list(kinds), kinds),
            ("Not applicable", _not_applicable_lines(table), None),
            ("Columns", [f"{name}: {text}" for name, text in DEFINITIONS], None),
            ("Notes", notes, None)]


def _header(sel: Selection, table: pd.DataFrame) -> str:
    na = int((~table.applicable).sum())
    return (f"{int(table.runs.sum())} finished runs: {sel.source}. MLflow store: `{sel.uri}`." +
            (f" {na} scenario × remedy cell{'s' if na > 1 else ''} not applicable." if na else ""))


def _markdown(sel: Selection, table: pd.DataFrame, figures: Dict[str, Path], notes: List[str]) -> str:
    out = ["# Gradient-explosion remedies: comparison report", "", _header(sel, table), "",
           display_table(table).to_markdown(index=False), "", BEST_RULE]
    for heading, lines, nested in _sections(table, notes):
        if lines:
            out += ["", f"## {heading}", ""]
            for line in lines:
                out += [f"- {line}", *(f"  - {sub}" for sub in (nested or {}).get(line, []))]
    out += ["", "## Figures", ""]
    out += [f"![{name}]({path.parent.name}/{path.name})" for name, path in figures.items()]
    return "\n".join(out) + "\n"


def _html(sel: Selection, table: pd.DataFrame, figures: Dict[str, Path], notes: List[str]) -> str:
    """Self-contained (figures inlined as data URIs), so it also renders as an MLflow artifact."""
    def items(lines, nested):
        return "<ul>" + "".join(f"<li>{html.escape(x)}{items(nested[x], None) if nested else ''}</li>"
                                for x in lines) + "</ul>"

    lists = "".join(f"<h2>{html.escape(heading)}</h2>{items(lines, nested)}"
                    for heading, lines, nested in _sections(table, notes) if lines)
    images = "".join(f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" style="max-width:100%" '
                     f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
                     for name, path in figures.items())
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
             "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
             "td:nth-child(-n+3){text-align:left}")
    header = html.escape(_header(sel, table)).replace(f"`{html.escape(sel.uri)}`", f"<code>{html.escape(sel.uri)}</code>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>gradlab comparison report</title>"
            f"<style>{style}</style></head><body><h1>Gradient-explosion remedies: comparison report</h1>"
            f"<p>{header}</p>{display_table(table).to_html(index=False, border=0)}<p>{html.escape(BEST_RULE)}</p>"
            f"{lists}<h2>Figures</h2>{images}</body></html>\n")


@dataclass
class Report:
    table: pd.DataFrame  # summarize()'s table
    runs: pd.DataFrame  # one row per run
    files: List[Path]  # everything written
    parent_run_id: Optional[str]  # where the files were logged (None: not logged)


def write_report(sel: Selection, out_dir: str | Path = "reports") -> Report:
    """Read the selected runs, write the report files into ``out_dir``, and log them to the parent run."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    client = MlflowClient(sel.uri)
    runs, per_step = read_runs(client, sel.runs)
    table = summarize(runs, per_step, sel.not_applicable)
    notes = sel.notes + data_notes(runs)
    figures = {f"gradient norm: {s}": grad_norm_figure(s, runs, per_step, out / "figures" / f"grad_norm_{_slug(s)}.png")
               for s in dict.fromkeys(runs.scenario)}
    figures["test accuracy"] = accuracy_figure(runs, table, out / "figures" / "test_accuracy.png")
    files = list(figures.values())
    for name, text in (("report.md", _markdown(sel, table, figures, notes)),
                       ("report.html", _html(sel, table, figures, notes)),
                       ("summary.json", json.dumps(_strict(key_figures(table)), indent=2, allow_nan=False) + "\n"),
                       ("metrics.json", json.dumps(_strict(dvc_metrics(key_figures(table))), indent=2,
                                                   allow_nan=False) + "\n")):
        (out / name).write_text(text, encoding="utf-8")
        files.append(out / name)
    table.to_csv(out / "report.csv", index=False)
    ran = table[table.applicable]
    pd.DataFrame({"scenario_remedy": ran.scenario + "/" + ran.remedy,
                  "test_accuracy": ran.test_accuracy_mean.round(6)}).to_csv(out / "accuracy.csv", index=False)
    files += [out / "report.csv", out / "accuracy.csv"]
    if sel.parent_run_id:
        for path in files:
            client.log_artifact(sel.parent_run_id, str(path), "report/figures" if path.parent.name == "figures" else "report")
    return Report(table, runs, files, sel.parent_run_id)
