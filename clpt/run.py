"""The run folder and its stages.

Layout of a run folder `RUN/` (`clpt.artifacts` owns the paths and formats):

    config.yaml              resolved configuration; every stage reads it
    benchmark.json           class order, task ranges, class names, data source
    tasks/003/model.pt       backbone + heads after the Slow Learner (pre-alignment)   [train]
    features.zarr/task_003/{train,test}/{feats,labels}                                [extract]
    stats.zarr/task_003/{classes,count,mean,m2}                                       [stats]
    tasks/003/heads_aligned.pt                                                        [align]
    tasks/003/eval.json      row 3 of the method's accuracy matrix                     [eval]
    tasks/003/heads/NAME.json   row 3 of head NAME's accuracy matrix                   [head:NAME]
    tasks/003/<stage>.done.json   completion marker, written last

The stages themselves are declared in `clpt.stages.graph`, one module per stage
function in `clpt.stages`. Besides the stage machinery this module has what a
command does with a run (and a library user can call): `run_one` (create or
continue a run and run every stage), `run_seeds` (one run per seed), and
`refit_heads`.

A stage counts as done only when its marker exists, the outputs it lists exist,
and the markers of its inputs are the very ones it consumed (each marker has a
fresh id). Re-running a stage therefore makes everything downstream of it
*stale*, and `clpt run` redoes exactly that. A stage deletes its own marker
before touching its outputs, so a stage killed at any moment never leaves
something a later stage would take for finished work.
"""

from __future__ import annotations

import dataclasses
import resource
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from clpt import artifacts
from clpt import config as config_mod
from clpt import distributed as dist
from clpt.config import RunConfig
from clpt.data import manifest
from clpt.data.benchmark import Benchmark, load_benchmark, task_ranges
from clpt.errors import ClptError, ConfigError, DataError, FileSystemError, MissingInputError
from clpt.heads import HEADS
from clpt.io import file_sha256, is_temporary, read_json, write_json, write_text
from clpt.lock import LOCK_NAME, run_lock
from clpt.stages import CORE, RunInfo, StageContext, explain, get_stage, run_order
from clpt.stages import resolve as R
from clpt.stages.graph import head_name, head_names
from clpt.stages.results import head_report, report

STAGES = CORE  # the five stages of every task; heads add `head:NAME` stages (clpt.stages)

# Keys that may be edited in an existing run; everything else defines the run.
EDITABLE_SECTIONS = ("align", "stats", "heads", "drift", "system")

__all__ = ["Run", "RunInfo", "create_run", "open_run", "refit_heads", "report", "run_all", "run_one",
           "run_seeds", "run_stage", "status"]  # fmt: skip


