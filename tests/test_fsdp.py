"""FSDP2 (fully_shard, gloo, CPU, processes spawned by the test) equals one process.

Every parameter is a DTensor split across the ranks: by rows (Shard(0), FSDP2's default, with uneven
blocks and empty ones), by columns (Shard(1) through shard_placement_fn), and a 3-D parameter by its
first dim. The optimizer steps each rank's block with the sharded randomized SVD and all-reduced norms,
means and sums, so after STEPS steps the parameters must be those of one process on the global batch.

Tolerance: the runs are in float64 and differ only in rounding: the reduce-scatter sums the ranks'
gradients in another order than one backward over the whole batch, and TSQR and the all-reduced partial
products round differently from one Householder QR and one matmul. Each is ~1e-16 relative; a
truncated SVD turns a perturbation e of its input into about e / gap in its factors (gap: the relative
distance between the last kept and the first dropped singular value) and the steps compound it.
Measured with 2 and 4 ranks: at most 3e-14 relative (Prodigy, whose d feeds back into every step).
1e-10 leaves room for other BLAS builds and still fails at once if a reduction is missing: with the
all-reduce of partial sums removed the same runs differ by 1e-4 to 0.6.
"""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mlorc

STEPS = 10
CONFIGS = {
    "AdamW": (mlorc.MLorc_AdamW, dict(lr=1e-2, rank=2, oversampling=1, power_iters=1)),  # power iteration
    "AdamW_options": (mlorc.MLorc_AdamW, dict(lr=1e-2, rank=3, oversampling=2, power_iters=0,
                                              use_orthograd=True, use_cautious=True)),
    "AdamW_outside": (mlorc.MLorc_AdamW, dict(lr=1e-2, rank=2, full_weight_outside=True)),
    "Lion": (mlorc.MLorc_Lion, dict(lr=1e-3, rank=2, clip_threshold=0.5)),
    "Prodigy": (mlorc.MLorc_Prodigy, dict(lr=1.0, d0=1e-3, slice_p=1, rank=2)),
    "DAdapt_Lion": (mlorc.MLorc_DAdapt_Lion, dict(lr=1.0, d0=1e-3, slice_p=1, rank=2, clip_threshold=1.0)),
    "Adopt": (mlorc.MLorc_Adopt, dict(lr=1e-2, rank=2)),
    "CAME": (mlorc.MLorc_CAME, dict(lr=1e-2, rank=2)),
}

HSDP = ["AdamW", "Prodigy", "CAME"]
# DCP round trips; Prodigy with slice_p = 3 also checks the sub-sampled state blocks. "_full": the
# gathered (full_state_dict=True) state dicts, loaded back into the sharded optimizer.
RESUMED = {"AdamW": CONFIGS["AdamW"],
           "Prodigy_slice3": (mlorc.MLorc_Prodigy, dict(lr=1.0, d0=1e-3, slice_p=3)),
           "CAME_full": CONFIGS["CAME"]}


class Block(torch.nn.Module):
    """A 3-D parameter, used as a (5, 9) matrix: compressed in its natural (5, 3 * 3) layout."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(5, 3, 3) / 3)

    def forward(self, x):
        return x @ self.weight.reshape(5, 9).T


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.Tanh(), torch.nn.Linear(7, 9),
                               torch.nn.Tanh(), Block(), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()


def shard(model, mesh):
    """Layer 0's weight by columns, everything else by rows (9 rows over 4 ranks: 3, 3, 3, 0)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    by_columns = model[0].weight
    for layer in (model[0], model[2], model[4], model[6]):
        fully_shard(layer, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p is by_columns else None)
    fully_shard(model, mesh=mesh)
    return model


def global_batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(16, 12, generator=gen, dtype=torch.float64),
            torch.randn(16, 2, generator=gen, dtype=torch.float64))


def train(model, opt, steps, rank=0, world=1, first=0):
    for step in range(first, first + steps):
        x, y = global_batch(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]          # this rank's share of the batch
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def full(params):
    return [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach() for p in params]


def resume(mesh, cls, kwargs, rank, world, path, full_state_dict):
    """Train STEPS // 2 steps, save, load into a fresh model and optimizer and finish: through DCP
    (sharded state dicts), or in memory with full (gathered) state dicts. Returns the parameters of
    the uninterrupted and of the resumed run, and the optimizer state bytes of this rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=full_state_dict)
    half = STEPS // 2
    model = shard(make_model(), mesh)
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, half, rank, world)
    saved = {"optim": get_optimizer_state_dict(model, opt, options=options), "model": model.state_dict()}
    if not full_state_dict:
        dcp.save(saved, checkpoint_id=path)
    uninterrupted = shard(make_model(), mesh)
    uninterrupted_opt = cls(uninterrupted.parameters(), **kwargs)
    train(uninterrupted, uninterrupted_opt, STEPS, rank, world)

    resumed = shard(make_model(), mesh)
    resumed_opt = cls(resumed.parameters(), **kwargs)
    if not full_state_dict:
        saved = {"optim": get_optimizer_state_dict(resumed, resumed_opt), "model": resumed.state_dict()}
        dcp.load(saved, checkpoint_id=path)
    resumed.load_state_dict(saved["model"])
    set_optimizer_state_dict(resumed, resumed_opt, saved["optim"], options=options)
    train(resumed, resumed_opt, STEPS - half, rank, world, first=half)
    return full(uninterrupted.parameters()), full(resumed.parameters()), mlorc.state_bytes(resumed_opt)


def nonfinite_gradient_on_one_rank(mesh, rank, world):
    """A NaN in the last rank's block only: every rank must raise (a rank that went on alone would
    wait forever in the step's collectives) and leave parameters and state as they were."""
    model = shard(make_model(), mesh)
    opt = mlorc.MLorc_Prodigy(model.parameters(), lr=1.0, d0=1e-3, slice_p=1, rank=2)
    train(model, opt, 2, rank, world)
    before = ([p.to_local().clone() for p in model.parameters()],
              {k: v.to_local().clone() if hasattr(v, "to_local") else v
               for s in opt.state.values() for k, v in s.items()}, opt.param_groups[0]["d"])
    x, y = global_batch(2)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    if rank == world - 1:
        model[0].weight.grad.to_local().view(-1)[-1] = float("nan")     # split by columns: never empty
    try:
        opt.step()
        raised = False
    except RuntimeError as error:
        raised = "non-finite gradient" in str(error)
    after = ([p.to_local() for p in model.parameters()],
             {k: v.to_local() if hasattr(v, "to_local") else v
              for s in opt.state.values() for k, v in s.items()}, opt.param_groups[0]["d"])
    unchanged = (all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
                 and all(torch.equal(a, b) if torch.is_tensor(a) else a == b
                         for a, b in zip(before[1].values(), after[1].values()))
                 and before[2] == after[2])
    return raised, unchanged


