"""Command line: `fedcollm run`, `compare`, `report`, `deploy` and `eval`.

Every command turns a `FedcollmError` (bad input: a config key, a data file, a model, a client)
into one `error:` line and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedcollm.errors import FedcollmError
from fedcollm.protocol import Reporter

if TYPE_CHECKING:
    import torch

    from fedcollm.config import ExperimentConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

DEFAULT_CONFIG = Path("configs/default.toml")
EXIT_BAD_INPUT = 2

Command = TypeVar("Command", bound=Callable[..., Any])


class RichReporter(Reporter):
    """Shows the current unit of work with a progress bar and keeps a log of messages."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=None, info="")

    def phase(self, description: str, total: int | None = None) -> None:
        self.progress.update(self.task, description=description, total=total, completed=0, info="")
        if not self.progress.console.is_terminal:  # no live display in logs: one line per phase
            self.progress.console.log(description)

    def advance(self, completed: int, total: int | None = None, info: str = "") -> None:
        self.progress.update(self.task, completed=completed, total=total, info=info)

    def message(self, text: str) -> None:
        self.progress.console.log(text)


def _progress() -> Progress:
    """The live display of long work: current phase, bar, count, detail, elapsed time."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=console, transient=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=EXIT_BAD_INPUT)


def _reports_bad_input(command: Command) -> Command:
    """Run a command, printing a `FedcollmError` as one error line instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FedcollmError as exc:
            raise _fail(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING)
    # peft imports bitsandbytes where it is installed, which logs at import that an optional
    # faster CPU kernel package is absent; its own fallback is what runs, correctly.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _print_plan(cfg: ExperimentConfig, secure_aggregation: bool = False) -> None:
    from fedcollm.experiment.plan import plan

    lines = plan(cfg, secure_aggregation=secure_aggregation)
    console.print(f"[bold]{cfg.name}[/]: {cfg.algorithm} (dry run, nothing trained)")
    for line in lines:
        typer.echo(f"{line.label:>10}: {line.value}")


DeviceOption = Annotated[
    str | None,
    typer.Option(
        "--device",
        help='Where the models compute: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or '
        "\"mps\" (the experiment's `device`; a model's own `device` still wins).",
    ),
]


def _site_data(items: list[str], num_clients: int, option: str = "--site-data") -> dict[int, Path]:
    """`--site-data K=PATH` (or `--site-eval`) options as client -> file, each checked to name a
    client and a path."""
    from fedcollm.config import ConfigError

    sites: dict[int, Path] = {}
    for item in items:
        client, sep, path = item.partition("=")
        if not sep or not client.strip().isdigit() or not path:
            raise ConfigError(f"{option} {item!r}: expected CLIENT=PATH, e.g. {option} 0=site-a.jsonl")
        k = int(client)
        if not 0 <= k < num_clients:
            raise ConfigError(f"{option} {item!r}: client {k} is not one of 0..{num_clients - 1}")
        if not Path(path).exists():
            raise ConfigError(f"{option} {item!r}: {path} does not exist")
        sites[k] = Path(path)
    return sites


def _with_device(overrides: list[str] | None, device: str | None) -> list[str]:
    """`--set` overrides with `--device X` as one more: `device=X`."""
    return [*(overrides or []), *([f"device={device}"] if device is not None else [])]