class Run:
    """An opened run folder: its config, benchmark record and stage markers.

    Markers and states are read once and remembered (a command's view of the run;
    writers hold the run's lock). Completing or invalidating a stage of task t
    forgets what was remembered of tasks >= t: a stage reads only tasks <= its own,
    so nothing earlier can change. Checking a task's stages therefore costs the
    same at task 300 as at task 3.
    """

    def __init__(self, root: Path, cfg: RunConfig, info: RunInfo, trust_times: bool = False):
        self.root = Path(root)
        # a result file whose size and modification time are those its marker recorded is not hashed again
        # (`clpt status`: a view of the run); otherwise only a file over DIGEST_MAX_BYTES is trusted so
        self.trust_times = trust_times
        self.cfg = cfg
        self.info = info
        self._bench: Benchmark | None = None
        self._cfg_dict: dict | None = None
        self._markers: dict[tuple[str, int], dict | None] = {}
        self._states: dict[tuple[str, int], str] = {}

    def _forget(self, t: int) -> None:
        for cache in (self._markers, self._states):
            for key in [k for k in cache if k[1] >= t]:
                del cache[key]

    def benchmark(self) -> Benchmark:
        """The benchmark's images, checked once per process against the run's manifest."""
        from clpt.stages import grow

        if self._bench is None:
            bench = load_benchmark(self.cfg.benchmark)
            recorded = None
            if bench.raw is not None:
                recorded = artifacts.read_record(self.root, "clpt-manifest")
                manifest.verify(bench.raw, recorded)
                st = manifest.stamps(bench.raw, recorded)
                bench = dataclasses.replace(bench, train=dataclasses.replace(bench.train, stamps=st["train"]),
                                            test=dataclasses.replace(bench.test, stamps=st["test"]))  # fmt: skip
            self._bench = grow.extend(bench, self.info, recorded)  # tasks added later (clpt add-task)
        return self._bench

    def marker_path(self, stage: str, t: int) -> Path:
        return artifacts.marker_path(self.root, stage, t)

    # --- stage graph -------------------------------------------------------
    def check_task(self, t: int) -> None:
        if not 0 <= t < self.info.n_tasks:
            raise ClptError(
                f"task {t} does not exist: this run has tasks 0..{self.info.n_tasks - 1}",
                hint=f"pass --task between 0 and {self.info.n_tasks - 1}",
            )

    def inputs(self, stage: str, t: int) -> list[tuple[str, int]]:
        """The stages whose outputs `stage` of task t reads."""
        return get_stage(stage).inputs(self.cfg, t)

    def config_values(self, stage: str) -> dict:
        if self._cfg_dict is None:  # a Run's config never changes (edits make a new Run)
            self._cfg_dict = config_mod.to_dict(self.cfg)
        full = self._cfg_dict
        out = {}
        for key in get_stage(stage).config_keys(self.cfg):
            node = full
            for part in key.split("."):
                node = node[part]
            out[key] = node
        return out

    def marker(self, stage: str, t: int) -> dict | None:
        """The stage's completion marker; None if absent or not a valid marker (see `state`: damaged)."""
        key = (stage, t)
        if key not in self._markers:
            self._markers[key] = self._read_marker(stage, t)
        return self._markers[key]

    def _read_marker(self, stage: str, t: int) -> dict | None:
        p = self.marker_path(stage, t)
        if not p.is_file():
            return None
        try:
            m = read_json(p)
        except (ValueError, OSError):  # a torn marker cannot come from clpt (atomic writes)
            return None
        return m if _valid_marker(m) else None

    def state(self, stage: str, t: int) -> str:
        """'done', 'stale' (an input was redone), 'damaged' (a result file changed after it was written,
        or the marker itself is not a marker), or 'missing'."""
        key = (stage, t)
        if key not in self._states:
            self._states[key] = self._state(stage, t)
        return self._states[key]

    def _state(self, stage: str, t: int) -> str:
        m = self.marker(stage, t)
        if m is None:
            return "damaged" if self.marker_path(stage, t).exists() else "missing"
        if not all((self.root / o).exists() for o in m.get("outputs", [])):
            return "missing"
        known = m.get("stat") or {}
        if not self.trust_times:
            known = {r: v for r, v in known.items() if isinstance(v, list) and v and v[0] > DIGEST_MAX_BYTES}
        for rel, digest in (m.get("digests") or {}).items():
            if rel in known and _stat(self.root / rel) == known[rel]:
                continue  # a large file (or, trusting times, any file) as it was written: not read again
            if _digest(self.root / rel) != digest:
                return "damaged"  # a result file changed after its stage wrote it
        stores = {o: artifacts.inspect_store(self.root / o, self.root) for o in m.get("outputs", [])
                  if (self.root / o).is_dir()}  # fmt: skip
        recorded_arrays = m.get("arrays") or {}
        if any(isinstance(a, list) and r in stores and stores[r][0] != sorted(a) for r, a in recorded_arrays.items()):
            return "missing"  # arrays of a result store are gone: the stage's outputs are not all there
        if any(problem for _, problem in stores.values()):
            return "damaged"  # a chunk file of a result store is gone (it would read as fill values), or rows
        recorded, current = m.get("config"), self.config_values(stage)
        if not isinstance(recorded, dict) or set(recorded) != set(current):
            return "stale"
        if not all(_same_config(recorded[k], v, _default_at(k)) for k, v in current.items()):
            return "stale"
        for s, i in self.inputs(stage, t):
            if self.state(s, i) != "done":
                return "stale"
            im = self.marker(s, i)
            if im is None or m.get("inputs", {}).get(f"{s}/{i}") != im["id"]:
                return "stale"
        return "done"

    def damaged_ancestor(self, stage: str, t: int) -> tuple[str, int] | None:
        """The first damaged stage among the (transitive) inputs of a stale `stage` of task t, if any."""
        for s, i in self.inputs(stage, t):
            st = self.state(s, i)
            if st == "damaged":
                return s, i
            if st == "stale" and (root := self.damaged_ancestor(s, i)) is not None:
                return root
        return None

    def require(self, stage: str, t: int) -> dict:
        """The inputs' markers for `stage` of task t; a clear error naming the command if any is not done."""
        found = {}
        for s, i in self.inputs(stage, t):
            st = self.state(s, i)
            if st == "damaged":
                raise self.damaged_error(s, i)
            root = self.damaged_ancestor(s, i) if st == "stale" else None
            if root is not None:  # stale because something below it is damaged: name that, not the chain
                raise self.damaged_error(*root)
            if st != "done":
                dep = get_stage(s)
                cmd = dep.command.format(run=self.root, task=i)  # the wiring: formats a stage's command
                why = "is out of date (an earlier stage was redone)" if st == "stale" else "is missing"
                raise MissingInputError(
                    f"{stage} of task {t} needs {dep.what} of task {i}, which {why}",
                    hint=f"run `{cmd}` first (or `clpt run {self.root}` for everything)",
                )
            m = self.marker(s, i)
            assert m is not None  # its state is done
            found[f"{s}/{i}"] = m["id"]
        return found

    def damaged_error(self, stage: str, t: int) -> DataError:
        """The one-line error for a damaged stage: its marker is not a marker, or a result file changed."""
        cmd = get_stage(stage).command.format(run=self.root, task=t)
        m = self.marker(stage, t)
        if m is None:
            what = (
                f"its completion marker {self.marker_path(stage, t).relative_to(self.root)} is not a marker"
            )
        else:
            changed = [r for r, d in (m.get("digests") or {}).items() if _digest(self.root / r) != d]
            gone = next(
                (c for o in m.get("outputs", []) if (c := artifacts.inspect_store(self.root / o, self.root)[1])), None
            )
            what = (f"{changed[0]} was changed after it was written" if changed else
                    gone if gone else "a result file was changed after it was written")  # fmt: skip
        return DataError(f"{stage} of task {t} is damaged: {what}", hint=f"re-run `{cmd} --force`")

    def invalidate(self, stage: str, t: int) -> None:
        self.marker_path(stage, t).unlink(missing_ok=True)
        self._forget(t)

    def complete(
        self, stage: str, t: int, inputs: dict, outputs: list[Path], seconds: float, summary: dict
    ) -> dict:
        rel = [str(Path(o).relative_to(self.root)) for o in outputs]
        files = [r for r in rel if (self.root / r).is_file()]  # every result file, large ones too
        marker = {
            "stage": stage,
            "format_version": 1,
            "task": t,
            "id": uuid.uuid4().hex,
            "inputs": inputs,
            "outputs": rel,
            "digests": {r: _digest(self.root / r) for r in files},  # result files tied to this marker
            # size and modification time of every result file: one over DIGEST_MAX_BYTES is re-hashed only
            # when they differ (any file, for a view that trusts times: `clpt status`)
            "stat": {r: _stat(self.root / r) for r in files},
            # the arrays of each result store, so a store emptied or cut down is missing, not done
            "arrays": {r: artifacts.inspect_store(self.root / r, self.root)[0] for r in rel if (self.root / r).is_dir()},
            "config": self.config_values(stage),
            "seconds": round(seconds, 3),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "summary": summary,
        }
        write_json(self.marker_path(stage, t), marker)
        self._forget(t)
        return marker


