"""Each MLorc optimizer against its uncompressed PyPI parent, run in lockstep (schedule_free style).

1. Full rank: with rank >= min(rows, cols) of every matrix (rows, cols) = (shape[0], numel / shape[0])
   the randomized SVD falls back to the exact thin SVD, so the factors hold each moment to rounding
   and MLorc_X must follow X step by step: parameters, reconstructed moments, and Prodigy's /
   D-Adaptation's d. Everything runs in float64 with gradients from a seeded generator, cloned into
   both optimizers. MLorc_Prodigy's two documented deviations (the eps term, and betas[0] = 0) are
   checked against their exact one-step formulas.
2. Low rank, exact subspace: when every gradient lies in one fixed rank-k subspace, the moments of
   some rules stay inside a fixed low-rank subspace too, and the *sketched* rsvd path (rank +
   oversampling < min(m, n)) still keeps them exactly. A negative control with a generic gradient
   shows that the comparison can fail.

Tolerances. u = 2^-53 is float64's unit roundoff. All shapes here are at most 12 x 12 (full rank)
or 24 x 24 (low rank). Each tolerance is derived in a comment next to its constant below.
"""

import contextlib
import io
import math

import pytest
import torch
from adopt import ADOPT
from came_pytorch import CAME
from dadaptation import DAdaptLion
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from lion_pytorch import Lion
from prodigyopt import Prodigy

import mlorc

# adopt.ADOPT calls two deprecated torch helpers on every step.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch._utils.is_compiling` is deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:Use _accelerator_graph_capture_health_check:DeprecationWarning"),
]

# torch-adopt 0.1.0 calls Optimizer._cuda_graph_capture_health_check, which some torch releases lack.
adopt_runs = pytest.mark.skipif(not hasattr(torch.optim.Optimizer, "_cuda_graph_capture_health_check"),
                                reason="torch-adopt 0.1.0 does not run on this torch release")

F64 = torch.float64
U = 2.0 ** -53                                   # unit roundoff of float64
FULL_RANK = 64                                   # >= min(rows, cols) of every shape drawn below

# The float64 and device fixtures are function-scoped, and they are the same for every example.
SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fewer(n):
    """SETTINGS with at most n examples, for the slower tests (24 x 24 sketches, or Prodigy)."""
    return settings(SETTINGS, max_examples=min(n, SETTINGS.max_examples))

# Full-rank tolerances (float64, u = 2^-53; every full-rank shape is at most 12 x 12 as a matrix).
#
# MOMENT_ULPS. The exact thin SVD is backward stable: U diag(s) Vh = M + E with ||E||_2 <= c u ||M||_2
# (c a modest multiple of the size), and rebuilding (U * s) @ Vh adds k <= 12 roundings per entry.
# With ||M||_2 <= sqrt(rows cols) max|M| <= 12 max|M| each entry is off by ~(c + 12) 12 u max|M|,
# a few hundred u max|M| per step; the EMA carries earlier steps' errors with weights b^j <= 1:
# |M_t - M_ref,t| <= 1e3 u sum_{s <= t} max|M_ref,s| (see Scales).
MOMENT_ULPS = 1e3
# PARAM_ULPS. The gradients keep 0.5 <= |g| <= 1.5, so every entry of v is within a factor ~9 of its
# largest and a direction entry (m / sqrt(v), g / sqrt(v), CAME's u) moves by at most ~10 times the
# moments' relative error: each step's direction is off by <= ~1e4 u relative to that step's
# largest entry |step_t| (measured on the reference's own update). Momentum carries the error over
# at most T steps, and the parameter sums the steps: |p - p_ref| <= 1e4 u T sum_t |step_t|.
PARAM_ULPS = 1e4
# P_ULPS. Applying a step rounds p (a multiply and an add, in a different order in each library):
# at most 2 ulps of |p| on each side per step, summed over the steps.
P_ULPS = 4
# D_ULPS. Prodigy's / D-Adaptation's d is a ratio of two sums over all entries whose terms share a
# sign pattern (the drifting gradients below), computed from the same inputs up to the errors
# above: an error of a few hundred u per step relative to its size, carried over the steps (Scales).
D_ULPS = 1e3


