// Single-row kernels on the GPU for rows that live in device memory, read in
// place: log-sum-exp, NLL, log-softmax, and top-K storage (values, indices
// and the exact log-sum-exp that a top-K dump keeps beside them).
//
// Input domain: raw logits, float32, float16 or bfloat16. Units: nats. The
// CPU kernels' semantics (log_softmax-inl.h): the log-sum-exp is NaN for a row
// holding NaN or +inf and -inf for a row of only -inf; NLL is lse - x_t (NaN
// for such rows, +inf for a -inf target logit); log-softmax is x - lse rounded
// once to float32; top-k is by value descending with ties to the lower index,
// and a row holding NaN gets NaN values and -1 indices. Accumulation: float64
// throughout, exp included (what the dump calls the exact log-sum-exp), so lse
// agrees with LogSumExpRef to about 1e-15 relative; rows_cuda_test.cc pins
// the tolerances, the same as log_softmax_test.cc's.
//
// Layout: one block of kThreads threads per row. Per step, lane l of warp w
// reads elements begin + 128 w + 4 l + c (c < 4) with one vector load, so each
// warp's load covers one contiguous span. Each thread keeps a running maximum
// and a float64 sum rescaled when the maximum rises (online softmax); the
// threads' sums are brought to the block maximum and reduced in a fixed tree,
// so results are deterministic. Top-k: a WarpTopK list per warp (the one of
// row_metrics_cuda.cu, with room for k <= kMaxTopKCuda), merged by warp 0.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "logitparity/cuda.h"
#include "logitparity/rows.h"
#include "src/cuda/cuda_common.cuh"

namespace logitparity {
namespace {

using namespace cuda_internal;  // NOLINT: the shared kernel helpers

constexpr int kVecElems = 4;                     // one 16-byte (8-byte) load per thread and step
constexpr int kRowStep = kThreads * kVecElems;  // elements per block and step
constexpr int kTopCap = static_cast<int>(kMaxTopKCuda) + 32;
using TopList = WarpTopK<kTopCap>;
static_assert(TopList::kMaxK >= static_cast<int>(kMaxTopKCuda), "top-k buffer too small");

// What a launch computes besides the log-sum-exp.
enum Mode : int { kLse = 0, kTopK = 1, kLogSoftmax = 2 };

// One thread's part of the log-sum-exp: running maximum m, float64 sum of
// exp(x - m), and the NaN / +inf counts that make the row NaN.
struct LseState {
  float m;
  double s;
  unsigned nan, pinf;

