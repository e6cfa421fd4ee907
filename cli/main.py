"""`clpt`: the command line. Thin: parse, build a typed config, call one library function, print.

Machine-readable output (`--json`) goes to stdout; progress and logs go to stderr.
Every error is one line on stderr (`error: ...; fix: ...`) with a non-zero exit.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from clpt import distributed as dist
from clpt.errors import ClptError

app = typer.Typer(
    name="clpt",
    help="Continual learning with pre-trained models: SLCA, staged and resumable on a run folder.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _flag_takes_no_value(display_type_rich):
    """Typer's rich help gives every option a type column; a flag (`--force`) takes no value, so it shows
    none there (Typer 0.29 printed `<bool>`, as if `--force <bool>` were the syntax)."""

    def shown(self, ctx):
        return None if getattr(self, "is_flag", False) and self.metavar is None else display_type_rich(self, ctx)

    return shown


typer.core.TyperOption.display_type_rich = _flag_takes_no_value(typer.core.TyperOption.display_type_rich)  # type: ignore[method-assign]

# Under torchrun only rank 0 speaks; the other ranks work silently (errors still show).
_QUIET_RANK = not dist.is_main()
# Piped or redirected, tables keep their natural width (up to 200 columns) instead of rich's 80.
_PIPE_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
out = Console(highlight=False, soft_wrap=True, quiet=_QUIET_RANK, width=_PIPE_WIDTH)  # stdout: results
err = Console(stderr=True, highlight=False, soft_wrap=True, quiet=_QUIET_RANK)  # stderr: logs, progress
errors = Console(stderr=True, highlight=False, soft_wrap=True)  # errors, from any rank

RunArg = Annotated[Path, typer.Argument(help="The run folder.", show_default=False)]
TaskOpt = Annotated[int, typer.Option("--task", "-t", help="Task index (0-based).", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if it is done.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Config file (.yaml/.yml/.toml).", show_default=False)
]
WaitOpt = Annotated[
    bool,
    typer.Option("--wait", help="If another command is writing to the run, run after it instead of failing."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override, e.g. --set train.lr=0.001 (repeatable).", show_default=False),
]


# `--debug` (or CLPT_DEBUG=1): show the traceback of an unforeseen error instead of its one line.
_DEBUG = os.environ.get("CLPT_DEBUG", "") not in ("", "0")


INTERRUPTED = "interrupted: finished stages are kept; re-run the same command to continue"
TERMINATED = "terminated (SIGTERM): finished stages are kept; re-run the same command to continue"


def _fail(line: str, code: int) -> typer.Exit:
    from rich.markup import escape

    # the line may quote anything (bytes, paths with brackets): never read as rich markup; a control
    # character in it (a path with a newline) is written escaped, so the error stays one line
    line = "".join(ch if ch >= " " or ch == "\t" else ascii(ch)[1:-1] for ch in line)
    errors.print(f"[bold red]error:[/] {escape(line)}", markup=True, highlight=False)
    return typer.Exit(code)


def guarded(fn):
    """Every failure of a command as one line on stderr with its exit code (README: "Exit codes").

    ClptError: its message and hint. OSError from the file system (full disk,
    read-only folder): exit 1 naming the path. Ctrl-C: exit 130. Anything else
    (a bug, or a case nobody foresaw): one line naming the command and the
    exception; `--debug` or CLPT_DEBUG=1 shows the traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from clpt import interrupt
        from clpt.errors import from_os_error

        try:
            with interrupt.watch():
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except interrupt.Terminated:
            errors.print(TERMINATED)
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            errors.print(INTERRUPTED)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as Unix tools do
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as e:
            if interrupt.received():  # a DataLoader worker or a collective died of the same signal
                term = interrupt.received() == signal.SIGTERM
                errors.print(TERMINATED if term else INTERRUPTED)
                raise typer.Exit(143 if term else 130) from None
            if isinstance(e, ClptError):
                from clpt.stages import explain  # the fix of a library error: its stage's command

                raise _fail(explain(e).one_line(), e.exit_code) from None
            if isinstance(e, OSError) and e.errno is not None:
                raise _fail(from_os_error(e).one_line(), 1) from None
            if _DEBUG:
                raise
            what = str(e).splitlines()[0][:200] if str(e) else ""
            raise _fail(
                f"clpt {fn.__name__.rstrip('_').replace('_', '-')} failed unexpectedly: "
                f"{type(e).__name__}{': ' + what if what else ''}; fix: re-run with --debug "
                "(or CLPT_DEBUG=1) for the traceback, and report it",
                1,
            ) from None
        finally:
            dist.shutdown()  # a process group left open can abort the interpreter at exit

    return wrapper


