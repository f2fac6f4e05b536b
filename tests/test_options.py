"""Options of the six MLorc optimizers, their standalone helpers, and argument validation.

Each option gets one step (or two, where it needs a momentum) on a 2x2 matrix, with the expected
value worked out by hand in a comment. Every hand test runs with dense moments (rank=None) and with
full-rank factors (rank=2: the exact thin SVD holds the moment to ~1e-16 in float64); gradients keep
their sign-relevant quantities far from zero so that reconstruction roundoff cannot flip a sign.
"""

import copy
import math

import pytest
import torch

import mlorc
from variants import takes

ALL = [mlorc.MLorc_AdamW, mlorc.MLorc_Lion, mlorc.MLorc_Prodigy, mlorc.MLorc_DAdapt_Lion,
       mlorc.MLorc_Adopt, mlorc.MLorc_CAME]
LION = [mlorc.MLorc_Lion, mlorc.MLorc_DAdapt_Lion]
RANKS = pytest.mark.parametrize("rank", [None, 2], ids=["dense", "full_rank"])


def name(cls):
    return cls.__name__


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def run(cls, p0, grads, **kwargs):
    """Step a fresh optimizer over `grads` from `p0`; returns (parameter, optimizer)."""
    p = t(p0).requires_grad_()
    opt = cls([p], **kwargs)
    for g in grads:
        p.grad = t(g)
        opt.step()
    return p.detach(), opt


def moment(opt, key="exp_avg"):
    """The dense moment of the single parameter, reconstructed when it is factored."""
    (p,) = opt.param_groups[0]["params"]
    return mlorc.load_moment(opt.state[p], key, p.shape)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, t(expected), rtol=tol, atol=tol)


# Two gradients shared by the Adam-type hand computations:
#   G1 = [[5, 1], [-5, -1]],  G2 = [[-1, 1], [1, -1]]
# With betas (0.5, 0.5), eps = 0:
#   step 1: m_hat = g, v_hat = g^2, so d1 = sign(G1) = [[1, 1], [-1, -1]]
#   step 2: m = 0.25 G1 + 0.5 G2, v = 0.25 G1^2 + 0.5 G2^2, bias corrections 1 - 0.25 = 0.75:
#           m_hat = (G1 + 2 G2) / 3 = [[1, 1], [-1, -1]],  v_hat = (G1^2 + 2 G2^2) / 3 = [[9, 1], [9, 1]]
#           d2 = m_hat / sqrt(v_hat) = [[1/3, 1], [-1/3, -1]]
#   entry (0, 0) and (1, 0): the momentum's sign disagrees with g2's; that is what Grams and
#   cautious act on.
G1 = [[5.0, 1.0], [-5.0, -1.0]]
G2 = [[-1.0, 1.0], [1.0, -1.0]]
ZERO = [[0.0, 0.0], [0.0, 0.0]]
ADAM_KW = dict(lr=1.0, betas=(0.5, 0.5), eps=0.0, weight_decay=0.0)


# ----------------------------------------------------------------------------------------------------
# One hand-computed step per option

@RANKS
def test_adamw_baseline_two_steps(rank, float64):
    # p2 = 0 - d1 - d2 = [[-1 - 1/3, -2], [1 + 1/3, 2]]
    p, _ = run(mlorc.MLorc_AdamW, ZERO, [G1, G2], rank=rank, **ADAM_KW)
    close(p, [[-4 / 3, -2.0], [4 / 3, 2.0]])


@RANKS
def test_use_grams_adamw(rank, float64):
    # Grams: d2 <- sign(G2) |d2| = [[-1/3, 1], [1/3, -1]]  (d1 = sign(G1) is unchanged)
    # p2 = -d1 - d2 = [[-1 + 1/3, -2], [1 - 1/3, 2]]
    p, _ = run(mlorc.MLorc_AdamW, ZERO, [G1, G2], rank=rank, use_grams=True, **ADAM_KW)
    close(p, [[-2 / 3, -2.0], [2 / 3, 2.0]])


@RANKS
def test_use_atan2_adamw(rank, float64):
    # atan2 form: d = (4/pi) atan2(m_hat, sqrt(v_hat)) = (4/pi) atan(m_hat / sqrt(v_hat)) (v_hat > 0)
    # step 1: (4/pi) atan(+-1) = +-1, so d1 = sign(G1)
    # step 2: (4/pi) atan([[1/3, 1], [-1/3, -1]]) = [[a, 1], [-a, -1]], a = (4/pi) atan(1/3) = 0.4096655...
    # p2 = -d1 - d2 = [[-1 - a, -2], [1 + a, 2]]   (plain Adam would give a -> 1/3)
    a = 4 / math.pi * math.atan(1 / 3)
    p, _ = run(mlorc.MLorc_AdamW, ZERO, [G1, G2], rank=rank, use_atan2=True,
               **{**ADAM_KW, "eps": 1e-8})
    close(p, [[-1 - a, -2.0], [1 + a, 2.0]])


