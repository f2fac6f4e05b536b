"""Bad inputs and edge cases: non-finite, sparse and zero gradients, unusual shapes and dtypes.

A refused step must leave every parameter and every state tensor exactly as it was, so the checks
compare deep copies with torch.equal after a few good steps have created the state.
"""

import math

import pytest
import torch

import mlorc
from variants import ADAPTIVE, NAMES, assert_snapshot_equal, make_opt, snapshot


def make_params(shapes=((12, 10), (3, 4, 2, 2), (10,)), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for shape in shapes]


def set_grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        noise = torch.randn(p.shape, generator=gen)
        p.grad = (0.5 * p.detach().float() + 0.1 * noise).to(p.dtype)


def run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        set_grads(params, step)
        opt.step()


def all_finite(opt, params):
    tensors = list(params) + [v for p in params for v in opt.state.get(p, {}).values()
                              if torch.is_tensor(v)]
    return all(torch.isfinite(t).all() for t in tensors)


# ----------------------------------------------------------------------------------------------------
# Non-finite and sparse gradients

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("index", [0, 2])
def test_non_finite_grad_refused_by_step_with_nothing_changed(name, bad, index):
    params = make_params()
    opt = make_opt(name, params, rank=2)
    run(opt, params, 3)                            # state exists (ADOPT has made real updates)
    set_grads(params, 3)
    params[index].grad.view(-1)[5] = bad           # parameter 0 comes first: a late check would
    before = snapshot(opt, params)                 # already have stepped it when index == 2
    with pytest.raises(RuntimeError, match=rf"parameter {index} .*non-finite"):
        opt.step()
    assert_snapshot_equal(snapshot(opt, params), before)

    # the refusal left nothing behind: fixing the gradient resumes exactly the uninterrupted run
    set_grads(params, 3)
    opt.step()
    reference = make_params()
    opt_ref = make_opt(name, reference, rank=2)
    run(opt_ref, reference, 4)
    assert_snapshot_equal(snapshot(opt, params), snapshot(opt_ref, reference))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_grad_refused_by_step_param_with_nothing_changed(name, bad):
    params = make_params()
    opt = make_opt(name, params, rank=2)
    run(opt, params, 3)
    set_grads(params, 3)
    opt.step_param(params[0])
    params[1].grad.view(-1)[0] = bad
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"parameter 1 .*non-finite"):
        opt.step_param(params[1])
    assert_snapshot_equal(snapshot(opt, params), before)
    params[1].grad.view(-1)[0] = 0.0               # and the parameter can still be stepped after it
    opt.step_param(params[1])
    assert not torch.equal(params[1].detach(), before[0][1])


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradient_is_refused(name):
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Parameter(torch.ones(3))
    opt = make_opt(name, [dense, *embedding.parameters()])
    (embedding(torch.tensor([1, 3])).sum() + dense.sum()).backward()
    assert embedding.weight.grad.is_sparse
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match="parameter 1 has a sparse gradient"):
        opt.step()
    assert torch.equal(embedding.weight, before) and torch.equal(dense, torch.ones(3))
    assert len(opt.state) == 0


@pytest.mark.parametrize("name", NAMES)
def test_complex_parameter_rejected_at_construction(name):
    z = torch.zeros(3, 2, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="complex"):
        make_opt(name, [torch.zeros(2, requires_grad=True), z])


def test_rejected_param_group_is_not_added():
    opt = mlorc.MLorc_AdamW([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex64, requires_grad=True)]})
    with pytest.raises(ValueError, match="rank"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "rank": 0})
    assert len(opt.param_groups) == 1


# ----------------------------------------------------------------------------------------------------
# Zero gradients and missing gradients