@contextlib.contextmanager
def quiet():
    """prodigyopt.Prodigy prints a line when decoupled weight decay is on; tests print nothing."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ----------------------------------------------------------------------------------------------------
# Strategies

@st.composite
def param_shape(draw):
    """One parameter shape: a vector, a tall / wide / square matrix, a 1 x n or n x 1 matrix, or a
    4-D conv filter (compressed as (out, in * kh * kw))."""
    kind = draw(st.sampled_from(["vector", "tall", "wide", "square", "row", "column", "conv"]))
    small, large = st.integers(1, 5), st.integers(6, 12)
    if kind == "vector":
        return (draw(st.integers(1, 12)),)
    if kind == "tall":
        return (draw(large), draw(small))
    if kind == "wide":
        return (draw(small), draw(large))
    if kind == "square":
        n = draw(st.integers(2, 8))
        return (n, n)
    if kind == "row":
        return (1, draw(st.integers(2, 12)))
    if kind == "column":
        return (draw(st.integers(2, 12)), 1)
    out, fan_in, kernel = draw(st.integers(1, 6)), draw(st.integers(1, 3)), st.integers(1, 2)
    return (out, fan_in, draw(kernel), draw(kernel))


shapes_st = st.lists(param_shape(), min_size=1, max_size=3).map(tuple)
seed_st = st.integers(0, 2**32 - 1)
steps_st = st.integers(20, 25)
beta_st = st.floats(0.5, 0.99)
beta2_st = st.floats(0.9, 0.999)
wd_st = st.sampled_from([0.0, 0.01, 0.1, 0.5])
# (decouple, weight_decay) for ADOPT and Prodigy. Coupled (L2) decay feeds g + wd p into the moments,
# so wd is kept at 0.01 there: with |p| <= ~20 over these runs, |g + wd p| >= 0.3 stays away from 0.
decay_st = st.one_of(st.tuples(st.just(True), wd_st), st.tuples(st.just(False), st.sampled_from([0.0, 0.01])))


def bounded_grads(persistence=0.75):
    """A gradient function for run_lockstep: entries with 0.5 <= |g| <= 1.5, far from zero, so
    rounding cannot flip the sign of a Lion update and every g * g is within a factor 9 of the
    largest. Each entry keeps a fixed sign with probability `persistence` (else flips), so the
    gradients drift consistently and Prodigy's / D-Adaptation's d actually grows."""
    patterns = []

    def grads(shapes, gen):
        if not patterns:
            patterns.extend(torch.randint(0, 2, shape, generator=gen, dtype=F64) * 2 - 1 for shape in shapes)
        out = []
        for shape, pattern in zip(shapes, patterns):
            keep = torch.rand(shape, generator=gen, dtype=F64) < persistence
            sign = torch.where(keep, pattern, -pattern)
            out.append(sign * (0.5 + torch.rand(shape, generator=gen, dtype=F64)))
        return out
    return grads


# ----------------------------------------------------------------------------------------------------
# Lockstep driver

def dense_moment(state, name, shape):
    """The dense moment `name` of an MLorc state: reconstructed from its factors for matrices."""
    if name in state:
        return state[name]
    return mlorc.reconstruct(state[name + "_U"], state[name + "_s"], state[name + "_Vh"]).view(shape)


class Scales(dict):
    """Running sums over the steps so far of the reference's largest |entry|, one per compared
    quantity. An EMA carries each step's rounding error into later steps with weights <= 1, and
    that error is relative to the size the quantity had then (which may be larger than now, when
    the EMA cancels), so tolerances scale with this sum rather than with the current size."""

    def add(self, key, tensor_or_float):
        self[key] = self.get(key, 0.0) + float(torch.as_tensor(tensor_or_float).abs().max())
        return self[key]


def assert_state(ours, theirs, key, scales, ulps, what):
    """One dense state tensor of MLorc against the reference's, within ulps u (running scale)."""
    atol = ulps * U * scales.add(key, theirs)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_moments(opt, ref, ours, theirs, names, t, scales, ulps=MOMENT_ULPS):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        for name in names:
            assert_state(dense_moment(opt.state[a], name, a.shape), ref.state[b][name], (i, name), scales,
                         ulps, f"param {i} {name}, step {t}")


def moments_check(*names):
    """A `check` for run_lockstep that compares the reconstructed moments `names`."""
    return lambda opt, ref, ours, theirs, t, scales: assert_moments(opt, ref, ours, theirs, names, t, scales)


