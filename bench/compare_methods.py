"""Methods side by side on the built-in benchmark: same seed, same run of this script.

    python bench/compare_methods.py                       # all methods and baselines of the paper
    python bench/compare_methods.py --methods slca seqft --set train.epochs=2 --set train.milestones=[2]

Prints Last-Acc, Inc-Acc and forgetting of each method, the number of trainable
parameters in the Slow Learner stage, the wall time of the whole run, and each
method's Last-Acc margin over Seq FT measured in this same invocation.
Runs go to a temporary folder unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from clpt import config as C
from clpt.evaluate import report
from clpt.run import create_run, run_all

# The paper's methods and baselines, as configs over the same code.
VARIANTS = {
    "seqft": ["method=seqft"],
    "seqft_sl": ["method=seqft_sl"],
    "frozen_ca": ["method=frozen_ca"],
    "slca": ["method=slca"],
    "slca_pp": ["method=slca_pp"],
    "slca_pp_mlp": ["method=slca_pp", "lora.targets=[qkv,mlp]"],
}
ALL = list(VARIANTS)


def trainable_parameters(cfg: C.RunConfig) -> int:
    """Parameters the Slow Learner updates at task 0 (the optimizer's groups of the real code)."""
    from clpt.train import initial_model, param_groups

    bare = C.build_config(C.deep_merge(C.to_dict(cfg), {"backbone": {"pretrained": False}}))
    model, _ = initial_model(bare, torch.device("cpu"))
    model.heads.add(cfg.benchmark.init_classes)
    return sum(p.numel() for g in param_groups(model, bare, 0) for p in g["params"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=ALL, choices=ALL)
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override (repeatable)"
    )
    ap.add_argument("--out", type=Path, default=None, help="keep the runs in this folder")
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON on stdout")
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="clpt-bench-"))
    rows = []
    for method in args.methods:
        cfg = C.resolve(overrides=[*VARIANTS[method], *args.overrides])
        t0 = time.perf_counter()
        run = create_run(out / method, cfg)
        run_all(run)
        seconds = time.perf_counter() - t0
        rep = report(run)
        rows.append(
            {
                "method": method,
                "last_acc": rep["last_acc"],
                "inc_acc": rep["inc_acc"],
                "forgetting": rep["forgetting"],
                "trainable_params": trainable_parameters(cfg),
                "seconds": seconds,
            }
        )
        print(f"[bench] {method}: Last-Acc {100 * rep['last_acc']:.2f} in {seconds:.0f} s", file=sys.stderr)

    base = next((r for r in rows if r["method"] == "seqft"), None)
    print(f"built-in benchmark, seed {cfg.seed}, {torch.get_num_threads()} threads, runs in {out}")
    head = f"{'method':<12} {'Last-Acc':>9} {'Inc-Acc':>8} {'Forget':>7} {'trainable':>10} {'wall s':>7}"
    if base:
        head += f" {'Last-Acc - SeqFT':>17}"
    print(head)
    for r in rows:
        line = (
            f"{r['method']:<12} {100 * r['last_acc']:>9.2f} {100 * r['inc_acc']:>8.2f} "
            f"{100 * r['forgetting']:>7.2f} {r['trainable_params']:>10,} {r['seconds']:>7.1f}"
        )
        if base:
            line += f" {100 * (r['last_acc'] - base['last_acc']):>+17.2f}"
        print(line)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
