"""
MLorc: Momentum Low-rank Compression (arXiv 2506.01897), in one readable file.

An Adam- or Lion-style optimizer keeps moments (m, and v for Adam) as large as the model itself. MLorc
keeps the moment of every weight matrix W (m x n) as a rank-r factorization U diag(s) Vh instead, and
recompresses it after every step with a randomized SVD. The weight update itself is not rank-limited
(unlike LoRA), and the moment, not the gradient, is compressed (unlike GaLore).

The moment cycle, run for each matrix at each step (labels are cited in the code below):

    [M1] reconstruct   m~ = U_m diag(s_m) Vh_m,  v~ = U_v diag(s_v) Vh_v           (paper, Alg. 1)
    [M2] repair v~     a low-rank v~ can dip below 0: entries < 0 become c, the mean of |v~_ij|
                       over those entries (paper, Sec. 3; exactly what the authors' code does)
    [M3] EMA           m_t = b1 m~ + (1 - b1) g,   v_t = b2 v~ + (1 - b2) g * g    (dense, exact)
    [M4] recompress    (U, s, Vh) = rsvd(m_t, r), the same for v_t; only the factors are kept
    [M5] bias-correct  m_hat = m_t / (1 - b1^t),  v_hat = v_t / (1 - b2^t)         (where the parent does)
    [M6] direction     the parent optimizer's rule on the dense m_t, v_t (Adam, Lion, Prodigy, ...),
                       clamped to what the parent could reach at step t (below); AdamW and Lion take
                       the part of g where m~ holds no history at full weight (below)
    [M7] apply         p <- p (1 - lr wd) - lr d                                   (decoupled decay)

Randomized SVD (Halko, Martinsson, Tropp 2011, arXiv 0909.4061): draw Omega (n x (r + p)) from the
optimizer's own seeded generator, Y = A Omega, optional power iterations, Q = orth(Y), B = Q^T A,
B = U~ S Vh (small SVD), U = Q U~; keep the top r. When r + p >= min(m, n) the exact thin SVD is used,
so the factors then hold the moment exactly: this is what makes the full-rank tests exact.

Bounded steps ([M2], [M6]): m~ and v~ are compressed independently, so where v~ rebuilds to about 0
and m~ does not, m / sqrt(v) has no limit: on bench/bounds.py's patterns (embedding-like rows that
get a gradient now and then, a noisy quadratic) single entries moved 14-146x (AdamW) and up to 3500x
(Prodigy) further than with dense moments. Dense Adam cannot do this: m_t and v_t average the same
gradients, so by Cauchy-Schwarz |m_t| <= C_t sqrt(v_t) (adam_ratio_bound; |m_hat / sqrt(v_hat)| <=
B_t, B_100 = 2.24, B_inf = 7.27 for (0.9, 0.999)). So [M6] clamps the direction of compressed
AdamW and Prodigy to that bound, which changes nothing the dense parent could compute, and all
full-rank oracles hold. On bench/quality.py's tasks it made held-out loss no worse and in places
better (LLaMA rank 4 in pure PyTorch: +8.1% over AdamW to +4.6%, its best lr 1e-3 to 3e-3; the
encoder: +11.0% to +7.6%; BENCHMARKS.md, "Bounded steps"). CAME's m averages
u = g / sqrt(V), so |m_ij| <= R_i, C_j, the same averages of u's row and column norms (m + n numbers
of state): [M2] clamps its rebuilt m~ to min(R_i, C_j). ADOPT clips its normalized gradient as its
parent does, so its m is bounded already; Lion-type steps are signs.

Where m~ holds no history ([M3], [M6]). In m_t = b1 m~ + (1 - b1) g, dense Adam's m~ holds the
history of every direction, so a gradient that persists counts ~1 in m_hat. A rank-r m~ holds
history only in the column and row spaces of its factors; the rest of g (at rank 4, 0.2-0.3 of its
energy on the LLaMA task, 0.5-0.6 on the small GPT: bench/momentum.py) counts 1 - b1 = 0.1 at every
step. So with the EMA alone the step leans towards the kept directions by up to 1 / (1 - b1), and
that lean was what compressing m cost (bench/quality.py, three tasks, three seeds; BENCHMARKS.md,
"Where m~ holds no history"). Tests that could have refuted it did not: a larger b1 made the loss
worse (0.95: small GPT +2.0%, LLaMA +5.7% over AdamW; 0.98: +3.5%, +9.3%; against +1.8%, +4.4%),
rescaling m~ to m_t's norm made it worse (+10.1%, +6.8%), b1 = 0 removed the cost (small GPT
-0.4%). It was also the sketch's effect: an accurate sketch keeps the same top directions step
after step (0.81-0.86 of the subspace, against 0.26-0.65 for a fresh Gaussian sketch), so the same
directions were starved at every step. Hence the default full_weight_outside=True: the part of g
outside both spaces of the previous m~ (outside_kept) enters m_hat at weight 1, as if it had
persisted; the stored m_t stays the EMA. Held-out loss against AdamW at rank 4 went from +1.8%,
+4.4%, +7.6% (small GPT, LLaMA, encoder) to -0.6%, -3.3%, -8.0%, at AdamW's lr or up to 3x it
(before: 1-10x); on a 4x longer LLaMA run to -2.2%, where the EMA alone cost +14.5% (the lean's
cost accumulates). An accurate sketch now costs little (-0.3%, -1.6%, -3.3%; it cost +4.4%,
+3.5%, +62.9%). Outside the kept spaces this step does no averaging, so it is larger than dense
Adam's (2.3-2.9x in norm along those runs), still within [M6]'s bound. At full rank nothing is
outside, nor where the gradients stay in the kept spaces: the step is dense Adam's. MLorc_Lion's
sign(b1 m~ + (1 - b1) g) has the same lean and the same default (against its EMA alone: small GPT
-0.5%, LLaMA -5.5%, encoder -6.8%), and so do MLorc_DAdapt_Lion's (-2.9%, -6.7%, -3.8%) and
MLorc_Prodigy's, whose m averages d g: there the outside part enters at d (1 - b1^t), dense m's
weight for a gradient that persists (-3.5%, -7.0%, -17.3%). ADOPT and CAME keep the EMA alone:
for ADOPT the transcription was mixed (+0.6%, -3.4%); for CAME it helped (-1.8%, -6.6%) but
CAME's confidence factor, which compares m with u, multiplied the added part unchecked: on sparse
gradients weights moved up to 23x as far as dense CAME's (tests/test_bounds.py).

Which sketch ([M4]): oversampling=0, power_iters=0. With the EMA alone, no power iteration matched
or beat one at rank 4 on every task and no oversampling was best or tied; with full_weight_outside
an accurate sketch comes close (behind on the encoder), and the fresh one does half of [M4]'s work.

Memory: a dense moment of an (m, n) matrix costs m n floats; rank-r factors U (m, r), s (r), Vh (r, n)
cost r (m + n + 1). For 4096 x 4096 at r = 4, AdamW keeps 2 * 16.8M = 33.6M floats, MLorc_AdamW keeps
2 * 32,772 = 65.5K (about 512x less); Lion-type variants keep one moment. The transient cost is one
dense (m, n) reconstruction per moment while that parameter is being updated, and the gradient itself
stays dense. With the fused backward pass (attach_fused_backward) each parameter is stepped and its
gradient freed during backward, so peak memory is bounded by the largest matrix, not the whole model.

Which parameters are compressed: every parameter with ndim >= 2, in its natural layout (shape[0], rest):
a Linear weight as (out, in), a conv filter as (out, in * kh * kw). Parameters with ndim < 2 (biases,
norm weights) keep dense moments and are trained like any other. A group with rank=None keeps dense
moments for all its parameters.

The six optimizers, each exact at full rank against its uncompressed parent:
    MLorc_AdamW        torch.optim.AdamW                  (Loshchilov & Hutter, arXiv 1711.05101)
    MLorc_Lion         lion_pytorch.Lion                  (Chen et al., arXiv 2302.06675)
    MLorc_Prodigy      prodigyopt.Prodigy                 (Mishchenko & Defazio, arXiv 2306.06101)
    MLorc_DAdapt_Lion  dadaptation.DAdaptLion             (Defazio & Mishchenko, arXiv 2301.07733)
    MLorc_Adopt        adopt.ADOPT                        (Taniguchi et al., arXiv 2411.02853)
    MLorc_CAME         came_pytorch.CAME (m compressed)   (Luo et al., arXiv 2307.02047)
Options (per param group):
    use_grams          d <- sign(g) |d|                   (Grams, arXiv 2412.17107)
    use_atan2          Adam's m / (sqrt(v) + eps) becomes (4/pi) atan2(m, sqrt(v))  (arXiv 2407.05872)
    use_orthograd      drop the part of g parallel to w, keep |g|  (Grokking at the edge, arXiv 2501.04697)
    use_cautious       zero update entries whose sign disagrees with g  (Cautious, arXiv 2411.16085)
    clip_threshold     Lion family: clip each gradient to this L2 norm
    stochastic_rounding  bf16 parameters: round the update stochastically (unbiased)

Usage:
    import mlorc
    opt = mlorc.MLorc_AdamW(model.parameters(), lr=1e-3, rank=4)    # your AdamW lr (up to 3x)
    for x, y in data:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()

The optional C++ extension in csrc/ (when it sits beside this file) is built on the first step with
torch's cpp_extension: about 25 s on 2 CPU cores, once (cached in TORCH_EXTENSIONS_DIR). MLORC_EXTENSION=0
turns it off; mlorc.py copied alone runs in pure PyTorch, with no warning.

How to read this file. Part 1 is the optimizer: the randomized SVD, the moment state, the update
rules (dense tensors and numbers in, new tensors out), and _MLorcOptimizer._step_param, the plain
per-parameter step that is the definition ([M1]-[M7] in order; each variant only supplies
_direction), then the six thin classes. Part 2 holds the faster paths, each tested equal to the plain
step: same-shape matrices compressed in batched calls, the C++/CUDA extension's one-pass ops, and
FSDP2's sharded parameters, stepped on each rank's block. _MLorcOptimizer._step_params picks the
path, in one place. `python mlorc.py` runs a small demo that prints the loss and the optimizer-state
bytes of AdamW and MLorc side by side.
"""

import collections
import contextlib
import contextvars
import math
import os
import sys
import time
import warnings

import torch

__all__ = [
    "MLorc_AdamW", "MLorc_Lion", "MLorc_Prodigy", "MLorc_DAdapt_Lion", "MLorc_Adopt", "MLorc_CAME",
    "attach_fused_backward", "extension_loaded", "extension_ready", "finetune_param_groups", "rsvd",
    "state_bytes",
]

ATAN2_SCALE = 4 / math.pi  # Adam-atan2's a: makes the update's scale match Adam's for |m| ~ sqrt(v)


# ----------------------------------------------------------------------------------------------------
# Randomized SVD

def sketch_seed(seed, index, step):
    """A 63-bit seed for parameter `index` at `step` (splitmix64 finalizer), so each sketch is
    reproducible from integers saved in the state dict, and never depends on Python's hash()."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03 + step) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


def sketch_generator(seed, index, step, device):
    """The generator for one parameter's step: every random draw of the step comes from it."""
    return torch.Generator(device=device).manual_seed(sketch_seed(seed, index, step))


def rsvd(A, rank, oversampling=0, power_iters=0, generator=None):
    """Rank-`rank` factors (U, s, Vh) of the matrix A with A ~ (U * s) @ Vh (Halko et al. 2011).

    s is sorted descending and non-negative; U and Vh have orthonormal columns / rows. When
    rank + oversampling >= min(m, n) the thin SVD is exact and truncated optimally instead of sketched.
    The sketch is drawn from `generator` (a fixed seed if None), never from the global RNG. A may also
    be a batch (L, m, n) of same-shape matrices with a list of L generators: each matrix then gets
    what it would get alone, in a few batched calls instead of L small ones.
    """
    m, n = A.shape[-2:]
    k = min(rank, m, n)
    width = rank + oversampling
    if width >= min(m, n):
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        return U[..., :k], s[..., :k], Vh[..., :k, :]
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    Q = sketch_basis(A, width, power_iters, generators)
    # A^T Q is formed as (Q^T A)^T: CPU BLAS took 5-10x longer for A.mT @ Q than for this wide product
    return factors_from(Q, (Q.mT @ A).mT, k)


def sketch_basis(A, width, power_iters, generators):
    """Q, an orthonormal basis (m, width) of A's sketched range A Omega, power_iters times refined
    (each matrix of a batch with its own generator's Omega)."""
    omega = gaussian_sketch(generators, A.shape[-1], width, A).view(*A.shape[:-2], A.shape[-1], width)
    Q = torch.linalg.qr(A @ omega).Q                              # (m, r + p): Householder, so an all-zero
    for _ in range(power_iters):                                  # or rank-deficient sketch stays finite
        Q = torch.linalg.qr((Q.mT @ A).mT).Q                      # A^T Q: (n, r + p)
        Q = torch.linalg.qr(A @ Q).Q                              # (m, r + p)
    return Q


def factors_from(Q, AtQ, k):
    """The top k factors (U, s, Vh) of A ~ Q Q^T A, given Q and A^T Q (n, r + p): B = Q^T A =
    R_B^T Q_B^T, so only a (r + p)^2 SVD is needed."""
    Q_B, R_B = torch.linalg.qr(AtQ)
    U_small, s, W_h = torch.linalg.svd(R_B.mT)
    return Q @ U_small[..., :k], s[..., :k], W_h[..., :k, :] @ Q_B.mT


