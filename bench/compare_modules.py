"""This checkout's mlorc.py against another checkout's, pure PyTorch, in one process, step for step.

    python bench/compare_modules.py /path/to/other/checkout                    # MLorc_AdamW r=4
    python bench/compare_modules.py /path/to/other/checkout --optimizer MLorc_Lion

The Python twin of compare_builds.py, for changes to mlorc.py itself: both modules are imported
under their own names, with the extension off (MLORC_EXTENSION=0), and the steps alternate between
three optimizers over the same LLaMA-shaped parameters and fixed gradients (this checkout's, the
other's, torch AdamW foreach). Printed: the median step of each and the ratios.
"""
import argparse
import importlib.util
import os
import sys

import torch

os.environ["MLORC_EXTENSION"] = "0"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from step import PRESETS, alternating_medians, keep_freed_memory, llama_shapes  # noqa: E402


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", help="the other checkout (a directory holding mlorc.py)")
    parser.add_argument("--optimizer", default="MLorc_AdamW")
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    allocator = keep_freed_memory()            # torch AdamW's time, otherwise set by the allocator
    this = load("mlorc_this", os.path.join(HERE, "..", "mlorc.py"))
    other = load("mlorc_other", os.path.join(args.other, "mlorc.py"))
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)
              for s in llama_shapes(**PRESETS[args.preset])]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    optimizers = {"this": getattr(this, args.optimizer)(params, lr=1e-9, rank=args.rank),
                  "other": getattr(other, args.optimizer)(params, lr=1e-9, rank=args.rank),
                  "torch AdamW": torch.optim.AdamW(params, lr=1e-9, foreach=True)}
    median = alternating_medians(optimizers, args.warmup, args.steps)
    print(f"{args.optimizer} r={args.rank}, preset {args.preset}, pure PyTorch, {args.steps} alternating "
          f"steps, torch {torch.__version__}, threads {torch.get_num_threads()}, {allocator}")
    for name, ms in median.items():
        print(f"{name:12s} {ms:7.1f} ms  {ms / median['torch AdamW']:.2f}x AdamW")
    print(f"this / other: {median['this'] / median['other']:.3f}")


if __name__ == "__main__":
    main()