@app.command()
@_reports_bad_input
def run(
    config: Annotated[
        Path | None, typer.Argument(help="Experiment TOML (default: configs/default.toml).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set federation.rounds=2")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<config name>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this folder from its newest checkpoint (its config.toml is the "
            "experiment; a CONFIG or --set given as well must resolve to the same)."
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option(help="local: every party in this process; flower: Flower's simulation engine.")
    ] = "local",
    secagg: Annotated[
        bool, typer.Option(help="With --engine flower: aggregate adapter uploads with SecAgg+.")
    ] = False,
    gpus_per_client: Annotated[
        float,
        typer.Option(help="With --engine flower: share of a GPU per client actor (0.25 = four per GPU)."),
    ] = 0.0,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the config, data and models offline as the run would, print the plan; train nothing.",
        ),
    ] = False,
    device: DeviceOption = None,
) -> None:
    """Run an experiment (embedded engine, or Flower simulation) and write its run folder."""
    from fedcollm.config import load_config
    from fedcollm.engines import ENGINES, run_experiment

    _quiet_libraries()
    if engine not in ENGINES:
        raise _fail(f"unknown --engine {engine!r}; use one of: {', '.join(ENGINES)}")
    overrides = _with_device(set_, device)
    if resume is not None:
        cfg, out = _resumed_experiment(resume, config, overrides, out, overwrite)
    else:
        cfg = load_config(config or DEFAULT_CONFIG, overrides)
        out = out or Path("runs") / cfg.name
    if dry_run:
        _print_plan(cfg, secure_aggregation=engine == "flower" and secagg)
        return
    console.print(
        f"[bold]{cfg.name}[/]: {cfg.algorithm} · task {cfg.task.name} · {cfg.federation.num_clients} clients "
        f"on {cfg.slm.name}"
        + (f" · server {cfg.llm.name}" if cfg.llm else "")
        + f" · {cfg.federation.rounds} rounds"
    )
    with _progress() as progress:
        flower = None
        if engine == "flower":
            from fedcollm.engines.flower.options import FlowerOptions

            flower = FlowerOptions(secagg=secagg, gpus_per_client=gpus_per_client)
        run_experiment(
            cfg,
            out,
            overwrite=overwrite,
            resume=resume is not None,
            reporter=RichReporter(progress),
            engine="flower" if engine == "flower" else "local",
            flower=flower,
        )
    console.print(f"[green]done[/]: {out}")
    console.print((out / "results.md").read_text(encoding="utf-8"))


def _resumed_experiment(
    folder: Path, config: Path | None, overrides: list[str], out: Path | None, overwrite: bool
) -> tuple[ExperimentConfig, Path]:
    """The experiment of the run folder `folder`, checked against a CONFIG/--set/--out also given."""
    from fedcollm.config import load_config

    if overwrite:
        raise _fail("--resume continues a run and --overwrite replaces it: pass one of them")
    if out is not None and out.resolve() != folder.resolve():
        raise _fail(f"--resume {folder} writes to that folder; drop --out {out}")
    saved = folder / "config.toml"
    if not saved.is_file():
        raise _fail(f"--resume {folder}: no run there (no config.toml)")
    cfg = load_config(saved)
    if config is not None or overrides:
        asked = load_config(config or saved, overrides)
        if asked.to_toml() != cfg.to_toml():
            raise _fail(
                f"--resume {folder}: the experiment given differs from the one in {saved}; "
                "a run continues with its own configuration"
            )
    return cfg, folder