def gaussian_sketch(generators, n, width, like):
    """The test matrices Omega, (len(generators), n, width), each drawn from its own generator. Laid
    out by columns, as torch.linalg.qr returns Q: CPU BLAS multiplied A by a row-major Omega at half
    the speed."""
    return torch.stack([torch.randn(n, width, device=like.device, dtype=like.dtype,
                                    generator=g if g is not None
                                    else torch.Generator(device=like.device).manual_seed(0)).mT
                        for g in generators]).mT


def reconstruct(U, s, Vh):
    """[M1] The dense matrix (U * s) @ Vh of rank-r factors."""
    return (U * s) @ Vh


# ----------------------------------------------------------------------------------------------------
# Reductions: every sum or mean over a parameter in the update rules goes through these
# functions. In one process each is the plain torch call. A parameter split across ranks (FSDP2) is
# stepped on each rank's block inside reductions_across(shards) (section "Sharded parameters"), which
# makes them complete their sums across its ranks: the rules are written once, for whole tensors.

_SPLIT = contextvars.ContextVar("mlorc_split", default=None)     # the Sharded being stepped, if any


def total(partial):
    """Sums over a parameter's entries (any tensor of them), completed across ranks where it is split."""
    split = _SPLIT.get()
    return partial if split is None else split.total(partial)


def reduce_matmul(a, b, over):
    """a @ b, whose summed dim stands for the parameter's dim `over` (0: rows, -1: columns),
    completed across ranks where the parameter is split along that dim."""
    split = _SPLIT.get()
    if split is None or over % split.ndim != split.dim:
        return a @ b
    return split.total(a @ b)


def whole_shape(x):
    """The whole parameter's shape, where x is one rank's block of it (x's own shape otherwise)."""
    split = _SPLIT.get()
    return x.shape if split is None else split.shape


def reduce_sum(x, dim=None, over=None):
    """Sum of x over `dim` (all entries if None). `over` names the parameter dim that `dim` of x stands
    for, when x is a statistic with fewer dims than the parameter (default: dim)."""
    split = _SPLIT.get()
    if split is not None:
        return split.sum(x, dim, over)
    return x.sum() if dim is None else x.sum(dim)


def reduce_mean(x, dim=None, over=None):
    """Mean of x over `dim` (all entries if None), as reduce_sum."""
    split = _SPLIT.get()
    if split is not None:
        return split.mean(x, dim, over)
    return x.mean() if dim is None else x.mean(dim)


def subsample(x, every):
    """Every `every`-th entry of the flattened x (Prodigy's and D-Adaptation's slice_p)."""
    split = _SPLIT.get()
    return x.reshape(-1)[::every] if split is None else split.subsample(x, every)


# ----------------------------------------------------------------------------------------------------
# Low-rank moment state: the only code that knows whether a moment is dense or factored.

def matrix_shape(p):
    """The natural (rows, cols) layout of a parameter: (out, in) for Linear, (out, in*kh*kw) for conv."""
    return p.shape[0], math.prod(p.shape[1:])


def state_dtype(p):
    """Moments and factors are fp32 (fp64 for fp64 parameters), whatever the parameter dtype."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def init_moment(p, rank, shape=None):
    """State entries of one zero moment: rank-r factors for matrices, a dense tensor otherwise. When
    p is one rank's shard, `shape` is the whole parameter's (it decides the rank kept)."""
    dtype = state_dtype(p)
    if p.ndim < 2 or rank is None:
        return {"": torch.zeros_like(p, dtype=dtype)}
    rows, cols = matrix_shape(p)
    k = min(rank, shape[0], math.prod(shape[1:])) if shape is not None else min(rank, rows, cols)
    return {"_U": p.new_zeros(rows, k, dtype=dtype), "_s": p.new_zeros(k, dtype=dtype),
            "_Vh": p.new_zeros(k, cols, dtype=dtype)}


def load_moment(state, name, shape):
    """[M1] The dense moment `name` from the state, reconstructed if it is factored."""
    if name in state:
        return state[name]
    return reconstruct(*factors(state, name)).view(shape)


def negative_mean(v):
    """[M2]'s c: the mean of |v| over the negative entries of v (0 if there are none). No host sync."""
    negative = v < 0
    summed, count = total(torch.stack([-v.clamp(max=0).sum(), negative.sum().to(v.dtype)]))
    return summed / count.clamp(min=1)


def factors(state, name):
    """The (U, s, Vh) factors of the factored moment `name` (contiguous, as the extension wants)."""
    return tuple(state[name + suffix].contiguous() for suffix in ("_U", "_s", "_Vh"))


def repair_second_moment(v):
    """[M2] A low-rank reconstruction of a non-negative matrix can be negative: entries below 0 are
    replaced by c, the mean of |v| over those entries (the paper's fix)."""
    return torch.where(v < 0, negative_mean(v), v)


# ----------------------------------------------------------------------------------------------------
# Update rules: dense tensors and floats in, new tensors out. None touches a state dict or parameter.

# (a) gradient transforms

def clip_by_norm(g, max_norm):
    """Scale g so its L2 norm is at most max_norm (None: unchanged). Out of place: g may alias p.grad.
    The norm is taken in fp64: the fp32 norm of finite entries above ~1e19 overflows."""
    if max_norm is None:
        return g
    norm = total(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2).sqrt()
    return g * (max_norm / norm.clamp(min=max_norm)).to(g.dtype)


def orthograd(w, g, eps=1e-30):
    """OrthoGrad (arXiv 2501.04697): remove the component of g parallel to the weight w, then rescale
    to g's norm, so the step cannot simply grow or shrink the weight (naive loss minimization)."""
    w, g_flat = w.reshape(-1).double(), g.reshape(-1).double()    # fp64: |g|^2 overflows fp32 at 1e19
    wg, ww, gg = total(torch.stack([w @ g_flat, w @ w, g_flat @ g_flat]))
    g_orth = g_flat - wg / (ww + eps) * w
    scale = gg.sqrt() / (total(g_orth @ g_orth).sqrt() + eps)
    return (g_orth * scale).view_as(g).to(g.dtype)


def kept_part(g, U, Vh):
    """The part of the gradient g inside the column space or the row space of the compressed momentum
    U diag(s) Vh, as factors (L, R) with that part = L @ R (rank 2r): U U^T g + (g Vh^T - U U^T g Vh^T) Vh.
    None where the factors span a whole side of the matrix (a full-rank moment): all of g is inside."""
    shape = whole_shape(g)
    if spans_a_side(U, shape[0], math.prod(shape[1:])):
        return None
    G = g.reshape(g.shape[0], math.prod(g.shape[1:]))      # this rank's block where p is split
    UtG, GV = reduce_matmul(U.mT, G, over=0), reduce_matmul(G, Vh.mT, over=-1)
    UtGV = reduce_matmul(UtG, Vh.mT, over=-1)               # (r, r)
    return torch.cat([U, GV - U @ UtGV], dim=-1), torch.cat([UtG, Vh], dim=-2)


def spans_a_side(U, rows, cols):
    """Whether m's factors span a whole side of the (rows, cols) matrix (a full-rank moment), so
    that no part of g lies outside them."""
    return U.shape[-1] >= min(rows, cols)


def outside_kept(g, U, Vh):
    """The rest of g, (1 - U U^T) g (1 - Vh^T Vh): m~ holds no history there, so MLorc's
    m_t = b1 m~ + (1 - b1) g gives it weight 1 - b1 where dense Adam's m gives a gradient that
    persists weight ~1 ([M6] in the module docstring). None where nothing is outside."""
    kept = kept_part(g, U, Vh)
    return None if kept is None else g - (kept[0] @ kept[1]).view_as(g)


# (b) directions, one per variant

def adam_ratio_bound(step, b1, b2, bias_correction=False):
    """C_t, the largest |m_t| / sqrt(v_t) that dense Adam can hold after `step` steps, whatever the
    gradients: m_t and v_t average the same g_k, and Cauchy-Schwarz gives
        C_t^2 = sum_{k<t} (1 - b1)^2 b1^(2k) / ((1 - b2) b2^k) = (1 - b1)^2 / (1 - b2) (1 - rho^t) / (1 - rho)
    with rho = b1^2 / b2. With bias_correction, B_t = C_t sqrt(1 - b2^t) / (1 - b1^t) bounds Adam's
    |m_hat / sqrt(v_hat)| (B_1 = 1, B_100 = 2.24, B_inf = 7.27 for (0.9, 0.999)). inf where no bound
    exists (b2 = 0 < b1: v forgets a gradient that m keeps)."""
    if step < 1:
        return 0.0
    if b2 == 0:
        terms = 1.0 if b1 == 0 or step == 1 else math.inf
    else:
        rho = b1 * b1 / b2
        if rho == 1:
            terms = float(step)
        elif rho > 1 and step * math.log(rho) > 700:
            terms = math.inf
        else:
            terms = (1 - rho ** step) / (1 - rho)
    bound = (1 - b1) * math.sqrt(terms / (1 - b2))
    if bias_correction:
        bound *= math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    return bound


def adamw_direction(m, v, step, betas, eps, use_atan2, bounded=False, outside=None):
    """[M5][M6] Adam's bias-corrected m_hat / (sqrt(v_hat) + eps), or its atan2 form (no eps). When
    `bounded` (m and v were rebuilt from factors), clamped to what dense Adam can reach at `step`.
    `outside` (outside_kept's part of g, or None) enters m_hat at weight 1 instead of (1 - b1) / bc1."""
    bc1, bc2 = 1 - betas[0] ** step, 1 - betas[1] ** step
    m_hat = m / bc1
    if outside is not None:
        m_hat = m_hat + (1 - (1 - betas[0]) / bc1) * outside
    if use_atan2:
        d = ATAN2_SCALE * torch.atan2(m_hat, (v / bc2).sqrt())
    else:
        d = m_hat / (v.sqrt() / math.sqrt(bc2) + eps)
    if not bounded:
        return d
    return clamp_ratio(d, adam_ratio_bound(step, *betas, bias_correction=True), use_atan2)


def clamp_ratio(d, bound, use_atan2):
    """[M6] Clamp an Adam-type direction m / sqrt(v) to +-bound (its atan2 form to the same ratio's
    angle). Compressed m and v are rebuilt independently, so where v~ rebuilds to about 0 and m~ does
    not, m / sqrt(v) has no limit; dense moments average the same gradients and cannot exceed the
    bound (adam_ratio_bound). So the clamp changes nothing that the dense parent could compute."""
    limit = ATAN2_SCALE * math.atan(bound) if use_atan2 else bound
    return d.clamp(-limit, limit)


def lion_direction(m_prev, g, beta1, outside=None):
    """[M6] Lion: the sign of an interpolation of the previous momentum and the gradient.
    `outside` (outside_kept's part of g, or None) enters at weight 1 instead of 1 - beta1."""
    mix = m_prev * beta1 + g * (1 - beta1)
    return (mix if outside is None else mix + outside * beta1).sign()


def adopt_normalize(g, v_prev, eps, clip, use_atan2):
    """[M6] ADOPT normalizes g by the previous v (before the momentum), then clips to +-clip."""
    if use_atan2:
        normed = ATAN2_SCALE * torch.atan2(g, v_prev.sqrt())
    else:
        normed = g / v_prev.sqrt().clamp(min=eps)
    return normed if clip is None else normed.clamp(-clip, clip)


def came_factored_rsqrt(row, col):
    """CAME/Adafactor's rank-1 estimate of 1/sqrt(V) from the row and column means of V."""
    row_mean = reduce_mean(row, -1, over=-2).unsqueeze(-1)      # row's last dim is the parameter's -2
    return (row / row_mean).rsqrt().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()


def came_direction(g, m_prev, stats, betas, eps, clip_threshold):
    """[M3][M6] CAME: Adafactor-normalized g with RMS clipping, its momentum m (the compressed moment),
    and the confidence-weighted direction. `stats` holds CAME's own second-moment statistics: row/col
    means for ndim >= 2, a dense exp_avg_sq otherwise, and for a compressed m the bounds of its rows
    and columns (see below). Returns (d, m, new_stats)."""
    b1, b2, b3 = betas
    sq = g * g + eps[0]
    if "exp_avg_sq_row" in stats:
        row = stats["exp_avg_sq_row"] * b2 + reduce_mean(sq, -1) * (1 - b2)
        col = stats["exp_avg_sq_col"] * b2 + reduce_mean(sq, -2) * (1 - b2)
        u = g * came_factored_rsqrt(row, col)
        new_stats = {"exp_avg_sq_row": row, "exp_avg_sq_col": col}
    else:
        v = stats["exp_avg_sq"] * b2 + sq * (1 - b2)
        u, new_stats = g * v.rsqrt(), {"exp_avg_sq": v}
    if clip_threshold is not None:                                # cap the RMS of u at clip_threshold
        u = u / (reduce_mean(u * u).sqrt() / clip_threshold).clamp(min=1)
    if "exp_avg_bound_row" in stats:
        # [M2] for a compressed m: dense CAME's m_ij averages u_ij, so |m_ij| <= R_i and <= C_j, the
        # same averages of the row and column norms of u (which bound |u_ij|). A rebuilt m~ is clamped
        # to min(R_i, C_j): spurious entries (rows that got no gradient) decay as dense m's do
        row, col = stats["exp_avg_bound_row"], stats["exp_avg_bound_col"]
        bound = torch.minimum(row.unsqueeze(-1), col.unsqueeze(-2))
        m_prev = torch.minimum(torch.maximum(m_prev, -bound), bound)
        square = u * u
        new_stats.update(exp_avg_bound_row=row * b1 + reduce_sum(square, -1).sqrt() * (1 - b1),
                         exp_avg_bound_col=col * b1 + reduce_sum(square, -2).sqrt() * (1 - b1))
    m = m_prev * b1 + u * (1 - b1)
    if "exp_avg_sq_row" not in stats:
        return m, m, new_stats
    res = (u - m) ** 2 + eps[1]                                   # instability: how far u is from m
    res_row = stats["exp_avg_res_row"] * b3 + reduce_mean(res, -1) * (1 - b3)
    res_col = stats["exp_avg_res_col"] * b3 + reduce_mean(res, -2) * (1 - b3)
    new_stats.update(exp_avg_res_row=res_row, exp_avg_res_col=res_col)
    return came_factored_rsqrt(res_row, res_col) * m, m, new_stats