@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_step_at_lr_zero_changes_no_parameter(name):
    # torch.distributed.checkpoint's get_state_dict initializes an empty optimizer state by one
    # step() with all-zero gradients and every group's lr set to 0, then restores lr.
    params = make_params()
    opt = make_opt(name, params, rank=2, weight_decay=0.1)
    start = [p.detach().clone() for p in params]
    lr = opt.param_groups[0]["lr"]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    opt.param_groups[0]["lr"] = lr
    # weight decay is scaled by lr, so lr = 0 leaves every parameter bitwise unchanged
    assert all(torch.equal(p, s) for p, s in zip(params, start))
    assert all_finite(opt, params)
    if name in ADAPTIVE:
        # lr = 0 freezes a Prodigy / D-Adapt group: d and k untouched (its state exists: see below)
        assert opt.param_groups[0]["d"] == opt.param_groups[0]["d0"] and opt.param_groups[0]["k"] == 0
    else:
        assert all(opt.state[p]["step"] == 1 for p in params)
        if name == "Adopt":                        # ADOPT's default decay is L2: g = 0 + wd p, v = g^2
            torch.testing.assert_close(opt.state[params[2]]["exp_avg_sq"], (0.1 * start[2]) ** 2)
        else:                                      # zero gradients leave a zero momentum (and
            for p in params:                       # a zero v, except CAME's g^2 + eps1 statistics)
                keys = ["exp_avg", "exp_avg_s"] + (["exp_avg_sq", "exp_avg_sq_s"] * (name == "AdamW"))
                moments = [opt.state[p][k] for k in keys if k in opt.state[p]]
                assert moments and all(not v.any() for v in moments)
    # training then proceeds normally from that state
    run(opt, params, 3)
    assert all_finite(opt, params)
    assert not torch.equal(params[0], start[0])


