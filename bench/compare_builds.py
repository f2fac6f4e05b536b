"""This checkout's C++ extension against another checkout's, in one process, step for step.

    python bench/compare_builds.py /path/to/other/checkout          # MLorc_AdamW r=4, CPU preset
    python bench/compare_builds.py /path/to/other/checkout --optimizer MLorc_Lion

Timings of one build in one process and of the other in another are lost in the noise of a shared
machine (its speed drifts by a third within an hour). Here both run in one process: the other
checkout's csrc/ is compiled a second time with its operators registered as torch.ops.mlorc_other,
and the steps alternate between two optimizers over the same parameters, each step with
torch.ops.mlorc pointing at its own build. Both use this checkout's mlorc.py, so the other build's
operators must take the same arguments as this one's. Printed: the median step, the time per step
spent in [M4]'s products through FusedMoments @ X (the first ones and the power iterations'; since
6cd3452 the last ones, A^T Q, come from each FusedStep's finish, for MLorc_AdamW from its update
pass, and are not counted there), and the ratios.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mlorc  # noqa: E402
from step import PRESETS, llama_shapes  # noqa: E402


def load_other_build(checkout):
    """The other checkout's csrc/ (CPU sources), built with its operators under torch.ops.mlorc_other."""
    from torch.utils import cpp_extension
    work = tempfile.mkdtemp(prefix="mlorc_other_")
    shutil.copytree(os.path.join(checkout, "csrc"), os.path.join(work, "csrc"))
    source = os.path.join(work, "csrc", "mlorc_ops.cpp")
    with open(source) as f:
        text = f.read()
    with open(source, "w") as f:
        f.write(text.replace("TORCH_LIBRARY(mlorc,", "TORCH_LIBRARY(mlorc_other,")
                    .replace("TORCH_LIBRARY_IMPL(mlorc,", "TORCH_LIBRARY_IMPL(mlorc_other,"))
    cpp_extension.load(name="mlorc_other", sources=[source], build_directory=work,
                       extra_cflags=mlorc.CXX_FLAGS + mlorc.OPENMP_FLAGS, extra_ldflags=mlorc.OPENMP_FLAGS,
                       is_python_module=False)
    return torch.ops.mlorc_other


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", help="path of the other checkout (its csrc/ is built)")
    parser.add_argument("--optimizer", default="MLorc_AdamW", choices=["MLorc_AdamW", "MLorc_Lion"])
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per build")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    os.environ["MLORC_EXTENSION"] = "1"
    mlorc.load_extension()
    builds = {"this": torch.ops.mlorc, "other": load_other_build(args.other)}

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)
              for s in llama_shapes(**PRESETS[args.preset])]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    cls = getattr(mlorc, args.optimizer)
    optimizers = {name: cls(params, lr=1e-5, rank=args.rank) for name in builds}

    step_times = {name: [] for name in builds}
    product_times = {name: 0.0 for name in builds}
    products = mlorc.FusedMoments.__matmul__
    current = []

    def timed_products(self, X):
        start = time.perf_counter()
        result = products(self, X)
        product_times[current[0]] += time.perf_counter() - start
        return result

    mlorc.FusedMoments.__matmul__ = timed_products
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                product_times = dict.fromkeys(builds, 0.0)
            for name, optimizer in optimizers.items():
                torch.ops.mlorc, current[:] = builds[name], [name]
                start = time.perf_counter()
                optimizer.step()
                if i >= args.warmup:
                    step_times[name].append(time.perf_counter() - start)
    finally:
        mlorc.FusedMoments.__matmul__ = products
        torch.ops.mlorc = builds["this"]

    print(f"{args.optimizer} r={args.rank}, preset {args.preset}, {args.steps} alternating steps, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in builds:
        print(f"{name:>6} build: step {statistics.median(step_times[name]) * 1e3:7.1f} ms, "
              f"products {product_times[name] / args.steps * 1e3:6.1f} ms a step")
    ratio = statistics.median(step_times["other"]) / statistics.median(step_times["this"])
    products = (f"products {product_times['other'] / product_times['this']:.3f}" if product_times["this"]
                else "no products (the moments are written out: a sketch wider than CPU_PRODUCTS_MAX_WIDTH)")
    print(f"other / this: step {ratio:.3f}, {products}")


if __name__ == "__main__":
    main()
