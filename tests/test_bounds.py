"""Bounded steps: compressed moments never move a weight further than the dense parent could.

Three gradient patterns that real training produces, small enough for CI: embedding-like rows that
get a gradient only now and then (sparse), a quadratic with noise (structure that rank r cannot
hold), and a few steps followed by exactly-zero gradients. bench/bounds.py runs the same patterns at
the sizes of the benchmark report.

Two requirements. (1) Adam-type rules (AdamW, Prodigy): no one-step change of any entry exceeds the
dense parent's bound at that step, B_t lr (C_t d lr for Prodigy, whose direction is not bias-
corrected), at any rank, up to fp32 rounding: w_t is stored in fp32, so the measured change is off
by up to an ulp of each of w_(t-1) and w_t (2 eps |w|, checked with 4 eps |w|), and the bound itself
is rounded to fp32 inside the step (1e-5 relative is ample). (2) Every variant,
on the sparse and zero-gradient patterns: the largest one-step change is at most 2x that of the same
variant with dense moments (rank=None) fed the same gradients.
"""
import contextlib

import pytest
import torch

import mlorc
from variants import extension_mode, make_opt

PATTERNS = {           # shape, lr, steps
    "sparse": ((400, 32), 1e-3, 60),
    "quadratic": ((64, 48), 1e-3, 60),
    "zeros": ((3, 16), 1e-2, 40),
}
KWARGS = {"AdamW": dict(weight_decay=0.0), "Prodigy": dict(lr=1.0), "DAdapt_Lion": dict(lr=1.0)}


def gradient(pattern, w, step, gen):
    g = 0.5 * w.detach() + 0.1 * torch.randn(w.shape, generator=gen)
    if pattern == "sparse":               # 16 random rows of the first 100 get a gradient
        mask = torch.zeros(w.shape[0], 1)
        mask[torch.randperm(100, generator=gen)[:16]] = 1
        return g * mask
    if pattern == "zeros" and step >= 5:
        return torch.zeros_like(g)
    return g


def steps(name, pattern, rank, seed=0):
    """Each step's largest change of an entry, the lr it used (d lr for the adaptive variants), its
    number t and the largest |w| (for the fp32 rounding of the change)."""
    shape, lr, count = PATTERNS[pattern]
    w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    opt = make_opt(name, [w], **{"lr": lr, **KWARGS.get(name, {})}, rank=rank, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    for t in range(1, count + 1):
        w.grad = gradient(pattern, w, t - 1, gen)
        before, group = w.detach().clone(), opt.param_groups[0]
        lr_t = group["lr"] * group.get("d", 1.0)
        opt.step()
        yield (w.detach() - before).abs().max().item(), lr_t, t, before.abs().max().item()


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("rank", [1, 4, 16, 32])
@pytest.mark.parametrize("name", ["AdamW", "Prodigy"])
@pytest.mark.parametrize("pure_path", [False, True])
def test_adam_type_steps_stay_within_the_dense_parents_bound(name, rank, pattern, pure_path):
    b1, b2 = make_opt(name, [torch.zeros(1, requires_grad=True)]).defaults["betas"]
    with extension_mode("0") if pure_path else contextlib.nullcontext():
        for change, lr_t, t, size in steps(name, pattern, rank):
            bound = mlorc.adam_ratio_bound(t, b1, b2, bias_correction=name == "AdamW")
            rounding = 4 * torch.finfo(torch.float32).eps * size
            assert change <= bound * lr_t * (1 + 1e-5) + rounding, \
                f"step {t}: an entry moved {change / lr_t:.3g} lr, the dense parent at most {bound:.3g} lr"


@pytest.mark.parametrize("pattern", ["sparse", "zeros"])
@pytest.mark.parametrize("rank", [1, 4, 16, 32])
@pytest.mark.parametrize("name", ["AdamW", "Prodigy", "Adopt", "CAME", "Lion", "DAdapt_Lion"])
def test_sparse_and_zero_gradients_move_at_most_twice_as_far_as_dense_moments(name, rank, pattern):
    worst = lambda rank: max(change / lr_t for change, lr_t, *_ in steps(name, pattern, rank))  # noqa: E731
    compressed, dense = worst(rank), worst(None)
    assert compressed <= 2 * dense, f"{compressed:.3g} lr against {dense:.3g} lr with dense moments"


@pytest.mark.parametrize("b1, b2", [(0.9, 0.999), (0.9, 0.99), (0.0, 0.999), (0.5, 0.1), (0.9, 0.5)])
def test_adam_ratio_bound_is_reached_by_dense_adam_and_never_exceeded(b1, b2):
    """C_t is the Cauchy-Schwarz bound: the gradients g_k proportional to b1^k / b2^k (in the order
    seen, the last one first) reach it, and random gradients stay below it."""
    t = 12
    ratio = b1 / b2 if b2 > 0 else 0.0
    g = torch.tensor([ratio ** (t - 1 - k) for k in range(t)], dtype=torch.float64)
    m = v = torch.zeros((), dtype=torch.float64)
    for g_k in g:
        m, v = b1 * m + (1 - b1) * g_k, b2 * v + (1 - b2) * g_k * g_k
    assert (m / v.sqrt()).item() == pytest.approx(mlorc.adam_ratio_bound(t, b1, b2), rel=1e-9)
    gen = torch.Generator().manual_seed(0)
    m = v = torch.zeros(1000, dtype=torch.float64)
    for k in range(1, t + 1):
        g_k = torch.randn(1000, generator=gen, dtype=torch.float64) * torch.rand(1000, generator=gen,
                                                                                   dtype=torch.float64)
        m, v = b1 * m + (1 - b1) * g_k, b2 * v + (1 - b2) * g_k * g_k
        assert (m.abs() / v.sqrt()).max() <= mlorc.adam_ratio_bound(k, b1, b2) * (1 + 1e-12)
