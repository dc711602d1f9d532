// Activation statistics on the GPU for tensors that live in device memory,
// read in place: the difference sums of CompareActivations and the per-chunk
// figures behind DistributionAccumulator::Add (activation_stats.h).
//
// Input domain: rows x width activations (positions x hidden), float32,
// float16 or bfloat16, each side its own dtype. Same semantics as the CPU
// kernels (activation_stats-inl.h): entries NaN or +-inf on either side are
// left out of the difference sums and counted per side; every sum
// accumulates in float64 with each float promoted first (products of two
// floats are exact, the difference b - a is taken in float64); moments are
// computed per chunk of kActivationChunk elements of a row (a mean, then
// central sums) and merged on the host in row and chunk order with the CPU's
// Moments::Merge, so a block's moments differ from the CPU's only by the
// summation order inside a chunk. Counts, extremes, the per-channel max |x|
// and the |x| histogram are exact, so they equal the CPU's.
//
// Layout: one block of kThreads threads per row (differences) or per chunk
// of a row (distribution); thread t takes elements t, t + kThreads, ...
// (each warp's loads contiguous), and the threads' partials are reduced in
// BlockReduce's fixed tree, so results are deterministic. Histogram counts
// are added with one atomic per distinct bin and warp (__match_any_sync), the
// per-channel max with an integer atomicMax on the bits of |x| (the order of
// non-negative floats).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "logitparity/activation_stats.h"
#include "logitparity/cuda.h"
#include "logitparity/rows.h"
#include "src/cuda/cuda_common.cuh"

