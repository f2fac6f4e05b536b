"""Optimizer step time and memory on LLaMA-shaped parameter sets, side by side in one run.

    python bench/step.py                          # CPU-sized LLaMA shapes on the CPU
    python bench/step.py --preset tinyllama --device cuda
    python bench/step.py --only "torch,r=4 ext" --profile "MLorc_AdamW r=4 ext"   # where its time goes
    python bench/step.py --preset tinyllama --layers 8 --only "torch,ext" --by-shape   # CPU, 483M

Each optimizer gets the same parameters and the same fixed random gradients, and keeps its state
for the whole run. The first steps (lazy state init, warm-up) are not timed; the timed steps take
turns (one step of each optimizer, then the next round), so noise on a shared machine falls on all
of them alike. Printed per optimizer: median step time, its ratio to the first optimizer in the list
(torch AdamW), with MLorc in pure PyTorch ("pure") and with the C++/CUDA extension ("ext"),
optimizer-state bytes per parameter, and the peak memory the step allocates beyond parameters,
gradients and state, over one extra, untimed step (CUDA: the allocator's statistics; CPU: the
profiler's allocation events).

On Linux the C library is told to keep the memory freed in the process (keep_freed_memory), so
that no optimizer's temporaries are fresh pages at each step: by default glibc hands large blocks
back when they are freed, and torch AdamW foreach's step then took 50-60 ms instead of 24-35,
depending on what ran before it in the process. `--malloc default` leaves the allocator as it is.
"""
import argparse
import ctypes
import os
import statistics
import sys
import time

import torch

try:
    import resource
except ImportError:                                  # not a Unix: no page-fault counts
    resource = None

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mlorc  # noqa: E402

PRESETS = {
    # TinyLlama-1.1B: hidden 2048, intermediate 5632, 22 layers, 4 KV heads of 64, vocab 32000
    "tinyllama": dict(hidden=2048, intermediate=5632, layers=22, kv=256, vocab=32000),
    # the same architecture scaled to a CPU: about 29M parameters
    "cpu": dict(hidden=512, intermediate=1408, layers=4, kv=128, vocab=8000),
}


def llama_shapes(hidden, intermediate, layers, kv, vocab):
    """Parameter shapes of a LLaMA decoder: embeddings, per-layer attention, MLP and norms, head."""
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
             (intermediate, hidden), (intermediate, hidden), (hidden, intermediate), (hidden,), (hidden,)]
    return [(vocab, hidden)] + layer * layers + [(hidden,), (vocab, hidden)]


