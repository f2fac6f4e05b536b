"""What MLorc's compression keeps of Adam's momentum and update, along real fine-tuning runs.

Each run fine-tunes a task of bench/quality.py with MLorc_AdamW (rank --rank, weight decay 0, the
task's cosine schedule) under one sketch, and keeps beside it a dense shadow of Adam's moments fed
the same gradients (the gradients of MLorc's own trajectory). At every step, over all matrices
together, it compares what MLorc used with what dense Adam would have used from the same gradients:
  m cos, m norm    the momentum m_t of [M3] that the update used, against the shadow's dense m_t:
                   cosine, and norm ratio ||m_t|| / ||dense m_t||
  u cos, u norm    MLorc's update direction d_t (the weights' change / lr) against dense Adam's
                   m_hat / (sqrt(v_hat) + eps): cosine and norm ratio
  sum u cos, norm  the same for the sums of the updates over steps 1..t: where the run has moved
                   the weights, against where dense Adam's steps from these gradients add up to
  head, tail cos   the sums at the last step split by the top-r left singular directions of dense
                   Adam's sum D (the head, P = U_r U_r^T; the tail, 1 - P): cosine of P S with P D,
                   and of (1 - P) S with (1 - P) D, where S is MLorc's sum
  overlap          how much of the subspace that m's factors keep (the span of U) was kept at the
                   previous step too: ||U_prev^T U||_F^2 / r, 1 for the same subspace, about r / rows
                   for unrelated random ones (mean over matrices)
  outside          the share of the gradient's energy outside the column and the row space of the
                   previous m~ (mlorc.outside_kept), where m~ holds no history: ||g_out||^2 / ||g||^2
  train loss       the mean training loss of the last 10 steps, beside the held-out loss at the end
With --probe-every K, every K steps, from the matrices' values before the step and on the next
(unseen) batch: the loss decrease of one step of lr along MLorc's u and along dense Adam's u_d, and
the curvature along each, x'Hx / |x|^2 (a secant estimate over the step); and at the end the share of
each sum's energy in its own top-r singular directions.
Sketches (--sketches): r+p oversampling and q power iterations as "p{p}q{q}"; "exact" (the optimal
rank-r truncation: an exact SVD); "fixed" (p0q0 with the same Gaussian Omega at every step of a
parameter, a fixed random subspace instead of a fresh one). A suffix "+ema" takes the direction from
the EMA m_t alone (full_weight_outside=False, the rule before it), e.g. p0q0+ema.

    python bench/momentum.py --task tinygpt --lr 3e-3 --plot momentum.png
    python bench/momentum.py --task tinygpt --lr 1e-2 --sketches p0q0,p4q1,fixed --probe-every 4
"""
import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import quality                                                   # noqa: E402
from quality import mlorc                                        # noqa: E402


def sketch_options(name):
    """MLorc_AdamW keyword arguments of a sketch name, and whether its Omega is fixed over steps."""
    name, _, suffix = name.partition("+")
    if suffix not in ("", "ema"):
        raise ValueError(f"unknown suffix +{suffix} (only +ema)")
    options = dict(full_weight_outside=suffix != "ema")
    if name == "exact":
        return dict(options, oversampling=10**6, power_iters=0), False    # r + p >= min(m, n): exact
    if name == "fixed":
        return dict(options, oversampling=0, power_iters=0), True
    over, iters = name[1:].split("q")
    return dict(options, oversampling=int(over), power_iters=int(iters)), False


def cosine_and_ratio(a, b):
    return (torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-30)).item(), (a.norm() / b.norm()).item()


@torch.no_grad()
def _set(params, values):
    for p, value in zip(params, values):
        p.copy_(value)


def probe(task, model, batch, before, lr, matrices, dense, b1, b2, eps, t):
    """From the matrices' values before step t, on the next step's batch (eval mode: no dropout), the loss
    change of a step of lr along MLorc's update u and along dense Adam's u_d (the matrices moved; the
    other weights held at their values after the step, the same for both): the decrease, the
    first-order decrease lr g.x that it predicts, and the curvature along x,
    x'Hx / |x|^2 ~ 2 (lr g.x - decrease) / (lr^2 |x|^2) (a secant estimate over the step)."""
    after = {p: p.detach().clone() for p in matrices}
    old = {p: before[p][0] for p in matrices}
    directions = {"u": {p: (old[p] - after[p]) / lr for p in matrices},
                  "dense": {p: (dense[p][0] / (1 - b1 ** t)) / ((dense[p][1] / (1 - b2 ** t)).sqrt() + eps)
                            for p in matrices}}
    model.eval()
    out = {}
    try:
        _set(matrices, [old[p] for p in matrices])
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            base = task.loss(model, batch)
            base.backward()
        for name, xs in directions.items():
            _set(matrices, [old[p] - lr * xs[p] for p in matrices])
            drop = base.item() - task.loss(model, batch).item()
            first = lr * sum((p.grad * xs[p]).sum().item() for p in matrices)
            norm2 = sum(xs[p].square().sum().item() for p in matrices)
            out[name + "_drop"], out[name + "_first"] = drop, first
            out[name + "_curv"] = 2 * (first - drop) / (lr * lr * norm2)
    finally:
        _set(matrices, [after[p] for p in matrices])
        model.zero_grad(set_to_none=True)
        model.train()
    return out


