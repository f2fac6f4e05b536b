"""Full fine-tuning of a small LLaMA-architecture model with MLorc, next to AdamW and LoRA.

Everything is built locally; nothing is downloaded:
  model      a transformers LlamaForCausalLM built from a LlamaConfig (random init), byte-level
             tokens (vocab 256), fp32.
  pretrain   --pretrain-steps of torch AdamW on Python source code: the top-level modules of this
             Python's own standard library (Lib/*.py).
  fine-tune  every run starts from that same pretrained model and trains --steps steps on English
             prose: the reference documentation that ships with Python (pydoc_data.topics, the text
             behind help("if")); the last 10% of it is held out for the eval loss. Every run sees
             the same batches in the same order.

The runs (--runs picks among them):
  adamw        torch.optim.AdamW, all parameters (the baseline: dense moments)
  mlorc        mlorc.MLorc_AdamW, all parameters, rank --rank moments, opt.step() after backward
  mlorc_fused  the same optimizer stepped from the backward pass (mlorc.attach_fused_backward): each
               gradient is freed as soon as its parameter is updated. Same arithmetic as `mlorc`
               (the same sketch seeds), less memory.
  lora         peft LoRA (rank --lora-rank on every attention and MLP projection) + torch AdamW; the
               base weights are frozen
  lion_fused   mlorc.MLorc_Lion in the fused mode with its per-parameter gradient clipping
               (clip_threshold), the clipping that still works when gradients are freed early

What the fused mode cannot do, and why: the optimizer steps each parameter inside backward(), so
  - gradient accumulation needs attach_fused_backward(..., accumulation_steps=k), which steps each
    parameter at its k-th gradient; without it every backward() is a step;
  - global gradient-norm clipping (torch.nn.utils.clip_grad_norm_) is impossible: the norm over all
    parameters is only known after the last gradient, when the others have been applied and freed.
    --max-grad-norm is therefore applied to the step() runs only; MLorc_Lion's clip_threshold clips
    each parameter's gradient on its own and works in both modes.

Peak memory: bytes allocated by PyTorch while a fresh copy of the run (model, optimizer, LoRA
adapters) is built and trained for --mem-steps steps on the first batches, above what was allocated
before. Parameters, gradients, optimizer state, activations and temporaries are all counted.
  cuda: torch.cuda.max_memory_allocated() after torch.cuda.reset_peak_memory_stats().
  cpu:  PyTorch has no CPU peak counter, so the run is traced by torch.profiler with
        profile_memory=True, which records every CPU allocation and free of PyTorch's allocator with
        its size; the peak is the maximum of their running sum. Process RSS is not used: the C
        allocator keeps freed memory, and the Python objects around tensors would be counted too.
The timed training runs are not traced.

    python examples/finetune_llama.py --plot examples/finetune_llama.png    # CPU: about 3.5 minutes
    python examples/finetune_llama.py --device cuda --hidden 1024 --layers 8 --heads 16 --seq-len 256 \
        --pretrain-steps 200 --steps 150 --pretrain-lr 1e-3 --lr 1e-3 --mlorc-lr 1e-3 --lora-lr 1e-3 \
        --lion-lr 3e-4 --eval-every 30 --log-every 50                  # a 102M-parameter model on a GPU
"""

import argparse
import glob
import math
import os
import sys
import sysconfig
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # build from configs only; never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5.x renames, raised from peft

import torch                                           # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mlorc                                           # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:                                    # no bar: print a line every --log-every steps
    tqdm = None

