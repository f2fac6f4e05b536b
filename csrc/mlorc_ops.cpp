// mlorc C++ operators: schemas, argument checks and CPU kernels.
//
// Each operator fuses one stretch of the Python pipeline in mlorc.py into a single pass over the
// matrix, rebuilding the moments from their rank-r factors entry by entry instead of materializing
// them: m~_ij = sum_k U_ik s_k Vh_kj. The Python functions named in each comment are the reference
// the tests compare against; the Python path stays the default whenever the extension is missing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

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
// negative_mean: [M2]'s c for a factored second moment. Python twin: mlorc.negative_mean applied to
// mlorc.reconstruct(U, s, Vh).

at::Tensor negative_mean_cpu(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh) {
  const int64_t rows = U.size(0), cols = Vh.size(1), r = s.size(0);
  check_factors(U, s, Vh, rows, cols, "negative_mean");
  const float* u = U.data_ptr<float>();
  const float* sv = s.data_ptr<float>();
  const float* vh = Vh.data_ptr<float>();
  // rows are summed in parallel chunks into per-row partial sums, then reduced in row order
  std::vector<double> row_sum(rows, 0.0), row_count(rows, 0.0);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double sum = 0.0, count = 0.0;
      for (int64_t j = 0; j < cols; ++j) {
        float value = 0.f;
        for (int64_t k = 0; k < r; ++k) value += u[i * r + k] * sv[k] * vh[k * cols + j];
        if (value < 0.f) {
          sum -= value;
          count += 1.0;
        }
      }
      row_sum[i] = sum;
      row_count[i] = count;
    }
  });
  double sum = 0.0, count = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    sum += row_sum[i];
    count += row_count[i];
  }
  return at::scalar_tensor(count > 0 ? sum / count : 0.0, U.options());
}

// ---------------------------------------------------------------------------------------------------
// adamw_step_: [M1]-[M3], [M5]-[M7] of MLorc_AdamW for one fp32 matrix in one pass. Writes the new
// dense moments (for [M4]) and updates the parameter. Python twin: MLorc_AdamW._direction, then
// mlorc.apply_update_.

void adamw_step_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU,
                    const at::Tensor& ms, const at::Tensor& mVh, const at::Tensor& vU,
                    const at::Tensor& vs, const at::Tensor& vVh, const at::Tensor& shift,
                    at::Tensor& m_out, at::Tensor& v_out, double beta1, double beta2, double lr,
                    double weight_decay, double eps, double bc1, double bc2) {
  const int64_t rows = param.size(0), cols = param.size(1);
  check_dense(param, rows, cols, "param");
  check_dense(grad, rows, cols, "grad");
  check_dense(m_out, rows, cols, "m_out");
  check_dense(v_out, rows, cols, "v_out");
  check_factors(mU, ms, mVh, rows, cols, "exp_avg");
  check_factors(vU, vs, vVh, rows, cols, "exp_avg_sq");
  TORCH_CHECK(shift.numel() == 1 && shift.scalar_type() == at::kFloat, "mlorc: shift must be one float32");
  const AdamWArgs args = make_adamw_args(beta1, beta2, lr, weight_decay, eps, bc1, bc2,
                                         shift.item<float>(), ms.size(0), vs.size(0));
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = m_out.data_ptr<float>();
  float* v = v_out.data_ptr<float>();
  const float *mu = mU.data_ptr<float>(), *msv = ms.data_ptr<float>(), *mvh = mVh.data_ptr<float>();
  const float *vu = vU.data_ptr<float>(), *vsv = vs.data_ptr<float>(), *vvh = vVh.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < cols; ++j)
        adamw_entry(args, i, j, cols, p, g, mu, msv, mvh, vu, vsv, vvh, m, v);
  });
}

// ---------------------------------------------------------------------------------------------------
// lion_step_: [M1], [M3], [M6], [M7] of MLorc_Lion for one fp32 matrix in one pass. Python twin:
// MLorc_Lion._direction, then mlorc.apply_update_.

void lion_step_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& U,
                   const at::Tensor& s, const at::Tensor& Vh, at::Tensor& m_out, double beta1,
                   double beta2, double lr, double weight_decay) {
  const int64_t rows = param.size(0), cols = param.size(1);
  check_dense(param, rows, cols, "param");
  check_dense(grad, rows, cols, "grad");
  check_dense(m_out, rows, cols, "m_out");
  check_factors(U, s, Vh, rows, cols, "exp_avg");
  const LionArgs args = make_lion_args(beta1, beta2, lr, weight_decay, s.size(0));
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = m_out.data_ptr<float>();
  const float *u = U.data_ptr<float>(), *sv = s.data_ptr<float>(), *vh = Vh.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < cols; ++j) lion_entry(args, i, j, cols, p, g, u, sv, vh, m);
  });
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

TORCH_LIBRARY_IMPL(mlorc, Meta, m) {
  m.impl("negative_mean", &negative_mean_meta);
  m.impl("adamw_step_", &adamw_step_meta);
  m.impl("lion_step_", &lion_step_meta);
}

TORCH_LIBRARY_IMPL(mlorc, CPU, m) {
  m.impl("negative_mean", &negative_mean_cpu);
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("lion_step_", &lion_step_cpu);
}

}  // namespace mlorc
