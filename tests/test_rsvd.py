"""mlorc.rsvd, mlorc.reconstruct, mlorc.repair_second_moment and mlorc.sketch_generator.

Tolerances are backward-error bounds of the form c * max(m, n) * eps * ||A||: Householder QR and
the LAPACK SVD are backward stable, so orthonormality and reconstruction errors grow at most linearly
with the dimension. c = 8 leaves a margin of more than 10x over the worst case measured on 400 random
cases of every kind used here (about 26 eps * ||A|| in float64, 11 eps in float32).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mlorc

DTYPES = [torch.float32, torch.float64]
KINDS = ["gaussian", "low_rank", "zero", "planted"]


def tol(dtype, m, n):
    """Relative backward-error tolerance: 8 max(m, n) eps (see the module docstring)."""
    return 8 * max(m, n) * torch.finfo(dtype).eps


def planted(m, n, singular_values, gen, dtype=torch.float64):
    """A matrix with exactly the given singular values and Haar-random singular vectors."""
    r = len(singular_values)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    return ((U * s) @ V.mT).to(dtype)


def make_matrix(kind, m, n, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(m, n, generator=gen, dtype=dtype)
    if kind == "low_rank":                                   # rank <= 2: rank-deficient for most shapes
        j = min(2, m, n)
        return torch.randn(m, j, generator=gen, dtype=dtype) @ torch.randn(j, n, generator=gen, dtype=dtype)
    if kind == "zero":
        return torch.zeros(m, n, dtype=dtype)
    return planted(m, n, [0.5 ** j for j in range(min(m, n))], gen, dtype)   # geometric decay


def frob(x):
    """Frobenius norm in float64 (torch's float32 norm overflows for entries near 1e20)."""
    return x.double().norm().item()


def optimal_tail(A, k):
    """Eckart-Young: the smallest Frobenius error of any rank-k approximation of A."""
    return torch.linalg.svdvals(A.double())[k:].norm().item()


# ----------------------------------------------------------------------------------------------------
# Structural properties on every kind of input

@given(m=st.integers(1, 48), n=st.integers(1, 48), rank=st.integers(1, 56),
       oversampling=st.integers(0, 8), power_iters=st.integers(0, 3), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES))
def test_rsvd_factors_are_a_valid_truncated_svd(m, n, rank, oversampling, power_iters, seed, kind, dtype):
    A = make_matrix(kind, m, n, seed, dtype)
    U, s, Vh = mlorc.rsvd(A, rank, oversampling, power_iters, torch.Generator().manual_seed(seed))
    k = min(rank, m, n)

    # shapes and dtype depend only on (m, n, rank), never on the data (zero, rank-deficient, ...)
    assert U.shape == (m, k) and s.shape == (k,) and Vh.shape == (k, n)
    assert U.dtype == s.dtype == Vh.dtype == dtype
    assert all(torch.isfinite(t).all() for t in (U, s, Vh))

    # orthonormal columns of U and rows of Vh: all of them, also those of zero singular values
    eye = torch.eye(k, dtype=dtype)
    t = tol(dtype, m, n)
    torch.testing.assert_close(U.mT @ U, eye, rtol=0, atol=t)
    torch.testing.assert_close(Vh @ Vh.mT, eye, rtol=0, atol=t)

    # s sorted descending, non-negative, and no larger than A's singular values (interlacing)
    assert (s >= 0).all()
    assert (s[:-1] >= s[1:]).all()
    sigma = torch.linalg.svdvals(A.double())[:k]
    norm_a = frob(A)
    assert (s.double() <= sigma + t * norm_a).all()

    # the approximation is the projection U U^T A: U^T A = diag(s) Vh
    torch.testing.assert_close((U.mT @ A).double(), (s[:, None] * Vh).double(), rtol=0,
                               atol=t * norm_a + 1e-300)

    # never better than Eckart-Young; exactly optimal when the thin SVD is used; never worse than 0
    err, tail = frob(A - mlorc.reconstruct(U, s, Vh)), optimal_tail(A, k)
    assert err >= tail - t * norm_a
    assert err <= norm_a * (1 + t)
    if rank >= min(m, n):
        assert err <= t * norm_a                                   # exact reconstruction
    elif rank + oversampling >= min(m, n):
        assert abs(err - tail) <= t * norm_a                       # optimal truncation
    if kind == "zero":
        assert torch.equal(s, torch.zeros_like(s))
        assert torch.equal(mlorc.reconstruct(U, s, Vh), torch.zeros_like(A))


