"""The C++/CUDA extension (csrc/): each torch.ops.mlorc operator against its Python twin, opcheck,
the optimizers with and without it, and the fallback when it cannot build.

Tolerances: the operators compute in fp32 like the Python path but in another order (the rank-r sum
of each rebuilt entry is a short loop instead of a matmul, and the compiler may contract a*b+c), so
single results differ by a few fp32 ulp (u = 6e-8): rtol 1e-5 leaves a 100x margin. Over 20
optimizer steps those differences feed back through the moments; measured parameter differences
stay below 1e-6 at lr 1e-2, against atol 1e-5.
"""
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import mlorc
from variants import extension_mode

pytestmark = pytest.mark.filterwarnings("ignore:mlorc. the C..")


class OpsWith:
    """torch.ops.mlorc with some operators replaced (mlorc.py looks them up on every call); `used`
    lists the operators called, in order (recorded at the call: Python looks an operator up before
    it evaluates the arguments, which may call others)."""

    def __init__(self, ops, **replaced):
        self.ops, self.replaced, self.used = ops, replaced, []

    def __getattr__(self, name):
        op = self.replaced.get(name) or getattr(self.ops, name)

        def call(*args):
            self.used.append(name)
            return op(*args)
        return call


@pytest.fixture(scope="module")
def ext():
    with extension_mode("1"):
        try:
            mlorc.load_extension()
        except RuntimeError as error:
            pytest.skip(f"the extension does not build here: {error}")
    return torch.ops.mlorc


def sample_inputs(device, seed=0):
    """Small, awkward cases: square, 1 x n, n x 1, rank above the smaller side, a wide matrix."""
    gen = torch.Generator().manual_seed(seed)
    for rows, cols, rank in [(12, 10, 3), (1, 9, 1), (9, 1, 1), (5, 7, 5), (33, 64, 4)]:
        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device)
        yield dict(p=rand(rows, cols), g=rand(rows, cols), m=(rand(rows, rank), rand(rank).abs(),
                   rand(rank, cols)), v=(rand(rows, rank), rand(rank).abs(), rand(rank, cols)))


def orthonormal_m(case):
    """(U, Vh) of a case's m factors made orthonormal, as rsvd's are: the spaces kept_part uses."""
    return torch.linalg.qr(case["m"][0]).Q, torch.linalg.qr(case["m"][2].mT).Q.mT


def _test_negative_mean(ops, device):
    for case in sample_inputs(device):
        expected = mlorc.negative_mean(mlorc.reconstruct(*case["v"]))
        torch.testing.assert_close(ops.negative_mean(*case["v"]), expected, rtol=1e-5, atol=1e-6)
    zero = (torch.zeros(4, 2, device=device), torch.zeros(2, device=device), torch.zeros(2, 3, device=device))
    assert ops.negative_mean(*zero).item() == 0.0


def _test_adamw_step(ops, device):
    """Without and with full_weight_outside (g's kept part in m~'s column or row space, as factors;
    None where the rank reaches the smaller side, as MLorc_AdamW passes it)."""
    b1, b2, lr, wd, eps, step = 0.9, 0.99, 1e-2, 0.1, 1e-8, 3
    for case, outside in itertools.product(sample_inputs(device), [False, True]):
        p, g = case["p"].clone(), case["g"]
        shift = ops.negative_mean(*case["v"])
        m_out, v_out = torch.empty_like(p), torch.empty_like(p)
        U_m, Vh_m = orthonormal_m(case)
        kept = mlorc.kept_part(g, U_m, Vh_m) if outside else None
        extra = () if kept is None else (*kept, b1 - b1 ** step)
        ops.adamw_step_(p, g, *case["m"], *case["v"], shift, m_out, v_out, b1, b2, lr, wd, eps,
                        1 - b1 ** step, 1 - b2 ** step, mlorc.adam_ratio_bound(step, b1, b2), *extra)
        # the Python twin: MLorc_AdamW._direction, then apply_update_ (random factors: the clamp
        # to dense Adam's bound fires on some entries)
        m = mlorc.reconstruct(*case["m"]) * b1 + g * (1 - b1)
        v = mlorc.repair_second_moment(mlorc.reconstruct(*case["v"])) * b2 + g * g * (1 - b2)
        expected = case["p"].clone()
        d = mlorc.adamw_direction(m, v, step, (b1, b2), eps, False, bounded=True,
                                  outside=mlorc.outside_kept(g, U_m, Vh_m) if outside else None)
        mlorc.apply_update_(expected, d, lr, wd)
        torch.testing.assert_close(m_out, m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v_out, v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)


def _test_lion_step(ops, device):
    """Without and with full_weight_outside (as in _test_adamw_step)."""
    b1, b2, lr, wd = 0.9, 0.99, 1e-2, 0.1
    for case, outside in itertools.product(sample_inputs(device), [False, True]):
        p, g = case["p"].clone(), case["g"]
        m_out = torch.empty_like(p)
        U_m, Vh_m = orthonormal_m(case)
        kept = mlorc.kept_part(g, U_m, Vh_m) if outside else None
        extra = () if kept is None else (*kept, b1)
        ops.lion_step_(p, g, *case["m"], m_out, b1, b2, lr, wd, *extra)
        m_prev = mlorc.reconstruct(*case["m"])
        expected = case["p"].clone()
        g_out = mlorc.outside_kept(g, U_m, Vh_m) if outside else None
        mlorc.apply_update_(expected, mlorc.lion_direction(m_prev, g, b1, g_out), lr, wd)
        torch.testing.assert_close(m_out, m_prev * b2 + g * (1 - b2), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)


