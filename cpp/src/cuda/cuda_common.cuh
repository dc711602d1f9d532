// Device and host helpers shared by the CUDA kernels of the core
// (row_metrics_cuda.cu, rows_cuda.cu): element loaders for float32, float16
// and bfloat16 rows, the per-warp top-k list, fixed-tree block reductions, and
// the host-side error, device and scratch-buffer helpers. Every kernel uses
// blocks of at most kThreads threads, a multiple of 32 (the row kernel picks
// 128 or 256 by the row count), one block per row.
#ifndef LOGITPARITY_SRC_CUDA_CUDA_COMMON_CUH_
#define LOGITPARITY_SRC_CUDA_CUDA_COMMON_CUH_

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "logitparity/cuda.h"

namespace logitparity {
namespace cuda_internal {

constexpr int kThreads = 256;  // the largest block; scratch arrays are sized for it
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xFFFFFFFFu;

__device__ __forceinline__ float Inf() { return __int_as_float(0x7F800000); }

template <typename T>
struct Loader;

struct Bf16;
template <typename T>
struct IsBf16 {
  static constexpr bool value = false;
};
template <>
struct IsBf16<Bf16> {
  static constexpr bool value = true;
};

template <>
struct Loader<float> {
  static constexpr int kAlign = 16;
  __device__ static float One(const float* p, size_t i) { return __ldg(p + i); }
  __device__ static void Vec(const float* p, size_t i, float* out) {
    const float4 x = __ldg(reinterpret_cast<const float4*>(p + i));
    out[0] = x.x;
    out[1] = x.y;
    out[2] = x.z;
    out[3] = x.w;
  }
};

// bfloat16 storage (its bits; converted by shifting into a float). The member
// gives it its 2-byte size, which the row pointer arithmetic relies on.
struct Bf16 {
  unsigned short bits;
};

__device__ __forceinline__ float Bf16ToF32(unsigned short h) {
  return __uint_as_float(static_cast<unsigned>(h) << 16);
}

// Four consecutive 16-bit values (8 bytes, read as two words) to floats.
__device__ __forceinline__ void UnpackHalf4(unsigned x, unsigned y, float* out) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(x)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(x >> 16)));
  out[2] = __half2float(__ushort_as_half(static_cast<unsigned short>(y)));
  out[3] = __half2float(__ushort_as_half(static_cast<unsigned short>(y >> 16)));
}
__device__ __forceinline__ void UnpackBf16x4(unsigned x, unsigned y, float* out) {
  out[0] = __uint_as_float(x << 16);
  out[1] = __uint_as_float(x & 0xFFFF0000u);
  out[2] = __uint_as_float(y << 16);
  out[3] = __uint_as_float(y & 0xFFFF0000u);
}

template <>
struct Loader<__half> {
  static constexpr int kAlign = 8;
  __device__ static float One(const __half* p, size_t i) { return __half2float(p[i]); }
  __device__ static void Vec(const __half* p, size_t i, float* out) {
    const uint2 x = __ldg(reinterpret_cast<const uint2*>(p + i));
    UnpackHalf4(x.x, x.y, out);
  }
};

template <>
struct Loader<Bf16> {
  static constexpr int kAlign = 8;
  __device__ static float One(const Bf16* p, size_t i) {
    return Bf16ToF32(__ldg(reinterpret_cast<const unsigned short*>(p) + i));
  }
  __device__ static void Vec(const Bf16* p, size_t i, float* out) {
    const uint2 x = __ldg(reinterpret_cast<const uint2*>(p + i));
    UnpackBf16x4(x.x, x.y, out);
  }
};