def assert_group_scalars(opt, ref, keys, t, scales):
    for key in keys:
        ours, theirs = float(opt.param_groups[0][key]), float(ref.param_groups[0][key])
        tol = D_ULPS * U * scales.add(key, theirs)
        assert abs(ours - theirs) <= tol, (key, t, ours, theirs)


def run_lockstep(shapes, seed, steps, make_ours, make_ref, device, *, grads=None, init_scale=1.0,
                 param_ulps=PARAM_ULPS, check=None):
    """Run MLorc and the reference side by side on the same weights and gradients; compare the
    parameters after every step (and whatever `check` compares). Returns both optimizers."""
    grads = bounded_grads() if grads is None else grads
    gen = torch.Generator().manual_seed(seed)
    start = [init_scale * torch.randn(shape, generator=gen, dtype=F64) for shape in shapes]
    ours = [w.clone().to(device).requires_grad_() for w in start]
    theirs = [w.clone().to(device).requires_grad_() for w in start]
    with quiet():
        opt, ref = make_ours(ours), make_ref(theirs)
    step_sizes = rounding = 0.0
    scales = Scales()
    for t in range(1, steps + 1):
        for a, b, g in zip(ours, theirs, grads(shapes, gen)):
            a.grad, b.grad = g.to(device), g.to(device).clone()
        before = [b.detach().clone() for b in theirs]
        opt.step()
        ref.step()
        step_sizes += max((b.detach() - w).abs().max().item() for b, w in zip(theirs, before))
        rounding += P_ULPS * U * max(b.detach().abs().max().item() for b in theirs)
        atol = param_ulps * U * t * step_sizes + rounding
        for i, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=atol,
                                       msg=lambda m: f"param {i} {tuple(a.shape)}, step {t}: {m}")
        if check is not None:
            check(opt, ref, ours, theirs, t, scales)
    assert step_sizes > 0, "the reference never moved: the comparison would be vacuous"
    return opt, ref


# ----------------------------------------------------------------------------------------------------
# 1. Full rank: exact against the parent, step by step

@SETTINGS
@given(shapes=shapes_st, seed=seed_st, steps=steps_st, b1=st.floats(0.0, 0.99), b2=beta2_st,
       wd=wd_st, lr=st.floats(1e-3, 1e-1), maximize=st.booleans())
def test_adamw_full_rank_matches_torch_adamw(float64, device, shapes, seed, steps, b1, b2, wd, lr,
                                             maximize):
    kw = dict(lr=lr, betas=(b1, b2), weight_decay=wd, maximize=maximize)
    run_lockstep(shapes, seed, steps,
                 lambda ps: mlorc.MLorc_AdamW(ps, rank=FULL_RANK, oversampling=0, **kw),
                 lambda ps: torch.optim.AdamW(ps, **kw), device,
                 check=moments_check("exp_avg", "exp_avg_sq"))


@SETTINGS
@given(shapes=shapes_st, seed=seed_st, steps=steps_st, b1=beta_st, b2=beta_st, wd=wd_st,
       lr=st.floats(1e-3, 1e-1))
def test_lion_full_rank_matches_lion_pytorch(float64, device, shapes, seed, steps, b1, b2, wd, lr):
    kw = dict(lr=lr, betas=(b1, b2), weight_decay=wd)
    # The sign is exact (|b1 m + (1 - b1) g| is ~1e-15 from zero with probability ~1e-15 per entry),
    # so only the momentum's reconstruction error remains: the parameters use the same float ops.
    run_lockstep(shapes, seed, steps,
                 lambda ps: mlorc.MLorc_Lion(ps, rank=FULL_RANK, oversampling=0, **kw),
                 lambda ps: Lion(ps, **kw), device,
                 check=moments_check("exp_avg"))


def prodigy_check(opt, ref, ours, theirs, t, scales):
    assert_moments(opt, ref, ours, theirs, ("exp_avg", "exp_avg_sq"), t, scales)
    for i, (a, b) in enumerate(zip(ours, theirs)):  # s and p0 are dense, sub-sampled every slice_p
        for key in ("s", "p0"):                     # s sums g (d / d0) dlr: d's error, twice
            assert_state(opt.state[a][key], ref.state[b][key], (i, key), scales, 2 * D_ULPS,
                         f"param {i} {key}, step {t}")
    assert_group_scalars(opt, ref, ("d", "d_max", "d_numerator"), t, scales)
    assert opt.param_groups[0]["k"] == ref.param_groups[0]["k"] == t


