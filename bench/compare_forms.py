"""What each statistics form (stats.covariance: full, diagonal, lowrank) costs in accuracy on the built-in benchmark.

    python bench/compare_forms.py                          # SLCA and Seq FT (CA on its trained heads), rank 16
    python bench/compare_forms.py --learners slca --rank 8 --out runs/forms

Each learner trains once, with full statistics; switching the form (`clpt config RUN --set
stats.covariance=...`) redoes fit-stats, the alignment and the heads from the cached features (no image
is read, the backbone is not trained again). Printed: Last-Acc in % after the last task of the method's
own classifier and of every head per form, its difference from the full form, and the statistics' size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from clpt import artifacts
from clpt.run import edit_config, open_for_work, open_run, report, run_all, run_one

FORMS = ("full", "diagonal", "lowrank")


def measure(root: Path, rank: int) -> dict:
    out: dict = {}
    for form in FORMS:
        run = open_run(root)
        edit_config(run, [f"stats.covariance={form}", f"stats.rank={rank}"])
        run = open_for_work(root)
        run_all(run)
        rep = report(run)
        row = {"own": 100 * rep["last_acc"], **{k: 100 * h["last_acc"] for k, h in rep["heads"].items()}}
        size = 0
        for t in range(run.info.n_tasks):
            p = artifacts.load_stats(root, t)
            size += sum(p[k].nbytes for k in ("m2", "diag", "basis", "eigval", "resid") if k in p)
        out[form] = {"last_acc": row, "scatter_bytes": size}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--learners", default="slca,seqft", help="methods to train (comma-separated)")
    ap.add_argument("--rank", type=int, default=16, help="r of the lowrank form")
    ap.add_argument("--out", type=Path, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for new runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="clpt-forms-"))
    results = {}
    for learner in args.learners.split(","):
        root = out_dir / learner
        print(f"training {learner} in {root} ...", file=sys.stderr)
        run_one(root, None, [f"method={learner}", *args.overrides])
        results[learner] = measure(root, args.rank)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"Last-Acc in % (difference from full); lowrank r = {args.rank}")
    for learner, res in results.items():
        names = list(res["full"]["last_acc"])
        print(f"\n{learner}: | classifier | " + " | ".join(FORMS) + " |")
        print("|---|" + "---|" * len(FORMS))
        for n in names:
            full = res["full"]["last_acc"][n]
            cells = [f"{full:.2f}"] + [f"{res[f]['last_acc'][n]:.2f} ({res[f]['last_acc'][n] - full:+.2f})"
                                       for f in FORMS[1:]]  # fmt: skip
            print(f"| {'own (' + learner + ')' if n == 'own' else n} | " + " | ".join(cells) + " |")
        print("| scatter stored | " + " | ".join(f"{res[f]['scatter_bytes'] / 1e6:.2f} MB" for f in FORMS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
