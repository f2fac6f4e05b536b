"""attach_fused_backward: each parameter is stepped from its post-accumulate-grad hook.

The hook path runs the same per-parameter ops as step(), in reverse order, with the same sketch seeds
(a parameter's seed comes from its index in the param groups, not from when it is stepped), so the
two paths are compared bitwise. That includes Prodigy / D-Adapt Lion: their per-parameter terms of
the d estimate are summed in parameter order in end_step(), whatever order the hooks stepped in.
"""

import pytest
import torch

import mlorc
from variants import ADAPTIVE, NAMES, VARIANTS, make_opt

LOW_RANK = dict(rank=2, oversampling=1)      # 12 x 12 and 12 x 6 weights: sketched, not exact SVD


def make_model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12),
                               torch.nn.Tanh(), torch.nn.Linear(12, 3)).to(device)


def batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=gen)
    return x, torch.sin(x[:, :3]) + 0.1 * torch.randn(16, 3, generator=gen)


def loss_of(model, step):
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in batch(step))
    return torch.nn.functional.mse_loss(model(x), y)


def train_with_step(name, steps, scheduler=None, device="cpu", **options):
    model = make_model(device)
    opt = make_opt(name, model.parameters(), **LOW_RANK, **options)
    sched = scheduler(opt) if scheduler else None
    for step in range(steps):
        loss_of(model, step).backward()
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()
    return model, opt


def train_fused(name, steps, scheduler=None, device="cpu", **options):
    model = make_model(device)
    opt = make_opt(name, model.parameters(), **LOW_RANK, **options)
    sched = scheduler(opt) if scheduler else None
    handles = mlorc.attach_fused_backward(model, opt)
    for step in range(steps):
        loss_of(model, step).backward()           # parameters are stepped here
        if name in ADAPTIVE:
            opt.end_step()
        assert all(p.grad is None for p in model.parameters())
        if sched:
            sched.step()
    return model, opt, handles


def assert_same_training(model_a, opt_a, model_b, opt_b):
    """Parameters, every state tensor and the param groups (d estimate included) are bitwise equal."""
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p_a.detach(), p_b.detach())
        assert opt_a.state[p_a].keys() == opt_b.state[p_b].keys()
        state_a, state_b = opt_a.state[p_a], opt_b.state[p_b]
        for key, value in state_a.items():
            if torch.is_tensor(value):
                assert torch.equal(value, state_b[key])
            else:
                assert value == state_b[key]
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):
        assert group_a["lr"] == group_b["lr"] and group_a.get("k") == group_b.get("k")
        assert group_a.get("d") == group_b.get("d")


@pytest.mark.parametrize("name", NAMES)
def test_hooks_equal_backward_then_step(name, device):
    model_a, opt_a = train_with_step(name, 5, device=device)
    model_b, opt_b, _ = train_fused(name, 5, device=device)
    assert_same_training(model_a, opt_a, model_b, opt_b)
    assert not torch.equal(model_b[0].weight, make_model(device)[0].weight)
    if name in ADAPTIVE:                       # the global d estimate has moved, on both paths
        assert opt_b.param_groups[0]["d"] > opt_b.param_groups[0]["d0"]


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_variants_refuse_a_second_step_without_end_step(name):
    model = make_model()
    opt = make_opt(name, model.parameters(), **LOW_RANK)
    mlorc.attach_fused_backward(model, opt)
    loss_of(model, 0).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="end_step"):
        loss_of(model, 1).backward()           # the hook of the first parameter reached raises
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # after end_step() the next backward steps normally
    model.zero_grad(set_to_none=True)
    opt.end_step()
    loss_of(model, 1).backward()
    assert not torch.equal(model[0].weight, before[0])


@pytest.mark.parametrize("name", NAMES)
def test_step_param_twice(name):
    weight = torch.nn.Parameter(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)))
    opt = make_opt(name, [weight], **LOW_RANK)
    for _ in range(2):                            # ADOPT's first step makes no update
        weight.grad = torch.ones_like(weight)
        opt.step_param(weight)
        opt.end_step()
    before = weight.detach().clone()
    weight.grad = torch.ones_like(weight)
    opt.step_param(weight)
    if name in ADAPTIVE:
        once = weight.detach().clone()
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[weight].items()}
        with pytest.raises(RuntimeError, match="parameter 0 stepped twice without end_step"):
            opt.step_param(weight)
        assert torch.equal(weight, once)          # the refused call changed nothing
        assert state["step"] == 3 and opt.state[weight].keys() == state.keys()
        for key, value in opt.state[weight].items():
            assert torch.equal(value, state[key]) if torch.is_tensor(value) else value == state[key]
    else:                                         # only the global-d variants need end_step()
        once = weight.detach().clone()
        opt.step_param(weight)
        assert not torch.equal(weight, once)
    assert not torch.equal(once, before)