# (c) direction transforms

def grams(d, g):
    """Grams (arXiv 2412.17107): keep the update's magnitude, take the gradient's sign. Makes
    use_cautious a no-op, so the two are not combined."""
    return g.sign() * d.abs()


def cautious(d, g):
    """Cautious (arXiv 2411.16085): zero update entries whose sign disagrees with g, and rescale by
    the fraction kept so the mean step size is preserved."""
    mask = (d * g > 0).to(d.dtype)
    return d * mask / reduce_mean(mask).clamp(min=1e-3)


# (d) apply

def stochastic_round_to_bf16(x, generator):
    """Round fp32 x to bf16 with probability proportional to the distance to each neighbour: add
    uniform noise below bf16's last bit, then truncate. Unbiased: E[round(x)] = x."""
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def apply_update_(p, d, lr, weight_decay, generator=None):
    """[M7] p <- p (1 - lr wd) - lr d, in place. bf16 parameters are updated in fp32 and rounded back:
    stochastically when a generator is given, to nearest otherwise."""
    if p.dtype in (torch.float32, torch.float64):
        p.mul_(1 - lr * weight_decay).add_(d.to(p.dtype), alpha=-lr)
        return
    new = p.float() * (1 - lr * weight_decay) - lr * d.float()
    if p.dtype == torch.bfloat16 and generator is not None:
        new = stochastic_round_to_bf16(new, generator)
    p.copy_(new)


# ----------------------------------------------------------------------------------------------------
# Optimizer classes

def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


COMMON_DOC = """
    Low-rank options (all per param group):
        rank (int or None, default 4): rank r of the compressed moments of parameters with ndim >= 2;
            None keeps dense moments. rank >= min(m, n) keeps the moment exactly.
        oversampling (int >= 0, default 0): extra sketch columns p of the randomized SVD.
        power_iters (int >= 0, default 0): power iterations of the randomized SVD. Both make the
            factors more accurate, which is not what training needs: they trained no better on
            real tasks (see "Which sketch" in the module docstring).
        seed (int, default 0): seed of the sketches; each parameter's step draws from a generator
            seeded by (seed, parameter index, step), so resuming from a state dict is bitwise exact
            and the global RNG is never touched.
        use_orthograd (bool, default False): OrthoGrad on the gradient before the moments.
        use_cautious (bool, default False): cautious masking of the update.
        stochastic_rounding (bool, default True): bf16 parameters get a stochastically rounded update
            (a no-op for other dtypes).
        maximize (bool, default False): maximize the objective.
        batch_bytes (int >= 0, default 2**30): step() compresses same-shape matrices of a group
            together in batched linear-algebra calls, holding up to about this many bytes of their
            dense moments at once, which raises the step's peak memory by about as much (0: one
            parameter at a time). Results do not depend on it.
"""


class _MLorcOptimizer(torch.optim.Optimizer):
    """The shared MLorc pipeline: validation, lazy state, the [M1]-[M7] cycle and checkpoints.
    Subclasses set `moments`, their defaults, and implement `_direction`."""

    moments = ("exp_avg",)           # moments kept as rank-r factors for matrices
    second_moments = ()              # of those, the ones that get the [M2] repair
    sign_based = False               # Lion family: the step is already a sign (Grams is rejected)
    supports_atan2 = False           # has an m / sqrt(v) division that atan2 can replace
    n_betas = 2
    added_entries = ()               # state entries that older releases did not save (optional)

    def __init__(self, params, defaults, *, rank=4, oversampling=0, power_iters=0, seed=0,
                 use_grams=False, use_atan2=False, use_orthograd=False, use_cautious=False,
                 stochastic_rounding=True, maximize=False, batch_bytes=2**30):
        defaults.update(rank=rank, oversampling=oversampling, power_iters=power_iters, seed=seed,
                        use_grams=use_grams, use_atan2=use_atan2, use_orthograd=use_orthograd,
                        use_cautious=use_cautious, stochastic_rounding=stochastic_rounding,
                        maximize=maximize, batch_bytes=batch_bytes)
        self._fused_handles = {}     # id(p) -> the hook attach_fused_backward gave p
        super().__init__(params, defaults)

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step over every parameter that has a gradient."""
        fused = any(_hooked(h) for h in self._fused_handles.values())
        if closure is not None and fused:
            raise RuntimeError("step(closure) with the fused backward pass would step each parameter "
                               "twice; the hooks already step them during backward")
        if fused and not self.__dict__.get("_clipping_checked"):
            self._clipping_checked = True
            _warn_if_trainer_clips()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [(i, p) for i, p in enumerate(p for g in self.param_groups for p in g["params"])
                  if p.grad is not None]
        self._check_grads(params, self.param_groups)
        self._step_params([(i, p) for i, p in params if p.numel() > 0])   # an empty one: nothing to do
        self.end_step()
        return loss

    @torch.no_grad()
    def step_param(self, p):
        """Step one parameter now (the fused backward pass calls this from a gradient hook).
        Prodigy and D-Adapt Lion then need end_step() once all parameters are stepped."""
        index, group = self._locate(p)
        self._check_grads([(index, p)], [group])
        if p.numel() > 0:                                # an empty parameter: nothing to do
            self._step_params([(index, p)])

    def end_step(self):
        """Finish an iteration: nothing to do, except for the adaptive step-size variants."""

    def _step_params(self, params):
        """The one place that picks each parameter's path: the plain step below (the definition), or
        the faster paths of Part 2 for same-shape batches, the extension's one-pass op and sharded
        parameters, each tested equal to it."""
        for batch, group in same_shape_batches(self, params):
            if len(batch) == 1 and takes_plain_step(self, batch[0][1], group):
                self._step_param(batch[0][1], batch[0][0], group)
            else:
                step_batch(self, batch, group)                    # Part 2

    def _step_param(self, p, index, group):
        """One parameter's step, [M1]-[M7] in order: the definition of the optimizer. The variants
        differ in `_direction` (and Prodigy and D-Adapt Lion keep its terms of their global d)."""
        state = self._init_state(p, group)
        step = state["step"] + 1
        generator = sketch_generator(group["seed"], index, step, p.device)  # all the step's randomness
        g, weight_decay = self._gradient(p, p.grad, group)
        prev = {name: load_moment(state, name, p.shape) for name in self.moments}               # [M1]
        for name in self.second_moments:
            if name + "_U" in state:
                prev[name] = repair_second_moment(prev[name])                                     # [M2]
        d, lr, new = self._direction(p, g, prev, state, group, step)                    # [M3][M5][M6]
        self._keep_terms(index, new)
        for name in self.moments:
            if name + "_U" in state and name in new:                                               # [M4]
                factors = rsvd(new.pop(name).reshape(matrix_shape(p)), group["rank"],
                               group["oversampling"], group["power_iters"], generator)
                new.update({name + suffix: f.clone(memory_format=torch.contiguous_format)
                            for suffix, f in zip(("_U", "_s", "_Vh"), factors)})
        state.update(new, step=step)
        if d is not None:                                                                          # [M7]
            d = self._options(d, g, group)
            apply_update_(p, d, lr, weight_decay, generator if group["stochastic_rounding"] else None)

    def _keep_terms(self, index, new):
        """Take from `new` what is not state: nothing here; Prodigy's and D-Adapt Lion's terms of d."""

    def _gradient(self, p, g, group):
        """The gradient that [M3] averages, and the weight decay left for [M7]: in the state's dtype
        (out of place: g may alias p.grad), negated to maximize, with L2 decay added (decouple=False:
        ADOPT, Prodigy) and OrthoGrad applied."""
        g = g.to(state_dtype(p))
        if group["maximize"]:
            g = -g
        weight_decay = group["weight_decay"]
        if not group.get("decouple", True):
            g, weight_decay = g + weight_decay * p.to(g.dtype), 0.0
        if group["use_orthograd"]:
            g = orthograd(p, g)
        return g, weight_decay

    def _outside(self, g, state, group):
        """The part of g where the previous m~ holds no history (outside_kept), for the variants with
        full_weight_outside (all but ADOPT and CAME) when it is on and m is factored; otherwise None."""
        if not group["full_weight_outside"] or "exp_avg_U" not in state:
            return None
        return outside_kept(g, state["exp_avg_U"], state["exp_avg_Vh"])

    def _options(self, d, g, group):
        """The options that change a direction: Grams, then cautious."""
        if group["use_grams"]:
            d = grams(d, g)
        if group["use_cautious"]:
            d = cautious(d, g)
        return d

    def _init_state(self, p, group):
        """The parameter's state, created on its first step: zero moments, factored for matrices."""
        state = self.state[p]
        if not state:
            shards = shards_of(p)
            local, new = shards.local(p), {}
            for name in self.moments:
                new.update({name + k: v for k, v in init_moment(local, group["rank"], p.shape).items()})
            with reductions_across(shards):
                new.update(self._init_extra(local, group))
            state.update(step=0, **shards.wrap(new))
        return state

    def _init_extra(self, p, group):
        """Variant state beyond the low-rank moments (none by default)."""
        return {}

    def _direction(self, p, g, prev, state, group, step):
        """Return (direction d or None to skip the update, lr of the step, new dense state). p, g and
        state may hold one rank's block of a sharded parameter: the reductions complete its sums."""
        raise NotImplementedError

    # -- checks and checkpoints: every refusal comes before anything changes (section "Checks") ---

    def add_param_group(self, param_group):
        """Validate the group with its defaults filled in first, so a rejected group is not added."""
        params = param_group["params"]
        params = [params] if torch.is_tensor(params) else list(params)
        validate_group(self, {**self.defaults, **param_group, "params": params})
        for p in params:
            if not p.is_floating_point() and not p.is_complex():
                raise ValueError(f"{type(self).__name__}: parameter of shape {tuple(p.shape)} has dtype "
                                 f"{p.dtype}; only floating-point parameters can be optimized")
            if p.is_complex():
                raise ValueError(f"{type(self).__name__}: complex parameter of shape {tuple(p.shape)} "
                                 "is not supported; optimize torch.view_as_real(p) instead")
            if _is_dtensor(p):
                Sharded(p, type(self).__name__)      # raises for layouts other than FSDP2's
        super().add_param_group({**param_group, "params": params})
        self._index = None

    # A saved group that lacks an option was written before the option existed: it gets the value
    # that reproduces the saved run. For the sketch that is the first release's (oversampling 4, one
    # power iteration), not today's default; for the other options, their default (their absence).
    BEFORE_OPTION = {"oversampling": 4, "power_iters": 1, "full_weight_outside": False}

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:              # state dicts saved before an option existed
            for key, value in self.defaults.items():
                group.setdefault(key, self.BEFORE_OPTION.get(key, value))
        self._index = None
        self.__dict__.setdefault("_fused_handles", {})

    def _locate(self, p):
        """(global index, group) of a parameter; the index seeds its sketches."""
        if self._index is None:
            params = [(q, group) for group in self.param_groups for q in group["params"]]
            self._index = {q: (i, group) for i, (q, group) in enumerate(params)}
        return self._index[p]

    def _check_grads(self, params, groups):
        """Raise before anything changes (check_grads); the adaptive variants add a check of their own."""
        check_grads(self, params, groups)

    def load_state_dict(self, state_dict):
        """Check the saved state against the parameters first (a refused state dict changes nothing),
        then load. torch casts floating state to the parameter dtype (bf16 would round the fp32
        factors): restore the saved tensors as they were, on the parameter's device."""
        check_state_dict(self, state_dict)
        saved_keys = [key for group in state_dict["param_groups"] for key in group["params"]]
        params = dict(zip(saved_keys, (p for group in self.param_groups for p in group["params"])))
        super().load_state_dict(state_dict)
        for key, entries in state_dict["state"].items():
            p = params[key]
            for name, value in entries.items():
                if torch.is_tensor(value):
                    self.state[p][name] = value.to(p.device, copy=True)


