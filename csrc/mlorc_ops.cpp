// mlorc C++ operators: schemas, argument checks and CPU kernels.
//
// Each operator fuses one stretch of the Python pipeline in mlorc.py into a single pass over the
// matrix, rebuilding the moments from their rank-r factors entry by entry instead of materializing
// them: m~_ij = sum_k U_ik s_k Vh_kj. The Python functions named in each comment are the reference
// the tests compare against; the Python path stays the default whenever the extension is missing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "mlorc_kernels.h"
#include "mlorc_ops.h"

namespace mlorc {

// The messages hold no numbers: on one CUDA build of torch (2.11, gcc 13), a TORCH_CHECK message
// that streams an integer crashed the process instead of raising.
void check_factors(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh, int64_t rows,
                   int64_t cols, const char* what) {
  TORCH_CHECK(U.dim() == 2 && s.dim() == 1 && Vh.dim() == 2, "mlorc: ", what,
              " factors must be U (m, r), s (r), Vh (r, n)");
  TORCH_CHECK(U.size(0) == rows && Vh.size(1) == cols && U.size(1) == s.size(0) &&
                  Vh.size(0) == s.size(0),
              "mlorc: ", what, " factors U (m, r), s (r), Vh (r, n) do not fit the (m, n) matrix");
  TORCH_CHECK(U.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat &&
                  Vh.scalar_type() == at::kFloat,
              "mlorc: ", what, " factors must be float32");
  TORCH_CHECK(U.is_contiguous() && s.is_contiguous() && Vh.is_contiguous(), "mlorc: ", what,
              " factors must be contiguous");
}

void check_dense(const at::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "mlorc: ", what,
              " must have the matrix's (m, n) shape");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "mlorc: ", what, " must be float32");
  TORCH_CHECK(t.is_contiguous(), "mlorc: ", what, " must be contiguous");
}


// ---------------------------------------------------------------------------------------------------
// The CPU kernels walk the matrix row by row. Each row of an old moment is rebuilt from its factors
// ([M1]: r multiply-adds an entry) one vector register at a time, into a small buffer or, in
// moment_matmul, straight into the product: no m x n tensor, no per-block allocation or BLAS call.
// All of them compute the same expressions, so they see the same numbers. Built by GCC for x86-64,
// the row loops (mlorc_cpu_rows.h) are compiled three times (AVX-512, AVX2 with FMA, baseline
// x86-64), each with vectors of its register width, and the best one this CPU runs is picked on
// first use, so one build (setup.py's ahead-of-time one included) stays portable across machines;
// other compilers and CPUs get one build for their baseline. The three builds pay for the whole
// step: MLorc_AdamW r=4's step with the extension took 163-175 ms held to the baseline build, 97-110
// ms to AVX2 and 75-111 ms with AVX-512, on LLaMA shapes (bench/step.py; BENCHMARKS.md, "Threads
// and instruction sets", at c6a6428), where pure PyTorch took 204-243 ms.

#if defined(__GNUC__) && !defined(__clang__)
// GCC warns that a 64-byte vector is passed differently without AVX-512: the row loops' helpers that
// take one are always inlined, so no such value crosses a call
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
// Rows of Vh (and of X^T) are padded to a multiple of 16 floats, the widest vector the row loops use
constexpr int64_t kLanes = 16;

inline int64_t round_up16(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Rows are handed out to threads in blocks of about 64K entries; the blocks are also the fixed
// order in which sums over rows are added, so results do not depend on the thread count.
int64_t block_rows(int64_t cols) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)); }

int64_t count_blocks(int64_t rows, int64_t cols) {
  const int64_t b = block_rows(cols);
  return (rows + b - 1) / b;
}

// Threads take part only from kParallelBlocks blocks on: waking them costs tens of microseconds
// (hundreds where OMP_WAIT_POLICY=PASSIVE puts idle ones to sleep), a small matrix's whole pass.
constexpr int64_t kParallelBlocks = 4;

// at::parallel_for over [0, count) for a matrix of `blocks` blocks: on this thread alone if small
template <typename Fn>
void parallel_for_matrix(int64_t count, int64_t blocks, const Fn& fn) {
  at::parallel_for(0, count, blocks >= kParallelBlocks ? 1 : std::max<int64_t>(count, 1), fn);
}

// fn(block, begin, end, scratch) for every block of rows, blocks in parallel; scratch holds
// scratch_floats floats per thread
template <typename Fn>
void for_row_blocks(int64_t rows, int64_t cols, int64_t scratch_floats, const Fn& fn) {
  const int64_t b = block_rows(cols), blocks = count_blocks(rows, cols);
  parallel_for_matrix(blocks, blocks, [&](int64_t first, int64_t last) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t k = first; k < last; ++k) fn(k, k * b, std::min(rows, (k + 1) * b), scratch.data());
  });
}

// A sum over all rows (A^T X, U^T g) is formed in a fixed number of row ranges of whole blocks, at
// most kSumRanges, each into its own partial, and add_ranges adds the partials in range order: which
// thread runs which range does not matter, so the result does not depend on the thread count.
constexpr int64_t kSumRanges = 8;

int64_t sum_ranges(int64_t rows, int64_t cols) { return std::min(count_blocks(rows, cols), kSumRanges); }

// fn(range, begin, end) for each of sum_ranges(rows, cols) row ranges, ranges in parallel
template <typename Fn>
void for_sum_ranges(int64_t rows, int64_t cols, const Fn& fn) {
  const int64_t b = block_rows(cols), blocks = count_blocks(rows, cols), parts = sum_ranges(rows, cols);
  parallel_for_matrix(parts, blocks, [&](int64_t first, int64_t last) {
    for (int64_t q = first; q < last; ++q)
      fn(q, q * blocks / parts * b, std::min(rows, (q + 1) * blocks / parts * b));
  });
}