def dense_moment(old, g, beta, squared=False, shift=None):
    """The Python twin of the moment that moment_matmul multiplies: [M1], [M2] if shift, [M3]."""
    rebuilt = mlorc.reconstruct(*old)
    if shift is not None:
        rebuilt = torch.where(rebuilt < 0, shift, rebuilt)
    return rebuilt * beta + (g * g if squared else g) * (1 - beta)


def _test_update_ops(ops, device):
    """adamw_update_ / lion_update_ move the parameter exactly as adamw_step_ / lion_step_."""
    for case in sample_inputs(device):
        shift = ops.negative_mean(*case["v"])
        scalars = (0.9, 0.99, 1e-2, 0.1, 1e-8, 0.1, 0.01, 1.0)
        p_step, p_update = case["p"].clone(), case["p"].clone()
        ops.adamw_step_(p_step, case["g"], *case["m"], *case["v"], shift, torch.empty_like(p_step),
                        torch.empty_like(p_step), *scalars)
        ops.adamw_update_(p_update, case["g"], *case["m"], *case["v"], shift, *scalars)
        assert torch.equal(p_step, p_update)
        p_step, p_update = case["p"].clone(), case["p"].clone()
        ops.lion_step_(p_step, case["g"], *case["m"], torch.empty_like(p_step), 0.9, 0.99, 1e-2, 0.1)
        ops.lion_update_(p_update, case["g"], *case["m"], 0.9, 0.99, 1e-2, 0.1)
        assert torch.equal(p_step, p_update)


def _test_moment_matmul(ops, device):
    """Both products sum the same terms in another order (rows in groups and lanes, or chunks; BLAS;
    a first moment's split sums g's terms and its factors' terms apart), so each result differs by
    rounding relative to the sum of the terms' magnitudes, |A| @ |X|: measured against a float64
    product, at most 2.1e-6 of it (a first moment's A^T X over 5000 rows) and 3.2e-7 otherwise,
    bounded by about sqrt(n) u = 4e-6 for n = 5000 terms (u = 6e-8). 1e-5 of it still catches a
    wrong block, beta or repair, which moves results by ~1 / sqrt(n) = 1e-2 of it or more. Shapes:
    one block of rows, a few with a short last one, more than the 8 ranges the CPU's transposed
    product sums separately, an odd number of rows (the CPU takes them in pairs), one row, widths
    that are not a multiple of the CPU's 16 lanes, and (CUDA) more rows than one 4M-entry chunk; X
    6, 8, 11 and 20 wide (the CPU holds sums for 8 columns of X at a time, and rebuilds a row once
    for all of them where X is wider), the last with 17 factor terms; first moments, whose products
    are split (g X in the row loops, the factors' part beside them), and second moments, rebuilt and
    repaired in them; X row-major (as rsvd's Omega) and column-major (as its Q from
    torch.linalg.qr); where the width is a multiple of 8 the CPU reads X in place in one layout (X^T
    for A X, if the columns are also a multiple of 16; X for A^T X) and copies it in the other."""
    shapes = [(12, 10), (300, 100), (5000, 64), (40, 33), (7, 50), (1, 20)]
    shapes += [(70000, 65)] if device == "cuda" else []
    for (rows, cols), (width, r) in itertools.product(shapes, [(6, 4), (8, 4), (11, 4), (20, 17)]):
        gen = torch.Generator().manual_seed(rows)
        old = tuple(t.to(device) for t in (torch.randn(rows, r, generator=gen), torch.rand(r, generator=gen),
                                           torch.randn(r, cols, generator=gen)))
        g = torch.randn(rows, cols, generator=gen).to(device)
        for squared, shift in [(False, None), (True, ops.negative_mean(*old))]:
            A = dense_moment(old, g, 0.9, squared, shift)
            for transposed, length in [(False, cols), (True, rows)]:
                X = torch.randn(length, width, generator=gen).to(device)
                expected = (A.T if transposed else A) @ X
                scale = (A.T if transposed else A).abs() @ X.abs()
                for layout in (X, X.T.contiguous().T):                  # row-major, column-major
                    ours = ops.moment_matmul(*old, g, 0.9, squared, shift, layout, transposed)
                    assert ((ours - expected).abs() <= 1e-5 * scale).all()


def pair_cases(device):
    """(rows, cols, width, generator, m's old factors, v's, g) for MLorc_AdamW's pair of moments:
    the shapes of _test_moment_matmul, X 3, 4, 6 and 11 wide (one block of 4 columns of each
    product on the CPU, or several), with 2-7 factor terms."""
    shapes = [(12, 10), (300, 100), (5000, 64), (40, 33), (7, 50), (1, 20)]
    for (rows, cols), (width, r) in itertools.product(shapes, [(3, 2), (4, 4), (6, 4), (11, 7)]):
        gen = torch.Generator().manual_seed(rows + width)
        m_old, v_old = ([t.to(device) for t in (torch.randn(rows, r, generator=gen),
                                                torch.rand(r, generator=gen),
                                                torch.randn(r, cols, generator=gen))] for _ in range(2))
        yield rows, cols, width, gen, m_old, v_old, torch.randn(rows, cols, generator=gen).to(device)


