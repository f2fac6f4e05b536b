"""Data-parallel training (DDP, gloo, CPU, 2 processes spawned by the test) equals one process.

Every rank builds the optimizer with the same seed, so the sketches agree; DDP all-reduces (averages)
the gradients, so each rank makes the update a single process makes on the global batch. The ranks
end bitwise identical to each other; against the single process the gradient average differs in
rounding (gloo sums the per-rank gradients in another order than one backward over the whole batch),
so parameters are compared to a tolerance of fp32 rounding amplified by the steps: 1e-5 relative.
"""

import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mlorc

STEPS = 6
VARIANTS = {"AdamW": (mlorc.MLorc_AdamW, dict(lr=1e-2)), "Lion": (mlorc.MLorc_Lion, dict(lr=1e-3)),
            "Prodigy": (mlorc.MLorc_Prodigy, dict(lr=1.0, d0=1e-3))}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def global_batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)


def train(model, opt, rank=0, world=1):
    for step in range(STEPS):
        x, y = global_batch(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]          # this rank's share of the batch
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def worker(rank, world, name, out):
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))   # a hang fails, not blocks CI
    torch.set_num_threads(1)
    cls, kwargs = VARIANTS[name]
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = cls(model.parameters(), rank=2, **kwargs)
    train(model, opt, rank, world)
    torch.save({"params": [p.detach() for p in model.module.parameters()],
                "state": opt.state_dict()}, f"{out}/rank{rank}.pt")
    dist.barrier()                            # no rank tears gloo down under another's feet
    dist.destroy_process_group()
    # Shown if the test fails: whether a worker that died got this far. On the 2-core CI machine a
    # worker has aborted twice in about ten runs ("terminate called without an active exception",
    # SIGABRT, inside torch or gloo), never in ~60 local runs; where and why is not known yet. The
    # worker leaves without the interpreter's teardown, which has nothing left to do for the test.
    print(f"rank {rank}: trained, saved, process group destroyed", file=sys.stderr, flush=True)
    os._exit(0)


@pytest.mark.parametrize("name", VARIANTS)
def test_ddp_equals_single_process(name, tmp_path):
    world = 2
    mp.start_processes(worker, args=(world, name, str(tmp_path)), nprocs=world,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):           # ranks agree exactly
        assert torch.equal(a, b)
    state_a, state_b = ranks[0]["state"], ranks[1]["state"]
    for key in state_a["state"]:
        for name_, value in state_a["state"][key].items():
            assert torch.equal(value, state_b["state"][key][name_]) if torch.is_tensor(value) \
                else value == state_b["state"][key][name_]
    cls, kwargs = VARIANTS[name]
    model = make_model()
    train(model, cls(model.parameters(), rank=2, **kwargs))
    start = make_model()
    for single, ddp, init in zip(model.parameters(), ranks[0]["params"], start.parameters()):
        torch.testing.assert_close(ddp, single.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(ddp, init.detach())                     # training moved them