namespace logitparity {
namespace {

using namespace cuda_internal;  // NOLINT: the shared kernel helpers

constexpr int kChunkThreads = static_cast<int>(kActivationChunk) / kThreads;  // elements per thread
static_assert(kActivationChunk % kThreads == 0, "a chunk is whole steps of the block");

struct DMaxOp {
  __device__ double operator()(double x, double y) const { return fmax(x, y); }
};
struct FMinOp {
  __device__ float operator()(float x, float y) const { return fminf(x, y); }
};

__device__ __forceinline__ bool Finite(float x) { return fabsf(x) < Inf(); }

// Per row: dot, ref_sq, cand_sq, diff_sq, max_abs, then count, nonfinite_ref,
// nonfinite_cand as doubles (exact: a row has fewer than 2^31 entries).
constexpr int kDiffOut = 8;

template <typename TA, typename TB>
__global__ void __launch_bounds__(kThreads)
    DiffRowsKernel(const TA* __restrict__ a_base, size_t a_stride, const TB* __restrict__ b_base,
                   size_t b_stride, size_t n, double* __restrict__ out) {
  __shared__ double dsums[(kWarps + 1) * 4];
  __shared__ double dmax[kWarps + 1];
  __shared__ unsigned long long counts[(kWarps + 1) * 3];
  const size_t row = blockIdx.x;
  const TA* a = a_base + row * a_stride;
  const TB* b = b_base + row * b_stride;
  double sums[4] = {0, 0, 0, 0};  // dot, ref_sq, cand_sq, diff_sq
  double max_abs = 0;
  unsigned long long c[3] = {0, 0, 0};  // count, nonfinite_ref, nonfinite_cand
  for (size_t i = threadIdx.x; i < n; i += kThreads) {
    const float x = Loader<TA>::One(a, i), y = Loader<TB>::One(b, i);
    const bool fx = Finite(x), fy = Finite(y);
    c[1] += !fx;
    c[2] += !fy;
    if (fx && fy) {
      const double xd = x, yd = y, d = yd - xd;
      sums[0] = fma(xd, yd, sums[0]);
      sums[1] = fma(xd, xd, sums[1]);
      sums[2] = fma(yd, yd, sums[2]);
      sums[3] = fma(d, d, sums[3]);
      max_abs = fmax(max_abs, fabs(d));
      ++c[0];
    }
  }
  BlockReduceN(sums, dsums, AddOp());
  max_abs = BlockReduce(max_abs, dmax, DMaxOp());
  BlockReduceN(c, counts, AddOp());
  if (threadIdx.x == 0) {
    double* o = out + row * kDiffOut;
    o[0] = sums[0];
    o[1] = sums[1];
    o[2] = sums[2];
    o[3] = sums[3];
    o[4] = max_abs;
    o[5] = static_cast<double>(c[0]);
    o[6] = static_cast<double>(c[1]);
    o[7] = static_cast<double>(c[2]);
  }
}

// One chunk (kActivationChunk elements of one row; the row's last chunk may
// be shorter) per block: counts, extremes, the chunk's mean and central sums
// into out[row * chunks + chunk]; |x| of finite entries into the histogram
// and the per-channel max (device arrays, added to / maxed into).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ChunkFiguresKernel(const T* __restrict__ base, size_t stride, size_t n,
                       ChunkFigures* __restrict__ out, unsigned long long* __restrict__ hist,
                       unsigned* __restrict__ channel_max_bits) {
  __shared__ double dscratch[(kWarps + 1) * 3];
  __shared__ float fscratch[kWarps + 1];
  __shared__ unsigned long long cscratch[(kWarps + 1) * 4];
  const size_t row = blockIdx.y, chunk = blockIdx.x;
  const T* x = base + row * stride;
  const size_t begin = chunk * kActivationChunk;
  const int lane = threadIdx.x % 32;
  float v[kChunkThreads];
  bool fin[kChunkThreads];
  unsigned long long c[4] = {0, 0, 0, 0};  // finite, zeros, nans, infs
  float lo = Inf(), hi = -Inf();
  double sum = 0;
#pragma unroll
  for (int j = 0; j < kChunkThreads; ++j) {
    const size_t i = begin + threadIdx.x + static_cast<size_t>(j) * kThreads;
    const bool valid = i < n;
    v[j] = valid ? Loader<T>::One(x, i) : 0.0f;
    fin[j] = valid && Finite(v[j]);
    c[0] += fin[j];
    c[1] += valid && v[j] == 0.0f;
    c[2] += valid && v[j] != v[j];
    c[3] += valid && fabsf(v[j]) == Inf();
    if (fin[j]) {
      lo = fminf(lo, v[j]);
      hi = fmaxf(hi, v[j]);
      sum += static_cast<double>(v[j]);
    }
    const float av = fabsf(v[j]);
    if (fin[j]) atomicMax(channel_max_bits + i, __float_as_uint(av));
    // The histogram bin is the top bits of |x| (exponent and
    // kAbsHistMantissaBits mantissa bits), as on the CPU; one atomic per
    // distinct bin among the warp's lanes.
    const unsigned bin = fin[j] ? __float_as_uint(av) >> (23 - kAbsHistMantissaBits)
                                : static_cast<unsigned>(kAbsHistBins);
    const unsigned peers = __match_any_sync(kFull, bin);
    if (bin < kAbsHistBins && lane == __ffs(peers) - 1) {
      atomicAdd(hist + bin, static_cast<unsigned long long>(__popc(peers)));
    }
  }
  BlockReduceN(c, cscratch, AddOp());
  sum = BlockReduce(sum, dscratch, AddOp());
  lo = BlockReduce(lo, fscratch, FMinOp());
  hi = BlockReduce(hi, fscratch, MaxOp());
  const double mean = c[0] > 0 ? sum / static_cast<double>(c[0]) : 0.0;
  // Central sums; non-finite entries and pads have weight 0.
  double m[3] = {0, 0, 0};
#pragma unroll
  for (int j = 0; j < kChunkThreads; ++j) {
    if (fin[j]) {
      const double d = static_cast<double>(v[j]) - mean, d2 = d * d;
      m[0] += d2;
      m[1] = fma(d2, d, m[1]);
      m[2] = fma(d2, d2, m[2]);
    }
  }
  BlockReduceN(m, dscratch, AddOp());
  if (threadIdx.x == 0) {
    ChunkFigures& f = out[row * gridDim.x + chunk];
    f.n = c[0];
    f.zeros = c[1];
    f.nans = c[2];
    f.infs = c[3];
    f.mean = c[0] > 0 ? mean : 0.0;
    f.m2 = c[0] > 0 ? m[0] : 0.0;
    f.m3 = c[0] > 0 ? m[1] : 0.0;
    f.m4 = c[0] > 0 ? m[2] : 0.0;
    f.min = lo;
    f.max = hi;
  }
}

// Checks of every entry point; returns the device holding the view.
int CheckActivationsCuda(const RowsView& x, const char* name) {
  CheckRows(x, name);
  if (x.vocab > static_cast<size_t>(std::numeric_limits<int>::max()) ||
      x.rows > static_cast<size_t>(std::numeric_limits<int>::max())) {
    throw std::invalid_argument(std::string(name) +
                                ": rows and width must be below 2^31 for the CUDA kernels, got " +
                                std::to_string(x.rows) + " x " + std::to_string(x.vocab));
  }
  RequireCudaDevice();
  return DeviceOf(x.data, name);
}

template <typename TA>
void LaunchDiff(const RowsView& a, const RowsView& b, double* out, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(a.rows);
  const TA* pa = static_cast<const TA*>(a.data);
  switch (b.dtype) {
    case Dtype::kF32:
      DiffRowsKernel<TA, float><<<grid, kThreads, 0, stream>>>(
          pa, a.row_stride, static_cast<const float*>(b.data), b.row_stride, a.vocab, out);
      break;
    case Dtype::kF16:
      DiffRowsKernel<TA, __half><<<grid, kThreads, 0, stream>>>(
          pa, a.row_stride, static_cast<const __half*>(b.data), b.row_stride, a.vocab, out);
      break;
    case Dtype::kBF16:
      DiffRowsKernel<TA, Bf16><<<grid, kThreads, 0, stream>>>(
          pa, a.row_stride, static_cast<const Bf16*>(b.data), b.row_stride, a.vocab, out);
      break;
  }
}

}  // namespace