def _test_moment_pair_matmul(ops, device):
    """MLorc_AdamW's m and v multiplied in one pass over their g, against the dense moments' products,
    within _test_moment_matmul's bound relative to the sum of the terms' magnitudes: for m, whose
    product is split, the terms are b1 m~ and (1 - b1) g apart (where they cancel, |m| alone can be
    far smaller: a one-row A^T X measured 1.8e-5 of |m| @ |X|; of the terms' sum, 2.8e-6 at most
    over these cases). Widths 3, 4 (one block of 4 columns of each product on the CPU), 6 and 11
    (several, v rebuilt once into a buffer), with and without v's repair; its shapes."""
    for rows, cols, width, gen, m_old, v_old, g in pair_cases(device):
        for shift in (None, ops.negative_mean(*v_old)):
            M, V = dense_moment(m_old, g, 0.9), dense_moment(v_old, g, 0.999, True, shift)
            for transposed, length in [(False, cols), (True, rows)]:
                X_m, X_v = (torch.randn(length, width, generator=gen).to(device) for _ in range(2))
                ours = ops.moment_pair_matmul(*m_old, *v_old, g, 0.9, 0.999, shift, X_m, X_v, transposed)
                m_terms = 0.9 * mlorc.reconstruct(*m_old).abs() + 0.1 * g.abs()
                for product, A, terms, X in zip(ours, (M, V), (m_terms, V.abs()), (X_m, X_v)):
                    A, terms = (A.T, terms.T) if transposed else (A, terms)
                    assert ((product - A @ X).abs() <= 1e-5 * (terms @ X.abs())).all()


def _test_update_products(ops, device):
    """adamw_update_products_ moves the parameter exactly as adamw_update_ (with and without g's kept
    part) and returns what moment_pair_matmul gives for the transposed products of the new moments,
    within _test_moment_pair_matmul's bound (the same terms; on the CPU summed in the same order, from
    the entries the pass computes). Its shapes: rows in one range or in several (each range sums its
    own partial), widths of one block of 4 columns of each product and of several."""
    for rows, cols, width, gen, m_old, v_old, g in pair_cases(device):
        p, shift = torch.randn(rows, cols, generator=gen).to(device), ops.negative_mean(*v_old)
        X_m, X_v = (torch.randn(rows, width, generator=gen).to(device) for _ in range(2))
        scalars = (0.9, 0.999, 1e-2, 0.1, 1e-8, 0.1, 0.01, 1.0)
        kepts = [()]                                  # kept_part's spaces: r orthonormal vectors
        if m_old[1].numel() <= min(rows, cols):
            U, Vh = (t.contiguous() for t in orthonormal_m(dict(m=m_old)))
            kepts.append((*ops.kept_part(g, U, Vh), 0.8))
        for kept in kepts:
            p_update, p_products = p.clone(), p.clone()
            ops.adamw_update_(p_update, g, *m_old, *v_old, shift, *scalars, *kept)
            ours = ops.adamw_update_products_(p_products, g, *m_old, *v_old, shift, X_m, X_v, *scalars, *kept)
            assert torch.equal(p_update, p_products)
            M, V = dense_moment(m_old, g, 0.9), dense_moment(v_old, g, 0.999, True, shift)
            m_terms = 0.9 * mlorc.reconstruct(*m_old).abs() + 0.1 * g.abs()
            for product, A, terms, X in zip(ours, (M, V), (m_terms, V.abs()), (X_m, X_v)):
                assert ((product - A.T @ X).abs() <= 1e-5 * (terms.T @ X.abs())).all()


def _test_kept_part(ops, device):
    """kept_part's factors (L, R) = ([U, g Vh^T - U U^T g Vh^T], [U^T g; Vh]) against the Python
    twin's expression: U and Vh copied exactly, the products within the rounding bound of _test_moment_matmul
    relative to their terms' magnitudes (each a sum of many terms in another order). Shapes: an odd
    number of rows (the CPU takes them in pairs, a lone last row with weight 0 in U^T g), one row,
    no rows, columns not a multiple of 16 lanes, more row blocks than the 8 ranges U^T g is summed
    in; ranks 1, 4 (the CPU's 4-term blocks) and 5 and 17 (8-term blocks, a partial last one);
    factors orthonormal, as rsvd's (where the shape allows), and not."""
    shapes = [(12, 10), (7, 50), (1, 20), (0, 5), (5000, 64), (300, 33)]
    for (rows, cols), r, orthonormal in itertools.product(shapes, [1, 4, 5, 17], [False, True]):
        gen = torch.Generator().manual_seed(rows + r)
        g, U, Vh = (torch.randn(*shape, generator=gen).to(device)
                    for shape in [(rows, cols), (rows, r), (r, cols)])
        if orthonormal and r <= min(rows, cols):
            U, Vh = torch.linalg.qr(U).Q.contiguous(), torch.linalg.qr(Vh.mT).Q.mT.contiguous()
        L, R = ops.kept_part(g, U, Vh)
        # mlorc.kept_part's expression (mlorc.kept_part itself gives None where U or Vh spans a side)
        UtG = U.mT @ g
        R_twin, L_twin = UtG, torch.cat([U, g @ Vh.mT - U @ (UtG @ Vh.mT)], dim=-1)
        assert L.shape == (rows, 2 * r) and R.shape == (2 * r, cols)
        assert torch.equal(L[:, :r], U) and torch.equal(R[r:], Vh)
        utg_terms = U.mT.abs() @ g.abs()
        assert ((R[:r] - R_twin).abs() <= 1e-5 * utg_terms).all()
        terms = g.abs() @ Vh.mT.abs() + U.abs() @ (utg_terms @ Vh.mT.abs())
        assert ((L[:, r:] - L_twin[:, r:]).abs() <= 1e-5 * terms).all()