// Four consecutive elements from i0 (one vector load where the row is
// aligned and they lie inside it); past the row's end they read as -inf
// (neutral for every sum; the top-k offers check the index). Used by
// rows_cuda.cu's sweep (size_t indices) and the row kernel's top-k reread
// (32-bit indices: vocab < 2^31 is checked on the host; 64-bit bounds there
// made the row kernel 280 SASS instructions and 12 local accesses longer).
template <typename T, typename Index>
__device__ __forceinline__ void Load4(const T* row, Index i0, Index n, bool aligned, float* out) {
  if (aligned && i0 + 4 <= n) {
    Loader<T>::Vec(row, i0, out);
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c) out[c] = i0 + c < n ? Loader<T>::One(row, i0 + c) : -Inf();
  }
}

// (v, i) ranks before (w, j): larger value, or equal value and lower index.
__device__ __forceinline__ bool Better(float v, int i, float w, int j) {
  return v > w || (v == w && i < j);
}

// The top-k state of one warp for one side: a shared buffer, its fill count
// and the current k-th entry (the admission threshold), all warp-uniform.
// A warp's k-th entry is a valid admission bound for its own offers: an
// element below it has k better ones in the list, so it is not in the row's
// top k. For rows without NaN (whose results are NaN anyway). (The row
// kernel's warps once shared the best of their thresholds through a key in
// shared memory, refreshed before each offer; it now offers only the
// elements that can be in the top k, after its sweep: RescanTopK.)
template <int kCap>
struct WarpTopK {
  static constexpr int kPerLane = kCap / 32;
  // After a compaction the list holds k entries and the next ballot adds up
  // to 32: k <= kCap - 32 keeps every append inside the buffer.
  static constexpr int kMaxK = kCap - 32;
  float* v;
  int* i;
  int count;
  float tau_v;
  int tau_i;

  __device__ void Init(float* vs, int* is) {
    v = vs;
    i = is;
    count = 0;
    tau_v = -Inf();
    tau_i = 0x7FFFFFFF;
  }

  // Keeps the best k of the buffer, sorted, at its start. Out of line: it
  // runs a few times per row, and inlined at every offer it bloated the main
  // loop past the instruction cache (measured 10x slower). Ranks are counted
  // over the filled slots only (two per lane while at most 64 wait, three
  // up to 96).
  __device__ __noinline__ void Compact(int k, int lane) {
    if (count <= 64) {
      CompactUpTo<2>(k, lane);
    } else if (count <= 96) {
      CompactUpTo<3>(k, lane);
    } else {
      CompactUpTo<kPerLane>(k, lane);
    }
  }

  template <int kU>
  __device__ __forceinline__ void CompactUpTo(int k, int lane) {
    __syncwarp();
    float ev[kU];
    int ei[kU], er[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int e = lane + 32 * u;
      ev[u] = e < count ? v[e] : 0.0f;
      ei[u] = e < count ? i[e] : 0;
      er[u] = 0;
    }
    for (int f = 0; f < count; ++f) {
      const float fv = v[f];
      const int fi = i[f];
#pragma unroll
      for (int u = 0; u < kU; ++u) er[u] += Better(fv, fi, ev[u], ei[u]);
    }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (lane + 32 * u < count && er[u] < k) {
        v[er[u]] = ev[u];
        i[er[u]] = ei[u];
      }
    }
    __syncwarp();
    count = min(count, k);
    // The new k-th entry (the list's own only improves).
    if (count == k && Better(v[k - 1], i[k - 1], tau_v, tau_i)) {
      tau_v = v[k - 1];
      tau_i = i[k - 1];
    }
  }

  // Every lane offers (x, idx) if `valid`; all lanes of the warp must call.
  __device__ __forceinline__ void Offer(float x, int idx, bool valid, int k, int lane) {
    const bool pass = valid && Better(x, idx, tau_v, tau_i);
    const unsigned m = __ballot_sync(kFull, pass);
    if (m == 0) return;
    if (pass) {
      const int pos = count + __popc(m & ((1u << lane) - 1u));
      v[pos] = x;
      i[pos] = idx;
    }
    count += __popc(m);
    // Compacting once k + max(16, 3k/2) entries wait, not only when the
    // buffer is nearly full, keeps the admission threshold (the k-th entry)
    // fresh: with a stale one, every entry above the k-th of what was seen at
    // the last compaction is appended, and on the H200 (512 x 151936, k = 10)
    // the offers then took more instructions than the row's arithmetic.
    // Fewer waiting entries mean more (cheaper) compactions: about 1.5 k
    // balances the two (a cost model of appends and rank counting).
    if (count > min(kCap - 32, k + max(16, 3 * k / 2))) Compact(k, lane);
  }
};