  __device__ void Add(float x) {
    nan += x != x;
    pinf += x == Inf();
    if (x > m) {
      if (m > -Inf()) s *= exp(static_cast<double>(m) - x);
      m = x;
    }
    if (x > -Inf()) s += exp(static_cast<double>(x) - m);
  }
};

struct TopShared {
  float v[kWarps][kTopCap];
  int i[kWarps][kTopCap];
  int count[kWarps];
};

template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads)
    RowKernel(const T* __restrict__ base, size_t stride, size_t n, int k,
              const int64_t* __restrict__ targets, double* __restrict__ out_lse,
              double* __restrict__ out_nll, float* __restrict__ out_values,
              int64_t* __restrict__ out_indices, float* out_rows) {
  __shared__ double dscratch[kWarps + 1];
  __shared__ float fscratch[kWarps + 1];
  __shared__ unsigned long long cscratch[kWarps + 1];
  __shared__ typename std::conditional<kMode == kTopK, TopShared, char>::type top_sh;
  const size_t row = blockIdx.x;
  const T* x = base + row * stride;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const bool aligned = reinterpret_cast<uintptr_t>(x) % Loader<T>::kAlign == 0;
  const float ninf = -Inf();

  TopList top;
  if constexpr (kMode == kTopK) top.Init(top_sh.v[warp], top_sh.i[warp]);
  LseState st{ninf, 0.0, 0u, 0u};
  for (size_t begin = 0; begin < n; begin += kRowStep) {
    const size_t i0 = begin + static_cast<size_t>(warp) * 32 * kVecElems + lane * kVecElems;
    float v[kVecElems];
    Load4(x, i0, n, aligned, v);
#pragma unroll
    for (int c = 0; c < kVecElems; ++c) st.Add(v[c]);
    if constexpr (kMode == kTopK) {
      // Indices fit in int: vocab < 2^31 is checked on the host.
      bool any = false;
#pragma unroll
      for (int c = 0; c < kVecElems; ++c) {
        any |= i0 + c < n && Better(v[c], static_cast<int>(i0 + c), top.tau_v, top.tau_i);
      }
      if (__any_sync(kFull, any)) {
#pragma unroll
        for (int c = 0; c < kVecElems; ++c) {
          top.Offer(v[c], static_cast<int>(i0 + c), i0 + c < n, k, lane);
        }
      }
    }
  }

  const float M = BlockMax(st.m, fscratch);
  if (st.m > ninf && st.m < M) st.s *= exp(static_cast<double>(st.m) - M);
  const double S = BlockSum(st.s, dscratch);
  const unsigned long long nan = BlockCount(st.nan, cscratch);
  const unsigned long long pinf = BlockCount(st.pinf, cscratch);
  const double kNaN = __longlong_as_double(0x7FF8000000000000LL);
  const double kInfD = __longlong_as_double(0x7FF0000000000000LL);
  const double lse = nan + pinf > 0 ? kNaN : (M > ninf ? M + log(S) : -kInfD);
  if (tid == 0) {
    out_lse[row] = lse;
    if (out_nll != nullptr) {
      const double xt = Loader<T>::One(x, static_cast<size_t>(targets[row]));
      out_nll[row] = nan + pinf > 0 || !(M > ninf) ? kNaN : lse - xt;
    }
  }

  if constexpr (kMode == kLogSoftmax) {
    // Each element is read and written by the same thread, after every read
    // of the first sweep (the reductions above synchronize the block): so the
    // output may alias a contiguous float32 input.
    float* o = out_rows + row * n;
    for (size_t begin = 0; begin < n; begin += kRowStep) {
      const size_t i0 = begin + static_cast<size_t>(warp) * 32 * kVecElems + lane * kVecElems;
      float v[kVecElems];
      Load4(x, i0, n, aligned, v);
#pragma unroll
      for (int c = 0; c < kVecElems; ++c) {
        if (i0 + c < n) o[i0 + c] = static_cast<float>(static_cast<double>(v[c]) - lse);
      }
    }
  }

  if constexpr (kMode == kTopK) {
    top.Compact(k, lane);
    if (lane == 0) top_sh.count[warp] = top.count;
    __syncthreads();
    if (warp != 0) return;
    for (int w = 1; w < kWarps; ++w) {
      const int c = top_sh.count[w];
      for (int b = 0; b < c; b += 32) {
        const int e = b + lane;
        const bool ok = e < c;
        top.Offer(ok ? top_sh.v[w][e] : 0.0f, ok ? top_sh.i[w][e] : 0, ok, k, lane);
      }
    }
    top.Compact(k, lane);
    float* vals = out_values + row * static_cast<size_t>(k);
    int64_t* idx = out_indices + row * static_cast<size_t>(k);
    for (int j = lane; j < k; j += 32) {
      vals[j] = nan > 0 ? __int_as_float(0x7FC00000) : top.v[j];
      idx[j] = nan > 0 ? -1 : top.i[j];
    }
  }
}

// Checks shared by every entry point; returns the device holding the rows.
int CheckRowsCuda(const RowsView& x) {
  CheckRows(x, "logits");
  if (x.vocab > static_cast<size_t>(std::numeric_limits<int>::max()) ||
      x.rows > static_cast<size_t>(std::numeric_limits<int>::max())) {
    throw std::invalid_argument("rows and vocab must be below 2^31 for the CUDA kernels, got " +
                                std::to_string(x.rows) + " x " + std::to_string(x.vocab));
  }
  RequireCudaDevice();
  return DeviceOf(x.data, "logits");
}

template <int kMode>
void LaunchRows(const RowsView& x, int k, const int64_t* targets, double* lse, double* nll,
                float* values, int64_t* indices, float* out_rows, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(x.rows);
  switch (x.dtype) {
    case Dtype::kF32:
      RowKernel<float, kMode><<<grid, kThreads, 0, stream>>>(
          static_cast<const float*>(x.data), x.row_stride, x.vocab, k, targets, lse, nll, values,
          indices, out_rows);
      break;
    case Dtype::kF16:
      RowKernel<__half, kMode><<<grid, kThreads, 0, stream>>>(
          static_cast<const __half*>(x.data), x.row_stride, x.vocab, k, targets, lse, nll, values,
          indices, out_rows);
      break;
    case Dtype::kBF16:
      RowKernel<Bf16, kMode><<<grid, kThreads, 0, stream>>>(
          static_cast<const Bf16*>(x.data), x.row_stride, x.vocab, k, targets, lse, nll, values,
          indices, out_rows);
      break;
  }
}

// Runs kLse or kTopK with its small results copied to the host buffers
// (nullptr: not wanted), then synchronizes the stream.
template <int kMode>
void RunToHost(const RowsView& x, int k, const int64_t* host_targets, double* host_lse,
               double* host_nll, float* host_values, int64_t* host_indices, uintptr_t handle) {
  const int device = CheckRowsCuda(x);
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(handle);
  const size_t rows = x.rows;
  const size_t lse_bytes = rows * sizeof(double);
  const size_t nll_bytes = host_targets ? rows * sizeof(double) : 0;
  const size_t tgt_bytes = host_targets ? rows * sizeof(int64_t) : 0;
  const size_t val_bytes = rows * static_cast<size_t>(k) * sizeof(float);
  const size_t idx_bytes = rows * static_cast<size_t>(k) * sizeof(int64_t);
  // 8-byte items first, then the float values: every offset stays aligned.
  std::lock_guard<std::mutex> lock(ScratchMutex());
  char* dev = static_cast<char*>(
      DeviceScratch(device, lse_bytes + nll_bytes + tgt_bytes + idx_bytes + val_bytes + 16));
  double* d_lse = reinterpret_cast<double*>(dev);
  double* d_nll = host_targets ? reinterpret_cast<double*>(dev + lse_bytes) : nullptr;
  int64_t* d_tgt = host_targets ? reinterpret_cast<int64_t*>(dev + lse_bytes + nll_bytes) : nullptr;
  int64_t* d_idx = reinterpret_cast<int64_t*>(dev + lse_bytes + nll_bytes + tgt_bytes);
  float* d_val = reinterpret_cast<float*>(dev + lse_bytes + nll_bytes + tgt_bytes + idx_bytes);
  cudaError_t err = cudaSuccess;
  if (host_targets) {
    err = cudaMemcpyAsync(d_tgt, host_targets, tgt_bytes, cudaMemcpyHostToDevice, stream);
  }
  if (err == cudaSuccess) {
    LaunchRows<kMode>(x, k, d_tgt, d_lse, d_nll, d_val, d_idx, nullptr, stream);
    err = cudaGetLastError();
  }
  auto back = [&](void* host, const void* devp, size_t bytes) {
    if (err == cudaSuccess && host != nullptr && bytes > 0) {
      err = cudaMemcpyAsync(host, devp, bytes, cudaMemcpyDeviceToHost, stream);
    }
  };
  back(host_lse, d_lse, lse_bytes);
  back(host_nll, d_nll, nll_bytes);
  if (kMode == kTopK) {
    back(host_values, d_val, val_bytes);
    back(host_indices, d_idx, idx_bytes);
  }
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  Check(err, "logitparity CUDA row kernel");
}

}  // namespace