@RANKS
@pytest.mark.parametrize("use_atan2", [False, True])
def test_use_atan2_adopt(rank, use_atan2, float64):
    # ADOPT, betas (0.5, 0.5), lr 1, clip at step 2: (2 - 1)^0.25 = 1.
    # step 1: v1 = g1^2, no update. g1 = [[1, -1], [1, 3]] so sqrt(v1) = [[1, 1], [1, 3]].
    # step 2: g2 = [[1, -1], [sqrt3, sqrt3]]
    #   atan2: (4/pi) atan2(g2, sqrt(v1)) = (4/pi) [[pi/4, -pi/4], [pi/3, pi/6]] = [[1, -1], [4/3, 2/3]]
    #          clipped to [-1, 1]: [[1, -1], [1, 2/3]]
    #   plain: g2 / sqrt(v1) = [[1, -1], [sqrt3, sqrt3/3]] clipped: [[1, -1], [1, sqrt3/3]]
    #   m2 = 0 + (1 - 0.5) normed;  p2 = -m2
    r3 = math.sqrt(3)
    p, _ = run(mlorc.MLorc_Adopt, ZERO, [[[1.0, -1.0], [1.0, 3.0]], [[1.0, -1.0], [r3, r3]]],
               rank=rank, lr=1.0, betas=(0.5, 0.5), weight_decay=0.0, use_atan2=use_atan2)
    last = 2 / 3 if use_atan2 else r3 / 3
    close(p, [[-0.5, 0.5], [-0.5, -0.5 * last]])


@RANKS
@pytest.mark.parametrize("use_atan2", [False, True])
def test_use_atan2_prodigy(rank, use_atan2, float64):
    # Prodigy step 1 with d = d0 = 0.1, lr 1 (step size d lr = 0.1), betas (0.75, 0.8125):
    #   m = d (1 - b1) g = 0.025 g,  sqrt(v) = d sqrt(1 - b2) |g| = 0.1 * 0.25 sqrt3 |g| = 0.025 sqrt3 |g|
    #   atan2: (4/pi) atan(1/sqrt3) sign(g) = (4/pi)(pi/6) sign(g) = 2/3 sign(g)
    #   plain: m / (sqrt(v) + d eps) = sign(g) / sqrt3 (to 1e-7 relative)
    #   p1 = p0 - 0.1 d
    g = [[1.0, -2.0], [3.0, -4.0]]
    p, _ = run(mlorc.MLorc_Prodigy, [[1.0, 1.0], [1.0, 1.0]], [g], rank=rank, lr=1.0, d0=0.1,
               betas=(0.75, 0.8125), slice_p=1, weight_decay=0.0, use_atan2=use_atan2)
    step = 0.1 * (2 / 3 if use_atan2 else 1 / math.sqrt(3))
    close(p, [[1 - step, 1 + step], [1 - step, 1 + step]], tol=1e-6)


# full_weight_outside, at rank 1 on a 2x2 matrix (the sketched path: rank + oversampling < 2) with
#   G1 = a b^T = [[3, 3], [3, 3]],  G2 = a' b'^T = [[1, -1], [-1, 1]]  (a' _|_ a, b' _|_ b),
# betas (0.5, 0.9), eps 0, lr 1. G1 and G1^2 have rank 1, so step 1's factors hold m_1 and v_1
# exactly: U = +-a / |a|, Vh = +-b^T / |b|. G2 lies outside both, where m~ holds no history.
#   step 1: d1 = sign(G1): p1 = [[-1, -1], [-1, -1]]
#   step 2: bc1 = 0.75, bc2 = 0.19, v_2 = 0.9 * 0.1 * 9 + 0.1 * 1 = 0.91, v_hat = 0.91 / 0.19
#     without: m_hat = (0.25 G1 + 0.5 G2) / 0.75 = G1 / 3 + (2/3) G2 = [[5/3, 1/3], [1/3, 5/3]]
#     with:    G2 enters at weight 1 instead of 0.5 / 0.75: m_hat = G1 / 3 + G2 = [[2, 0], [0, 2]]
#   (|d2| <= 0.92, below dense Adam's bound B_2 = 1.04: the [M6] clamp does not act.) At dense and
#   full rank nothing is outside, so the option changes nothing there.
G1_RANK1 = [[3.0, 3.0], [3.0, 3.0]]
G2_OUTSIDE = [[1.0, -1.0], [-1.0, 1.0]]


@pytest.mark.parametrize("rank", [None, 1, 2], ids=["dense", "rank1", "full_rank"])
@pytest.mark.parametrize("on", [False, True])
def test_full_weight_outside_adamw(rank, on, float64):
    p, _ = run(mlorc.MLorc_AdamW, ZERO, [G1_RANK1, G2_OUTSIDE], rank=rank, lr=1.0, betas=(0.5, 0.9),
               eps=0.0, weight_decay=0.0, full_weight_outside=on)
    m_hat = [[2.0, 0.0], [0.0, 2.0]] if on and rank == 1 else [[5 / 3, 1 / 3], [1 / 3, 5 / 3]]
    sqrt_v_hat = math.sqrt(0.91 / 0.19)
    close(p, [[-1.0 - x / sqrt_v_hat for x in row] for row in m_hat])