class MLorc_AdamW(_MLorcOptimizer):
    __doc__ = """AdamW (torch.optim.AdamW semantics) with rank-r compressed m and v.

    Give it every trainable parameter: matrices get compressed moments, vectors dense ones.
        lr (float >= 0, default 1e-3), betas ((b1, b2) in [0, 1), default (0.9, 0.999)),
        eps (float >= 0, default 1e-8; unused with use_atan2), weight_decay (decoupled, default 1e-2).
        full_weight_outside (bool, default True): the part of g outside the column and row spaces
            of the previous compressed m~ enters m_hat at weight 1, not (1 - b1) / (1 - b1^t): m~
            holds no history there ("Where m~ holds no history" in the module docstring). False:
            the direction from the EMA m_t alone. No effect at full rank or with dense moments.
        use_atan2 (bool, default False): Adam-atan2 instead of m / (sqrt(v) + eps).
        use_grams (bool, default False): Grams sign correction (excludes use_cautious).
    State: step, exp_avg_{U,s,Vh} and exp_avg_sq_{U,s,Vh} for matrices (exp_avg, exp_avg_sq if dense).
    """ + COMMON_DOC
    moments = ("exp_avg", "exp_avg_sq")
    second_moments = ("exp_avg_sq",)
    supports_atan2 = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 full_weight_outside=True, **options):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      full_weight_outside=full_weight_outside), **options)

    def _direction(self, p, g, prev, state, group, step):
        """Adam, or its atan2 form, on the new dense moments."""
        b1, b2 = group["betas"]
        m = prev["exp_avg"].lerp(g, 1 - b1)                                                # [M3]
        v = prev["exp_avg_sq"] * b2 + g * g * (1 - b2)
        d = adamw_direction(m, v, step, group["betas"], group["eps"], group["use_atan2"],   # [M5][M6]
                            bounded="exp_avg_U" in state, outside=self._outside(g, state, group))
        return d, group["lr"], {"exp_avg": m, "exp_avg_sq": v}


class MLorc_Lion(_MLorcOptimizer):
    __doc__ = """Lion (lion_pytorch.Lion semantics) with a rank-r compressed momentum.

        lr (default 1e-4), betas (default (0.9, 0.99)), weight_decay (decoupled, p *= 1 - lr wd,
        default 0). clip_threshold (float > 0 or None, default None): clip each gradient to this
        L2 norm first. use_cautious: cautious Lion. use_atan2 and use_grams are rejected (no
        denominator; the step is already a sign).
        full_weight_outside (bool, default True): as MLorc_AdamW's, the part of g outside the
            column and row spaces of the previous m~ enters b1 m~ + (1 - b1) g at weight 1.
    State: step, exp_avg_{U,s,Vh} for matrices (exp_avg if dense).
    """ + COMMON_DOC
    sign_based = True

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, clip_threshold=None,
                 full_weight_outside=True, **options):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      clip_threshold=clip_threshold,
                                      full_weight_outside=full_weight_outside), **options)

    def _direction(self, p, g, prev, state, group, step):
        """Lion: sign of b1 m~ + (1 - b1) g; the momentum then moves with b2."""
        b1, b2 = group["betas"]
        g = clip_by_norm(g, group["clip_threshold"])
        d = lion_direction(prev["exp_avg"], g, b1, self._outside(g, state, group))         # [M6]
        return d, group["lr"], {"exp_avg": prev["exp_avg"] * b2 + g * (1 - b2)}             # [M3]


class MLorc_Adopt(_MLorcOptimizer):
    __doc__ = """ADOPT (adopt.ADOPT semantics) with rank-r compressed m and v.

    The first step only initializes v = g * g (no update); later steps normalize g by the previous
    v, clip it to +-(t - 1)^clip_exponent, and take the momentum of that.
        lr (default 1e-3), betas (default (0.9, 0.9999)), eps (default 1e-6, a floor on sqrt(v)),
        weight_decay (default 0), decouple (default False: L2 added to g; True: p *= 1 - lr wd),
        clip_exponent (float or None, default 0.25: ADOPT's clip_lambda = step ** 0.25).
        use_atan2: atan2(g, sqrt(v)) replaces the division (the clip still applies).
    State: step, exp_avg_{U,s,Vh}, exp_avg_sq_{U,s,Vh} for matrices (exp_avg, exp_avg_sq if dense).
    """ + COMMON_DOC
    moments = ("exp_avg", "exp_avg_sq")
    second_moments = ("exp_avg_sq",)
    supports_atan2 = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0,
                 decouple=False, clip_exponent=0.25, **options):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      decouple=decouple, clip_exponent=clip_exponent), **options)

    def _direction(self, p, g, prev, state, group, step):
        """ADOPT: normalize g by the previous v (or atan2), clip, then momentum; v last."""
        b1, b2 = group["betas"]
        if step == 1:
            return None, 0.0, {"exp_avg_sq": g * g}
        v = prev["exp_avg_sq"] * b2 + g * g * (1 - b2)                                     # [M3]
        clip = None if group["clip_exponent"] is None else (step - 1) ** group["clip_exponent"]
        normed = adopt_normalize(g, prev["exp_avg_sq"], group["eps"], clip, group["use_atan2"])
        m = prev["exp_avg"].lerp(normed, 1 - b1)                                           # [M6]
        return m, group["lr"], {"exp_avg": m, "exp_avg_sq": v}


class MLorc_CAME(_MLorcOptimizer):
    __doc__ = """CAME (came_pytorch.CAME semantics) with its first moment compressed to rank r.

    CAME's second moment and instability are already factored (row and column means over the last
    two dims), so only m is low-rank here; 1-D parameters keep CAME's dense exp_avg_sq.
        lr (default 2e-4), betas ((b1, b2, b3), default (0.9, 0.999, 0.9999)), eps ((eps1, eps2),
        default (1e-30, 1e-16)), clip_threshold (CAME's update-RMS clip, default 1.0; None: off),
        weight_decay (decoupled, default 0).
    State: step, exp_avg_{U,s,Vh}, exp_avg_sq_row/col and exp_avg_res_row/col for ndim >= 2, and
    exp_avg_bound_row/col when m is compressed (the bounds of its rebuilt entries, [M2]).
    """ + COMMON_DOC
    n_betas = 3
    stats = ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col",
             "exp_avg_bound_row", "exp_avg_bound_col")
    added_entries = ("exp_avg_bound_row", "exp_avg_bound_col")    # absent from older state dicts

    def __init__(self, params, lr=2e-4, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
                 clip_threshold=1.0, weight_decay=0.0, **options):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=tuple(eps),
                                      clip_threshold=clip_threshold, weight_decay=weight_decay),
                         **options)

    def _init_extra(self, p, group):
        dtype = state_dtype(p)
        if p.ndim < 2:
            return {"exp_avg_sq": torch.zeros_like(p, dtype=dtype)}
        rows, cols = p.shape[:-1], p.shape[:-2] + p.shape[-1:]
        bounds = ({"exp_avg_bound_row": p.new_zeros(rows, dtype=dtype),
                   "exp_avg_bound_col": p.new_zeros(cols, dtype=dtype)} if group["rank"] is not None else {})
        return {"exp_avg_sq_row": p.new_zeros(rows, dtype=dtype),
                "exp_avg_sq_col": p.new_zeros(cols, dtype=dtype),
                "exp_avg_res_row": p.new_zeros(rows, dtype=dtype),
                "exp_avg_res_col": p.new_zeros(cols, dtype=dtype), **bounds}

    def _direction(self, p, g, prev, state, group, step):
        """CAME on the reconstructed m and CAME's own statistics."""
        stats = {key: state[key] for key in self.stats if key in state}
        if "exp_avg_U" in state and "exp_avg_bound_row" not in stats:    # saved before the bounds:
            square = prev["exp_avg"] ** 2                                # m~'s own row / column norms
            stats.update(exp_avg_bound_row=reduce_sum(square, -1).sqrt(),
                         exp_avg_bound_col=reduce_sum(square, -2).sqrt())
        d, m, new = came_direction(g, prev["exp_avg"], stats, group["betas"], group["eps"],
                                   group["clip_threshold"])
        new["exp_avg"] = m
        return d, group["lr"], new


class _AdaptiveStepSize(_MLorcOptimizer):
    """Prodigy and D-Adaptation estimate one global step size d from sums over all parameters. The
    per-parameter step adds its terms to tensors (no host sync); end_step() reduces them once and
    updates d in every param group (so d is saved by state_dict)."""

    def __init__(self, params, defaults, **options):
        self._terms = {}             # parameter index -> (numerator, denominator) terms of this step
        super().__init__(params, defaults, **options)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_terms", {})

    def _init_extra(self, p, group):
        return {"s": torch.zeros_like(subsample(p, group["slice_p"]), dtype=state_dtype(p))}

    def _take_sums(self):
        """The step's sums as floats, and whether anything was stepped. Summed in parameter order,
        in fp64, with one host sync, so step() and the fused backward pass (which steps parameters
        in reverse) agree bitwise."""
        terms, self._terms = self._terms, {}
        if not terms:
            return 0.0, 0.0, False
        device = next(iter(terms.values())).device
        stacked = torch.stack([terms[i].to(device, torch.float64) for i in sorted(terms)])
        numerator, denominator = stacked.sum(dim=0).tolist()
        return numerator, denominator, True

    def step_param(self, p):
        index, _ = self._locate(p)
        if index in self._terms:
            raise RuntimeError(f"{type(self).__name__}: parameter {index} stepped twice without "
                               "end_step(); call optimizer.end_step() after each backward()")
        super().step_param(p)

    def _global(self, key):
        """The global estimate lives in every group (so state_dict saves it); group 0 is read."""
        if key == "lr":
            return max(group["lr"] for group in self.param_groups)
        return self.param_groups[0][key]

    def _check_grads(self, params, groups):
        super()._check_grads(params, groups)
        lrs = {group["lr"] for group in self.param_groups} - {0.0}
        if len(lrs) > 1:
            raise ValueError(f"{type(self).__name__}: all param groups must share one lr (or have "
                             f"lr=0, which freezes them); got {sorted(lrs)}")

    def _step_params(self, params):
        """lr = 0 freezes a group, but its state exists (DCP's initializing step runs at lr = 0)."""
        stepped = []
        for index, p in params:
            group = self._locate(p)[1]
            if group["lr"] > 0:
                stepped.append((index, p))
            else:
                self._init_state(p, group)
        super()._step_params(stepped)

    def _keep_terms(self, index, new):
        """_direction returns this parameter's terms of the d estimate with its new state."""
        self._terms[index] = new.pop("terms")


class MLorc_Prodigy(_AdaptiveStepSize):
    __doc__ = """Prodigy (prodigyopt.Prodigy semantics) with rank-r compressed m and v.

    Prodigy scales Adam by an estimated distance d to the solution. Its s and p0 vectors stay dense
    but sub-sampled: every slice_p-th entry (prodigyopt's slice_p; default 11 here, since dense s
    and p0 would cost as much as AdamW's moments). The step is one pass over the parameters (so it
    also runs from the fused backward pass): the eps term uses the d of the start of the step, where
    prodigyopt uses the d it has just estimated; the two differ by O(eps). With betas[0] = 0 the
    whole step uses that d (prodigyopt's b1 = 0 branch scales g by the new d): m = d (1 - b1) g is
    the b1 -> 0 limit of the b1 > 0 rule. When the d estimate's denominator is 0 (every sampled
    gradient entry zero) prodigyopt skips the whole step; here the parameters have already moved
    (for an all-zero gradient: by weight decay only) and d is kept.
        lr (default 1.0), betas (default (0.9, 0.999)), beta3 (default None: sqrt(b2)), eps (1e-8),
        weight_decay (0), decouple (True), use_bias_correction (False), safeguard_warmup (False),
        d0 (1e-6), d_coef (1.0), growth_rate (inf), slice_p (int >= 1, default 11).
        full_weight_outside (bool, default True): as MLorc_AdamW's; the part of g outside m~'s
            spaces enters m at d (1 - b1^t), the weight dense Prodigy's m gives a gradient that persists.
        use_atan2: atan2(m, sqrt(v)) replaces the division (eps unused).
    With the fused backward pass call optimizer.end_step() after each backward().
    State: step, exp_avg*, exp_avg_sq* (factored for matrices), s, p0; groups hold d, d_max, k, ...
    """ + COMMON_DOC
    moments = ("exp_avg", "exp_avg_sq")
    second_moments = ("exp_avg_sq",)
    supports_atan2 = True

    def __init__(self, params, lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0,
                 decouple=True, use_bias_correction=False, safeguard_warmup=False, d0=1e-6,
                 d_coef=1.0, growth_rate=float("inf"), slice_p=11, full_weight_outside=True, **options):
        super().__init__(params, dict(
            lr=lr, betas=tuple(betas), beta3=beta3, eps=eps, weight_decay=weight_decay,
            decouple=decouple, use_bias_correction=use_bias_correction,
            safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef, growth_rate=growth_rate,
            slice_p=slice_p, full_weight_outside=full_weight_outside, d=d0, d_max=d0, d_numerator=0.0,
            k=0), **options)

    def _init_extra(self, p, group):
        p0 = subsample(p, group["slice_p"]).to(state_dtype(p), copy=True)
        return {**super()._init_extra(p, group), "p0": p0}

    def _scalars(self):
        """(d, d0, dlr, beta3) at the start of this step, from the global state in group 0."""
        b1, b2 = self._global("betas")
        k, d, lr = self._global("k"), self._global("d"), self._global("lr")
        bias_correction = (math.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1))
                           if self._global("use_bias_correction") else 1.0)
        beta3 = self._global("beta3") if self._global("beta3") is not None else math.sqrt(b2)
        return d, self._global("d0"), d * lr * bias_correction, beta3

    def _direction(self, p, g, prev, state, group, step):
        """Prodigy: Adam on d-scaled moments, plus this parameter's terms of the d estimate."""
        (b1, b2), (d, d0, dlr, beta3) = group["betas"], self._scalars()
        g_slice, p_slice = subsample(g, group["slice_p"]), subsample(p, group["slice_p"])
        numerator = (d / d0) * dlr * (g_slice.reshape(-1) @ (state["p0"] - p_slice.to(g.dtype)).reshape(-1))
        s = state["s"] * beta3 + g_slice * ((d / d0) * (d if group["safeguard_warmup"] else dlr))
        terms = total(torch.stack([numerator, s.abs().sum()]))
        m = prev["exp_avg"] * b1 + g * (d * (1 - b1))                                      # [M3]
        v = prev["exp_avg_sq"] * b2 + g * g * (d * d * (1 - b2))
        outside = self._outside(g, state, group)   # [M6] at d (1 - b1^t): dense m's weight for a g
        used = m if outside is None else m + outside * (d * (b1 - b1 ** step))          # that persists
        if group["use_atan2"]:
            direction = ATAN2_SCALE * torch.atan2(used, v.sqrt())                          # [M6]
        else:
            direction = used / (v.sqrt() + d * group["eps"])
        if "exp_avg_U" in state:                    # m and v average the same d_k g_k: Adam's bound
            direction = clamp_ratio(direction, adam_ratio_bound(step, b1, b2), group["use_atan2"])
        return direction, dlr, {"exp_avg": m, "exp_avg_sq": v, "s": s, "terms": terms}

    def end_step(self):
        """Reduce this step's sums into the new d (prodigyopt's update rule) and store it."""
        super().end_step()
        delta_numerator, denominator, stepped = self._take_sums()
        if not stepped or denominator == 0:                      # no progress made: keep d, as prodigyopt
            return
        d, d0, _, beta3 = self._scalars()
        d_max, lr = self._global("d_max"), self._global("lr")
        numerator = self._global("d_numerator") * beta3 + delta_numerator
        d_hat = d
        if lr > 0:
            d_hat = self._global("d_coef") * numerator / denominator
            d = max(d, d_hat) if d == d0 else d
            d_max = max(d_max, d_hat)
            d = min(d_max, d * self._global("growth_rate"))
        for group in self.param_groups:
            group.update(d=d, d_max=d_max, d_numerator=numerator, d_hat=d_hat, k=group["k"] + 1)


