"""`clpt report --plots DIR`: PNG figures of a report (matplotlib, no display needed).

    heatmap_<k>_<method>_<benchmark>_seed<S>.png   the accuracy matrix of run k (method's own classifier)
    accuracy_curves.png           accuracy on all seen classes after each task, mean with a
                                  band of one std over seeds: one line per method (its own
                                  classifier) when there are several groups, else the
                                  method and each of its heads
    final_per_task.png            accuracy on each task's classes after the last task
                                  (what was forgotten), mean and std over seeds

Each PNG carries its panel count and what it shows in its `Description` text
chunk (JSON), so a script can check a figure without looking at it.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np

from clpt.io import write_bytes
from clpt.report import non_defaults


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


def _save(fig, path: Path, what: dict) -> Path:
    """Rendered in memory, then written atomically: a kill or a full disk leaves no 0-byte PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", metadata={"Description": json.dumps(what)})
    _plt().close(fig)
    write_bytes(path, buf.getvalue())
    return path


def write_plots(out_dir: Path, runs, rows: list[dict]) -> list[Path]:
    """Write every figure for `runs` (RunResult) and `rows` (report.summarize) into out_dir."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k, r in enumerate(runs):  # one heatmap per run
        m = r.classifiers[r.method]["acc_matrix"]
        n = len(m)
        a = np.full((n, n), np.nan)
        for i, row in enumerate(m):
            a[i, : len(row)] = 100 * np.asarray(row)
        fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
        im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        for i in range(n):
            for j in range(i + 1):
                ax.text(j, i, f"{a[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if a[i, j] < 60 else "black")  # fmt: skip
        ax.set_xlabel("task evaluated")
        ax.set_ylabel("after training task")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        changed = non_defaults(r)  # the run's own settings, so two heatmaps of one method tell apart
        extra = f"\n{', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}" if changed else ""
        ax.set_title(f"{r.method} on {r.benchmark}, seed {r.seed[0]}: accuracy (%){extra}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        name = f"heatmap_{k + 1:02d}_{_slug(r.method + '_' + r.benchmark)}_seed{r.seed[0]}.png"
        written.append(
            _save(fig, out_dir / name, {"panels": 1, "kind": "heatmap", "run": str(r.path), "tasks": n,
                                        "settings": changed})  # fmt: skip
        )

    # Several groups: one line per method (its own classifier); one group: the method and its heads.
    if len({r["group"] for r in rows}) > 1:
        rows = [r for r in rows if not r["classifier"].startswith("head:")]
    colors = plt.get_cmap("tab20" if len(rows) > 10 else "tab10").colors
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn: list[tuple[list, str]] = []  # curves already drawn: an identical one is said so, and dashed
    labels: list[str] = []
    for k, row in enumerate(rows):
        mean, std = np.asarray(row["accuracies"]["mean"]), np.asarray(row["accuracies"]["std"])
        x = np.arange(len(mean))  # tasks counted from 0, as `--task` and the heatmaps count them
        n = len(row["seeds"])
        label = f"{row['group']} / {row['classifier']} (n={n})"
        same = next((name for curve, name in drawn if curve == list(mean)), None)
        if same is not None:
            label += f", identical to {same}"
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label, color=colors[k % len(colors)],
                          linestyle="--" if same is not None else "-")  # fmt: skip
        if n > 1:  # one seed has no spread to show
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        drawn.append((list(mean), row["classifier"]))
        labels.append(label)
    if rows:
        ax.set_xticks(range(len(rows[0]["accuracies"]["mean"])))
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.set_title("accuracy after each task (band: one std over seeds, where n > 1)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    written.append(
        _save(fig, out_dir / "accuracy_curves.png", {"panels": 1, "kind": "curves", "lines": len(rows),
                                                     "x": "after task, from 0", "labels": labels})  # fmt: skip
    )

    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(rows), 1)
    low = 100.0
    for k, row in enumerate(rows):
        mean, std = np.asarray(row["final_per_task"]["mean"]), np.asarray(row["final_per_task"]["std"])
        pos = np.arange(len(mean)) + (k - (len(rows) - 1) / 2) * width
        many = len(row["seeds"]) > 1
        ax.bar(pos, mean, width, yerr=std if many else None, capsize=1.5, color=colors[k % len(colors)],
               label=f"{row['group']} / {row['classifier']} (n={len(row['seeds'])})")  # fmt: skip
        if len(mean):
            low = min(low, float((mean - (std if many else 0)).min()))
    # the axis starts near the lowest bar, not at 0, so 75-90 % differences are not squashed (said so)
    floor = max(0.0, 10 * np.floor((low - 5) / 10))
    ax.set_ylim(bottom=floor)
    if floor > 0:
        ax.text(0.0, 1.01, f"y axis starts at {floor:.0f} %", transform=ax.transAxes, fontsize=7)
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy on the task's classes after the last task (%)")
    ax.set_title("final accuracy per task (what was forgotten)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    written.append(_save(fig, out_dir / "final_per_task.png", {"panels": 1, "kind": "final_per_task",
                                                                "bars": len(rows), "y_from": floor}))  # fmt: skip
    return written