@pytest.mark.parametrize("rank", [None, 1, 2], ids=["dense", "rank1", "full_rank"])
@pytest.mark.parametrize("on", [False, True])
def test_full_weight_outside_lion(rank, on, float64):
    # Lion, betas (0.5, 0.5), lr 1, the same G1 and G2 at rank 1:
    #   step 1: d1 = sign(0.5 G1) = 1 everywhere, p1 = -1; m1 = 0.5 G1 = 1.5 everywhere
    #   step 2: without: sign(0.5 m1 + 0.5 G2) = sign(0.75 + 0.5 G2) = 1 everywhere: p2 = -2
    #           with: G2 (outside) at weight 1: sign(0.75 + G2) = [[1, -1], [-1, 1]]: p2 = [[-2, 0], [0, -2]]
    p, _ = run(mlorc.MLorc_Lion, ZERO, [G1_RANK1, G2_OUTSIDE], rank=rank, lr=1.0, betas=(0.5, 0.5),
               full_weight_outside=on)
    close(p, [[-2.0, 0.0], [0.0, -2.0]] if on and rank == 1 else [[-2.0, -2.0], [-2.0, -2.0]])


@pytest.mark.parametrize("rank", [None, 1, 2], ids=["dense", "rank1", "full_rank"])
@pytest.mark.parametrize("on", [False, True])
def test_full_weight_outside_prodigy(rank, on, float64):
    # Prodigy, d0 0.1, lr 1, betas (0.5, 0.9), eps 0, the same G1 and G2 at rank 1. d stays 0.1 through
    # step 2 (step 1's term of the estimate, g (p0 - p), is 0), so d lr = 0.1:
    #   step 1: m1 = d (1 - b1) G1 = 0.15, v1 = d^2 (1 - b2) G1^2 = 0.009, d1 = 0.15 / sqrt(0.009) (dense
    #           Adam's bound at step 1, reached, not exceeded): p1 = -0.1 d1
    #   step 2: m2 = b1 m1 + d (1 - b1) G2 = 0.075 + 0.05 G2, v2 = 0.9 v1 + 0.001 G2^2 = 0.0091
    #     with: G2 (outside) at d (1 - b1^2) = 0.075, dense m's weight for a gradient that persists, not
    #           d (1 - b1) = 0.05: m = 0.075 + 0.075 G2
    #   p2 = p1 - 0.1 m / sqrt(v2) (|m| / sqrt(v2) <= 1.58, below the step-2 bound 1.79: no clamp)
    p, _ = run(mlorc.MLorc_Prodigy, ZERO, [G1_RANK1, G2_OUTSIDE], rank=rank, lr=1.0, d0=0.1,
               betas=(0.5, 0.9), eps=0.0, weight_decay=0.0, slice_p=1, full_weight_outside=on)
    weight = 0.075 if on and rank == 1 else 0.05
    p1 = -0.1 * 0.15 / math.sqrt(0.009)
    close(p, [[p1 - 0.1 * (0.075 + weight * x) / math.sqrt(0.0091) for x in row] for row in G2_OUTSIDE])


@pytest.mark.parametrize("rank", [None, 1, 2], ids=["dense", "rank1", "full_rank"])
@pytest.mark.parametrize("on", [False, True])
def test_full_weight_outside_dadapt_lion(rank, on, float64):
    # D-Adapt Lion, d0 1 (it stays 1 through step 2: step 1's numerator term uses s = 0), lr 1, betas
    # (0.5, 0.5): Lion's computation above, the momentum accumulating d lr g = g:
    #   step 1: d1 = 1 everywhere, p1 = -1, m1 = 1.5;  step 2: sign(0.75 + 0.5 G2) = 1, or with G2
    #   (outside) at weight 1, sign(0.75 + G2) = [[1, -1], [-1, 1]]
    p, _ = run(mlorc.MLorc_DAdapt_Lion, ZERO, [G1_RANK1, G2_OUTSIDE], rank=rank, lr=1.0, d0=1.0,
               betas=(0.5, 0.5), slice_p=1, full_weight_outside=on)
    close(p, [[-2.0, 0.0], [0.0, -2.0]] if on and rank == 1 else [[-2.0, -2.0], [-2.0, -2.0]])


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (4, 3, 2)])
def test_outside_kept_is_the_part_outside_both_spaces(shape, float64):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen)
    rows, cols = shape[0], math.prod(shape[1:])
    U = torch.linalg.qr(torch.randn(rows, 2, generator=gen)).Q
    Vh = torch.linalg.qr(torch.randn(cols, 2, generator=gen)).Q.mT
    out = mlorc.outside_kept(g, U, Vh)
    assert out.shape == g.shape
    O = out.reshape(rows, cols)
    torch.testing.assert_close(O, (torch.eye(rows) - U @ U.mT) @ g.reshape(rows, cols)
                               @ (torch.eye(cols) - Vh.mT @ Vh))
    torch.testing.assert_close(U.mT @ O, torch.zeros(2, cols))            # outside the columns
    torch.testing.assert_close(O @ Vh.mT, torch.zeros(rows, 2))           # and the rows
    k = min(rows, cols)                                                   # factors spanning a side
    U_full = torch.linalg.qr(torch.randn(rows, k, generator=gen)).Q
    Vh_full = torch.linalg.qr(torch.randn(cols, k, generator=gen)).Q.mT
    assert mlorc.outside_kept(g, U_full, Vh_full) is None