@app.callback()
def _setup(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an unexpected error (also: CLPT_DEBUG=1).")
    ] = False,
) -> None:
    global _DEBUG
    _DEBUG = debug or os.environ.get("CLPT_DEBUG", "") not in ("", "0")
    level = logging.WARNING if quiet or not dist.is_main() else logging.INFO
    handler = RichHandler(console=err, show_path=False, show_time=False, markup=False)
    logger = logging.getLogger("clpt")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # zarr's asyncio tasks left pending by an interrupt or an error would print "Task was destroyed but it
    # is pending!" at exit (one line each, after clpt's own one line): they carry nothing for the user
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    from clpt import progress

    progress.configure(enabled=not quiet, console=err)
    err.quiet = quiet or not dist.is_main()  # stage lines and notes: silenced by --quiet (errors still show)


def _stage(run_dir: Path, stage: str, task: int, force: bool, wait: bool = False) -> None:
    from clpt.lock import run_lock
    from clpt.run import open_for_work, run_stage

    run = open_for_work(run_dir)
    with run_lock(run.root, wait):
        res = run_stage(run, stage, task, force=force)
    if res.skipped:
        err.print(f"{stage} task {task}: already done (use --force to redo)")
    else:
        err.print(f"{stage} task {task}: done in {res.marker['seconds']:.1f} s")