# Prodigy's d estimate uses g . (p0 - p). Its first steps are ~d0 = 1e-6, so from weights of size 1
# p0 - p would cancel ~6 digits and amplify the parameters' allowed rounding (ulps of |p|) by
# |p| / |p0 - p| ~ 1e6 in d. Weights that start at the size of d0 keep |p| ~ |p0 - p| (the drifting
# gradients move p steadily away from p0), so d is as well-conditioned as the rest.
PRODIGY_INIT = 1e-6
# Prodigy's |m| / sqrt(v) is bounded by (1 - b1) / sqrt((1 - b2)(1 - b1^2 / b2)) only when
# b1^2 < b2 (Cauchy-Schwarz over the EMA weights); these ranges keep it there.
prodigy_b1_st, prodigy_b2_st = st.floats(0.5, 0.9), st.floats(0.95, 0.999)


@SETTINGS
@given(shapes=shapes_st, seed=seed_st, steps=steps_st, b1=prodigy_b1_st, b2=prodigy_b2_st,
       decay=decay_st, lr=st.floats(0.1, 1.0), slice_p=st.sampled_from([1, 3]),
       use_bias_correction=st.booleans(), safeguard_warmup=st.booleans(),
       beta3=st.sampled_from([None, 0.9]), d_coef=st.sampled_from([0.5, 1.0, 2.0]),
       growth_rate=st.sampled_from([math.inf, 1.02]))
def test_prodigy_full_rank_matches_prodigyopt(float64, device, shapes, seed, steps, b1, b2, decay, lr,
                                              slice_p, use_bias_correction, safeguard_warmup, beta3,
                                              d_coef, growth_rate):
    # Documented deviation: MLorc's step is one pass, so its eps term is eps * d with the d of the
    # start of the step, where prodigyopt uses the d it has just estimated. With eps = 1e-30 (the
    # smallest prodigyopt accepts is > 0) the term is eps * d <= 1e-30 (d stays far below 1e6 in
    # 25 steps) against sqrt(v) >= sqrt(1 - b2) * d0 * min|g| ~ 1e-8: a relative effect of 1e-22,
    # far below rounding. test_prodigy_default_eps_deviation covers eps = 1e-8.
    decouple, wd = decay
    kw = dict(lr=lr, betas=(b1, b2), eps=1e-30, weight_decay=wd, decouple=decouple,
              use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup,
              slice_p=slice_p, beta3=beta3, d_coef=d_coef, growth_rate=growth_rate)
    run_lockstep(shapes, seed, steps,
                 lambda ps: mlorc.MLorc_Prodigy(ps, rank=FULL_RANK, oversampling=0, **kw),
                 lambda ps: Prodigy(ps, **kw), device, init_scale=PRODIGY_INIT, check=prodigy_check)


def prodigy_synced_steps(shapes, seed, steps, kw, device):
    """MLorc_Prodigy and prodigyopt.Prodigy from the same state at every step: after each step the
    MLorc parameters are reset to the reference's, so g, p and hence d, m, v stay identical and only
    the one-step deviation remains. Yields (d_old, d_new, [(p_mlorc, p_ref, p_before, ref_state)])
    after each step, before the reset."""
    grads, gen = bounded_grads(), torch.Generator().manual_seed(seed)
    start = [PRODIGY_INIT * torch.randn(shape, generator=gen, dtype=F64) for shape in shapes]
    ours = [w.clone().to(device).requires_grad_() for w in start]
    theirs = [w.clone().to(device).requires_grad_() for w in start]
    with quiet():
        opt = mlorc.MLorc_Prodigy(ours, rank=FULL_RANK, oversampling=0, **kw)
        ref = Prodigy(theirs, **kw)
    for t in range(1, steps + 1):
        for a, b, g in zip(ours, theirs, grads(shapes, gen)):
            a.grad, b.grad = g.to(device), g.to(device).clone()
        d_old = ref.param_groups[0]["d"]
        before = [b.detach().clone() for b in theirs]
        opt.step()
        ref.step()
        d_new = ref.param_groups[0]["d"]
        assert math.isclose(opt.param_groups[0]["d"], d_new, rel_tol=D_ULPS * U * t)  # d only grows
        yield d_old, d_new, [(a.detach(), b.detach(), w, ref.state[b])
                             for a, b, w in zip(ours, theirs, before)]
        with torch.no_grad():
            for a, b in zip(ours, theirs):
                a.copy_(b)