@RANKS
def test_use_orthograd_adamw(rank, float64):
    # w = [[1, 1], [0, 0]], g = [[2, 0], [0, 1]]: w.g = 2, w.w = 2
    #   g_orth = g - (2/2) w = [[1, -1], [0, 1]], |g| = sqrt5, |g_orth| = sqrt3
    #   g' = sqrt(5/3) [[1, -1], [0, 1]]
    # Adam step 1 (eps 1e-8): d = g' / (|g'| + eps) = [[1, -1], [0, 1]]; lr 0.1:
    #   p1 = w - 0.1 d = [[0.9, 1.1], [0, -0.1]]   (without OrthoGrad (0, 1) would stay 1)
    #   m = (1 - b1) g' = 0.1 g',  v = (1 - b2) g'^2 = 0.001 (5/3) [[1, 1], [0, 1]]
    w, g = [[1.0, 1.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 1.0]]
    p, opt = run(mlorc.MLorc_AdamW, w, [g], rank=rank, lr=0.1, weight_decay=0.0, use_orthograd=True)
    close(p, [[0.9, 1.1], [0.0, -0.1]], tol=1e-7)
    c = math.sqrt(5 / 3)
    close(moment(opt), [[0.1 * c, -0.1 * c], [0.0, 0.1 * c]])
    close(moment(opt, "exp_avg_sq"), [[0.001 * 5 / 3, 0.001 * 5 / 3], [0.0, 0.001 * 5 / 3]])


@RANKS
def test_use_cautious_adamw(rank, float64):
    # d2 = [[1/3, 1], [-1/3, -1]], G2 = [[-1, 1], [1, -1]]: d2 * G2 = [[-1/3, 1], [-1/3, 1]]
    #   mask [[0, 1], [0, 1]], mean 0.5: d2 <- d2 * mask / 0.5 = [[0, 2], [0, -2]]
    #   step 1: d1 = sign(G1) agrees with G1 everywhere, mask mean 1: unchanged
    # p2 = -d1 - d2 = [[-1, -3], [1, 3]]
    p, _ = run(mlorc.MLorc_AdamW, ZERO, [G1, G2], rank=rank, use_cautious=True, **ADAM_KW)
    close(p, [[-1.0, -3.0], [1.0, 3.0]])


@RANKS
@pytest.mark.parametrize("use_cautious", [False, True])
def test_use_cautious_lion(rank, use_cautious, float64):
    # Lion, betas (0.5, 0.5), lr 1.
    #   step 1: d1 = sign(0.5 G1) = [[1, 1], [-1, -1]], m1 = 0.5 G1
    #   step 2: d2 = sign(0.5 m1 + 0.5 G2) = sign([[0.75, 0.75], [-0.75, -0.75]]) = [[1, 1], [-1, -1]]
    #   plain:    p2 = -d1 - d2 = [[-2, -2], [2, 2]]
    #   cautious: d2 * G2 = [[-1, 1], [-1, 1]] -> mask [[0, 1], [0, 1]] -> d2 = [[0, 2], [0, -2]]
    #             p2 = [[-1, -3], [1, 3]]
    p, _ = run(mlorc.MLorc_Lion, ZERO, [G1, G2], rank=rank, lr=1.0, betas=(0.5, 0.5),
               use_cautious=use_cautious)
    close(p, [[-1.0, -3.0], [1.0, 3.0]] if use_cautious else [[-2.0, -2.0], [2.0, 2.0]])