def test_kept_part_does_not_depend_on_the_thread_count(ext):
    """U^T g is summed over fixed row ranges, whichever thread runs them: the same bits at any thread
    count (as moment_matmul's A^T X)."""
    gen = torch.Generator().manual_seed(2)
    g, U, Vh = (torch.randn(*shape, generator=gen) for shape in [(5000, 64), (5000, 4), (4, 64)])
    parts = [torch.cat([L.flatten(), R.flatten()]) for _ in at_thread_counts(1, 2, 3)
             for L, R in [ext.kept_part(g, U, Vh)]]
    assert all(torch.equal(parts[0], other) for other in parts[1:])


def test_fused_moments_multiply_like_the_dense_stack(ext, device):
    """FusedMoments stands for the stack of dense new moments in rsvd: A @ X and A.mT @ X agree with
    the dense stack's, within the rounding bound of _test_moment_matmul."""
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    g, old = rand(300, 70), (rand(300, 4), rand(4).abs(), rand(4, 70))
    shift = ext.negative_mean(*old)
    moments = [mlorc.NewMoment(g, old, 0.9), mlorc.NewMoment(g, old, 0.99, True, shift)]
    A = mlorc.FusedMoments(moments)
    dense = torch.stack([dense_moment(old, g, 0.9), dense_moment(old, g, 0.99, True, shift)])
    assert A.shape == dense.shape and A.mT.shape == dense.mT.shape
    for ours, theirs, X in [(A, dense, rand(2, 70, 5)), (A.mT, dense.mT, rand(2, 300, 5))]:
        assert ((ours @ X - theirs @ X).abs() <= 1e-5 * (theirs.abs() @ X.abs())).all()


def at_thread_counts(*counts):
    """Each count in turn, with torch's thread count set to it; the caller's is restored after."""
    threads = torch.get_num_threads()
    try:
        for n in counts:
            torch.set_num_threads(n)
            yield n
    finally:
        torch.set_num_threads(threads)


def test_row_loops_run_on_every_thread(ext):
    """The CPU passes split a large matrix's rows over torch's threads: the extension is built with
    OpenMP (without it, at::parallel_for runs them all on the calling thread)."""
    if not mlorc.OPENMP_FLAGS:
        pytest.skip("the extension is built without OpenMP here (torch without it, or not Linux)")
    for n in at_thread_counts(1, 2, 3):
        assert ext.parallel_threads() == n


def test_moment_matmul_does_not_depend_on_the_thread_count(ext):
    """Both products sum in a fixed order (lanes, then fixed row ranges for A^T X), whichever thread
    runs which rows, so they give the same bits at any thread count (what bitwise resume needs)."""
    gen = torch.Generator().manual_seed(1)
    old = (torch.randn(5000, 4, generator=gen), torch.rand(4, generator=gen),
           torch.randn(4, 64, generator=gen))
    g = torch.randn(5000, 64, generator=gen)
    X = {False: torch.randn(64, 6, generator=gen), True: torch.randn(5000, 6, generator=gen)}
    for squared, transposed in itertools.product([False, True], [False, True]):
        products = [ext.moment_matmul(*old, g, 0.9, squared, None, X[transposed], transposed)
                    for _ in at_thread_counts(1, 2, 3)]
        assert all(torch.equal(products[0], other) for other in products[1:])


def _test_opcheck(ops, device):
    case = next(iter(sample_inputs(device)))
    p, g = case["p"].clone(), case["g"]
    shift = ops.negative_mean(*case["v"])
    torch.library.opcheck(ops.negative_mean, case["v"])
    torch.library.opcheck(ops.adamw_step_, (p, g, *case["m"], *case["v"], shift, torch.empty_like(p),
                                            torch.empty_like(p), 0.9, 0.99, 1e-2, 0.1, 1e-8, 0.1, 0.01,
                                            1.0))
    torch.library.opcheck(ops.lion_step_, (p, g, *case["m"], torch.empty_like(p), 0.9, 0.99, 1e-2, 0.1))
    torch.library.opcheck(ops.adamw_update_, (p, g, *case["m"], *case["v"], shift, 0.9, 0.99, 1e-2, 0.1,
                                              1e-8, 0.1, 0.01, 1.0))
    kept = mlorc.kept_part(g, *orthonormal_m(case))
    torch.library.opcheck(ops.adamw_update_, (p, g, *case["m"], *case["v"], shift, 0.9, 0.99, 1e-2, 0.1,
                                              1e-8, 0.1, 0.01, 1.0, *kept, 0.8))
    torch.library.opcheck(ops.lion_update_, (p, g, *case["m"], 0.9, 0.99, 1e-2, 0.1))
    torch.library.opcheck(ops.lion_update_, (p, g, *case["m"], 0.9, 0.99, 1e-2, 0.1, *kept, 0.9))
    for transposed, size in [(False, p.shape[1]), (True, p.shape[0])]:
        X = torch.randn(size, 3, device=device)
        torch.library.opcheck(ops.moment_matmul, (*case["v"], g, 0.9, True, shift, X, transposed))
        torch.library.opcheck(ops.moment_matmul, (*case["m"], g, 0.9, False, None, X, transposed))
        torch.library.opcheck(ops.moment_pair_matmul, (*case["m"], *case["v"], g, 0.9, 0.99, shift, X, X,
                                                       transposed))
    torch.library.opcheck(ops.kept_part, (g, *(t.contiguous() for t in orthonormal_m(case))))
    X = torch.randn(p.shape[0], 3, device=device)
    torch.library.opcheck(ops.adamw_update_products_, (p, g, *case["m"], *case["v"], shift, X, X, 0.9, 0.99,
                                                       1e-2, 0.1, 1e-8, 0.1, 0.01, 1.0, *kept, 0.8))