@pytest.mark.parametrize("name", ADAPTIVE)
def test_zero_grad_step_at_lr_zero_creates_adaptive_state(name):
    params = make_params()
    opt = make_opt(name, params, rank=2, lr=0.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(opt.state.get(p, {}).get("step") is not None for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_step_moves_only_by_weight_decay(name):
    params = make_params(shapes=((12, 10), (10,)))
    opt = make_opt(name, params, rank=2, weight_decay=0.1, **({"decouple": True}
                                                                if name in ("Adopt", "Prodigy") else {}))
    start = [p.detach().clone() for p in params]
    for _ in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all_finite(opt, params)
    # every direction is 0 for g = 0 (Adam 0 / eps, sign(0), CAME 0 * rsqrt), so only the decoupled
    # decay p *= 1 - lr_eff wd acts; lr_eff is lr, or d lr for Prodigy / D-Adapt (d stays d0 since
    # a zero gradient makes no progress)
    group = opt.param_groups[0]
    lr_eff = group["lr"] * group.get("d", 1.0)
    steps = 1 if name == "Adopt" else 2             # ADOPT's first step only initializes v
    for p, s in zip(params, start):
        expected = s.clone()
        for _ in range(steps):
            expected.mul_(1 - lr_eff * 0.1)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
        assert not torch.equal(p, s)
    if name in ADAPTIVE:
        assert group["d"] == group["d0"]


@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_grad_are_untouched_and_stateless(name):
    used, unused, frozen = make_params(shapes=((6, 5), (6, 5), (4,)))
    frozen.requires_grad_(False)
    opt = make_opt(name, [used, unused, frozen], rank=2, weight_decay=0.1)
    copies = unused.detach().clone(), frozen.clone()
    for step in range(3):
        set_grads([used], step)
        opt.step()
    assert torch.equal(unused, copies[0]) and torch.equal(frozen, copies[1])
    assert unused not in opt.state and frozen not in opt.state
    assert unused.grad is None and frozen.grad is None
    assert used in opt.state


# ----------------------------------------------------------------------------------------------------
# Shapes

@pytest.mark.parametrize("name", NAMES)
def test_scalar_and_vector_parameters_train(name):
    # loss = sum (p - 1)^2 over a 0-D and a 1-D parameter: both must move towards 1
    scalar = torch.tensor(3.0, requires_grad=True)
    vector = torch.full((5,), 3.0, requires_grad=True)
    opt = make_opt(name, [scalar, vector], weight_decay=0.0)
    for _ in range(5):
        opt.zero_grad()
        ((scalar - 1) ** 2 + ((vector - 1) ** 2).sum()).backward()
        opt.step()
    for p in (scalar, vector):
        assert torch.isfinite(p).all()
        assert (p < 3.0).all() and (p > 1.0).all()     # moved down, did not overshoot 1
        assert set(opt.state[p]) >= {"exp_avg"}        # dense moments, never factored
        assert opt.state[p]["exp_avg"].shape == p.shape


@pytest.mark.parametrize("name", NAMES)
def test_rank_larger_than_both_dims_matches_dense_moments(name, float64):
    # rank 100 on a 5 x 3 matrix: 3 components, held exactly (thin SVD), so the run equals the
    # rank=None run with dense moments up to float64 rounding
    runs = []
    for rank in (100, None):
        params = make_params(shapes=((5, 3),), dtype=torch.float64)
        opt = make_opt(name, params, rank=rank)
        run(opt, params, 10)
        runs.append((params[0], opt.state[params[0]]))
    (low, state), (dense, dense_state) = runs
    assert (state["exp_avg_U"].shape, state["exp_avg_s"].shape, state["exp_avg_Vh"].shape) == \
        ((5, 3), (3,), (3, 3))
    torch.testing.assert_close(mlorc.load_moment(state, "exp_avg", low.shape),
                               dense_state["exp_avg"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(low, dense, rtol=1e-10, atol=1e-12)
    assert not torch.equal(low, make_params(shapes=((5, 3),), dtype=torch.float64)[0])


@pytest.mark.parametrize("shape", [(1, 16), (16, 1)])
def test_single_row_or_column_at_rank_4_matches_torch_adamw(shape, float64):
    # mlorc-optim 0.1.8 kept r components of a min(m, n) = 1 matrix and its moments grew r-fold per
    # step; here k = min(r, m, n) = 1 and 50 steps equal torch.optim.AdamW
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=gen)
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    ref = torch.optim.AdamW([a], lr=1e-2)
    opt = mlorc.MLorc_AdamW([b], lr=1e-2, rank=4)
    for _ in range(50):
        g = torch.randn(shape, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    state = opt.state[b]
    assert state["exp_avg_s"].shape == (1,)
    for name in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(mlorc.load_moment(state, name, shape), ref.state[a][name],
                                   rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 16), (16, 1)])
def test_single_row_or_column_at_rank_4_matches_dense_moments(name, shape, float64):
    runs = []
    for rank in (4, None):
        params = make_params(shapes=(shape,), dtype=torch.float64)
        opt = make_opt(name, params, rank=rank)
        run(opt, params, 50)
        runs.append((params[0], opt.state[params[0]]))
    (low, state), (dense, dense_state) = runs
    assert state["exp_avg_s"].shape == (1,)
    torch.testing.assert_close(mlorc.load_moment(state, "exp_avg", shape), dense_state["exp_avg"],
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(low, dense, rtol=1e-9, atol=1e-12)
    assert low.abs().max() < 10                     # bounded: the pull towards 0 wins


# ----------------------------------------------------------------------------------------------------
# Dtypes

BF16_ULP_BELOW_1 = 2.0 ** -8         # spacing of bf16 in [0.5, 1): 8 significand bits


# variants whose update does not depend on p (weight decay 0) and stays below half of bf16's spacing
# at lr = 1e-3 for a constant gradient; CAME's confidence factor makes its step large, and Prodigy's
# d estimate reads p, so the bf16 and fp32 runs would not share one update sequence
@pytest.mark.parametrize("name", ["AdamW", "Lion", "Adopt"])
def test_bf16_stochastic_rounding_is_unbiased(name):
    # A 128 x 128 bf16 parameter at 1.0 with a constant gradient of 1 moves down by at most
    # lr = 1e-3 per step, a quarter of bf16's spacing h = 2^-8 below 1, so round to nearest never
    # leaves 1.0. Stochastic rounding adds, per element and step, an error e with E[e | past] = 0
    # and |e| <= h, so after T steps each element is the fp32 trajectory plus a martingale with
    # variance <= T h^2 / 4 (a Bernoulli variance is at most h^2 / 4). Elements draw independent
    # noise, so the mean over n elements is within 5 sd = 5 h sqrt(T / (4 n)) of the fp32 mean with
    # probability 1 - 6e-7 (the fp32 arithmetic of p - lr d adds ~1e-7, negligible). At T = 20,
    # n = 16384 the bound is 3.4e-4, against a movement of 1.1e-2 (ADOPT) to 2e-2 (Lion).
    steps, n = 20, 128 * 128
    finals = {}
    for dtype, rounding in ((torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)):
        p = torch.ones(128, 128, dtype=dtype, requires_grad=True)
        opt = make_opt(name, [p], lr=1e-3, weight_decay=0.0, rank=2, stochastic_rounding=rounding)
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
        finals[dtype, rounding] = p.detach().double()
    fp32 = finals[torch.float32, True]
    moved = 1.0 - fp32.mean().item()
    bound = 5 * BF16_ULP_BELOW_1 * math.sqrt(steps / (4 * n))
    assert moved > 10 * bound                       # the test can tell moving from not moving
    assert fp32.max() - fp32.min() < 1e-6            # every element follows the same fp32 path
    assert abs(finals[torch.bfloat16, True].mean().item() - fp32.mean().item()) < bound
    assert finals[torch.bfloat16, True].std() > 0    # individual elements were rounded both ways
    assert torch.equal(finals[torch.bfloat16, False], torch.ones(128, 128, dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_float16_parameters_train(name):
    params = make_params(dtype=torch.float16)
    opt = make_opt(name, params, rank=2)
    start = [p.detach().clone() for p in params]
    run(opt, params, 4)
    for p, s in zip(params, start):
        assert p.dtype == torch.float16 and torch.isfinite(p).all()
        assert not torch.equal(p, s)
        assert all(v.dtype == torch.float32 for v in opt.state[p].values() if torch.is_tensor(v))


@pytest.mark.parametrize("name", NAMES)
def test_float64_parameters_keep_float64_state(name):
    params = make_params(dtype=torch.float64)
    opt = make_opt(name, params, rank=2)
    run(opt, params, 3)
    for p in params:
        tensors = {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)}
        assert tensors and all(v.dtype == torch.float64 for v in tensors.values()), tensors.keys()
        assert p.dtype == torch.float64


# ----------------------------------------------------------------------------------------------------
# Closure

@pytest.mark.parametrize("name", NAMES)
def test_closure_called_once_and_loss_returned(name):
    params = make_params()
    opt = make_opt(name, params, rank=2)
    calls, losses = [], []

    def closure():
        calls.append(torch.is_grad_enabled())      # step() is no_grad; the closure must not be
        opt.zero_grad()
        loss = sum(((p - 1) ** 2).sum() for p in params)
        loss.backward()
        losses.append(loss)
        return loss

    for step in range(3):
        before = [p.detach().clone() for p in params]
        loss = opt.step(closure)
        assert calls == [True] * (step + 1)
        assert loss is losses[-1]                  # the closure's loss, evaluated before the update
        assert loss.item() == pytest.approx(sum(((b - 1) ** 2).sum() for b in before).item())
    assert not torch.equal(params[0].detach(), make_params()[0].detach())


# ----------------------------------------------------------------------------------------------------
# Steps that cannot be taken change nothing

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("path", ["step", "step_param"])
def test_an_empty_parameter_is_a_no_op_beside_others(name, path):
    # regression: a (0, 5) parameter raised ZeroDivisionError in step() after earlier batches had
    # already been stepped
    params = make_params(shapes=((6, 5), (0, 5), (4,)))
    alone = make_params(shapes=((6, 5), (4,)))
    opt, opt_alone = make_opt(name, params, rank=2), make_opt(name, alone, rank=2)
    for step in range(3):
        set_grads(params, step)
        set_grads(alone, step)
        if path == "step":
            opt.step()
        else:
            for p in params:
                opt.step_param(p)
            opt.end_step()
        opt_alone.step()
    for p, q in zip([params[0], params[2]], alone):
        assert torch.equal(p, q)
    assert params[1].shape == (0, 5) and params[1] not in opt.state


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("change", [(2, None), (None, 2)], ids=["factored to dense", "dense to factored"])
def test_switching_rank_to_or_from_none_is_refused_before_anything_changes(name, change):
    # regression: rank 2 -> None raised TypeError inside rsvd after other parameters had moved, and
    # None -> 2 was silently ignored (the moments stayed dense)
    before, after = change
    params = make_params()
    opt = make_opt(name, params, rank=before)
    run(opt, params, 2)
    opt.param_groups[0]["rank"] = after
    set_grads(params, 2)
    saved = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(12, 10\)\) holds .* rank is now"):
        opt.step()
    assert_snapshot_equal(snapshot(opt, params), saved)
    opt.param_groups[0]["rank"] = before                 # back as it was: the step runs
    opt.step()
    assert not torch.equal(params[0], saved[0][0])


@pytest.mark.parametrize("name", NAMES)
def test_changing_between_two_ranks_takes_effect(name):
    params = make_params()
    opt = make_opt(name, params, rank=2)
    run(opt, params, 2)
    opt.param_groups[0]["rank"] = 3
    run(opt, params, 1, start=2)
    assert opt.state[params[0]]["exp_avg_s"].shape == (3,)


# ----------------------------------------------------------------------------------------------------
# Gradients too large to square

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("huge", [1e20, 1e30])
def test_a_gradient_whose_square_overflows_is_refused_or_works(name, huge):
    """Variants that square g (all but the Lion family) refuse |g| >= sqrt(float32 max) = 1.8e19
    before anything changes, naming the parameter (the SVD of an inf moment used to fail with an
    error that named none, after earlier parameters had moved); the Lion family takes it."""
    params = make_params()
    opt = make_opt(name, params, rank=2)
    run(opt, params, 3)
    set_grads(params, 3)
    params[1].grad.view(-1)[7] = huge              # parameter 0 comes first: it must not move
    before = snapshot(opt, params)
    if opt.sign_based:
        opt.step()
        assert all_finite(opt, params)
        return
    with pytest.raises(RuntimeError, match=r"parameter 1 \(shape \(3, 4, 2, 2\)\) has gradient entries "
                                           r"up to 1e\+[23]0, whose squares overflow"):
        opt.step()
    assert_snapshot_equal(snapshot(opt, params), before)


@pytest.mark.parametrize("name", NAMES)
def test_large_gradients_below_the_limit_keep_everything_finite(name):
    params = make_params()
    opt = make_opt(name, params, rank=2)
    run(opt, params, 3)
    for p in params:
        p.grad = torch.full_like(p, 1e18)
    opt.step()
    assert all_finite(opt, params)


def test_each_gradient_is_held_to_its_own_dtype_limit_in_a_mixed_dtype_step():
    """The check stacks every gradient's extremes, promoted to the widest dtype, and compares each
    with its own limit: a float64 gradient of 1e30 (its square fits float64) is taken beside float32
    and bfloat16 ones, while a float32 gradient of 1e20 and a float64 one of 1e160 are refused."""
    dtypes = (torch.float32, torch.bfloat16, torch.float64)
    params = [torch.zeros(4, 3, dtype=dtype, requires_grad=True) for dtype in dtypes]
    opt = mlorc.MLorc_AdamW(params, lr=1e-3, rank=2)

    def set_grads(index=None, value=None):
        for p in params:
            p.grad = torch.ones_like(p)
        if index is not None:
            params[index].grad[0, 0] = value
    set_grads(2, 1e30)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    for index, value in [(0, 1e20), (2, 1e160)]:
        set_grads(index, value)
        before = [p.detach().clone() for p in params]
        with pytest.raises(RuntimeError, match=rf"parameter {index} \(shape \(4, 3\)\) has gradient "
                                               r"entries up to 1e\+[0-9]+, whose squares overflow"):
            opt.step()
        assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_came_state_saved_before_the_bounds_loads_and_steps():
    """CAME's exp_avg_bound_row/col are new: a state dict without them loads, and its next step
    bounds m~ by m~'s own row and column norms (no change beyond rounding), then keeps the bounds."""
    params = make_params()
    opt = make_opt("CAME", params, rank=2)
    run(opt, params, 3)
    saved = opt.state_dict()
    for entries in saved["state"].values():
        entries.pop("exp_avg_bound_row", None), entries.pop("exp_avg_bound_col", None)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = make_opt("CAME", resumed_params, rank=2)
    resumed.load_state_dict(saved)
    for entries in opt.state.values():                         # no bound at all, for comparison
        for key in ("exp_avg_bound_row", "exp_avg_bound_col"):
            if key in entries:
                entries[key] = torch.full_like(entries[key], math.inf)
    run(opt, params, 1, start=3)
    run(resumed, resumed_params, 1, start=3)
    for p, q in zip(params, resumed_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert "exp_avg_bound_row" in resumed.state[resumed_params[0]]