// The partials of `parts` ranges, n floats each from `sums` on, added into the first in range order
// (along its entries: contiguous adds)
void add_ranges(float* sums, int64_t parts, int64_t n) {
  for (int64_t q = 1; q < parts; ++q)
    for (int64_t e = 0; e < n; ++e) sums[e] += sums[q * n + e];
}

// How many threads parallel_for_matrix runs a large matrix's blocks on. at::parallel_for is compiled
// into this library: built without OpenMP it runs every block on the calling thread, so the tests
// check this against torch.get_num_threads().
int64_t parallel_threads() {
  std::vector<char> ran(at::get_num_threads(), 0);      // one slot per thread: no two write the same
  parallel_for_matrix(64, 64, [&](int64_t, int64_t) { ran[at::get_thread_num()] = 1; });
  return std::count(ran.begin(), ran.end(), 1);
}

// The matrix M (any strides) in the top left corner of a contiguous (rows, cols) one, zeros around
// it. The matrices padded here are thin (factors and (r + p)-wide sketches) and often transposed
// views: M is read in the order of its memory (by columns when they are contiguous), the copy
// written where it falls.
at::Tensor padded_copy(const at::Tensor& M, int64_t rows, int64_t cols) {
  at::Tensor out = at::zeros({rows, cols}, M.options());
  const float* m = M.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t m_rows = M.size(0), m_cols = M.size(1), row_step = M.stride(0), col_step = M.stride(1);
  if (row_step == 1 && m_cols > 1) {
    for (int64_t j = 0; j < m_cols; ++j)
      for (int64_t i = 0; i < m_rows; ++i) o[i * cols + j] = m[j * col_step + i];
  } else {
    for (int64_t i = 0; i < m_rows; ++i)
      for (int64_t j = 0; j < m_cols; ++j) o[i * cols + j] = m[i * row_step + j * col_step];
  }
  return out;
}

// One factored moment, (U * s) @ Vh, as raw pointers. Vh is read from a copy padded with zero
// columns to `stride` (a multiple of 16, see padded), so every one-vector chunk of it is one whole
// load and no loop over a row needs a partial last chunk.
struct Factors {
  const float *U, *s, *vh;      // vh: Vh padded, (r, stride)
  int64_t r, stride;
  Factors(const at::Tensor& U_, const at::Tensor& s_, const at::Tensor& vh_)
      : U(U_.data_ptr<float>()), s(s_.data_ptr<float>()), vh(vh_.data_ptr<float>()), r(s_.size(0)),
        stride(vh_.size(1)) {}

  // U[i, :] * s: the row's weights of [M1]
  void weights(int64_t i, float* w) const {
    for (int64_t k = 0; k < r; ++k) w[k] = U[i * r + k] * s[k];
  }
};

// Vh (r, n) with zero columns added up to round_up16(n), for Factors: Vh itself where n is a multiple
// of 16 already (the factors come contiguous: check_factors), as for most layers' widths
at::Tensor padded(const at::Tensor& Vh) {
  if (Vh.size(1) % kLanes == 0 && Vh.is_contiguous()) return Vh;
  return padded_copy(Vh, Vh.size(0), round_up16(Vh.size(1)));
}

// The new moment A = beta * old + (1 - beta) * g (g * g when squared, old entries below 0 replaced by
// shift when repair), one vector of one row at a time, held in registers: no row buffer is written
// and read back. g is not padded: its last chunk in a row is loaded partly.
struct NewMoment {
  Factors old;
  const float* g;
  int64_t cols;
  float beta, shift;
  bool squared, repair;
};

// Accumulators are kept for 8 columns of X (or of the product) at a time; X is padded with zero
// columns to a multiple of 8, so the loops over them have a fixed length and stay in registers.
constexpr int64_t kWidthBlock = 8;

inline int64_t round_up8(int64_t n) { return (n + kWidthBlock - 1) / kWidthBlock * kWidthBlock; }

// moment_pair_matmul's loops hold 4 columns of each of its two products at a time (8 sums a row)
constexpr int64_t kPairBlock = 4;

// Whether moment_matmul splits A: a first moment (no square, no repair) is linear in its parts,
// A X = beta (U s)(Vh X) + (1 - beta) g X, so its row loops multiply g alone, and the factors' part
// comes from r x width products (Vh X, or (U s)^T X for A^T X): r multiply-adds an entry fewer.
// Measured for the whole step against rebuilding the first moment like the second (compare_builds):
// at rank 16 MLorc_Lion's step took 1.08x as long without the split (MLorc_AdamW's 1.02x); at rank 4
// it made no difference beyond the noise (AdamW 1.00x and 0.96x, Lion 0.95x; BENCHMARKS.md)
inline bool split(const NewMoment& A) { return !A.squared && !A.repair; }

// Whether moment_matmul's row loops rebuild the rows of A once into a buffer and read them back for
// every 8 columns of X, instead of rebuilding them in registers for each: where X is wider than 8
// and there is a rebuild to save (a split first moment has none)
inline bool buffered(const NewMoment& A, int64_t width) { return width > kWidthBlock && !split(A); }

// X^T as A X's loops read it, (round_up8(width), ld): zero rows past X's width, zero columns past
// its rows. X^T itself where it already is that (an orthonormal basis from torch.linalg.qr is
// column-major, so its transpose is contiguous), else a padded copy.
at::Tensor loop_layout(const at::Tensor& X, int64_t ld) {
  const at::Tensor Xt = X.t();
  if (X.size(1) % kWidthBlock == 0 && X.size(0) == ld && Xt.is_contiguous()) return Xt;
  return padded_copy(Xt, round_up8(X.size(1)), ld);
}

// X as A^T X's loops read it, (rows, round_up8(width)) row by row, zero columns past its width: X
// itself where it already is that, else a padded copy. (Reading X^T in place there, 8 strided
// values a row, was slower than this copy.)
at::Tensor padded_columns(const at::Tensor& X) {
  if (X.size(1) % kWidthBlock == 0 && X.is_contiguous()) return X;
  return padded_copy(X, X.size(0), round_up8(X.size(1)));
}