@RANKS
@pytest.mark.parametrize("cls", LION, ids=name)
@pytest.mark.parametrize("clip", [None, 2.0])
def test_clip_threshold_lion_family(cls, clip, rank, float64):
    # betas (0.5, 0.5), step size 1 (Lion: lr = 1; D-Adapt Lion: d0 = lr = 1, and d stays 1 through
    # step 2 because the first numerator is 0 (s starts at 0); its momentum then accumulates 1 * g).
    #   g1 = 4 * ones (norm 8), g2 = [[-1, 1], [-0.25, 1]] (norm 1.75 < 2: not clipped)
    #   clip 2:  g1 -> ones, m1 = 0.5 ones
    #            d2 = sign(0.5 m1 + 0.5 g2) = sign([[-0.25, 0.75], [0.125, 0.75]]) = [[-1, 1], [1, 1]]
    #            m2 = 0.5 m1 + 0.5 g2 = [[-0.25, 0.75], [0.125, 0.75]]
    #   no clip: m1 = 2 ones, 0.5 m1 + 0.5 g2 > 0 everywhere: d2 = ones; m2 = ones + 0.5 g2
    #   p2 = -sign(g1) - d2
    g1 = [[4.0, 4.0], [4.0, 4.0]]
    g2 = [[-1.0, 1.0], [-0.25, 1.0]]
    extra = dict(d0=1.0, slice_p=1) if cls is mlorc.MLorc_DAdapt_Lion else {}
    p, opt = run(cls, ZERO, [g1, g2], rank=rank, lr=1.0, betas=(0.5, 0.5), clip_threshold=clip, **extra)
    if clip is None:
        close(p, [[-2.0, -2.0], [-2.0, -2.0]])
        close(moment(opt), [[0.5, 1.5], [0.875, 1.5]])
    else:
        close(p, [[0.0, -2.0], [-2.0, -2.0]])
        close(moment(opt), [[-0.25, 0.75], [0.125, 0.75]])


@pytest.mark.parametrize("cls", [mlorc.MLorc_AdamW, mlorc.MLorc_Lion], ids=name)
@pytest.mark.parametrize("maximize", [False, True])
def test_weight_decay_and_maximize(cls, maximize, float64):
    # step 1 of AdamW (eps 0) and of Lion is sign(g) (or sign(-g) when maximizing); decoupled decay:
    #   p1 = p0 (1 - lr wd) -+ lr sign(g),  lr 0.1, wd 0.5: factor 0.95
    #   p0 = [[1, 2], [-3, 4]], g = [[1, -1], [1, -1]]
    #   minimize: [[0.95 - 0.1, 1.9 + 0.1], [-2.85 - 0.1, 3.8 + 0.1]] = [[0.85, 2.0], [-2.95, 3.9]]
    #   maximize: [[0.95 + 0.1, 1.9 - 0.1], [-2.85 + 0.1, 3.8 - 0.1]] = [[1.05, 1.8], [-2.75, 3.7]]
    kw = dict(eps=0.0) if cls is mlorc.MLorc_AdamW else {}
    p, _ = run(cls, [[1.0, 2.0], [-3.0, 4.0]], [[[1.0, -1.0], [1.0, -1.0]]], rank=None, lr=0.1,
               weight_decay=0.5, maximize=maximize, **kw)
    close(p, [[1.05, 1.8], [-2.75, 3.7]] if maximize else [[0.85, 2.0], [-2.95, 3.9]])


@pytest.mark.parametrize("cls", ALL, ids=name)
def test_maximize_equals_minimizing_the_negated_gradient(cls, float64):
    # every variant, low rank (sketched), three steps: bitwise the same trajectory
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(6, 5, generator=gen)
    grads = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    results = []
    for maximize in (False, True):
        p = start.clone().requires_grad_()
        opt = cls([p], lr=1e-2, rank=2, oversampling=1, maximize=maximize)
        for g in grads:
            p.grad = g.clone() if maximize else -g
            opt.step()
        results.append(p.detach())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], start)


# ----------------------------------------------------------------------------------------------------
# Standalone helpers

def test_grams_hand_computed():
    # sign(g) |d|: g's zero gives 0
    d, g = torch.tensor([[1.0, -2.0], [3.0, -4.0]]), torch.tensor([[-1.0, -5.0], [0.0, 2.0]])
    torch.testing.assert_close(mlorc.grams(d, g), torch.tensor([[-1.0, -2.0], [0.0, 4.0]]), rtol=0, atol=0)


