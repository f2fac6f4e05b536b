"""Checkpoints, state layout and side effects of the six MLorc optimizers.

Every round trip is checked bitwise (torch.equal): the sketches are seeded from (seed, parameter
index, step), so a resumed run must draw exactly the numbers an uninterrupted run draws. Low rank
(rank 2, oversampling 0) is used throughout so that the randomized sketch path, not the exact thin
SVD, is the one under test.
"""

import io

import pytest
import torch

import mlorc
from variants import NAMES, VARIANTS, assert_snapshot_equal, make_opt, snapshot, takes

LOW_RANK = dict(rank=2, oversampling=0)
SHAPES = [(12, 10), (3, 4, 2, 2), (10,)]   # a Linear weight, a conv filter viewed as (3, 16), a bias


def make_params(dtype=torch.float32, device="cpu", shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for shape in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(params, step):
    """Gradients of step `step`: a pull towards 0 (so they depend on where the run is) plus noise
    drawn from a generator seeded by the step, so two runs at the same step see the same noise. The
    noise is small enough that Prodigy's and D-Adapt's d estimates grow within a few steps."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        noise = torch.randn(p.shape, generator=gen).to(p.device)
        p.grad = (0.5 * p.detach().float() + 0.1 * noise).to(p.dtype)


def run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        set_grads(params, step)
        opt.step()


def save_and_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same(value_a, value_b):
    if torch.is_tensor(value_a):
        assert value_a.dtype == value_b.dtype and value_a.device == value_b.device
        assert torch.equal(value_a, value_b)
    else:
        assert value_a == value_b


def assert_runs_identical(opt_a, params_a, opt_b, params_b):
    """Parameters, every state entry and every param-group entry (d, k, ... included) bitwise equal."""
    for p_a, p_b in zip(params_a, params_b):
        assert_same(p_a.detach(), p_b.detach())
        state_a, state_b = opt_a.state[p_a], opt_b.state[p_b]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert_same(state_a[key], state_b[key])
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):
        # torch's __setstate__ adds defaults["differentiable"], which MLorc's then copies into the
        # groups of a loaded optimizer: an inert extra key, not part of the comparison
        assert group_a.keys() - {"differentiable"} == group_b.keys() - {"differentiable"}
        for key in group_a.keys() - {"differentiable"}:
            if key != "params":
                assert_same(group_a[key], group_b[key])


def resume(name, params, saved_state_dict, **options):
    """A fresh optimizer on fresh copies of `params`, loaded from a torch.save'd state dict."""
    fresh = clone_params(params)
    opt = make_opt(name, fresh, **options)
    opt.load_state_dict(save_and_load(saved_state_dict))
    return opt, fresh


# ----------------------------------------------------------------------------------------------------
# Round trips

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_mid_training_is_bitwise(name, dtype, device):
    params_a = make_params(dtype, device)
    opt_a = make_opt(name, params_a, **LOW_RANK)
    run(opt_a, params_a, 7)

    params_b = make_params(dtype, device)
    opt_b = make_opt(name, params_b, **LOW_RANK)
    run(opt_b, params_b, 4)
    if name in ("Prodigy", "DAdapt_Lion"):      # the d estimate has moved, so restoring it matters
        assert opt_b.param_groups[0]["d"] != opt_b.param_groups[0]["d0"]
    opt_c, params_c = resume(name, params_b, opt_b.state_dict(), **LOW_RANK)
    del opt_b, params_b
    run(opt_c, params_c, 3, start=4)

    assert_runs_identical(opt_a, params_a, opt_c, params_c)
    assert not torch.equal(params_c[0].detach(), make_params(dtype, device)[0].detach())


@pytest.mark.parametrize("name", NAMES)
def test_bf16_state_stays_fp32_after_load(name):
    # torch's load_state_dict casts floating state to the parameter dtype; MLorc must undo that
    params = make_params(torch.bfloat16)
    opt = make_opt(name, params, **LOW_RANK)
    run(opt, params, 3)
    saved = opt.state_dict()
    opt_c, params_c = resume(name, params, saved, **LOW_RANK)
    for index, p in enumerate(params_c):
        state = opt_c.state[p]
        assert state.keys() == saved["state"][index].keys()
        for key, value in state.items():
            if torch.is_tensor(value):
                assert value.dtype == torch.float32, key
                assert torch.equal(value, saved["state"][index][key])
    assert any(key.endswith("_U") for key in opt_c.state[params_c[0]])


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_call_does_not_change_the_run(name):
    params_a = make_params()
    opt_a = make_opt(name, params_a, **LOW_RANK)
    run(opt_a, params_a, 5)

    params_b = make_params()
    opt_b = make_opt(name, params_b, **LOW_RANK)
    for step in range(5):
        set_grads(params_b, step)
        opt_b.step()
        save_and_load(opt_b.state_dict())
    assert_runs_identical(opt_a, params_a, opt_b, params_b)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_without_newer_options_loads_and_steps(name):
    # a run of a version before these options existed: no OrthoGrad, and one power iteration (the
    # first release's sketch, which today's default no longer is)
    # and, for the variants that have it, the direction without full_weight_outside
    before = dict(full_weight_outside=False) if takes(VARIANTS[name][0], "full_weight_outside") else {}
    params_a = make_params()
    opt_a = make_opt(name, params_a, **LOW_RANK, power_iters=1, **before)
    run(opt_a, params_a, 5)

    params_b = make_params()
    opt_b = make_opt(name, params_b, **LOW_RANK, power_iters=1, **before)
    run(opt_b, params_b, 2)
    old = opt_b.state_dict()
    for group in old["param_groups"]:            # a checkpoint written before these options existed
        del group["use_orthograd"], group["power_iters"]
        group.pop("full_weight_outside", None)
    assert "power_iters" not in save_and_load(old)["param_groups"][0]
    opt_c, params_c = resume(name, params_b, old, **LOW_RANK)
    assert opt_c.param_groups[0]["use_orthograd"] is False
    assert opt_c.param_groups[0]["power_iters"] == 1
    if before:
        assert opt_c.param_groups[0]["full_weight_outside"] is False
    run(opt_c, params_c, 3, start=2)
    # the defaults filled in are the values the saved run used, so the resumed run is the same run
    assert_runs_identical(opt_a, params_a, opt_c, params_c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_state_dict_loads_onto_cpu(name):
    params = make_params(device="cuda")
    opt = make_opt(name, params, **LOW_RANK)
    run(opt, params, 3)
    saved = opt.state_dict()
    cpu_params = [p.detach().cpu().requires_grad_() for p in params]
    opt_cpu = make_opt(name, cpu_params, **LOW_RANK)
    opt_cpu.load_state_dict(save_and_load(saved))          # tensors come back on CUDA
    for index, p in enumerate(cpu_params):
        for key, value in opt_cpu.state[p].items():
            if torch.is_tensor(value):
                assert value.device.type == "cpu", key
                assert torch.equal(value, saved["state"][index][key].cpu())
    before = [p.detach().clone() for p in cpu_params]
    run(opt_cpu, cpu_params, 2, start=3)
    assert all(torch.isfinite(p).all() for p in cpu_params)
    assert not torch.equal(cpu_params[0].detach(), before[0])


# ----------------------------------------------------------------------------------------------------
# State layout and memory

def factored_bytes(rows, cols, rank, moments):
    """fp32 U (rows, k), s (k), Vh (k, cols) per moment, k = min(rank, rows, cols)."""
    k = min(rank, rows, cols)
    return moments * 4 * k * (rows + cols + 1)


def test_state_bytes_adamw_and_lion_by_hand():
    rank = 2
    for cls, moments in ((mlorc.MLorc_AdamW, 2), (mlorc.MLorc_Lion, 1)):
        params = make_params(shapes=[(12, 10), (10,)])
        opt = cls(params, rank=rank)
        run(opt, params, 1)
        # per moment: 4 bytes * r (m + n + 1) = 4 * 2 * 23 = 184 for W, 4 * 10 = 40 for the bias
        assert mlorc.state_bytes(opt) == moments * (184 + 40)


def expected_state_bytes(name, p, rank, slice_p=3):
    """State bytes of one parameter: factored moments for ndim >= 2, plus each variant's own extras."""
    moments = {"AdamW": 2, "Lion": 1, "Prodigy": 2, "DAdapt_Lion": 1, "Adopt": 2, "CAME": 1}[name]
    if p.ndim >= 2:
        nbytes = factored_bytes(p.shape[0], p[0].numel(), rank, moments)
    else:
        nbytes = moments * 4 * p.numel()
    sliced = -(-p.numel() // slice_p)                       # every slice_p-th entry, rounded up
    if name == "Prodigy":
        nbytes += 2 * 4 * sliced                             # s and p0
    if name == "DAdapt_Lion":
        nbytes += 4 * sliced                                 # s
    if name == "CAME":                                      # CAME's own factored second moment
        if p.ndim >= 2:
            rows, cols = p.shape[:-1].numel(), (p.shape[:-2] + p.shape[-1:]).numel()
            nbytes += 3 * 4 * (rows + cols)                  # exp_avg_{sq,res,bound}_row/col
        else:
            nbytes += 4 * p.numel()                          # dense exp_avg_sq
    return nbytes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rank", [1, 2, 50])
def test_state_bytes_formula_and_no_dense_matrix_moment(name, rank):
    shapes = [(24, 20), (8, 4, 3, 3), (20,), ()]
    params = make_params(shapes=shapes)
    opt = make_opt(name, params, rank=rank)
    run(opt, params, 2)
    assert mlorc.state_bytes(opt) == sum(expected_state_bytes(name, p, rank) for p in params)
    if rank < 8:
        for p in params[:2]:
            state = opt.state[p]
            assert "exp_avg" not in state and "exp_avg_sq" not in state
            for key, value in state.items():
                if torch.is_tensor(value):              # nothing as large as a dense moment
                    assert value.numel() <= p.numel() // 2, key


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rank", [2, 50])
def test_factor_shapes_never_depend_on_data(name, rank):
    params = make_params(shapes=[(12, 10), (3, 4, 2, 2)])
    opt = make_opt(name, params, rank=rank, oversampling=0)
    shapes = None
    gen = torch.Generator().manual_seed(3)
    # zero, rank-one and full-rank gradients: the moments' numerical rank varies, the shapes do not
    for kind in ("zero", "rank1", "dense", "zero", "dense"):
        for p in params:
            rows, cols = p.shape[0], p[0].numel()
            if kind == "zero":
                g = torch.zeros(rows, cols)
            elif kind == "rank1":
                g = torch.randn(rows, 1, generator=gen) * torch.randn(1, cols, generator=gen)
            else:
                g = torch.randn(rows, cols, generator=gen)
            p.grad = g.view(p.shape)
        opt.step()
        now = [{k: tuple(v.shape) for k, v in opt.state[p].items() if torch.is_tensor(v)}
               for p in params]
        shapes = shapes or now
        assert now == shapes
    for p, state in zip(params, shapes):
        rows, cols = p.shape[0], p[0].numel()
        k = min(rank, rows, cols)                     # rank >= min(m, n) stores min(m, n) components
        assert state["exp_avg_U"] == (rows, k)
        assert state["exp_avg_s"] == (k,)
        assert state["exp_avg_Vh"] == (k, cols)


@pytest.mark.parametrize("name", NAMES)
def test_per_group_rank(name):
    low, dense = make_params(shapes=[(12, 10), (8, 6)])
    cls, defaults = VARIANTS[name]
    opt = cls([{"params": [low], "rank": 2}, {"params": [dense], "rank": None}], **defaults)
    run(opt, [low, dense], 2)
    assert {"exp_avg_U", "exp_avg_s", "exp_avg_Vh"} <= opt.state[low].keys()
    assert "exp_avg" not in opt.state[low]
    assert opt.state[dense]["exp_avg"].shape == dense.shape
    assert not any(key.startswith("exp_avg_U") or key.endswith("_Vh") for key in opt.state[dense])
    # the group's rank is saved with it
    assert [g["rank"] for g in opt.state_dict()["param_groups"]] == [2, None]


# ----------------------------------------------------------------------------------------------------
# No side effects on the caller

GRAD_OPTIONS = {
    "AdamW": [{}, dict(maximize=True), dict(use_orthograd=True), dict(weight_decay=0.1),
              dict(use_cautious=True), dict(use_grams=True), dict(use_atan2=True)],
    "Lion": [{}, dict(maximize=True), dict(use_orthograd=True), dict(weight_decay=0.1),
             dict(clip_threshold=0.1), dict(use_cautious=True)],
    "Prodigy": [{}, dict(maximize=True), dict(use_orthograd=True),
                dict(weight_decay=0.1, decouple=False), dict(use_atan2=True), dict(use_grams=True)],
    "DAdapt_Lion": [{}, dict(maximize=True), dict(use_orthograd=True), dict(weight_decay=0.1),
                    dict(clip_threshold=0.1), dict(use_cautious=True)],
    "Adopt": [{}, dict(maximize=True), dict(use_orthograd=True),
              dict(weight_decay=0.1, decouple=False), dict(use_atan2=True), dict(use_cautious=True)],
    "CAME": [{}, dict(maximize=True), dict(use_orthograd=True), dict(weight_decay=0.1),
             dict(clip_threshold=0.01), dict(use_grams=True)],
}
GRAD_CASES = [(name, options) for name, cases in GRAD_OPTIONS.items() for options in cases]


@pytest.mark.parametrize("name, options", GRAD_CASES, ids=[f"{n}-{o}" for n, o in GRAD_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_leaves_grad_unchanged(name, options, dtype, device):
    params = make_params(dtype, device, shapes=SHAPES + [()])
    opt = make_opt(name, params, **LOW_RANK, **options)
    for step in range(3):                         # ADOPT's first step is special: check later ones too
        set_grads(params, step)
        grads = [p.grad for p in params]
        copies = [g.clone() for g in grads]
        before = params[0].detach().clone()
        opt.step()
        for p, g, copy in zip(params, grads, copies):
            assert p.grad is g
            assert torch.equal(g, copy)
        if step > 0:
            assert not torch.equal(params[0].detach(), before)


@pytest.mark.parametrize("name", NAMES)
def test_step_leaves_global_rng_unchanged(name, device):
    # the sketches (rank 2 < min(m, n)) and bf16 stochastic rounding must draw from private generators
    params = make_params(device=device) + make_params(torch.bfloat16, device=device, seed=1)
    opt = make_opt(name, params, **LOW_RANK)
    torch.manual_seed(123)
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    run(opt, params, 3)
    assert torch.equal(torch.random.get_rng_state(), cpu_rng)
    if cuda_rng is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_rng))


# ----------------------------------------------------------------------------------------------------
# The seed option

def reconstructed_moments(opt, params):
    return [mlorc.reconstruct(opt.state[p]["exp_avg_U"], opt.state[p]["exp_avg_s"],
                              opt.state[p]["exp_avg_Vh"]) for p in params if p.ndim >= 2]


@pytest.mark.parametrize("name", NAMES)
def test_seed_selects_the_sketches(name):
    def train(seed, rank):
        params = make_params()
        opt = make_opt(name, params, rank=rank, oversampling=0, seed=seed)
        run(opt, params, 3)
        return params, reconstructed_moments(opt, params)

    params_0, moments_0 = train(0, rank=2)
    params_0b, moments_0b = train(0, rank=2)
    params_1, moments_1 = train(1, rank=2)
    assert all(torch.equal(a, b) for a, b in zip(moments_0, moments_0b))
    assert all(torch.equal(a, b) for a, b in zip(params_0, params_0b))
    # a different sketch gives a different rank-2 approximation of every factored moment
    assert not any(torch.equal(a, b) for a, b in zip(moments_0, moments_1))
    if name in ("AdamW", "Adopt", "CAME", "Prodigy"):   # sign steps may not notice the difference
        assert not torch.equal(params_0[0], params_1[0])

    # at full rank the thin SVD is exact and deterministic, so the seed cannot matter (fp32 params)
    full_0, full_1 = train(0, rank=50), train(7, rank=50)
    assert all(torch.equal(a, b) for a, b in zip(full_0[0], full_1[0]))
    assert all(torch.equal(a, b) for a, b in zip(full_0[1], full_1[1]))


# ----------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint (single process, no process group)

@pytest.mark.filterwarnings("ignore")          # DCP warns that it runs without a process group
@pytest.mark.parametrize("name", NAMES)
def test_distributed_checkpoint_round_trip(name, tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def make_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))

    def train(model, opt, steps, start):
        for step in range(start, start + steps):
            gen = torch.Generator().manual_seed(step)
            opt.zero_grad()
            model(torch.randn(8, 6, generator=gen)).square().mean().backward()
            opt.step()

    model_a = make_model()
    opt_a = make_opt(name, model_a.parameters(), **LOW_RANK)
    train(model_a, opt_a, 5, 0)

    model_b = make_model()
    opt_b = make_opt(name, model_b.parameters(), **LOW_RANK)
    train(model_b, opt_b, 3, 0)
    model_sd, optim_sd = get_state_dict(model_b, opt_b)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))

    model_c = make_model()
    opt_c = make_opt(name, model_c.parameters(), **LOW_RANK)
    model_sd, optim_sd = get_state_dict(model_c, opt_c)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(tmp_path))            # fills the template in place
    set_state_dict(model_c, opt_c, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optim"])
    train(model_c, opt_c, 2, 3)
    assert_runs_identical(opt_a, list(model_a.parameters()), opt_c, list(model_c.parameters()))


# ----------------------------------------------------------------------------------------------------
# load_state_dict refuses what does not fit, before changing anything

def assert_refused_unchanged(opt, bad, match):
    params = [p for group in opt.param_groups for p in group["params"]]
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_snapshot_equal(snapshot(opt, params), before)


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_refuses_a_missing_entry(name):
    # regression: a state dict without exp_avg_U (or step) loaded, and the next step failed after
    # the old state was gone
    params = make_params()
    opt = make_opt(name, params, **LOW_RANK)
    run(opt, params, 2)
    for entry in ("exp_avg_U", "step"):
        bad = save_and_load(opt.state_dict())
        del bad["state"][0][entry]
        assert_refused_unchanged(opt, bad, rf"parameter 0 \(shape \(12, 10\)\).*missing \['{entry}'\]")


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_refuses_a_transposed_matrix(name):
    # same numel, so torch accepted it and the step ran silently on scrambled moments
    saved_params = make_params(shapes=[(12, 10), (10,)])
    saved = make_opt(name, saved_params, **LOW_RANK)
    run(saved, saved_params, 2)
    params = make_params(shapes=[(10, 12), (10,)])
    opt = make_opt(name, params, **LOW_RANK)
    run(opt, params, 1)
    assert_refused_unchanged(opt, save_and_load(saved.state_dict()),
                             r"parameter 0 \(shape \(10, 12\)\): entry 'exp_avg_U' has shape \(12, 2\), expected \(10, 2\)")


def test_load_state_dict_refuses_another_class_and_non_dicts():
    params = make_params()
    adamw = mlorc.MLorc_AdamW(params, **LOW_RANK)
    run(adamw, params, 2)
    lion_params = make_params()
    lion = mlorc.MLorc_Lion(lion_params, **LOW_RANK)
    run(lion, lion_params, 1)
    assert_refused_unchanged(lion, save_and_load(adamw.state_dict()), r"unexpected \['exp_avg_sq_U'")
    torch_params = make_params()
    torch_adamw = torch.optim.AdamW(torch_params)
    run(torch_adamw, torch_params, 1)
    assert_refused_unchanged(adamw, torch_adamw.state_dict(), r"missing \['exp_avg_U'")
    assert_refused_unchanged(adamw, [1, 2], "must be a dict")
    assert_refused_unchanged(adamw, {"state": {}}, "must be a dict with 'state' and 'param_groups'")


def test_load_state_dict_takes_torch_adamw_state_at_rank_none():
    # dense moments have torch.optim.AdamW's entries: its state dict still loads (groups gain rank)
    params = make_params()
    torch_adamw = torch.optim.AdamW(params)
    run(torch_adamw, params, 2)
    mine = clone_params(params)
    opt = mlorc.MLorc_AdamW(mine, rank=None)
    opt.load_state_dict(save_and_load(torch_adamw.state_dict()))
    assert torch.equal(opt.state[mine[0]]["exp_avg"], torch_adamw.state[params[0]]["exp_avg"])
