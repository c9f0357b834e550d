"""The comparison report: matrix runs read back from MLflow, one row per scenario x stabilizer.

The numbers come from the MLflow store, not from ``reports/matrix_runs.json``, so the same
code reports on any selection: the runs listed in a run list, the children of a parent run,
a whole experiment, or an MLflow filter string. ``write_report`` writes into one folder::

    report.md, report.html      the table, the best remedy per scenario, the figures
                                (the HTML embeds the figures: it renders in the MLflow UI too)
    report.csv                  the table with full-precision numbers
    metrics.json                key figures per scenario (DVC metrics; strict JSON)
    accuracy.csv                mean test accuracy per scenario/stabilizer (a DVC plot)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from .tracking import config_hash, tracking_uri  # noqa: E402

NORM_KEYS = {"grad/norm": "before the stabilizers (raw)", "grad/norm_after": "after the stabilizers (applied)"}
BEST_RULE = ("Best remedy (★): in each scenario, the stabilizer with the highest mean test accuracy; exact ties go "
             "to the lower divergence rate, then to the lower wall time per step. `none` competes too, so a "
             "scenario where no remedy beats doing nothing says so.")
DEFINITIONS = [
    ("runs", "finished runs in the cell (one per seed)"),
    ("test accuracy", "mean ± sample standard deviation (n-1) over the runs; a diverged run counts with the "
                      "accuracy of its last (diverged) weights"),
    ("diverged", "runs whose loss or applied gradient became non-finite (training stopped there)"),
    ("diverged at", "median step of divergence over the diverged runs"),
    ("exploded / at", "runs whose gradient norm grew past the explosion threshold, and the median step it was flagged"),
    ("grad norm max / median", "raw (pre-stabilizer) global gradient norm: the largest, and the median, of every "
                               "finite per-step value of every run in the cell"),
    ("clip rate", "mean over the runs of the fraction of steps a stabilizer scaled the gradient down"),
    ("ms/step", "mean wall time per optimizer step"),
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
        notes += [f"failed in the matrix: {r.get('scenario')} stabilizer={r.get('stabilizer')} seed={r.get('seed')} "
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
    return Selection(uri, runs, source, parent if not filter_string else None, notes)


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
            "run_id": run.info.run_id, "scenario": tags["scenario"], "stabilizer": tags["stabilizer"],
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


def summarize(runs: pd.DataFrame, per_step: pd.DataFrame) -> pd.DataFrame:
    """The report table: one row per scenario x stabilizer (in the order of the runs: the run
    list's, else the order they started), with the best remedy of each scenario flagged."""
    cell = ["scenario", "stabilizer"]
    table = runs.groupby(cell, sort=False).agg(
        runs=("run_id", "size"), test_accuracy_mean=("test_accuracy", "mean"),
        test_accuracy_std=("test_accuracy", "std"), diverged_runs=("diverged", "sum"),
        divergence_rate=("diverged", "mean"), diverged_at_step_median=("diverged_at_step", "median"),
        exploded_runs=("exploded", "sum"), explosion_step_median=("explosion_step", "median"),
        clip_rate=("clip_rate", "mean"), ms_per_step=("ms_per_step", "mean"),
        config_hash=("config_hash", _joined), git_commit=("git_commit", _joined),
        data_checksum=("data_checksum", _joined))
    raw = per_step[(per_step.key == "grad/norm") & np.isfinite(per_step.value)].merge(runs[["run_id", *cell]])
    norms = raw.groupby(cell, sort=False).value.agg(grad_norm_max="max", grad_norm_median="median")
    table = table.join(norms).reset_index()
    table.insert(2, "best", False)
    for _, group in table.groupby("scenario", sort=False):
        ranked = group.sort_values(["test_accuracy_mean", "divergence_rate", "ms_per_step"],
                                   ascending=[False, True, True], na_position="last")
        table.loc[ranked.index[0], "best"] = True
    order = ["scenario", "stabilizer", "best", "runs", "test_accuracy_mean", "test_accuracy_std", "diverged_runs",
             "divergence_rate", "diverged_at_step_median", "exploded_runs", "explosion_step_median", "grad_norm_max",
             "grad_norm_median", "clip_rate", "ms_per_step", "config_hash", "git_commit", "data_checksum"]
    return table[order]


def data_notes(runs: pd.DataFrame) -> List[str]:
    """Cells that mix configurations or repeat a seed (an experiment holding several matrices)."""
    notes = []
    for (scenario, stabilizer), group in runs.groupby(["scenario", "stabilizer"], sort=False):
        if group.config_hash.nunique() > 1:
            notes.append(f"{scenario} / {stabilizer} mixes {group.config_hash.nunique()} configurations")
        repeated = sorted(group.seed[group.seed.duplicated()].unique())
        if repeated:
            notes.append(f"{scenario} / {stabilizer} has seed(s) {repeated} more than once")
    return notes


def key_figures(table: pd.DataFrame) -> dict:
    """Per scenario: the best remedy and its numbers, and the `none` baseline's (when in the matrix)."""
    out: Dict[str, dict] = {}
    for scenario, group in table.groupby("scenario", sort=False):
        best = group[group.best].iloc[0]
        fig = {"best_remedy": best.stabilizer, "best_test_accuracy": best.test_accuracy_mean,
               "best_divergence_rate": best.divergence_rate}
        baseline = group[group.stabilizer == "none"]
        if len(baseline):
            fig["none_test_accuracy"] = baseline.test_accuracy_mean.iloc[0]
            fig["none_divergence_rate"] = baseline.divergence_rate.iloc[0]
        out[scenario] = fig
    return {"runs": int(table.runs.sum()), "diverged_runs": int(table.diverged_runs.sum()), "scenarios": out}


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


def _colors(stabilizers: List[str]) -> Dict[str, str]:
    cycle = plt.get_cmap("tab10").colors
    return {s: to_hex(cycle[i % len(cycle)]) for i, s in enumerate(stabilizers)}


def grad_norm_figure(scenario: str, runs: pd.DataFrame, per_step: pd.DataFrame, path: Path) -> Path:
    """Per stabilizer: the median norm across seeds at each step, the min-max band, and an x on
    the top edge where a seed diverged. Non-finite and zero norms (skipped steps) are gaps."""
    runs = runs[runs.scenario == scenario]
    colors = _colors(list(dict.fromkeys(runs.stabilizer)))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    for ax, (key, label) in zip(axes, NORM_KEYS.items()):
        top = blended_transform_factory(ax.transData, ax.transAxes)
        for stabilizer, group in runs.groupby("stabilizer", sort=False):
            series = per_step[(per_step.key == key) & per_step.run_id.isin(group.run_id)]
            grid = series.pivot(index="step", columns="run_id", values="value")
            grid = grid.where(np.isfinite(grid) & (grid > 0))
            color = colors[stabilizer]
            seeds = f"{len(group)} seed{'s' if len(group) > 1 else ''}"
            ax.plot(grid.index, grid.median(axis=1), color=color, lw=1.1, label=f"{stabilizer} ({seeds})")
            ax.fill_between(grid.index, grid.min(axis=1), grid.max(axis=1), color=color, alpha=0.18, lw=0)
            at = group.diverged_at_step.dropna()
            ax.scatter(at, np.ones(len(at)), transform=top, marker="x", color=color, s=40, clip_on=False, zorder=5)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"global gradient norm {label}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("L2 norm (log scale)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{scenario}: line = median over seeds, band = min-max, x on top = a seed diverged", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_figure(runs: pd.DataFrame, table: pd.DataFrame, path: Path) -> Path:
    """Per scenario: mean test accuracy per stabilizer (bar, ± std), each seed a dot (x: diverged)."""
    scenarios = list(dict.fromkeys(table.scenario))
    cols = min(3, len(scenarios))
    rows = math.ceil(len(scenarios) / cols)
    height = 0.45 * table.groupby("scenario").size().max() + 1.6
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.0, 4.6 * cols), height * rows + 0.4), squeeze=False)
    for ax, scenario in zip(axes.flat, scenarios):
        cells = table[table.scenario == scenario].reset_index(drop=True)
        y = np.arange(len(cells))
        colors = ["tab:green" if b else "tab:gray" for b in cells.best]
        ax.barh(y, cells.test_accuracy_mean.fillna(0), xerr=cells.test_accuracy_std.fillna(0), color=colors,
                alpha=0.55, error_kw={"lw": 1})
        for i, stabilizer in enumerate(cells.stabilizer):
            seeds = runs[(runs.scenario == scenario) & (runs.stabilizer == stabilizer)]
            for diverged, marker in ((False, "o"), (True, "x")):
                acc = seeds.test_accuracy[seeds.diverged == diverged]
                ax.scatter(acc, np.full(len(acc), i), marker=marker, s=18, color="black", zorder=3)
        ax.set_yticks(y)
        ax.set_yticklabels([f"★ {s}" if b else s for s, b in zip(cells.stabilizer, cells.best)])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("test accuracy")
        ax.set_title(scenario, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(scenarios):]:
        ax.set_visible(False)
    fig.suptitle("test accuracy: bar = mean ± std over seeds, o = a seed, x = a diverged seed\n★ = best remedy",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- writing
def _number(value: float, fmt: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, fmt)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as readers see it: formatted strings, — for no value."""
    def step(v):
        return _number(v, ".0f")

    return pd.DataFrame({
        "scenario": table.scenario,
        "stabilizer": [f"{s} ★" if b else s for s, b in zip(table.stabilizer, table.best)],
        "runs": table.runs,
        "test accuracy": [f"{_number(m, '.4f')} ± {_number(s, '.4f')}"
                          for m, s in zip(table.test_accuracy_mean, table.test_accuracy_std)],
        "diverged": [f"{d}/{n}" for d, n in zip(table.diverged_runs, table.runs)],
        "diverged at": table.diverged_at_step_median.map(step),
        "exploded": [f"{e}/{n}" for e, n in zip(table.exploded_runs, table.runs)],
        "exploded at": table.explosion_step_median.map(step),
        "grad norm max": table.grad_norm_max.map(lambda v: _number(v, ".3g")),
        "grad norm median": table.grad_norm_median.map(lambda v: _number(v, ".3g")),
        "clip rate": table.clip_rate.map(lambda v: _number(v, ".2f")),
        "ms/step": table.ms_per_step.map(lambda v: _number(v, ".2f")),
        "config": table.config_hash,
        "commit": table.git_commit.map(lambda c: re.sub(r"\b([0-9a-f]{10})[0-9a-f]{30}", r"\1", c)),
        "data": table.data_checksum,
    })


def _best_lines(table: pd.DataFrame) -> List[str]:
    lines = []
    for _, row in table[table.best].iterrows():
        lines.append(f"{row.scenario}: {row.stabilizer} (test accuracy {_number(row.test_accuracy_mean, '.4f')}, "
                     f"diverged {row.diverged_runs}/{row.runs})")
    return lines


def _markdown(sel: Selection, table: pd.DataFrame, figures: Dict[str, Path], notes: List[str]) -> str:
    out = ["# Gradient-explosion remedies: comparison report", "",
           f"{int(table.runs.sum())} finished runs: {sel.source}. MLflow store: `{sel.uri}`.", "",
           display_table(table).to_markdown(index=False), "", BEST_RULE, "", "## Best remedy per scenario", ""]
    out += [f"- {line}" for line in _best_lines(table)]
    out += ["", "## Columns", ""] + [f"- **{name}**: {text}" for name, text in DEFINITIONS]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    out += ["", "## Figures", ""]
    out += [f"![{name}]({path.parent.name}/{path.name})" for name, path in figures.items()]
    return "\n".join(out) + "\n"


def _html(sel: Selection, table: pd.DataFrame, figures: Dict[str, Path], notes: List[str]) -> str:
    """Self-contained (figures inlined as data URIs), so it also renders as an MLflow artifact."""
    def items(lines):
        return "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>"

    images = "".join(f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" style="max-width:100%" '
                     f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
                     for name, path in figures.items())
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
             "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
             "td:nth-child(-n+2){text-align:left}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>gradlab comparison report</title>"
            f"<style>{style}</style></head><body><h1>Gradient-explosion remedies: comparison report</h1>"
            f"<p>{int(table.runs.sum())} finished runs: {html.escape(sel.source)}. MLflow store: "
            f"<code>{html.escape(sel.uri)}</code>.</p>"
            f"{display_table(table).to_html(index=False, border=0)}<p>{html.escape(BEST_RULE)}</p>"
            f"<h2>Best remedy per scenario</h2>{items(_best_lines(table))}"
            f"<h2>Columns</h2>{items(f'{n}: {t}' for n, t in DEFINITIONS)}"
            + (f"<h2>Notes</h2>{items(notes)}" if notes else "") + f"<h2>Figures</h2>{images}</body></html>\n")


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
    table = summarize(runs, per_step)
    notes = sel.notes + data_notes(runs)
    figures = {f"gradient norm: {s}": grad_norm_figure(s, runs, per_step, out / "figures" / f"grad_norm_{_slug(s)}.png")
               for s in dict.fromkeys(table.scenario)}
    figures["test accuracy"] = accuracy_figure(runs, table, out / "figures" / "test_accuracy.png")
    files = list(figures.values())
    for name, text in (("report.md", _markdown(sel, table, figures, notes)),
                       ("report.html", _html(sel, table, figures, notes)),
                       ("metrics.json", json.dumps(_strict(key_figures(table)), indent=2, allow_nan=False) + "\n")):
        (out / name).write_text(text, encoding="utf-8")
        files.append(out / name)
    table.to_csv(out / "report.csv", index=False)
    pd.DataFrame({"scenario_stabilizer": table.scenario + "/" + table.stabilizer,
                  "test_accuracy": table.test_accuracy_mean.round(6)}).to_csv(out / "accuracy.csv", index=False)
    files += [out / "report.csv", out / "accuracy.csv"]
    if sel.parent_run_id:
        for path in files:
            client.log_artifact(sel.parent_run_id, str(path), "report/figures" if path.parent.name == "figures" else "report")
    return Report(table, runs, files, sel.parent_run_id)
