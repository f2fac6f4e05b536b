// Declarations shared by the CPU (mlorc_ops.cpp) and CUDA (mlorc_cuda.cu) operators: the argument
// checks, and the two entry points every backend's fused pass gets (with and without new moments).
#pragma once
#include <ATen/ATen.h>

namespace mlorc {

void check_factors(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh, int64_t rows,
                   int64_t cols, const char* what);
void check_dense(const at::Tensor& t, int64_t rows, int64_t cols, const char* what);
void check_adamw_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU,
                      const at::Tensor& ms, const at::Tensor& mVh, const at::Tensor& vU,
                      const at::Tensor& vs, const at::Tensor& vVh, const at::Tensor& shift,
                      const c10::optional<at::Tensor>& kept_U, const c10::optional<at::Tensor>& kept_Vh);
// g's kept part (mlorc.kept_part) as Factors-style (U, s, Vh) with s = 1, or (rows, 0), (0), (0, cols)
// when there is none
std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_factors(const at::Tensor& param,
                                                            const c10::optional<at::Tensor>& kept_U,
                                                            const c10::optional<at::Tensor>& kept_Vh);
void check_lion_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& U,
                     const at::Tensor& s, const at::Tensor& Vh, const c10::optional<at::Tensor>& kept_U,
                     const c10::optional<at::Tensor>& kept_Vh);
void check_moment_matmul_args(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh,
                              const at::Tensor& grad, const c10::optional<at::Tensor>& shift,
                              const at::Tensor& X, bool transposed);

// A backend's fused MLorc_AdamW pass over one matrix: moves param, and writes the new moments to
// m_out and v_out unless they are null. kept_U, kept_Vh: g's kept part for full_weight_outside
// (mlorc.kept_part; kept_U @ kept_Vh), or none; outside: its weight b1 - b1^t.
using AdamWPass = void (*)(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU,
                           const at::Tensor& ms, const at::Tensor& mVh, const at::Tensor& vU,
                           const at::Tensor& vs, const at::Tensor& vVh, const at::Tensor& shift,
                           float* m_out, float* v_out, double beta1, double beta2, double lr,
                           double weight_decay, double eps, double bc1, double bc2, double bound,
                           const c10::optional<at::Tensor>& kept_U,
                           const c10::optional<at::Tensor>& kept_Vh, double outside);

// mlorc::adamw_step_ on a backend: the pass, writing the new moments
template <AdamWPass pass>
void adamw_step(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU, const at::Tensor& ms,
                const at::Tensor& mVh, const at::Tensor& vU, const at::Tensor& vs, const at::Tensor& vVh,
                const at::Tensor& shift, at::Tensor& m_out, at::Tensor& v_out, double beta1,
                double beta2, double lr, double weight_decay, double eps, double bc1, double bc2,
                double bound, const c10::optional<at::Tensor>& kept_U,
                const c10::optional<at::Tensor>& kept_Vh, double outside) {
  check_dense(m_out, param.size(0), param.size(1), "m_out");
  check_dense(v_out, param.size(0), param.size(1), "v_out");
  pass(param, grad, mU, ms, mVh, vU, vs, vVh, shift, m_out.data_ptr<float>(), v_out.data_ptr<float>(),
       beta1, beta2, lr, weight_decay, eps, bc1, bc2, bound, kept_U, kept_Vh, outside);
}

// mlorc::adamw_update_ on a backend: the pass, moving the parameter only
template <AdamWPass pass>
void adamw_update(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU,
                  const at::Tensor& ms, const at::Tensor& mVh, const at::Tensor& vU,
                  const at::Tensor& vs, const at::Tensor& vVh, const at::Tensor& shift, double beta1,
                  double beta2, double lr, double weight_decay, double eps, double bc1, double bc2,
                  double bound, const c10::optional<at::Tensor>& kept_U,
                  const c10::optional<at::Tensor>& kept_Vh, double outside) {
  pass(param, grad, mU, ms, mVh, vU, vs, vVh, shift, nullptr, nullptr, beta1, beta2, lr, weight_decay,
       eps, bc1, bc2, bound, kept_U, kept_Vh, outside);
}

// A backend's fused MLorc_Lion pass over one matrix: moves param, and writes the new momentum to
// m_out unless it is null. kept_U, kept_Vh, outside: as AdamWPass's (outside = b1).
using LionPass = void (*)(at::Tensor& param, const at::Tensor& grad, const at::Tensor& U,
                          const at::Tensor& s, const at::Tensor& Vh, float* m_out, double beta1,
                          double beta2, double lr, double weight_decay,
                          const c10::optional<at::Tensor>& kept_U,
                          const c10::optional<at::Tensor>& kept_Vh, double outside);

// mlorc::lion_step_ on a backend: the pass, writing the new momentum
template <LionPass pass>
void lion_step(at::Tensor& param, const at::Tensor& grad, const at::Tensor& U, const at::Tensor& s,
               const at::Tensor& Vh, at::Tensor& m_out, double beta1, double beta2, double lr,
               double weight_decay, const c10::optional<at::Tensor>& kept_U,
               const c10::optional<at::Tensor>& kept_Vh, double outside) {
  check_dense(m_out, param.size(0), param.size(1), "m_out");
  pass(param, grad, U, s, Vh, m_out.data_ptr<float>(), beta1, beta2, lr, weight_decay, kept_U, kept_Vh,
       outside);
}

// mlorc::lion_update_ on a backend: the pass, moving the parameter only
template <LionPass pass>
void lion_update(at::Tensor& param, const at::Tensor& grad, const at::Tensor& U, const at::Tensor& s,
                 const at::Tensor& Vh, double beta1, double beta2, double lr, double weight_decay,
                 const c10::optional<at::Tensor>& kept_U,
                 const c10::optional<at::Tensor>& kept_Vh, double outside) {
  pass(param, grad, U, s, Vh, nullptr, beta1, beta2, lr, weight_decay, kept_U, kept_Vh, outside);
}

}  // namespace mlorc