// A^T X goes over rows in blocks of 32, so a block of g (and of U) stays in cache across its chunks
constexpr int64_t kRowBlock = 32;

// The row loops, once per instruction set (see mlorc_cpu_rows.h), and the choice among them
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__)
#define MLORC_CPU_LEVELS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace v4 {
typedef float Vec __attribute__((vector_size(64)));      // one AVX-512 register
#include "mlorc_cpu_rows.h"
}  // namespace v4
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace v3 {
typedef float Vec __attribute__((vector_size(32)));      // one AVX2 register
#include "mlorc_cpu_rows.h"
}  // namespace v3
#pragma GCC pop_options
#endif
namespace baseline {
typedef float Vec __attribute__((vector_size(16)));      // one SSE (or NEON) register
#include "mlorc_cpu_rows.h"
}  // namespace baseline

#ifdef MLORC_CPU_LEVELS
// The row loops' instruction set: the best this CPU runs, or a lower one named by MLORC_CPU_LEVEL
// (0, 3 or 4, read on every call: the tests run all three builds on one machine)
int64_t cpu_level() {
  static const int64_t supported =
      __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 0;
  const char* wanted = std::getenv("MLORC_CPU_LEVEL");
  return wanted == nullptr ? supported : std::min<int64_t>(supported, std::atoi(wanted));
}
// The build of a row loop for cpu_level(). Each operator picks its loop once, before the blocks of
// rows go to the threads, so the environment is read once a call, not once a block.
template <class Fn>
Fn for_level(Fn v4_fn, Fn v3_fn, Fn baseline_fn) {
  const int64_t level = cpu_level();
  return level == 4 ? v4_fn : level == 3 ? v3_fn : baseline_fn;
}
#define MLORC_ROWS(fn) for_level(v4::fn, v3::fn, baseline::fn)
#else
int64_t cpu_level() { return 0; }
#define MLORC_ROWS(fn) baseline::fn
#endif

// ---------------------------------------------------------------------------------------------------
// negative_mean: [M2]'s c for a factored second moment. Python twin: mlorc.negative_mean applied to
// mlorc.reconstruct(U, s, Vh).

at::Tensor negative_mean_cpu(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh) {
  const int64_t rows = U.size(0), cols = Vh.size(1);
  check_factors(U, s, Vh, rows, cols, "negative_mean");
  const at::Tensor vh = padded(Vh);
  const Factors v(U, s, vh);
  // per-block partial sums, reduced in block order: independent of the thread count
  std::vector<double> block_sum(count_blocks(rows, cols), 0.0), block_count(block_sum.size(), 0.0);
  const auto negative = MLORC_ROWS(negative_rows);
  for_row_blocks(rows, cols, v.r, [&](int64_t k, int64_t begin, int64_t end, float* w) {
    negative(v, begin, end, w, &block_sum[k], &block_count[k]);
  });
  double sum = 0.0, count = 0.0;
  for (size_t k = 0; k < block_sum.size(); ++k) {
    sum += block_sum[k];
    count += block_count[k];
  }
  return at::scalar_tensor(count > 0 ? sum / count : 0.0, U.options());
}

// ---------------------------------------------------------------------------------------------------
// adamw_step_ / adamw_update_: [M1]-[M3], [M5]-[M7] of MLorc_AdamW for one fp32 matrix in one pass.
// adamw_step_ also writes the new dense moments (for [M4]); adamw_update_ does not (mlorc.py then
// compresses them through moment_matmul). Python twin: MLorc_AdamW._direction, then apply_update_.

void check_kept(const c10::optional<at::Tensor>& kept_U, const c10::optional<at::Tensor>& kept_Vh,
                int64_t rows, int64_t cols) {
  TORCH_CHECK(kept_U.has_value() == kept_Vh.has_value(), "mlorc: give both kept_U and kept_Vh, or neither");
  if (kept_U.has_value()) {
    const at::Tensor ones = at::ones({kept_U->size(-1)}, kept_U->options());
    check_factors(*kept_U, ones, *kept_Vh, rows, cols, "kept");
  }
}

void check_adamw_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU,
                      const at::Tensor& ms, const at::Tensor& mVh, const at::Tensor& vU,
                      const at::Tensor& vs, const at::Tensor& vVh, const at::Tensor& shift,
                      const c10::optional<at::Tensor>& kept_U, const c10::optional<at::Tensor>& kept_Vh) {
  const int64_t rows = param.size(0), cols = param.size(1);
  check_dense(param, rows, cols, "param");
  check_dense(grad, rows, cols, "grad");
  check_factors(mU, ms, mVh, rows, cols, "exp_avg");
  check_factors(vU, vs, vVh, rows, cols, "exp_avg_sq");
  TORCH_CHECK(shift.numel() == 1 && shift.scalar_type() == at::kFloat, "mlorc: shift must be one float32");
  check_kept(kept_U, kept_Vh, rows, cols);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_factors(const at::Tensor& param,
                                                            const c10::optional<at::Tensor>& kept_U,
                                                            const c10::optional<at::Tensor>& kept_Vh) {
  if (kept_U.has_value())
    return {*kept_U, at::ones({kept_U->size(1)}, kept_U->options()), *kept_Vh};
  return {at::zeros({param.size(0), 0}, param.options()), at::zeros({0}, param.options()),
          at::zeros({0, param.size(1)}, param.options())};
}

void adamw_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU, const at::Tensor& ms,
               const at::Tensor& mVh, const at::Tensor& vU, const at::Tensor& vs, const at::Tensor& vVh,
               const at::Tensor& shift, float* m_out, float* v_out, double beta1, double beta2,
               double lr, double weight_decay, double eps, double bc1, double bc2, double bound,
               const c10::optional<at::Tensor>& kept_U, const c10::optional<at::Tensor>& kept_Vh,
               double outside) {
  check_adamw_args(param, grad, mU, ms, mVh, vU, vs, vVh, shift, kept_U, kept_Vh);
  const int64_t rows = param.size(0), cols = param.size(1);
  const auto [kU, ks, kVh] = kept_factors(param, kept_U, kept_Vh);
  const AdamWArgs args = make_adamw_args(beta1, beta2, lr, weight_decay, eps, bc1, bc2, bound,
                                         shift.item<float>(), outside, ms.size(0), vs.size(0),
                                         ks.size(0));
  const at::Tensor mvh = padded(mVh), vvh = padded(vVh), kvh = padded(kVh);
  const Factors m_old(mU, ms, mvh), v_old(vU, vs, vvh), kept(kU, ks, kvh);
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const int64_t stride = mvh.size(1);
  const auto adamw = MLORC_ROWS(adamw_rows);
  for_row_blocks(rows, cols, 3 * stride + m_old.r + v_old.r + kept.r,
                 [&](int64_t, int64_t begin, int64_t end, float* scratch) {
    adamw(args, m_old, v_old, kept, begin, end, cols, p, g, m_out, v_out, scratch, scratch + stride,
          scratch + 2 * stride, scratch + 3 * stride);
  });
}

