"""The drift stage: task t's compensation map, and every old class's statistics moved into theta_t's space.

Inputs: the paired features of task t (`pairs`: theta_{t-1}; `train`: theta_t, the
same rows), and the statistics of the classes of tasks 0..t-1 as they stood in
theta_{t-1}'s space (`old_statistics`: after task t-1's compensation, plus task
t-1's own). Outputs: the map (`tasks/T/drift.safetensors`) and the compensated
statistics of classes 0..start_t - 1 (`drift.zarr/task_T`); the uncompensated
store is never touched, so compensation is an ablation, never a loss. A map of
task t thus composes the maps of every earlier task, and each task's work is
flat in the number of tasks (docs/methods/drift.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from clpt import artifacts
from clpt import distributed as dist
from clpt.drift import DRIFT_METHODS, DriftMap, Moments, symmetric
from clpt.errors import DataError, Redo
from clpt.seeding import DRIFT, generator, task_seed
from clpt.stages.base import StageContext

log = logging.getLogger("clpt")


def record_moments(p: dict) -> Moments:
    """A statistics store's arrays (`artifacts.load_stats`) as float64 Moments."""
    return Moments(*(torch.as_tensor(p[k]).to(torch.float64) for k in ("count", "mean", "m2")))


def concat(parts: list[Moments]) -> Moments:
    return Moments(*(torch.cat([getattr(p, k) for p in parts]) for k in ("count", "mean", "m2")))


def old_statistics(root: Path, t: int) -> tuple[Moments, torch.Tensor]:
    """The statistics of every class of tasks 0..t-1 in theta_{t-1}'s space, and their class ids."""
    parts = []
    if t >= 2:
        parts.append(artifacts.load_stats(root, t - 1, store="drift"))
    parts.append(artifacts.load_stats(root, t - 1))
    return concat([record_moments(p) for p in parts]), torch.cat(
        [torch.as_tensor(p["classes"]) for p in parts]
    )


def compensated_statistics(root: Path, t: int) -> tuple[Moments, torch.Tensor]:
    """The old classes' statistics in theta_t's space (classes of tasks 0..t-1), as the drift stage stored them."""
    p = artifacts.load_stats(root, t, store="drift")
    return record_moments(p), torch.as_tensor(p["classes"])


def load_map(root: Path, cfg, t: int) -> DriftMap:
    """Task t's map as fitted (its method and settings from the run's config)."""
    spec = DRIFT_METHODS.get(cfg.drift.method)
    state = artifacts.read_drift_map(
        artifacts.drift_map_path(root, t), spec.name, Redo("drift", t, str(root))
    )
    stats, _ = old_statistics(root, t)
    return spec.restore(state, stats, cfg.drift.of(spec.name))


def repair(m: Moments, classes: torch.Tensor, ridge: float) -> tuple[Moments, list[dict]]:
    """Compensated scatters whose covariance, with the ridge where it is used (`stats.ridge`), is not positive
    definite, replaced by their positive semi-definite part (negative eigenvalues clipped to 0); logged and
    recorded. Scatters that pass are left exactly as they are."""
    cov = m.m2 / (m.count - 1).clamp(min=1)[:, None, None]
    cov = cov + ridge * torch.eye(cov.shape[-1], dtype=cov.dtype)
    _, info = torch.linalg.cholesky_ex(cov)
    bad = torch.nonzero(info).flatten().tolist()
    if not bad:
        return m, []
    m2, repaired = m.m2.clone(), []
    for i in bad:
        e, v = torch.linalg.eigh(m.m2[i])
        m2[i] = symmetric((v * e.clamp(min=0)) @ v.T)
        repaired.append({"class": int(classes[i]), "min_eigenvalue": float(e.min())})
    log.warning("drift: %d compensated covariance(s) were not positive definite with stats.ridge; their negative "
                "eigenvalues were clipped to 0 (classes %s)", len(repaired), [r["class"] for r in repaired[:10]])  # fmt: skip
    return Moments(m.count, m.mean, m2), repaired


def run(ctx: StageContext) -> tuple[list[Path], dict]:
    t, cfg = ctx.task, ctx.cfg
    if t == 0:
        return [], {"reason": "first task: no earlier class to compensate"}
    outputs = [
        artifacts.drift_map_path(ctx.root, t),
        artifacts.drift_path(ctx.root) / artifacts.stats_group(t),
    ]
    if not dist.is_main():  # one rank fits and writes; the stores are on shared disk
        return outputs, {}
    spec = DRIFT_METHODS.get(cfg.drift.method)
    x_old, y_old = artifacts.read_features(ctx.root, t, artifacts.PAIRS)
    x_new, y_new = artifacts.read_features(ctx.root, t, "train")
    if x_old.shape != x_new.shape or not torch.equal(y_old, y_new):
        raise DataError(f"the paired features of task {t} do not match its training features row for row",
                        redo=ctx.redo("pairs", t))  # fmt: skip
    stats, classes = old_statistics(ctx.root, t)
    m = spec.fit(
        x_old, x_new, stats, classes, cfg.drift.of(spec.name), generator(task_seed(cfg.seed, t, DRIFT))
    )
    moved, repaired = repair(m.apply(stats, classes), classes, cfg.stats.ridge)
    if not all(bool(torch.isfinite(v).all()) for v in (moved.mean, moved.m2)):
        raise DataError(f"{spec.name} compensation of task {t} produced non-finite statistics",
                        hint=f"change drift.{spec.name}.* and refit ({{command}})", redo=ctx.redo("drift", t))  # fmt: skip
    info = {"method": spec.name, **m.info, "repaired": repaired}
    artifacts.save_drift_map(artifacts.drift_map_path(ctx.root, t), spec.name, t, m.state(), info)
    group = artifacts.save_stats(ctx.root, t, range(0, ctx.tasks[t][0]), moved.count.numpy(),
                                 moved.mean.numpy(), moved.m2.numpy(), ctx.input_id("pairs", t), store="drift")  # fmt: skip
    assert group == outputs[1]
    return outputs, info