@app.command()
@guarded
def init(run_dir: RunArg, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Create a run folder from a config file and overrides (defaults: the built-in benchmark)."""
    from clpt.run import create_run
    from clpt.stages.resolve import resolve

    cfg = resolve(config, set_ or [])
    run = create_run(run_dir, cfg)
    err.print(f"created run {run.root}: {run.info.benchmark}, {run.info.n_tasks} tasks, method {cfg.method}")


@app.command("train-task")
@guarded
def train_task(run_dir: RunArg, task: TaskOpt, force: ForceOpt = False, wait: WaitOpt = False) -> None:
    """Stage 1, the Slow Learner: train the backbone and a new head on one task."""
    _stage(run_dir, "train", task, force, wait)


@app.command()
@guarded
def extract(run_dir: RunArg, task: TaskOpt, force: ForceOpt = False, wait: WaitOpt = False) -> None:
    """Cache features of the task's training images and of all seen test images (zarr)."""
    _stage(run_dir, "extract", task, force, wait)


@app.command("fit-stats")
@guarded
def fit_stats(run_dir: RunArg, task: TaskOpt, force: ForceOpt = False, wait: WaitOpt = False) -> None:
    """Stage 2: per-class count, mean and covariance (+ ridge) of the task's classes."""
    _stage(run_dir, "stats", task, force, wait)


@app.command("extract-pairs")
@guarded
def extract_pairs(run_dir: RunArg, task: TaskOpt, force: ForceOpt = False, wait: WaitOpt = False) -> None:
    """Drift compensation: cache the task's training images through the previous task's backbone."""
    _stage(run_dir, "pairs", task, force, wait)


@app.command("fit-drift")
@guarded
def fit_drift(run_dir: RunArg, task: TaskOpt, force: ForceOpt = False, wait: WaitOpt = False) -> None:
    """Drift compensation: fit the task's map on the paired features; move every old class's statistics."""
    _stage(run_dir, "drift", task, force, wait)


@app.command()
@guarded
def align(
    run_dir: RunArg, task: TaskOpt, force: ForceOpt = False, set_: SetOpt = None, wait: WaitOpt = False
) -> None:
    """Stage 3: Classifier Alignment on the cached statistics (no images; seconds).

    --set align.KEY=VALUE changes the run's alignment settings first; stages that
    depend on them become stale and are redone by `clpt run`.
    """
    if set_:
        from clpt.lock import run_lock
        from clpt.run import edit_config, open_run

        run = open_run(run_dir)
        with run_lock(run.root, wait):
            edit_config(run, set_)
    _stage(run_dir, "align", task, force, wait)


@app.command("eval")
@guarded
def eval_(
    run_dir: RunArg, task: TaskOpt, force: ForceOpt = False, json_: JsonOpt = False, wait: WaitOpt = False
) -> None:
    """Accuracy of the aligned classifier on all seen classes: row TASK of the accuracy matrix."""
    from clpt.lock import run_lock
    from clpt.run import join_group, open_run, report, run_stage

    run = open_run(run_dir)
    run.check_task(task)
    if force or run.state("eval", task) != "done":  # a finished evaluation is only read: no lock, no torch
        with run_lock(join_group(run).root, wait):
            run_stage(run, "eval", task, force=force)
    _print_report(report(run, task), json_)


SeedsOpt = Annotated[
    str | None,
    typer.Option(
        "--seeds",
        help="Several seeds, e.g. 1993,1996,1997: RUN_DIR becomes a folder of runs, one per seed "
        "(RUN_DIR/seed_1993, ...), each seed setting the class order and the training seed.",
        show_default=False,
    ),
]


@app.command("run")
@guarded
def run_(
    run_dir: RunArg,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    wait: WaitOpt = False,
    seeds: SeedsOpt = None,
) -> None:
    """Every stage not yet done (or stale), for every task, in order; creates the run if needed."""
    from clpt import run as R

    if seeds is not None:
        docs = R.run_seeds(run_dir, R.parse_seeds(seeds), config, set_ or [], force, wait, _on_stage,
                           on_seed=lambda s, folder: err.print(f"seed {s}: {folder}"), on_start=_announce)  # fmt: skip
        if json_:
            _print_json({"runs": docs})
        else:
            err.print(f"{len(docs)} runs done; summary: `clpt report {run_dir}`")
        return
    _print_report(R.run_one(run_dir, config, set_, force, wait, _on_stage, on_start=_announce), json_)


def _announce(run) -> None:
    from clpt.stages import run_order

    err.print(
        f"run {run.root}: {run.info.benchmark}, {run.info.n_tasks} tasks x {len(run_order(run.cfg))} stages, "
        f"method {run.cfg.method}, heads {', '.join(run.cfg.heads.enabled) or 'none'}"
    )


def _on_stage(res) -> None:
    what = "done already" if res.skipped else f"{res.marker['seconds']:.1f} s"
    err.print(f"[{res.task + 1}/{res.n_tasks}] {res.stage:<12} {what}")


@app.command("report")
@guarded
def report_(
    runs: Annotated[
        list[Path], typer.Argument(help="Run folders, or folders holding runs.", show_default=False)
    ],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="table | markdown | csv | latex | json (one document)")
    ] = "table",
    plots: Annotated[
        Path | None, typer.Option("--plots", help="Write PNG figures into this folder.", show_default=False)
    ] = None,
) -> None:
    """Finished runs grouped by config (all but the seeds): mean ± std over seeds per classifier, costs,
    and the published numbers beside ours with the gap and any protocol difference."""
    from clpt import report as R

    if fmt not in R.FORMATS:
        raise ClptError(f"unknown format {fmt!r}", hint=f"choose from: {', '.join(R.FORMATS)}")
    done, skipped = R.load(runs)
    for run, why in skipped:
        err.print(f"skipped {run}: {why}")
    if not done:
        raise ClptError("no finished run among the given folders", hint="finish them with `clpt run RUN`")
    rows = R.summarize(R.group(done))
    if plots is not None:
        from clpt.plots import write_plots

        for p in write_plots(plots, done, rows):
            err.print(f"wrote {p}")
    if fmt != "table":
        text = R.render(rows, skipped, fmt)
        print(text, end="" if text.endswith("\n") else "\n")
        return
    table = Table(title=f"{len(done)} finished run(s), {len({r['group'] for r in rows})} group(s) (%)")
    for col in R.HEADER:
        table.add_column(
            col, justify="left" if col in ("group", "classifier", "published (gap)") else "right"
        )
    for r in rows:
        table.add_row(*R.cells(r))
    out.print(table)
    for line in R.footnotes(rows, []):
        if line:
            out.print(line)


