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
#include <vector>

#include "mlorc_kernels.h"

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
// The CPU kernels walk the matrix in blocks of rows small enough to stay in cache: a block's old
// moments are rebuilt with one small BLAS matmul, (U[rows] * s) @ Vh, then used entry by entry. Every
// kernel uses the same blocks and the same rebuild, so all of them see the same numbers.

// 64K floats (256 KiB) a block: fits in L2, and few enough blocks that per-block call overhead is small
int64_t block_rows(int64_t cols) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)); }

int64_t count_blocks(int64_t rows, int64_t cols) {
  const int64_t b = block_rows(cols);
  return (rows + b - 1) / b;
}

// [M1] rows [begin, end) of (U * s) @ Vh, as a fresh (end - begin, n) tensor
at::Tensor rebuild_rows(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh, int64_t begin,
                        int64_t end) {
  return at::mm(U.narrow(0, begin, end - begin) * s, Vh);
}

// fn(block, begin, end) for every block of rows, blocks in parallel
template <typename Fn>
void for_row_blocks(int64_t rows, int64_t cols, const Fn& fn) {
  const int64_t b = block_rows(cols);
  at::parallel_for(0, count_blocks(rows, cols), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) fn(k, k * b, std::min(rows, (k + 1) * b));
  });
}

// ---------------------------------------------------------------------------------------------------
// negative_mean: [M2]'s c for a factored second moment. Python twin: mlorc.negative_mean applied to
// mlorc.reconstruct(U, s, Vh).

at::Tensor negative_mean_cpu(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh) {
  const int64_t rows = U.size(0), cols = Vh.size(1);
  check_factors(U, s, Vh, rows, cols, "negative_mean");
  // per-block partial sums in double, reduced in block order: independent of the thread count
  std::vector<double> block_sum(count_blocks(rows, cols), 0.0), block_count(block_sum.size(), 0.0);
  for_row_blocks(rows, cols, [&](int64_t k, int64_t begin, int64_t end) {
    const at::Tensor v = rebuild_rows(U, s, Vh, begin, end);
    block_sum[k] = -v.clamp_max(0).sum(at::kDouble).item<double>();   // ATen's vectorized reductions
    block_count[k] = double((v < 0).sum().item<int64_t>());
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

void check_adamw_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU,
                      const at::Tensor& ms, const at::Tensor& mVh, const at::Tensor& vU,
                      const at::Tensor& vs, const at::Tensor& vVh, const at::Tensor& shift) {
  const int64_t rows = param.size(0), cols = param.size(1);
  check_dense(param, rows, cols, "param");
  check_dense(grad, rows, cols, "grad");
  check_factors(mU, ms, mVh, rows, cols, "exp_avg");
  check_factors(vU, vs, vVh, rows, cols, "exp_avg_sq");
  TORCH_CHECK(shift.numel() == 1 && shift.scalar_type() == at::kFloat, "mlorc: shift must be one float32");
}

void adamw_rows(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU, const at::Tensor& ms,
                const at::Tensor& mVh, const at::Tensor& vU, const at::Tensor& vs, const at::Tensor& vVh,
                const at::Tensor& shift, float* m_out, float* v_out, double beta1, double beta2,
                double lr, double weight_decay, double eps, double bc1, double bc2) {
  check_adamw_args(param, grad, mU, ms, mVh, vU, vs, vVh, shift);
  const int64_t rows = param.size(0), cols = param.size(1);
  const AdamWArgs args = make_adamw_args(beta1, beta2, lr, weight_decay, eps, bc1, bc2,
                                         shift.item<float>(), ms.size(0), vs.size(0));
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  for_row_blocks(rows, cols, [&](int64_t, int64_t begin, int64_t end) {
    const at::Tensor m_prev = rebuild_rows(mU, ms, mVh, begin, end);
    const at::Tensor v_prev = rebuild_rows(vU, vs, vVh, begin, end);
    const float *mp = m_prev.data_ptr<float>(), *vp = v_prev.data_ptr<float>();
    const int64_t offset = begin * cols;
    for (int64_t e = 0; e < (end - begin) * cols; ++e) {
      float m, v;
      adamw_update(args, p[offset + e], g[offset + e], mp[e], vp[e], m, v);
      if (m_out != nullptr) {
        m_out[offset + e] = m;
        v_out[offset + e] = v;
      }
    }
  });
}

void adamw_step_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU,
                    const at::Tensor& ms, const at::Tensor& mVh, const at::Tensor& vU,
                    const at::Tensor& vs, const at::Tensor& vVh, const at::Tensor& shift,
                    at::Tensor& m_out, at::Tensor& v_out, double beta1, double beta2, double lr,
                    double weight_decay, double eps, double bc1, double bc2) {
  check_dense(m_out, param.size(0), param.size(1), "m_out");
  check_dense(v_out, param.size(0), param.size(1), "v_out");
  adamw_rows(param, grad, mU, ms, mVh, vU, vs, vVh, shift, m_out.data_ptr<float>(),
             v_out.data_ptr<float>(), beta1, beta2, lr, weight_decay, eps, bc1, bc2);
}

void adamw_update_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU,
                      const at::Tensor& ms, const at::Tensor& mVh, const at::Tensor& vU,
                      const at::Tensor& vs, const at::Tensor& vVh, const at::Tensor& shift,
                      double beta1, double beta2, double lr, double weight_decay, double eps,
                      double bc1, double bc2) {
  adamw_rows(param, grad, mU, ms, mVh, vU, vs, vVh, shift, nullptr, nullptr, beta1, beta2, lr,
             weight_decay, eps, bc1, bc2);
}