RUNS = ("adamw", "mlorc", "mlorc_fused", "lora", "lion_fused")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--runs", default="adamw,mlorc,mlorc_fused,lora,lion_fused",
                    help="comma-separated, from: " + ", ".join(RUNS))
    ap.add_argument("--hidden", type=int, default=256, help="hidden size")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--intermediate", type=int, default=None,
                    help="MLP size (default: 8/3 hidden, rounded up to a multiple of 32)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens (bytes) per sequence")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--pretrain-steps", type=int, default=200, help="AdamW steps on Python source code")
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=120, help="fine-tuning steps per run")
    ap.add_argument("--lr", type=float, default=3e-3, help="fine-tuning lr of AdamW")
    ap.add_argument("--mlorc-lr", type=float, default=3e-3, help="fine-tuning lr of MLorc_AdamW (its best "
                    "on this task with the default sketch, bench/quality.py)")
    ap.add_argument("--lion-lr", type=float, default=1e-3, help="fine-tuning lr of MLorc_Lion")
    ap.add_argument("--lora-lr", type=float, default=3e-3, help="fine-tuning lr of LoRA")
    ap.add_argument("--rank", type=int, default=4, help="MLorc rank of the moments")
    ap.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--weight-decay", type=float, default=0.01,
                    help="on matrices only (finetune_param_groups)")
    ap.add_argument("--dense-embeddings", action="store_true",
                    help="MLorc: dense moments for the input and output embeddings")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                    help="fine-tune without activation checkpointing (each layer recomputed in backward)")
    ap.add_argument("--max-grad-norm", type=float, default=0.0,
                    help="global gradient clipping of the step() runs (0: off); impossible in the fused runs")
    ap.add_argument("--clip-threshold", type=float, default=1.0, help="per-parameter clipping of lion_fused")
    ap.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the cosine schedule")
    ap.add_argument("--eval-every", type=int, default=20, help="eval loss every this many steps")
    ap.add_argument("--eval-batches", type=int, default=4, help="held-out batches per eval")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps of the peak-memory measurement (0: skip)")
    ap.add_argument("--log-every", type=int, default=20, help="print the loss every this many steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default); 1 is robust on a shared machine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="finetune_llama.png", help="PNG path of the loss plot ('' for none)")
    args = ap.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for r in args.runs:
        if r not in RUNS:
            ap.error(f"unknown run {r!r}; choose from {', '.join(RUNS)}")
    if args.intermediate is None:
        args.intermediate = 32 * math.ceil(8 * args.hidden / 3 / 32)
    return args


# ----------------------------------------------------------------------------------------------------
# Data: byte-level tokens of text that ships with Python.

def stdlib_texts():
    """(code, prose) as uint8 tensors: the standard library's top-level modules, and its reference
    documentation (pydoc_data.topics; if a distribution left it out, the package modules instead)."""
    lib = sysconfig.get_paths()["stdlib"]
    code = b"".join(open(path, "rb").read() for path in sorted(glob.glob(os.path.join(lib, "*.py"))))
    try:
        from pydoc_data.topics import topics
        prose = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    except ImportError:
        paths = sorted(glob.glob(os.path.join(lib, "*", "*.py")))
        prose = b"".join(open(path, "rb").read() for path in paths)
    return (torch.frombuffer(bytearray(code), dtype=torch.uint8),
            torch.frombuffer(bytearray(prose), dtype=torch.uint8))


def random_batches(data, steps, batch_size, seq_len, seed):
    """`steps` batches of random windows of `data`, the same for every run with the same seed."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)
        yield torch.stack([data[s:s + seq_len] for s in starts.tolist()]).long()


def eval_batches(data, n_batches, batch_size, seq_len):
    """Fixed, evenly spaced windows of held-out text."""
    n = n_batches * batch_size
    starts = torch.linspace(0, len(data) - seq_len - 1, n).long().tolist()
    windows = torch.stack([data[s:s + seq_len] for s in starts]).long()
    return list(windows.split(batch_size))


# ----------------------------------------------------------------------------------------------------
# Model, runs, training

def build_model(args, device, checkpointing=False):
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).to(device)
    if checkpointing:                                # renamed in transformers 5.x; older names still work
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    return model


def without_rank(groups):
    """finetune_param_groups' groups for torch.optim.AdamW, which has no rank."""
    return [{k: v for k, v in group.items() if k != "rank"} for group in groups]


def lm_loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss            # labels are shifted inside


def make_run(name, args, device, pretrained):
    """A fresh model with the pretrained weights, its optimizer and scheduler, and whether it is fused."""
    torch.manual_seed(args.seed)                     # LoRA's init draws from the global RNG
    model = build_model(args, device, checkpointing=args.checkpointing)
    model.load_state_dict(pretrained)
    groups = mlorc.finetune_param_groups(model, args.weight_decay, rank=args.rank,
                                         dense_embeddings=args.dense_embeddings)
    fused = name.endswith("_fused")
    if name == "adamw":
        opt = torch.optim.AdamW(without_rank(groups), lr=args.lr)
    elif name in ("mlorc", "mlorc_fused"):
        opt = mlorc.MLorc_AdamW(groups, lr=args.mlorc_lr)
    elif name == "lion_fused":
        opt = mlorc.MLorc_Lion(groups, lr=args.lion_lr, clip_threshold=args.clip_threshold)
    elif name == "lora":
        from peft import LoraConfig, get_peft_model
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                 lora_dropout=0.0, target_modules=targets))
        groups = mlorc.finetune_param_groups(model, args.weight_decay, rank=None)  # the adapters only
        opt = torch.optim.AdamW(without_rank(groups), lr=args.lora_lr)
    if fused:
        mlorc.attach_fused_backward(model, opt)                   # hooks step each parameter in backward
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup * args.steps), args.steps)
    return model, opt, sched, fused