@fewer(10)
@given(shapes=shapes_st, seed=seed_st, b1=prodigy_b1_st, b2=prodigy_b2_st, wd=wd_st,
       slice_p=st.sampled_from([1, 3]))
def test_prodigy_default_eps_deviation(float64, device, shapes, seed, b1, b2, wd, slice_p):
    """With the default eps = 1e-8, MLorc_Prodigy deviates from prodigyopt by exactly its documented
    O(eps) term. From the same state, the two updates differ only in the eps term of the denominator:
        MLorc:      p <- p (1 - wd dlr) - dlr m / (sqrt(v) + d_old eps)
        prodigyopt: p <- p (1 - wd dlr) - dlr m / (sqrt(v) + d_new eps)
    so  p_mlorc - p_ref = dlr m eps (d_old - d_new) / ((sqrt(v) + d_old eps)(sqrt(v) + d_new eps)),
    and |p_mlorc - p_ref| <= dlr |m| eps |d_new - d_old| / v, an O(eps) bound. The test checks the
    difference against that formula and the bound, to the rounding of one step (PARAM_ULPS u |step|
    for the direction, P_ULPS u |p| for applying it)."""
    eps, lr = 1e-8, 1.0
    kw = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, slice_p=slice_p)
    visible = False
    for d_old, d_new, params in prodigy_synced_steps(shapes, seed, 20, kw, device):
        dlr = d_old * lr
        for a, b, w, state in params:
            m, v = state["exp_avg"], state["exp_avg_sq"]
            sqrt_v = v.sqrt()
            predicted = dlr * m * eps * (d_old - d_new) / ((sqrt_v + d_old * eps) * (sqrt_v + d_new * eps))
            bound = dlr * m.abs() * eps * abs(d_new - d_old) / v
            rounding = U * (PARAM_ULPS * (b - w).abs().max().item() + P_ULPS * w.abs().max().item())
            deviation = a - b
            torch.testing.assert_close(deviation, predicted, rtol=0, atol=rounding)
            assert (deviation.abs() <= bound + rounding).all()
            visible |= bool((predicted.abs() > 2 * rounding).any())
    # Where the predicted deviation is above rounding, the first check catches MLorc using d_new (no
    # deviation) or another eps term. That takes a step in which d grows; an example where it never
    # does (a lone entry whose gradients do not line up, say) tests nothing and is set aside.
    assume(visible)


@fewer(10)
@given(shapes=shapes_st, seed=seed_st, b2=prodigy_b2_st, slice_p=st.sampled_from([1, 3]))
def test_prodigy_beta1_zero_deviation(float64, device, shapes, seed, b2, slice_p):
    """Documented deviation at betas[0] = 0: prodigyopt's b1 = 0 branch steps by
    dlr d_new g / (sqrt(v) + d_new eps), with the d it has just estimated, while MLorc_Prodigy keeps
    m = d_old (1 - b1) g (the b1 -> 0 limit of prodigyopt's b1 > 0 rule). With eps = 1e-30 (see the
    full-rank test) and no weight decay, from the same state the reference's step is exactly
    d_new / d_old times MLorc's, to the rounding of one step."""
    kw = dict(lr=1.0, betas=(0.0, b2), eps=1e-30, slice_p=slice_p)
    largest_ratio = 1.0
    for d_old, d_new, params in prodigy_synced_steps(shapes, seed, 20, kw, device):
        for a, b, w, _ in params:
            rounding = U * (PARAM_ULPS * (b - w).abs().max().item()
                            + P_ULPS * (1 + d_new / d_old) * w.abs().max().item())
            torch.testing.assert_close(b - w, (d_new / d_old) * (a - w), rtol=0, atol=rounding)
        largest_ratio = max(largest_ratio, d_new / d_old)
    # the two rules differ only where d grows: an example where it did not (one entry, say) tells
    # them apart no more than it shows them equal, so hypothesis must find others
    assume(largest_ratio > 1.5)


@SETTINGS
@given(shapes=shapes_st, seed=seed_st, steps=steps_st, b1=beta_st, b2=beta_st, wd=wd_st,
       lr=st.floats(0.1, 1.0))