_MARKER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "stage": str,
    "outputs": list,
    "inputs": dict,
    "config": dict,
    "seconds": (int, float),
}


def _valid_marker(m) -> bool:
    return isinstance(m, dict) and all(isinstance(m.get(k), tp) for k, tp in _MARKER_FIELDS.items())


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
    root = Path(root)
    cfg_path = root / "config.yaml"
    cfg = with_input_size(cfg)
    text = config_mod.dump_yaml(cfg)
    if cfg_path.exists():
        if cfg_path.read_text() == text and exist_ok:
            return open_run(root)
        raise ClptError(
            f"run folder {root} already holds a run",
            hint="choose a new folder, or continue this one with `clpt run` / the stage commands",
        )
    if root.exists() and not root.is_dir():
        raise FileSystemError(
            f"{root} is not a folder (a file is there)", hint="choose another path for the run"
        )
    # what a creation cut short (a full disk, a kill) leaves before config.yaml: it is written again
    leftovers = {"manifest.json", "benchmark.json", LOCK_NAME}
    if root.exists() and any(p.name not in leftovers and not is_temporary(p.name) for p in root.iterdir()):
        raise ClptError(f"{root} exists and is not empty", hint="choose a new or empty folder for the run")
    bench = load_benchmark(cfg.benchmark)
    info = _info_from_benchmark(bench)
    root.mkdir(parents=True, exist_ok=True)
    if bench.raw is not None:  # what was read: files, labels, checksums
        artifacts.write_record(root, "clpt-manifest", manifest.build_manifest(bench.raw))
    artifacts.write_record(root, "clpt-benchmark", dataclasses.asdict(info))
    write_text(cfg_path, text)  # written last: a folder without it is not a run
    return Run(root, cfg, info)


