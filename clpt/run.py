"""The run folder and its stages.

Layout of a run folder `RUN/`:

    config.yaml              resolved configuration; every stage reads it
    benchmark.json           class order, task ranges, class names, data source
    tasks/003/model.pt       backbone + heads after the Slow Learner (pre-alignment)   [train]
    features.zarr/task_003/{train,test}/{feats,labels}                                [extract]
    stats.zarr/task_003/{classes,count,mean,cov}                                      [stats]
    tasks/003/heads_aligned.pt                                                        [align]
    tasks/003/eval.json      row 3 of the accuracy matrix                              [eval]
    tasks/003/<stage>.done.json   completion marker, written last

A stage counts as done only when its marker exists, the outputs it lists exist,
and the markers of its inputs are the very ones it consumed (each marker has a
fresh id). Re-running a stage therefore makes everything downstream of it
*stale*, and `clpt run` redoes exactly that. A stage deletes its own marker
before touching its outputs, so a stage killed at any moment never leaves
something a later stage would take for finished work.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from clpt import config as config_mod
from clpt.config import RunConfig
from clpt.errors import ClptError, MissingInputError
from clpt.io import read_json, write_json, write_text

STAGES = ("train", "extract", "stats", "align", "eval")

# The command that produces each stage's outputs, for error messages.
STAGE_COMMAND = {
    "train": "clpt train-task {run} --task {task}",
    "extract": "clpt extract {run} --task {task}",
    "stats": "clpt fit-stats {run} --task {task}",
    "align": "clpt align {run} --task {task}",
    "eval": "clpt eval {run} --task {task}",
}

# The configuration each stage's result depends on: a marker records these values,
# and a later edit of any of them (`clpt config RUN --set ...`) makes the stage stale.
STAGE_CONFIG_KEYS = {
    "train": ("method", "seed", "benchmark", "backbone", "train", "lora"),
    "extract": (),
    "stats": ("stats.ridge",),
    "align": ("align", "train.weight_decay", "seed"),
    "eval": (),
}

# Keys that may be edited in an existing run; everything else defines the run.
EDITABLE_SECTIONS = ("align", "stats", "system")

STAGE_WHAT = {
    "train": "a trained model",
    "extract": "cached features",
    "stats": "class statistics",
    "align": "aligned heads",
    "eval": "an evaluation",
}


@dataclass
class RunInfo:
    """What `benchmark.json` records about the benchmark at creation."""

    benchmark: str
    n_classes: int
    tasks: list[list[int]]  # [start, stop) per task
    class_order: list[int]
    class_names: list[str]
    source: dict

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)


class Run:
    """An opened run folder: its config, benchmark record and stage markers."""

    def __init__(self, root: Path, cfg: RunConfig, info: RunInfo):
        self.root = Path(root)
        self.cfg = cfg
        self.info = info
        self._bench = None

    def benchmark(self):
        """The benchmark's images, checked once per process against the run's manifest."""
        if self._bench is None:
            from clpt.data import manifest
            from clpt.data.benchmark import load_benchmark

            bench = load_benchmark(self.cfg.benchmark)
            if bench.raw is not None:
                path = self.root / "manifest.json"
                if not path.is_file():
                    raise MissingInputError(
                        f"{self.root} has no manifest.json",
                        hint=f"re-create the run with `clpt init {self.root}`",
                    )
                manifest.verify(bench.raw, read_json(path))
            self._bench = bench
        return self._bench

    # --- paths -------------------------------------------------------------
    def task_dir(self, t: int) -> Path:
        return self.root / "tasks" / f"{t:03d}"

    def marker_path(self, stage: str, t: int) -> Path:
        return self.task_dir(t) / f"{stage}.done.json"

    @property
    def features_path(self) -> Path:
        return self.root / "features.zarr"

    @property
    def stats_path(self) -> Path:
        return self.root / "stats.zarr"

    def model_path(self, t: int) -> Path:
        return self.task_dir(t) / "model.pt"

    def aligned_path(self, t: int) -> Path:
        return self.task_dir(t) / "heads_aligned.pt"

    def eval_path(self, t: int) -> Path:
        return self.task_dir(t) / "eval.json"

    # --- stage graph -------------------------------------------------------
    def check_task(self, t: int) -> None:
        if not 0 <= t < self.info.n_tasks:
            raise ClptError(
                f"task {t} does not exist: this run has tasks 0..{self.info.n_tasks - 1}",
                hint=f"pass --task between 0 and {self.info.n_tasks - 1}",
            )

    def inputs(self, stage: str, t: int) -> list[tuple[str, int]]:
        """The stages whose outputs `stage` of task t reads."""
        if stage == "train":
            return [("train", t - 1)] if t > 0 else []
        if stage == "extract":
            return [("train", t)]
        if stage == "stats":
            return [("extract", t)]
        if stage == "align":
            return [("train", t)] + [("stats", i) for i in range(t + 1)]
        if stage == "eval":
            return [("align", t), ("extract", t)]
        raise ValueError(stage)

    def config_values(self, stage: str) -> dict:
        full = config_mod.to_dict(self.cfg)
        out = {}
        for key in STAGE_CONFIG_KEYS[stage]:
            node = full
            for part in key.split("."):
                node = node[part]
            out[key] = node
        return out

    def marker(self, stage: str, t: int) -> dict | None:
        p = self.marker_path(stage, t)
        if not p.is_file():
            return None
        try:
            return read_json(p)
        except ValueError:  # a torn marker cannot happen (atomic writes) but is treated as absent
            return None

    def state(self, stage: str, t: int) -> str:
        """'done', 'stale' (an input was redone or its outputs vanished), or 'missing'."""
        m = self.marker(stage, t)
        if m is None:
            return "missing"
        if not all((self.root / o).exists() for o in m.get("outputs", [])):
            return "missing"
        if m.get("config") != self.config_values(stage):
            return "stale"
        for s, i in self.inputs(stage, t):
            if self.state(s, i) != "done":
                return "stale"
            im = self.marker(s, i)
            if im is None or m.get("inputs", {}).get(f"{s}/{i}") != im["id"]:
                return "stale"
        return "done"

    def require(self, stage: str, t: int) -> dict:
        """The inputs' markers for `stage` of task t; a clear error naming the command if any is not done."""
        found = {}
        for s, i in self.inputs(stage, t):
            st = self.state(s, i)
            if st != "done":
                cmd = STAGE_COMMAND[s].format(run=self.root, task=i)
                why = "is out of date (an earlier stage was redone)" if st == "stale" else "is missing"
                raise MissingInputError(
                    f"{stage} of task {t} needs {STAGE_WHAT[s]} of task {i}, which {why}",
                    hint=f"run `{cmd}` first (or `clpt run {self.root}` for everything)",
                )
            found[f"{s}/{i}"] = self.marker(s, i)["id"]
        return found

    def invalidate(self, stage: str, t: int) -> None:
        self.marker_path(stage, t).unlink(missing_ok=True)

    def complete(
        self, stage: str, t: int, inputs: dict, outputs: list[Path], seconds: float, summary: dict
    ) -> dict:
        rel = [str(Path(o).relative_to(self.root)) for o in outputs]
        marker = {
            "stage": stage,
            "task": t,
            "id": uuid.uuid4().hex,
            "inputs": inputs,
            "outputs": rel,
            "config": self.config_values(stage),
            "seconds": round(seconds, 3),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "summary": summary,
        }
        write_json(self.marker_path(stage, t), marker)
        return marker