def test_dadapt_lion_full_rank_matches_dadaptation(float64, device, shapes, seed, steps, b1, b2, wd,
                                                   lr):
    kw = dict(lr=lr, betas=(b1, b2), weight_decay=wd)

    def check(opt, ref, ours, theirs, t, scales):
        assert_moments(opt, ref, ours, theirs, ("exp_avg",), t, scales)
        for i, (a, b) in enumerate(zip(ours, theirs)):  # slice_p = 1: dadaptation's whole s
            assert_state(opt.state[a]["s"], ref.state[b]["s"].reshape(-1), (i, "s"), scales, 2 * D_ULPS,
                         f"param {i} s, step {t}")
        assert_group_scalars(opt, ref, ("d", "numerator_weighted"), t, scales)

    run_lockstep(shapes, seed, steps,
                 lambda ps: mlorc.MLorc_DAdapt_Lion(ps, rank=FULL_RANK, oversampling=0, slice_p=1, **kw),
                 lambda ps: DAdaptLion(ps, **kw), device, check=check)


@adopt_runs
@SETTINGS
@given(shapes=shapes_st, seed=seed_st, steps=steps_st, b1=beta_st, b2=beta2_st, decay=decay_st,
       lr=st.floats(1e-3, 1e-1), clip=st.booleans(), maximize=st.booleans())
def test_adopt_full_rank_matches_adopt(float64, device, shapes, seed, steps, b1, b2, decay, lr, clip,
                                       maximize):
    # clip_exponent=0.25 is ADOPT's default clip_lambda = step ** 0.25; None turns clipping off.
    decouple, wd = decay
    kw = dict(lr=lr, betas=(b1, b2), weight_decay=wd, decouple=decouple, maximize=maximize)
    ours_clip = dict(clip_exponent=0.25 if clip else None)
    ref_clip = {} if clip else dict(clip_lambda=None)
    run_lockstep(shapes, seed, steps,
                 lambda ps: mlorc.MLorc_Adopt(ps, rank=FULL_RANK, oversampling=0, **kw, **ours_clip),
                 lambda ps: ADOPT(ps, **kw, **ref_clip), device,
                 check=moments_check("exp_avg", "exp_avg_sq"))


@SETTINGS
@given(shapes=shapes_st, seed=seed_st, steps=steps_st, b1=beta_st, b2=beta2_st,
       b3=st.floats(0.99, 0.9999), wd=wd_st, lr=st.floats(1e-3, 1e-1),
       clip_threshold=st.sampled_from([0.5, 1.0, 2.0]))
def test_came_full_rank_matches_came_pytorch(float64, device, shapes, seed, steps, b1, b2, b3, wd,
                                             lr, clip_threshold):
    kw = dict(lr=lr, betas=(b1, b2, b3), weight_decay=wd, clip_threshold=clip_threshold)

    def check(opt, ref, ours, theirs, t, scales):
        assert_moments(opt, ref, ours, theirs, ("exp_avg",), t, scales)
        for a, b in zip(ours, theirs):             # CAME's own statistics are never compressed
            for key, expected in ref.state[b].items():
                if key.startswith("exp_avg_") and torch.is_tensor(expected):
                    torch.testing.assert_close(opt.state[a][key], expected, rtol=MOMENT_ULPS * U * t,
                                               atol=0)

    run_lockstep(shapes, seed, steps,
                 lambda ps: mlorc.MLorc_CAME(ps, rank=FULL_RANK, oversampling=0, **kw),
                 lambda ps: CAME(ps, **kw), device, check=check)


