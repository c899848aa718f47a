"""`fedcollm report`: tables and plots of finished runs and comparisons, from their files alone.

- A run folder (`config.toml` + `metrics.jsonl`) gets PNG plots in `<run>/plots/`: accuracy and
  acc_norm per round of each evaluated model (`accuracy_slm.png`, `accuracy_llm.png`; a client's
  own SLM as a thin line), the per-round losses of metrics.jsonl (`loss_per_round.png`: each
  client's `train_loss`, the server's distillation or LLM training loss) and, where the run wrote
  TensorBoard events (`report_to`), the loss of every optimiser step (`loss_per_step.png`);
  metrics.jsonl holds only each round's mean. Its final accuracies come back as table rows.
- A comparison folder (`fedcollm compare`'s: `runs/<task>-<method>-<hash>/` run folders) gets its
  report rebuilt by `experiment.report.write_report`: report.md, the tables' CSV files and plots.
  Each run's task, method and seed come from its config.toml; only finished runs (with
  results.md) count, and of several runs of one task, method and seed the one finished last.
  Runs are ordered as `fedcollm compare` ran them: by the runs' `compare.seeds`, `compare.tasks`
  and `compare.methods` (what is not listed there, after it in sorted order).

Nothing is trained or evaluated; every folder is checked before anything is written.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedcollm.config import ALGORITHM_NAMES
from fedcollm.errors import FedcollmError
from fedcollm.experiment.report import RunRef, accuracy_by_round, read_metrics, write_report
from fedcollm.experiment.tracking import STEPS, TENSORBOARD_DIR

RUN_FILES = ("config.toml", "metrics.jsonl")
"""What makes a folder a run folder."""
PLOTS_DIR = "plots"
"""Where `render_run` writes a run's PNGs."""
ROLES = ("slm", "llm")

FolderKind = Literal["run", "comparison"]


class ReportError(FedcollmError, ValueError):
    """A folder `fedcollm report` cannot render; the message names it and what it lacks."""


@dataclass(frozen=True)
class RunReport:
    """What `render_run` made of a run folder."""

    folder: Path
    title: str
    rows: list[dict[str, str]]
    """Accuracy before training and after the last round, one row per model (and client)."""
    plots: list[Path]


@dataclass(frozen=True)
class ComparisonReport:
    """What `render` made of a comparison folder."""

    folder: Path
    runs: list[RunRef]
    markdown: str
    """The rebuilt report.md."""
    notes: list[str] = field(default_factory=list)
    """Run folders left out, and why."""


def _is_run(folder: Path) -> bool:
    return all((folder / name).is_file() for name in RUN_FILES)


def _run_folders(folder: Path) -> list[Path]:
    runs = folder / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir() and _is_run(p)) if runs.is_dir() else []


def folder_kind(path: Path) -> FolderKind:
    """Whether `path` is a run folder or a comparison folder; a `ReportError` if it is neither."""
    if not path.exists():
        raise ReportError(f"{path}: no such folder")
    if not path.is_dir():
        raise ReportError(f"{path}: a file, not a run folder or a comparison folder")
    if _is_run(path):
        return "run"
    if _run_folders(path):
        return "comparison"
    missing = " and ".join(name for name in RUN_FILES if not (path / name).is_file())
    raise ReportError(
        f"{path}: neither a run folder (it has no {missing}) nor a comparison folder (it has no "
        "runs/<task>-<method>-<hash>/ run folders, as `fedcollm compare` writes)"
    )


def _run_config(folder: Path) -> dict[str, Any]:
    """The raw config.toml of a run (raw: a run of an older version still renders)."""
    path = folder / "config.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ReportError(f"{path}: not valid TOML: {exc}") from None
    task = data.get("task")
    if not isinstance(data.get("algorithm"), str) or not isinstance(task, dict) or "name" not in task:
        raise ReportError(f"{path}: names no algorithm and task.name, so it is no run's config.toml")
    return data