@app.command()
@_reports_bad_input
def deploy(
    config: Annotated[Path, typer.Argument(help="Experiment TOML.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set federation.rounds=2")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<config name>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
    secagg: Annotated[bool, typer.Option(help="Aggregate adapter uploads with SecAgg+.")] = True,
    tls: Annotated[bool, typer.Option(help="TLS between SuperNodes and SuperLink (local test CA).")] = True,
    auth: Annotated[bool, typer.Option(help="Only registered SuperNodes may connect (needs TLS).")] = False,
    device: DeviceOption = None,
    site_data: Annotated[
        list[str] | None,
        typer.Option(
            help="Client K's own training file, given to its SuperNode as data-path: "
            '--site-data 0=site-a.jsonl (experiments with task.client_source = "files").'
        ),
    ] = None,
    site_eval: Annotated[
        list[str] | None,
        typer.Option(
            help="Client K's own evaluation file, given to its SuperNode as eval-path: "
            "--site-eval 0=eval-a.jsonl (experiments with task.client_eval = true)."
        ),
    ] = None,
    flower_executor: Annotated[
        bool,
        typer.Option(
            help="Let Flower start a fresh ClientApp process per message instead of forking "
            "each from a warm executor beside its SuperNode (slower by seconds per message)."
        ),
    ] = False,
) -> None:
    """Run an experiment on Flower's deployment engine: a SuperLink and one SuperNode per client,
    each a separate process on 127.0.0.1 (docs/deployment.md shows the same on real machines)."""
    from fedcollm.algorithms import check_config
    from fedcollm.config import load_config
    from fedcollm.engines.flower.deploy import deploy_experiment

    _quiet_libraries()
    set_ = _with_device(set_, device)
    cfg = load_config(config, set_)
    # The run's processes do not start in this folder: name the files absolutely.
    for key in ("client_data", "client_eval_data"):
        if getattr(cfg.task, key):
            files = [str(Path(path).resolve()) for path in getattr(cfg.task, key)]
            set_ = [*set_, f"task.{key}={json.dumps(files)}"]
    for key in ("aux_data", "eval_data"):
        if getattr(cfg.task, key):
            set_ = [*set_, f"task.{key}={json.dumps(str(Path(getattr(cfg.task, key)).resolve()))}"]
    if Path(cfg.task.source).exists():
        set_ = [*set_, f"task.source={json.dumps(str(Path(cfg.task.source).resolve()))}"]
    sites = _site_data(site_data or [], cfg.federation.num_clients)
    evals = _site_data(site_eval or [], cfg.federation.num_clients, "--site-eval")
    check_config(cfg, str(config), secure_aggregation=secagg)
    out = out or Path("runs") / cfg.name
    console.print(
        f"[bold]{cfg.name}[/]: {cfg.algorithm} on a local Flower deployment · "
        f"{cfg.federation.num_clients} SuperNodes · TLS {'on' if tls else 'off'} · "
        f"SecAgg+ {'on' if secagg else 'off'}"
    )
    deploy_experiment(
        config,
        set_ or [],
        out,
        num_clients=cfg.federation.num_clients,
        tls=tls,
        auth=auth,
        options={"secagg": secagg},
        overwrite=overwrite,
        on_status=console.log,
        site_data=sites,
        site_eval=evals,
        warm_clientapps=not flower_executor,
    )
    console.print(f"[green]done[/]: {out}")
    console.print((out / "results.md").read_text(encoding="utf-8"))


@app.command("eval")
@_reports_bad_input
def eval_(
    model: Annotated[str, typer.Option(help="Offline alias, hub id, local folder or .gguf file.")],
    task: Annotated[
        str,
        typer.Option(
            help="Task name: a multiple-choice task (arc_easy, ...) or a short-answer QA task scored "
            "by generation (nq_open, trivia_qa, arc_easy_gen, arc_challenge_gen)."
        ),
    ],
    adapter: Annotated[Path | None, typer.Option(help="A peft adapter folder to apply.")] = None,
    split: Annotated[
        str | None,
        typer.Option(help="Split to evaluate; default: where lm-eval scores the task (test, or validation)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate a seeded subset of N questions.")] = None,
    source: Annotated[str, typer.Option(help='"auto", "olmo", "hub" or a JSONL path.')] = "auto",
    format_: Annotated[str, typer.Option("--format", help='"lm_eval" or "answer_text".')] = "lm_eval",
    seed: int = 0,
    batch_size: int = 16,
    dtype: Annotated[
        str,
        typer.Option(
            help='Base model dtype: "float32" (scores as lm-evaluation-harness computes them), '
            '"bfloat16" or "auto" (bfloat16 on CPUs with native bf16: about twice as fast).'
        ),
    ] = "float32",
    device: Annotated[
        str, typer.Option(help='"auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".')
    ] = "auto",
    quantization: Annotated[
        str, typer.Option(help='Base weights: "none", "8bit" or "4bit" (NF4; bitsandbytes).')
    ] = "none",
    harness: Annotated[
        str,
        typer.Option(
            help='"fedcollm" (ours, offline data) or "lm-eval": lm-evaluation-harness\'s own task '
            "(--task is its lm-eval name; data from the hub; --limit takes its first N; "
            "--split/--source/--format/--seed do not apply). Needs pip install 'fedcollm[eval]'."
        ),
    ] = "fedcollm",
) -> None:
    """Zero-shot accuracy of a model (optionally with an adapter) on a task, as JSON."""
    from fedcollm.lm.devices import resolve_device

    if harness == "lm-eval":
        _eval_with_lm_eval(model, task, adapter, limit, batch_size, str(resolve_device(device, "--device")))
        return
    if harness != "fedcollm":
        raise _fail(f"unknown --harness {harness!r}; use 'fedcollm' or 'lm-eval'")
    from fedcollm.lm.precision import DTYPES

    if dtype not in ("auto", *DTYPES):
        raise _fail(f"unknown --dtype {dtype!r}; use 'auto' or one of {', '.join(map(repr, DTYPES))}")
    on = resolve_device(device, "--device")
    if quantization not in ("none", "8bit", "4bit"):
        raise _fail(f"unknown --quantization {quantization!r}; use 'none', '8bit' or '4bit'")
    from fedcollm.data.qa import qa_task_names

    if task in qa_task_names():
        _eval_generation(
            model, task, adapter, split or "test", limit, seed, batch_size, dtype, on, quantization
        )
        return
    from fedcollm.config import default_eval_split
    from fedcollm.data import load_questions, render, sample_indices
    from fedcollm.evaluation.multiple_choice import evaluate
    from fedcollm.lm.loading import load_base_model, load_tokenizer, needs_bos
    from fedcollm.lm.lora import load_adapter
    from fedcollm.lm.precision import torch_dtype

    _quiet_libraries()
    split = split or default_eval_split(task)
    pool = load_questions(task, split, source)
    questions = [pool[i] for i in sample_indices(len(pool), limit, seed)]
    requests = [render(task, q, format_) for q in questions]
    tokenizer = load_tokenizer(model)
    lm = load_base_model(model, torch_dtype(dtype, on), device=on, quantization=quantization)
    scored = lm if adapter is None else load_adapter(lm, adapter)
    result = evaluate(scored, tokenizer, requests, add_bos=needs_bos(tokenizer), batch_size=batch_size)
    report = {
        "model": model,
        "adapter": str(adapter) if adapter else None,
        "task": task,
        "split": split,
        "format": format_,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(on),
        "quantization": quantization,
        **result.summary(),
    }
    typer.echo(json.dumps(report, indent=2))


def _eval_generation(
    model: str,
    task: str,
    adapter: Path | None,
    split: str,
    limit: int | None,
    seed: int,
    batch_size: int,
    dtype: str,
    device: torch.device,
    quantization: str,
) -> None:
    """`fedcollm eval` on a short-answer QA task: greedy answers as lm-eval's `generate_until`
    makes them, exact match, token F1 and Rouge-L, as JSON."""
    from fedcollm.data import sample_indices
    from fedcollm.data.qa import load_qa, qa_prompt
    from fedcollm.evaluation.generation import GenerationSettings, evaluate_generation
    from fedcollm.lm.loading import load_base_model, load_tokenizer, needs_bos
    from fedcollm.lm.lora import load_adapter
    from fedcollm.lm.precision import torch_dtype

    _quiet_libraries()
    pool = load_qa(task, split)
    examples = [pool[i] for i in sample_indices(len(pool), limit, seed)]
    prompts = [qa_prompt(task, e) for e in examples]
    tokenizer = load_tokenizer(model)
    lm = load_base_model(model, torch_dtype(dtype, device), device=device, quantization=quantization)
    scored = lm if adapter is None else load_adapter(lm, adapter)
    settings = GenerationSettings(max_new_tokens=32, until=prompts[0].until, batch_size=batch_size)
    result = evaluate_generation(
        scored,
        tokenizer,
        [(e.id, p.text, e.answers) for e, p in zip(examples, prompts, strict=True)],
        add_bos=needs_bos(tokenizer),
        settings=settings,
    )
    report = {
        "model": model,
        "adapter": str(adapter) if adapter else None,
        "task": task,
        "split": split,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(device),
        "quantization": quantization,
        **result.summary(),
        "examples": [r.as_dict() for r in result.records[:3]],
    }
    typer.echo(json.dumps(report, indent=2))


def _eval_with_lm_eval(
    model: str, task: str, adapter: Path | None, limit: int | None, batch_size: int, device: str
) -> None:
    """`fedcollm eval --harness lm-eval`: lm-eval's own task on the model (+ adapter), as JSON."""
    from fedcollm.evaluation.harness import run_lm_eval

    _quiet_libraries()
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise _fail(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    results = run_lm_eval(
        model,
        task,
        adapter=str(adapter) if adapter else None,
        limit=limit,
        batch_size=batch_size,
        device=device,
    )
    report = {"model": model, "adapter": str(adapter) if adapter else None, "harness": "lm-eval", **results}
    typer.echo(json.dumps(report, indent=2))


def _seed_list(text: str) -> list[int]:
    """`--seeds 0,1,2` as integers; anything else is a `ConfigError` naming the option."""
    from fedcollm.config import ConfigError

    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2"
        ) from None
    if not seeds:
        raise ConfigError("--seeds: no seed given (e.g. --seeds 0,1,2)")
    return seeds


@app.command()
@_reports_bad_input
def compare(
    config: Annotated[
        Path, typer.Argument(help="Base experiment TOML; its [compare] section lists methods/tasks.")
    ],
    methods: Annotated[list[str] | None, typer.Option("--methods", help="Override compare.methods.")] = None,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", help="Override compare.tasks.")] = None,
    seeds: Annotated[
        str | None,
        typer.Option("--seeds", help="Comma-separated seeds, e.g. 0,1,2 (overrides compare.seeds)."),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set federation.rounds=2")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Comparison folder (default: runs/compare-<name>).")
    ] = None,
    device: DeviceOption = None,
) -> None:
    """Run every method on every task with the same partition, seeds and evaluation set; write
    the paper's Tables 1-3 (markdown and CSV) and accuracy-per-round plots."""
    from fedcollm.config import load_config
    from fedcollm.engines import run_experiment
    from fedcollm.experiment.compare import run_comparison

    _quiet_libraries()
    cfg = load_config(config, _with_device(set_, device))
    methods = methods or list(cfg.compare.methods)
    tasks = tasks or cfg.compare.tasks or [cfg.task.name]
    seed_list = _seed_list(seeds) if seeds is not None else cfg.compare.seeds or [cfg.seed]
    out = out or Path("runs") / f"compare-{cfg.name}"
    console.print(
        f"[bold]compare[/] {cfg.name}: methods {', '.join(methods)} · tasks {', '.join(tasks)} · "
        f"seeds {', '.join(map(str, seed_list))} → {out}"
    )
    with _progress() as progress:
        run_comparison(
            cfg, out, run_experiment, methods, tasks, reporter=RichReporter(progress), seeds=seed_list
        )
    console.print((out / "report.md").read_text(encoding="utf-8"))


@app.command()
@_reports_bad_input
def report(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Run folders (config.toml + metrics.jsonl) or comparison folders (fedcollm compare's).",
            show_default=False,
        ),
    ],
) -> None:
    """Tables and PNG plots of finished runs and comparisons, from their files alone (nothing is
    trained or evaluated again): a run gets <run>/plots/ and a table of its accuracies, a
    comparison its report.md, CSV tables and plots rebuilt."""
    from rich.table import Table

    from fedcollm.experiment.render import ComparisonReport, render

    out = Console(highlight=False, soft_wrap=True)
    for result in render(paths):
        if isinstance(result, ComparisonReport):
            for note in result.notes:
                console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
            typer.echo(result.markdown)
            written = escape(str(result.folder / "report.md"))
            console.print(f"[green]rebuilt[/]: {written} ({len(result.runs)} runs)", highlight=False)
            continue
        table = Table(title=escape(result.title))
        for column in result.rows[0] if result.rows else ("model",):
            table.add_column(column, overflow="fold")
        for row in result.rows:
            table.add_row(*(escape(cell) for cell in row.values()))
        out.print(table)
        for plot in result.plots:
            console.print(f"[green]wrote[/]: {escape(str(plot))}", highlight=False)
