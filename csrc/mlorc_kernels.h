// The per-entry arithmetic of the fused operators, shared by the CPU loops (mlorc_ops.cpp) and the
// CUDA kernels (mlorc_cuda.cu), so both backends compute exactly the same expressions.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MLORC_HD __host__ __device__ __forceinline__
#else
#define MLORC_HD inline
#endif

namespace mlorc {

struct AdamWArgs {
  float beta1, beta2, lr, decay, eps, bc1, sqrt_bc2, shift;
  int64_t rank_m, rank_v;
};

struct LionArgs {
  float beta1, beta2, lr, decay;
  int64_t rank;
};

inline AdamWArgs make_adamw_args(double beta1, double beta2, double lr, double weight_decay,
                                 double eps, double bc1, double bc2, float shift, int64_t rank_m,
                                 int64_t rank_v) {
  return AdamWArgs{float(beta1), float(beta2), float(lr), float(1.0 - lr * weight_decay), float(eps),
                   float(bc1), float(std::sqrt(bc2)), shift, rank_m, rank_v};
}

inline LionArgs make_lion_args(double beta1, double beta2, double lr, double weight_decay, int64_t rank) {
  return LionArgs{float(beta1), float(beta2), float(lr), float(1.0 - lr * weight_decay), rank};
}

// [M1] one entry of (U * s) @ Vh
MLORC_HD float lowrank_entry(const float* U, const float* s, const float* Vh, int64_t r, int64_t i,
                             int64_t j, int64_t cols) {
  float value = 0.f;
  for (int64_t k = 0; k < r; ++k) value += U[i * r + k] * s[k] * Vh[k * cols + j];
  return value;
}

// MLorc_AdamW at entry (i, j): [M1] rebuild, [M2] repair, [M3] EMA, [M5][M6] Adam, [M7] apply.
MLORC_HD void adamw_entry(const AdamWArgs& a, int64_t i, int64_t j, int64_t cols, float* p,
                          const float* g, const float* mU, const float* ms, const float* mVh,
                          const float* vU, const float* vs, const float* vVh, float* m_out,
                          float* v_out) {
  const int64_t e = i * cols + j;
  const float gij = g[e];
  float v_prev = lowrank_entry(vU, vs, vVh, a.rank_v, i, j, cols);
  if (v_prev < 0.f) v_prev = a.shift;
  const float m = lowrank_entry(mU, ms, mVh, a.rank_m, i, j, cols) * a.beta1 + gij * (1.f - a.beta1);
  const float v = v_prev * a.beta2 + gij * gij * (1.f - a.beta2);
  const float d = (m / a.bc1) / (sqrtf(v) / a.sqrt_bc2 + a.eps);
  p[e] = p[e] * a.decay - a.lr * d;
  m_out[e] = m;
  v_out[e] = v;
}

// MLorc_Lion at entry (i, j): [M1] rebuild, [M6] sign step, [M3] momentum, [M7] apply.
MLORC_HD void lion_entry(const LionArgs& a, int64_t i, int64_t j, int64_t cols, float* p,
                         const float* g, const float* U, const float* s, const float* Vh,
                         float* m_out) {
  const int64_t e = i * cols + j;
  const float gij = g[e];
  const float m_prev = lowrank_entry(U, s, Vh, a.rank, i, j, cols);
  const float c = m_prev * a.beta1 + gij * (1.f - a.beta1);
  const float d = c > 0.f ? 1.f : (c < 0.f ? -1.f : 0.f);
  p[e] = p[e] * a.decay - a.lr * d;
  m_out[e] = m_prev * a.beta2 + gij * (1.f - a.beta2);
}

}  // namespace mlorc