void LogSumExpCuda(const RowsView& logits, double* out, uintptr_t stream) {
  RunToHost<kLse>(logits, 0, nullptr, out, nullptr, nullptr, nullptr, stream);
}

void NllCuda(const RowsView& logits, const int64_t* targets, double* out, uintptr_t stream) {
  for (size_t r = 0; r < logits.rows; ++r) {
    if (targets[r] < 0 || targets[r] >= static_cast<int64_t>(logits.vocab)) {
      throw std::invalid_argument("targets must be in [0, " + std::to_string(logits.vocab) +
                                  ") (the vocab size), got " + std::to_string(targets[r]) +
                                  " at row " + std::to_string(r));
    }
  }
  std::vector<double> lse(logits.rows);
  RunToHost<kLse>(logits, 0, targets, lse.data(), out, nullptr, nullptr, stream);
}

void TopKCuda(const RowsView& logits, size_t k, float* values, int64_t* indices, double* lse,
              uintptr_t stream) {
  if (k < 1 || k > std::min(kMaxTopKCuda, logits.vocab)) {
    throw std::invalid_argument("k must be in [1, " +
                                std::to_string(std::min(kMaxTopKCuda, logits.vocab)) +
                                "] for the CUDA top-k (min of " + std::to_string(kMaxTopKCuda) +
                                " and the vocab size), got " + std::to_string(k));
  }
  std::vector<double> own;
  if (lse == nullptr) {
    own.resize(logits.rows);
    lse = own.data();
  }
  RunToHost<kTopK>(logits, static_cast<int>(k), nullptr, lse, nullptr, values, indices, stream);
}

void LogSoftmaxCuda(const RowsView& logits, float* out, uintptr_t handle) {
  const int device = CheckRowsCuda(logits);
  if (DeviceOf(out, "out") != device) {
    throw std::invalid_argument("out must be on the device of logits (cuda:" +
                                std::to_string(device) + ")");
  }
  if (out == logits.data && (logits.dtype != Dtype::kF32 || logits.row_stride != logits.vocab)) {
    throw std::invalid_argument(
        "in-place log_softmax needs contiguous float32 logits (row_stride == vocab)");
  }
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(handle);
  // The log-sum-exps go to a scratch buffer; the call does not wait for the
  // kernel (the output stays on the device, ordered on `stream`), so each
  // call gets its own buffer from the stream-ordered allocator.
  double* d_lse = nullptr;
  cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&d_lse),
                                    logits.rows * sizeof(double), stream);
  if (err == cudaSuccess) {
    LaunchRows<kLogSoftmax>(logits, 0, nullptr, d_lse, nullptr, nullptr, nullptr, out, stream);
    err = cudaGetLastError();
    const cudaError_t freed = cudaFreeAsync(d_lse, stream);
    if (err == cudaSuccess) err = freed;
  }
  Check(err, "LogSoftmaxCuda");
}

}  // namespace logitparity