// ---------------------------------------------------------------------------------------------------
// lion_step_ / lion_update_: [M1], [M3], [M6], [M7] of MLorc_Lion for one fp32 matrix in one pass,
// with or without writing the new dense momentum. Python twin: MLorc_Lion._direction, apply_update_.

void check_lion_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& U,
                     const at::Tensor& s, const at::Tensor& Vh) {
  const int64_t rows = param.size(0), cols = param.size(1);
  check_dense(param, rows, cols, "param");
  check_dense(grad, rows, cols, "grad");
  check_factors(U, s, Vh, rows, cols, "exp_avg");
}

void lion_rows(at::Tensor& param, const at::Tensor& grad, const at::Tensor& U, const at::Tensor& s,
               const at::Tensor& Vh, float* m_out, double beta1, double beta2, double lr,
               double weight_decay) {
  check_lion_args(param, grad, U, s, Vh);
  const int64_t rows = param.size(0), cols = param.size(1);
  const LionArgs args = make_lion_args(beta1, beta2, lr, weight_decay, s.size(0));
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  for_row_blocks(rows, cols, [&](int64_t, int64_t begin, int64_t end) {
    const at::Tensor m_prev = rebuild_rows(U, s, Vh, begin, end);
    const float* mp = m_prev.data_ptr<float>();
    const int64_t offset = begin * cols;
    for (int64_t e = 0; e < (end - begin) * cols; ++e) {
      float m;
      lion_update(args, p[offset + e], g[offset + e], mp[e], m);
      if (m_out != nullptr) m_out[offset + e] = m;
    }
  });
}

void lion_step_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& U,
                   const at::Tensor& s, const at::Tensor& Vh, at::Tensor& m_out, double beta1,
                   double beta2, double lr, double weight_decay) {
  check_dense(m_out, param.size(0), param.size(1), "m_out");
  lion_rows(param, grad, U, s, Vh, m_out.data_ptr<float>(), beta1, beta2, lr, weight_decay);
}

void lion_update_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& U,
                     const at::Tensor& s, const at::Tensor& Vh, double beta1, double beta2, double lr,
                     double weight_decay) {
  lion_rows(param, grad, U, s, Vh, nullptr, beta1, beta2, lr, weight_decay);
}

// ---------------------------------------------------------------------------------------------------
// moment_matmul: A @ X, or A^T @ X when transposed, for the new moment A = beta * rebuild(U, s, Vh) +
// (1 - beta) * grad (grad * grad when squared; rebuilt entries below 0 become shift first when a
// shift is given), without writing A out. Python twin: mlorc.FusedMoment's dense equivalent.

void check_moment_matmul_args(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh,
                              const at::Tensor& grad, const at::Tensor& X, bool transposed) {
  const int64_t rows = U.size(0), cols = Vh.size(1);
  check_factors(U, s, Vh, rows, cols, "moment_matmul");
  check_dense(grad, rows, cols, "grad");
  TORCH_CHECK(X.dim() == 2 && X.size(0) == (transposed ? rows : cols) && X.scalar_type() == at::kFloat,
              "mlorc: moment_matmul's X must be float32 with as many rows as the product needs");
}

