"""`clpt report`: finished runs grouped by configuration, mean and std over seeds, costs, published numbers.

Runs are grouped by everything in their config except the seeds (`seed`,
`benchmark.seed`) and the `system` section (device, workers, precision: how a
run was computed, not what). Per group and per classifier (the method's own,
then every head evaluated up to the last task) the report gives Last-Acc, Inc-Acc
and forgetting as mean and std over seeds (sample std, ddof 1; 0 for one seed),
with the number of seeds. Unfinished runs are listed and skipped.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clpt import artifacts, published
from clpt import config as C
from clpt.config import flatten
from clpt.errors import ClptError, MissingInputError
from clpt.io import read_json
from clpt.run import open_run, report
from clpt.stages import run_order
from clpt.units import machine, machine_number

METRICS = ("last_acc", "inc_acc", "forgetting", "last_acc_task_balanced", "inc_acc_task_balanced",
           "top5", "old_acc", "old_task_acc", "new_acc",
           "oracle_last_acc")  # fmt: skip  # the classifier on oracle statistics (clpt drift-oracle), if measured
SHOWN = ("last_acc", "inc_acc", "forgetting")
FORMATS = ("table", "markdown", "csv", "latex", "json")


@dataclass
class RunResult:
    path: Path
    method: str
    benchmark: str
    seed: tuple[int, int]  # (training seed, class-order seed)
    key: str  # the group: the config without seeds and system
    config: dict
    classifiers: dict[str, dict]  # name -> metrics, accuracies, acc_matrix
    cost: dict
    protocol: dict


@dataclass
class Group:
    key: str
    label: str
    runs: list[RunResult] = field(default_factory=list)


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders among `paths`: a run folder itself, or every run folder below a parent folder."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / "config.yaml").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(c.parent for c in p.rglob("config.yaml") if c.parent != p))
        else:
            raise MissingInputError(
                f"{p} is neither a run folder nor a folder of runs", hint="pass run folders"
            )
    seen, out = set(), []
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def _group_key(cfg: dict) -> str:
    reduced = {k: v for k, v in cfg.items() if k not in ("seed", "system")}
    reduced["benchmark"] = {k: v for k, v in cfg["benchmark"].items() if k != "seed"}
    return json.dumps(reduced, sort_keys=True)


def _cost(run) -> dict:
    """Per stage kind: wall seconds (summed over tasks); the run's peaks, GPU-hours and images/s."""
    seconds: dict[str, float] = {}
    peak_host = peak_gpu = gpu_hours = 0.0
    ips: dict[str, list[float]] = {"train": [], "extract": []}
    for t in range(run.info.n_tasks):
        for stage in run_order(run.cfg):
            m = run.marker(stage, t)
            if m is None:
                continue
            kind = "heads" if stage.startswith("head:") else stage
            seconds[kind] = seconds.get(kind, 0.0) + float(m.get("seconds", 0.0))
            c = (m.get("summary") or {}).get("cost") or {}
            peak_host = max(peak_host, c.get("peak_host_mib", 0.0))
            peak_gpu = max(peak_gpu, c.get("peak_gpu_mib", 0.0))
            gpu_hours += c.get("gpu_hours", 0.0)
            if stage in ips and c.get("images_per_second"):
                ips[stage].append(c["images_per_second"])
    out = {
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 2),
    }
    out["peak_host_mib"] = peak_host or None
    out["peak_gpu_mib"] = peak_gpu or None
    out["gpu_hours"] = round(gpu_hours, 4) if gpu_hours else None
    for stage, v in ips.items():
        out[f"{stage}_images_per_second"] = round(float(np.mean(v)), 1) if v else None
    return out


def _protocol(run) -> dict:
    try:
        resolved = artifacts.read_record(run.root, "clpt-backbone-record").get("resolved")
    except ClptError:
        resolved = None
    b = run.cfg.benchmark
    return {"backbone": resolved or run.cfg.backbone.name, "normalization": b.normalization,
            "split": [b.init_classes, b.increment], "test_resize": b.test_resize}  # fmt: skip