DiffSums CompareActivationsCuda(const RowsView& ref, const RowsView& cand, DiffSums* per_row,
                                uintptr_t handle) {
  CheckActivationShapes(ref, cand);
  const int device = CheckActivationsCuda(ref, "reference");
  if (CheckActivationsCuda(cand, "candidate") != device) {
    throw std::invalid_argument("reference and candidate activations must be on the same CUDA "
                                "device, got cuda:" + std::to_string(device) + " and cuda:" +
                                std::to_string(DeviceOf(cand.data, "candidate")) +
                                "; move one with .to(other.device)");
  }
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(handle);
  const size_t bytes = ref.rows * kDiffOut * sizeof(double);
  std::vector<double> host(ref.rows * kDiffOut);
  {
    std::lock_guard<std::mutex> lock(ScratchMutex());
    double* dev = static_cast<double*>(DeviceScratch(device, bytes));
    switch (ref.dtype) {
      case Dtype::kF32: LaunchDiff<float>(ref, cand, dev, stream); break;
      case Dtype::kF16: LaunchDiff<__half>(ref, cand, dev, stream); break;
      case Dtype::kBF16: LaunchDiff<Bf16>(ref, cand, dev, stream); break;
    }
    cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) {
      err = cudaMemcpyAsync(host.data(), dev, bytes, cudaMemcpyDeviceToHost, stream);
    }
    if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
    Check(err, "CompareActivationsCuda");
  }
  DiffSums merged;
  for (size_t r = 0; r < ref.rows; ++r) {
    const double* o = host.data() + r * kDiffOut;
    DiffSums& s = per_row[r];
    s.dot = o[0];
    s.ref_sq = o[1];
    s.cand_sq = o[2];
    s.diff_sq = o[3];
    s.max_abs = o[4];
    s.count = static_cast<uint64_t>(o[5]);
    s.nonfinite_ref = static_cast<uint64_t>(o[6]);
    s.nonfinite_cand = static_cast<uint64_t>(o[7]);
    merged.Merge(s);  // in row order, as the CPU does
  }
  return merged;
}

void ChunkFiguresCuda(const RowsView& block, ChunkFigures* chunks, uint64_t* hist,
                      float* channel_max, uintptr_t handle) {
  const int device = CheckActivationsCuda(block, "block");
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(handle);
  const size_t per_row = (block.vocab + kActivationChunk - 1) / kActivationChunk;
  const size_t chunk_bytes = block.rows * per_row * sizeof(ChunkFigures);
  const size_t hist_bytes = kAbsHistBins * sizeof(unsigned long long);
  const size_t max_bytes = block.vocab * sizeof(unsigned);
  // [hist | chunk figures | channel max bits], 8-byte items first.
  std::lock_guard<std::mutex> lock(ScratchMutex());
  char* dev = static_cast<char*>(DeviceScratch(device, hist_bytes + chunk_bytes + max_bytes));
  auto* d_hist = reinterpret_cast<unsigned long long*>(dev);
  auto* d_chunks = reinterpret_cast<ChunkFigures*>(dev + hist_bytes);
  auto* d_max = reinterpret_cast<unsigned*>(dev + hist_bytes + chunk_bytes);
  cudaError_t err = cudaMemsetAsync(d_hist, 0, hist_bytes, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(d_max, 0, max_bytes, stream);
  if (err == cudaSuccess) {
    const dim3 grid(static_cast<unsigned>(per_row), static_cast<unsigned>(block.rows));
    switch (block.dtype) {
      case Dtype::kF32:
        ChunkFiguresKernel<float><<<grid, kThreads, 0, stream>>>(
            static_cast<const float*>(block.data), block.row_stride, block.vocab, d_chunks, d_hist,
            d_max);
        break;
      case Dtype::kF16:
        ChunkFiguresKernel<__half><<<grid, kThreads, 0, stream>>>(
            static_cast<const __half*>(block.data), block.row_stride, block.vocab, d_chunks,
            d_hist, d_max);
        break;
      case Dtype::kBF16:
        ChunkFiguresKernel<Bf16><<<grid, kThreads, 0, stream>>>(
            static_cast<const Bf16*>(block.data), block.row_stride, block.vocab, d_chunks, d_hist,
            d_max);
        break;
    }
    err = cudaGetLastError();
  }
  std::vector<unsigned long long> h(kAbsHistBins);
  std::vector<unsigned> m(block.vocab);
  if (err == cudaSuccess) {
    err = cudaMemcpyAsync(chunks, d_chunks, chunk_bytes, cudaMemcpyDeviceToHost, stream);
  }
  if (err == cudaSuccess) {
    err = cudaMemcpyAsync(h.data(), d_hist, hist_bytes, cudaMemcpyDeviceToHost, stream);
  }
  if (err == cudaSuccess) {
    err = cudaMemcpyAsync(m.data(), d_max, max_bytes, cudaMemcpyDeviceToHost, stream);
  }
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  Check(err, "ChunkFiguresCuda");
  for (size_t i = 0; i < kAbsHistBins; ++i) hist[i] = h[i];
  for (size_t c = 0; c < block.vocab; ++c) {
    float f;
    std::memcpy(&f, &m[c], sizeof(f));
    channel_max[c] = f;
  }
}

}  // namespace logitparity
