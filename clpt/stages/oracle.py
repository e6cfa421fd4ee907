"""The drift oracle: what stale statistics cost, and how much of it compensation recovers (docs/methods/drift.md).

An analysis tool, not a stage of a run: it re-extracts the training images of
every class of tasks 0..T-1 under task T's backbone (it reads old images, which
a continual learner may not), computes their true statistics, fits every
classifier on them, and compares on task T's test features:

    stale        each classifier as the run fitted it (`NAME`)
    compensated  its drift-compensated twin (`NAME+drift`), when the run has a drift method
    oracle       the same classifier on the re-extracted statistics and features
    recovered    (compensated - stale) / (oracle - stale)

plus, per old class, the errors of the compensated statistics against the oracle's.
The result is written to `tasks/T/oracle.json` (and `clpt report` shows it).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from clpt import artifacts, checkpoint
from clpt import distributed as dist
from clpt.drift import Moments
from clpt.errors import MissingInputError, Redo
from clpt.evaluate import accuracy_row
from clpt.features import extract_split
from clpt.heads import HEADS, InMemoryCache, score_in_chunks
from clpt.io import write_json
from clpt.precision import resolve as resolve_precision
from clpt.stages.drift import compensated_statistics, concat, record_moments
from clpt.stages.extract import rows_of
from clpt.stats import covariance, fit_class_stats


class _Memory:
    """A FeatureSink in memory."""

    def __init__(self, n: int, d: int):
        self.rows_done = 0
        self.x = np.zeros((n, d), dtype=np.float32)
        self.y = np.zeros(n, dtype=np.int64)

    def write(self, start: int, x: np.ndarray, y: np.ndarray) -> None:
        self.x[start : start + len(x)], self.y[start : start + len(x)] = x, y


def class_errors(stale, comp, orc, ridge: float) -> dict:
    """Per old class: relative mean error, cosine of the means, relative Frobenius error of the covariance,
    KL(oracle || estimate) of the Gaussians (covariances + ridge); for the stale and the compensated estimate."""

    def errors(est) -> dict:
        mu_e, mu_o = est.mean, orc.mean
        cov_e, cov_o = covariance(est.count, est.m2, ridge), covariance(orc.count, orc.m2, ridge)
        d = mu_o.shape[1]
        l_e = torch.linalg.cholesky(cov_e)
        solve = torch.cholesky_solve(cov_o, l_e)  # Sigma_e^-1 Sigma_o
        diff = (mu_e - mu_o)[:, :, None]
        maha = (diff.transpose(1, 2) @ torch.cholesky_solve(diff, l_e)).flatten()
        logdet_e = 2 * torch.log(torch.diagonal(l_e, dim1=1, dim2=2)).sum(1)
        logdet_o = torch.linalg.slogdet(cov_o).logabsdet
        kl = 0.5 * (torch.diagonal(solve, dim1=1, dim2=2).sum(1) + maha - d + logdet_e - logdet_o)
        return {
            "mean_error": (mu_e - mu_o).norm(dim=1),
            "mean_cosine": torch.nn.functional.cosine_similarity(mu_e, mu_o, dim=1),
            "cov_rel_frobenius": (cov_e - cov_o).flatten(1).norm(dim=1) / cov_o.flatten(1).norm(dim=1),
            "kl": kl,
        }

    s, out = errors(stale), {}
    c = errors(comp) if comp is not None else None
    for key in s:
        out[f"stale_{key}"] = float(s[key].mean())
        if c is not None:
            out[f"compensated_{key}"] = float(c[key].mean())
    if c is not None:  # ||mu_comp - mu_orc|| / ||mu_stale - mu_orc||, per class, then the mean
        out["relative_mean_error"] = float((c["mean_error"] / s["mean_error"].clamp(min=1e-12)).mean())
    return out


def oracle(run, t: int) -> dict:
    """The oracle document of task t of an opened run (`clpt.run.Run`); written to tasks/T/oracle.json."""
    if t < 1:
        raise MissingInputError("the oracle needs a task after the first (task 0 has no old class)",
                                hint="pass --task 1 or later")  # fmt: skip
    for stage in ("train", "extract", "stats"):
        for i in range(t + 1) if stage == "stats" else (t,):
            state = run.state(stage, i)
            if state == "damaged":
                raise run.damaged_error(stage, i)
            if state != "done":
                raise MissingInputError(f"the oracle of task {t} needs {stage} of task {i}, which is {state}",
                                        redo=Redo(stage, i, str(run.root), force=False))  # fmt: skip
    cfg, root = run.cfg, run.root
    device = dist.resolve_device(cfg.system.device)
    t0 = time.perf_counter()
    bench = run.benchmark()
    model = checkpoint.load_model(artifacts.model_path(root, t), cfg, device, Redo("train", t, str(root)))
    prec = resolve_precision(cfg.system.precision, device)
    sinks = []  # each old task's rows as its own extraction batched them: on a frozen backbone, the same bits
    for i in range(t):
        rows = rows_of(bench.train, range(*run.info.tasks[i]))
        sinks.append(_Memory(len(rows), model.dim))
        extract_split(model, bench, bench.train, rows, sinks[-1], cfg.system.extract_batch_size,
                      cfg.system.feature_chunk_rows, device, cfg.system.num_workers, prec,
                      label=f"task {t} oracle: training images of task {i}")  # fmt: skip
    extract_s = time.perf_counter() - t0
    x_t, y_t = artifacts.read_features(root, t, "train")
    x = torch.cat([*(torch.from_numpy(m.x) for m in sinks), x_t])
    y = torch.cat([*(torch.from_numpy(m.y) for m in sinks), y_t])
    heads_t = checkpoint.load_trained_heads(artifacts.model_path(root, t), Redo("train", t, str(root)))
    # chunks of stats.chunk_rows: the statistics the heads see are reduced as fit-stats reduces them
    cache = InMemoryCache(
        x, y, run.info.tasks[: t + 1], t, cfg, device, rows=cfg.stats.chunk_rows, heads=heads_t
    )
    cache.compensated = True  # the statistics are not the align stage's: `ca` aligns on them itself
    x_test, y_test = artifacts.read_features(root, t, "test")
    heads: dict = {}
    for name in [h for h in cfg.heads.enabled if HEADS.get(h).drift]:
        scores = HEADS.get(name).fit(cache, cfg.heads.of(name))
        orc = accuracy_row(score_in_chunks(scores, x_test, device), y_test, run.info.tasks[: t + 1])[
            "accuracy"
        ]
        row = {"oracle": orc}
        for key, stage in (("stale", f"head:{name}"), ("compensated", f"head:{name}+drift")):
            if run.state(stage, t) == "done":
                path = artifacts.head_eval_path(root, stage.removeprefix("head:"), t)
                row[key] = artifacts.read_eval(path, "clpt-head-eval", Redo(stage, t, str(root)))["accuracy"]
        if "stale" in row and "compensated" in row and not math.isclose(row["oracle"], row["stale"]):
            row["recovered"] = (row["compensated"] - row["stale"]) / (row["oracle"] - row["stale"])
        heads[name] = row
    # per-class errors of the old classes' statistics
    n_old = run.info.tasks[t][0]
    step = cfg.stats.chunk_rows
    parts = [
        fit_class_stats(
            ((torch.from_numpy(m.x[a : a + step]), torch.from_numpy(m.y[a : a + step])) for a in range(0, len(m.y), step)),
            range(*run.info.tasks[i]), model.dim, device, cfg.stats.kernel_precision,
        )
        for i, m in enumerate(sinks)
    ]  # fmt: skip
    orc_m = Moments(*(torch.cat([getattr(p, k).cpu() for p in parts]) for k in ("count", "mean", "m2")))
    stale = concat([record_moments(artifacts.load_stats(root, i)) for i in range(t)])
    comp = (
        compensated_statistics(root, t)[0] if cfg.drift.enabled and run.state("drift", t) == "done" else None
    )
    doc = {
        "task": t,
        "drift_method": cfg.drift.method,
        "old_classes": n_old,
        "old_images": sum(len(m.y) for m in sinks),
        "extract_seconds": round(extract_s, 3),
        "heads": heads,
        "statistics": class_errors(stale, comp, orc_m, max(cfg.stats.ridge, 1e-6)),
    }
    write_json(artifacts.task_dir(root, t) / "oracle.json", doc)
    return doc
