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
  // Adam's (m / bc1) / (sqrt(v) / sqrt(bc2) + eps), with its three divisions folded into one:
  // step_size * m / (sqrt(v) + eps_hat), step_size = lr sqrt(bc2) / bc1, eps_hat = eps sqrt(bc2);
  // the ratio m / (sqrt(v) + eps_hat) clamped to +-bound, C_t (mlorc.adam_ratio_bound). With
  // full_weight_outside the ratio's m is m + outside * (g - kept), kept being g's part in m~'s
  // column or row space (mlorc.kept_part, rank_k terms) and outside = b1 - b1^t; 0 and 0 without.
  float beta1, beta2, step_size, decay, eps_hat, bound, shift, outside;
  int64_t rank_m, rank_v, rank_k;
};

struct LionArgs {
  // with full_weight_outside the mix is b1 m~ + (1 - b1) g + outside (g - kept), outside = b1 (as
  // in AdamWArgs; 0 and rank_k 0 without)
  float beta1, beta2, lr, decay, outside;
  int64_t rank, rank_k;
};

inline AdamWArgs make_adamw_args(double beta1, double beta2, double lr, double weight_decay,
                                 double eps, double bc1, double bc2, double bound, float shift,
                                 double outside, int64_t rank_m, int64_t rank_v, int64_t rank_k) {
  return AdamWArgs{float(beta1), float(beta2), float(lr * std::sqrt(bc2) / bc1),
                   float(1.0 - lr * weight_decay), float(eps * std::sqrt(bc2)), float(bound), shift,
                   float(outside), rank_m, rank_v, rank_k};
}

inline LionArgs make_lion_args(double beta1, double beta2, double lr, double weight_decay, double outside,
                               int64_t rank, int64_t rank_k) {
  return LionArgs{float(beta1), float(beta2), float(lr), float(1.0 - lr * weight_decay), float(outside),
                  rank, rank_k};
}

// [M1] one entry of (U * s) @ Vh
MLORC_HD float lowrank_entry(const float* U, const float* s, const float* Vh, int64_t r, int64_t i,
                             int64_t j, int64_t cols) {
  float value = 0.f;
  for (int64_t k = 0; k < r; ++k) value += U[i * r + k] * s[k] * Vh[k * cols + j];
  return value;
}

// [M2] repair, [M3] EMA, [M5][M6] Adam clamped to dense Adam's bound, [M7] apply at one entry,
// from its rebuilt m~ and v~ (and g's kept part, see AdamWArgs). The clamp is written with
// comparisons so that a NaN stays NaN, as in torch.clamp.
MLORC_HD void adamw_update(const AdamWArgs& a, float& p, float g, float m_prev, float v_prev,
                           float kept, float& m, float& v) {
  if (v_prev < 0.f) v_prev = a.shift;
  m = m_prev * a.beta1 + g * (1.f - a.beta1);
  v = v_prev * a.beta2 + g * g * (1.f - a.beta2);
  float ratio = (a.rank_k > 0 ? m + a.outside * (g - kept) : m) / (sqrtf(v) + a.eps_hat);
  ratio = ratio > a.bound ? a.bound : ratio < -a.bound ? -a.bound : ratio;
  p = p * a.decay - a.step_size * ratio;
}

// MLorc_AdamW at entry (i, j): [M1] rebuild, then adamw_update; the new moments are written out
// unless m_out and v_out are null.
MLORC_HD void adamw_entry(const AdamWArgs& a, int64_t i, int64_t j, int64_t cols, float* p,
                          const float* g, const float* mU, const float* ms, const float* mVh,
                          const float* vU, const float* vs, const float* vVh, const float* kU,
                          const float* ks, const float* kVh, float* m_out, float* v_out) {
  const int64_t e = i * cols + j;
  const float v_prev = lowrank_entry(vU, vs, vVh, a.rank_v, i, j, cols);
  const float m_prev = lowrank_entry(mU, ms, mVh, a.rank_m, i, j, cols);
  const float kept = a.rank_k > 0 ? lowrank_entry(kU, ks, kVh, a.rank_k, i, j, cols) : 0.f;
  float m, v;
  adamw_update(a, p[e], g[e], m_prev, v_prev, kept, m, v);
  if (m_out != nullptr) {
    m_out[e] = m;
    v_out[e] = v;
  }
}

// [M6] sign step, [M3] momentum, [M7] apply at one entry, from its rebuilt m~ (and g's kept part).
MLORC_HD void lion_update(const LionArgs& a, float& p, float g, float m_prev, float kept, float& m) {
  const float mix = m_prev * a.beta1 + g * (1.f - a.beta1);
  const float c = a.rank_k > 0 ? mix + a.outside * (g - kept) : mix;
  const float d = float(c > 0.f) - float(c < 0.f);     // sign(c), branch-free: the signs are random
  p = p * a.decay - a.lr * d;
  m = m_prev * a.beta2 + g * (1.f - a.beta2);
}

// MLorc_Lion at entry (i, j): [M1] rebuild, then lion_update; the new momentum is written out
// unless m_out is null.
MLORC_HD void lion_entry(const LionArgs& a, int64_t i, int64_t j, int64_t cols, float* p,
                         const float* g, const float* U, const float* s, const float* Vh,
                         const float* kU, const float* ks, const float* kVh, float* m_out) {
  const int64_t e = i * cols + j;
  const float kept = a.rank_k > 0 ? lowrank_entry(kU, ks, kVh, a.rank_k, i, j, cols) : 0.f;
  float m;
  lion_update(a, p[e], g[e], lowrank_entry(U, s, Vh, a.rank, i, j, cols), kept, m);
  if (m_out != nullptr) m_out[e] = m;
}

// One entry of a new moment from its rebuilt old value: beta * old + (1 - beta) * g (g * g for a
// second moment, whose old value gets the [M2] repair first). The same expressions as the updates
// above, so the products of moment_matmul see exactly the moments an update pass would write.
MLORC_HD float moment_entry(float old, float g, float beta, bool squared, bool repair, float shift) {
  if (repair && old < 0.f) old = shift;
  return squared ? old * beta + g * g * (1.f - beta) : old * beta + g * (1.f - beta);
}

}  // namespace mlorc
