"""Drift compensation on the built-in benchmark: Last-Acc of every classifier with stale statistics, with each
compensation method, and with oracle statistics; the share of the stale-to-oracle gap each method recovers; and
what the drift stages cost against one training epoch.

    python bench/compare_drift.py                    # SLCA, SLCA++, Seq FT w/ SL, Seq FT, SLDC on the built-in benchmark
    python bench/compare_drift.py --runs RUN [RUN]   # run folders of your own (any drift method set, or none)
    python bench/compare_drift.py --out runs/drift --set train.epochs=2 --set train.milestones=[1]

Each learner trains once; switching the drift method is a refit from the cache (no image is read); the oracle
re-extracts the old classes' training images once per run. Numbers are Last-Acc in % after the last task.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from clpt.drift_methods import DRIFT_METHODS
from clpt.run import edit_config, open_for_work, open_run, report, run_all, run_one
from clpt.stages.oracle import oracle

LEARNERS = {
    "slca": "SLCA",
    "slca_pp": "SLCA++",
    "seqft_sl": "Seq FT w/ SL",
    "seqft": "Seq FT",
    "sldc": "SLDC",
}


def measure(root: Path, methods: list[str]) -> dict:
    """For one run folder: Last-Acc per classifier under none / each method / oracle, and the stages' costs."""
    out: dict = {"run": str(root), "last_acc": {}, "cost": {}}
    for method in methods:
        run = open_run(root)
        if run.cfg.drift.method != method:
            edit_config(run, [f"drift.method={method}"])
        run = open_for_work(root)
        run_all(run)
        rep = report(run)
        for name, h in rep["heads"].items():
            base, _, comp = name.partition("+")
            row = out["last_acc"].setdefault(base, {})
            row[method if comp else "none"] = 100 * h["last_acc"]
        markers = [run.marker(s, t) for t in range(run.info.n_tasks) for s in ("pairs", "drift", "train")]
        epochs = run.cfg.train.epochs if run.cfg.method not in ("simplecil", "ranpac_frozen") else 1
        out["cost"][method] = {
            "pairs_s": sum(m["seconds"] for m in markers[0::3] if m),
            "drift_s": sum(m["seconds"] for m in markers[1::3] if m),
            "train_epoch_s": sum(m["seconds"] for m in markers[2::3] if m) / epochs,
            "extract_s": sum(
                (run.marker("extract", t) or {}).get("seconds", 0) for t in range(run.info.n_tasks)
            ),
        }
    run = open_for_work(root)
    doc = oracle(run, run.info.n_tasks - 1)
    for name, h in doc["heads"].items():
        out["last_acc"].setdefault(name, {})["oracle"] = 100 * h["oracle"]
    out["oracle_extract_s"] = doc["extract_seconds"]
    return out


def recovered(row: dict, method: str) -> float | None:
    stale, comp, orc = row.get("none"), row.get(method), row.get("oracle")
    if None in (stale, comp, orc) or abs(orc - stale) < 0.5:  # a gap under half a point is noise here
        return None
    return (comp - stale) / (orc - stale)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", type=Path, help="existing run folders (default: train the learners)")
    ap.add_argument("--out", type=Path, help="where new runs go (default: a temporary folder)")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override for new runs"
    )
    ap.add_argument("--learners", default=",".join(LEARNERS), help="methods to train (comma-separated)")
    ap.add_argument(
        "--methods", default=",".join(DRIFT_METHODS.names()), help="drift methods (comma-separated)"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    methods = args.methods.split(",")
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="clpt-drift-"))
    roots = list(args.runs or [])
    if not roots:
        for learner in args.learners.split(","):
            root = out_dir / learner
            print(f"training {learner} in {root} ...", file=sys.stderr)
            run_one(root, None, [f"method={learner}", f"drift.method={methods[0]}", *args.overrides])
            roots.append(root)
    results = {}
    for root in roots:
        results[str(root)] = {"method": open_run(root).cfg.method, **measure(root, methods)}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    head = ["learner", "classifier", "none", *methods, "oracle", *[f"rec. {m}" for m in methods]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for res in results.values():
        learner = LEARNERS.get(res["method"], res["method"])
        for name, row in res["last_acc"].items():
            cells = [f"{row[k]:.2f}" if k in row else "-" for k in ("none", *methods, "oracle")]
            rec = [f"{100 * r:.0f} %" if (r := recovered(row, m)) is not None else "-" for m in methods]
            print(f"| {learner} | {name} | " + " | ".join(cells + rec) + " |")
            learner = ""
    print()
    print(
        "cost (seconds over all tasks): pairs extraction, drift fit per method, one training epoch, extraction"
    )
    for res in results.values():
        c = res["cost"]
        m0 = methods[0]
        fits = ", ".join(f"{m} {c[m]['drift_s']:.2f}" for m in methods)
        print(
            f"  {LEARNERS.get(res['method'], res['method'])}: pairs {c[m0]['pairs_s']:.2f} (extract of train+test "
            f"{c[m0]['extract_s']:.2f}), drift fits: {fits}; one training epoch {c[m0]['train_epoch_s']:.2f}; "
            f"oracle extraction {res['oracle_extract_s']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
