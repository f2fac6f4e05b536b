"""Train a small transformer language model with FSDP2 and MLorc_AdamW, save and resume with DCP.

    torchrun --nproc_per_node 2 examples/fsdp_train.py             # CPU (gloo), or a GPU per rank (NCCL)
    torchrun --nproc_per_node 2 examples/fsdp_train.py --columns   # split the matrices by columns

Every parameter becomes a DTensor holding 1 / world of it (fully_shard); the optimizer state of each
matrix is split the same way (U by rows, or Vh by columns) and the randomized SVD runs on the blocks.
Half way through, the model and optimizer are saved with torch.distributed.checkpoint (DCP), loaded
into a fresh model and optimizer, and training continues from there; the script checks that the
result equals training without the interruption. Rank 0 prints the loss and the bytes of optimizer
state each rank holds, next to what torch.optim.AdamW would hold.
"""
import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mlorc  # noqa: E402

VOCAB, WIDTH, LAYERS, CONTEXT = 256, 128, 2, 64


class LanguageModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.position = torch.nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=4 * WIDTH, dropout=0.0,
                                             batch_first=True, norm_first=True)
            for _ in range(LAYERS))
        self.head = torch.nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[:tokens.shape[1]]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(x)


def build(mesh, device, columns):
    torch.manual_seed(0)                       # every rank starts from the same weights
    model = LanguageModel().to(device)
    # Shard(1) needs each split dim divisible by the world size; 1-D parameters stay on Shard(0).
    def place(p):
        return Shard(1) if columns and p.ndim == 2 and p.shape[1] % mesh.size() == 0 else None

    for layer in model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=place)
    fully_shard(model, mesh=mesh, shard_placement_fn=place)
    opt = mlorc.MLorc_AdamW(mlorc.finetune_param_groups(model, weight_decay=0.01, rank=4), lr=3e-3)
    return model, opt


def batch(step, rank, world, device):
    """This rank's share of a global batch of byte sequences cut from this file's own text."""
    text = torch.tensor(list(open(__file__, "rb").read()), dtype=torch.long)
    gen = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(text) - CONTEXT - 1, (8 * world,), generator=gen)[rank::world]
    seqs = torch.stack([text[s:s + CONTEXT + 1] for s in starts.tolist()]).to(device)
    return seqs[:, :-1], seqs[:, 1:]


def train(model, opt, steps, rank, world, device, first=0, log=False):
    for step in range(first, first + steps):
        x, y = batch(step, rank, world, device)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step + 1) % 10 == 0:
            loss = loss.detach().clone()
            dist.all_reduce(loss)                      # the mean over ranks (gloo has no AVG)
            if rank == 0:
                print(f"step {step + 1:4d}  loss {loss.item() / world:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--columns", action="store_true", help="split matrices by columns (Shard(1))")
    parser.add_argument("--checkpoint", default=None, help="DCP directory (default: a temporary one)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    checkpoint = args.checkpoint or os.path.join(tempfile.gettempdir(), f"mlorc_fsdp_{os.getppid()}")
    half = args.steps // 2

    model, opt = build(mesh, device, args.columns)
    train(model, opt, half, rank, world, device, log=True)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=checkpoint)
    train(model, opt, args.steps - half, rank, world, device, first=half, log=True)

    resumed, resumed_opt = build(mesh, device, args.columns)
    state = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(state, checkpoint_id=checkpoint)
    resumed.load_state_dict(state["model"])
    set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
    train(resumed, resumed_opt, args.steps - half, rank, world, device, first=half)
    same = all(torch.equal(a.to_local(), b.to_local())
               for a, b in zip(model.parameters(), resumed.parameters()))
    same = torch.tensor(int(same), device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)

    mlorc_bytes = torch.tensor(mlorc.state_bytes(opt), device=device)
    adamw_bytes = sum(2 * 4 * p.to_local().numel() for p in model.parameters())   # exp_avg, exp_avg_sq
    per_rank = [torch.zeros_like(mlorc_bytes) for _ in range(world)]
    dist.all_gather(per_rank, mlorc_bytes)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        split = "columns" if args.columns else "rows"
        print(f"{world} ranks, {params:,} parameters, matrices split by {split}")
        print(f"optimizer state per rank: MLorc_AdamW {', '.join(f'{b.item():,}' for b in per_rank)} "
              f"bytes; torch.optim.AdamW would hold {adamw_bytes:,} bytes on rank 0 "
              f"({mlorc_bytes.item() / adamw_bytes:.1%})")
        print(f"resumed from DCP at step {half}: parameters after step {args.steps} "
              f"{'equal' if same.item() else 'DIFFER from'} the uninterrupted run's")
    dist.barrier()                            # no rank tears gloo down under another's feet
    dist.destroy_process_group()
    if not same.item():
        sys.exit(1)


if __name__ == "__main__":
    main()