def with_input_size(cfg: RunConfig) -> RunConfig:
    """`cfg` with benchmark.image_size resolved from the backbone (recorded in config.yaml), or checked."""
    from clpt.backbone import input_size

    size = input_size(cfg.backbone, cfg.benchmark.image_size)
    return dataclasses.replace(cfg, benchmark=dataclasses.replace(cfg.benchmark, image_size=size))


def config_differences(run: Run, cfg: RunConfig) -> list[str]:
    """The dotted keys whose values differ between the run's saved config and `cfg`."""
    a = config_mod.flatten(config_mod.to_dict(run.cfg))
    b = config_mod.flatten(config_mod.to_dict(with_input_size(cfg)))
    return [f"{k} ({a.get(k)!r} in the run, {b.get(k)!r} given)" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]  # fmt: skip


def edit_config(run: Run, overrides: list[str]) -> Run:
    """Change editable keys (align.*, stats.*, heads.*, system.*) of an existing run's saved config."""
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
    cfg = R.build_config(raw, source="overrides")
    write_text(run.root / "config.yaml", config_mod.dump_yaml(cfg))
    return Run(run.root, cfg, run.info)


def open_run(root: Path, trust_times: bool = False) -> Run:
    """The run folder `root`, its records checked. `trust_times`: a result file with the size and modification
    time its marker recorded counts as unchanged without being hashed (for a quick view: `clpt status`);
    stages always hash the files they check, except those over DIGEST_MAX_BYTES."""
    root = Path(root)
    cfg_path = root / "config.yaml"
    if not cfg_path.is_file():
        raise MissingInputError(
            f"{root} is not a clpt run folder (no config.yaml)",
            hint=f"create it with `clpt init {root} [--config FILE]`",
        )
    try:
        cfg_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{cfg_path} is damaged: not UTF-8 text (byte {e.start})",
            hint="restore the run's config.yaml from a backup or a copy of the run, or start a new run folder",
        ) from None
    cfg = R.load_resolved(cfg_path)
    info = _read_info(root)
    _check_records(root, cfg, info)
    return Run(root, cfg, info, trust_times)


def _check_records(root: Path, cfg: RunConfig, info: RunInfo) -> None:
    """config.yaml and benchmark.json agree: the benchmark, its classes and the task ranges the config's
    init_classes and increment give (plus tasks added by `clpt add-task`). A hand edit of either would
    otherwise evaluate other classes silently, or retrain a task under a record that says otherwise."""
    b, rec = cfg.benchmark, artifacts.run_record_path(root, "clpt-benchmark").name
    problems = []
    if info.benchmark != b.name:
        problems.append(f"benchmark.name is {b.name!r} in config.yaml, {info.benchmark!r} in {rec}")
    n = info.n_classes
    if sorted(info.class_order) != list(range(n)) or len(info.class_names) != n:
        problems.append(f"{rec}'s class order or class names do not cover its {n} classes")
    base = n - sum(len(a.get("classes", [])) for a in info.additions)
    want = [[a["start"], a["start"] + len(a.get("classes", []))] for a in info.additions if "start" in a]
    if base > 0 and b.init_classes <= base:
        want = [[r.start, r.stop] for r in task_ranges(base, b.init_classes, b.increment)] + want
    if not problems and info.tasks != want:
        edited = [f"{k}: {getattr(b, k)}" for k in ("init_classes", "increment")]
        problems.append(f"its task ranges {info.tasks[:3]}... are not those of config.yaml's {', '.join(edited)}")
    if problems:
        raise DataError(
            f"the run's records disagree ({'; '.join(problems)}): config.yaml or {rec} was edited by hand",
            hint="restore the edited file from a backup or a copy of the run (the benchmark is fixed when a run "
                 "is created: change it in a new run folder)",
        )  # fmt: skip