@given(m=st.integers(1, 48), n=st.integers(1, 48), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES))
def test_full_rank_reconstruction_is_exact(m, n, seed, dtype):
    A = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    for rank in (min(m, n), min(m, n) + 3):                       # oversampling 0: no sketch room
        U, s, Vh = mlorc.rsvd(A, rank, 0, 0, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(mlorc.reconstruct(U, s, Vh), A, rtol=0,
                                   atol=tol(dtype, m, n) * frob(A))


# ----------------------------------------------------------------------------------------------------
# Accuracy of the randomized path

def halko_factor(k, p, n, t=10.0, u=6.0):
    """A bound F with ||A - rsvd_k(A)||_F <= F * tail_k(A) with probability >= 1 - t^-(p+1) - e^-(u^2/2).

    Halko, Martinsson & Tropp (2011), Thm 9.1: with Omega_1 = V_1^T Omega (k x (k+p)) and
    Omega_2 = V_2^T Omega, ||(I - P) A||_F <= tail * sqrt(1 + ||Omega_2||^2 ||Omega_1^+||^2).
    Power iterations sample A (A^T A)^q Omega, i.e. Omega_1 -> S_1^2q Omega_1, Omega_2 -> S_2^2q Omega_2,
    which multiplies Omega_2 Omega_1^+ by (s_{k+1}/s_k)^2q <= 1: the same bound holds for every q.
    Prop. 10.3: ||Omega_2|| <= sqrt(n - k) + sqrt(k + p) + u except with probability e^(-u^2/2);
    Prop. 10.4: ||Omega_1^+|| <= e sqrt(k + p) / (p + 1) * t except with probability t^-(p+1).
    Truncating B = Q^T A to rank k adds at most tail_k(B) <= tail_k(A) (singular values of Q^T A are
    at most those of A). So F = 1 + sqrt(1 + (||Omega_2|| bound * ||Omega_1^+|| bound)^2).
    With p >= 4, t = 10, u = 6 the failure probability is below 1e-5 per draw.
    """
    omega2 = math.sqrt(max(n - k, 0)) + math.sqrt(k + p) + u
    omega1_pinv = math.e * math.sqrt(k + p) / (p + 1) * t
    return 1 + math.sqrt(1 + (omega2 * omega1_pinv) ** 2)


@given(m=st.integers(2, 48), n=st.integers(2, 48), rank=st.integers(1, 8), oversampling=st.integers(4, 10),
       power_iters=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_rank_r_error_close_to_optimal_tail_on_planted_spectrum(m, n, rank, oversampling, power_iters, seed):
    # top singular values in [1, 2], then a tail delta, delta/2, delta/4, ...: tail ~ 1.15 delta
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    k = min(rank, r)
    top = sorted((1 + torch.rand(k, generator=gen, dtype=torch.float64)).tolist(), reverse=True)
    delta = 1e-6
    A = planted(m, n, top + [delta * 0.5 ** i for i in range(r - k)], gen)
    U, s, Vh = mlorc.rsvd(A, rank, oversampling, power_iters, torch.Generator().manual_seed(seed + 1))
    err, tail = frob(A - mlorc.reconstruct(U, s, Vh)), optimal_tail(A, k)
    factor = halko_factor(k, oversampling, n)
    roundoff = tol(torch.float64, m, n) * frob(A)
    assert err <= factor * tail + roundoff
    assert err >= tail - roundoff
    # the bound is informative: missing one top direction would cost at least s_k >= 1
    assert factor * tail + roundoff < 0.01


def test_oversampling_and_power_iterations_reduce_mean_error():
    # slow decay s_j = j^-1/2: a plain sketch is visibly suboptimal. Mean over 20 fixed seeds of
    # err / tail (>= 1 by Eckart-Young). Measured: p = 0, 4, 8 (q = 0) give 1.198, 1.136, 1.080;
    # q = 0, 1, 2 (p = 0) give 1.198, 1.044, 1.017. Each asserted step keeps a margin over 2x the
    # per-seed spread of the mean (about 0.007).
    m, n, k = 40, 30, 4
    A = planted(m, n, [(j + 1) ** -0.5 for j in range(30)], torch.Generator().manual_seed(0))
    tail = optimal_tail(A, k)

    def mean_ratio(p, q):
        ratios = []
        for seed in range(20):
            U, s, Vh = mlorc.rsvd(A, k, p, q, torch.Generator().manual_seed(seed))
            ratios.append(frob(A - mlorc.reconstruct(U, s, Vh)) / tail)
        assert min(ratios) >= 1 - 1e-12
        return sum(ratios) / len(ratios)

    by_p = [mean_ratio(p, 0) for p in (0, 4, 8)]
    by_q = [by_p[0]] + [mean_ratio(0, q) for q in (1, 2)]
    for chain in (by_p, by_q):
        for worse, better in zip(chain, chain[1:]):
            assert better - 1 < 0.8 * (worse - 1)          # the excess error shrinks by >= 20%
    # Halko et al. Thm 10.5: E ||(I - P) A||_F <= sqrt(1 + k / (p - 1)) tail; truncation adds <= tail
    assert by_p[1] <= 1 + math.sqrt(1 + k / 3)


# ----------------------------------------------------------------------------------------------------
# Determinism and the global RNG

@given(m=st.integers(1, 48), n=st.integers(1, 48), rank=st.integers(1, 8), oversampling=st.integers(0, 4),
       power_iters=st.integers(0, 2), seed=st.integers(0, 2**63 - 1))
def test_same_generator_seed_gives_identical_factors(m, n, rank, oversampling, power_iters, seed):
    A = torch.randn(m, n, generator=torch.Generator().manual_seed(seed % 2**31))
    first = mlorc.rsvd(A, rank, oversampling, power_iters, torch.Generator().manual_seed(seed))
    second = mlorc.rsvd(A, rank, oversampling, power_iters, torch.Generator().manual_seed(seed))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_sketch_generator_is_reproducible_and_distinct_per_parameter_and_step():
    A = planted(30, 20, [(j + 1) ** -0.5 for j in range(20)], torch.Generator().manual_seed(3))

    def factors(seed, index, step):
        return mlorc.rsvd(A, 2, 0, 0, mlorc.sketch_generator(seed, index, step, "cpu"))

    base = factors(7, 3, 11)
    assert all(torch.equal(a, b) for a, b in zip(base, factors(7, 3, 11)))
    for other in (factors(8, 3, 11), factors(7, 4, 11), factors(7, 3, 12)):
        assert not torch.equal(base[0], other[0])          # a slow-decay matrix: the sketch matters
    assert 0 <= mlorc.sketch_seed(2**40, 10**6, 10**9) < 2**63


def test_rsvd_leaves_global_rng_untouched():
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    A = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    U, s, Vh = mlorc.rsvd(A, 2, 1, 2, torch.Generator().manual_seed(5))    # sketched path
    assert U.shape == (20, 2)
    assert torch.equal(torch.random.get_rng_state(), before)


OPTIMIZERS = [mlorc.MLorc_AdamW, mlorc.MLorc_Lion, mlorc.MLorc_Prodigy, mlorc.MLorc_DAdapt_Lion,
              mlorc.MLorc_Adopt, mlorc.MLorc_CAME]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_optimizer_step_leaves_global_rng_untouched(cls):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(12, 10, generator=gen).requires_grad_(),                    # sketched (rank 1)
              torch.randn(8, 6, generator=gen).to(torch.bfloat16).requires_grad_(),   # stochastic rounding
              torch.randn(5, generator=gen).requires_grad_()]                         # dense moment
    opt = cls(params, rank=1, oversampling=1, power_iters=1)
    start = [p.detach().clone() for p in params]
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    for _ in range(2):                                               # ADOPT's first step only sets v
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not torch.equal(params[0].detach(), start[0])             # the step did run


# ----------------------------------------------------------------------------------------------------
# Special inputs

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", [(1, 1), (1, 37), (37, 1)])
@pytest.mark.parametrize("rank,oversampling", [(1, 0), (3, 2)])
def test_vectors_are_reconstructed_exactly(m, n, rank, oversampling, dtype):
    A = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 100 + n), dtype=dtype)
    U, s, Vh = mlorc.rsvd(A, rank, oversampling, 1, torch.Generator().manual_seed(0))
    assert U.shape == (m, 1) and s.shape == (1,) and Vh.shape == (1, n)
    torch.testing.assert_close(mlorc.reconstruct(U, s, Vh), A, rtol=0, atol=tol(dtype, m, n) * frob(A))
    torch.testing.assert_close(s.double(), A.double().norm().reshape(1), rtol=tol(dtype, m, n), atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,rank,oversampling,power_iters", [
    (12, 9, 9, 0, 0),      # full rank: thin SVD
    (12, 9, 3, 0, 0),      # sketched, truncated
    (12, 9, 3, 2, 1),
    (40, 30, 5, 4, 2),
])
def test_huge_dynamic_range(m, n, rank, oversampling, power_iters, dtype):
    # rows scaled from 1e-20 to 1e20: entries span 40 decades (A A^T would overflow float32)
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-20, 20, m, dtype=torch.float64)
    A = (torch.randn(m, n, generator=gen, dtype=torch.float64) * scales[:, None]).to(dtype)
    U, s, Vh = mlorc.rsvd(A, rank, oversampling, power_iters, torch.Generator().manual_seed(1))
    R = mlorc.reconstruct(U, s, Vh)
    assert all(torch.isfinite(t).all() for t in (U, s, Vh, R))
    largest = A.double().abs().max().item()
    rel = (A.double() - R.double()).abs().max().item() / largest
    # the max-entry error is at most the Frobenius error, and the sketch of this fast-decaying
    # spectrum (about 10^(40/(m-1)) per singular value) is near optimal: allow 10x the Frobenius tail
    # plus roundoff relative to the largest entry (measured: at most 0.74 tail + 54 eps)
    tail = optimal_tail(A, min(rank, m, n)) / largest
    assert rel <= 10 * tail + tol(dtype, m, n) * math.sqrt(m * n)
    assert rel < 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank,oversampling,power_iters", [(2, 0, 0), (3, 1, 2), (20, 0, 0)])
