"""Methods side by side on the built-in benchmark: same seed, same run of this script.

    python bench/compare_methods.py                       # all methods and baselines of the paper
    python bench/compare_methods.py --methods slca seqft --set train.epochs=2 --set train.milestones=[2]

Prints Last-Acc, Inc-Acc and forgetting of each method (its own classifier: the
aligned heads, or SimpleCIL's / RanPAC's head), the number of parameters its
learner trains, the share of backbone entries a training step moves (bb/step;
measured for MIST), the wall time of the whole run (the six classifier heads
included), and each method's Last-Acc margin over Seq FT, all in this invocation.
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
from clpt.run import create_run, report, run_all
from clpt.stages import resolve as R

# The paper's methods and baselines, as configs over the same code.
VARIANTS = {
    "seqft": ["method=seqft"],
    "seqft_sl": ["method=seqft_sl"],
    "frozen_ca": ["method=frozen_ca"],
    "slca": ["method=slca"],
    "slca_pp": ["method=slca_pp"],
    "slca_pp_mlp": ["method=slca_pp", "lora.targets=[qkv,mlp]"],
    # docs/methods/heads.md: statistics heads on a frozen backbone, and with MIST's sparse tuning
    "simplecil": ["method=simplecil"],
    "simplecil_mist": ["method=simplecil_mist"],
    "ranpac_frozen": ["method=ranpac_frozen"],
    "ranpac_mist": ["method=ranpac_mist"],
}
ALL = list(VARIANTS)


def trainable_parameters(cfg: C.RunConfig) -> tuple[int, float]:
    """Parameters the learner updates at task 0, and the share of backbone entries a step moves.

    Slow Learner: the optimizer's groups of the real code; each step moves every trainable
    entry. MIST: the backbone and projection head are in the optimizer, and the share per
    step is measured (`updated_share_per_step` in the train markers); see `main`.
    """
    from clpt.methods import METHODS
    from clpt.train import initial_model, param_groups

    bare = R.build_config(C.deep_merge(C.to_dict(cfg), {"backbone": {"pretrained": False}}))
    model, _ = initial_model(bare, torch.device("cpu"))
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    learner = METHODS.get(cfg.method).learner
    if learner == "none":
        return 0, 0.0
    if learner == "mist":
        return n_backbone + (model.dim + 1) * cfg.mist.proj_dim, float("nan")
    model.heads.add(cfg.benchmark.init_classes)
    groups = param_groups(model, bare, 0)
    n_bb = sum(
        p.numel() for g in groups if g["name"] != "head" for p in g["params"] if "lora" not in str(g["name"])
    )
    return sum(p.numel() for g in groups for p in g["params"]), n_bb / n_backbone


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
        cfg = R.resolve(overrides=[*VARIANTS[method], *args.overrides])
        t0 = time.perf_counter()
        run = create_run(out / method, cfg)
        run_all(run)
        seconds = time.perf_counter() - t0
        rep = report(run)
        trainable, share = trainable_parameters(cfg)
        if share != share:  # MIST: measured share of backbone entries whose gradient passes per step
            shares = [
                run.marker("train", t)["summary"].get("updated_share_per_step")
                for t in range(run.info.n_tasks)
            ]
            share = sum(v for v in shares if v is not None) / max(1, sum(v is not None for v in shares))
        rows.append(
            {
                "method": method,
                "last_acc": rep["last_acc"],
                "inc_acc": rep["inc_acc"],
                "forgetting": rep["forgetting"],
                "trainable_params": trainable,
                "backbone_share_per_step": share,
                "seconds": seconds,
            }
        )
        print(f"[bench] {method}: Last-Acc {100 * rep['last_acc']:.2f} in {seconds:.0f} s", file=sys.stderr)

    base = next((r for r in rows if r["method"] == "seqft"), None)
    print(f"built-in benchmark, seed {cfg.seed}, {torch.get_num_threads()} threads, runs in {out}")
    head = f"{'method':<14} {'Last-Acc':>9} {'Inc-Acc':>8} {'Forget':>7} {'trainable':>10} {'bb/step':>8} {'wall s':>7}"
    if base:
        head += f" {'Last-Acc - SeqFT':>17}"
    print(head)
    for r in rows:
        line = (
            f"{r['method']:<14} {100 * r['last_acc']:>9.2f} {100 * r['inc_acc']:>8.2f} "
            f"{100 * r['forgetting']:>7.2f} {r['trainable_params']:>10,} "
            f"{100 * r['backbone_share_per_step']:>7.2f}% {r['seconds']:>7.1f}"
        )
        if base:
            line += f" {100 * (r['last_acc'] - base['last_acc']):>+17.2f}"
        print(line)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