// ---------------------------------------------------------------------------------------------------
// lion_step_ / lion_update_: [M1], [M3], [M6], [M7] of MLorc_Lion for one fp32 matrix in one pass,
// with or without writing the new dense momentum. Python twin: MLorc_Lion._direction, apply_update_.

void check_lion_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& U,
                     const at::Tensor& s, const at::Tensor& Vh, const c10::optional<at::Tensor>& kept_U,
                     const c10::optional<at::Tensor>& kept_Vh) {
  const int64_t rows = param.size(0), cols = param.size(1);
  check_dense(param, rows, cols, "param");
  check_dense(grad, rows, cols, "grad");
  check_factors(U, s, Vh, rows, cols, "exp_avg");
  check_kept(kept_U, kept_Vh, rows, cols);
}

void lion_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& U, const at::Tensor& s,
              const at::Tensor& Vh, float* m_out, double beta1, double beta2, double lr,
              double weight_decay, const c10::optional<at::Tensor>& kept_U,
              const c10::optional<at::Tensor>& kept_Vh, double outside) {
  check_lion_args(param, grad, U, s, Vh, kept_U, kept_Vh);
  const int64_t rows = param.size(0), cols = param.size(1);
  const auto [kU, ks, kVh] = kept_factors(param, kept_U, kept_Vh);
  const LionArgs args = make_lion_args(beta1, beta2, lr, weight_decay, outside, s.size(0), ks.size(0));
  const at::Tensor vh = padded(Vh), kvh = padded(kVh);
  const Factors m_old(U, s, vh), kept(kU, ks, kvh);
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const int64_t stride = vh.size(1);
  const auto lion = MLORC_ROWS(lion_rows);
  for_row_blocks(rows, cols, 2 * stride + m_old.r + kept.r,
                 [&](int64_t, int64_t begin, int64_t end, float* row) {
    lion(args, m_old, kept, begin, end, cols, p, g, m_out, row, row + stride, row + 2 * stride);
  });
}

// ---------------------------------------------------------------------------------------------------
// moment_matmul: A @ X, or A^T @ X when transposed, for the new moment A = beta * rebuild(U, s, Vh) +
// (1 - beta) * grad (grad * grad when squared; rebuilt entries below 0 become shift first when a
// shift is given), without writing A out. Python twin: a dense moment of the stack that
// mlorc.FusedMoments stands for.

void check_moment_matmul_args(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh,
                              const at::Tensor& grad, const c10::optional<at::Tensor>& shift,
                              const at::Tensor& X, bool transposed) {
  const int64_t rows = U.size(0), cols = Vh.size(1);
  check_factors(U, s, Vh, rows, cols, "moment_matmul");
  check_dense(grad, rows, cols, "grad");
  TORCH_CHECK(X.dim() == 2 && X.size(0) == (transposed ? rows : cols) && X.scalar_type() == at::kFloat,
              "mlorc: moment_matmul's X must be float32 with as many rows as the product needs");
  TORCH_CHECK(!shift.has_value() || (shift->numel() == 1 && shift->scalar_type() == at::kFloat),
              "mlorc: moment_matmul's shift must be one float32");
}

// A_k^T X_k, (cols, width) each, from the partials of sum_ranges' `parts` row ranges: for each
// moment in turn, parts partials of (round_up8(width), stride) floats in `partial`, and, of a split
// first moment, its ranges' (U s)^T X in usx ((r, round_up8(width)) a range). The partials are added
// in range order, the factors' part is added, and each sum is transposed.
std::vector<at::Tensor> transposed_products(const std::vector<NewMoment>& A, float* partial,
                                            int64_t parts, float* usx, const std::vector<at::Tensor>& X) {
  const int64_t cols = A[0].cols, stride = A[0].old.stride, width = X[0].size(1);
  const int64_t padded_width = round_up8(width), size = padded_width * stride;
  for (size_t k = 0; k < A.size(); ++k) add_ranges(partial + k * parts * size, parts, size);
  if (split(A[0])) {
    add_ranges(usx, parts, A[0].old.r * padded_width);
    MLORC_ROWS(add_transposed_factors_part)(A[0], partial, width, usx);
  }
  std::vector<at::Tensor> out;
  for (size_t k = 0; k < A.size(); ++k) {
    const float* sums = partial + k * parts * size;
    out.push_back(at::empty({cols, width}, X[k].options()));
    float* o = out.back().data_ptr<float>();
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t c = 0; c < width; ++c) o[j * width + c] = sums[c * stride + j];
  }
  return out;
}