def open_for_work(root: Path) -> Run:
    """`open_run`, then the process group when launched by torchrun (every command that runs stages)."""
    return join_group(open_run(root))


def join_group(run: Run) -> Run:
    """The process group when launched by torchrun (this imports torch: a command that only reads a run's
    results, like `eval --json` of a finished task, opens it with `open_run` and calls this only to work)."""
    dist.init_from_env(run.cfg.system.device)
    return run


def _read_info(root: Path) -> RunInfo:
    """benchmark.json, with every field present and of its type (or a one-line DataError)."""
    rec = artifacts.read_record(root, "clpt-benchmark")
    names = {f.name for f in dataclasses.fields(RunInfo)}
    expect = {
        "benchmark": str,
        "n_classes": int,
        "tasks": list,
        "class_order": list,
        "class_names": list,
        "source": dict,
    }
    bad = sorted(k for k, tp in expect.items() if not isinstance(rec.get(k), tp))
    if not isinstance(rec.get("additions", []), list):
        bad.append("additions")
    extra = sorted(set(rec) - names)
    if bad or extra or not all(isinstance(r, list) and len(r) == 2 for r in rec["tasks"]):
        raise DataError(
            f"{artifacts.run_record_path(root, 'clpt-benchmark')} is damaged: "
            + (
                f"fields missing or of the wrong type: {', '.join(bad)}"
                if bad
                else f"unexpected fields {extra}"
                if extra
                else "bad task ranges"
            ),
            hint="restore benchmark.json from a backup or a copy of the run, or create the run again in a new folder",
        )
    return RunInfo(**rec)


# ---------------------------------------------------------------------------
# Executing stages
# ---------------------------------------------------------------------------


@dataclass
class StageResult:
    stage: str
    task: int
    skipped: bool
    marker: dict
    n_tasks: int  # of the run (for progress lines)


def run_stage(run: Run, stage: str, t: int, force: bool = False) -> StageResult:
    """Run one stage of task t unless it is already done (or `force`).

    An error's fix names the command of the stage that produces what is wrong (`clpt.stages.explain`).
    """
    try:
        return _run_stage(run, stage, t, force)
    except ClptError as e:
        raise explain(e) from None


def _run_stage(run: Run, stage: str, t: int, force: bool) -> StageResult:
    run.check_task(t)
    spec = get_stage(stage)
    state = run.state(stage, t)
    if not force and state == "done":
        return StageResult(stage, t, True, run.marker(stage, t) or {}, run.info.n_tasks)
    if not force and state == "damaged":  # never overwritten silently: the user decides
        raise run.damaged_error(stage, t)
    inputs = run.require(stage, t)
    if spec.reads_images:
        run.benchmark()  # a changed dataset fails here, before a finished stage's marker is removed
    if stage == "train" and t == 0:
        prepare_backbone(run)
    dist.barrier()  # every rank has checked the markers before rank 0 removes one
    if dist.is_main():
        run.invalidate(stage, t)  # first: a killed stage must not look finished
    dist.barrier()
    meter = CostMeter(run.cfg.system.device)
    t0 = time.perf_counter()
    ctx = StageContext(run.root, run.cfg, run.info.tasks, t, run.benchmark, not force, inputs)
    outputs, summary = spec.fn(ctx)
    dist.barrier()
    marker = None
    if dist.is_main():
        seconds = time.perf_counter() - t0
        summary = {**summary, "cost": meter.cost(seconds, summary)}
        marker = run.complete(stage, t, inputs, outputs, seconds, summary)
    marker = dist.broadcast_object(marker)
    return StageResult(stage, t, False, marker, run.info.n_tasks)