def load(paths: list[Path]) -> tuple[list[RunResult], list[tuple[str, str]]]:
    """(finished runs, [(run, why it is skipped)])."""
    done, skipped = [], []
    for p in find_runs(paths):
        try:
            run = open_run(p)
            last = run.info.n_tasks - 1
            if run.state("eval", last) != "done":
                n = sum(run.state("eval", t) == "done" for t in range(run.info.n_tasks))
                skipped.append((str(p), f"unfinished: {n} of {run.info.n_tasks} tasks evaluated"))
                continue
            rep = report(run, last)
        except ClptError as e:
            skipped.append((str(p), e.one_line()))
            continue
        cfg = C.to_dict(run.cfg)
        classifiers = {run.cfg.method: {k: rep.get(k) for k in (*METRICS, "accuracies", "acc_matrix")}}
        for name, h in rep["heads"].items():
            classifiers[f"head:{name}"] = {k: h.get(k) for k in (*METRICS, "accuracies", "acc_matrix")}
        orc_path = artifacts.task_dir(run.root, last) / "oracle.json"
        if (
            orc_path.is_file()
        ):  # `clpt drift-oracle` of the last task: each head (and its +drift twin) on true statistics
            for name, h in read_json(orc_path).get("heads", {}).items():
                for key in (f"head:{name}", f"head:{name}+drift"):
                    if key in classifiers:
                        classifiers[key]["oracle_last_acc"] = h.get("oracle")
        done.append(
            RunResult(
                p,
                run.cfg.method,
                run.info.benchmark,
                (run.cfg.seed, run.cfg.benchmark.seed),
                _group_key(cfg),
                cfg,
                classifiers,
                _cost(run),
                _protocol(run),
            )  # fmt: skip
        )
    return done, skipped


def group(runs: list[RunResult]) -> list[Group]:
    groups: dict[str, Group] = {}
    for r in runs:
        groups.setdefault(r.key, Group(r.key, f"{r.method} on {r.benchmark}")).runs.append(r)
    out = list(groups.values())
    base = [g.label for g in out]
    for i, g in enumerate(out):  # same method and benchmark, other settings: name what differs
        others = [json.loads(o.key) for j, o in enumerate(out) if j != i and base[j] == base[i]]
        if others:
            diff = _differing(json.loads(g.key), others)
            g.label += f" ({', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})"
    return out


def non_defaults(r: RunResult) -> list[str]:
    """The run's settings that differ from its method's and benchmark's presets ("key=value", sorted),
    seeds, system settings and the dataset's folder left out: what a figure of one run names."""
    from clpt.stages import resolve as R

    b = r.config.get("benchmark", {})
    try:
        base = R.resolve(overrides=[f"method={r.method}", f"benchmark.name={b.get('name')}",
                                    f"benchmark.root={b.get('root') or '.'}"])  # fmt: skip
    except ClptError:
        return []
    mine, preset = flatten(r.config), flatten(C.to_dict(base))
    skip = ("seed", "benchmark.seed", "benchmark.root", "benchmark.image_size", "system.")
    return sorted(f"{k}={mine[k]}" for k in mine if not k.startswith(skip) and mine[k] != preset.get(k, mine[k]))