def _test_bad_shapes_raise(ops, device):
    case = next(iter(sample_inputs(device)))
    p = case["p"]
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.lion_step_(p, case["g"], case["m"][0][:-1], *case["m"][1:], torch.empty_like(p), 0.9, 0.99, 1e-2, 0.0)
    with pytest.raises(RuntimeError, match="float32"):
        ops.lion_step_(p.double(), case["g"].double(), *case["m"], torch.empty_like(p).double(), 0.9, 0.99,
                       1e-2, 0.0)
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.kept_part(case["g"], case["m"][0][:-1], case["m"][2])
    X = torch.zeros(p.shape[0] + 1, 3, device=device)
    with pytest.raises(RuntimeError, match="X_m and X_v must be float32, as wide, with the matrix's rows"):
        ops.adamw_update_products_(p.clone(), case["g"], *case["m"], *case["v"], ops.negative_mean(*case["v"]),
                                   X, X, 0.9, 0.99, 1e-2, 0.1, 1e-8, 0.1, 0.01, 1.0)


CHECKS = [_test_negative_mean, _test_adamw_step, _test_lion_step, _test_update_ops, _test_moment_matmul,
          _test_moment_pair_matmul, _test_update_products, _test_kept_part, _test_opcheck,
          _test_bad_shapes_raise]


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__[6:])
def test_ops_cpu(ext, check):
    check(ext, "cpu")


@pytest.mark.parametrize("level", [0, 3])
@pytest.mark.parametrize("check", [_test_negative_mean, _test_adamw_step, _test_lion_step, _test_update_ops,
                                   _test_moment_matmul, _test_moment_pair_matmul, _test_update_products,
                                   _test_kept_part],
                         ids=lambda f: f.__name__[6:])
def test_ops_cpu_on_lower_instruction_sets(ext, check, level, monkeypatch):
    """The CPU row loops are compiled for AVX-512 (level 4), AVX2 (3) and baseline x86-64 (0), and
    the best the CPU runs is used; MLORC_CPU_LEVEL picks a lower one, so each build is checked
    against the same Python twins as the default one."""
    monkeypatch.setenv("MLORC_CPU_LEVEL", str(level))
    if ext.cpu_level() != level:
        pytest.skip(f"no level-{level} build of the row loops for this compiler or CPU")
    check(ext, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__[6:])
def test_ops_cuda(ext, check):
    check(ext, "cuda")


SHAPES = [(12, 10), (3, 4, 2, 2), (7,), (1, 9), (9, 1), (4, 3)]   # (4, 3) at rank 4: full rank


def train(cls, extension, device, dtype=torch.float32, steps=20, **kwargs):
    with extension_mode(extension):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in SHAPES]
        opt = cls(params, rank=4, oversampling=1, **kwargs)
        for _ in range(steps):
            for p in params:
                g = torch.randn(p.shape, generator=gen)
                p.grad = (g.sign() * (g.abs() + 0.1)).to(device, dtype)   # no entry near 0: no sign flips
            opt.step()
        return params


@pytest.mark.parametrize("cls,kwargs", [
    (mlorc.MLorc_AdamW, dict(lr=1e-2, weight_decay=0.1, full_weight_outside=False)),
    (mlorc.MLorc_AdamW, dict(lr=1e-2, weight_decay=0.1, full_weight_outside=True)),
    (mlorc.MLorc_Lion, dict(lr=1e-2, weight_decay=0.1))], ids=["AdamW", "AdamW_outside", "Lion"])
def test_optimizer_with_extension_matches_pure_pytorch(ext, cls, kwargs, device):
    pure, fused = train(cls, "0", device, **kwargs), train(cls, "1", device, **kwargs)
    start = train(cls, "0", device, steps=0, **kwargs)
    for a, b, s in zip(pure, fused, start):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert not torch.equal(a, s)


