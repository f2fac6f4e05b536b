"""step() compresses same-shape matrices together (batch_bytes); the result must not depend on it.
One at a time (batch_bytes=0, float64: no extension), every parameter takes the plain step, the
optimizer's definition, so these tests hold the batched path equal to it.

Each matrix keeps its own generator, so batching changes only how the linear algebra is grouped:
batched and single matmuls / solvers round differently. The comparison runs in float64, where that
rounding is ~1e-16 relative; over 6 steps it stays far below the 1e-9 tolerance, which still catches
any real difference (a wrong generator or a mixed-up matrix changes the result at O(1)).
"""
import pytest
import torch

import mlorc

VARIANTS = [(mlorc.MLorc_AdamW, {}), (mlorc.MLorc_AdamW, {"full_weight_outside": True}), (mlorc.MLorc_Lion, {}), (mlorc.MLorc_Prodigy, {"d0": 1e-3}),
            (mlorc.MLorc_DAdapt_Lion, {"d0": 1e-3}), (mlorc.MLorc_Adopt, {}), (mlorc.MLorc_CAME, {})]
SHAPES = [(12, 10), (7,), (12, 10), (3, 4, 2, 2), (12, 10), (10, 12), (3, 4, 2, 2)]


def run(cls, kwargs, batch_bytes, device, steps=6):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(device).requires_grad_()
              for s in SHAPES]
    opt = cls(params, lr=1e-2, rank=2, oversampling=1, power_iters=1, batch_bytes=batch_bytes,
              **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device)
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=lambda v: getattr(v, "__name__", ""))
def test_batched_compression_equals_one_at_a_time(cls, kwargs, device):
    one, opt_one = run(cls, kwargs, 0, device)
    batched, opt_batched = run(cls, kwargs, 2**30, device)
    for a, b in zip(one, batched):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        state_a, state_b = opt_one.state[a], opt_batched.state[b]
        assert state_a.keys() == state_b.keys()
        for name in ("exp_avg", "exp_avg_sq"):
            if name + "_U" in state_a:                    # singular vectors may flip sign: compare moments
                torch.testing.assert_close(mlorc.load_moment(state_a, name, a.shape),
                                           mlorc.load_moment(state_b, name, b.shape), rtol=1e-9, atol=1e-12)
    # the factors are stored as their own tensors, not views of the batch
    for p in batched:
        for value in opt_batched.state[p].values():
            if torch.is_tensor(value):
                assert value.untyped_storage().nbytes() == value.numel() * value.element_size()


def test_one_at_a_time_is_the_plain_step(monkeypatch):
    def batched(*args):
        raise AssertionError("the batched path was taken")
    monkeypatch.setattr(mlorc, "step_batch", batched)
    for cls, kwargs in VARIANTS:
        run(cls, kwargs, 0, "cpu", steps=2)


def test_batches_group_same_shapes_within_the_byte_budget():
    params = [torch.zeros(s, requires_grad=True) for s in SHAPES]
    for p in params:
        p.grad = torch.ones_like(p)
    # AdamW: two moments of 12*10 fp32 = 960 bytes per (12, 10) matrix, so 2000 bytes fit two of the
    # three; the two (3, 4, 2, 2) tensors (384 bytes each) fit together; vectors go alone
    opt = mlorc.MLorc_AdamW(params, batch_bytes=2000)
    indexed = list(enumerate(params))
    sizes = sorted((tuple(params[batch[0][0]].shape), len(batch))
                   for batch, _ in mlorc.same_shape_batches(opt, indexed))
    assert sizes == sorted([((12, 10), 2), ((12, 10), 1), ((7,), 1), ((3, 4, 2, 2), 2), ((10, 12), 1)])
