// CUDA kernels of the mlorc operators (schemas and checks live in mlorc_ops.cpp). One thread per
// matrix entry, launched on the current stream; the arithmetic is mlorc_kernels.h's, as on the CPU.
// moment_matmul writes a second moment a chunk of rows at a time and multiplies the chunk with
// cuBLAS; a first moment is linear in its parts and needs no chunk.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mlorc_kernels.h"
#include "mlorc_ops.h"

namespace mlorc {

namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

// Per-block sums of |v| and counts over the negative entries, added into two doubles.
__global__ void negative_mean_kernel(const float* U, const float* s, const float* Vh, int64_t r,
                                     int64_t rows, int64_t cols, double* sums) {
  __shared__ double block_sum[kThreads], block_count[kThreads];
  const int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  double sum = 0.0, count = 0.0;
  if (e < rows * cols) {
    const float value = lowrank_entry(U, s, Vh, r, e / cols, e % cols, cols);
    if (value < 0.f) {
      sum = -value;
      count = 1.0;
    }
  }
  block_sum[threadIdx.x] = sum;
  block_count[threadIdx.x] = count;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      block_sum[threadIdx.x] += block_sum[threadIdx.x + stride];
      block_count[threadIdx.x] += block_count[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    atomicAdd(&sums[0], block_sum[0]);
    atomicAdd(&sums[1], block_count[0]);
  }
}

__global__ void adamw_kernel(AdamWArgs a, const float* shift, int64_t rows, int64_t cols, float* p,
                             const float* g, const float* mU, const float* ms, const float* mVh,
                             const float* vU, const float* vs, const float* vVh, const float* kU,
                             const float* ks, const float* kVh, float* m_out, float* v_out) {
  const int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (e >= rows * cols) return;
  a.shift = *shift;
  adamw_entry(a, e / cols, e % cols, cols, p, g, mU, ms, mVh, vU, vs, vVh, kU, ks, kVh, m_out, v_out);
}

__global__ void lion_kernel(LionArgs a, int64_t rows, int64_t cols, float* p, const float* g,
                            const float* U, const float* s, const float* Vh, const float* kU,
                            const float* ks, const float* kVh, float* m_out) {
  const int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (e >= rows * cols) return;
  lion_entry(a, e / cols, e % cols, cols, p, g, U, s, Vh, kU, ks, kVh, m_out);
}

// Rows [begin, begin + count / cols) of the new moment (moment_entry of the rebuilt old entry and g)
// into out, row-major; shift is null when there is no [M2] repair.
__global__ void moment_rows_kernel(const float* U, const float* s, const float* Vh, int64_t r,
                                   const float* g, float beta, bool squared, const float* shift,
                                   int64_t begin, int64_t count, int64_t cols, float* out) {
  const int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (e >= count) return;
  const int64_t i = begin + e / cols, j = e % cols;
  const float old = lowrank_entry(U, s, Vh, r, i, j, cols);
  out[e] = moment_entry(old, g[i * cols + j], beta, squared, shift != nullptr,
                        shift != nullptr ? *shift : 0.f);
}

}  // namespace