// A_k @ X_k, or A_k^T @ X_k when transposed, through the row loops, for one new moment or for
// MLorc_AdamW's pair (a split first moment, then a second moment) in one pass over their shared g
std::vector<at::Tensor> new_moments_matmul(const std::vector<NewMoment>& A, int64_t rows,
                                           const std::vector<at::Tensor>& X, bool transposed) {
  const NewMoment& first = A[0];
  const bool pair = A.size() == 2;
  const int64_t cols = first.cols, r = first.old.r, width = X[0].size(1), stride = first.old.stride;
  const int64_t r_all = pair ? r + A[1].old.r : r;
  const int64_t padded_width = round_up8(width);      // X's columns, padded to the 8 summed at once
  std::vector<at::Tensor> out;
  if (!transposed) {
    std::vector<at::Tensor> Xt;
    for (const at::Tensor& X_k : X) {
      Xt.push_back(loop_layout(X_k, stride));
      out.push_back(at::empty({rows, width}, X_k.options()));
    }
    const float *xt = Xt[0].data_ptr<float>(), *xt_v = Xt.back().data_ptr<float>();
    std::vector<float> vhx(r * padded_width);                  // Vh X, for a split first moment
    if (split(first)) MLORC_ROWS(row_dots)(first.old.vh, r, xt, padded_width, stride, vhx.data());
    float *o = out[0].data_ptr<float>(), *o_v = out.back().data_ptr<float>();
    if (pair) {
      const auto product = MLORC_ROWS(pair_product_rows);
      const int64_t row_buffer = width > kPairBlock ? 2 * stride : 0;
      for_row_blocks(rows, cols, 2 * r_all + row_buffer, [&](int64_t, int64_t begin, int64_t end, float* w) {
        product(first, A[1], xt, xt_v, vhx.data(), width, begin, end, o, o_v, w, w + 2 * r_all);
      });
    } else {
      const auto product = MLORC_ROWS(product_rows);
      const int64_t row_buffer = buffered(first, width) ? 2 * stride : 0;
      for_row_blocks(rows, cols, 2 * r + row_buffer, [&](int64_t, int64_t begin, int64_t end, float* w) {
        product(first, xt, vhx.data(), width, begin, end, o, w, w + 2 * r);
      });
    }
    return out;
  }
  // A^T X sums over all rows: in sum_ranges' row ranges, each into its own partial product
  const int64_t parts = sum_ranges(rows, cols);
  if (parts == 0) {                                                     // no rows: A^T X is 0
    for (const at::Tensor& X_k : X) out.push_back(at::zeros({cols, width}, X_k.options()));
    return out;
  }
  std::vector<at::Tensor> Xp;
  for (const at::Tensor& X_k : X) Xp.push_back(padded_columns(X_k));
  const float *x = Xp[0].data_ptr<float>(), *x_v = Xp.back().data_ptr<float>();
  // each range holds at least one block, whose rows write its partial first (so it needs no
  // zeros), one partial per moment
  const int64_t size = padded_width * stride;
  const std::unique_ptr<float[]> partial(new float[A.size() * parts * size]);
  float *total = partial.get(), *total_v = partial.get() + (A.size() - 1) * parts * size;
  // and, of a split first moment, its (U s)^T X: (r, padded_width) a range, summed from zero
  std::vector<float> usx(parts * r * padded_width, 0.f);
  const auto accumulate = MLORC_ROWS(accumulate_rows);
  const auto accumulate_pair = MLORC_ROWS(pair_accumulate_rows);
  for_sum_ranges(rows, cols, [&](int64_t q, int64_t begin, int64_t end) {
    std::vector<float> w(kRowBlock * r_all);
    if (pair)
      accumulate_pair(first, A[1], x, x_v, width, begin, end, total + q * size, total_v + q * size,
                      usx.data() + q * r * padded_width, w.data());
    else
      accumulate(first, x, width, begin, end, total + q * size, usx.data() + q * r * padded_width, w.data());
  });
  return transposed_products(A, partial.get(), parts, usx.data(), X);
}

at::Tensor moment_matmul_cpu(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh,
                             const at::Tensor& grad, double beta, bool squared,
                             const c10::optional<at::Tensor>& shift, const at::Tensor& X,
                             bool transposed) {
  check_moment_matmul_args(U, s, Vh, grad, shift, X, transposed);
  const int64_t rows = U.size(0), cols = Vh.size(1);
  const bool repair = shift.has_value();
  const at::Tensor vh = padded(Vh);
  const NewMoment A{Factors(U, s, vh), grad.data_ptr<float>(), cols, float(beta),
                    repair ? shift->item<float>() : 0.f, squared, repair};
  return new_moments_matmul({A}, rows, {X}, transposed)[0];
}

// ---------------------------------------------------------------------------------------------------
// moment_pair_matmul: (M @ X_m, V @ X_v), or their transposes' products, for MLorc_AdamW's two new
// moments M = beta1 m~ + (1 - beta1) grad and V = beta2 v~ + (1 - beta2) grad^2 (v~'s entries below 0
// replaced by shift when one is given), in one pass over grad instead of one each. Python twin: two
// moment_matmul calls, as on every other device (moment_pair_matmul_apart).

void check_moment_pair_args(const at::Tensor& mU, const at::Tensor& ms, const at::Tensor& mVh,
                            const at::Tensor& vU, const at::Tensor& vs, const at::Tensor& vVh,
                            const at::Tensor& grad, const c10::optional<at::Tensor>& shift,
                            const at::Tensor& X_m, const at::Tensor& X_v, bool transposed) {
  check_moment_matmul_args(mU, ms, mVh, grad, shift, X_m, transposed);
  check_moment_matmul_args(vU, vs, vVh, grad, shift, X_v, transposed);
  TORCH_CHECK(X_m.size(1) == X_v.size(1), "mlorc: moment_pair_matmul's X_m and X_v must be as wide");
}