at::Tensor moment_matmul_cpu(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh,
                             const at::Tensor& grad, double beta, bool squared,
                             const c10::optional<at::Tensor>& shift, const at::Tensor& X,
                             bool transposed) {
  check_moment_matmul_args(U, s, Vh, grad, X, transposed);
  const int64_t rows = U.size(0), cols = Vh.size(1), width = X.size(1), b = block_rows(cols);
  const bool repair = shift.has_value();
  const float shift_value = repair ? shift->item<float>() : 0.f, beta_f = float(beta);
  const float* g = grad.data_ptr<float>();
  auto block_moment = [&](int64_t begin, int64_t end) {
    at::Tensor a = rebuild_rows(U, s, Vh, begin, end);
    float* value = a.data_ptr<float>();
    const float* gb = g + begin * cols;
    const int64_t count = a.numel();
    auto fill = [&](auto squared_, auto repair_) {     // one loop per case, each vectorizable
      for (int64_t e = 0; e < count; ++e)
        value[e] = moment_entry(value[e], gb[e], beta_f, squared_, repair_, shift_value);
    };
    if (squared)
      repair ? fill(std::true_type{}, std::true_type{}) : fill(std::true_type{}, std::false_type{});
    else
      repair ? fill(std::false_type{}, std::true_type{}) : fill(std::false_type{}, std::false_type{});
    return a;
  };
  if (!transposed) {            // (A X)^T = X^T A^T, (r + p) x m, block by block of its columns
    at::Tensor out = at::empty({width, rows}, X.options());
    const at::Tensor X_t = X.t().contiguous();
    for_row_blocks(rows, cols, [&](int64_t, int64_t begin, int64_t end) {
      at::Tensor out_cols = out.narrow(1, begin, end - begin);
      at::mm_out(out_cols, X_t, block_moment(begin, end).t());
    });
    return out.t().contiguous();
  }
  // A^T X sums over all rows: a fixed number of row ranges (not one per thread) each sum their own
  // partial product, added in range order, so which thread runs which range does not matter.
  // Each range accumulates (A^T X)^T = X^T A, (r + p) x n: a wide, row-major product suits BLAS here.
  const int64_t blocks = count_blocks(rows, cols), parts = std::min<int64_t>(blocks, 8);
  if (parts == 0) return at::zeros({cols, width}, X.options());         // no rows: A^T X is 0
  at::Tensor partial = at::zeros({parts, width, cols}, X.options());
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t q = first; q < last; ++q)
      for (int64_t k = q * blocks / parts; k < (q + 1) * blocks / parts; ++k) {
        const int64_t begin = k * b, end = std::min(rows, begin + b);
        partial.select(0, q).addmm_(X.narrow(0, begin, end - begin).t(), block_moment(begin, end));
      }
  });
  at::Tensor total = partial.select(0, 0).clone();      // added in range order: elementwise adds,
  for (int64_t q = 1; q < parts; ++q) total.add_(partial.select(0, q));   // whatever the threads
  return total.t().contiguous();
}

TORCH_LIBRARY(mlorc, m) {
  m.def("negative_mean(Tensor U, Tensor s, Tensor Vh) -> Tensor");
  m.def(
      "adamw_step_(Tensor(a!) param, Tensor grad, Tensor mU, Tensor ms, Tensor mVh, Tensor vU, "
      "Tensor vs, Tensor vVh, Tensor shift, Tensor(b!) m_out, Tensor(c!) v_out, float beta1, "
      "float beta2, float lr, float weight_decay, float eps, float bc1, float bc2) -> ()");
  m.def(
      "lion_step_(Tensor(a!) param, Tensor grad, Tensor U, Tensor s, Tensor Vh, "
      "Tensor(b!) m_out, float beta1, float beta2, float lr, float weight_decay) -> ()");
  m.def(
      "adamw_update_(Tensor(a!) param, Tensor grad, Tensor mU, Tensor ms, Tensor mVh, Tensor vU, "
      "Tensor vs, Tensor vVh, Tensor shift, float beta1, float beta2, float lr, float weight_decay, "
      "float eps, float bc1, float bc2) -> ()");
  m.def(
      "lion_update_(Tensor(a!) param, Tensor grad, Tensor U, Tensor s, Tensor Vh, float beta1, "
      "float beta2, float lr, float weight_decay) -> ()");
  m.def(
      "moment_matmul(Tensor U, Tensor s, Tensor Vh, Tensor grad, float beta, bool squared, "
      "Tensor? shift, Tensor X, bool transposed) -> Tensor");
}

// Meta kernels: shapes only, so FakeTensor tracing (torch.compile, opcheck) works.
at::Tensor negative_mean_meta(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh) {
  check_factors(U, s, Vh, U.size(0), Vh.size(1), "negative_mean");
  return at::empty({}, U.options());
}

void adamw_step_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, at::Tensor&, at::Tensor&, double, double, double, double,
                     double, double, double) {}

void lion_step_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, at::Tensor&, double, double, double, double) {}

void adamw_update_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, double, double, double, double, double, double, double) {}

void lion_update_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, double, double, double, double) {}

at::Tensor moment_matmul_meta(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh,
                              const at::Tensor& grad, double, bool, const c10::optional<at::Tensor>&,
                              const at::Tensor& X, bool transposed) {
  check_moment_matmul_args(U, s, Vh, grad, X, transposed);
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
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("lion_step_", &lion_step_cpu);
  m.impl("adamw_update_", &adamw_update_cpu);
  m.impl("lion_update_", &lion_update_cpu);
  m.impl("moment_matmul", &moment_matmul_cpu);
}

}  // namespace mlorc