@app.command()
@guarded
def status(run_dir: RunArg, json_: JsonOpt = False) -> None:
    """Which stages are done, stale or missing for which task, with their wall time."""
    from clpt.run import open_run
    from clpt.run import status as run_status

    doc = run_status(open_run(run_dir, trust_times=True))  # sizes and times as recorded: not re-hashed
    if json_:
        _print_json(doc)
        return
    stages = list(doc["tasks"][0]["stages"]) if doc["tasks"] else []
    core = [s for s in stages if not s.startswith("head:")]
    heads = [s for s in stages if s.startswith("head:")]
    table = Table(title=f"{doc['run']} ({doc['benchmark']}, {doc['method']})")
    table.add_column("task", justify="right")
    table.add_column("classes")
    for s in core:
        table.add_column(s)
    if heads:
        table.add_column("heads (done)")
    style = {
        "done": "green",
        "stale": "yellow",
        "missing": "dim",
        "damaged": "bold red",
        "running": "bold cyan",
    }
    for row in doc["tasks"]:
        cells = []
        for s in core:
            st = row["stages"][s]
            txt = f"{st['seconds']:.1f}s" if st["state"] == "done" else st["state"]
            cells.append(f"[{style[st['state']]}]{txt}[/]")
        if heads:  # one column: how many heads are done, and which are not (details: --json)
            todo = [h.removeprefix("head:") for h in heads if row["stages"][h]["state"] != "done"]
            color = "green" if not todo else "yellow"
            cells.append(
                f"[{color}]{len(heads) - len(todo)}/{len(heads)}[/]"
                + (f" ({', '.join(todo)})" if todo else "")
            )
        table.add_row(str(row["task"]), f"{row['classes'][0]}-{row['classes'][1] - 1}", *cells)
    out.print(table)
    if doc.get("writer"):
        out.print(f"being written by {doc['writer']}")


HeadOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--head", help="A head to (re)fit (repeatable); default: every enabled head.", show_default=False
    ),
]


@app.command("heads")
@guarded
def heads_(
    run_dir: RunArg,
    head: HeadOpt = None,
    task: Annotated[
        int | None,
        typer.Option("--task", "-t", help="Up to this task (default: the last).", show_default=False),
    ] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    wait: WaitOpt = False,
) -> None:
    """(Re)fit classifier heads from the run's cache and evaluate them; never reads an image.

    --set heads.NAME.KEY=VALUE changes a head's settings first: exactly that head
    becomes stale and is refitted. Heads: ca, linear, ncm, lda, fecam, ranpac.
    """
    from clpt.run import refit_heads

    def on_stage(res) -> None:
        fit = res.marker["summary"].get("fit_seconds", 0)
        name = res.stage.removeprefix("head:")
        last = res.n_tasks - 1 if task is None else task
        err.print(
            f"[{res.task + 1}/{last + 1}] {name:<7} {'done already' if res.skipped else f'{fit:.2f} s fit'}"
        )

    rep = refit_heads(run_dir, head, task, set_ or [], force, wait, on_stage)
    if json_:
        _print_json(rep)
    else:
        _print_heads(rep)