std::tuple<at::Tensor, at::Tensor> moment_pair_matmul_cpu(
    const at::Tensor& mU, const at::Tensor& ms, const at::Tensor& mVh, const at::Tensor& vU,
    const at::Tensor& vs, const at::Tensor& vVh, const at::Tensor& grad, double beta1, double beta2,
    const c10::optional<at::Tensor>& shift, const at::Tensor& X_m, const at::Tensor& X_v, bool transposed) {
  check_moment_pair_args(mU, ms, mVh, vU, vs, vVh, grad, shift, X_m, X_v, transposed);
  const int64_t rows = mU.size(0), cols = mVh.size(1);
  const bool repair = shift.has_value();
  const at::Tensor mvh = padded(mVh), vvh = padded(vVh);
  const float* g = grad.data_ptr<float>();
  const NewMoment M{Factors(mU, ms, mvh), g, cols, float(beta1), 0.f, false, false};
  const NewMoment V{Factors(vU, vs, vvh), g, cols, float(beta2), repair ? shift->item<float>() : 0.f,
                    true, repair};
  const std::vector<at::Tensor> out = new_moments_matmul({M, V}, rows, {X_m, X_v}, transposed);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> moment_pair_matmul_apart(
    const at::Tensor& mU, const at::Tensor& ms, const at::Tensor& mVh, const at::Tensor& vU,
    const at::Tensor& vs, const at::Tensor& vVh, const at::Tensor& grad, double beta1, double beta2,
    const c10::optional<at::Tensor>& shift, const at::Tensor& X_m, const at::Tensor& X_v, bool transposed) {
  check_moment_pair_args(mU, ms, mVh, vU, vs, vVh, grad, shift, X_m, X_v, transposed);
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mlorc::moment_matmul", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                        bool, const c10::optional<at::Tensor>&, const at::Tensor&, bool)>();
  return {op.call(mU, ms, mVh, grad, beta1, false, c10::nullopt, X_m, transposed),
          op.call(vU, vs, vVh, grad, beta2, true, shift, X_v, transposed)};
}

// ---------------------------------------------------------------------------------------------------
// adamw_update_products_: adamw_update_'s pass, which also returns [M4]'s last products of the new
// moments, (M^T X_m, V^T X_v) as moment_pair_matmul gives them when transposed, formed from the
// entries the pass computes: no pass of their own over grad, and v~ rebuilt once instead of twice.
// Python twin: adamw_update_, then moment_pair_matmul (other devices take these two calls).

void check_update_products_args(const at::Tensor& param, const at::Tensor& X_m, const at::Tensor& X_v) {
  TORCH_CHECK(X_m.dim() == 2 && X_v.dim() == 2 && X_m.size(0) == param.size(0) &&
                  X_v.size(0) == param.size(0) && X_m.size(1) == X_v.size(1) &&
                  X_m.scalar_type() == at::kFloat && X_v.scalar_type() == at::kFloat,
              "mlorc: adamw_update_products_'s X_m and X_v must be float32, as wide, with the matrix's rows");
}

std::tuple<at::Tensor, at::Tensor> adamw_update_products_cpu(
    at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU, const at::Tensor& ms,
    const at::Tensor& mVh, const at::Tensor& vU, const at::Tensor& vs, const at::Tensor& vVh,
    const at::Tensor& shift, const at::Tensor& X_m, const at::Tensor& X_v, double beta1, double beta2,
    double lr, double weight_decay, double eps, double bc1, double bc2, double bound,
    const c10::optional<at::Tensor>& kept_U, const c10::optional<at::Tensor>& kept_Vh, double outside) {
  check_adamw_args(param, grad, mU, ms, mVh, vU, vs, vVh, shift, kept_U, kept_Vh);
  check_update_products_args(param, X_m, X_v);
  const int64_t rows = param.size(0), cols = param.size(1), width = X_m.size(1);
  const auto [kU, ks, kVh] = kept_factors(param, kept_U, kept_Vh);
  const AdamWArgs args = make_adamw_args(beta1, beta2, lr, weight_decay, eps, bc1, bc2, bound,
                                         shift.item<float>(), outside, ms.size(0), vs.size(0),
                                         ks.size(0));
  const at::Tensor mvh = padded(mVh), vvh = padded(vVh), kvh = padded(kVh);
  const Factors m_old(mU, ms, mvh), v_old(vU, vs, vvh), kept(kU, ks, kvh);
  const int64_t parts = sum_ranges(rows, cols);
  if (parts == 0)                                     // no rows: nothing moves, the products are 0
    return {at::zeros({cols, width}, X_m.options()), at::zeros({cols, width}, X_v.options())};
  const float* g = grad.data_ptr<float>();
  const NewMoment M{m_old, g, cols, float(beta1), 0.f, false, false};
  const NewMoment V{v_old, g, cols, float(beta2), args.shift, true, true};
  const at::Tensor xm = padded_columns(X_m), xv = padded_columns(X_v);
  const int64_t stride = mvh.size(1), padded_width = round_up8(width), size = padded_width * stride;
  const int64_t r_all = m_old.r + v_old.r + kept.r;
  // one partial per range and moment (the range's first block writes it), and M's (U s)^T X_m a
  // range, summed from zero
  const std::unique_ptr<float[]> partial(new float[2 * parts * size]);
  std::vector<float> usx(parts * m_old.r * padded_width, 0.f);
  float* p = param.data_ptr<float>();
  const auto accumulate = MLORC_ROWS(adamw_accumulate_rows);
  for_sum_ranges(rows, cols, [&](int64_t q, int64_t begin, int64_t end) {
    std::vector<float> scratch((3 + kRowBlock) * stride + r_all);   // zeros: v_rows' padding stays 0
    float* rows_at = scratch.data();
    accumulate(args, m_old, v_old, kept, begin, end, cols, p, g, xm.data_ptr<float>(),
               xv.data_ptr<float>(), width, partial.get() + q * size,
               partial.get() + (parts + q) * size, usx.data() + q * m_old.r * padded_width, rows_at,
               rows_at + stride, rows_at + 2 * stride, rows_at + 3 * stride,
               rows_at + (3 + kRowBlock) * stride);
  });
  const std::vector<at::Tensor> out = transposed_products({M, V}, partial.get(), parts, usx.data(), {X_m, X_v});
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> adamw_update_products_apart(
    at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU, const at::Tensor& ms,
    const at::Tensor& mVh, const at::Tensor& vU, const at::Tensor& vs, const at::Tensor& vVh,
    const at::Tensor& shift, const at::Tensor& X_m, const at::Tensor& X_v, double beta1, double beta2,
    double lr, double weight_decay, double eps, double bc1, double bc2, double bound,
    const c10::optional<at::Tensor>& kept_U, const c10::optional<at::Tensor>& kept_Vh, double outside) {
  check_update_products_args(param, X_m, X_v);
  static const auto update = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mlorc::adamw_update_", "")
      .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                  double, double, double, double, double, double, const c10::optional<at::Tensor>&,
                  const c10::optional<at::Tensor>&, double)>();
  static const auto products = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mlorc::moment_pair_matmul", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, double, double,
                                                const c10::optional<at::Tensor>&, const at::Tensor&,
                                                const at::Tensor&, bool)>();
  update.call(param, grad, mU, ms, mVh, vU, vs, vVh, shift, beta1, beta2, lr, weight_decay, eps, bc1, bc2,
              bound, kept_U, kept_Vh, outside);
  return products.call(mU, ms, mVh, vU, vs, vVh, grad, beta1, beta2, shift, X_m, X_v, true);
}