class CostMeter:
    """What a stage cost: wall time, peak host memory, peak GPU memory, GPU-hours, images per second.

    Host memory is the process's peak resident set (`getrusage`) at the stage's
    end, so it includes what earlier stages of the same process used. GPU memory
    is the peak allocated by torch during the stage (reset at its start);
    GPU-hours count every rank's GPU.
    """

    def __init__(self, device: str):
        import torch

        self.device = dist.resolve_device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def cost(self, seconds: float, summary: dict) -> dict:
        import torch

        out = {
            "seconds": round(seconds, 3),
            "device": str(self.device),
            "peak_host_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if self.cuda:
            out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            out["gpu_hours"] = round(seconds * dist.world_size() / 3600, 6)
        images = summary.get("images_seen")
        if images:
            out["images_per_second"] = round(images / max(seconds, 1e-9), 1)
        elif summary.get("images_per_second"):
            out["images_per_second"] = summary["images_per_second"]
        return out


def run_all(
    run: Run, force: bool = False, on_stage: Callable[[StageResult], None] | None = None
) -> list[StageResult]:
    """Every stage not yet done (or stale), for every task, in order: the core five, then the enabled heads."""
    results = []
    for t in range(run.info.n_tasks):
        for stage in run_order(run.cfg):
            res = run_stage(run, stage, t, force=force)
            results.append(res)
            if on_stage is not None:
                on_stage(res)
    return results


_DEFAULTS = config_mod.to_dict(R.default_config())

# Result files up to this size (evaluations, heads) get a digest in their marker, checked on every read.
DIGEST_MAX_BYTES = 4 << 20
_DIGESTS: dict[tuple, str] = {}


def _digest(path: Path) -> str | None:
    """SHA-256 of a file (streamed), memoised per (path, size, mtime); None if it cannot be read."""
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            _DIGESTS[key] = file_sha256(path)
        return _DIGESTS[key]
    except OSError:
        return None


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _default_at(dotted: str):
    node: object = _DEFAULTS
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _same_config(recorded, current, defaults) -> bool:
    """Whether a marker's recorded config values equal the current ones.

    A key the marker does not have (added to clpt after the stage ran) counts as
    unchanged when it holds its default: the stage ran with that behaviour.
    """
    if isinstance(recorded, dict) and isinstance(current, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        for key, value in current.items():
            if key in recorded:
                if not _same_config(recorded[key], value, defaults.get(key)):
                    return False
            elif key not in defaults or value != defaults[key]:
                return False
        return set(recorded) <= set(current)
    return recorded == current


def prepare_backbone(run: Run) -> None:
    """The explicit pre-training step of the built-in backbone, when the run needs it and it is not cached.

    Under torchrun only rank 0 pre-trains; the others wait (`ensure_builtin_weights`).
    """
    from clpt.pretrain import ensure_builtin_weights, needs_builtin_weights

    if needs_builtin_weights(run.cfg.backbone):
        ensure_builtin_weights()


def status(run: Run) -> dict:
    """Which stages (and enabled heads) are done for which task, with their wall time.

    While another command holds the run's lock, the first stage (in run order) that is not done
    shows as `running`, and `writer` names the process."""
    from clpt.lock import holder

    writer = holder(run.root)
    tasks = []
    for t in range(run.info.n_tasks):
        row: dict = {"task": t, "classes": run.info.tasks[t], "stages": {}}
        for stage in run_order(run.cfg):
            m = run.marker(stage, t)
            st = run.state(stage, t)
            row["stages"][stage] = {
                "state": st,
                "seconds": m["seconds"] if m else None,
                "finished_at": m["finished_at"] if m else None,
            }
        tasks.append(row)
    if writer is not None:
        pending = next(((r, s) for r in tasks for s, v in r["stages"].items() if v["state"] != "done"), None)
        if pending is not None:
            pending[0]["stages"][pending[1]]["state"] = "running"
    return {
        "run": str(run.root),
        "writer": writer,
        "benchmark": run.info.benchmark,
        "method": run.cfg.method,
        "heads": list(run.cfg.heads.enabled),
        "n_tasks": run.info.n_tasks,
        "tasks": tasks,
    }


# ---------------------------------------------------------------------------
# What a command does with a run (the CLI calls these; so can a library user)
# ---------------------------------------------------------------------------

OnStage = Callable[[StageResult], None]


def run_one(
    root: Path, file: str | Path | None = None, overrides: list[str] | None = None, force: bool = False,
    wait: bool = False, on_stage: OnStage | None = None, on_start: Callable[[Run], None] | None = None,
) -> dict:  # fmt: skip
    """Create the run (from `file` and `overrides`) or continue it, run every stage not done, return its report.

    Continuing: given again, `file` and `overrides` must resolve to the run's own settings
    (the command that created the run, re-run); an edit of editable keys is `edit_config`.
    """
    root = Path(root)
    if not (root / "config.yaml").exists():
        create_run(root, R.resolve(file, overrides or []))
    elif file is not None or overrides:
        diff = config_differences(open_run(root), R.resolve(file, overrides or []))
        if diff:
            raise ClptError(
                f"{root} already holds a run with other settings: {'; '.join(diff[:3])}"
                + (f" and {len(diff) - 3} more" if len(diff) > 3 else ""),
                hint=f"use `clpt config {root} --set ...` for editable keys, or a new run folder",
            )
    run = open_for_work(root)
    if on_start is not None:
        on_start(run)
    with run_lock(run.root, wait):
        run_all(run, force=force, on_stage=on_stage)
    return report(run)


def parse_seeds(text: str) -> list[int]:
    """`1993,1996,1997` -> [1993, 1996, 1997]: distinct integers."""
    try:
        values = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ClptError(f"--seeds {text!r} is not a comma-separated list of integers",
                        hint="e.g. --seeds 1993,1996,1997") from None  # fmt: skip
    if not values or len(set(values)) != len(values):
        raise ClptError(f"--seeds {text!r} must list distinct seeds", hint="e.g. --seeds 1993,1996,1997")
    return values


def run_seeds(
    parent: Path, seeds: list[int], file: str | Path | None = None, overrides: list[str] | None = None,
    force: bool = False, wait: bool = False, on_stage: OnStage | None = None,
    on_seed: Callable[[int, Path], None] | None = None, on_start: Callable[[Run], None] | None = None,
) -> list[dict]:  # fmt: skip
    """One run per seed, `parent/seed_S`, each seed setting the class order and the training seed.

    An existing seed folder is continued (same settings), never overwritten. Returns the runs' reports.
    """
    parent, overrides = Path(parent), list(overrides or [])
    if any(o.split("=", 1)[0].strip() in ("seed", "benchmark.seed") for o in overrides):
        raise ClptError("--seeds sets seed and benchmark.seed itself", hint="drop them from --set")
    if (parent / "config.yaml").exists():
        raise ClptError(
            f"{parent} is a run folder, not a folder of runs", hint="give --seeds a new or parent folder"
        )
    docs = []
    for s in seeds:
        folder = parent / f"seed_{s}"
        if on_seed is not None:
            on_seed(s, folder)
        docs.append(
            run_one(
                folder,
                file,
                [*overrides, f"seed={s}", f"benchmark.seed={s}"],
                force,
                wait,
                on_stage,
                on_start,
            )
        )
    return docs


def refit_heads(
    root: Path, heads: list[str] | None = None, task: int | None = None, overrides: list[str] | None = None,
    force: bool = False, wait: bool = False, on_stage: OnStage | None = None,
) -> dict:  # fmt: skip
    """(Re)fit classifier heads (default: the enabled ones) for tasks 0..task from the cache; their report.

    `overrides` (`heads.NAME.KEY=VALUE`) edit the run's head settings first; exactly the heads
    whose settings changed become stale. Never reads an image.
    """
    for name in heads or []:
        base, compensated = head_name(name)
        if base not in HEADS or (compensated and not HEADS.get(base).drift):
            raise ClptError(f"unknown head {name!r}", hint=f"choose from: {', '.join(HEADS.names())} "
                            "(NAME+drift: fitted on drift-compensated statistics, with a drift method)")  # fmt: skip
    open_run(root)  # a clear error for a folder that is not a run, before locking it
    with run_lock(Path(root), wait):
        if overrides:
            edit_config(open_run(root), overrides)
        run = open_for_work(root)
        if any(head_name(n)[1] for n in heads or []) and not run.cfg.drift.enabled:
            raise ClptError("a NAME+drift head needs a drift method, and this run has drift.method none",
                            hint=f"set one first: `clpt config {run.root} --set drift.method=linear`")  # fmt: skip
        last = run.info.n_tasks - 1 if task is None else task
        run.check_task(last)
        for t in range(last + 1):
            for name in heads or head_names(run.cfg, list(run.cfg.heads.enabled)):
                res = run_stage(run, f"head:{name}", t, force=force)
                if on_stage is not None:
                    on_stage(res)
    if run.state("eval", last) == "done":
        return report(run, last)
    return {"run": str(run.root), "method": run.cfg.method, "task": last, "heads": head_report(run, last)}