@pytest.mark.parametrize("name", NAMES)
def test_step_with_closure_is_refused_after_attach(name):
    model = make_model()
    opt = make_opt(name, model.parameters(), **LOW_RANK)
    mlorc.attach_fused_backward(model, opt)
    calls = []

    def closure():
        calls.append(1)
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(closure)
    assert calls == []                             # refused before the closure could step via hooks
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", NAMES)
def test_removed_hooks_detach(name):
    model, opt, handles = train_fused(name, 2)
    for handle in handles:
        handle.remove()
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, 2).backward()
    assert all(p.grad is not None for p in model.parameters())    # gradients are kept again
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.step()                                     # and the ordinary step() applies them
    assert not torch.equal(model[0].weight, before[0])


def test_closure_accepted_after_hooks_are_removed():
    model = make_model()
    opt = make_opt("AdamW", model.parameters(), **LOW_RANK)
    for handle in mlorc.attach_fused_backward(model, opt):
        handle.remove()

    def closure():
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))


def step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


# the scheduler warns when optimizer.step() is never called, which is the point of the hook path
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_drives_the_hooked_optimizer(name):
    steps = 5
    model_a, opt_a = train_with_step(name, steps, scheduler=step_lr)
    model_b, opt_b, _ = train_fused(name, steps, scheduler=step_lr)
    base = VARIANTS[name][1]["lr"]
    assert opt_b.param_groups[0]["lr"] == base * 0.5 ** (steps // 2)
    assert_same_training(model_a, opt_a, model_b, opt_b)
    # and the schedule mattered: without it the run ends elsewhere
    model_c, _, _ = train_fused(name, steps)
    assert not torch.equal(model_b[0].weight, model_c[0].weight)


@pytest.mark.parametrize("name", NAMES)
def test_attaching_twice_is_refused_before_any_hook_is_added(name):
    # regression: a second attach_fused_backward stepped every parameter twice per backward (and an
    # adaptive variant raised mid-backward, after some parameters had moved)
    model = make_model()
    opt = make_opt(name, model.parameters(), **LOW_RANK)
    handles = mlorc.attach_fused_backward(model, opt)
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(12, 6\)\) already has a hook"):
        mlorc.attach_fused_backward(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    reference = make_model()
    ref_opt = make_opt(name, reference.parameters(), **LOW_RANK)
    for step in range(2):                          # (ADOPT's first step only sets v)
        loss_of(model, step).backward()            # one hook per parameter: one step each
        opt.step()
        loss_of(reference, step).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q, b in zip(model.parameters(), reference.parameters(), before):
        assert torch.equal(p, q) and not torch.equal(p, b)
    for handle in handles:                         # removed hooks may be attached again
        handle.remove()
    mlorc.attach_fused_backward(model, opt)


def test_a_parameter_outside_the_optimizer_is_refused_before_any_hook_is_added():
    # regression: the hook raised a KeyError whose message was a printed tensor, during backward,
    # after other parameters had been stepped
    model = make_model()
    opt = make_opt("AdamW", list(model.parameters())[:2], **LOW_RANK)
    with pytest.raises(ValueError, match=r"parameter 2 \(shape \(12, 12\)\) is not in the optimizer"):
        mlorc.attach_fused_backward(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, 0).backward()                   # no hook was added: nothing moves in backward
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(TypeError, match="must be an mlorc optimizer"):
        mlorc.attach_fused_backward(model, torch.optim.AdamW(model.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_hooks_with_accumulation_equal_accumulated_backward_then_step(name):
    # with accumulation_steps=k a parameter is stepped at its k-th gradient, as step() after k
    # backward() calls; before, every backward() was a step
    k, rounds = 3, 2
    model_a = make_model()
    opt_a = make_opt(name, model_a.parameters(), **LOW_RANK)
    model_b = make_model()
    opt_b = make_opt(name, model_b.parameters(), **LOW_RANK)
    mlorc.attach_fused_backward(model_b, opt_b, accumulation_steps=k)
    for r in range(rounds):
        for micro in range(k):
            (loss_of(model_a, r * k + micro) / k).backward()
            before = [p.detach().clone() for p in model_b.parameters()]
            (loss_of(model_b, r * k + micro) / k).backward()
            if micro < k - 1:                      # accumulating: nothing moves, gradients kept
                assert all(torch.equal(p, b) for p, b in zip(model_b.parameters(), before))
                assert all(p.grad is not None for p in model_b.parameters())
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        opt_b.step()                               # finds no gradients: finishes the iteration
        assert all(p.grad is None for p in model_b.parameters())
    assert_same_training(model_a, opt_a, model_b, opt_b)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_invalid_accumulation_steps_is_refused(bad):
    model = make_model()
    opt = make_opt("AdamW", model.parameters(), **LOW_RANK)
    with pytest.raises(ValueError, match="accumulation_steps"):
        mlorc.attach_fused_backward(model, opt, accumulation_steps=bad)