def assert_steps_match(cls, shapes, device, steps=10, seed=0, **options):
    """Each of `steps` steps of cls starts the pure path and the extension's from the same parameters
    and state (the pure path's), and their results agree to the tolerance above: parameters and the
    compressed moments, rebuilt. One step at a time: over many steps run apart, the order of the sums
    decides a trajectory through [M4]'s truncation (10 steps from one start of the products-only
    test below ended beyond the tolerance for 2 of 12 seeds with MLorc_AdamW and 1 of 12 with
    MLorc_Lion, at 75f2125). Lion's step is a sign, which flips where the pure path's sum is within
    rounding of 0, moving the entry 2 lr the other way: entries that differ must differ by that and
    be rare (at most 1 in 10^4)."""
    gen = torch.Generator().manual_seed(seed)
    pure = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    fused = [p.detach().clone().requires_grad_() for p in pure]
    opt_pure, opt_fused = cls(pure, **options), cls(fused, **options)
    for _ in range(steps):
        for p, q in zip(pure, fused):
            g = torch.randn(p.shape, generator=gen)
            p.grad = (g.sign() * (g.abs() + 0.1)).to(device)
            q.grad = p.grad.clone()
            with torch.no_grad():
                q.copy_(p)
        opt_fused.load_state_dict(opt_pure.state_dict())
        with extension_mode("0"):
            opt_pure.step()
        with extension_mode("1"):
            opt_fused.step()
        for p, q in zip(pure, fused):
            apart = ~torch.isclose(q, p, rtol=1e-5, atol=1e-5)
            if cls.sign_based:
                flip = torch.full_like(q[apart], 2 * options["lr"])
                torch.testing.assert_close((q - p)[apart].abs(), flip, rtol=1e-3, atol=0)
                assert apart.sum() <= max(1, p.numel() // 10**4)
            else:
                assert not apart.any()
            for name in cls.moments:
                torch.testing.assert_close(mlorc.reconstruct(*mlorc.factors(opt_fused.state[q], name)),
                                           mlorc.reconstruct(*mlorc.factors(opt_pure.state[p], name)),
                                           rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("power_iters", [0, 2])
@pytest.mark.parametrize("cls", [mlorc.MLorc_AdamW, mlorc.MLorc_Lion], ids=["AdamW", "Lion"])
def test_products_only_compression_matches_pure_pytorch(ext, cls, power_iters, device):
    """Where [M4] sketches, the fused step never writes the new moments: [M4] reaches them through
    products (FusedMoments). Matrices of several row blocks, same-shape ones batched together, at
    every power_iters, agree with the pure path step by step (assert_steps_match)."""
    with extension_mode("1"):
        assert mlorc.extension_ready(torch.device(device))
    assert_steps_match(cls, [(700, 48), (40, 300), (700, 48)], device, lr=1e-2, rank=3, oversampling=2,
                       power_iters=power_iters)


@pytest.mark.parametrize("cls", [mlorc.MLorc_AdamW, mlorc.MLorc_Lion], ids=["AdamW", "Lion"])
def test_wide_sketches_write_the_second_moment_on_cpu(ext, cls, monkeypatch):
    """On the CPU, where a sketch is wider than CPU_PRODUCTS_MAX_WIDTH, a second moment is not
    reached through products (each would rebuild it): MLorc_AdamW's fused pass writes the new
    moments (adamw_step_) and [M4] multiplies them with BLAS; a sketch of exactly the largest width
    still takes the products (moment_pair_matmul, m and v in one pass). MLorc_Lion's first moment
    takes them (moment_matmul) at every width. Either way the steps agree with the pure path's
    (assert_steps_match). The sketches have no oversampling, so [M4] truncates nothing: with 4
    columns more than the rank, the truncation of these nearly flat spectra (rank 16-18 of 40
    columns) moved the rebuilt moments by rounding x 1 / (the gap between singular values), up to
    1.5e-5 at one seed of eight."""
    assert mlorc.extension_ready(torch.device("cpu"))     # its check's calls are not recorded
    writes, multiplies = {mlorc.MLorc_AdamW: ("adamw_step_", "moment_pair_matmul"),
                          mlorc.MLorc_Lion: ("lion_step_", "moment_matmul")}[cls]
    for width in (mlorc.CPU_PRODUCTS_MAX_WIDTH + 2, mlorc.CPU_PRODUCTS_MAX_WIDTH):
        products = width <= mlorc.CPU_PRODUCTS_MAX_WIDTH or cls is mlorc.MLorc_Lion
        ops = OpsWith(ext)
        monkeypatch.setattr(torch.ops, "mlorc", ops)
        assert_steps_match(cls, [(300, 40), (300, 40)], "cpu", steps=5, lr=1e-2, rank=width, oversampling=0)
        assert (multiplies in ops.used) == products
        assert (writes in ops.used) == (not products)


@pytest.mark.parametrize("cls,update", [(mlorc.MLorc_AdamW, "adamw_update_products_"),
                                        (mlorc.MLorc_Lion, "lion_update_")], ids=["AdamW", "Lion"])
def test_each_kept_part_is_formed_just_before_its_pass(ext, cls, update, monkeypatch):
    """Where [M4] reaches the new moments through products, a batch's parameters move after [M4]'s
    first products; each one's kept part (full_weight_outside: 2r (m + n) floats) is formed just
    before its own update pass, so a batch's kept parts are never all held at once."""
    assert mlorc.extension_ready(torch.device("cpu"))     # its check's calls are not recorded
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(60, 40, generator=gen).requires_grad_() for _ in range(3)]   # one batch
    opt = cls(params, rank=3)
    for step in range(2):                                  # the first step has no kept part yet
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        ops = OpsWith(ext)
        monkeypatch.setattr(torch.ops, "mlorc", ops)
        opt.step()
        monkeypatch.setattr(torch.ops, "mlorc", ext)
    passes = [name for name in ops.used if name in ("kept_part", update)]
    assert passes == ["kept_part", update] * 3


def test_bf16_parameters_take_the_python_path(ext):
    """The fused ops cover fp32 parameters; bf16 ones (stochastic rounding) run the Python rules,
    so the result is the pure path's, bitwise."""
    pure = train(mlorc.MLorc_AdamW, "0", "cpu", torch.bfloat16, steps=5)
    fused = train(mlorc.MLorc_AdamW, "1", "cpu", torch.bfloat16, steps=5)
    assert all(torch.equal(a, b) for a, b in zip(pure, fused))


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(mlorc, "_extension", {})
    monkeypatch.delenv("MLORC_EXTENSION", raising=False)
    with pytest.warns(UserWarning, match="compiler exploded"):
        assert mlorc.load_extension() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # the decision is kept: no second warning
        assert mlorc.load_extension() is False
        p = torch.zeros(3, 2, requires_grad=True)
        p.grad = torch.ones(3, 2)
        mlorc.MLorc_AdamW([p], rank=1).step()              # steps on the pure path
    assert not mlorc.extension_loaded()
    assert not torch.equal(p, torch.zeros(3, 2))


def test_required_extension_raises_on_build_failure(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(mlorc, "_extension", {})
    monkeypatch.setenv("MLORC_EXTENSION", "1")
    with pytest.raises(RuntimeError, match="MLORC_EXTENSION=1.*compiler exploded"):
        mlorc.load_extension()


def wrong_update(ext):
    """adamw_update_products_ (the op that moves a sketched matrix on the CPU) that moves the
    parameter 1e-3 too far: a kernel that builds and runs, wrongly."""
    def update(P, *args):
        products = ext.adamw_update_products_(P, *args)
        P.add_(1e-3)
        return products
    return update


def cannot_launch(*args):
    raise RuntimeError("no kernel image is available for execution on the device")


@pytest.mark.parametrize("broken", ["wrong", "raises"])
def test_a_fused_step_that_differs_from_pure_falls_back_with_one_warning(ext, monkeypatch, broken):
    """The first fused step on a device checks the extension against the pure path there
    (mlorc.extension_problem); when it differs or fails, the device gets the pure path, bitwise."""
    pure = train(mlorc.MLorc_AdamW, "0", "cpu", steps=3)
    replaced = wrong_update(ext) if broken == "wrong" else cannot_launch
    monkeypatch.setattr(torch.ops, "mlorc", OpsWith(ext, adamw_update_products_=replaced))
    monkeypatch.setattr(mlorc, "_extension", {"loaded": True})
    with pytest.warns(UserWarning, match="fused step on cpu does not reproduce pure PyTorch: MLorc_AdamW"):
        fallen_back = train(mlorc.MLorc_AdamW, "", "cpu", steps=3)
    assert all(torch.equal(a, b) for a, b in zip(pure, fallen_back))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # decided once per device type
        assert mlorc.extension_ready(torch.device("cpu")) is False


def test_the_check_passes_a_correct_extension_and_uses_it(ext, monkeypatch):
    """Not a check that cannot fail: with the operators as built, it finds no problem and the
    optimizer then takes the fused step (its operators are called)."""
    calls = []

    def counted(*args):
        calls.append(1)
        return ext.adamw_update_products_(*args)

    monkeypatch.setattr(mlorc, "_extension", {"loaded": True})
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")       # the check holds fp32 matmuls to "highest"
    try:
        assert mlorc.extension_problem(torch.device("cpu")) is None
        assert torch.get_float32_matmul_precision() == "medium"      # and restores the user's
    finally:
        torch.set_float32_matmul_precision(precision)
    monkeypatch.setattr(torch.ops, "mlorc", OpsWith(ext, adamw_update_products_=counted))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(mlorc.MLorc_AdamW, "1", "cpu", steps=2)
    assert mlorc.extension_ready(torch.device("cpu")) is True and calls
    assert mlorc.extension_ready(torch.device("meta")) is False       # no kernels there: no check
    assert set(mlorc._extension["ready"]) == {"cpu"}


def test_a_required_extension_that_differs_from_pure_raises_before_any_change(ext, monkeypatch):
    monkeypatch.setattr(torch.ops, "mlorc", OpsWith(ext, adamw_update_products_=wrong_update(ext)))
    monkeypatch.setattr(mlorc, "_extension", {"loaded": True})
    monkeypatch.setenv("MLORC_EXTENSION", "1")
    p, v = torch.ones(30, 20, requires_grad=True), torch.ones(5, requires_grad=True)
    p.grad, v.grad = torch.full((30, 20), 0.5), torch.full((5,), 0.5)
    opt = mlorc.MLorc_AdamW([v, p], rank=2)                # the vector would be stepped first
    with pytest.raises(RuntimeError, match="MLORC_EXTENSION=1 but the extension's fused step on cpu "
                                           "does not reproduce pure PyTorch: MLorc_AdamW's parameters differ"):
        opt.step()
    assert torch.equal(p, torch.ones(30, 20)) and torch.equal(v, torch.ones(5)) and not opt.state


@pytest.mark.parametrize("options", [dict(rank=None), dict(use_grams=True), dict(rank=2)],
                         ids=["dense moments", "grams", "bf16"])
def test_no_build_or_check_where_no_fused_step_can_follow(monkeypatch, options):
    """The extension is built, and checked on a device, only for parameters it could step: none for
    dense moments, options that change the direction, or bf16 parameters."""
    from torch.utils import cpp_extension

    def must_not_build(*args, **kwargs):
        raise AssertionError("built for an optimizer that cannot use it")

    monkeypatch.setattr(cpp_extension, "load", must_not_build)
    monkeypatch.setattr(mlorc, "_extension", {})
    monkeypatch.delenv("MLORC_EXTENSION", raising=False)
    dtype = torch.bfloat16 if options == dict(rank=2) else torch.float32
    p = torch.ones(30, 20, dtype=dtype, requires_grad=True)
    p.grad = torch.full((30, 20), 0.5, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # no "extension unavailable" warning
        mlorc.MLorc_AdamW([p], **options).step()
    assert "loaded" not in mlorc._extension and not torch.equal(p, torch.ones(30, 20, dtype=dtype))


def test_disabled_extension_is_never_built(monkeypatch):
    from torch.utils import cpp_extension

    def must_not_build(*args, **kwargs):
        raise AssertionError("built although MLORC_EXTENSION=0")

    monkeypatch.setattr(cpp_extension, "load", must_not_build)
    monkeypatch.setattr(mlorc, "_extension", {})
    monkeypatch.setenv("MLORC_EXTENSION", "0")
    assert mlorc.load_extension() is False and not mlorc.extension_loaded()


REPO = Path(__file__).resolve().parent.parent


def test_setup_py_builds_the_extension_ahead_of_time(tmp_path):
    """MLORC_BUILD_EXT=1 pip install compiles csrc/ into a library beside mlorc.py, with OpenMP like
    the JIT build; mlorc then loads it and never runs the JIT build (whose cache directory stays
    empty)."""
    env = {**os.environ, "MLORC_BUILD_EXT": "1", "MAX_JOBS": "2"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                    "--target", str(tmp_path / "site"), str(REPO)], env=env, check=True)
    jit_cache = tmp_path / "jit"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "MLORC_EXTENSION": "1",
           "TORCH_EXTENSIONS_DIR": str(jit_cache)}
    script = ("import mlorc, torch\n"
              "assert mlorc.prebuilt_extension() is not None and mlorc.load_extension()\n"
              "p = torch.nn.Parameter(torch.randn(40, 30)); p.grad = torch.randn(40, 30)\n"
              "before = p.detach().clone(); mlorc.MLorc_Lion([p], rank=2, lr=0.1).step()\n"
              "torch.set_num_threads(2)\n"
              "print(mlorc.__file__, (p - before).abs().max().item(), torch.ops.mlorc.parallel_threads())\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0] == str(tmp_path / "site" / "mlorc.py")          # the installed copy, not the repo's
    assert abs(float(out[1]) - 0.1) < 1e-6                           # Lion moved every entry by lr
    assert int(out[2]) == (2 if mlorc.OPENMP_FLAGS else 1)
    assert not jit_cache.exists() or not any(jit_cache.iterdir())


def test_a_prebuilt_library_older_than_csrc_is_not_used(tmp_path):
    shutil.copy(REPO / "mlorc.py", tmp_path)
    shutil.copytree(REPO / "csrc", tmp_path / "csrc")
    library = tmp_path / "mlorc_ext.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"")
    spec = importlib.util.spec_from_file_location("mlorc_copy", tmp_path / "mlorc.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    newest = max(path.stat().st_mtime for path in (tmp_path / "csrc").iterdir())
    os.utime(library, (newest + 10, newest + 10))
    assert copy.prebuilt_extension() == str(library)
    os.utime(tmp_path / "csrc" / "mlorc_kernels.h", (newest + 20, newest + 20))  # a header edited
    assert copy.prebuilt_extension() is None                                     # after the build
    os.utime(library, (newest + 30, newest + 30))
    assert copy.prebuilt_extension() == str(library)
    os.utime(library, (newest - 10, newest - 10))                   # csrc/ edited after the build
    assert copy.prebuilt_extension() is None


def test_cuda_parameters_take_the_pure_path_until_the_kernels_are_verified(monkeypatch):
    """The CUDA kernels have not passed this file on a GPU for this release, and a kernel fault would
    poison the CUDA context before the self-check could fall back: unless MLORC_EXTENSION=1, CUDA
    parameters take the pure path quietly, without running the check (which would touch CUDA)."""
    def must_not_check(device):
        raise AssertionError("the self-check ran on CUDA")

    monkeypatch.setattr(mlorc, "_extension", {"loaded": True})
    monkeypatch.setattr(mlorc, "extension_problem", must_not_check)
    monkeypatch.setattr(mlorc, "CUDA_KERNELS_VERIFIED", False)
    monkeypatch.delenv("MLORC_EXTENSION", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mlorc.extension_ready(torch.device("cuda")) is False
    assert "cuda" not in mlorc._extension.get("ready", {})
    monkeypatch.setenv("MLORC_EXTENSION", "1")                  # asked for: checked, and used if it passes
    monkeypatch.setattr(mlorc, "extension_problem", lambda device: None)
    assert mlorc.extension_ready(torch.device("cuda")) is True


def test_mlorc_py_copied_alone_trains_without_a_warning(tmp_path):
    """The main way the module is used: copied into a project without csrc/. Every optimizer steps in
    pure PyTorch and nothing is reported (a csrc/ that fails to build is still reported, above)."""
    shutil.copy(REPO / "mlorc.py", tmp_path)
    script = ("import torch, mlorc\n"
              "for cls in (mlorc.MLorc_AdamW, mlorc.MLorc_Lion, mlorc.MLorc_Prodigy, mlorc.MLorc_DAdapt_Lion,\n"
              "            mlorc.MLorc_Adopt, mlorc.MLorc_CAME):\n"
              "    p = torch.nn.Parameter(torch.ones(6, 5))\n"
              "    opt = cls([p], rank=2)\n"
              "    for _ in range(2):\n"
              "        p.grad = torch.full((6, 5), 0.5)\n"
              "        opt.step()\n"
              "    assert not torch.equal(p, torch.ones(6, 5)), cls\n"
              "assert not mlorc.extension_loaded()\n")
    env = {k: v for k, v in os.environ.items() if k != "MLORC_EXTENSION"}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")
    result = subprocess.run([sys.executable, "-W", "error", "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