class MLorc_DAdapt_Lion(_AdaptiveStepSize):
    __doc__ = """D-Adapt Lion (dadaptation.DAdaptLion semantics) with a rank-r compressed momentum.

    D-Adaptation estimates the step size d from the correlation of updates with their running sum s.
    s stays dense but sub-sampled (every slice_p-th entry; slice_p=1 is dadaptation's exact rule).
        lr (default 1.0), betas (default (0.9, 0.99)), weight_decay (p *= 1 - d lr wd, default 0),
        d0 (1e-6), slice_p (int >= 1, default 11), clip_threshold (float or None, default None).
        full_weight_outside (bool, default True): as MLorc_Lion's.
        use_atan2 and use_grams are rejected, as for Lion.
    With the fused backward pass call optimizer.end_step() after each backward().
    State: step, exp_avg* (factored for matrices), s; groups hold d, k, numerator_weighted.
    """ + COMMON_DOC
    sign_based = True

    def __init__(self, params, lr=1.0, betas=(0.9, 0.99), weight_decay=0.0, d0=1e-6, slice_p=11,
                 clip_threshold=None, full_weight_outside=True, **options):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, d0=d0,
                                      slice_p=slice_p, clip_threshold=clip_threshold,
                                      full_weight_outside=full_weight_outside, d=d0, k=0,
                                      numerator_weighted=0.0), **options)

    def _direction(self, p, g, prev, state, group, step):
        """Lion's sign step at d lr; the momentum accumulates d lr g (as in dadaptation)."""
        b1, b2 = group["betas"]
        dlr, sqrt_b2 = self._global("d") * self._global("lr"), math.sqrt(b2)
        g = clip_by_norm(g, group["clip_threshold"])
        d = lion_direction(prev["exp_avg"], g, b1, self._outside(g, state, group))         # [M6]
        d_slice = subsample(d, group["slice_p"])
        numerator = dlr * (d_slice.reshape(-1) @ state["s"].reshape(-1))
        s = state["s"] * sqrt_b2 + d_slice * ((1 - sqrt_b2) * dlr)
        terms = total(torch.stack([numerator, s.abs().sum()]))
        m = prev["exp_avg"] * b2 + g * ((1 - b2) * dlr)                                    # [M3]
        return d, dlr, {"exp_avg": m, "s": s, "terms": terms}

    def end_step(self):
        """Reduce this step's sums into the new d (dadaptation's update rule) and store it."""
        super().end_step()
        numerator_acum, sk_l1, stepped = self._take_sums()
        if not stepped or sk_l1 == 0:
            return
        sqrt_b2 = math.sqrt(self._global("betas")[1])
        weighted = sqrt_b2 * self._global("numerator_weighted") + (1 - sqrt_b2) * numerator_acum
        d = self._global("d")
        if self._global("lr") > 0:
            d = max(d, weighted / ((1 - sqrt_b2) * sk_l1))
        for group in self.param_groups:
            group.update(d=d, numerator_weighted=weighted, k=group["k"] + 1)


# ----------------------------------------------------------------------------------------------------
# Checks: every refusal comes before anything changes, and names the parameter or the argument

def validate_group(opt, group):
    """Every hyperparameter check and every forbidden combination of options, in one place."""
    name = type(opt).__name__

    def bad(arg, why):
        raise ValueError(f"{name}: invalid {arg}={group[arg]!r}: {why}")

    if not _is_number(group["lr"]) or not group["lr"] >= 0:
        bad("lr", "must be a number >= 0")
    betas = group["betas"]
    if len(_as_tuple(betas)) != opt.n_betas:
        bad("betas", f"{name} takes {opt.n_betas} betas")
    if not all(_is_number(b) and 0 <= b < 1 for b in betas):
        bad("betas", "each beta must be in [0, 1)")
    if group.get("beta3") is not None and not (_is_number(group["beta3"]) and 0 <= group["beta3"] < 1):
        bad("beta3", "must be in [0, 1), or None for sqrt(betas[1])")
    if group.get("clip_exponent") is not None and not (_is_number(group["clip_exponent"])
                                                       and group["clip_exponent"] >= 0):
        bad("clip_exponent", "must be >= 0, or None for no clipping")
    for arg in ("weight_decay", "eps"):
        if arg in group and not all(_is_number(e) and e >= 0 for e in _as_tuple(group[arg])):
            bad(arg, "must be a number >= 0" if arg == "weight_decay" else "must be numbers >= 0")
    if group["rank"] is not None and (not _is_int(group["rank"]) or group["rank"] < 1):
        bad("rank", "must be an int >= 1, or None for dense moments")
    for arg in ("oversampling", "power_iters", "batch_bytes"):
        if not _is_int(group[arg]) or group[arg] < 0:
            bad(arg, "must be an int >= 0")
    if not _is_int(group["seed"]):
        bad("seed", "must be an int")
    if group.get("clip_threshold") is not None and not (_is_number(group["clip_threshold"])
                                                         and group["clip_threshold"] > 0):
        bad("clip_threshold", "must be > 0, or None for no clipping")
    for arg in ("d0", "d_coef", "growth_rate"):
        if arg in group and not (_is_number(group[arg]) and group[arg] > 0):
            bad(arg, "must be a number > 0")
    if "slice_p" in group and (not _is_int(group["slice_p"]) or group["slice_p"] < 1):
        bad("slice_p", "must be an int >= 1")
    if "full_weight_outside" in group and not isinstance(group["full_weight_outside"], bool):
        bad("full_weight_outside", "must be True or False")
    if opt.sign_based and group["use_grams"]:
        bad("use_grams", f"{name}'s step is already a sign; Grams would make it signSGD")
    if group["use_grams"] and group["use_cautious"]:
        bad("use_cautious", "Grams takes the sign of g, so the cautious mask could never fire")
    if group["use_atan2"] and not opt.supports_atan2:
        bad("use_atan2", f"{name} has no m / sqrt(v) division to replace")


def check_grads(opt, params, groups):
    """Raise before anything changes: bad hyperparameters (set since construction), sparse or
    non-finite gradients name their parameter. One host sync per device for the whole step."""
    name = type(opt).__name__
    for group in groups:
        validate_group(opt, group)
    # the extension's first use on a device is checked here, before anything changes (with
    # MLORC_EXTENSION=1 it may raise), and only where a fused step may follow
    for device in {p.device for _, p in params if may_fuse(opt, p, opt._locate(p)[1])}:
        extension_ready(device)
    by_device = {}
    for index, p in params:
        state, rank = opt.state.get(p), opt._locate(p)[1]["rank"]
        if state and (opt.moments[0] + "_U" in state) != (p.ndim >= 2 and rank is not None):
            held = "rank-r factors" if rank is None else "dense moments"
            raise ValueError(f"{name}: parameter {index} (shape {tuple(p.shape)}) holds {held}, but "
                             f"its group's rank is now {rank!r}; switching between rank=None and a "
                             "number after the first step is not supported (a new optimizer, or a "
                             "state dict saved with that rank, can)")
        if p.grad.is_sparse:
            raise RuntimeError(f"{name}: parameter {index} has a sparse gradient; not supported")
        shards = shards_of(p)
        if shards is not WHOLE and getattr(p.grad, "placements", None) != p.placements:
            raise RuntimeError(f"{name}: parameter {index}'s gradient is not split like the "
                               "parameter (expected a DTensor with the same placements)")
        by_device.setdefault((p.grad.device, shards.group), []).append((index, p, shards))
    for (device, process_group), items in by_device.items():
        # each gradient's min and max (one pass each), then every comparison in a few calls for all;
        # stack promotes the pairs to the widest gradient dtype, in which the limits are compared
        extremes = torch.stack([_extremes(shards.local(p.grad)) for _, p, shards in items])
        limits = torch.tensor([grad_limit(opt, p) for _, p, _ in items], dtype=extremes.dtype, device=device)
        usable = (torch.isfinite(extremes) & (extremes.abs() < limits.unsqueeze(-1))).all(-1)
        if process_group is not None:         # every rank must raise, or the others would hang
            usable = all_ranks(usable, process_group)
        for (index, p, shards), ok in zip(items, usable.tolist()):
            if ok:
                continue
            where, g = f"{name}: parameter {index} (shape {tuple(p.shape)})", shards.local(p.grad)
            if shards.group is None and torch.isfinite(_extremes(g)).all():
                raise RuntimeError(f"{where} has gradient entries up to {g.abs().max().item():.3g}, "
                                   f"whose squares overflow {state_dtype(p)} (|g| must stay below "
                                   f"{grad_limit(opt, p):.3g}); parameters and state are unchanged")
            on_ranks = "" if shards.group is None else " (or one whose square overflows) on some rank"
            raise RuntimeError(f"{where} has a non-finite gradient{on_ranks}; parameters and state "
                               "are unchanged")


def grad_limit(opt, p):
    """The largest |g| the step can take: the variants that square g (every one but the Lion
    family) need g * g finite in the state's dtype; the rest only finite g."""
    return math.inf if opt.sign_based else math.sqrt(torch.finfo(state_dtype(p)).max)


def _extremes(g):
    """g's smallest and largest entries as a pair (zeros for an empty g), with no host sync. aminmax
    is one pass with no full-size temporaries (isfinite(g).all() makes several) and propagates NaN."""
    if g.numel() == 0:
        return torch.zeros(2, dtype=g.dtype, device=g.device)
    return torch.stack(torch.aminmax(g))


def _warn_if_trainer_clips():
    """With the fused backward pass the gradients are applied and freed during backward, so a Hugging
    Face Trainer's global clipping (max_grad_norm > 0; its default is 1.0) finds none and does
    nothing. Say so: step() is called from Trainer's training loop, whose frame holds the Trainer."""
    trainer_module = sys.modules.get("transformers.trainer")
    frame = sys._getframe(2)
    while trainer_module is not None and frame is not None:
        trainer = frame.f_locals.get("self")
        if isinstance(trainer, trainer_module.Trainer):
            if trainer.args.max_grad_norm > 0:
                warnings.warn(f"mlorc: Trainer's max_grad_norm={trainer.args.max_grad_norm} does nothing "
                              "with attach_fused_backward: the gradients are applied and freed during "
                              "backward, so clipping finds none. Set max_grad_norm=0 (Lion variants can "
                              "clip each gradient with clip_threshold)", stacklevel=3)
            return
        frame = frame.f_back


def check_state_dict(opt, state_dict):
    """Raise ValueError, naming the parameter and the entry, unless each saved parameter state
    has exactly the entries this class creates for that parameter at the saved group's rank,
    with their shapes: another class's state, a transposed matrix or a missing factor would
    otherwise surface at the next step, after the current state is gone."""
    name = type(opt).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"{name}.load_state_dict: state_dict must be a dict with 'state' and "
                         "'param_groups' (an optimizer's state_dict()), got "
                         f"{type(state_dict).__name__}")
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups) or any(
            len(saved["params"]) != len(group["params"])
            for saved, group in zip(groups, opt.param_groups)):
        raise ValueError(f"{name}.load_state_dict: the state dict's param groups do not match this "
                         "optimizer's (number of groups or of parameters in a group)")
    for saved, group in zip(groups, opt.param_groups):
        for key, p in zip(saved["params"], group["params"]):
            entries = state_dict["state"].get(key)
            if not entries:
                continue
            meta = torch.empty(p.shape, dtype=p.dtype, device="meta")   # shapes only (a shard's:
            rank = saved.get("rank", group["rank"])                     # the whole parameter's)
            expected = {"step": None}
            for moment in opt.moments:
                expected.update({moment + k: v.shape for k, v in init_moment(meta, rank).items()})
            sharded = _is_dtensor(p)
            if not sharded:                          # a shard samples its variant entries per rank
                extra = opt._init_extra(meta, {**group, **saved})
                expected.update({k: v.shape for k, v in extra.items()})
            where = f"{name}.load_state_dict: parameter {key} (shape {tuple(p.shape)})"
            missing = expected.keys() - entries.keys() - set(opt.added_entries)
            unknown = set() if sharded else entries.keys() - expected.keys()
            if missing or unknown:
                raise ValueError(f"{where}: saved entries {sorted(entries)} are not this optimizer's "
                                 f"{sorted(expected)} at rank {rank!r} (missing {sorted(missing)}, "
                                 f"unexpected {sorted(unknown)})")
            for entry, shape in expected.items():
                if entry not in entries:             # one of added_entries: created at the step
                    continue
                value = entries[entry]
                if shape is not None and (not torch.is_tensor(value) or value.shape != shape):
                    got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    raise ValueError(f"{where}: entry {entry!r} has shape {got}, expected {tuple(shape)}")