def track(task, sketch, lr, rank, seed=0, probe_every=0):
    """Per-step metrics (see the module docstring) of one run, and its final held-out loss; the last
    row also holds the mean training loss of the last 10 steps."""
    options, fixed = sketch_options(sketch)
    torch.manual_seed(seed)
    model = task.model(seed)
    model.train()
    opt = mlorc.MLorc_AdamW(model.parameters(), lr=lr, weight_decay=0.0, rank=rank, seed=seed, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: quality.cosine(s, task.steps))
    (b1, b2), eps = opt.defaults["betas"], opt.defaults["eps"]
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    dense = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in matrices}
    sums = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in matrices}
    original = mlorc.sketch_generator
    if fixed:                                                     # the same Omega at every step
        mlorc.sketch_generator = lambda s, index, step, device: original(s, index, 0, device)
    rows, train_losses = [], []
    try:
        batches = task.batches(seed)
        for t, batch in enumerate(batches, 1):
            loss = task.loss(model, batch)
            train_losses.append(loss.item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            before = {}
            for p in matrices:
                state = opt.state[p]
                m_old = mlorc.load_moment(state, "exp_avg", p.shape) if state else torch.zeros_like(p)
                U_old = state["exp_avg_U"].clone() if state else None
                Vh_old = state["exp_avg_Vh"].clone() if state else None
                before[p] = (p.detach().clone(), m_old.clone(), U_old, Vh_old)
            step_lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            used_m, dense_m, used_u, dense_u, overlaps, outside = [], [], [], [], [], [0.0, 0.0]
            with torch.no_grad():
                for p in matrices:
                    g, (p_old, m_old, U_old, Vh_old), (m_d, v_d) = p.grad, before[p], dense[p]
                    if U_old is not None and t > 2:               # step 1's factors come from zeros
                        U = opt.state[p]["exp_avg_U"]
                        overlaps.append(((U_old.mT @ U) ** 2).sum().item() / U.shape[1])
                        g_out = mlorc.outside_kept(g, U_old, Vh_old)
                        outside[0] += 0.0 if g_out is None else g_out.square().sum().item()
                        outside[1] += g.square().sum().item()
                    m_d.lerp_(g, 1 - b1)
                    v_d.mul_(b2).addcmul_(g, g, value=1 - b2)
                    u = (p_old - p) / step_lr                     # weight decay 0: the direction d_t
                    u_d = (m_d / (1 - b1 ** t)) / ((v_d / (1 - b2 ** t)).sqrt() + eps)
                    sums[p][0].add_(u)
                    sums[p][1].add_(u_d)
                    used_m.append((b1 * m_old + (1 - b1) * g).flatten())
                    dense_m.append(m_d.flatten().clone())
                    used_u.append(u.flatten())
                    dense_u.append(u_d.flatten())
            m_cos, m_norm = cosine_and_ratio(torch.cat(used_m), torch.cat(dense_m))
            u_cos, u_norm = cosine_and_ratio(torch.cat(used_u), torch.cat(dense_u))
            s_cos, s_norm = cosine_and_ratio(torch.cat([s[0].flatten() for s in sums.values()]),
                                             torch.cat([s[1].flatten() for s in sums.values()]))
            rows.append(dict(step=t, m_cos=m_cos, m_norm=m_norm, u_cos=u_cos, u_norm=u_norm,
                             sum_cos=s_cos, sum_norm=s_norm,
                             overlap=statistics.mean(overlaps) if overlaps else float("nan"),
                             outside=outside[0] / outside[1] if outside[1] else float("nan")))
            if probe_every and t % probe_every == 0 and t < len(batches):     # on the next, unseen batch
                rows[-1].update(probe(task, model, batches[t], before, step_lr, matrices, dense, b1, b2, eps, t))
    finally:
        mlorc.sketch_generator = original
    model.eval()
    with torch.no_grad():
        final = task.eval_loss(model)
    rows[-1]["train_loss"] = statistics.mean(train_losses[-10:])
    rows[-1].update(head_and_tail(sums, matrices, rank))
    return rows, final


def head_and_tail(sums, matrices, rank):
    """How the summed updates S (MLorc's) and D (dense Adam's on the same gradients) split between the
    top-`rank` left singular directions of D (the head, P = U_r U_r^T) and the rest (the tail):
    the energy share of each sum in its own top-`rank` directions, and the cosines of P S with P D
    and of (1 - P) S with (1 - P) D, over all matrices together."""
    out, heads, tails, tops = {}, ([], []), ([], []), {0: [0.0, 0.0], 1: [0.0, 0.0]}
    for p in matrices:
        S, D = (sums[p][i].reshape(mlorc.matrix_shape(p)) for i in (0, 1))
        U, s_D, _ = torch.linalg.svd(D, full_matrices=False)          # one SVD of D for both uses
        U = U[:, :rank]
        for i, s in enumerate((torch.linalg.svdvals(S), s_D)):
            tops[i][0] += s[:rank].square().sum().item()
            tops[i][1] += s.square().sum().item()
        for i, X in enumerate((S, D)):
            head = U @ (U.mT @ X)
            heads[i].append(head.flatten())
            tails[i].append((X - head).flatten())
    out["sum_top"], out["dense_sum_top"] = (tops[i][0] / tops[i][1] for i in (0, 1))
    out["head_cos"] = cosine_and_ratio(torch.cat(heads[0]), torch.cat(heads[1]))[0]
    out["tail_cos"] = cosine_and_ratio(torch.cat(tails[0]), torch.cat(tails[1]))[0]
    return out


def summary(runs):
    """The markdown table of {sketch: (rows, final loss)}: means over steps, sums at the last step."""
    lines = ["| sketch | m cos | m norm | u cos | u norm | sum u cos | sum u norm | head cos | tail cos | overlap "
             "| outside | train loss | held-out loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, (rows, final) in runs.items():
        mean = {k: statistics.mean(r[k] for r in rows if r[k] == r[k])
                for k in ("m_cos", "m_norm", "u_cos", "u_norm", "overlap", "outside")}
        last = rows[-1]
        lines.append(f"| {name} | {mean['m_cos']:.3f} | {mean['m_norm']:.3f} | {mean['u_cos']:.3f} | "
                     f"{mean['u_norm']:.3f} | {last['sum_cos']:.3f} | {last['sum_norm']:.3f} | "
                     f"{last['head_cos']:.3f} | {last['tail_cos']:.3f} | {mean['overlap']:.3f} | "
                     f"{mean['outside']:.3f} | {last['train_loss']:.4f} | {final:.4f} |")
    return "\n".join(lines)


def steps_summary(runs):
    """The markdown table of the probes (every --probe-every steps) and of the summed updates' rank."""
    lines = ["| sketch | decrease per step: u | u_d | curvature along u | along u_d | top-r share: sum u | "
             "sum u_d |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, (rows, _) in runs.items():
        probed, last = [r for r in rows if "u_drop" in r], rows[-1]
        mean = {k: statistics.mean(r[k] for r in probed) for k in ("u_drop", "dense_drop", "u_curv", "dense_curv")}
        lines.append(f"| {name} | {mean['u_drop']:.4f} | {mean['dense_drop']:.4f} | {mean['u_curv']:.3g} | "
                     f"{mean['dense_curv']:.3g} | {last['sum_top']:.3f} | {last['dense_sum_top']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--task", choices=quality.TASKS, default="tinygpt")
    ap.add_argument("--sketches", default="p0q0,p4q0,p4q1,exact,fixed")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=os.path.join(HERE, ".cache"))
    ap.add_argument("--plot", default="", help="PNG path of the curves ('' for none)")
    ap.add_argument("--probe-every", type=int, default=0, help="probe the loss along u and u_d every this "
                    "many steps (0: never)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.cache, exist_ok=True)
    task = quality.TASKS[args.task](args.cache)
    runs = {name: track(task, name, args.lr, args.rank, args.seed, args.probe_every)
            for name in args.sketches.split(",")}
    print(f"{args.task}, MLorc_AdamW rank {args.rank}, lr {args.lr:g}, seed {args.seed}: means over steps "
          f"(m, u) and at the last step (sum u)")
    print(summary(runs))
    if args.probe_every:
        print(f"\nEvery {args.probe_every} steps, one step of lr from the same weights, on the next batch (means"
              " over probes); the summed update's energy in its top-r singular directions (mean over matrices,"
              " energy-weighted)")
        print(steps_summary(runs))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = [("m_cos", "cos(m, dense m)"), ("overlap", "subspace kept from the last step"),
                ("u_cos", "cos(d, dense d)"), ("sum_cos", "cos(sum d, sum dense d)")]
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
        for ax, (key, title) in zip(axes, keys):
            for name, (rows, _) in runs.items():
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
            ax.set(title=title, xlabel="step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{args.task}: MLorc_AdamW rank {args.rank}, lr {args.lr:g}, against dense Adam on "
                     "the same gradients", fontsize=10)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