def _differing(cfg: dict, others: list[dict]) -> list[str]:
    mine = flatten(cfg)
    diff = set()
    for o in others:
        theirs = flatten(o)
        diff |= {f"{k}={mine.get(k)}" for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
    return sorted(diff)


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def summarize(groups: list[Group]) -> list[dict]:
    """One row per (group, classifier): metrics as mean/std/n (in percent), cost, published numbers."""
    rows = []
    for g in groups:
        names = list(g.runs[0].classifiers)
        for name in names:
            runs = [r for r in g.runs if name in r.classifiers]
            row: dict = {
                "group": g.label,
                "method": g.runs[0].method,
                "benchmark": g.runs[0].benchmark,
                "classifier": name,
                "seeds": sorted(r.seed[0] for r in runs),
                "runs": [str(r.path) for r in runs],
            }
            for m in METRICS:
                vals = [100 * r.classifiers[name][m] for r in runs if r.classifiers[name].get(m) is not None]
                vals = [v for v in vals if not math.isnan(v)]
                row[m] = _stats(vals) if vals else None
            row["accuracies"] = _stats_curve([r.classifiers[name]["accuracies"] for r in runs])
            row["final_per_task"] = _stats_curve([r.classifiers[name]["acc_matrix"][-1] for r in runs])
            row["cost"] = _mean_cost([r.cost for r in runs])
            # the method's own classifier is compared with the method's published rows; a head with its own
            mkey = g.runs[0].method if name == g.runs[0].method else name
            ours = {**g.runs[0].protocol, "seeds": len(runs)}
            row["published"] = []
            for p in published.lookup(mkey, g.runs[0].benchmark):
                mine = row.get(p.metric)
                row["published"].append({
                    "metric": p.metric, "value": p.value, "source": p.source, "convention": p.convention,
                    "ours": None if mine is None else round(mine["mean"], 2),
                    "gap": None if mine is None else round(mine["mean"] - p.value, 2),
                    "protocol_differs": published.protocol_flags(p, ours),
                })  # fmt: skip
            rows.append(row)
    _recovered(rows)
    return rows


def _recovered(rows: list[dict]) -> None:
    """For each NAME+drift row with an oracle: (compensated - stale) / (oracle - stale), of the means, in place."""
    by = {(r["group"], r["classifier"]): r for r in rows}
    for r in rows:
        stale = by.get((r["group"], r["classifier"].removesuffix("+drift")))
        if r["classifier"].endswith("+drift") and stale and r.get("oracle_last_acc") and r.get("last_acc"):
            s, c, o = stale["last_acc"]["mean"], r["last_acc"]["mean"], r["oracle_last_acc"]["mean"]
            r["recovered"] = round((c - s) / (o - s), 4) if abs(o - s) > 1e-9 else None


def _stats_curve(curves: list[list[float]]) -> dict:
    arr = 100 * np.asarray(curves, dtype=float)
    std = arr.std(axis=0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1])
    return {"mean": arr.mean(axis=0).round(4).tolist(), "std": std.round(4).tolist()}


def _mean_cost(costs: list[dict]) -> dict:
    out: dict = {}
    for key in ("total_seconds", "peak_host_mib", "peak_gpu_mib", "gpu_hours",
                "train_images_per_second", "extract_images_per_second"):  # fmt: skip
        vals = [c[key] for c in costs if c.get(key) is not None]
        out[key] = round(float(np.mean(vals)), 4) if vals else None
    stages = sorted({k for c in costs for k in c["seconds"]})
    out["seconds"] = {s: round(float(np.mean([c["seconds"].get(s, 0.0) for c in costs])), 2) for s in stages}
    return out


# --- output formats --------------------------------------------------------------------------


def _pm(s: dict | None, latex: bool = False) -> str:
    if s is None:
        return "-"
    if s.get("n", 2) < 2:  # one seed: no spread to show (the seeds column says n = 1)
        return f"{s['mean']:.2f}"
    sep = " $\\pm$ " if latex else " ± "
    return f"{s['mean']:.2f}{sep}{s['std']:.2f}"


def _published_cell(row: dict) -> str:
    cells = []
    for p in row["published"]:
        flag = " *" if p["protocol_differs"] else ""
        gap = "" if p["gap"] is None else f" ({p['gap']:+.2f})"
        cells.append(f"{_short(p['metric'])} {p['value']:.2f}{gap}{flag}")
    return "; ".join(cells) or "-"


def _short(metric: str) -> str:
    return {"last_acc": "Last", "inc_acc": "Inc", "last_acc_task_balanced": "Last(tb)"}.get(metric, metric)


HEADER = ("group", "classifier", "seeds", "Last-Acc", "Inc-Acc", "Forgetting", "wall s", "published (gap)")


def cells(row: dict, latex: bool = False) -> list[str]:
    return [row["group"], row["classifier"], str(len(row["seeds"])),
            *(_pm(row[m], latex) for m in SHOWN), f"{row['cost']['total_seconds']:.0f}", _published_cell(row)]  # fmt: skip