def _info_from_benchmark(bench) -> RunInfo:
    return RunInfo(
        benchmark=bench.name,
        n_classes=bench.n_classes,
        tasks=[[r.start, r.stop] for r in bench.tasks],
        class_order=[int(c) for c in bench.order],
        class_names=list(bench.class_names),
        source=dict(bench.info),
    )


def create_run(root: Path, cfg: RunConfig, exist_ok: bool = False) -> Run:
    """Create a run folder from a resolved config (refuses to overwrite a different run)."""
    from clpt.data.benchmark import load_benchmark

    root = Path(root)
    cfg_path = root / "config.yaml"
    text = config_mod.dump_yaml(cfg)
    if cfg_path.exists():
        if cfg_path.read_text() == text and exist_ok:
            return open_run(root)
        raise ClptError(
            f"run folder {root} already holds a run",
            hint="choose a new folder, or continue this one with `clpt run` / the stage commands",
        )
    if root.exists() and any(root.iterdir()):
        raise ClptError(f"{root} exists and is not empty", hint="choose a new or empty folder for the run")
    bench = load_benchmark(cfg.benchmark)
    info = _info_from_benchmark(bench)
    root.mkdir(parents=True, exist_ok=True)
    if bench.raw is not None:  # what was read: files, labels, checksums
        from clpt.data.manifest import build_manifest

        write_json(root / "manifest.json", build_manifest(bench.raw))
    write_json(root / "benchmark.json", dataclasses.asdict(info))
    write_text(cfg_path, text)  # written last: a folder without it is not a run
    return Run(root, cfg, info)