// ---------------------------------------------------------------------------------------------------
// kept_part: the part of grad inside the column or the row space of m's factors (full_weight_outside),
// as factors (L, R) with that part = L @ R: L = [U, g Vh^T - U (U^T g Vh^T)] (m, 2r), R = [U^T g; Vh]
// (2r, n). The two thin products with g come from one pass over it; the rest is r x r work and
// copies, written here rather than as a handful of small torch calls per matrix. Python twin:
// mlorc.kept_part. Other devices take kept_part_matmul.

void check_kept_part_args(const at::Tensor& grad, const at::Tensor& U, const at::Tensor& Vh) {
  TORCH_CHECK(grad.dim() == 2, "mlorc: kept_part's grad must be a matrix");
  check_kept(U, Vh, grad.size(0), grad.size(1));
  check_dense(grad, grad.size(0), grad.size(1), "grad");
}

std::tuple<at::Tensor, at::Tensor> kept_part_cpu(const at::Tensor& grad, const at::Tensor& U,
                                                 const at::Tensor& Vh) {
  check_kept_part_args(grad, U, Vh);
  const int64_t rows = grad.size(0), cols = grad.size(1), r = U.size(1);
  const int64_t r8 = round_up8(r);
  const at::Tensor vh = padded_copy(Vh, r8, round_up16(cols));
  const int64_t stride = vh.size(1), size = r8 * stride;
  // g Vh^T, row by row, and U^T g, summed over all rows in sum_ranges' row ranges, each into its
  // own partial (zeros first: the loop adds into it; one of zeros where there are no rows)
  std::vector<float> gv(rows * r);
  const int64_t parts = sum_ranges(rows, cols);
  std::vector<float> partial(std::max<int64_t>(parts, 1) * size, 0.f);
  const float *u = U.data_ptr<float>(), *vh_in = Vh.data_ptr<float>();
  const auto kept = MLORC_ROWS(kept_rows);
  for_sum_ranges(rows, cols, [&](int64_t q, int64_t begin, int64_t end) {
    kept(u, vh.data_ptr<float>(), r, stride, grad.data_ptr<float>(), cols, begin, end, gv.data(),
         partial.data() + q * size);
  });
  add_ranges(partial.data(), parts, size);
  at::Tensor L = at::empty({rows, 2 * r}, grad.options()), R = at::empty({2 * r, cols}, grad.options());
  float *l = L.data_ptr<float>(), *rr = R.data_ptr<float>();
  for (int64_t k = 0; k < r; ++k)                       // R = [U^T g; Vh]
    for (int64_t j = 0; j < cols; ++j) {
      rr[k * cols + j] = partial[k * stride + j];
      rr[(r + k) * cols + j] = vh_in[k * cols + j];
    }
  std::vector<float> utgv(r * r, 0.f);                  // U^T g Vh^T (r, r)
  for (int64_t k = 0; k < r; ++k)
    for (int64_t c = 0; c < r; ++c)
      for (int64_t j = 0; j < cols; ++j) utgv[k * r + c] += rr[k * cols + j] * vh_in[c * cols + j];
  for (int64_t i = 0; i < rows; ++i)                    // L = [U, g Vh^T - U (U^T g Vh^T)]
    for (int64_t c = 0; c < r; ++c) {
      float projected = 0.f;
      for (int64_t k = 0; k < r; ++k) projected += u[i * r + k] * utgv[k * r + c];
      l[i * 2 * r + c] = u[i * r + c];
      l[i * 2 * r + r + c] = gv[i * r + c] - projected;
    }
  return {L, R};
}

std::tuple<at::Tensor, at::Tensor> kept_part_matmul(const at::Tensor& grad, const at::Tensor& U,
                                                    const at::Tensor& Vh) {
  check_kept_part_args(grad, U, Vh);
  const at::Tensor UtG = at::mm(U.t(), grad);
  const at::Tensor GV_kept = at::mm(grad, Vh.t()) - at::mm(U, at::mm(UtG, Vh.t()));
  return {at::cat({U, GV_kept}, 1), at::cat({UtG, Vh}, 0)};
}