# ----------------------------------------------------------------------------------------------------
# 2. Low rank, exact subspace
#
# G_t = U0 C_t V0^T with U0 (m, k), V0 (n, k) fixed and C_t (k, k) random. Then
#   - any EMA of scalar multiples of G_t (Lion's, AdamW's, Prodigy's and D-Adapt Lion's m) lies in
#     span(U0) x span(V0): rank <= k;
#   - any EMA of scalar multiples of G_t * G_t (AdamW's and Prodigy's v) has entries
#     sum_ab (U0 C)_ia (U0 C)_ib V0_ja V0_jb, whose columns lie in span{U0_a * U0_b : a <= b}:
#     rank <= k (k + 1) / 2, in a fixed subspace.
# A rank-r sketch of a matrix of rank <= r keeps it exactly (Y = A Omega spans its column space,
# so Q Q^T A = A), so with r >= that rank the compressed moments are exact on the sketched path too.
#   - ADOPT's m is an EMA of g / sqrt(v), an elementwise quotient, which is not low rank for k >= 2
#     (checked by hand: at k = 2 the run leaves the reference by ~1e-4 at step 3 even at rank 6), so
#     ADOPT is not tested at k >= 2. At k = 1, with G_t = c_t x y^T (x, y the single columns of U0,
#     V0), v = (x * x)(y * y)^T S_t with S_t a scalar, so g / sqrt(v) = sign(x) sign(y)^T c_t /
#     sqrt(S_t): rank 1 in a fixed subspace (the +-clip and the eps floor keep that form while
#     sqrt(v) > eps, which bounded_factor ensures). ADOPT holds at k = 1.
#   - CAME's u = g * (r c^T) with row and column factors that change every step: rank k, but its
#     subspace moves with r_t, c_t, so m is not low rank for k >= 2 (also checked by hand). At k = 1
#     the row statistic is proportional to x * x and the column one to y * y, so u = scalar_t *
#     sign(x) sign(y)^T: rank 1, fixed. CAME holds at k = 1 (up to eps1 = 1e-30 in its statistics,
#     ~1e-28 relative).
#
# Tolerance: the sketch sees the rounded moment A + E, |E| ~ u ||A||. Q's span then misses range(A)
# by an angle up to ~u ||A|| / sigma_j(A) along its j-th singular direction, which loses only
# ~u ||A|| of A there, so the kept moment is off by ~c u ||A|| as for the exact SVD, with a larger c
# (one more QR and two more products, power iterations) and sizes up to 24 x 24 (sqrt(rows cols)
# <= 24 instead of 12): 10 x the full-rank tolerances.
LOW_RANK_ULPS = 10 * PARAM_ULPS
LOW_RANK_MOMENT_ULPS = 10 * MOMENT_ULPS

subspace_st = st.fixed_dictionaries(dict(
    m=st.integers(12, 24), n=st.integers(12, 24), oversampling=st.integers(0, 4),
    power_iters=st.integers(0, 2), extra=st.integers(0, 1), seed=seed_st, steps=steps_st))


def bounded_factor(rows, k, gen):
    """A (rows, k) factor whose entries are 0.5..1.5 in size with random signs, columns unit-norm:
    no row of U0 is near zero, so no entry of v is tiny next to the largest (that would make its
    exact-rounding error matter in m / sqrt(v))."""
    sign = torch.randint(0, 2, (rows, k), generator=gen, dtype=F64) * 2 - 1
    factor = sign * (0.5 + torch.rand(rows, k, generator=gen, dtype=F64))
    return factor / factor.norm(dim=0)


def subspace_grads(shapes, k, gen):
    """A gradient function for run_lockstep: G_t = U0 C_t V0^T with U0, V0 fixed per parameter."""
    bases = [(bounded_factor(m, k, gen), bounded_factor(n, k, gen)) for m, n in shapes]

    def grads(shapes, gen):
        return [U0 @ torch.randn(k, k, generator=gen, dtype=F64) @ V0.T for U0, V0 in bases]
    return grads


def run_subspace(draw, k, moment_rank, make_ours, make_ref, device, moments, scalars=(), **kw):
    """Lockstep on two matrices whose gradients lie in fixed rank-k subspaces, with a rank that
    uses the sketched rsvd path (rank + oversampling < min(m, n)); compares the parameters, the
    reconstructed `moments` and the group `scalars` after every step."""
    rank = moment_rank + draw["extra"]
    assert rank + draw["oversampling"] < min(draw["m"], draw["n"])   # the sketched path runs
    shapes = ((draw["m"], draw["n"]), (draw["n"], draw["m"]))
    options = dict(rank=rank, oversampling=draw["oversampling"], power_iters=draw["power_iters"])
    bases_gen = torch.Generator().manual_seed(draw["seed"] + 1)

    def check(opt, ref, ours, theirs, t, scales):
        assert_moments(opt, ref, ours, theirs, moments, t, scales, ulps=LOW_RANK_MOMENT_ULPS)
        assert_group_scalars(opt, ref, scalars, t, scales)

    return run_lockstep(shapes, draw["seed"], draw["steps"], lambda ps: make_ours(ps, options),
                        lambda ps: make_ref(ps), device, grads=subspace_grads(shapes, k, bases_gen),
                        param_ulps=LOW_RANK_ULPS, check=check, **kw)