# ====================================================================================================
# Part 2: the faster paths. Everything above is the optimizer; everything below computes the same
# step faster, or on several processes, and is tested equal to the plain step (_step_param):
#   batches    step() compresses the same-shape matrices of a group together, in batched calls
#   extension  the optional C++/CUDA ops of csrc/: AdamW's and Lion's step in one pass over each
#              matrix, and [M4] through products with moments that are never written out
#   sharded    FSDP2's parameters: each rank steps its own block
# _MLorcOptimizer._step_params sends a parameter here unless the plain step takes it.
# ====================================================================================================

# ----------------------------------------------------------------------------------------------------
# Batches

def same_shape_batches(opt, params):
    """Same-group, same-shape matrices together, up to the group's batch_bytes of dense moments
    (the results do not depend on the batching: each parameter keeps its own generator)."""
    buckets = {}
    for index, p in params:
        group = opt._locate(p)[1]
        key = (id(group), tuple(p.shape), getattr(p, "placements", None)) if p.ndim >= 2 \
            else (id(group), index)
        buckets.setdefault(key, (group, []))[1].append((index, p))
    for group, items in buckets.values():
        per_batch = max(1, group["batch_bytes"] // (4 * items[0][1].numel() * len(opt.moments)))
        for start in range(0, len(items), per_batch):
            yield items[start:start + per_batch], group


def takes_plain_step(opt, p, group):
    """Whether the plain step takes p: a whole parameter (not sharded) that the extension's fused
    op does not cover."""
    return shards_of(p) is WHOLE and not fused_applies(opt, p, opt._init_state(p, group), group)


def step_batch(opt, batch, group):
    """The plain step of a batch of same-shape parameters, in two halves: prepare_step ([M1]-[M3],
    [M5], [M6] of each, on each rank's block where p is sharded, through the extension's fused op
    where it applies), then finish_batch ([M4] in batched calls, [M7])."""
    finish_batch(opt, [prepare_step(opt, p, index, group) for index, p in batch], group)


def prepare_step(opt, p, index, group):
    """[M1]-[M6] of one parameter: its new dense state and its update; nothing is changed yet."""
    shards = shards_of(p)                           # WHOLE, or how p is split across ranks
    full_state = opt._init_state(p, group)
    step = full_state["step"] + 1
    generator = sketch_generator(group["seed"], index, step, p.device)
    p, g = shards.local(p), shards.local(p.grad)   # from here on: this rank's part only
    state = {key: shards.local(value) for key, value in full_state.items()}
    work = dict(p=p, state=full_state, shards=shards, step=step, generator=generator)
    with reductions_across(shards):
        g, weight_decay = opt._gradient(p, g, group)
        if shards is WHOLE and fused_applies(opt, p, state, group):   # the extension's one-pass
            new = fused_op(opt)(opt, p, g.contiguous(), state, group, step)  # twin of what follows
            return dict(work, new=new, d=None, lr=0.0, weight_decay=0.0)
        prev = {name: load_moment(state, name, p.shape) for name in opt.moments}     # [M1]
        for name in opt.second_moments:
            if name + "_U" in state:
                prev[name] = repair_second_moment(prev[name])                          # [M2]
        d, lr, new = opt._direction(p, g, prev, state, group, step)               # [M3][M5][M6]
        if d is not None:
            d = opt._options(d, g, group)
    opt._keep_terms(index, new)
    return dict(work, new=new, d=d, lr=lr, weight_decay=weight_decay)


def finish_batch(opt, batch, group):
    """[M4] compress the new moments of a batch of same-shape parameters in batched calls (each
    with its own generator), commit the state, then [M7] apply each update (a FusedStep's moves
    within [M4], once its bases are known)."""
    suffixes = ("_U", "_s", "_Vh")
    fused = [w for w in batch if opt.moments in w["new"]]    # the extension's FusedSteps: [M4]
    if fused:                                                   # through products, as rsvd does
        steps = [w["new"].pop(opt.moments) for w in fused]
        Q = sketch_basis(FusedMoments([A for step in steps for A in step.moments]),
                         group["rank"] + group["oversampling"], group["power_iters"],
                         [w["generator"] for w in fused for _ in opt.moments])  # m's Omega, then v's
        bases = iter(Q.unbind(0))
        AtQ = torch.stack([AtQ_k for step in steps              # [M7] here, and [M4]'s last products
                           for AtQ_k in step.finish([next(bases) for _ in step.moments])])
        factors = factors_from(Q, AtQ, min(group["rank"], *matrix_shape(fused[0]["p"])))
        for i, (w, name) in enumerate((w, name) for w in fused for name in opt.moments):
            w["new"].update({name + suffix: f[i].clone() for suffix, f in zip(suffixes, factors)})
    for name in opt.moments:
        factored = [w for w in batch if name in w["new"] and name + "_U" in w["state"]]
        if not factored:
            continue
        matrices = [w["new"].pop(name).reshape(matrix_shape(w["p"])) for w in factored]
        A = torch.stack(matrices) if len(matrices) > 1 else matrices[0].unsqueeze(0)  # (L, m, n)
        del matrices
        factors = factored[0]["shards"].rsvd(A, group["rank"], group["oversampling"],      # [M4]
                                             group["power_iters"], [w["generator"] for w in factored])
        del A
        for i, w in enumerate(factored):          # clone: a view would pin the whole batch
            w["new"].update({name + suffix: f[i].clone(memory_format=torch.contiguous_format)
                             for suffix, f in zip(suffixes, factors)})
    for w in batch:
        w["state"].update(w["shards"].wrap(w["new"]))
        w["state"]["step"] = w["step"]
        if w["d"] is not None:                                                         # [M7]
            rounding = w["shards"].rounding(w["generator"]) if group["stochastic_rounding"] else None
            apply_update_(w["p"], w["d"], w["lr"], w["weight_decay"], rounding)


# ----------------------------------------------------------------------------------------------------
# The optional C++/CUDA extension in csrc/

FUSED_MAX_RANK = 32        # the extension rebuilds each entry with an r-term loop: past a few dozen
                           # terms the matmul of the pure path is faster
CPU_PRODUCTS_MAX_WIDTH = 20  # on the CPU each of [M4]'s products rebuilds a second moment from its
                           # factors: for sketches wider than this (rank > 20 with the default
                           # sketch), writing the new moments once and multiplying them with BLAS
                           # is faster (products / dense 0.97-1.02x at width 20, 1.06-1.09x at 24).
                           # A first moment alone (Lion) takes the products at any width: they
                           # leave its rebuild out (bench/cpu_products.py)


def may_fuse(opt, p, group):
    """What fused_applies asks of the parameter and its group alone: an optimizer with a fused op,
    a whole (not sharded) fp32 contiguous matrix with factored moments, no option that changes the
    direction."""
    return (fused_op(opt) is not None and p.dtype == torch.float32 and p.is_contiguous()
            and p.ndim >= 2 and not _is_dtensor(p) and group["rank"] is not None
            and not (group["use_grams"] or group["use_cautious"] or group["use_atan2"]))


def fused_applies(opt, p, state, group):
    """Whether the extension's fused op (fused_op) covers this parameter's step: may_fuse,
    factors in the state of at most FUSED_MAX_RANK terms, the extension ready on its device."""
    return (may_fuse(opt, p, group)
            and all(name + "_U" in state and state[name + "_s"].numel() <= FUSED_MAX_RANK
                    for name in opt.moments)
            and extension_ready(p.device))


def old_factors(opt, state):
    """The (U, s, Vh) of each moment, as the extension wants them."""
    return [factors(state, name) for name in opt.moments]


def through_products(opt, p, group):
    """Whether the fused step hands [M4] NewMoments, which it reaches through products (see
    FusedMoments), instead of writing the new moments out: where [M4] sketches the matrix (takes
    no exact SVD) with a sketch the device's products serve well."""
    width = group["rank"] + group["oversampling"]
    wide = p.device.type == "cpu" and opt.second_moments and width > CPU_PRODUCTS_MAX_WIDTH
    return width < min(matrix_shape(p)) and not wide


FusedStep = collections.namedtuple("FusedStep", "moments finish")
FusedStep.__doc__ = """A fused step that [M4] reaches through products: the new moments, as NewMoments,
and finish(Q), which moves the parameter ([M5]-[M7]) and returns each moment's A^T Q for the bases Q
that [M4] found from their first products (A^T Q from the same pass where the extension can)."""


def adamw_fused(opt, p, g, state, group, step):
    """MLorc_AdamW's fused op, mlorc::adamw_step_: _direction and [M7] in one pass over the matrix,
    the moments rebuilt from their factors entry by entry. Returns the new dense moments for [M4]
    or, where through_products, a FusedStep under the key opt.moments: the parameter then moves
    once [M4] has its bases, in mlorc::adamw_update_products_, which also returns [M4]'s last
    products."""
    (b1, b2), (rows, cols) = group["betas"], matrix_shape(p)
    P, G, m_old, v_old = p.view(rows, cols), g.view(rows, cols), *old_factors(opt, state)
    shift = torch.ops.mlorc.negative_mean(*v_old)                                       # [M2]
    scalars = (b1, b2, group["lr"], group["weight_decay"], group["eps"], 1 - b1 ** step, 1 - b2 ** step,
               adam_ratio_bound(step, b1, b2))      # the kernel clamps m / (sqrt(v) + eps'): C_t
    outside = (G, m_old, group, b1 - b1 ** step)    # fused_outside_args: adds w (g - kept) to m
    if through_products(opt, p, group):
        def finish(Q):         # the kept part formed here: a batch's kept parts are never held at once
            return torch.ops.mlorc.adamw_update_products_(P, G, *m_old, *v_old, shift, *Q, *scalars,
                                                          *fused_outside_args(*outside))
        return {opt.moments: FusedStep([NewMoment(G, m_old, b1), NewMoment(G, v_old, b2, True, shift)],
                                       finish)}
    m, v = torch.empty(rows, cols, device=p.device), torch.empty(rows, cols, device=p.device)
    torch.ops.mlorc.adamw_step_(P, G, *m_old, *v_old, shift, m, v, *scalars, *fused_outside_args(*outside))
    return {"exp_avg": m.view(p.shape), "exp_avg_sq": v.view(p.shape)}


def fused_outside_args(G, m_old, group, weight):
    """The fused ops' optional last arguments for full_weight_outside: kept_part of the matrix G for
    m's old factors as (kept_U, kept_Vh), and the weight w of g - kept; () when it is off or nothing
    is outside. mlorc::kept_part forms the two thin products with g, U^T g and g Vh^T, in one pass
    over g on the CPU (BLAS runs such thin products at a fraction of its rate: bench/step.py prints
    it), and the factors from them."""
    U, _, Vh = m_old
    if not group["full_weight_outside"] or spans_a_side(U, *G.shape):
        return ()
    return (*torch.ops.mlorc.kept_part(G, U, Vh), weight)


def lion_fused(opt, p, g, state, group, step):
    """MLorc_Lion's fused op, mlorc::lion_step_: _direction and [M7] in one pass; returns the new
    dense momentum (or a FusedStep, as adamw_fused, whose finish moves the parameter and then takes
    [M4]'s last product)."""
    (b1, b2), (rows, cols) = group["betas"], matrix_shape(p)
    g = clip_by_norm(g, group["clip_threshold"])
    P, G, (m_old,) = p.view(rows, cols), g.view(rows, cols), old_factors(opt, state)
    scalars = (b1, b2, group["lr"], group["weight_decay"])
    outside = (G, m_old, group, b1)                 # fused_outside_args: adds w (g - kept) to the mix
    if through_products(opt, p, group):
        def finish(Q):                              # the kept part formed here, as in adamw_fused
            torch.ops.mlorc.lion_update_(P, G, *m_old, *scalars, *fused_outside_args(*outside))
            return [torch.ops.mlorc.moment_matmul(*m_old, G, b2, False, None, Q[0], True)]
        return {opt.moments: FusedStep([NewMoment(G, m_old, b2)], finish)}
    m = torch.empty(rows, cols, device=p.device)
    torch.ops.mlorc.lion_step_(P, G, *m_old, m, *scalars, *fused_outside_args(*outside))
    return {"exp_avg": m.view(p.shape)}


FUSED_OPS = {MLorc_AdamW: adamw_fused, MLorc_Lion: lion_fused}


def fused_op(opt):
    """The extension's one-pass op of the optimizer's class or a base of it (AdamW and Lion), or None."""
    return next((FUSED_OPS[cls] for cls in type(opt).__mro__ if cls in FUSED_OPS), None)


_extension = {}      # "loaded": bool, once load_extension() has decided; "ready": {device type: bool}
CXX_FLAGS = ["-O3", "-fno-math-errno"]    # no errno from sqrtf: lets the per-entry loops vectorize
# at::parallel_for is compiled into the extension: without OpenMP there it runs on one thread. On
# Linux torch's CPU backend is libgomp, which the extension then shares (the same libgomp.so.1).
OPENMP_FLAGS = ["-fopenmp"] if torch._C.has_openmp and sys.platform.startswith("linux") else []
CUDA_FLAGS = ["-O3"]
# The CUDA kernels of this release compile but have not yet passed tests/test_ext.py on a GPU. A kernel
# fault on first use poisons the CUDA context, so extension_problem's self-check cannot fall back from
# it: until they pass (recorded in BENCHMARKS.md with the commit), CUDA parameters take the pure path
# and the .cu sources are not built, unless MLORC_EXTENSION=1 asks for them.
CUDA_KERNELS_VERIFIED = False


def cuda_kernels_wanted():
    """Whether CUDA parameters may use the extension: its kernels are verified, or MLORC_EXTENSION=1."""
    return CUDA_KERNELS_VERIFIED or os.environ.get("MLORC_EXTENSION", "") == "1"


def extension_sources(with_cuda):
    """The csrc/ files to compile (setup.py builds the same ones ahead of time)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    cuda = [os.path.join(here, "mlorc_cuda.cu")] if with_cuda else []
    return [os.path.join(here, "mlorc_ops.cpp")] + cuda


def prebuilt_extension():
    """The library that `MLORC_BUILD_EXT=1 pip install` (setup.py) built beside this file, unless a
    csrc/ file beside it (a source or a header) is newer: then it is stale and the JIT build runs."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(f for f in os.listdir(here) if f.startswith("mlorc_ext") and f.endswith((".so", ".pyd")))
    if not found:
        return None
    library, csrc = os.path.join(here, found[0]), os.path.join(here, "csrc")
    sources = [os.path.join(csrc, f) for f in os.listdir(csrc)] if os.path.isdir(csrc) else []
    if any(os.path.getmtime(path) > os.path.getmtime(library) for path in sources):   # headers too
        return None
    return library


def load_extension():
    """Register the torch.ops.mlorc operators: from the library setup.py built ahead of time if there
    is one, else by building csrc/ with torch's cpp_extension (ninja; cached, so only the first use
    compiles). MLORC_EXTENSION=0: never; =1: required (a failed build raises with the compiler's
    output); unset: used when it builds, else one warning and pure PyTorch. No csrc/ beside this
    file (mlorc.py copied alone) is not a failure: pure PyTorch, silently. The .cu kernels are
    compiled only when torch has CUDA and cuda_kernels_wanted()."""
    mode = os.environ.get("MLORC_EXTENSION", "")
    if mode == "0":
        return False
    if "loaded" not in _extension:
        from torch.utils import cpp_extension
        with_cuda = (torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
                     and cuda_kernels_wanted())
        prebuilt = prebuilt_extension()
        if prebuilt is None and not os.path.exists(extension_sources(False)[0]) and mode != "1":
            _extension["loaded"] = False          # mlorc.py copied alone: pure PyTorch, nothing to report
            return False
        try:
            if prebuilt is not None:
                torch.ops.load_library(prebuilt)
            else:
                cpp_extension.load(name="mlorc_ext", sources=extension_sources(with_cuda),
                                   extra_cflags=CXX_FLAGS + OPENMP_FLAGS, extra_ldflags=OPENMP_FLAGS,
                                   extra_cuda_cflags=CUDA_FLAGS,
                                   is_python_module=False)
            _extension["loaded"] = True
        except Exception as error:                # compiler or ninja missing, build error
            if mode == "1":
                raise RuntimeError(f"MLORC_EXTENSION=1 but the extension did not build: {error}") from error
            warnings.warn(f"mlorc: the C++ extension is unavailable, using pure PyTorch ({error})")
            _extension["loaded"] = False
    return _extension["loaded"]


def extension_ready(device):
    """Whether fused steps of parameters on `device` use the extension: it is loaded, and its first use
    on that kind of device (CPU, CUDA) reproduced pure PyTorch (`extension_problem`). Otherwise, say
    a GPU build that computes wrongly or a library built for another GPU, the device gets the pure
    path and one warning (an error where MLORC_EXTENSION=1) instead of wrong or failing steps."""
    if device.type not in ("cpu", "cuda") or not load_extension():     # its kernels' devices
        return False
    if device.type == "cuda" and not cuda_kernels_wanted():
        return False
    verdicts = _extension.setdefault("ready", {})
    if device.type not in verdicts:
        problem = extension_problem(device)
        verdicts[device.type] = problem is None
        if problem is not None:
            message = f"the extension's fused step on {device.type} does not reproduce pure PyTorch"
            message += f": {problem}"
            if os.environ.get("MLORC_EXTENSION", "") == "1":
                raise RuntimeError(f"MLORC_EXTENSION=1 but {message}")
            warnings.warn(f"mlorc: {message}; using pure PyTorch on {device.type}")
    return verdicts[device.type]


def extension_problem(device):
    """None if a few fused steps of MLorc_AdamW and MLorc_Lion on `device`, over a matrix that [M4]
    sketches (products only) and one it decomposes exactly (dense moments), agree with the pure path
    to 1e-5 (a few fp32 roundings in another order, see tests/test_ext.py); else what differed or
    failed. Its own data and generators: nothing outside it changes."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 24), (3, 24)]
    start = [torch.randn(shape, generator=gen) for shape in shapes]
    grads = [[torch.randn(shape, generator=gen) for shape in shapes] for _ in range(3)]
    grads = [[g.sign() * (g.abs() + 0.1) for g in step] for step in grads]   # no sign near a tie
    verdicts = _extension.setdefault("ready", {})
    before, precision = verdicts.get(device.type), torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 (or bf16) matmuls in the pure path would
    try:                                            # differ by more than 1e-5
        for cls in (MLorc_AdamW, MLorc_Lion):
            results = []
            for fused in (True, False):
                verdicts[device.type] = fused          # what extension_ready answers the steps below
                params = [torch.nn.Parameter(p.to(device, copy=True)) for p in start]
                optimizer = cls(params, lr=1e-2, rank=2, oversampling=2, power_iters=1)
                try:
                    for step in grads:
                        for p, g in zip(params, step):
                            p.grad = g.to(device)
                        optimizer.step()
                except Exception as error:            # a kernel that cannot launch here, say
                    return f"{cls.__name__} raised {type(error).__name__}: {error}"
                results.append([p.detach().to("cpu", copy=True) for p in params])
            for extended, pure in zip(*results):
                if not torch.allclose(extended, pure, rtol=1e-5, atol=1e-5):
                    difference = (extended - pure).abs().max().item()
                    return f"{cls.__name__}'s parameters differ by up to {difference:.3g}"
        return None
    finally:                                    # the verdict and precision as they were
        torch.set_float32_matmul_precision(precision)
        if before is None:
            del verdicts[device.type]
        else:
            verdicts[device.type] = before


NewMoment = collections.namedtuple("NewMoment", "g old beta squared shift", defaults=(False, None))
NewMoment.__doc__ = """[M3]'s new moment beta * old + (1 - beta) * g (g * g when squared, with [M2]'s
shift for the rebuilt old entries below 0 when given), described by g and the old factors only."""


class FusedMoments:
    """A stack (K, m, n) of NewMoments, which the extension's update pass never writes out. [M4]'s
    rsvd only needs products with them, so it takes the stack as it takes a stack of dense moments
    (batched QR and SVD) while each product is formed without the moment itself: mlorc::moment_matmul
    rebuilds it a vector register at a time from its old factors and g ([M1]-[M3]) and multiplies
    as it goes (a first moment, linear in its parts, may be multiplied as beta U (s (Vh X)) +
    (1 - beta) g X instead). So the step holds no dense m x n moment at all (on CUDA,
    moment_matmul holds chunks of 16 MiB of a second moment). MLorc_AdamW's m and v share their g:
    mlorc::moment_pair_matmul multiplies both in one pass over it. [M4]'s sketch_basis takes the
    stack; its last products, A^T Q, come from the FusedStep's finish (on the CPU, MLorc_AdamW's
    from the pass that moves the parameter, from the entries that pass computes: one pass over g
    fewer, and v~ rebuilt once less)."""

    def __init__(self, moments, transposed=False):
        self.moments, self.transposed = moments, transposed
        g = moments[0].g
        self.device, self.dtype = g.device, g.dtype
        self.shape = (len(moments), *(g.shape[::-1] if transposed else g.shape))

    @property
    def mT(self):
        return FusedMoments(self.moments, not self.transposed)

    def __matmul__(self, X):
        X, products, k = X.unbind(0), [], 0
        while k < len(self.moments):
            A, V = self.moments[k], self.moments[k + 1] if k + 1 < len(self.moments) else None
            if V is not None and V.g is A.g and not A.squared and A.shift is None and V.squared:  # m, v
                products += torch.ops.mlorc.moment_pair_matmul(*A.old, *V.old, A.g, A.beta, V.beta, V.shift,
                                                               X[k], X[k + 1], self.transposed)
                k += 2
            else:
                products.append(torch.ops.mlorc.moment_matmul(*A.old, A.g, A.beta, A.squared, A.shift, X[k],
                                                              self.transposed))
                k += 1
        return torch.stack(products)

    def __rmatmul__(self, Y):            # Y @ A = (A^T Y^T)^T
        return (self.mT @ Y.mT).mT


def extension_loaded():
    """Whether the C++/CUDA extension is in use (after the first step, or load_extension())."""
    return _extension.get("loaded", False) and os.environ.get("MLORC_EXTENSION", "") != "0"


# ----------------------------------------------------------------------------------------------------
# Sharded parameters (FSDP2): each rank steps its own block of a parameter, never the whole of it
#
# fully_shard makes every parameter a DTensor: rank i holds a block of its rows (Shard(0), the
# default) or, for a matrix, of its columns (Shard(1), via shard_placement_fn). The elementwise work
# ([M1], [M3], [M5]-[M7]) runs on the block as it is, since U's rows (or Vh's columns) are split the
# same way while s and the other factor are replicated. What crosses blocks are the reductions (norms,
# means, [M2]'s c, Prodigy's sums: `Sharded` all-reduces them) and [M4], which `sharded_rsvd` runs
# with all-reduces of (r + p)-wide matrices. None of this runs for ordinary tensors.

def _is_dtensor(p):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:                              # torch built without distributed support
        return False
    return isinstance(p, DTensor)


def _local(t):
    """This process's part of t: the local block of a DTensor, t itself otherwise."""
    return t.to_local() if _is_dtensor(t) else t