@app.command("drift-oracle")
@guarded
def drift_oracle(
    run_dir: RunArg,
    task: Annotated[
        int | None, typer.Option("--task", "-t", help="The task (default: the last).", show_default=False)
    ] = None,
    json_: JsonOpt = False,
    wait: WaitOpt = False,
) -> None:
    """Analysis: what stale statistics cost. Re-extracts every OLD class's training images under the task's
    backbone (it reads old images, which a continual learner may not) and compares each classifier on the true
    statistics with its stale and drift-compensated versions; writes tasks/T/oracle.json."""
    from clpt.lock import run_lock
    from clpt.run import open_for_work
    from clpt.stages.oracle import oracle

    run = open_for_work(run_dir)
    t = run.info.n_tasks - 1 if task is None else task
    run.check_task(t)
    with run_lock(run.root, wait):
        doc = oracle(run, t)
    if json_:
        _print_json(doc)
        return
    table = Table(
        title=f"stale, compensated ({doc['drift_method']}) and oracle statistics after task {t} (%)"
    )
    for col in ("head", "stale", "compensated", "oracle", "gap recovered"):
        table.add_column(col, justify="left" if col == "head" else "right")
    for name, h in doc["heads"].items():
        cells = [f"{100 * h[k]:.2f}" if k in h else "-" for k in ("stale", "compensated", "oracle")]
        table.add_row(name, *cells, f"{100 * h['recovered']:.0f} %" if "recovered" in h else "-")
    out.print(table)
    s = doc["statistics"]
    line = f"old classes {doc['old_classes']}: mean cosine to the oracle, stale {s['stale_mean_cosine']:.4f}"
    if "compensated_mean_cosine" in s:
        line += (f", compensated {s['compensated_mean_cosine']:.4f}; mean error compensated / stale "
                 f"{s['relative_mean_error']:.3f}")  # fmt: skip
    out.print(line)


PREDICT_FORMATS = ("table", "json", "jsonl", "csv")


@app.command("predict")
@guarded
def predict_(
    source: Annotated[
        Path, typer.Argument(help="A run folder, or an export folder (`clpt export`).", show_default=False)
    ],  # fmt: skip
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image files, folders (searched recursively), or - for paths on stdin.", show_default=False
        ),  # fmt: skip
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="Predict the run's own images of this split (train | test) instead.",
            show_default=False,
        ),  # fmt: skip
    ] = None,
    task: Annotated[
        int | None,
        typer.Option(
            "--task",
            "-t",
            help="The task's model (default: the last with the head fitted).",
            show_default=False,
        ),  # fmt: skip
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(
            "--head",
            help="own (the method's classifier, the default), or a head: ca, linear, ncm, "
            "lda, fecam, ranpac, NAME+drift.",
            show_default=False,
        ),  # fmt: skip
    ] = None,
    top_k_: Annotated[int, typer.Option("--top-k", "-k", help="Classes per image.", min=1)] = 5,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | json | jsonl | csv.")] = "table",
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Images per forward pass (default: the run's system.extract_batch_size, or 256).",
            min=1,
            show_default=False,
        ),  # fmt: skip
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="cpu | cuda | cuda:N | auto (default: the run's system.device).",
            show_default=False,
        ),  # fmt: skip
    ] = None,
) -> None:
    """Classify images with what a run learned (read-only: it never changes the run folder).

    Each image gets its top-k classes (the names in benchmark.json) and their scores. A score is
    the head's own: a logit for the task heads (own with alignment, ca, linear) and for lda
    (w.x + b); the cosine similarity to the class mean for ncm; the negative squared Mahalanobis
    distance for fecam; the ridge regression's output for ranpac (about 1 for the predicted class).
    None is a probability. An image that cannot be read is reported in its row and on stderr, the
    others are still predicted, and the exit code is 4.
    """
    from clpt import distributed as D
    from clpt.inference import expand_inputs, predict_files
    from clpt.stages.predict import open_source, predict_split

    if fmt not in PREDICT_FORMATS:
        raise _fail(
            f"--format {fmt!r} is not one of {', '.join(PREDICT_FORMATS)}; fix: choose one of them", 2
        )
    if split is not None and inputs:
        raise _fail("give images or --split, not both; fix: drop one of them", 2)
    if split is None and not inputs:
        raise _fail("no images given; fix: pass image files, folders, - (paths on stdin), or --split test", 2)
    if split not in (None, "train", "test"):
        raise _fail(f"--split {split!r} is not train or test; fix: use --split test", 2)
    dev = D.resolve_device(device or "auto")
    model, record, run = open_source(source, task, head, dev)
    if run is not None and device is None:
        dev = D.resolve_device(run.cfg.system.device)
        model.to(dev)
    precision = run.cfg.system.precision if run is not None else "fp32"
    bs = batch_size or (run.cfg.system.extract_batch_size if run is not None else 256)
    if split is not None:
        if run is None:
            raise _fail("--split needs a run folder (an export holds no images); fix: pass image files", 2)
        rows = predict_split(run, model, split, record["task"], dev, precision, bs, top_k_)
    else:
        rows = predict_files(model, expand_inputs(inputs or []), dev, precision, bs, top_k_)
    failed = _write_predictions(rows, fmt, top_k_, {"source": str(source), "task": record["task"],
                                "head": record["head"]["name"], "score": model.score})  # fmt: skip
    if failed:
        raise _fail(f"{failed} image(s) could not be read (listed above and in their rows); fix: "
                    "replace or remove those files", 4)  # fmt: skip