def as_fractions(rows: list[dict]) -> list[dict]:
    """The summary rows with accuracies as fractions in [0, 1], the unit of all machine output (`--json`,
    `report --format json|csv`); the tables for people show percent."""
    out = []
    for r in rows:
        r = dict(r)
        for m in METRICS:
            if r.get(m):
                r[m] = {**r[m], "mean": r[m]["mean"] / 100, "std": r[m]["std"] / 100}
        for key in ("accuracies", "final_per_task"):
            if r.get(key):
                r[key] = {k: [v / 100 for v in vals] for k, vals in r[key].items()}
        r["published"] = [{**p, **{k: None if p[k] is None else p[k] / 100 for k in ("value", "ours", "gap")}}
                          for p in r.get("published", [])]  # fmt: skip
        out.append(r)
    return out


def render(rows: list[dict], skipped: list[tuple[str, str]], fmt: str) -> str:
    """The report as text in `fmt` (table is rendered by the CLI with rich). json and csv are machine
    output: accuracies as fractions, 6 significant digits; markdown and latex are tables in percent."""
    if fmt == "json":
        doc = {"rows": as_fractions(rows), "skipped": [{"run": r, "why": w} for r, w in skipped]}
        return json.dumps(machine(doc), allow_nan=False)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        cols = ["group", "method", "benchmark", "classifier", "n_seeds", "seeds"]
        for m in METRICS:
            cols += [f"{m}_mean", f"{m}_std"]
        cols += ["total_seconds", "peak_host_mib", "peak_gpu_mib", "gpu_hours", "train_images_per_second",
                 "extract_images_per_second", "published"]  # fmt: skip
        w.writerow(cols)
        for r in rows:
            vals = [r["group"], r["method"], r["benchmark"], r["classifier"], len(r["seeds"]),
                    " ".join(map(str, r["seeds"]))]  # fmt: skip
            for m in METRICS:
                vals += [machine_number(r[m]["mean"] / 100), machine_number(r[m]["std"] / 100)] if r[m] else ["", ""]
            c = r["cost"]
            vals += [c[k] if c[k] is not None else "" for k in ("total_seconds", "peak_host_mib", "peak_gpu_mib",
                     "gpu_hours", "train_images_per_second", "extract_images_per_second")]  # fmt: skip
            vals.append(_published_cell(r))
            w.writerow(vals)
        return buf.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
        lines += footnotes(rows, skipped)
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        esc = lambda s: s.replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")  # noqa: E731
        lines = ["\\begin{tabular}{ll" + "r" * (len(HEADER) - 2) + "}", "\\toprule",
                 " & ".join(HEADER) + " \\\\", "\\midrule"]  # fmt: skip
        lines += [" & ".join(esc(c) if i in (0, 1, 7) else c for i, c in enumerate(cells(r, latex=True))) + " \\\\"
                  for r in rows]  # fmt: skip
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise ClptError(f"unknown format {fmt!r}", hint=f"choose from: {', '.join(FORMATS)}")


def footnotes(rows: list[dict], skipped: list[tuple[str, str]]) -> list[str]:
    out = []
    srcs = sorted({p["source"] for r in rows for p in r["published"]})
    flags = [(r["group"], r["classifier"], p["protocol_differs"]) for r in rows for p in r["published"]
             if p["protocol_differs"]]  # fmt: skip
    if srcs or flags or skipped:
        out.append("")
    for s in srcs:
        out.append(f"- published: {s}")
    for g, c, f in flags:
        out.append(f"- * {g} / {c}: protocol differs: {'; '.join(f)}")
    oracle = [r for r in rows if r.get("oracle_last_acc")]
    if oracle and not (srcs or flags or skipped):
        out.append("")
    for r in oracle:
        rec = r.get("recovered")
        out.append(f"- oracle statistics ({r['group']} / {r['classifier']}): Last-Acc {r['oracle_last_acc']['mean']:.2f}"
                   + (f"; compensation recovered {100 * rec:.0f} % of the stale-to-oracle gap" if rec is not None else ""))  # fmt: skip
    for run, why in skipped:
        out.append(f"- skipped {run}: {why}")
    return out