def test_cautious_hand_computed():
    # d * g = [[1, -2], [-3, 4]] -> mask [[1, 0], [0, 1]], mean 0.5 -> d * mask / 0.5
    d, g = torch.tensor([[1.0, -2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    torch.testing.assert_close(mlorc.cautious(d, g), torch.tensor([[2.0, 0.0], [0.0, 8.0]]), rtol=0, atol=0)
    # a zero gradient entry masks too; all-disagreeing gives zeros, not NaN
    torch.testing.assert_close(mlorc.cautious(d, torch.tensor([[0.0, 1.0], [1.0, 1.0]])),
                               torch.tensor([[0.0, 0.0], [6.0, 8.0]]), rtol=0, atol=0)
    assert torch.equal(mlorc.cautious(d, -d), torch.zeros_like(d))


def test_orthograd_hand_computed():
    # see test_use_orthograd_adamw: g' = sqrt(5/3) [[1, -1], [0, 1]]
    w, g = t([[1.0, 1.0], [0.0, 0.0]]), t([[2.0, 0.0], [0.0, 1.0]])
    close(mlorc.orthograd(w, g), [[math.sqrt(5 / 3), -math.sqrt(5 / 3)], [0.0, math.sqrt(5 / 3)]])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(2, 2), (7, 3), (11,)])
def test_orthograd_is_orthogonal_to_w_and_keeps_the_norm(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    w, g = torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen,
                                                                               dtype=torch.float64)
    w_before, g_before = w.clone(), g.clone()
    out = mlorc.orthograd(w, g)
    assert out.shape == g.shape
    assert abs((out * w).sum()) <= 1e-12 * g.norm() * w.norm()
    torch.testing.assert_close(out.norm(), g.norm(), rtol=1e-12, atol=0)
    assert torch.equal(w, w_before) and torch.equal(g, g_before)
    # w = 0: nothing to remove
    torch.testing.assert_close(mlorc.orthograd(torch.zeros(shape, dtype=torch.float64), g), g)


def test_clip_by_norm():
    g = torch.tensor([[3.0, 0.0], [0.0, 4.0]])                      # norm 5
    before = g.clone()
    torch.testing.assert_close(mlorc.clip_by_norm(g, 1.0), torch.tensor([[0.6, 0.0], [0.0, 0.8]]))
    assert torch.equal(g, before)                                    # out of place
    unclipped = mlorc.clip_by_norm(g, 10.0)
    assert torch.equal(unclipped, g) and unclipped.data_ptr() != g.data_ptr()
    assert torch.equal(g, before)
    assert mlorc.clip_by_norm(g, None) is g
    assert torch.equal(mlorc.clip_by_norm(torch.zeros(2, 2), 1.0), torch.zeros(2, 2))
    big = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 100
    assert mlorc.clip_by_norm(big, 2.5).norm() <= 2.5 * (1 + 1e-6)


def bf16_neighbours(x):
    """The bf16 values a <= x <= b around fp32 x (a == b when x is representable), by nextafter."""
    nearest = x.to(torch.bfloat16)
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf")))
    down = torch.nextafter(nearest, torch.full_like(nearest, -float("inf")))
    below = nearest.float() <= x
    above = nearest.float() >= x
    return torch.where(below, nearest, down), torch.where(above, nearest, up)


def rounding_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, generator=gen) * torch.pow(10.0, torch.empty(48).uniform_(-30, 30, generator=gen))
    exact = torch.tensor([0.0, -0.0, 1.0, -1.5, 3.0, 2.0 ** -126, 1e30]).to(torch.bfloat16).float()
    return torch.cat([x, -x[:8], exact])


def test_stochastic_round_to_bf16_picks_a_neighbour_and_is_unbiased():
    # N draws of each value in one call: every element draws its own noise from the generator.
    n = 4096
    x = rounding_inputs()
    a, b = bf16_neighbours(x)
    draws = mlorc.stochastic_round_to_bf16(x[:, None].expand(-1, n).contiguous(),
                                           torch.Generator().manual_seed(1))
    assert draws.dtype == torch.bfloat16
    assert ((draws == a[:, None]) | (draws == b[:, None])).all()
    representable = a == b
    assert representable.sum() >= 7
    assert (draws[representable] == x[representable, None].to(torch.bfloat16)).all()
    # Unbiased: each draw is a or b with mean x. Hoeffding: P(|mean - x| >= 3 (b - a) / sqrt(N))
    # <= 2 exp(-18) = 3e-8 per value (this is 6 CLT standard deviations, since the variance of a
    # draw is at most (b - a)^2 / 4).
    mean = draws.double().mean(dim=1)
    gap = (b.double() - a.double())
    assert ((mean - x.double()).abs() <= 3 * gap / math.sqrt(n)).all()
    # not round-to-nearest: a value at least 1% of the gap from both neighbours misses one of them
    # in all N draws with probability <= 0.99^4096 < 1e-17
    frac = ((x.double() - a.double()) / gap).nan_to_num(0.0)
    mid = (frac >= 0.01) & (frac <= 0.99)
    assert mid.sum() >= 20
    hits_a = (draws[mid] == a[mid, None]).any(dim=1)
    hits_b = (draws[mid] == b[mid, None]).any(dim=1)
    assert (hits_a & hits_b).all()


def test_stochastic_round_to_bf16_is_deterministic_per_generator():
    x = rounding_inputs()[:, None].expand(-1, 64).contiguous()
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    first = mlorc.stochastic_round_to_bf16(x, torch.Generator().manual_seed(5))
    second = mlorc.stochastic_round_to_bf16(x, torch.Generator().manual_seed(5))
    other = mlorc.stochastic_round_to_bf16(x, torch.Generator().manual_seed(6))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert torch.equal(torch.random.get_rng_state(), before)


# ----------------------------------------------------------------------------------------------------
# Forbidden combinations