def test_all_zero_matrix(rank, oversampling, power_iters, dtype):
    A = torch.zeros(16, 11, dtype=dtype)
    U, s, Vh = mlorc.rsvd(A, rank, oversampling, power_iters, torch.Generator().manual_seed(0))
    k = min(rank, 11)
    assert U.shape == (16, k) and s.shape == (k,) and Vh.shape == (k, 11)
    assert all(torch.isfinite(t).all() for t in (U, s, Vh))
    assert torch.equal(s, torch.zeros(k, dtype=dtype))
    assert torch.equal(mlorc.reconstruct(U, s, Vh), A)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank,oversampling,power_iters", [(3, 0, 0), (3, 2, 1), (5, 1, 0)])
def test_rank_deficient_matrix_is_recovered(rank, oversampling, power_iters, dtype):
    # exact rank 3, sketched with >= 3 columns: the sketch spans range(A) with probability 1
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(30, 3, generator=gen, dtype=dtype) @ torch.randn(3, 25, generator=gen, dtype=dtype)
    U, s, Vh = mlorc.rsvd(A, rank, oversampling, power_iters, torch.Generator().manual_seed(1))
    k = min(rank, 25)
    assert s.shape == (k,)
    # roundoff grows with cond(V_1^T Omega) when oversampling is 0; 10x covers it (worst of 50 seeds:
    # 0.15x the tolerance)
    torch.testing.assert_close(mlorc.reconstruct(U, s, Vh), A, rtol=0,
                               atol=10 * tol(dtype, 30, 25) * frob(A))
    assert (s[3:] <= tol(dtype, 30, 25) * frob(A)).all()
    torch.testing.assert_close(U.mT @ U, torch.eye(k, dtype=dtype), rtol=0, atol=tol(dtype, 30, 25))