def edit_config(run: Run, overrides: list[str]) -> Run:
    """Change editable keys (align.*, stats.*, system.*) of an existing run's saved config."""
    from clpt.errors import ConfigError

    bad = [o for o in overrides if o.split("=", 1)[0].split(".")[0] not in EDITABLE_SECTIONS]
    if bad:
        raise ConfigError(
            [
                f"{o.split('=', 1)[0]}: cannot be changed in an existing run (editable: "
                f"{', '.join(s + '.*' for s in EDITABLE_SECTIONS)})"
                for o in bad
            ],
            source="overrides",
        )
    raw = config_mod.deep_merge(config_mod.to_dict(run.cfg), config_mod.overrides_to_dict(overrides))
    cfg = config_mod.build_config(raw, source="overrides")
    write_text(run.root / "config.yaml", config_mod.dump_yaml(cfg))
    return Run(run.root, cfg, run.info)


def open_run(root: Path) -> Run:
    root = Path(root)
    cfg_path = root / "config.yaml"
    if not cfg_path.is_file():
        raise MissingInputError(
            f"{root} is not a clpt run folder (no config.yaml)",
            hint=f"create it with `clpt init {root} [--config FILE]`",
        )
    cfg = config_mod.load_resolved(cfg_path)
    info_path = root / "benchmark.json"
    if not info_path.is_file():
        raise MissingInputError(
            f"{root} has no benchmark.json", hint=f"re-create the run with `clpt init {root}`"
        )
    info = RunInfo(**read_json(info_path))
    return Run(root, cfg, info)


# ---------------------------------------------------------------------------
# Executing stages
# ---------------------------------------------------------------------------

# stage(run, task, resume) -> (outputs, summary). `resume` is False under --force:
# a stage that can pick up an interrupted attempt (extraction) then starts afresh.
StageFn = Callable[["Run", int, bool], tuple[list[Path], dict]]


def _stage_impl(stage: str) -> StageFn:
    from clpt import align, evaluate, features, stats, train

    return {
        "train": train.train_stage,
        "extract": features.extract_stage,
        "stats": stats.stats_stage,
        "align": align.align_stage,
        "eval": evaluate.eval_stage,
    }[stage]


@dataclass
class StageResult:
    stage: str
    task: int
    skipped: bool
    marker: dict


def run_stage(run: Run, stage: str, t: int, force: bool = False) -> StageResult:
    """Run one stage of task t unless it is already done (or `force`)."""
    from clpt import distributed as dist

    run.check_task(t)
    if not force and run.state(stage, t) == "done":
        return StageResult(stage, t, True, run.marker(stage, t))
    inputs = run.require(stage, t)
    if stage in ("train", "extract"):
        run.benchmark()  # a changed dataset fails here, before a finished stage's marker is removed
    dist.barrier()  # every rank has checked the markers before rank 0 removes one
    if dist.is_main():
        run.invalidate(stage, t)  # first: a killed stage must not look finished
    dist.barrier()
    t0 = time.perf_counter()
    outputs, summary = _stage_impl(stage)(run, t, not force)
    dist.barrier()
    marker = None
    if dist.is_main():
        marker = run.complete(stage, t, inputs, outputs, time.perf_counter() - t0, summary)
    marker = dist.broadcast_object(marker)
    return StageResult(stage, t, False, marker)


def run_all(
    run: Run, force: bool = False, on_stage: Callable[[StageResult], None] | None = None
) -> list[StageResult]:
    """Every stage not yet done (or stale), for every task, in order."""
    results = []
    for t in range(run.info.n_tasks):
        for stage in STAGES:
            res = run_stage(run, stage, t, force=force)
            results.append(res)
            if on_stage is not None:
                on_stage(res)
    return results


def status(run: Run) -> dict:
    """Which stages are done for which task, with their wall time."""
    tasks = []
    for t in range(run.info.n_tasks):
        row = {"task": t, "classes": run.info.tasks[t], "stages": {}}
        for stage in STAGES:
            m = run.marker(stage, t)
            st = run.state(stage, t)
            row["stages"][stage] = {
                "state": st,
                "seconds": m["seconds"] if m else None,
                "finished_at": m["finished_at"] if m else None,
            }
        tasks.append(row)
    return {
        "run": str(run.root),
        "benchmark": run.info.benchmark,
        "method": run.cfg.method.value,
        "n_tasks": run.info.n_tasks,
        "tasks": tasks,
    }
