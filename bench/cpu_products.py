"""The CPU extension's two ways through [M4], side by side at each rank: the choice behind
mlorc.CPU_PRODUCTS_MAX_WIDTH.

    python bench/cpu_products.py                          # MLorc_AdamW, ranks 4 to 32
    python bench/cpu_products.py --optimizer MLorc_Lion --ranks 12,16,20

"products": the update pass writes no moment and [M4] reaches the new moments through
moment_matmul, which rebuilds them from their factors in every product (no dense moment held).
"dense": the update pass writes the new moments once and [M4] multiplies them with BLAS (a batch's
dense moments held, as in the pure path). Two optimizers over the same parameters and gradients take
turns step by step in one process, every sketch of one going through products
(mlorc.CPU_PRODUCTS_MAX_WIDTH set past all widths), the other writing its moments (its
through_products answering no); printed: the median step of each, their ratio, and the way mlorc
takes at that rank.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mlorc  # noqa: E402
from step import PRESETS, alternating_medians, llama_shapes  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", default="MLorc_AdamW", choices=["MLorc_AdamW", "MLorc_Lion"])
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--ranks", default="4,8,12,16,20,32", help="comma-separated ranks")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per way")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--oversampling", type=int, default=0, help="the sketch (default: mlorc's)")
    parser.add_argument("--power-iters", type=int, default=0)
    args = parser.parse_args()
    over, iters = args.oversampling, args.power_iters

    os.environ["MLORC_EXTENSION"] = "1"
    cls = getattr(mlorc, args.optimizer)
    print(f"{args.optimizer}, preset {args.preset}, oversampling {over}, power_iters {iters}, {args.steps} "
          f"alternating steps, torch {torch.__version__}, threads {torch.get_num_threads()}")
    default, through_products = mlorc.CPU_PRODUCTS_MAX_WIDTH, mlorc.through_products
    try:
        for rank in (int(r) for r in args.ranks.split(",")):
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)
                      for s in llama_shapes(**PRESETS[args.preset])]
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            optimizers = {way: cls(params, lr=1e-5, rank=rank, oversampling=over, power_iters=iters)
                          for way in ("products", "dense")}
            mlorc.through_products = lambda opt, p, group: (opt is not optimizers["dense"]
                                                            and through_products(opt, p, group))
            mlorc.CPU_PRODUCTS_MAX_WIDTH = sys.maxsize
            median = alternating_medians(optimizers, args.warmup, args.steps)
            products, dense = median["products"], median["dense"]
            taken = "products" if rank + over <= default or not cls.second_moments else "dense"
            print(f"rank {rank:3d} (sketch {rank + over:2d} wide): products {products:7.1f} ms, "
                  f"dense {dense:7.1f} ms, products / dense {products / dense:.2f}  (mlorc takes {taken})")
    finally:
        mlorc.CPU_PRODUCTS_MAX_WIDTH, mlorc.through_products = default, through_products


if __name__ == "__main__":
    main()