TORCH_LIBRARY(mlorc, m) {
  m.def("parallel_threads() -> int", &parallel_threads);
  m.def("cpu_level() -> int", &cpu_level);
  m.def("negative_mean(Tensor U, Tensor s, Tensor Vh) -> Tensor");
  m.def(
      "adamw_step_(Tensor(a!) param, Tensor grad, Tensor mU, Tensor ms, Tensor mVh, Tensor vU, "
      "Tensor vs, Tensor vVh, Tensor shift, Tensor(b!) m_out, Tensor(c!) v_out, float beta1, "
      "float beta2, float lr, float weight_decay, float eps, float bc1, float bc2, float bound, "
      "Tensor? kept_U=None, Tensor? kept_Vh=None, float outside=0.0) -> ()");
  m.def(
      "lion_step_(Tensor(a!) param, Tensor grad, Tensor U, Tensor s, Tensor Vh, "
      "Tensor(b!) m_out, float beta1, float beta2, float lr, float weight_decay, "
      "Tensor? kept_U=None, Tensor? kept_Vh=None, float outside=0.0) -> ()");
  m.def(
      "adamw_update_(Tensor(a!) param, Tensor grad, Tensor mU, Tensor ms, Tensor mVh, Tensor vU, "
      "Tensor vs, Tensor vVh, Tensor shift, float beta1, float beta2, float lr, float weight_decay, "
      "float eps, float bc1, float bc2, float bound, Tensor? kept_U=None, Tensor? kept_Vh=None, "
      "float outside=0.0) -> ()");
  m.def(
      "lion_update_(Tensor(a!) param, Tensor grad, Tensor U, Tensor s, Tensor Vh, float beta1, "
      "float beta2, float lr, float weight_decay, Tensor? kept_U=None, Tensor? kept_Vh=None, "
      "float outside=0.0) -> ()");
  m.def(
      "moment_matmul(Tensor U, Tensor s, Tensor Vh, Tensor grad, float beta, bool squared, "
      "Tensor? shift, Tensor X, bool transposed) -> Tensor");
  m.def(
      "moment_pair_matmul(Tensor mU, Tensor ms, Tensor mVh, Tensor vU, Tensor vs, Tensor vVh, "
      "Tensor grad, float beta1, float beta2, Tensor? shift, Tensor X_m, Tensor X_v, "
      "bool transposed) -> (Tensor, Tensor)");
  m.def("kept_part(Tensor grad, Tensor U, Tensor Vh) -> (Tensor, Tensor)");
  m.def(
      "adamw_update_products_(Tensor(a!) param, Tensor grad, Tensor mU, Tensor ms, Tensor mVh, "
      "Tensor vU, Tensor vs, Tensor vVh, Tensor shift, Tensor X_m, Tensor X_v, float beta1, "
      "float beta2, float lr, float weight_decay, float eps, float bc1, float bc2, float bound, "
      "Tensor? kept_U=None, Tensor? kept_Vh=None, float outside=0.0) -> (Tensor, Tensor)");
}

// Meta kernels: shapes only, so FakeTensor tracing (torch.compile, opcheck) works.
at::Tensor negative_mean_meta(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh) {
  check_factors(U, s, Vh, U.size(0), Vh.size(1), "negative_mean");
  return at::empty({}, U.options());
}

void adamw_step_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, at::Tensor&, at::Tensor&, double, double, double, double,
                     double, double, double, double, const c10::optional<at::Tensor>&,
                     const c10::optional<at::Tensor>&, double) {}

void lion_step_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, at::Tensor&, double, double, double, double,
                    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double) {}

void adamw_update_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, double, double, double, double, double, double, double,
                       double, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                       double) {}

void lion_update_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, double, double, double, double,
                      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double) {}

at::Tensor moment_matmul_meta(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh,
                              const at::Tensor& grad, double, bool,
                              const c10::optional<at::Tensor>& shift, const at::Tensor& X,
                              bool transposed) {
  check_moment_matmul_args(U, s, Vh, grad, shift, X, transposed);
  return at::empty({transposed ? Vh.size(1) : U.size(0), X.size(1)}, X.options());
}

TORCH_LIBRARY_IMPL(mlorc, Meta, m) {
  m.impl("negative_mean", &negative_mean_meta);
  m.impl("adamw_step_", &adamw_step_meta);
  m.impl("lion_step_", &lion_step_meta);
  m.impl("adamw_update_", &adamw_update_meta);
  m.impl("lion_update_", &lion_update_meta);
  m.impl("moment_matmul", &moment_matmul_meta);
}

TORCH_LIBRARY_IMPL(mlorc, CPU, m) {
  m.impl("negative_mean", &negative_mean_cpu);
  m.impl("adamw_step_", &adamw_step<adamw_cpu>);
  m.impl("lion_step_", &lion_step<lion_cpu>);
  m.impl("adamw_update_", &adamw_update<adamw_cpu>);
  m.impl("lion_update_", &lion_update<lion_cpu>);
  m.impl("moment_matmul", &moment_matmul_cpu);
  m.impl("moment_pair_matmul", &moment_pair_matmul_cpu);
  m.impl("kept_part", &kept_part_cpu);
  m.impl("adamw_update_products_", &adamw_update_products_cpu);
}

// Every other device (CUDA, and Meta for shapes): matmuls for kept_part, two moment_matmul calls for
// moment_pair_matmul, adamw_update_ and moment_pair_matmul for adamw_update_products_
TORCH_LIBRARY_IMPL(mlorc, CompositeExplicitAutograd, m) {
  m.impl("moment_pair_matmul", &moment_pair_matmul_apart);
  m.impl("kept_part", &kept_part_matmul);
  m.impl("adamw_update_products_", &adamw_update_products_apart);
}

}  // namespace mlorc