def worker(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))   # a hang fails, not blocks CI
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, (cls, kwargs) in CONFIGS.items():
        model = shard(make_model(), mesh)
        opt = cls(model.parameters(), **kwargs)
        train(model, opt, STEPS, rank, world)
        results[name] = full(model.parameters())
    if world == 4:                      # HSDP: split over 2 ranks, replicated over the other 2
        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for name in HSDP:
            cls, kwargs = CONFIGS[name]
            model = shard(make_model(), hsdp)
            train(model, cls(model.parameters(), **kwargs), STEPS, rank, world)
            results[f"hsdp_{name}"] = full(model.parameters())
    results["nonfinite"] = nonfinite_gradient_on_one_rank(mesh, rank, world)
    for name, (cls, kwargs) in RESUMED.items():
        results[f"resume_{name}"] = resume(mesh, cls, kwargs, rank, world, f"{out}/ckpt_{name}",
                                           full_state_dict=name.endswith("full"))
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.barrier()                            # no rank tears gloo down under another's feet
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def fsdp_results(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"fsdp{world}")
    mp.start_processes(worker, args=(world, str(out)), nprocs=world, start_method="spawn")
    return world, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def single_process(name):
    cls, kwargs = CONFIGS[name]
    model = make_model()
    train(model, cls(model.parameters(), **kwargs), STEPS)
    return [p.detach() for p in model.parameters()]


def assert_equals_single_process(sharded, name):
    start = make_model()
    for ours, single, init in zip(sharded, single_process(name), start.parameters()):
        torch.testing.assert_close(ours, single, rtol=1e-10, atol=1e-12)
        assert not torch.equal(ours, init.detach())                    # training moved them


@pytest.mark.parametrize("name", CONFIGS)
def test_fsdp2_equals_single_process(fsdp_results, name):
    world, ranks = fsdp_results
    for other in ranks[1:]:                                     # every rank gathers the same model
        for a, b in zip(ranks[0][name], other[name]):
            assert torch.equal(a, b)
    assert_equals_single_process(ranks[0][name], name)


@pytest.mark.parametrize("name", HSDP)
def test_hsdp_equals_single_process(fsdp_results, name):
    world, ranks = fsdp_results
    if world != 4:
        pytest.skip("HSDP runs with 4 ranks (2 x 2 mesh)")
    assert_equals_single_process(ranks[0][f"hsdp_{name}"], name)


@pytest.mark.parametrize("name", RESUMED)
def test_fsdp2_resume_is_exact(fsdp_results, name):
    """save -> load into a fresh model and optimizer -> continue equals uninterrupted training,
    bitwise: the state is restored exactly and the sketches derive from (seed, index, step)."""
    world, ranks = fsdp_results
    uninterrupted, resumed, _ = ranks[0][f"resume_{name}"]
    for a, b in zip(uninterrupted, resumed):
        assert torch.equal(a, b)
    per_rank = [r[f"resume_{name}"][2] for r in ranks]
    assert per_rank[0] > 0 and sum(per_rank) > max(per_rank)       # the state is split, not copied


def test_a_nonfinite_gradient_on_one_rank_stops_every_rank(fsdp_results):
    world, ranks = fsdp_results
    assert all(r["nonfinite"] == (True, True) for r in ranks)


def test_unsupported_layouts_are_refused_clearly():
    """Placements other than one split dim, and a split 3-D parameter along dim 1, raise at
    construction (naming the parameter's shape), as does the fused backward pass."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for tensor, placements, message in [(torch.randn(4, 3), [Replicate()], "placements"),
                                            (torch.randn(4, 3, 2), [Shard(1)], "split along dim 1")]:
            p = torch.nn.Parameter(distribute_tensor(tensor, mesh, placements))
            with pytest.raises(NotImplementedError, match=message):
                mlorc.MLorc_AdamW([p])
        p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        opt = mlorc.MLorc_AdamW([p])
        with pytest.raises(NotImplementedError, match="FSDP2"):
            mlorc.attach_fused_backward([p], opt)
    finally:
        dist.destroy_process_group()
