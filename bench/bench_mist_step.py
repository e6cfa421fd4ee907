"""MIST's training step against the Slow Learner's, on the same model and batch, in one run.

    python bench/bench_mist_step.py                                   # CPU: the built-in micro ViT
    python bench/bench_mist_step.py --model vit_base_patch16_224 --size 224 --batch 56   # GPU: ViT-B/16

MIST differentiates both views of each image (2B images per step). Rows, as
milliseconds per step (median of --steps after warm-up):
- SL(B):        Slow Learner step on the B images (CE on a task head);
- SL(2B):       the same on 2B images: the backbone work MIST's step also does;
- MIST-nomask:  MIST's step without the gradient masking (second view, NT-Xent, SGD);
- MIST:         the full step (masks, Bernoulli keep, decay ** overlap, frozen entries).
Ratios: MIST / SL(2B) (the target is <= 1.15: its cost over plain SL comes from the
masking alone) and MIST / MIST-nomask (the masking's own cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

import clpt.vit_micro  # noqa: F401  (registers clpt_vit_micro)
from clpt import mist as M


def timed(fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="clpt_vit_micro")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=56)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    bb = timm.create_model(
        args.model, pretrained=False, num_classes=0, global_pool="token", img_size=args.size
    ).to(dev)
    d = bb.embed_dim
    head = torch.nn.Linear(d, 20).to(dev)
    proj = M.make_projection(d).to(dev)
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 20, (args.batch,), device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    sl_opt = torch.optim.SGD([*bb.parameters(), *head.parameters()], lr=1e-4, momentum=0.9, weight_decay=5e-4)

    def sl(xb, yb):
        loss = F.cross_entropy(head(bb(xb)), yb)
        sl_opt.zero_grad(set_to_none=True)
        loss.backward()
        sl_opt.step()

    net = M.MistModel(bb, proj).train()
    state = M.MistState(bb).to(dev)
    named = dict(bb.named_parameters())
    scores = {n: torch.rand(named[n].shape, device=dev, generator=gen) for n in state.names}
    masks = M.build_masks(scores, 0.10)
    frozen = {n: scores[n] >= M.quantile(scores[n], 0.9995) for n in state.names}
    overlap = {n: masks[n].to(torch.int32) for n in state.names}
    params = {**named, **{f"proj.{k}": v for k, v in proj.named_parameters()}}
    masker = M.GradientMasker(masks, frozen, overlap, 0.1, 0.9)  # once per task, as the learner does
    opt = torch.optim.SGD(
        [{"params": list(bb.parameters()), "lr": 1e-4}, {"params": list(proj.parameters()), "lr": 0.01}],
        momentum=0.9, weight_decay=5e-4,
    )  # fmt: skip

    def mist(mask: bool):
        x2 = torch.cat([x, M.second_view(x, gen)])
        loss = M.mi_loss(net(x2), y, 0.07)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if mask:
            masker(params, gen, movable=False)  # as the learner's steps (one per epoch builds it)
        opt.step()

    x2b, y2b = torch.cat([x, x]), torch.cat([y, y])
    rows = {
        "SL(B)": timed(lambda: sl(x, y), args.steps, args.warmup, dev),
        "SL(2B)": timed(lambda: sl(x2b, y2b), args.steps, args.warmup, dev),
        "MIST-nomask": timed(lambda: mist(False), args.steps, args.warmup, dev),
        "MIST": timed(lambda: mist(True), args.steps, args.warmup, dev),
    }
    out = {
        "model": args.model, "size": args.size, "batch": args.batch, "device": str(dev), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "ms_per_step": rows,
        "MIST / SL(2B)": rows["MIST"] / rows["SL(2B)"], "MIST / SL(B)": rows["MIST"] / rows["SL(B)"],
        "MIST / MIST-nomask": rows["MIST"] / rows["MIST-nomask"],
    }  # fmt: skip
    print(
        f"{args.model} at {args.size}, batch {args.batch}, {dev} ({torch.get_num_threads()} threads):",
        file=sys.stderr,
    )
    for k, v in rows.items():
        print(f"  {k:<12} {v:8.2f} ms/step", file=sys.stderr)
    for k in ("MIST / SL(2B)", "MIST / SL(B)", "MIST / MIST-nomask"):
        print(f"  {k:<20} {out[k]:.3f}", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
