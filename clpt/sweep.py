"""Sweeps: seeds x a grid of settings, one run folder per job, dispatched through submitit.

`plan` turns a parent folder, a base config, overrides, seeds and a grid
(`key=v1,v2,...` per key) into jobs, one per combination, each with its own run
folder under the parent (`PARENT/key=v1,other=w/seed_1993`). `submit` sends them
as one Slurm job array (`cluster="slurm"`), as local processes (`"local"`,
submitit's local executor: what is tested here), or runs them in this process
(`"debug"`). Each job is `clpt.run.run_one` on its folder, so a job that is
re-submitted continues its run; `clpt report PARENT` aggregates the folders.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from clpt.errors import ClptError, ConfigError

CLUSTERS = ("slurm", "local", "debug")


@dataclass(frozen=True)
class Job:
    root: Path
    overrides: list[str] = field(default_factory=list)
    config: str | None = None


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`["train.lr=0.01,0.001", "heads.lda.shrinkage=1e-4,1e-2"]` -> [(key, values)], in order."""
    out, problems = [], []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()] if sep else []
        if not key.strip() or not vals:
            problems.append(f"--grid {item!r}: expected KEY=V1,V2,...")
        elif key.strip() in ("seed", "benchmark.seed"):
            problems.append(f"--grid {item!r}: seeds are given with --seeds")
        else:
            out.append((key.strip(), vals))
    if problems:
        raise ConfigError(problems, source="sweep")
    return out


def _name(pairs: list[tuple[str, str]]) -> str:
    text = ",".join(f"{k}={v}" for k, v in pairs)
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", text)


def plan(parent: Path, config: str | Path | None, overrides: list[str], seeds: list[int] | None,
         grid: list[tuple[str, list[str]]]) -> list[Job]:  # fmt: skip
    """One job per (grid combination, seed), each validated as a config before anything is submitted."""
    from clpt.stages import resolve as R

    parent = Path(parent)
    combos = list(itertools.product(*[[(k, v) for v in vals] for k, vals in grid])) or [()]
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    jobs = []
    for combo in combos:
        base = parent / _name(list(combo)) if combo else parent
        for seed in seed_list:
            extra = [f"{k}={v}" for k, v in combo]
            if seed is not None:
                extra += [f"seed={seed}", f"benchmark.seed={seed}"]
            root = base / f"seed_{seed}" if seed is not None else base
            job = Job(root, [*overrides, *extra], None if config is None else str(config))
            R.resolve(
                job.config, job.overrides
            )  # every problem of every job is found now, not on the cluster
            jobs.append(job)
    if len({j.root for j in jobs}) != len(jobs):
        raise ClptError(
            "two jobs of the sweep would share a run folder", hint="give each grid key distinct values"
        )
    return jobs


def run_job(job: Job) -> dict:
    """What one job does (in its own process): create or continue its run, run every stage; a short summary."""
    from clpt.run import run_one

    rep = run_one(job.root, job.config, job.overrides)
    return {"run": str(job.root), "last_acc": rep.get("last_acc"), "n_tasks": rep.get("n_tasks")}


def submit(jobs: list[Job], folder: Path, cluster: str = "local", timeout_min: int = 60 * 24,
           gpus: int = 0, cpus: int | None = None, partition: str | None = None,
           parallel: int | None = None, wait: bool = True) -> list[dict]:  # fmt: skip
    """Submit `jobs` as one array; with `wait`, their summaries (or {"run", "error"}) in order."""
    if cluster not in CLUSTERS:
        raise ConfigError([f"--cluster {cluster!r} is not one of {', '.join(CLUSTERS)}"], source="sweep")
    try:
        import submitit
    except ImportError:
        raise ClptError("sweeps are dispatched with submitit, which is not installed",
                        hint="pip install submitit (or pip install 'clpt[cluster]')") from None  # fmt: skip
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict = {"timeout_min": timeout_min, "name": "clpt-sweep"}
    if gpus:
        params["gpus_per_node"] = gpus
    if cpus:
        params["cpus_per_task"] = cpus
    if cluster == "slurm":
        if partition:
            params["slurm_partition"] = partition
        if parallel:
            params["slurm_array_parallelism"] = parallel
    executor.update_parameters(**params)
    submitted = executor.map_array(run_job, jobs)
    if not wait:
        return [{"run": str(j.root), "job_id": s.job_id} for j, s in zip(jobs, submitted, strict=True)]
    out = []
    for j, s in zip(jobs, submitted, strict=True):
        try:
            out.append({**s.result(), "job_id": s.job_id})
        except Exception as e:  # a failed job: its error, the others still reported
            last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            out.append({"run": str(j.root), "job_id": s.job_id, "error": last})
    return out