// Float64 sums of one side's softmax weights w = exp(x - M): s = sum w,

// Deterministic block reductions through shared memory (fixed tree): warp
// shuffles, then thread 0 folds the warps' partials in order. Every thread
// of the block must call; all get the result. W: the block's warps (a
// constant: read from blockDim, the row kernel's loop spilled registers).
template <int W = kWarps, typename T, typename Op>
__device__ __forceinline__ T BlockReduce(T x, T* scratch, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_down_sync(kFull, x, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    T total = scratch[0];
    for (int w = 1; w < W; ++w) total = op(total, scratch[w]);
    scratch[W] = total;
  }
  __syncthreads();
  return scratch[W];
}

// The steps of a block reduction of N values per thread, each value in
// BlockReduce's fixed tree: warp shuffles, lane 0 stores its warp's partials
// (scratch: (W + 1) * N elements), thread j folds value j's partials in
// warp order into slot W, every thread reads the totals back.
template <int N, typename T, typename Op>
__device__ __forceinline__ void WarpReduceN(T (&x)[N], Op op) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x[j] = op(x[j], __shfl_down_sync(kFull, x[j], o));
  }
}

template <int N, typename T>
__device__ __forceinline__ void StoreWarpPartials(const T (&x)[N], T* scratch, int warp) {
#pragma unroll
  for (int j = 0; j < N; ++j) scratch[warp * N + j] = x[j];
}

template <int N, int W, typename T, typename Op>
__device__ __forceinline__ void FoldWarpPartials(T* scratch, int j, Op op) {
  T total = scratch[j];
  for (int w = 1; w < W; ++w) total = op(total, scratch[w * N + j]);
  scratch[W * N + j] = total;
}

template <int W, int N, typename T>
__device__ __forceinline__ void LoadBlockTotals(T (&x)[N], const T* scratch) {
#pragma unroll
  for (int j = 0; j < N; ++j) x[j] = scratch[W * N + j];
}

// N values per thread reduced over the block in one pass (three barriers
// instead of 3 N), each in BlockReduce's fixed tree: the results are bitwise
// those of N BlockReduce calls. scratch: (W + 1) * N elements.
template <int W = kWarps, int N, typename T, typename Op>
__device__ __forceinline__ void BlockReduceN(T (&x)[N], T* scratch, Op op) {
  WarpReduceN(x, op);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) StoreWarpPartials(x, scratch, warp);
  __syncthreads();
  if (threadIdx.x < N) FoldWarpPartials<N, W>(scratch, threadIdx.x, op);
  __syncthreads();
  LoadBlockTotals<W>(x, scratch);
}

// BlockReduceN of three arrays, each with its own operation and scratch, in
// one pass (three barriers instead of nine): results bitwise those of three
// BlockReduceN calls.
template <int W = kWarps, int N1, int N2, int N3, typename T1, typename T2, typename T3, typename Op1,
          typename Op2, typename Op3>