def keep_freed_memory():
    """Have glibc keep freed memory for the process's later allocations: no trimming of the heap's
    free top (M_TRIM_THRESHOLD -1, which mallopt(3) documents as "disables trimming completely"; its
    largest int, 2**31 - 1, still let glibc hand back a free top over 2 GiB: TinyLlama's shapes with
    16 layers, where AdamW's temporaries are 3.3 GB, took 525,794 page faults a step and 2.1-2.7 s
    instead of 1.4) and no large block served by a mapping of its own (M_MMAP_MAX 0), which is
    unmapped when freed. Otherwise an optimizer whose step allocates large temporaries (torch AdamW
    foreach: sqrt(v) and the quotient, 4.75 x the largest matrix) pays page faults for all of them at
    every step, or not, depending on what the process ran before: the same step took 24-35 ms or
    50-60 ms. The table's last lines give the faults of a timed step. Returns how the allocator was
    left, for the header line."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                                  # not Linux with glibc: nothing to tell
        return "allocator as is"
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4            # glibc's malloc.h
    if libc.mallopt(M_TRIM_THRESHOLD, -1) == 1 and libc.mallopt(M_MMAP_MAX, 0) == 1:
        return "glibc keeps freed memory"
    return "allocator as is (mallopt refused)"


def alternating_rounds(optimizers, warmup, steps, cuda=False, before=None):
    """{name: (times, faults)} of optimizers that take turns, one step each per round, so the noise
    of a shared machine falls on all of them alike: the seconds of each timed step (the first
    `warmup` rounds are not timed) and its minor page faults. before(name), if given, runs untimed
    before each step."""
    record = {name: ([], []) for name in optimizers}
    for i in range(warmup + steps):
        for name, optimizer in optimizers.items():
            if before is not None:
                before(name)
            if cuda:
                torch.cuda.synchronize()
            faults, start = page_faults(), time.perf_counter()
            optimizer.step()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                record[name][0].append(time.perf_counter() - start)
                record[name][1].append(page_faults() - faults)
    return record


def alternating_medians(optimizers, warmup, steps):
    """{name: median step in ms} of optimizers that take turns (alternating_rounds)."""
    return {name: statistics.median(times) * 1e3
            for name, (times, _) in alternating_rounds(optimizers, warmup, steps).items()}


def page_faults():
    """The process's minor page faults so far (0 where the platform does not count them): a timed
    step that faults in fresh pages for its temporaries pays for that, which keep_freed_memory is
    there to avoid."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def step_peak(opt, cuda):
    """Peak bytes allocated during one untimed opt.step() and alive at the same time, beyond what
    was allocated before it. CUDA: the allocator's statistics. CPU tensors have no such statistics:
    the profiler records every allocation and free, and the peak is the maximum of their running sum."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    alive = peak = 0
    for _, nbytes in events:
        alive += nbytes
        peak = max(peak, alive)
    return peak


def make_optimizers(device, rank, sketches):
    """name -> (constructor, MLORC_EXTENSION value while it steps). MLorc_AdamW runs with its default
    sketch and with each of `sketches` ("p{oversampling}q{power_iters}", e.g. "p4q1"; a suffix "+ema"
    turns full_weight_outside off, e.g. "p0q0+ema")."""
    fused_ok = device.startswith("cuda")
    rows = {"torch AdamW fused" if fused_ok else "torch AdamW foreach":
            (lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True) if fused_ok
             else torch.optim.AdamW(ps, lr=1e-4, foreach=True), "0")}
    for ext, label in (("0", "pure"), ("1", "ext")):
        rows[f"MLorc_AdamW r={rank} {label}"] = (lambda ps: mlorc.MLorc_AdamW(ps, lr=1e-4, rank=rank), ext)
        for sketch in filter(None, sketches.split(",")):
            shape, _, suffix = sketch.partition("+")
            over, iters = (int(x) for x in shape[1:].split("q"))
            make = (lambda ps, over=over, iters=iters, outside=suffix != "ema":
                    mlorc.MLorc_AdamW(ps, lr=1e-4, rank=rank, oversampling=over, power_iters=iters,
                                      full_weight_outside=outside))
            rows[f"MLorc_AdamW r={rank} {sketch} {label}"] = (make, ext)
        rows[f"MLorc_Lion r={rank} {label}"] = (lambda ps: mlorc.MLorc_Lion(ps, lr=1e-5, rank=rank), ext)
        rows[f"MLorc_Lion r={rank} +ema {label}"] = (
            lambda ps: mlorc.MLorc_Lion(ps, lr=1e-5, rank=rank, full_weight_outside=False), ext)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sketches", default="p0q0+ema,p4q1", help="MLorc_AdamW also with these "
                        "sketches, comma-separated p{oversampling}q{power_iters}, +ema: without "
                        "full_weight_outside")
    parser.add_argument("--only", default="", help="comma-separated substrings of optimizer names")
    parser.add_argument("--profile", default="", help="an optimizer's name: also print where its step's "
                        "time goes (torch.profiler, 3 steps)")
    parser.add_argument("--by-shape", action="store_true", help="also time each matrix shape alone "
                        "(by_shape): where the ratio to AdamW comes from")
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: the C library keeps freed memory (keep_freed_memory); default: as it is")
    args = parser.parse_args()
    allocator = keep_freed_memory() if args.malloc == "keep" else "allocator as is"

    dtype = getattr(torch, args.dtype)
    preset = dict(PRESETS[args.preset])
    if args.layers is not None:
        preset["layers"] = args.layers
    shapes = llama_shapes(**preset)
    gen = torch.Generator(device=args.device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=args.device, dtype=dtype) * 0.02)
              for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=args.device, dtype=dtype) * 1e-3
    n_params = sum(p.numel() for p in params)
    cuda = args.device.startswith("cuda")
    layers = f", layers={preset['layers']}" if args.layers is not None else ""
    print(f"preset {args.preset}{layers}: {len(shapes)} tensors, {n_params / 1e6:.1f}M parameters, {args.dtype}, "
          f"device {torch.cuda.get_device_name() if cuda else args.device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {allocator}")

    # Every optimizer keeps its state for the whole run, and the timed steps go round-robin: one
    # step of each in turn, so a slow patch of a shared machine slows all of them alike.
    chosen = {name: row for name, row in make_optimizers(args.device, args.rank, args.sketches).items()
              if not args.only or any(s in name for s in args.only.split(","))}
    runs = timed_rounds(chosen, params, args.warmup, args.steps, cuda)
    rows = []
    for run in runs:
        os.environ["MLORC_EXTENSION"] = run["extension"]
        rows.append((run["name"], statistics.median(run["times"]), mlorc.state_bytes(run["opt"]) / n_params,
                     step_peak(run["opt"], cuda)))

    largest = max(p.numel() for p in params) * 4
    print(f"\n{'optimizer':<32} {'step ms':>9} {'ratio':>7} {'state B/param':>14} {'step peak extra':>16}")
    for name, seconds, per_param, peak in rows:
        peak_text = f"{peak / largest:.2f} x largest"
        print(f"{name:<32} {seconds * 1e3:>9.1f} {seconds / rows[0][1]:>6.1f}x {per_param:>14.4f} "
              f"{peak_text:>16}")
    print(f"(step peak extra: bytes the step allocates and holds at once, beyond parameters, gradients "
          f"and state, in units of the largest matrix in fp32, {largest / 2**20:.0f} MiB)")
    print("(minor page faults a timed step, median: " + ", ".join(
        f"{run['name']} {statistics.median(run['faults']):.0f}" for run in runs) + ")")
    print(thin_product_rate(params, args.rank + 4, cuda))
    if args.by_shape:
        print(by_shape(chosen, params, args.warmup, args.steps, cuda))
    for run in runs:
        if run["name"] == args.profile:
            os.environ["MLORC_EXTENSION"] = run["extension"]
            print(f"\n{run['name']}: 3 steps under torch.profiler\n" + step_profile(run["opt"], cuda))


def timed_rounds(chosen, params, warmup, steps, cuda):
    """[{name, extension, opt, times, faults}] for each optimizer of `chosen` (name -> (constructor,
    MLORC_EXTENSION value)) over params, after alternating_rounds with each optimizer's
    MLORC_EXTENSION set before its steps."""
    optimizers = {}
    for name, (make, extension) in chosen.items():
        os.environ["MLORC_EXTENSION"] = extension
        if extension == "1":
            mlorc.load_extension()                     # build (or load the cached build) untimed
        optimizers[name] = make(params)

    def set_extension(name):
        os.environ["MLORC_EXTENSION"] = chosen[name][1]

    record = alternating_rounds(optimizers, warmup, steps, cuda, before=set_extension)
    return [dict(name=name, extension=chosen[name][1], opt=optimizers[name], times=times, faults=faults)
            for name, (times, faults) in record.items()]


def by_shape(chosen, params, warmup, steps, cuda):
    """The step of each optimizer over the matrices of one shape at a time (new optimizers, the
    same rounds), in ns per entry: a step has costs per matrix (its Python, its operators' calls,
    a small matrix's passes on one thread) as well as per entry, and the ratio to AdamW follows
    the size of the matrices."""
    shapes = {}
    for p in params:
        if p.ndim == 2:
            shapes.setdefault(tuple(p.shape), []).append(p)
    names = list(chosen)
    lines = [f"\nby shape: median step in ms (ns per entry), ratio to {names[0]}",
             f"{'shape':<14} {'count':>5} " + " ".join(f"{name:>30}" for name in names)]
    for shape, group in shapes.items():
        entries = sum(p.numel() for p in group)
        medians = [statistics.median(run["times"]) for run in timed_rounds(chosen, group, warmup, steps, cuda)]
        cells = [f"{t * 1e3:.2f} ({t * 1e9 / entries:.2f}) {t / medians[0]:.2f}x" for t in medians]
        lines.append(f"{'x'.join(map(str, shape)):<14} {len(group):>5} " + " ".join(f"{c:>30}" for c in cells))
    return "\n".join(lines)


def step_profile(opt, cuda, steps=3):
    """The operators that take an optimizer's step time, by self time, from torch.profiler (which
    slows the step a little: read the shares, not the times)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            opt.step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=12)