@fewer(15)
@given(draw=subspace_st, k=st.integers(1, 3), b1=beta_st, b2=beta_st, wd=wd_st)
def test_lion_low_rank_exact_subspace(float64, device, draw, k, b1, b2, wd):
    kw = dict(lr=1e-2, betas=(b1, b2), weight_decay=wd)
    run_subspace(draw, k, k, lambda ps, o: mlorc.MLorc_Lion(ps, **kw, **o), lambda ps: Lion(ps, **kw),
                 device, moments=("exp_avg",))


@fewer(15)
@given(draw=subspace_st, k=st.integers(1, 2), b1=beta_st, b2=beta2_st, wd=wd_st)
def test_adamw_low_rank_exact_subspace(float64, device, draw, k, b1, b2, wd):
    kw = dict(lr=1e-2, betas=(b1, b2), weight_decay=wd)
    run_subspace(draw, k, k * (k + 1) // 2, lambda ps, o: mlorc.MLorc_AdamW(ps, **kw, **o),
                 lambda ps: torch.optim.AdamW(ps, **kw), device, moments=("exp_avg", "exp_avg_sq"))


@fewer(10)
@given(draw=subspace_st, k=st.integers(1, 2), b1=prodigy_b1_st, b2=prodigy_b2_st)
def test_prodigy_low_rank_exact_subspace(float64, device, draw, k, b1, b2):
    kw = dict(lr=1.0, betas=(b1, b2), eps=1e-30, slice_p=1)      # eps: see the full-rank test
    run_subspace(draw, k, k * (k + 1) // 2, lambda ps, o: mlorc.MLorc_Prodigy(ps, **kw, **o),
                 lambda ps: Prodigy(ps, **kw), device, moments=("exp_avg", "exp_avg_sq"),
                 scalars=("d", "d_max"), init_scale=PRODIGY_INIT)


@fewer(10)
@given(draw=subspace_st, k=st.integers(1, 3), b1=beta_st, b2=beta_st)
def test_dadapt_lion_low_rank_exact_subspace(float64, device, draw, k, b1, b2):
    kw = dict(lr=1.0, betas=(b1, b2))
    run_subspace(draw, k, k, lambda ps, o: mlorc.MLorc_DAdapt_Lion(ps, slice_p=1, **kw, **o),
                 lambda ps: DAdaptLion(ps, **kw), device, moments=("exp_avg",),
                 scalars=("d", "numerator_weighted"))


@adopt_runs
@fewer(10)
@given(draw=subspace_st, b1=beta_st, b2=beta2_st)
def test_adopt_low_rank_exact_subspace_rank_one(float64, device, draw, b1, b2):
    kw = dict(lr=1e-2, betas=(b1, b2))
    run_subspace(draw, 1, 1, lambda ps, o: mlorc.MLorc_Adopt(ps, **kw, **o), lambda ps: ADOPT(ps, **kw),
                 device, moments=("exp_avg", "exp_avg_sq"))


@fewer(10)
@given(draw=subspace_st, b1=beta_st, b2=beta2_st)
def test_came_low_rank_exact_subspace_rank_one(float64, device, draw, b1, b2):
    kw = dict(lr=1e-2, betas=(b1, b2, 0.999))
    run_subspace(draw, 1, 1, lambda ps, o: mlorc.MLorc_CAME(ps, **kw, **o), lambda ps: CAME(ps, **kw),
                 device, moments=("exp_avg",))


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_low_rank_generic_gradient_differs(float64, device, name):
    """Negative control: a generic (full-rank) gradient at rank 2 of a 16 x 16 matrix loses most of
    the moment, so the run leaves the reference by far more than the low-rank tolerance."""
    make = {"adamw": (lambda ps: mlorc.MLorc_AdamW(ps, lr=1e-2, rank=2),
                      lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
            "lion": (lambda ps: mlorc.MLorc_Lion(ps, lr=1e-2, rank=2),
                     lambda ps: Lion(ps, lr=1e-2))}[name]
    with pytest.raises(AssertionError, match="param 0"):
        run_lockstep(((16, 16),), 0, 20, *make, device, param_ulps=LOW_RANK_ULPS)