def _percent(value: float | None, err: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + ("" if err is None else f" ± {100 * err:.1f}")


def score_keys(metrics: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """What the run's models were scored with: acc and acc_norm, or (answers written in free
    text) exact match, token F1 and Rouge-L."""
    if any(m["metric"] == "exact_match" for m in metrics):
        return ("exact_match", "f1", "rouge_l")
    return ("acc", "acc_norm")


def _cells(metrics: Sequence[dict[str, Any]], role: str, client: int | None) -> dict[str, str]:
    """The last round one model was evaluated in, its scores at round 0 and then."""

    def curve(key: str) -> dict[int, float]:
        if client is None:
            return accuracy_by_round(metrics, role, key)
        return {
            m["round"]: m["value"]
            for m in metrics
            if m["role"] == role and m["metric"] == key and m["client"] == client
        }

    keys = score_keys(metrics)
    last = max(curve(keys[0]))
    cells = {"last round": str(last)}
    for key in keys:
        values, errors = curve(key), curve(f"{key}_stderr")
        cells[f"{key} before"] = _percent(values.get(0), errors.get(0))
        cells[f"{key} after"] = _percent(values.get(last), errors.get(last))
    return cells


def accuracy_table(metrics: Sequence[dict[str, Any]], config: dict[str, Any]) -> list[dict[str, str]]:
    """One row per evaluated model: its name, the last round evaluated, its scores (acc and
    acc_norm, or exact match, F1 and Rouge-L; in %, ± standard error) before training and after; a
    client's own SLM gets a row of its own."""
    first = score_keys(metrics)[0]
    names = {role: (config.get(role) or {}).get("name", "-") for role in ROLES}
    client_models = (config.get("federation") or {}).get("client_models") or []
    rows = []
    for role in ROLES:
        evaluated = accuracy_by_round(metrics, role, first)
        clients = sorted(
            {m["client"] for m in metrics if m["role"] == role and m["metric"] == first} - {None}
        )
        if not evaluated and not clients:
            continue
        who = [(role.upper(), None)] if evaluated else []
        who += [(f"{role.upper()} client {k}", k) for k in clients]
        for label, client in who:
            own = role == "slm" and client is not None and client < len(client_models)
            name = client_models[client] if own and client is not None else names[role]
            rows.append({"model": label, "name": name} | _cells(metrics, role, client))
    return rows


def _step_losses(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> (step, loss) from a run's TensorBoard step events (empty where it wrote none)."""
    path = folder / TENSORBOARD_DIR / STEPS
    if not path.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()[SCALARS]}


def _who(line: dict[str, Any]) -> str:
    client = line["client"]
    if line["role"] == "client":
        return "clients" if client is None else f"client {client}"
    return line["role"] if client is None else f"{line['role']} client {client}"


def plot_run(folder: Path, metrics: Sequence[dict[str, Any]], title: str) -> list[Path]:
    """The PNGs of one run into `<folder>/plots/` (replacing what an earlier report put there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = folder / PLOTS_DIR
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    written = []

    def save(fig: Any, ax: Any, name: str, xlabel: str, ylabel: str) -> None:
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        written.append(out / name)

    keys = score_keys(metrics)
    for role in ROLES:
        lines = [m for m in metrics if m["role"] == role and m["metric"] in keys]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for client in sorted({m["client"] for m in lines} - {None}):
            curve = {
                m["round"]: m["value"] for m in lines if m["client"] == client and m["metric"] == keys[0]
            }
            xs = sorted(curve)
            ax.plot(xs, [100 * curve[x] for x in xs], lw=0.8, alpha=0.5, label=f"{keys[0]}, client {client}")
        for key in keys:
            curve = accuracy_by_round(metrics, role, key)
            xs = sorted(curve)
            if xs:
                ax.plot(xs, [100 * curve[x] for x in xs], marker="o", label=key)
        what = "accuracy" if keys[0] == "acc" else "score"
        save(fig, ax, f"accuracy_{role}.png", "round", f"{role.upper()} {what} (%)")
        plt.close(fig)

    losses = [m for m in metrics if m["metric"].endswith("loss")]
    if losses:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for who, key in dict.fromkeys((_who(m), m["metric"]) for m in losses):
            curve = {m["round"]: m["value"] for m in losses if (_who(m), m["metric"]) == (who, key)}
            xs = sorted(curve)
            ax.plot(xs, [curve[x] for x in xs], marker="o", label=f"{who} {key}")
        save(fig, ax, "loss_per_round.png", "round", "loss (mean over the round)")
        plt.close(fig)

    steps = _step_losses(folder)
    if steps:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for tag, points in steps.items():
            ax.plot([s for s, _ in points], [v for _, v in points], lw=0.8, label=tag)
        save(fig, ax, "loss_per_step.png", "optimiser step (whole run)", "loss")
        plt.close(fig)
    return written


def render_run(folder: Path, config: dict[str, Any] | None = None) -> RunReport:
    """Plots and the final-accuracy table of one run folder (`config`: its config.toml, read)."""
    config = _run_config(folder) if config is None else config
    metrics = read_metrics(folder)
    title = f"{config.get('name', folder.name)}: {config['algorithm']} on {config['task']['name']}"
    return RunReport(folder, title, accuracy_table(metrics, config), plot_run(folder, metrics, title))


def _order(found: Iterable[Any], preferred: Iterable[Any]) -> dict[Any, int]:
    """Sort keys: `preferred` first, in its order, then the rest in sorted order."""
    order: dict[Any, int] = {}
    for value in [*preferred, *sorted(found)]:
        order.setdefault(value, len(order))
    return order


def comparison_runs(folder: Path) -> tuple[list[RunRef], list[str]]:
    """The finished runs of a comparison folder in the order `fedcollm compare` ran them (seed,
    task, method: as the runs' `compare` section lists them), and a note for each run left out."""
    notes = []
    latest: dict[tuple[str, str, int], tuple[float, RunRef, dict[str, Any]]] = {}
    for run in _run_folders(folder):
        config = _run_config(run)
        if not (run / "results.md").is_file():
            notes.append(f"{run}: left out, not finished (no results.md)")
            continue
        ref = RunRef(config["task"]["name"], config["algorithm"], run, int(config.get("seed", 0)))
        entry = ((run / "results.md").stat().st_mtime, ref, config)
        key = (ref.task, ref.method, ref.seed)
        if key in latest:
            older, entry = sorted([latest[key], entry], key=lambda e: e[0])
            notes.append(f"{older[1].folder}: left out, {entry[1].folder} is a later run of the same method")
        latest[key] = entry
    if not latest:
        raise ReportError(f"{folder}: no finished run in {folder / 'runs'} (none has results.md)")
    sections = [entry[2].get("compare") or {} for entry in latest.values()]
    seeds = _order((seed for *_, seed in latest), (s for c in sections for s in c.get("seeds") or []))
    tasks = _order((task for task, *_ in latest), (t for c in sections for t in c.get("tasks") or []))
    methods = _order(
        (method for _, method, _ in latest),
        [*(m for c in sections for m in c.get("methods") or []), *ALGORITHM_NAMES],
    )
    refs = [entry[1] for entry in latest.values()]
    refs.sort(key=lambda r: (seeds[r.seed], tasks[r.task], methods[r.method]))
    return refs, notes


def render(paths: Sequence[Path]) -> list[RunReport | ComparisonReport]:
    """Render each run or comparison folder; all are checked before anything is written."""
    checked: list[tuple[Path, dict[str, Any] | None, tuple[list[RunRef], list[str]] | None]] = []
    for path in paths:
        if folder_kind(path) == "run":
            checked.append((path, _run_config(path), None))
        else:
            checked.append((path, None, comparison_runs(path)))
    reports: list[RunReport | ComparisonReport] = []
    for path, config, comparison in checked:
        if comparison is None:
            reports.append(render_run(path, config))
        else:
            runs, notes = comparison
            reports.append(ComparisonReport(path, runs, write_report(runs, path), notes))
    return reports