def train_step(model, opt, sched, fused, tokens, max_grad_norm):
    loss = lm_loss(model, tokens)
    if fused:
        loss.backward()          # each parameter is updated here and its gradient freed
        opt.step()               # finds no gradient, so it only finishes the step (end_step(): the d
                                 # estimate of Prodigy / D-Adapt Lion); calling step() rather than
                                 # end_step() also keeps torch's LR scheduler from warning that
                                 # optimizer.step() was never called
    else:
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sched.step()                 # schedulers work the same in both modes
    return loss.detach()


@torch.no_grad()
def evaluate(model, batches, device):
    was_training = model.training
    model.eval()
    loss = sum(lm_loss(model, b.to(device)).item() for b in batches) / len(batches)
    model.train(was_training)
    return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(iterable, total, desc):
    if tqdm is None:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def log(bar, text):
    (bar.write if tqdm is not None and hasattr(bar, "write") else print)(text)


def train(name, model, opt, sched, fused, batches, steps, args, device, evals=None):
    """Train; return (train losses per step, [(step, eval loss)], seconds spent in training steps)."""
    model.train()
    losses, eval_curve, seconds = [], [], 0.0
    if evals is not None:
        eval_curve.append((0, evaluate(model, evals, device)))
    bar = progress(batches, steps, name)
    for step, tokens in enumerate(bar, 1):
        sync(device)
        start = time.perf_counter()
        loss = train_step(model, opt, sched, fused, tokens.to(device), args.max_grad_norm)
        sync(device)
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{name}: loss is {losses[-1]} at step {step}; lower the learning rate")
        if evals is not None and (step % args.eval_every == 0 or step == steps):
            eval_curve.append((step, evaluate(model, evals, device)))
        if tqdm is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % args.log_every == 0 or step == steps:
            ev = f"  eval {eval_curve[-1][1]:.4f}" if eval_curve and eval_curve[-1][0] == step else ""
            log(bar, f"{name:<12} step {step:>5}/{steps}  loss {losses[-1]:.4f}{ev}")
    if tqdm is not None:
        bar.close()
    return losses, eval_curve, seconds


# ----------------------------------------------------------------------------------------------------
# Peak memory

def peak_memory(name, args, device, pretrained, data):
    """Peak bytes allocated while a fresh copy of the run is built and trained for --mem-steps steps,
    above what was allocated before (see the module docstring for how, on CPU and on CUDA)."""
    batches = random_batches(data, args.mem_steps, args.batch_size, args.seq_len, args.seed)

    def run():
        model, opt, sched, fused = make_run(name, args, device, pretrained)
        for tokens in batches:
            train_step(model, opt, sched, fused, tokens.to(device), args.max_grad_norm)
        sync(device)

    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e[0])                  # stable: same-time events keep their order
    live = peak = 0
    for _, nbytes in events:                         # > 0: allocation, < 0: free
        live += nbytes
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------------
# Report

LABELS = {"adamw": "AdamW", "mlorc": "MLorc_AdamW r={rank}", "mlorc_fused": "MLorc_AdamW r={rank} fused",
          "lora": "LoRA r={lora_rank} + AdamW", "lion_fused": "MLorc_Lion r={rank} fused, clip"}


def label(name, args):
    return LABELS[name].format(rank=args.rank, lora_rank=args.lora_rank)


def mib(nbytes):
    return f"{nbytes / 2**20:,.2f} MiB"


def print_table(results, args, reference_eval):
    print(f"\npretrained model before fine-tuning: eval loss {reference_eval:.4f}")
    head = ("| optimizer | trainable params | final train loss | final eval loss | state bytes "
            "| peak memory | time |")
    print(head)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        peak = mib(r["peak"]) if r["peak"] is not None else "-"
        print(f"| {label(r['name'], args)} | {r['trainable']:,} | {r['train']:.4f} | {r['eval']:.4f} "
              f"| {r['state']:,} | {peak} | {r['seconds']:.1f} s |")
    print(f"(train loss: mean of the last {min(10, args.steps)} steps; eval loss on "
          f"{args.eval_batches * args.batch_size} held-out windows; "
          f"time: the {args.steps} training steps only)")