at::Tensor negative_mean_cuda(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh) {
  const int64_t rows = U.size(0), cols = Vh.size(1);
  check_factors(U, s, Vh, rows, cols, "negative_mean");
  const c10::cuda::CUDAGuard guard(U.device());
  at::Tensor sums = at::zeros({2}, U.options().dtype(at::kDouble));
  if (rows * cols > 0) {
    negative_mean_kernel<<<blocks_for(rows * cols), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        U.data_ptr<float>(), s.data_ptr<float>(), Vh.data_ptr<float>(), s.size(0), rows, cols,
        sums.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return (sums[0] / sums[1].clamp_min(1.0)).to(at::kFloat);
}

// m_out and v_out: where the new moments go, or null (the update only)
void adamw_cuda(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mU, const at::Tensor& ms,
                const at::Tensor& mVh, const at::Tensor& vU, const at::Tensor& vs, const at::Tensor& vVh,
                const at::Tensor& shift, float* m_out, float* v_out, double beta1, double beta2,
                double lr, double weight_decay, double eps, double bc1, double bc2, double bound,
                const c10::optional<at::Tensor>& kept_U, const c10::optional<at::Tensor>& kept_Vh,
                double outside) {
  const int64_t rows = param.size(0), cols = param.size(1);
  check_adamw_args(param, grad, mU, ms, mVh, vU, vs, vVh, shift, kept_U, kept_Vh);
  if (rows * cols == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const auto [kU, ks, kVh] = kept_factors(param, kept_U, kept_Vh);
  const AdamWArgs args = make_adamw_args(beta1, beta2, lr, weight_decay, eps, bc1, bc2, bound, 0.f,
                                         outside, ms.size(0), vs.size(0), ks.size(0));
  adamw_kernel<<<blocks_for(rows * cols), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      args, shift.data_ptr<float>(), rows, cols, param.data_ptr<float>(), grad.data_ptr<float>(),
      mU.data_ptr<float>(), ms.data_ptr<float>(), mVh.data_ptr<float>(), vU.data_ptr<float>(),
      vs.data_ptr<float>(), vVh.data_ptr<float>(), kU.data_ptr<float>(), ks.data_ptr<float>(),
      kVh.data_ptr<float>(), m_out, v_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// m_out: where the new momentum goes, or null (the update only)
void lion_cuda(at::Tensor& param, const at::Tensor& grad, const at::Tensor& U, const at::Tensor& s,
               const at::Tensor& Vh, float* m_out, double beta1, double beta2, double lr,
               double weight_decay, const c10::optional<at::Tensor>& kept_U,
               const c10::optional<at::Tensor>& kept_Vh, double outside) {
  const int64_t rows = param.size(0), cols = param.size(1);
  check_lion_args(param, grad, U, s, Vh, kept_U, kept_Vh);
  if (rows * cols == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const auto [kU, ks, kVh] = kept_factors(param, kept_U, kept_Vh);
  lion_kernel<<<blocks_for(rows * cols), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      make_lion_args(beta1, beta2, lr, weight_decay, outside, s.size(0), ks.size(0)), rows, cols,
      param.data_ptr<float>(), grad.data_ptr<float>(), U.data_ptr<float>(), s.data_ptr<float>(),
      Vh.data_ptr<float>(), kU.data_ptr<float>(), ks.data_ptr<float>(), kVh.data_ptr<float>(), m_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A @ X or A^T @ X, a chunk of at most 4M entries (16 MiB) of A at a time: the only m x n memory
// the product holds (none for a first moment). The chunks' products are added in row order, so
// the result is deterministic.
at::Tensor moment_matmul_cuda(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh,
                              const at::Tensor& grad, double beta, bool squared,
                              const c10::optional<at::Tensor>& shift, const at::Tensor& X,
                              bool transposed) {
  check_moment_matmul_args(U, s, Vh, grad, shift, X, transposed);
  TORCH_CHECK(!shift.has_value() || shift->device() == grad.device(),
              "mlorc: moment_matmul's shift must be on grad's device");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor X_ = X.contiguous();
  if (!squared && !shift.has_value()) {
    // a first moment is linear in its parts, A X = beta (U s) (Vh X) + (1 - beta) g X: cuBLAS
    // multiplies g itself, with no chunk of A to write and read back
    const at::Tensor Us = U * s;
    return transposed ? at::addmm(at::mm(grad.t(), X_), Vh.t(), at::mm(Us.t(), X_), 1.0 - beta, beta)
                      : at::addmm(at::mm(grad, X_), Us, at::mm(Vh, X_), 1.0 - beta, beta);
  }
  const int64_t rows = grad.size(0), cols = grad.size(1), width = X.size(1);
  const int64_t chunk_rows = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(cols, 1));
  at::Tensor out = transposed ? at::zeros({cols, width}, X.options()) : at::empty({rows, width}, X.options());
  at::Tensor chunk = at::empty({std::min(rows, chunk_rows), cols}, grad.options());
  for (int64_t begin = 0; begin < rows; begin += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - begin);
    at::Tensor A = chunk.narrow(0, 0, n);
    if (n * cols > 0) {
      moment_rows_kernel<<<blocks_for(n * cols), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          U.data_ptr<float>(), s.data_ptr<float>(), Vh.data_ptr<float>(), s.size(0),
          grad.data_ptr<float>(), float(beta), squared,
          shift.has_value() ? shift->data_ptr<float>() : nullptr, begin, n * cols, cols,
          A.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (transposed) {
      out.addmm_(A.t(), X_.narrow(0, begin, n));
    } else {
      at::Tensor out_rows = out.narrow(0, begin, n);
      at::mm_out(out_rows, A, X_);
    }
  }
  return out;
}

TORCH_LIBRARY_IMPL(mlorc, CUDA, m) {
  m.impl("negative_mean", &negative_mean_cuda);
  m.impl("adamw_step_", &adamw_step<adamw_cuda>);
  m.impl("lion_step_", &lion_step<lion_cuda>);
  m.impl("adamw_update_", &adamw_update<adamw_cuda>);
  m.impl("lion_update_", &lion_update<lion_cuda>);
  m.impl("moment_matmul", &moment_matmul_cuda);
}

}  // namespace mlorc