def param():
    return torch.zeros(3, 2, requires_grad=True)


@pytest.mark.parametrize("cls", LION, ids=name)
@pytest.mark.parametrize("option", ["use_atan2", "use_grams"])
def test_lion_family_rejects_atan2_and_grams(cls, option):
    with pytest.raises(ValueError, match=rf"\b{option}\b"):
        cls([param()], **{option: True})
    opt = cls([param()])
    with pytest.raises(ValueError, match=rf"\b{option}\b"):
        opt.add_param_group({"params": [param()], option: True})


def test_came_rejects_atan2():
    with pytest.raises(ValueError, match=r"\buse_atan2\b"):
        mlorc.MLorc_CAME([param()], use_atan2=True)
    opt = mlorc.MLorc_CAME([param()])
    with pytest.raises(ValueError, match=r"\buse_atan2\b"):
        opt.add_param_group({"params": [param()], "use_atan2": True})


@pytest.mark.parametrize("cls", ALL, ids=name)
def test_grams_with_cautious_is_rejected(cls):
    with pytest.raises(ValueError, match=r"\buse_(grams|cautious)\b"):
        cls([param()], use_grams=True, use_cautious=True)
    opt = cls([param()])
    with pytest.raises(ValueError, match=r"\buse_(grams|cautious)\b"):
        opt.add_param_group({"params": [param()], "use_grams": True, "use_cautious": True})


@pytest.mark.parametrize("cls", ALL, ids=name)
def test_allowed_options_construct(cls):
    # the complement of the rejections above, so they are not rejecting everything
    allowed = [dict(use_cautious=True), dict(use_orthograd=True), dict(maximize=True),
               dict(stochastic_rounding=False)]
    if cls not in LION:
        allowed.append(dict(use_grams=True))
    if cls in (mlorc.MLorc_AdamW, mlorc.MLorc_Adopt, mlorc.MLorc_Prodigy):
        allowed.append(dict(use_atan2=True, use_grams=True))
    for options in allowed:
        opt = cls([param()], **options)
        assert all(opt.param_groups[0][k] == v for k, v in options.items())


# ----------------------------------------------------------------------------------------------------
# Invalid hyperparameters

def invalid_hyperparameters(cls):
    """(argument, invalid value) pairs that apply to cls."""
    nbetas = 3 if cls is mlorc.MLorc_CAME else 2
    cases = [("lr", -1e-3), ("lr", float("nan")), ("lr", "1e-3")]
    for i in range(nbetas):
        for bad in (1.0, 1.5, -0.1):
            betas = [0.5] * nbetas
            betas[i] = bad
            cases.append(("betas", tuple(betas)))
    cases += [("betas", (0.5,) * (nbetas - 1)), ("betas", (0.5,) * (nbetas + 1))]   # wrong length
    cases += [("rank", 0), ("rank", -1), ("rank", 2.0), ("rank", True),
              ("oversampling", -1), ("oversampling", 1.5), ("power_iters", -1), ("power_iters", 1.0),
              ("weight_decay", -0.1), ("seed", 1.5), ("seed", "0"), ("seed", None),
              ("weight_decay", None), ("weight_decay", "0.01")]     # not numbers: no bare TypeError
    if cls is mlorc.MLorc_CAME:
        cases += [("eps", (-1e-30, 1e-16)), ("eps", (1e-30, -1e-16)), ("eps", ("1e-30", 1e-16))]
    elif cls not in LION:
        cases += [("eps", -1e-8), ("eps", "1e-8"), ("eps", None)]
    if cls in (mlorc.MLorc_Prodigy, mlorc.MLorc_DAdapt_Lion):
        # d0 = 0 used to divide by zero in Prodigy's step and leave D-Adapt Lion's d at 0 forever
        cases += [("slice_p", 0), ("slice_p", -1), ("slice_p", 1.5), ("d0", 0.0), ("d0", -1e-6),
                  ("d0", "1e-6")]
    if cls is mlorc.MLorc_Prodigy:
        cases += [("d_coef", 0.0), ("growth_rate", 0.0), ("growth_rate", -1.0), ("d_coef", "1")]
    if cls in LION or cls is mlorc.MLorc_CAME:
        cases += [("clip_threshold", 0.0), ("clip_threshold", -1.0), ("clip_threshold", "1.0")]
    if takes(cls, "full_weight_outside"):
        cases += [("full_weight_outside", 1), ("full_weight_outside", "yes"), ("full_weight_outside", None)]
    return cases


INVALID = [pytest.param(cls, arg, value, id=f"{cls.__name__}-{arg}={value!r}")
           for cls in ALL for arg, value in invalid_hyperparameters(cls)]


@pytest.mark.parametrize("cls,arg,value", INVALID)
def test_invalid_hyperparameter_raises_at_construction(cls, arg, value):
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        cls([param()], **{arg: value})