# ----------------------------------------------------------------------------------------------------
# [M2] repair_second_moment

def test_repair_second_moment_hand_computed():
    # negatives -2 and -4: c = (|-2| + |-4|) / 2 = 3 replaces both; 1 and 0.5 are untouched
    v = torch.tensor([[1.0, -2.0], [0.5, -4.0]])
    torch.testing.assert_close(mlorc.repair_second_moment(v), torch.tensor([[1.0, 3.0], [0.5, 3.0]]),
                               rtol=0, atol=0)
    # one negative: c = 0.25; the zero is not negative and stays 0
    v = torch.tensor([[0.0, 2.0], [-0.25, 7.0]])
    torch.testing.assert_close(mlorc.repair_second_moment(v), torch.tensor([[0.0, 2.0], [0.25, 7.0]]),
                               rtol=0, atol=0)


@given(m=st.integers(1, 20), n=st.integers(1, 20), seed=st.integers(0, 2**31 - 1),
       shift=st.floats(-2, 2), dtype=st.sampled_from(DTYPES))
def test_repair_second_moment_properties(m, n, seed, shift, dtype):
    v = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype) + shift
    before = v.clone()
    out = mlorc.repair_second_moment(v)
    assert torch.equal(v, before)                                    # out of place
    negative = v < 0
    assert torch.equal(out[~negative], v[~negative])                 # non-negatives untouched
    assert (out >= 0).all()
    if negative.any():
        c = v[negative].abs().mean()
        torch.testing.assert_close(out[negative], c.expand(int(negative.sum())))
    else:
        assert torch.equal(out, v)


def test_repair_second_moment_all_zero_stays_zero():
    v = torch.zeros(3, 4)
    assert torch.equal(mlorc.repair_second_moment(v), v)
    assert torch.isfinite(mlorc.repair_second_moment(v)).all()