def thin_product_rate(params, width, cuda):
    """What one of [M4]'s products runs at here: the largest matrix times a width-wide matrix, the
    kind of product that sets the floor of an MLorc step (see BENCHMARKS.md), through BLAS and, when
    the extension is loaded, through moment_matmul (a second moment rebuilt from rank-4 factors:
    its rate counts the rebuild's 4 multiply-adds an entry too); beside them, a large square matmul:
    the rate this machine's BLAS attains at all."""
    G = max(params, key=lambda p: p.numel()).grad.float()
    m, n = G.shape
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, width, generator=gen).to(G.device)
    S = torch.randn(2048, 2048, generator=gen).to(G.device)
    products = {"BLAS, g @ X": (lambda: G @ X, 2 * G.numel() * width)}
    if mlorc.extension_loaded():
        rank = 4
        U, s, Vh = (t.to(G.device) for t in (torch.randn(m, rank, generator=gen), torch.rand(rank, generator=gen),
                                             torch.randn(rank, n, generator=gen)))
        shift = torch.ops.mlorc.negative_mean(U, s, Vh)
        products["moment_matmul, A @ X"] = (lambda: torch.ops.mlorc.moment_matmul(
            U, s, Vh, G, 0.999, True, shift, X, False), 2 * G.numel() * (width + rank))
    products["BLAS, square 2048 matmul"] = (lambda: S @ S, 2 * 2048 ** 3)
    rates = []
    for name, (product, flops) in products.items():
        for _ in range(2):
            product()
        if cuda:
            torch.cuda.synchronize()
        start, runs = time.perf_counter(), 10
        for _ in range(runs):
            product()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / runs
        rates.append(f"{name} {seconds * 1e3:.2f} ms, {flops / seconds / 1e9:.0f} GFLOP/s")
    return f"(one thin product, {tuple(G.shape)} @ ({n}, {width}) in fp32: " + "; ".join(rates) + ")"


if __name__ == "__main__":
    main()
