import torch

import mlorc


def test_full_rank_adamw_matches_torch_adamw(float64):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(6, 4, generator=gen)
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    opt = mlorc.MLorc_AdamW([b], lr=1e-2, weight_decay=0.1, rank=4)
    for _ in range(10):
        g = torch.randn(6, 4, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    # float64: the exact thin SVD reproduces the moments to ~1e-16 relative
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert not torch.equal(a, start)