def all_ranks(flags, group):
    """Whether each flag holds on every rank of the process group (an all-reduce of the minimum)."""
    flags = flags.to(torch.int32)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN, group=group)
    return flags.bool()


class Whole:
    """A parameter that is not split: the sharded path's operations (see Sharded) are the plain ones."""
    group = None         # the process group the parameter is split over (none)

    def local(self, t):
        """This rank's part of a parameter, gradient or state tensor."""
        return t

    def rsvd(self, A, rank, oversampling, power_iters, generators):
        """[M4] of a batch (L, rows, cols) of this rank's matrices."""
        return rsvd(A, rank, oversampling, power_iters, generators)

    def wrap(self, state):
        """New state entries, computed on local tensors, as they are stored."""
        return state

    def rounding(self, generator):
        """The generator of stochastic rounding (the rest of the step's own stream)."""
        return generator


WHOLE = Whole()


@contextlib.contextmanager
def reductions_across(shards):
    """Within the block, the reductions (total, reduce_sum, reduce_mean, subsample) complete their
    sums across the ranks that `shards` splits the parameter over (none for WHOLE)."""
    token = _SPLIT.set(None if shards is WHOLE else shards)
    try:
        yield
    finally:
        _SPLIT.reset(token)


def shards_of(p):
    """How parameter p is split: WHOLE for an ordinary tensor, a `Sharded` for a DTensor."""
    return Sharded(p) if _is_dtensor(p) else WHOLE