def _write_predictions(rows, fmt: str, k: int, head: dict) -> int:
    """Print prediction rows on stdout in `fmt`; each unreadable image is also a line on stderr."""
    import csv

    failed = 0
    collected = []
    writer = csv.writer(sys.stdout) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(
            ["path", *[c for i in range(1, k + 1) for c in (f"class_{i}", f"score_{i}")], "error"]
        )
    for row in rows:
        if "error" in row:
            failed += 1
            errors.print(f"error: {row['path']}: {row['error']}", markup=False, highlight=False)
        if fmt == "jsonl":
            print(json.dumps(row), flush=True)
        elif writer is not None:
            top = row.get("top", [])
            cells = [v for t in top for v in (t["class"], f"{t['score']:.6g}")]
            writer.writerow([row["path"], *cells, *[""] * (2 * k - len(cells)), row.get("error", "")])
        else:
            collected.append(row)
    if fmt == "json":
        _print_json({**head, "predictions": collected})
    elif fmt == "table":
        table = Table(title=f"{head['head']} after task {head['task']}: top classes (score: {head['score']})")
        for col in ("image", "class", "score", "next"):
            table.add_column(col, justify="right" if col == "score" else "left")
        for row in collected:
            top = row.get("top")
            if not top:
                table.add_row(row["path"], "-", "-", row["error"])
                continue
            rest = ", ".join(f"{t['class']} ({t['score']:.3g})" for t in top[1:])
            table.add_row(row["path"], top[0]["class"], f"{top[0]['score']:.4g}", rest)
        out.print(table)
    return failed