@pytest.mark.parametrize("cls,arg,value", INVALID)
def test_invalid_hyperparameter_raises_in_add_param_group(cls, arg, value):
    opt = cls([param()])
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        opt.add_param_group({"params": [param()], arg: value})


@pytest.mark.parametrize("cls", ALL, ids=name)
@pytest.mark.parametrize("bad", ["lr", "complex"])
def test_rejected_param_group_leaves_the_optimizer_usable(cls, bad):
    # regression: add_param_group used to append the group before validating it, so a rejected
    # group stayed in param_groups and every later step() raised
    p = torch.ones(3, 2, requires_grad=True)
    opt = cls([p], lr=0.5)
    if bad == "lr":
        group = {"params": [param()], "lr": -1.0}
    else:
        group = {"params": [torch.zeros(2, dtype=torch.complex64, requires_grad=True)]}
    with pytest.raises(ValueError, match=r"\blr\b|complex"):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1
    for _ in range(2):
        p.grad = torch.ones(3, 2)
        opt.step()
    assert not torch.equal(p.detach(), torch.ones(3, 2))


INVALID_LATER = {                          # argument -> invalid value, given the group's current one
    "lr": lambda old: -1.0,
    "betas": lambda old: (1.0,) + tuple(old[1:]),
    "rank": lambda old: 0,
    "weight_decay": lambda old: -1.0,
    "seed": lambda old: 0.5,
}


@pytest.mark.parametrize("cls", ALL, ids=name)
@pytest.mark.parametrize("arg", list(INVALID_LATER))
@pytest.mark.parametrize("path", ["step", "step_param"])
def test_invalid_after_construction_raises_before_changing_anything(cls, arg, path):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 3, generator=gen).requires_grad_()
    opt = cls([p], lr=1e-2, rank=1)
    for _ in range(2):                                           # ADOPT's first step only sets v
        p.grad = torch.randn(4, 3, generator=gen)
        opt.step()
    p.grad = torch.randn(4, 3, generator=gen)
    params, state = p.detach().clone(), copy.deepcopy(opt.state[p])
    group = opt.param_groups[0]
    group[arg] = INVALID_LATER[arg](group[arg])
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        opt.step() if path == "step" else opt.step_param(p)
    assert torch.equal(p.detach(), params)
    assert state.keys() == opt.state[p].keys()
    for key, before in state.items():
        after = opt.state[p][key]
        assert torch.equal(after, before) if torch.is_tensor(before) else after == before


@pytest.mark.parametrize("cls", ALL, ids=name)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_parameters_are_rejected(cls, dtype):
    # regression: they were accepted and every update was truncated to an integer (torch.optim
    # refuses them too); the error names the parameter's shape and dtype, and nothing is added
    w = torch.zeros(3, 2, dtype=dtype)
    with pytest.raises(ValueError, match=rf"shape \(3, 2\) has dtype {dtype}"):
        cls([w])
    opt = cls([param()])
    with pytest.raises(ValueError, match="floating-point"):
        opt.add_param_group({"params": [w]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", ALL, ids=name)
def test_complex_parameters_are_rejected(cls):
    z = torch.zeros(2, 2, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="complex"):
        cls([z])
    with pytest.raises(ValueError, match="complex"):
        cls([param(), torch.zeros(3, dtype=torch.complex128, requires_grad=True)])
    opt = cls([param()])
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [z]})


def test_came_clip_threshold_none_means_no_clipping():
    # regression: the shared validation allows None ("no clipping") but CAME used to divide by it.
    # None must equal a threshold no update RMS reaches, and differ from an active one.
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(4, 3, generator=gen)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(3)]
    results = {}
    for clip in (None, 1e30, 0.1):
        p = start.clone().requires_grad_()
        opt = mlorc.MLorc_CAME([p], clip_threshold=clip, lr=0.1, rank=None)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results[clip] = p.detach()
    assert torch.isfinite(results[None]).all()
    assert torch.equal(results[None], results[1e30])
    assert not torch.equal(results[None], results[0.1])


@pytest.mark.parametrize("helper", ["clip_by_norm", "orthograd"])
def test_helpers_with_huge_finite_float32_gradients(helper):
    # g = 1e20 * [[1, 2], [2, 4]]: |g| = 5e20, finite in float32 (max 3.4e38); |g|^2 is not
    g = torch.tensor([[1e20, 2e20], [2e20, 4e20]])
    if helper == "clip_by_norm":
        torch.testing.assert_close(mlorc.clip_by_norm(g, 1.0), torch.tensor([[0.2, 0.4], [0.4, 0.8]]))
    else:
        # w = e_00: g_orth = [[0, 2], [2, 4]] * 1e20 (norm 2e20 sqrt6), rescaled to 5e20
        out = mlorc.orthograd(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), g)
        expected = torch.tensor([[0.0, 2.0], [2.0, 4.0]]) * (5e20 / (24 ** 0.5 * 1e20)) * 1e20
        torch.testing.assert_close(out, expected)