__device__ __forceinline__ void BlockReduceN3(T1 (&x1)[N1], T1* s1, Op1 op1, T2 (&x2)[N2], T2* s2,
                                              Op2 op2, T3 (&x3)[N3], T3* s3, Op3 op3) {
  WarpReduceN(x1, op1);
  WarpReduceN(x2, op2);
  WarpReduceN(x3, op3);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    StoreWarpPartials(x1, s1, warp);
    StoreWarpPartials(x2, s2, warp);
    StoreWarpPartials(x3, s3, warp);
  }
  __syncthreads();
  const int t = threadIdx.x;
  if (t < N1) {
    FoldWarpPartials<N1, W>(s1, t, op1);
  } else if (t < N1 + N2) {
    FoldWarpPartials<N2, W>(s2, t - N1, op2);
  } else if (t < N1 + N2 + N3) {
    FoldWarpPartials<N3, W>(s3, t - N1 - N2, op3);
  }
  __syncthreads();
  LoadBlockTotals<W>(x1, s1);
  LoadBlockTotals<W>(x2, s2);
  LoadBlockTotals<W>(x3, s3);
}

struct AddOp {
  template <typename T>
  __device__ T operator()(T x, T y) const { return x + y; }
};
struct MaxOp {
  __device__ float operator()(float x, float y) const { return fmaxf(x, y); }
};

template <int W = kWarps>
__device__ inline double BlockSum(double x, double* scratch) {
  return BlockReduce<W>(x, scratch, AddOp());
}
__device__ inline float BlockMax(float x, float* scratch) {
  return BlockReduce(x, scratch, MaxOp());
}
__device__ inline float BlockMin(float x, float* scratch) { return -BlockMax(-x, scratch); }
template <int W = kWarps>
__device__ inline unsigned long long BlockCount(unsigned long long x, unsigned long long* scratch) {
  return BlockReduce<W>(x, scratch, AddOp());
}

// --- host side ---

inline void Check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

// Every entry point's first CUDA check: std::runtime_error when no device is
// usable (no GPU, or no driver).
inline void RequireCudaDevice() {
  if (CudaDeviceCount() == 0) {
    throw std::runtime_error("no CUDA device is usable (no GPU or no driver)");
  }
}

// The device that holds `ptr`; std::invalid_argument for host memory.
inline int DeviceOf(const void* ptr, const char* name) {
  cudaPointerAttributes attr;
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    throw std::invalid_argument(std::string(name) + " is not a CUDA device pointer (" +
                                cudaGetErrorString(err) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    throw std::invalid_argument(std::string(name) +
                                " is host memory, not device memory; pass a CUDA array or use "
                                "the CPU kernels");
  }
  return attr.device;
}

// Restores the calling thread's current device on exit.
struct DeviceGuard {
  int saved = -1;
  explicit DeviceGuard(int device) {
    Check(cudaGetDevice(&saved), "cudaGetDevice");
    if (saved != device) Check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != saved && saved >= 0) cudaSetDevice(saved);
  }
};

// One mutex for the scratch buffers of every kernel entry point.
inline std::mutex& ScratchMutex() {
  static std::mutex mu;
  return mu;
}

// `device`'s entry of a per-device table (value-initialized when new), the
// table grown to hold it; the caller serializes access (ScratchMutex).
template <typename T>
T& DeviceSlot(std::vector<T>& table, int device) {
  if (table.size() <= static_cast<size_t>(device)) table.resize(device + 1, T{});
  return table[device];
}

// At least `bytes` of device memory on `device` (current), kept between
// calls; call with ScratchMutex held.
inline void* DeviceScratch(int device, size_t bytes) {
  static std::vector<std::pair<void*, size_t>> buffers;
  auto& buf = DeviceSlot(buffers, device);
  if (buf.second < bytes) {
    if (buf.first) Check(cudaFree(buf.first), "cudaFree");
    buf = {nullptr, 0};
    const size_t size = std::max<size_t>(bytes, size_t{1} << 20);
    Check(cudaMalloc(&buf.first, size), "cudaMalloc");
    buf.second = size;
  }
  return buf.first;
}

}  // namespace cuda_internal
}  // namespace logitparity

#endif  // LOGITPARITY_SRC_CUDA_CUDA_COMMON_CUH_