def plot(results, args, reference_eval, pretrain_losses):
    if not args.plot:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax0.plot(range(1, len(pretrain_losses) + 1), pretrain_losses, color="gray")
    ax0.set(title="pretraining on Python source (AdamW)", xlabel="step", ylabel="train loss (nats/byte)")
    for r in results:
        smooth, ema = [], r["losses"][0]
        for x in r["losses"]:
            ema = 0.9 * ema + 0.1 * x
            smooth.append(ema)
        style = dict(label=label(r["name"], args), linestyle="--" if r["name"].endswith("_fused") else "-")
        ax1.plot(range(1, len(smooth) + 1), smooth, **style)
        steps, values = zip(*r["curve"])
        ax2.plot(steps, values, marker="o", markersize=3, **style)
    ax1.set(title="fine-tuning on Python's docs: train loss (EMA 0.9)", xlabel="step", ylabel="loss")
    ax2.set(title="held-out eval loss (dotted: before fine-tuning)", xlabel="step", ylabel="loss")
    ax2.axhline(reference_eval, color="gray", linestyle=":", linewidth=1)
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax0.grid(alpha=0.3)
    fig.suptitle(f"LLaMA {args.layers}x{args.hidden} (vocab 256, bytes), "
                 f"batch {args.batch_size}x{args.seq_len}, {args.device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot written to {args.plot}")


def pretrain(args, device, code):
    """A fresh random model trained with AdamW on Python source; returns (state dict, losses, seconds)."""
    torch.manual_seed(args.seed)
    model = build_model(args, device)
    print(f"model: LLaMA {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, on {device}")
    opt = torch.optim.AdamW(without_rank(mlorc.finetune_param_groups(model, args.weight_decay)),
                            lr=args.pretrain_lr)
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup * args.pretrain_steps), args.pretrain_steps)
    batches = random_batches(code, args.pretrain_steps, args.batch_size, args.seq_len, args.seed + 1)
    losses, _, seconds = train("pretrain", model, opt, sched, False, batches, args.pretrain_steps, args,
                               device)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses, seconds


def fine_tune(name, args, device, pretrained, train_text, evals):
    """One run from the pretrained weights: its curves, final losses, state bytes and peak memory."""
    model, opt, sched, fused = make_run(name, args, device, pretrained)
    batches = random_batches(train_text, args.steps, args.batch_size, args.seq_len, args.seed + 2)
    losses, curve, seconds = train(label(name, args), model, opt, sched, fused, batches, args.steps,
                                   args, device, evals)
    result = dict(name=name, losses=losses, curve=curve, seconds=seconds, eval=curve[-1][1],
                  train=sum(losses[-10:]) / len(losses[-10:]), state=mlorc.state_bytes(opt),
                  trainable=sum(p.numel() for p in model.parameters() if p.requires_grad), peak=None)
    del model, opt, sched
    if args.mem_steps > 0:
        result["peak"] = peak_memory(name, args, device, pretrained, train_text)
    return result


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "lora" in args.runs:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("peft is not installed: skipping the LoRA run")
            args.runs.remove("lora")
    if args.max_grad_norm > 0 and any(name.endswith("_fused") for name in args.runs):
        print(f"--max-grad-norm {args.max_grad_norm} clips the step() runs only: the fused runs cannot "
              "clip by the global norm (their gradients are applied and freed during backward)")
    code, prose = stdlib_texts()
    split = int(0.9 * len(prose))
    train_text, eval_text = prose[:split], prose[split:]
    evals = eval_batches(eval_text, args.eval_batches, args.batch_size, args.seq_len)
    print(f"pretraining text: {len(code):,} bytes of Python source; fine-tuning text: "
          f"{len(train_text):,} bytes of Python's docs, {len(eval_text):,} held out")
    pretrained, pretrain_losses, seconds = pretrain(args, device, code)
    model = build_model(args, device)
    model.load_state_dict(pretrained)
    reference_eval = evaluate(model, evals, device)
    del model
    print(f"pretrained in {seconds:.1f} s; eval loss on the held-out docs before fine-tuning "
          f"{reference_eval:.4f}")
    results = [fine_tune(name, args, device, pretrained, train_text, evals) for name in args.runs]
    print_table(results, args, reference_eval)
    plot(results, args, reference_eval, pretrain_losses)
    return results


if __name__ == "__main__":
    main()