class Sharded(Whole):
    """A DTensor parameter split along one dim over one dim of its device mesh, in torch.chunk's
    blocks (what fully_shard makes; other mesh dims, as in HSDP, must replicate it)."""

    def __init__(self, p, owner="MLorc"):
        from torch.distributed.tensor import Replicate, Shard
        split = [(i, x.dim) for i, x in enumerate(p.placements) if type(x) is Shard]  # not _StridedShard
        if len(split) != 1 or not all(type(x) in (Shard, Replicate) for x in p.placements):
            raise NotImplementedError(f"{owner}: parameter of shape {tuple(p.shape)} has placements "
                                      f"{p.placements}; only parameters split along one dim (FSDP2's "
                                      "fully_shard, optionally with replicated mesh dims) are supported")
        (self.mesh_dim, dim), self.mesh, self.shape, self.ndim = split[0], p.device_mesh, p.shape, p.ndim
        self.dim = dim % p.ndim
        if p.ndim > 2 and self.dim != 0:
            raise NotImplementedError(f"{owner}: parameter of shape {tuple(p.shape)} is split along "
                                      f"dim {self.dim}; one with more than 2 dims must be split along dim 0")
        self.group = self.mesh.get_group(self.mesh_dim)
        world, self.coord = self.mesh.size(self.mesh_dim), self.mesh.get_local_rank(self.mesh_dim)
        size = p.shape[self.dim]
        chunk = -(-size // world)
        self.sizes = [max(0, min(chunk, size - i * chunk)) for i in range(world)]
        self.offset = min(self.coord * chunk, size)
        if p.to_local().shape[self.dim] != self.sizes[self.coord]:
            raise NotImplementedError(f"{owner}: parameter of shape {tuple(p.shape)} is not split in "
                                      "torch.chunk's blocks")

    def total(self, partial):
        partial = partial.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        torch.distributed.all_reduce(partial, group=self.group)
        return partial

    def sum(self, x, dim=None, over=None):
        over = dim if over is None else over
        if over is not None and over % self.ndim != self.dim:          # the split dim is not reduced
            return x.sum(dim)
        return self.total(x.sum() if dim is None else x.sum(dim))

    def mean(self, x, dim=None, over=None):
        count = math.prod(self.shape) if dim is None else self.shape[dim if over is None else over]
        return self.sum(x, dim, over) / count

    def subsample(self, x, every):
        """Every `every`-th entry along a dim that is not split (the last, or the first when the last
        is), so each rank holds its block of the sample; vectors are kept whole. With every > 1 this
        samples other entries than one process does (the same ones with every = 1)."""
        if x.ndim == 1:
            return x
        along = x.ndim - 1 if self.dim != x.ndim - 1 else 0
        return x[(slice(None),) * along + (slice(None, None, every),)]

    def local(self, t):
        return _local(t)

    def rsvd(self, A, rank, oversampling, power_iters, generators):
        return sharded_rsvd(A, rank, oversampling, power_iters, generators, self)

    def split_dim(self, name):
        """The dim of state entry `name` that is split like the parameter (None: every rank has it all)."""
        if name.endswith("_s"):                        # singular values
            return None
        if name.endswith("_U"):                        # U's rows are the parameter's rows
            return 0 if self.dim == 0 else None
        if name.endswith("_Vh"):                       # Vh's columns are the matrix's columns
            return 1 if self.dim == 1 else None
        if name.endswith("_row"):                      # CAME: means over the last dim
            return None if self.dim == self.ndim - 1 else self.dim
        if name.endswith("_col"):                      # CAME: means over dim -2
            return None if self.dim == self.ndim - 2 else min(self.dim, self.ndim - 2)
        return self.dim                                # parameter-shaped (or sub-sampled along another dim)

    def wrap(self, state):
        """Split entries become DTensors (so DCP saves every rank's block), replicated ones stay
        tensors (DCP saves one copy)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard
        wrapped = {}
        for name, value in state.items():
            dim = self.split_dim(name)
            if dim is None:
                wrapped[name] = value
                continue
            shape = list(value.shape)
            shape[dim] = self.shape[self.dim]
            placements = [Replicate()] * self.mesh.ndim
            placements[self.mesh_dim] = Shard(dim)
            stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
            wrapped[name] = DTensor.from_local(value, self.mesh, placements, shape=torch.Size(shape),
                                               stride=stride)
        return wrapped

    def rounding(self, generator):
        """Each block draws its own noise: one shared stream would repeat the same noise on every block."""
        seed = sketch_seed(generator.initial_seed(), self.coord, 0)
        return torch.Generator(device=generator.device).manual_seed(seed)

    def gather(self, A):
        """The whole matrices of a batch of this rank's blocks (an all-gather: small matrices only)."""
        axis = A.ndim - 2 if self.dim == 0 else A.ndim - 1
        shape = list(A.shape)
        shape[axis] = max(self.sizes)
        padded = A.new_zeros(shape)                    # all_gather wants the same shape on every rank
        padded.narrow(axis, 0, A.shape[axis]).copy_(A)
        blocks = [torch.empty_like(padded) for _ in self.sizes]
        torch.distributed.all_gather(blocks, padded, group=self.group)
        return torch.cat([block.narrow(axis, 0, size) for block, size in zip(blocks, self.sizes)], dim=axis)

    def block(self, t, axis):
        """This rank's block of a whole (replicated) tensor along `axis`."""
        return t.narrow(axis, self.offset, self.sizes[self.coord]).contiguous()


def tsqr(Y, shards):
    """Householder QR of tall matrices (L, m_i, w) whose rows are split across ranks in blocks of
    shards.sizes (TSQR, Demmel, Grigori, Hoemmen and Langou 2012): QR of each block, an all-gather of
    the small R factors, one QR of them stacked. Q = diag(Q_i) Q_stacked has orthonormal columns even
    when Y is rank-deficient, which Cholesky-QR of the Gram matrix would not give."""
    width = Y.shape[-1]
    Q_block, R_block = torch.linalg.qr(Y)                    # (L, m_i, h_i), (L, h_i, w): h_i = min(m_i, w)
    heights = [min(size, width) for size in shards.sizes]
    padded = Y.new_zeros(*Y.shape[:-2], width, width)      # all_gather wants the same shape everywhere
    padded[..., :R_block.shape[-2], :] = R_block
    blocks = [torch.empty_like(padded) for _ in heights]
    torch.distributed.all_gather(blocks, padded, group=shards.group)
    Q_stacked, R = torch.linalg.qr(torch.cat([b[..., :h, :] for b, h in zip(blocks, heights)], dim=-2))
    start = sum(heights[:shards.coord])
    return Q_block @ Q_stacked[..., start:start + heights[shards.coord], :], R


def sharded_rsvd(A, rank, oversampling, power_iters, generators, shards):
    """[M4] of a batch of matrices split across ranks by rows (A is this rank's (L, m_i, n)) or by
    columns ((L, m, n_i)), without gathering them. The same Omega and the same steps as rsvd, so the
    factors are one process's up to rounding; U comes back split by rows or Vh by columns like A,
    the rest replicated. Each step either keeps rows split (QR by TSQR) or all-reduces partial sums
    of an (m or n) x (r + p) matrix (then QR on every rank)."""
    m, n = shards.shape[0], math.prod(shards.shape[1:])
    k, width, by_rows = min(rank, m, n), rank + oversampling, shards.dim == 0
    if width >= min(m, n):              # the exact SVD, as rsvd does: the whole matrix is then
        U, s, Vh = rsvd(shards.gather(A), rank, oversampling)      # at most width * max(m, n) floats
        return (shards.block(U, -2), s, Vh) if by_rows else (U, s, shards.block(Vh, -1))
    omega = gaussian_sketch(generators, n, width, A)               # every rank draws the whole Omega
    if not by_rows:
        omega = omega[..., shards.offset:shards.offset + A.shape[-1], :]

    def orth(Y, split):                 # (Q, R) of a tall matrix split by rows, or held by every rank
        return tsqr(Y, shards) if split else torch.linalg.qr(Y)

    def summed(x, partial):             # x holds this rank's partial sums when `partial`
        return shards.total(x) if partial else x

    Q = orth(summed(A @ omega, not by_rows), by_rows)[0]           # Y = A Omega: (m, r + p)
    for _ in range(power_iters):
        Q = orth(summed((Q.mT @ A).mT, by_rows), not by_rows)[0]   # A^T Q: (n, r + p)
        Q = orth(summed(A @ Q, not by_rows), by_rows)[0]           # (m, r + p)
    Q_B, R_B = orth(summed((Q.mT @ A).mT, by_rows), not by_rows)   # B^T = (Q^T A)^T = Q_B R_B
    U_small, s, W_h = torch.linalg.svd(R_B.mT)                     # (r + p)^2, on every rank
    return Q @ U_small[..., :k], s[..., :k], W_h[..., :k, :] @ Q_B.mT


# ----------------------------------------------------------------------------------------------------
# Fused backward pass and memory accounting

def _hooked(handle):
    """Whether a hook handle (or None) is still attached (not removed)."""
    return handle is not None and handle.id in (handle.hooks_dict_ref() or {})


def attach_fused_backward(params, optimizer, accumulation_steps=1):
    """Step each parameter during backward, as soon as its gradient is accumulated, and free the
    gradient right away: peak memory then holds one gradient, not all of them. This is the one place
    where a gradient is dropped. With accumulation_steps=k, a parameter is stepped (and its gradient
    freed) at its k-th gradient, which then holds the sum of k backward() calls, as step() after k
    backward() calls would see it; the k - 1 before it keep accumulating. step(closure) is refused.
    Call optimizer.step() after each k-th backward(): it finds no gradients and only finishes the
    iteration (end_step(), which Prodigy / D-Adapt Lion need). Returns the hook handles (call
    .remove() to detach).

        handles = mlorc.attach_fused_backward(model.parameters(), opt)
        loss.backward()          # parameters are updated here
        opt.step()               # finishes the iteration
    """
    if not _is_int(accumulation_steps) or accumulation_steps < 1:
        raise ValueError(f"attach_fused_backward: invalid accumulation_steps={accumulation_steps!r}: "
                         "must be an int >= 1")
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    params = list(params)
    if any(_is_dtensor(p) for p in params):
        raise NotImplementedError("attach_fused_backward: FSDP2 sets sharded gradients after its "
                                  "reduce-scatter, so no per-parameter hook sees them; use step()")
    if not isinstance(optimizer, _MLorcOptimizer):
        raise TypeError(f"attach_fused_backward: optimizer must be an mlorc optimizer (one that steps a "
                        f"parameter at a time), got {type(optimizer).__name__}")
    held = {q for group in optimizer.param_groups for q in group["params"]}
    for index, p in enumerate(params):          # refused before any hook is added, not in backward
        if not p.requires_grad:
            continue
        if p not in held:
            raise ValueError(f"attach_fused_backward: parameter {index} (shape {tuple(p.shape)}) is "
                             "not in the optimizer, so its hook could not step it")
        if _hooked(optimizer._fused_handles.get(id(p))):
            raise ValueError(f"attach_fused_backward: parameter {index} (shape {tuple(p.shape)}) "
                             "already has a hook from this optimizer; it would be stepped twice")

    arrived = {}                                 # id(p) -> gradients accumulated since its last step

    def hook(p):
        arrived[id(p)] = arrived.get(id(p), 0) + 1
        if arrived[id(p)] < accumulation_steps:  # not yet: p.grad keeps accumulating
            return
        arrived[id(p)] = 0
        optimizer.step_param(p)
        p.grad = None

    handles = []
    for p in params:
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(hook))
            optimizer._fused_handles[id(p)] = handles[-1]
    return handles


def finetune_param_groups(model, weight_decay=0.01, rank=4, dense_embeddings=False):
    """Param groups the way fine-tuning recipes set them up: weight decay on matrices only (biases and
    norm weights, every parameter with ndim < 2, get none), rank-r moments for the matrices, and with
    dense_embeddings=True dense moments (rank=None) and no decay for the input and output embeddings,
    whose rows are updated sparsely and are the least low-rank. Every trainable parameter lands in
    exactly one group (tied weights once); frozen ones in none. Empty groups are left out.

        opt = MLorc_AdamW(finetune_param_groups(model, weight_decay=0.01, rank=8), lr=3e-3)
    """
    embeddings = set()
    if dense_embeddings:
        heads = [model.get_output_embeddings()] if hasattr(model, "get_output_embeddings") else []
        embeddings = {id(m.weight) for m in list(model.modules()) + heads
                      if isinstance(m, torch.nn.Embedding) or (m is not None and m in heads)}
    decay, no_decay, dense = [], [], []
    for p in model.parameters():                      # parameters() yields a tied weight once
        if p.requires_grad:
            (dense if id(p) in embeddings else no_decay if p.ndim < 2 else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, rank=rank),
              dict(params=no_decay, weight_decay=0.0, rank=rank),
              dict(params=dense, weight_decay=0.0, rank=None)]
    return [group for group in groups if group["params"]]


def state_bytes(optimizer):
    """Bytes of every tensor in the optimizer's state held by this process (a DTensor: its block)."""
    local = [_local(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in local)


# ----------------------------------------------------------------------------------------------------
# Demo: python mlorc.py

if __name__ == "__main__":
    steps = 300          # optimizer steps per run
    width = 256          # hidden width of the MLP (its matrices are 256 x 256)
    rank = 4             # MLorc rank
    lr = 3e-3            # one lr for all runs
    seed = 0

    data_gen = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(64, width, generator=data_gen) / 8, torch.randn(width, 8, generator=data_gen) / 16]
    x_all = torch.randn(4096, 64, generator=data_gen)
    y_all = torch.tanh(x_all @ teacher[0]) @ teacher[1]

    def make_model():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                                   torch.nn.GELU(), torch.nn.Linear(width, 8))

    runs = {
        "torch.optim.AdamW": lambda ps: torch.optim.AdamW(ps, lr=lr),
        "MLorc_AdamW full rank": lambda ps: MLorc_AdamW(ps, lr=lr, rank=width),
        f"MLorc_AdamW rank {rank}": lambda ps: MLorc_AdamW(ps, lr=lr, rank=rank),
        f"MLorc_Lion rank {rank}": lambda ps: MLorc_Lion(ps, lr=lr / 10, rank=rank),
    }
    results = []
    for name, make_opt in runs.items():
        model = make_model()
        opt = make_opt(model.parameters())
        start = time.perf_counter()
        for i in range(steps):
            idx = torch.randint(0, len(x_all), (128,), generator=data_gen)
            loss = torch.nn.functional.mse_loss(model(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            done = (i + 1) * 30 // steps
            sys.stdout.write(f"\r{name:<24} [{'#' * done}{'.' * (30 - done)}] loss {loss.item():.5f}")
        sys.stdout.write("\n")
        with torch.no_grad():
            final = torch.nn.functional.mse_loss(model(x_all), y_all).item()
        results.append((name, final, state_bytes(opt), time.perf_counter() - start))

    print(f"\n{'optimizer':<24} {'final loss':>11} {'state bytes':>12} {'vs AdamW':>9} {'time':>7}")
    for name, final, nbytes, seconds in results:
        print(f"{name:<24} {final:>11.6f} {nbytes:>12,} {nbytes / results[0][2]:>8.1%} {seconds:>6.1f}s")
