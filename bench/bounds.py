"""The largest one-step change of any weight entry, compressed moments against dense ones.

Three gradient patterns that real training produces (none needs a model):
  sparse     a 4000 x 128 embedding-like matrix; each step 256 random rows of the first 1000 get a
             gradient (0.5 w + 0.1 noise on those rows), the others none; lr 1e-3, 200 steps
  quadratic  a 64 x 48 matrix, gradient 0.5 w + 0.1 noise everywhere; lr 1e-3, 200 steps
  zeros      a 3 x 16 matrix, 5 steps of 0.5 w + 0.1 noise, then 55 steps of exactly-zero gradients;
             lr 1e-2
For each optimizer and rank it prints max_t max_ij |w_t - w_(t-1)| / lr_t (lr_t: the step's lr, d lr
for the adaptive variants) beside the same optimizer with dense moments (rank=None) fed the same
gradients, the ratio of the two, and for Adam-type rules the dense parent's bound max_t B_t
(mlorc.adam_ratio_bound with bias correction). Weight decay 0, three seeds, the worst seed shown.

    python bench/bounds.py --ranks 1,4,16,32
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mlorc                                                     # noqa: E402

OPTIMIZERS = {
    "AdamW": (mlorc.MLorc_AdamW, dict(weight_decay=0.0)),
    "Prodigy": (mlorc.MLorc_Prodigy, dict(lr=1.0)),
    "Adopt": (mlorc.MLorc_Adopt, dict()),
    "CAME": (mlorc.MLorc_CAME, dict()),
    "Lion": (mlorc.MLorc_Lion, dict()),
    "DAdapt_Lion": (mlorc.MLorc_DAdapt_Lion, dict(lr=1.0)),
}
PATTERNS = {           # shape, lr, steps
    "sparse": ((4000, 128), 1e-3, 200),
    "quadratic": ((64, 48), 1e-3, 200),
    "zeros": ((3, 16), 1e-2, 60),
}


def gradient(pattern, w, step, gen):
    noise = torch.randn(w.shape, generator=gen)
    g = 0.5 * w.detach() + 0.1 * noise
    if pattern == "sparse":
        rows = torch.randperm(1000, generator=gen)[:256]
        mask = torch.zeros(w.shape[0], 1)
        mask[rows] = 1
        return g * mask
    if pattern == "zeros" and step >= 5:
        return torch.zeros_like(g)
    return g


def step_lr(opt):
    """The lr the step just taken used: d lr for Prodigy and D-Adapt Lion (d of the step's start)."""
    group = opt.param_groups[0]
    return group["lr"] * group.get("d", 1.0)


def largest_step(name, pattern, rank, seed):
    """max_t max_ij |w_t - w_(t-1)| / lr_t along one run."""
    cls, kwargs = OPTIMIZERS[name]
    shape, lr, steps = PATTERNS[pattern]
    w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    opt = cls([w], **{"lr": lr, **kwargs}, rank=rank, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    worst = 0.0
    for step in range(steps):
        w.grad = gradient(pattern, w, step, gen)
        before, lr_t = w.detach().clone(), step_lr(opt)
        opt.step()
        worst = max(worst, ((w.detach() - before).abs().max() / lr_t).item())
    return worst


def parent_bound(name, pattern):
    """max_t B_t of the dense parent (Adam-type rules only), or None."""
    cls, kwargs = OPTIMIZERS[name]
    if name not in ("AdamW", "Prodigy"):
        return None
    b1, b2 = cls([torch.zeros(1, requires_grad=True)]).defaults["betas"]
    steps = PATTERNS[pattern][2]
    correct = name == "AdamW"                       # Prodigy's direction has no bias correction
    return max(mlorc.adam_ratio_bound(t, b1, b2, correct) for t in range(1, steps + 1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ranks", default="1,4,16,32")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ranks = [int(r) for r in args.ranks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| optimizer | pattern | dense | " + " | ".join(f"rank {r}" for r in ranks)
          + " | parent bound |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in ranks) + " | ---: |")
    for name in args.optimizers.split(","):
        for pattern in args.patterns.split(","):
            dense = max(largest_step(name, pattern, None, s) for s in seeds)
            cells = []
            for rank in ranks:
                worst = max(largest_step(name, pattern, rank, s) for s in seeds)
                cells.append(f"{worst:.3g} ({worst / dense:.1f}x)")
            bound = parent_bound(name, pattern)
            print(f"| {name} | {pattern} | {dense:.3g} | " + " | ".join(cells)
                  + f" | {'-' if bound is None else f'{bound:.3g}'} |", flush=True)