@app.command("export")
@guarded
def export_(
    run_dir: RunArg,
    out_dir: Annotated[
        Path, typer.Argument(help="The export folder to write (new or empty).", show_default=False)
    ],
    task: Annotated[
        int | None,
        typer.Option(
            "--task", "-t", help="The task (default: the last with the head fitted).", show_default=False
        ),  # fmt: skip
    ] = None,
    head: Annotated[
        str | None, typer.Option("--head", help="own (default), or a head name.", show_default=False)
    ] = None,
    program: Annotated[
        bool, typer.Option("--program/--no-program", help="Also write model.pt2 (torch.export).")
    ] = True,  # fmt: skip
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Also write model.onnx (needs onnx and onnxscript).")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Write a self-contained model: backbone and head weights (safetensors), class names, the test
    transform, provenance, and a torch.export program (model.pt2). Load it with `clpt.load_model(OUT)`,
    `torch.export.load(OUT/model.pt2)`, or predict with `clpt predict OUT IMAGE...`."""
    from clpt.api import export

    doc = export(run_dir, out_dir, task, head, program=program, onnx=onnx)
    if json_:
        _print_json(doc)
    else:
        files = ", ".join(doc["provenance"]["sha256"])
        err.print(f"exported {doc['head']['name']} after task {doc['provenance']['task']} ({len(doc['classes'])} "
                  f"classes) to {out_dir}: model.json, {files}")  # fmt: skip


@app.command("add-task")
@guarded
def add_task(
    run_dir: RunArg,
    folder: Annotated[
        Path,
        typer.Argument(
            help="The new classes: train/<class>/ and test/<class>/, or <class>/ (a test share is held out).",
            show_default=False,
        ),
    ],  # fmt: skip
    test_fraction: Annotated[
        float,
        typer.Option(
            "--test-fraction", help="Held out per class for test when the folder has no test/ (recorded)."
        ),
    ] = 0.2,  # fmt: skip
    wait: WaitOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Append the classes of FOLDER to the run as its next task (earlier tasks stay as they are);
    `clpt run RUN` then trains it and fits everything after it. Each image is checked and recorded
    with its checksum in manifest.json."""
    from clpt.api import add_task as grow

    res = grow(run_dir, folder, test_fraction, wait)
    if json_:
        _print_json(res)
    else:
        err.print(f"added task {res['task']}: {res['classes']} classes (labels {res['range'][0]}-{res['range'][1] - 1}), "
                  f"{res['train_images']} training and {res['test_images']} test images from {res['root']}; "
                  f"next: clpt run {run_dir}")  # fmt: skip


@app.command("sweep")
@guarded
def sweep(
    parent: Annotated[
        Path,
        typer.Argument(help="The folder of the sweep's runs (one subfolder per job).", show_default=False),
    ],  # fmt: skip
    config: ConfigOpt = None,
    set_: SetOpt = None,
    seeds: SeedsOpt = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            "-g",
            help="KEY=V1,V2,... (repeatable): one job per combination, times the seeds.",
            show_default=False,
        ),  # fmt: skip
    ] = None,
    cluster: Annotated[
        str,
        typer.Option(
            "--cluster", help="slurm (a job array) | local (processes here) | debug (in this process)."
        ),
    ] = "local",  # fmt: skip
    timeout_min: Annotated[int, typer.Option("--timeout-min", help="Per job.", min=1)] = 1440,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs per job (Slurm gpus_per_node).", min=0)] = 0,
    cpus: Annotated[
        int | None, typer.Option("--cpus", help="CPUs per job.", min=1, show_default=False)
    ] = None,
    partition: Annotated[
        str | None, typer.Option("--partition", help="Slurm partition.", show_default=False)
    ] = None,
    parallel: Annotated[
        int | None,
        typer.Option("--parallel", help="At most this many jobs at once (Slurm).", min=1, show_default=False),
    ] = None,  # fmt: skip
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Submit and return (job ids on stdout).")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Run seeds x a grid of settings as a job array through submitit, one run folder per job
    (PARENT/KEY=V,.../seed_S); then `clpt report PARENT` aggregates them. A re-submitted job continues its run."""
    from clpt.run import parse_seeds
    from clpt.sweep import parse_grid, plan, submit

    jobs = plan(parent, config, set_ or [], parse_seeds(seeds) if seeds else None, parse_grid(grid or []))
    err.print(f"sweep: {len(jobs)} job(s) on {cluster}, logs in {parent / '.submitit'}")
    res = submit(
        jobs, parent / ".submitit", cluster, timeout_min, gpus, cpus, partition, parallel, not no_wait
    )
    if json_ or no_wait:
        _print_json({"jobs": res})
    else:
        for r in res:
            err.print(
                f"{r['run']}: "
                + (f"error: {r['error']}" if "error" in r else f"Last-Acc {100 * r['last_acc']:.2f}")
            )
        out.print(f"next: clpt report {parent}")
    failed = [r for r in res if "error" in r]
    if failed:
        raise _fail(f"{len(failed)} of {len(res)} job(s) failed (listed above); fix: see their logs in "
                    f"{parent / '.submitit'}, correct the cause and run the same command again", 1)  # fmt: skip


@app.command("config")
@guarded
def config_(
    run_dir: Annotated[Path | None, typer.Argument(help="The run folder.", show_default=False)] = None,
    set_: SetOpt = None,
    wait: WaitOpt = False,
    defaults: Annotated[
        bool,
        typer.Option(
            "--defaults", help="List every config key with its default and what it means (no run needed)."
        ),
    ] = False,  # fmt: skip
) -> None:
    """Show the run's resolved config; --set changes editable keys (align.*, stats.*, heads.*, system.*).
    `clpt config --defaults` lists every key, its default and its meaning (before presets)."""
    from clpt import config as C
    from clpt.run import edit_config, open_run

    if defaults:
        from clpt.stages.resolve import describe_defaults

        rows = describe_defaults()
        width = max(len(k) for k, _, _ in rows)
        for key, value, note in rows:
            print(f"{key:<{width}}  {json.dumps(value)}" + (f"  # {note}" if note else ""))
        return
    if run_dir is None:
        raise _fail("no run folder given; fix: clpt config RUN (or clpt config --defaults)", 2)

    run = open_run(run_dir)
    if set_:
        from clpt.lock import run_lock

        with run_lock(run.root, wait):  # read again under the lock: a queued edit sees the one before it
            run = edit_config(open_run(run_dir), set_)
    print(C.dump_yaml(run.cfg), end="")


@app.command("pretrain-builtin")
@guarded
def pretrain_builtin(force: ForceOpt = False) -> None:
    """Pre-train the built-in backbone on the built-in pre-training classes (cached; runs once)."""
    from clpt.backbone import builtin_weights_path
    from clpt.pretrain import pretrain_builtin as pretrain

    path = builtin_weights_path()
    if path.is_file() and not force:
        err.print(f"built-in backbone already cached at {path} (use --force to redo)")
        return
    _print_json(pretrain(path))


def _print_json(doc: dict) -> None:
    """Machine output: accuracies are fractions, every number at 6 significant digits, NaN as null."""
    from clpt.units import machine

    if not _QUIET_RANK:
        print(json.dumps(machine(doc), allow_nan=False), flush=True)


def _print_report(rep: dict, as_json: bool) -> None:
    if as_json:
        _print_json(rep)
        return
    t = rep["task"]
    table = Table(title=f"accuracy (%) after each task: {rep['method']}")
    table.add_column("after task", justify="right")
    for j in range(t + 1):
        table.add_column(f"T{j}", justify="right")
    table.add_column("all seen", justify="right")
    for i, row in enumerate(rep["acc_matrix"]):
        table.add_row(
            str(i), *[f"{100 * v:.1f}" for v in row], *[""] * (t - i), f"{100 * rep['accuracies'][i]:.2f}"
        )
    out.print(table)
    out.print(
        f"Last-Acc {100 * rep['last_acc']:.2f}  Inc-Acc {100 * rep['inc_acc']:.2f}  "
        + (f"Top-5 {100 * rep['top5']:.2f}  " if rep.get("top5") is not None else "")
        + f"Forgetting {100 * rep['forgetting']:.2f}  (after task {t} of {rep['n_tasks']})"
    )
    _print_heads(rep)


def _print_heads(rep: dict) -> None:
    """The classifier heads side by side: Last-Acc, Inc-Acc, forgetting."""
    heads = rep.get("heads") or {}
    if not heads:
        return
    table = Table(title=f"classifier heads from the cache, after task {rep['task']} (%)")
    for col in ("head", "Last-Acc", "Inc-Acc", "Forgetting"):
        table.add_column(col, justify="left" if col == "head" else "right")
    for name, h in heads.items():
        table.add_row(name, *(f"{100 * h[k]:.2f}" for k in ("last_acc", "inc_acc", "forgetting")))
    out.print(table)


def main() -> None:
    """The `clpt` entry point: a usage error (an unknown option, a missing argument) is one line too."""
    try:
        code = app(standalone_mode=False)
    except Exception as e:  # click's UsageError family (typer vendors its own click: matched by shape)
        if not (hasattr(e, "format_message") and hasattr(e, "ctx") and getattr(e, "exit_code", 1) == 2):
            raise
        where = e.ctx.command_path if e.ctx is not None else "clpt"
        hint = f"see `{where} --help`"
        if getattr(e, "option_name", None) in ("--quiet", "-q", "--debug"):
            hint = (
                f"{e.option_name} belongs before the command: `clpt {e.option_name} {where.split()[-1]} ...`"
            )
        message = e.format_message().rstrip(".")
        errors.print(f"error: {message}; fix: {hint}", markup=False, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        errors.print(INTERRUPTED)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
