// The fused row comparison on the GPU: every field of CompareRows for rows
// that live in device memory, read in place.
//
// Input domain: raw logits, one reference row a and one candidate row b of
// length n per row index, each side float32, float16 or bfloat16. Units:
// nats. Same definitions and exact semantics as the CPU kernel
// (row_metrics-inl.h) and as CompareRowRef: -inf is a masked token, NaN or
// +inf anywhere makes the row's fields NaN with the counts saying why, a
// token masked on one side only gives KL = +inf, ties go to the lower index.
// Tolerances against CompareRowRef: row_metrics_cuda_test.cc (the CPU test's
// table, unchanged).
//
// Layout: one block per row pair, of 256 threads, or of 128 for calls of more
// rows than two such blocks per multiprocessor take (CompareRowsBlockThreads
// in cuda.h: then four per multiprocessor), one sweep over the row (two with
// js). Each thread takes a group of kGroup elements per side and
// step (vectors of 4 consecutive elements, laid out so that each warp's load
// covers one span: ElemIndex), copied ahead into shared memory by a cp.async
// pipeline (kStages), and keeps its own running maxima (online softmax in registers: when a group raises a
// thread's maximum, that thread's sums are rescaled by exp(M_old - M_new), as
// RaiseMax does on the CPU). Terms are summed in float32 over one group and
// then added to float64 accumulators, like the CPU's float32 block sums. At
// the end the threads' sums are brought to the block maxima and reduced in a
// fixed tree, so results are deterministic for a given input (and, as the
// block size sets the tree, for a given row count).
//
// KL uses the CPU kernel's form (see row_metrics-inl.h): e_i = a_i - b_i - c0
// with a shift c0 taken from the first 4096-element chunk where both sides
// have a finite maximum, KL(P||Q) = E_p[e] + log1p(E_p[g(e)] - E_p[e]), which
// stays accurate to a relative 1e-4 for KL down to 1e-10 (close rows).
//
// Top-k (k <= 64, with top-2 for the margins) after the sweep: each thread
// keeps its own maxima, and the row's top k are among the elements at least
// the k-th largest of those (RescanTopK), which only about k threads hold,
// mostly in the one group where each reached its maximum, which the sweep
// keeps in shared memory. Those groups (or those threads' whole shares, read
// again from the row) are appended to per-warp
// shared-memory buffers with a ballot (a warp keeps its best k by rank
// counting when its buffer fills), and all threads merge the warps' sorted
// lists by rank counting (MergeTopLists).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "logitparity/cuda.h"
#include "logitparity/row_metrics.h"
#include "logitparity/rows.h"
#include "src/cuda/cuda_common.cuh"

namespace logitparity {
namespace {

using namespace cuda_internal;  // NOLINT: the shared kernel helpers
// Elements per thread, step and side: two vector loads per side in flight
// per thread (16 elements needed more than the 128 registers that two blocks
// per multiprocessor allow, and spilled).
constexpr int kGroup = 8;
// Per-warp top-k candidate buffer: the kept list (<= 64) plus room for at
// least two full ballots before a compaction.
constexpr int kCap = 192;
using RowTopK = WarpTopK<kCap>;


// e^x for -2.3e38 < x <= 0 (max-subtracted, finite): MUFU.EX2 on
// y = x log2 e rounded to float, times 1 + c with c = x - y ln 2, the part of
// x that y left out (e^x = 2^y e^c; |c| is below half an ulp of y times
// ln 2, so 1 + c is e^c to float precision). c is one FMA on ln 2's float:
// it then exceeds x - y ln 2 by y (ln2_f - ln 2) = 1.9e-9 |y|, so the result
// is 2.75e-9 |x| too large, a bias below float rounding for |x| < 22 (the
// terms beyond weigh e^-22 of the row's largest at most; on the H200 it
// moved the mean entropy of 512 rows by 2.4e-9 relative). 4 instructions:
// a second FMA on the rest of ln 2 removes the bias and costs 3%
// of the kernel's instructions (ncu, 512 x 151936 fp32: 179.6M -> 175.0M
// without it). CUDA's expf takes 10 for the same accuracy (it reduces the
// argument first and uses the same MUFU.EX2). Without the correction
// (exp2f(x log2 e) alone) the rounding of y costs |x| 2^-24 relative, and on
// the device 16-element rows missed delta_p's 1e-6 tolerance (got
// 0.0047530780, want 0.0047529704).
// Below x = -87.3 the result is 0 (ex2.approx.ftz flushes results below
// 2^-126, which no sum of terms that include e^0 = 1 can see); the bound on x
// keeps x log2 e finite. The clean groups call it directly (CleanGroup
// bounds their x), every other caller through ExpNonPositive.
__device__ __forceinline__ float ExpFinite(float x) {
  constexpr float kLog2e = 1.44269502162933349609375f;  // log2 e rounded to float
  constexpr float kLn2 = 0.693147182464599609375f;      // ln 2 rounded to float
  // The _rn intrinsics keep nvcc from reassociating (the same values).
  const float y = __fmul_rn(x, kLog2e);
  const float c = __fmaf_rn(-y, kLn2, x);
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return __fmaf_rn(r, c, r);
}

// e^x for any x <= 0, -inf included: clamped at -200 (e^-200 is 0 in float32
// too), so the products stay finite.
__device__ __forceinline__ float ExpNonPositive(float x) { return ExpFinite(fmaxf(x, -200.0f)); }

// Element layout of a group: kGroup elements per thread and step, read as
// vectors of 4 elements (16 bytes of float32, 8 of a 16-bit type). For
// vector v, lane l of a warp reads elements warp_base + 128 v + 4 l + c,
// c < 4, so that each load instruction of a warp covers one contiguous span
// (512 or 256 bytes); the first version gave each thread 16 consecutive
// elements and ncu counted 54% excess sectors.
constexpr int kVec = 4;
constexpr int kVecs = kGroup / kVec;
constexpr int kWarpSpan = 32 * kGroup;  // elements per warp and step

__device__ __forceinline__ size_t ElemIndex(size_t warp_base, int lane, int j) {
  return warp_base + static_cast<size_t>((j / kVec) * 32 * kVec + lane * kVec + j % kVec);
}

// One thread's group of a step (layout above); beyond n elements read as
// -inf (a token masked on both sides: neutral for every sum; the top-k
// rescan offers only elements below n). `full`: the warp's whole span is
// inside the row and the row is aligned for vector loads. Elements are
// addressed from the span's start with 32-bit offsets (one 64-bit pointer
// per span, not a 64-bit add and compare per element).
template <typename T>
__device__ __forceinline__ void LoadGroup(const T* row, size_t warp_base, int lane, size_t n,
                                          bool full, float* out) {
  const T* span = row + warp_base;
  if (full) {
#pragma unroll
    for (int v = 0; v < kVecs; ++v) Loader<T>::Vec(span, v * 32 * kVec + lane * kVec, out + v * kVec);
  } else {
    // The span's elements inside the row (0 for a span past the row's end).
    const int left = warp_base < n ? static_cast<int>(min(n - warp_base, static_cast<size_t>(kWarpSpan))) : 0;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int o = (j / kVec) * 32 * kVec + lane * kVec + j % kVec;
      out[j] = o < left ? Loader<T>::One(span, o) : -Inf();
    }
  }
}

// Both sides' groups read from the rows, for the main loop's steps outside
// the pipeline (the row's end, misaligned rows). Out of line and returned by
// value: inlined, nvcc computed its addresses ahead of the branch in every
// step of the bf16 kernel's main loop (22 instructions per step).
struct GroupPair {
  float a[kGroup], b[kGroup];
};
template <typename TA, typename TB>
__device__ __noinline__ GroupPair LoadGroupsDirect(const TA* a, const TB* b, size_t wb, int lane,
                                                   size_t n) {
  GroupPair g;
  LoadGroup(a, wb, lane, n, false, g.a);
  LoadGroup(b, wb, lane, n, false, g.b);
  return g;
}

// Main-loop pipeline: each thread copies its own part of the next kStages-1
// steps into shared memory with cp.async (no registers held while the copy
// is in flight) and reads back only what it copied, so no barrier is needed.
// Tried because removing every exp or the cosine sums changed nothing (19% of
// DRAM bandwidth); measured on the H200 it gave 493k -> 569k rows/s at
// 512x151936 fp32, so memory latency was one limit but not the main one
// (docs/gpu.md).
constexpr int kStages = 4;

// What depends on the block's size, kBlock threads (128 or 256, picked per
// call by the row count: CompareRowsBlockThreads). Registers: at 128 per
// thread, 65536 / (128 kBlock) = 512 / kBlock blocks per multiprocessor.
template <int kBlock>
struct BlockShape {
  static constexpr int kWarps = kBlock / 32;
  static constexpr int kMinBlocks = 512 / kBlock;        // per multiprocessor
  static constexpr int kStep = kBlock * kGroup;          // elements per side and step
  static constexpr int kStageBytes = kStep * 4;          // one side, one step, float32 at most
  static constexpr int kPipeBytes = kStages * 2 * kStageBytes;
};
static_assert(kVec == 4, "Load4 reads the reread's vectors");
static_assert(BlockShape<256>::kWarps == kWarps, "the largest block is cuda_common's kThreads");

// The pipeline's stages (dynamic shared memory, kPipeBytes); at namespace
// scope so that the out-of-line far groups can reread a group from its
// stage.
extern __shared__ __align__(16) unsigned char pipe[];
// A byte offset into `pipe`, or none (the group was read from the row).
constexpr unsigned kNoStage = 0xFFFFFFFFu;

// The byte offset of this lane's first vector inside one side's stage of a
// step (the same for every step): the hot loop then adds only the stage base
// and 32-bit element offsets (64-bit index arithmetic was a fifth of the
// loop's instructions).
template <typename T>
__device__ __forceinline__ unsigned LaneStageOffset(int warp, int lane) {
  return static_cast<unsigned>((warp * kWarpSpan + lane * kVec) * sizeof(T));
}

// src: this lane's first element of the step (row + step begin + lane
// offset); dst: its place in the stage (shared address).
template <typename T>
__device__ __forceinline__ void CopyGroupAsync(unsigned dst, const T* src) {
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const unsigned d = dst + static_cast<unsigned>(v * 32 * kVec * sizeof(T));
    if (sizeof(T) == 4) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src + v * 32 * kVec));
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(d), "l"(src + v * 32 * kVec));
    }
  }
}

__device__ __forceinline__ void CommitAsync() { asm volatile("cp.async.commit_group;"); }

template <typename T>
__device__ __forceinline__ void ReadGroupShared(const unsigned char* stage, float* out) {
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const unsigned char* at = stage + v * 32 * kVec * sizeof(T);
    float* o = out + v * kVec;
    if (sizeof(T) == 4) {
      const float4 x = *reinterpret_cast<const float4*>(at);
      o[0] = x.x;
      o[1] = x.y;
      o[2] = x.z;
      o[3] = x.w;
    } else {
      const uint2 x = *reinterpret_cast<const uint2*>(at);
      if (IsBf16<T>::value) {
        UnpackBf16x4(x.x, x.y, o);
      } else {
        UnpackHalf4(x.x, x.y, o);
      }
    }
  }
}

// ReadGroupShared from a shared-space address (ld.shared with a 32-bit
// register operand).
template <typename T>
__device__ __forceinline__ void ReadGroupSharedAt(unsigned at, float* out) {
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const unsigned addr = at + static_cast<unsigned>(v * 32 * kVec * sizeof(T));
    float* o = out + v * kVec;
    if (sizeof(T) == 4) {
      asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                   : "=f"(o[0]), "=f"(o[1]), "=f"(o[2]), "=f"(o[3])
                   : "r"(addr));
    } else {
      unsigned x, y;
      asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(x), "=r"(y) : "r"(addr));
      if (IsBf16<T>::value) {
        UnpackBf16x4(x, y, o);
      } else {
        UnpackHalf4(x, y, o);
      }
    }
  }
}

// A value the compiler takes as unknown, so that it keeps it in a register
// instead of recomputing it where it is used.
__device__ __forceinline__ unsigned Opaque(unsigned x) {
  asm volatile("" : "+r"(x));
  return x;
}

struct Params {
  int ks[kMaxTopK];
  int num_ks;
  int kmax;  // min(n, max(2, ks.back()))
  int js;
};

// t = sum w (x - M), e = sum w e_i, g = sum w g(+-e_i).
struct SideSums {
  double s, t, e, g;
};

// Moves the sums to a larger maximum m (m > M, M finite): what RaiseMax does.
// Rare (a few times per thread and row): out of line.
// Takes and returns values (no address taken: the sums stay in registers).
__device__ __noinline__ SideSums Rescale(SideSums x, double shift /* M - m < 0 */) {
  const double scale = exp(shift);
  x.t = (x.t + shift * x.s) * scale;
  x.s *= scale;
  x.e *= scale;
  x.g *= scale;
  return x;
}

// (1+u) log(1+u) + (1-u) log(1-u), as JsKernel on the CPU.
__device__ __forceinline__ float JsTerm(float u) {
  const float u2 = u * u;
  if (fabsf(u) < 0.25f) {
    float s = 1.0f / 66;
    s = fmaf(s, u2, 1.0f / 45);
    s = fmaf(s, u2, 1.0f / 28);
    s = fmaf(s, u2, 1.0f / 15);
    s = fmaf(s, u2, 1.0f / 6);
    s = fmaf(s, u2, 1.0f);
    return s * u2;
  }
  const float up = 1.0f + u, um = 1.0f - u;
  const float lp = up > 0 ? up * logf(up) : 0.0f;
  const float lm = um > 0 ? um * logf(um) : 0.0f;
  return lp + lm;
}

// g terms for |e| > 1/2 (rows that differ by more than half a logit at this
// token): exp(xa - e) - pa + pa e and exp(xb + e) - pb - pb e. Out of line:
// close rows never take it.
__device__ __noinline__ float2 FarTerms(float e, float xa, float xb, float pa, float pb) {
  const float ea = expf(fminf(fmaxf(xa - e, -104.5f), 80.0f));
  const float eb = expf(fminf(fmaxf(xb + e, -104.5f), 80.0f));
  return make_float2(fmaf(pa, e, ea - pa), fmaf(-pb, e, eb - pb));
}

// The 32 lanes' values sorted over the warp, largest first: lane l returns
// the (l+1)-th largest, ties included (a bitonic network, 15 exchange
// steps; a rank count over the 32 lanes took 260 instructions per call).
__device__ __forceinline__ float WarpSortDescending(float v, int lane) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      const float w = __shfl_xor_sync(kFull, v, stride);
      const bool keep_max = ((lane & stride) == 0) == ((lane & size) == 0 || size == 32);
      v = keep_max ? fmaxf(v, w) : fminf(v, w);
    }
  }
  return v;
}

// The K-th largest (ties included; K <= 64) of the block's kBlock values
// own[0], own[1] (one per thread and side), written to kth[0], kth[1].
// Every thread calls; `sorted` (2 x kBlock floats) is scratch. Each warp
// sorts its 32 values, then each of the first min(K, 32) entries of every
// warp's list is ranked against the other lists (entries of equal value
// ordered by warp, so ranks are distinct), and the entry of rank K - 1 is
// the result.
template <int kW>
__device__ __forceinline__ void BlockKth(const float (&own)[2], int K, float (*sorted)[kW * 32],
                                         float* kth) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int side = 0; side < 2; ++side) sorted[side][warp * 32 + lane] = WarpSortDescending(own[side], lane);
  __syncthreads();
  const int P = min(K, 32), E = kW * P;
  for (int q = threadIdx.x; q < 2 * E; q += kW * 32) {
    const int side = q / E, w = (q % E) / P, pos = q % P;
    const float v = sorted[side][w * 32 + pos];
    int rank = pos;
    for (int w2 = 0; w2 < kW && rank < K; ++w2) {
      if (w2 == w) continue;
      const float* l2 = sorted[side] + w2 * 32;
      for (int p2 = 0; p2 < P && (l2[p2] > v || (l2[p2] == v && w2 < w)); ++p2) ++rank;
    }
    if (rank == K - 1) kth[side] = v;
  }
  __syncthreads();
}

// One round of a side's reread: items base + 32 u + lane, u < kU, of
// `total` (entries x `per` vectors of 4). An entry is a thread with all its
// steps (kWhole: per = kVecs x steps) or one group of a thread (the entry
// holds thread | step << 8; per = kVecs). An item past the total, or an
// element past the row, reads as -inf at index >= n (offered as invalid).
template <int kBlock, int kU, typename T>
struct RescanItems {
  float x[kU][kVec];
  unsigned i0[kU];

  template <bool kWhole>
  __device__ __forceinline__ void Load(const T* row, unsigned n32, bool aligned, const int* entries,
                                       unsigned per, unsigned total, unsigned base, int lane) {
    constexpr int kStep = kBlock * kGroup;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const unsigned item = base + u * 32 + lane;
      i0[u] = n32;
      if (item < total) {
        const unsigned e = static_cast<unsigned>(entries[item / per]), q = item % per;
        const unsigned t = kWhole ? e : e & 0xFFu;
        const unsigned step = kWhole ? q / kVecs : e >> 8;
        i0[u] = step * kStep + (t / 32) * kWarpSpan + (q % kVecs) * 32 * kVec + (t % 32) * kVec;
      }
      Load4(row, i0[u], n32, aligned, x[u]);
    }
  }

  // Offers the elements >= thr (after one vote: most rounds hold none).
  __device__ __forceinline__ void Offer(RowTopK& top, unsigned n32, float thr, int K, int lane) {
    bool any = false;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
#pragma unroll
      for (int c = 0; c < kVec; ++c) any |= i0[u] + c < n32 && x[u][c] >= thr;
    }
    if (!__any_sync(kFull, any)) return;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
#pragma unroll
      for (int c = 0; c < kVec; ++c) {
        const unsigned i = i0[u] + c;
        top.Offer(x[u][c], static_cast<int>(i), i < n32 && x[u][c] >= thr, K, lane);
      }
    }
  }
};

// The entries of a block's top-k reread (RescanTopK), per side: groups
// (thread | step << 8) and whole threads.
template <int kBlock>
struct RescanLists {
  int groups[2][kBlock];
  int whole[2][kBlock];
  int num_groups[2], num_whole[2];
};

template <int kBlock, bool kWhole, typename TA, typename TB>
__device__ __forceinline__ void RescanPass(RowTopK& top_a, RowTopK& top_b, const TA* a, const TB* b,
                                           unsigned n32, bool aligned, float thr_a, float thr_b,
                                           const int* entries_a, const int* entries_b,
                                           unsigned total_a, unsigned total_b, unsigned per,
                                           int K, int lane, int warp) {
  constexpr int kU = 4;
  for (unsigned base = warp * 32 * kU; base < max(total_a, total_b); base += kBlock * kU) {
    RescanItems<kBlock, kU, TA> xa;
    RescanItems<kBlock, kU, TB> xb;
    xa.template Load<kWhole>(a, n32, aligned, entries_a, per, total_a, base, lane);
    xb.template Load<kWhole>(b, n32, aligned, entries_b, per, total_b, base, lane);
    xa.Offer(top_a, n32, thr_a, K, lane);
    xb.Offer(top_b, n32, thr_b, K, lane);
  }
}

// Top-k after the main sweep, both sides. T, the K-th largest of the
// threads' own maxima on a side, is at most the row's K-th largest value
// there (K of its elements, each some thread's largest, are at least T), so
// the row's top K are among its elements of value >= T, which only the
// threads with own maximum >= T hold: about K of them. Each thread also
// knows the step of the group that holds its maximum and the largest maximum
// of its other groups: where that is below T, only that one group is read
// (8 elements; the kernel offers it from the copy the sweep kept in shared
// memory, and this reads it again from the row only where that group did
// not come through the pipeline: the row's end, misaligned rows), else the
// thread's whole share of the row (a second of the top K in another of its
// groups: in about one row in five at K = 10). The whole block rereads (each lane four vectors of 4 per side and round,
// both sides' loads in flight together, one vote per round before any
// offer) and offers to the reading warp's list; the warps' lists are then
// merged. This replaced offers during the sweep (a vote per step, and about
// 17 offers per warp and row, each after a threshold refresh with a bitonic
// k-th), which took a fifth of the kernel's time at 512 x 151936 (ncu on the
// H200: 265.0 us against 211.3 us without them). Rows whose thread maxima
// tie at T in many threads (constant rows; rows with fewer than K finite
// logits, where T is -inf) reread those threads: the whole row at worst.
template <int kBlock, typename TA, typename TB>
__device__ __forceinline__ void RescanTopK(RowTopK& top_a, RowTopK& top_b, const TA* a, const TB* b,
                                           size_t n, bool aligned, const float* thr,
                                           const RescanLists<kBlock>& l, int K, int lane, int warp) {
  constexpr int kStep = kBlock * kGroup;
  const unsigned n32 = static_cast<unsigned>(n);
  RescanPass<kBlock, false>(top_a, top_b, a, b, n32, aligned, thr[0], thr[1], l.groups[0],
                            l.groups[1], l.num_groups[0] * kVecs, l.num_groups[1] * kVecs, kVecs,
                            K, lane, warp);
  const unsigned per = kVecs * ((n32 + kStep - 1) / kStep);  // a thread's vectors
  if (l.num_whole[0] + l.num_whole[1] > 0) {
    RescanPass<kBlock, true>(top_a, top_b, a, b, n32, aligned, thr[0], thr[1], l.whole[0],
                             l.whole[1], l.num_whole[0] * per, l.num_whole[1] * per, per, K, lane,
                             warp);
  }
}

// Float32 sums of one group (kGroup element pairs of one thread) before they
// are added to the float64 accumulators, its extremes of d = a - b over the
// tokens live on both sides (max |d| and the KL's e = d - c0 range follow
// from them), and its counts.
struct GroupSums {
  float abs, d2, x, na, nb, sa, sb, ta, tb, ea, eb, g, h;
  float d_max, d_min;
  unsigned both_masked, a_only, b_only, bad_a, bad_b;

  // Empty: sums and counts 0, d_max = -inf, d_min = +inf.
  __device__ __forceinline__ static GroupSums Zero() {
    return GroupSums{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -Inf(), Inf(), 0, 0, 0, 0, 0};
  }

  // One element's softmax weights pa, pb and their first moments.
  __device__ __forceinline__ void AddWeights(float pa, float pb, float xa, float xb, float e) {
    sa += pa;
    sb += pb;
    ta = fmaf(pa, xa, ta);
    tb = fmaf(pb, xb, tb);
    ea = fmaf(pa, e, ea);
    eb = fmaf(pb, e, eb);
  }
};

// The second-order terms pa g(e), pb g(-e) of one element (see the KL form
// in row_metrics-inl.h) for |e| <= 1/2, with g(e) = e^-e - 1 + e =
// u (Pe(u) - e Po(u)) and g(-e) = u (Pe(u) + e Po(u)), u = e^2, where Pe and
// Po are the even and odd parts of a degree-5 polynomial p(e) for
// g(e) / e^2 = 1/2 - e/6 + e^2/24 - ...: the minimax polynomial on
// [-1/2, 1/2] for relative error (Remez in 40-digit arithmetic, mpmath; its
// largest error is 2.4e-8 relative, below float32 rounding, and since the
// interval is symmetric p(-e) serves g(-e) alike). Evaluated in float32
// with FMAs, u times the bracket is within 2.0e-7 of g(e) over the interval,
// against 1.7e-7 for the Taylor series to e^9 that it replaces (two FMAs
// more per element: 174.7M against 179.6M instructions in the kernel, ncu,
// 512 x 151936 fp32; the rows' mean KL moved by 4.3e-8 relative).
// Returned as u and the two brackets (lo for g(e), hi for g(-e)) so that the
// caller adds pa u lo with one FMA.
struct GSeries {
  float u, lo, hi;
  __device__ __forceinline__ explicit GSeries(float e) {
    u = e * e;
    float pe = 0.001398199736278234f;
    pe = fmaf(pe, u, 0.04166579594178742f);
    pe = fmaf(pe, u, 0.5000000120139716f);
    float po = 0.0001987562958067054f;
    po = fmaf(po, u, 0.008333452171339173f);
    po = fmaf(po, u, 0.1666666545584418f);
    lo = fmaf(-e, po, pe);
    hi = fmaf(e, po, pe);
  }
};

// pa g(e) and pb g(-e) of one element: the series for |e| <= 1/2, else
// FarTerms.
__device__ __forceinline__ void GTerms(float e, float xa, float xb, float pa, float pb, float& gp,
                                       float& gq) {
  if (fabsf(e) <= 0.5f) {
    const GSeries s(e);
    gp = pa * s.u * s.lo;
    gq = pb * s.u * s.hi;
  } else {
    const float2 r = FarTerms(e, xa, xb, pa, pb);
    gp = r.x;
    gq = r.y;
  }
}

// Timing builds only (-DLOGITPARITY_CUDA_ABLATE=bits; results are then
// wrong): 1 skips the top-k rescan, 2 the second-order terms, 4 the cosine
// and absolute-difference sums, 8 the exps. Used to find where the kernel's
// time goes (docs/gpu.md); 0 in every real build.
#ifndef LOGITPARITY_CUDA_ABLATE
#define LOGITPARITY_CUDA_ABLATE 0
#endif
constexpr int kAblate = LOGITPARITY_CUDA_ABLATE;

// Timing builds only (-DLOGITPARITY_CUDA_PHASES=N): thread 0 of every N-th
// block prints its start and end (%globaltimer, ns) and the SM cycles
// (clock64) at each phase of the row's end, for benchmarks/kernel_phases.py
// (printf is slow: with N = 1 the 512-row kernel took 1.27 ms instead of
// 0.24). 0 in every real build.
#ifndef LOGITPARITY_CUDA_PHASES
#define LOGITPARITY_CUDA_PHASES 0
#endif
constexpr bool kPhases = LOGITPARITY_CUDA_PHASES != 0;

enum Phase { kPhStart, kPhFirst, kPhLoop0, kPhLoopLast, kPhKth, kPhFlag, kPhRescan, kPhMerge,
             kPhReduce, kPhEnd, kNumPhases };
__device__ __forceinline__ unsigned long long GlobalNs() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The sums pa g(e), pb g(-e) of a clean group that holds an element with
// |e| > 1/2, where the series does not apply: every element again, reread
// from its pipeline stage (or from the row for groups read directly: the
// row's end, misaligned rows), near ones by the series and far ones by
// pa g(e) = pb K - pa + pa e and pb g(-e) = pa / K - pb - pb e, where
// K = e^(Mb - Ma + c0) makes pb K = pa e^-e and pa / K = pb e^e (no third
// exp per element; K from the float64 difference, to float rounding). For
// |e| > 1/2 the cancellation in that form is at most a factor 11 (at
// e = -1/2: -1.5 + 1.65 = 0.149). Branch-free over the elements (the lanes of
// a far row's warp mix near and far elements): both forms, then a select.
// Where |Mb - Ma + c0| > 80 (a thread's maxima apart by 80 nats more than
// the first chunk's: rows that share nothing) each far term takes its own
// exps instead (FarTerms), whose clamp at e^80 the K form would otherwise
// move.
// Out of line: groups of close rows never call it. Its values are not
// bitwise those of the series path's FMA sums; deterministic all the same.
template <int kBlock, typename TA, typename TB>
__device__ __noinline__ float2 FarGroup(const TA* a, const TB* b, unsigned stage, size_t wb,
                                        int lane, size_t n, float Ma, float Mb, float c0) {
  float va[kGroup], vb[kGroup];
  if (stage != kNoStage) {
    // The lane's offsets in the stage are computed here, not by the caller:
    // there they sat in the clean group's block (16 instructions per step).
    const int warp = threadIdx.x / 32;
    ReadGroupShared<TA>(pipe + stage + LaneStageOffset<TA>(warp, lane), va);
    constexpr unsigned kSideB = BlockShape<kBlock>::kStageBytes;
    ReadGroupShared<TB>(pipe + stage + kSideB + LaneStageOffset<TB>(warp, lane), vb);
  } else {
    LoadGroup(a, wb, lane, n, false, va);
    LoadGroup(b, wb, lane, n, false, vb);
  }
  const double D = static_cast<double>(Mb) - Ma + c0;
  const bool k_form = fabs(D) <= 80.0;
  const float d_hi = static_cast<float>(D), d_lo = static_cast<float>(D - d_hi);
  const float K = k_form ? expf(d_hi) * (1.0f + d_lo) : 0.0f;
  const float K_inv = k_form ? expf(-d_hi) * (1.0f - d_lo) : 0.0f;
  float2 acc = make_float2(0.0f, 0.0f);
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    const float e = va[j] - vb[j] - c0;
    const float xa = va[j] - Ma, xb = vb[j] - Mb;
    const float pa = ExpFinite(xa), pb = ExpFinite(xb);
    const GSeries s(e);  // not taken where far (inf or NaN there: selected away)
    const bool near = fabsf(e) <= 0.5f;
    float gp = fmaf(pb, K, fmaf(pa, e, -pa)), gq = fmaf(pa, K_inv, fmaf(-pb, e, -pb));
    if (!k_form && !near) {
      const float2 r = FarTerms(e, xa, xb, pa, pb);
      gp = r.x;
      gq = r.y;
    }
    acc.x += near ? pa * s.u * s.lo : gp;
    acc.y += near ? pb * s.u * s.hi : gq;
  }
  return acc;
}

// A group with no -inf, NaN, +inf and no element past the row's end (the
// common case): every token is live on both sides, so no masks, and the
// second-order terms take their series without a branch. Computed first and
// checked after (returns false, g then to be discarded, when the group needs
// DirtyGroup): any -inf, NaN or +inf, and any |x| above 1.8e19, makes x^2 and
// so na or nb non-finite, and with the maxima Ma, Mb below 1.8e19 as well
// (the same test on their squares) every x - M lies within ExpFinite's
// range. Elements with |e| > 1/2 (none on close rows) are found from the
// group's extremes of d (rounding is monotonic, so d - c0 of the extreme d
// is the extreme e), and then FarGroup sums the group's second-order terms
// again.
template <int kBlock, typename TA, typename TB>
__device__ __forceinline__ bool CleanGroup(const float* va, const float* vb, float Ma, float Mb,
                                           float c0, const TA* a, const TB* b, unsigned stage,
                                           size_t wb, int lane, size_t n, GroupSums& g) {
  float gs = 0.0f, hs = 0.0f;
  float d_max = va[0] - vb[0], d_min = d_max;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    const float x = va[j], y = vb[j];
    const float d = x - y;
    const float e = d - c0;
    if (j > 0) {
      d_max = fmaxf(d_max, d);
      d_min = fminf(d_min, d);
    }
    g.na = fmaf(x, x, g.na);
    g.nb = fmaf(y, y, g.nb);
    if (!(kAblate & 4)) {
      g.abs += fabsf(d);
      g.d2 = fmaf(d, d, g.d2);
      g.x = fmaf(d, x + y, g.x);
    }
    const float xa = x - Ma, xb = y - Mb;
    const float pa = (kAblate & 8) ? xa : ExpFinite(xa);
    const float pb = (kAblate & 8) ? xb : ExpFinite(xb);
    g.AddWeights(pa, pb, xa, xb, e);
    if (!(kAblate & 2)) {
      const GSeries s(e);
      gs = fmaf(pa * s.u, s.lo, gs);
      hs = fmaf(pb * s.u, s.hi, hs);
    }
  }
  if (!(fmaf(Ma, Ma, fmaf(Mb, Mb, g.na + g.nb)) < Inf())) return false;
  if (!(kAblate & 2) && (d_max - c0 > 0.5f || d_min - c0 < -0.5f)) {
    const float2 r = FarGroup<kBlock>(a, b, stage, wb, lane, n, Ma, Mb, c0);
    gs = r.x;
    hs = r.y;
  }
  g.d_max = d_max;
  g.d_min = d_min;
  g.g = gs;
  g.h = hs;
  return true;
}

// Any other group: masks, NaN / +inf counts and the row's end, element by
// element. Out of line (rare for real logits; every group of a masked row).
template <typename TA, typename TB>
__device__ __noinline__ GroupSums DirtyGroup(const TA* a, const TB* b, float Ma, float Mb,
                                             float c0, size_t warp_base, int lane, size_t n) {
  const float ninf = -Inf(), pinf = Inf();
  GroupSums g = GroupSums::Zero();
  // Reloaded rather than taken from the caller's registers by address (an
  // address taken kept every group's values in local memory: 16 local stores
  // per group in the hot loop).
  float va[kGroup], vb[kGroup];
  LoadGroup(a, warp_base, lane, n, false, va);
  LoadGroup(b, warp_base, lane, n, false, vb);
  for (int j = 0; j < kGroup; ++j) {
    const bool valid = ElemIndex(warp_base, lane, j) < n;
    const float x = va[j], y = vb[j];
    g.bad_a += valid && !(x < pinf);
    g.bad_b += valid && !(y < pinf);
    const bool ma = x == ninf, mb = y == ninf;
    g.both_masked += valid && ma && mb;
    g.a_only += ma && !mb;
    g.b_only += mb && !ma;
    const bool fa = x > ninf, fb = y > ninf, both = fa && fb;
    const float d = x - y;
    const float e = both ? d - c0 : 0.0f;
    if (both) {
      g.d_max = fmaxf(g.d_max, d);
      g.d_min = fminf(g.d_min, d);
    }
    const float absd = both ? fabsf(d) : 0.0f;
    g.abs += absd;
    const float az = both ? x : 0.0f, bz = both ? y : 0.0f, dz = both ? d : 0.0f;
    g.na = fmaf(az, az, g.na);
    g.nb = fmaf(bz, bz, g.nb);
    g.d2 = fmaf(dz, dz, g.d2);
    g.x = fmaf(dz, az + bz, g.x);
    const float xa = fa ? x - Ma : 0.0f, xb = fb ? y - Mb : 0.0f;
    const float pa = fa ? ExpNonPositive(xa) : 0.0f;
    const float pb = fb ? ExpNonPositive(xb) : 0.0f;
    g.AddWeights(pa, pb, xa, xb, e);
    float gp, gq;
    GTerms(e, xa, xb, pa, pb, gp, gq);
    g.g += gp;
    g.h += gq;
  }
  return g;
}

// The per-thread partials that the epilogue reduces over the block, each
// kind in one pass (BlockReduceN): float64 sums, float maxima (minima
// negated), counts.
constexpr int kNumSums = 13, kNumMaxima = 2, kNumCounts = 5;

// A row's results as they go to the host: the fields, the flag of a target
// out of range, then the num_ks overlaps; RecordDataWords(num_ks) 32-bit
// words of it are copied, by one warp in one coalesced store (the results
// live in mapped pinned host memory, so the kernel writes them there: no copy
// after it).
struct RowRecord {
  double fields[kNumRowFields];
  int32_t bad_target;
  int32_t overlap[kMaxTopK];
};
static_assert(offsetof(RowRecord, bad_target) == kNumRowFields * sizeof(double),
              "the record's words: fields, flag, overlaps");
static_assert(offsetof(RowRecord, overlap) == kNumRowFields * sizeof(double) + 4,
              "the record's words: fields, flag, overlaps");

// 32-bit words of a row's record that hold its results (num_ks overlaps).
__host__ __device__ constexpr unsigned RecordDataWords(int num_ks) {
  return 2 * kNumRowFields + 1 + num_ks;
}

// A record's words in the host buffer: rounded up to even, so that every
// record starts 8-byte aligned.
__host__ __device__ constexpr unsigned RecordWords(int num_ks) {
  return (RecordDataWords(num_ks) + 1) / 2 * 2;
}

// Warp 0 copies the row's record (complete in shared memory) to `dst`.
__device__ __forceinline__ void WriteRecord(const RowRecord& rec, unsigned* __restrict__ dst,
                                            int num_ks, int lane) {
  __syncwarp();
  const unsigned* src = reinterpret_cast<const unsigned*>(&rec);
  const unsigned words = RecordDataWords(num_ks);
  for (unsigned w = lane; w < words; w += 32) dst[w] = src[w];
}

template <int kW>  // warps per block
struct Shared {
  // The warps' top-k lists (after the sweep); during the sweep the same
  // memory holds each thread's group that reached its maximum, per side
  // (saved when it came through the pipeline: the top-k then takes it from
  // here instead of rereading it from the row).
  union {
    struct {
      float v[2][kW][kCap];
      int i[2][kW][kCap];
    } top;
    float4 saved[2][kVecs][kW * 32];
  };
  int top_count[2][kW];
  float thread_max[2][kW * 32];    // per side, the threads' own maxima, sorted per warp (BlockKth)
  float kth[2];                    // per side, the K-th largest of the threads' own maxima
  RescanLists<kW * 32> rescan;     // what RescanTopK reads again
  float merged_v[2][kMaxTopK];     // the row's top-k per side, best first
  int merged_i[2][kMaxTopK];
  double dscratch[kW + 1];
  unsigned long long cscratch[kW + 1];
  double dsums[(kW + 1) * kNumSums];
  float fmax[(kW + 1) * kNumMaxima];
  unsigned long long counts[(kW + 1) * kNumCounts];
  long long target;         // the row's target id (-1: none)
  float target_logits[2];   // a[target], b[target] when the target is in range
  RowRecord record;         // the row's results, written to the host by warp 0
};

// Merges the warps' sorted lists of both sides into sh.merged_*: the first
// half of the block ranks the reference's entries, the second half the
// candidate's. An entry's
// rank is the number of entries better than it over all lists (each list
// sorted, so each scan stops at the first entry that is not); indices are
// distinct, so ranks are too, and the entries of rank < K are the row's top
// K. Replaces a merge by one warp per side through the offer buffer, which
// left the other six warps waiting at the barrier (9% of the stall samples).
template <int kW>
__device__ __forceinline__ void MergeTopLists(Shared<kW>& sh, int K) {
  constexpr int kHalf = kW * 16;
  const int side = threadIdx.x / kHalf, t = threadIdx.x % kHalf;
  for (int q = t; q < kW * K; q += kHalf) {
    const int w = q / K, pos = q % K;
    if (pos >= sh.top_count[side][w]) continue;
    const float v = sh.top.v[side][w][pos];
    const int idx = sh.top.i[side][w][pos];
    int rank = pos;  // the entries above it in its own list
    for (int w2 = 0; w2 < kW && rank < K; ++w2) {
      if (w2 == w) continue;
      const int c = sh.top_count[side][w2];
      for (int p2 = 0; p2 < c && Better(sh.top.v[side][w2][p2], sh.top.i[side][w2][p2], v, idx); ++p2) {
        ++rank;
      }
    }
    if (rank < K) {
      sh.merged_v[side][rank] = v;
      sh.merged_i[side][rank] = idx;
    }
  }
  __syncthreads();
}

template <typename TA, typename TB, int kBlock>
__global__ void __launch_bounds__(kBlock, BlockShape<kBlock>::kMinBlocks)
    CompareRowsKernel(const TA* __restrict__ a_base, size_t a_stride, const TB* __restrict__ b_base,
                      size_t b_stride, size_t n, const int64_t* __restrict__ targets, Params p,
                      unsigned* __restrict__ out_records) {
  constexpr int kStep = BlockShape<kBlock>::kStep;
  constexpr int kStageBytes = BlockShape<kBlock>::kStageBytes;
  static_assert(kBlock >= kMaxTopK && kBlock <= kThreads && kBlock % 64 == 0,
                "overlaps take one thread per entry; MergeTopLists a half block per side");
  constexpr int kW = BlockShape<kBlock>::kWarps;
  __shared__ Shared<kW> sh;
  const size_t row = blockIdx.x;
  const TA* a = a_base + row * a_stride;
  const TB* b = b_base + row * b_stride;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const bool aligned = (reinterpret_cast<uintptr_t>(a) % Loader<TA>::kAlign == 0) &&
                       (reinterpret_cast<uintptr_t>(b) % Loader<TB>::kAlign == 0);
  const double kNaN = __longlong_as_double(0x7FF8000000000000LL);
  const double kInfD = __longlong_as_double(0x7FF0000000000000LL);
  const float ninf = -Inf(), pinf = Inf();
  // Seen by every warp after the barriers of the first chunk's maxima below.
  if (tid < 2) sh.rescan.num_groups[tid] = sh.rescan.num_whole[tid] = 0;
#if LOGITPARITY_CUDA_PHASES
  __shared__ long long ph[kNumPhases];
  __shared__ unsigned long long ph_start_ns;
  if (tid == 0) {
    ph_start_ns = GlobalNs();
    ph[kPhStart] = clock64();
    ph[kPhLoopLast] = 0;
  }
#define LP_PHASE(name) \
  if (tid == 0) ph[name] = clock64()
#else
#define LP_PHASE(name)
#endif

  // Element offsets within a row fit in 32 bits (vocab < 2^31 is checked on
  // the host); `piped_steps`: the warp's steps whose span is whole, which go
  // through the pipeline (the rest, the row's end and misaligned rows, are
  // read directly).
  const unsigned n32 = static_cast<unsigned>(n);
  const unsigned lane_elem = static_cast<unsigned>(warp * kWarpSpan + lane * kVec);
  const unsigned warp_elem = static_cast<unsigned>(warp * kWarpSpan);
  const unsigned piped_steps =
      aligned && n32 >= warp_elem + kWarpSpan ? (n32 - warp_elem - kWarpSpan) / kStep + 1 : 0;
  const unsigned pipe_sh = static_cast<unsigned>(__cvta_generic_to_shared(pipe));
  const unsigned off_a = LaneStageOffset<TA>(warp, lane);
  const unsigned off_b = kStageBytes + LaneStageOffset<TB>(warp, lane);
  // This lane's shared addresses in stage 0, computed once and kept in
  // registers: nvcc recomputed the pipeline's shared address (S2R of the
  // CTA's cluster id and three more) in every step, twice.
  const unsigned lane_sh_a = Opaque(pipe_sh + off_a), lane_sh_b = lane_sh_a + (off_b - off_a);
  auto issue = [&](unsigned step) {
    if (step < piped_steps) {
      const unsigned stage = (step % kStages) * 2 * kStageBytes;
      // This lane's element offset in 32 bits (below n), widened once per
      // side with the row pointers that stay live anyway: per-lane row
      // pointers held two more 64-bit registers through the loop, and one
      // was spilled and reloaded every step.
      const unsigned at = lane_elem + step * kStep;
      CopyGroupAsync(lane_sh_a + stage, a + at);
      CopyGroupAsync(lane_sh_b + stage, b + at);
    }
    CommitAsync();  // one group per step, empty or not, so the counts line up
  };
  // A step's groups, from its pipeline stage (`stage`: its byte offset) or,
  // outside the pipeline, from the rows.
  auto read_step = [&](bool piped, unsigned stage, size_t wb, float (&va)[kGroup],
                       float (&vb)[kGroup]) {
    if (piped) {
      ReadGroupSharedAt<TA>(lane_sh_a + stage, va);
      ReadGroupSharedAt<TB>(lane_sh_b + stage, vb);
    } else {
      const GroupPair direct = LoadGroupsDirect(a, b, wb, lane, n);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        va[j] = direct.a[j];
        vb[j] = direct.b[j];
      }
    }
  };
  // The pipeline's first steps are in flight before the first chunk's maxima
  // below, which read step 0 from its stage: the kernel used to read that
  // step from the rows and start the copies only after its barriers, two
  // memory round trips at each block's start instead of one.
  for (int st = 0; st < kStages - 1; ++st) issue(st);

  // The KL shift c0: maxima of the first chunk where both sides have one.
  // The first chunk's maxima also start every thread's running maxima, so
  // that later groups rarely raise them (each raise rescales in float64:
  // seeded with each thread's own first group instead, a warp called the
  // rescale in 47 of its 74 steps at 151936, 8% of the instructions).
  float c0 = 0.0f, Ma = ninf, Mb = ninf;
  for (size_t begin = 0; begin < n; begin += kStep) {
    float va[kGroup], vb[kGroup];
    const size_t wb = begin + static_cast<size_t>(warp) * kWarpSpan;
    if (begin == 0 && piped_steps > 0) {
      asm volatile("cp.async.wait_group %0;" ::"n"(kStages - 2));  // step 0's copy
      ReadGroupSharedAt<TA>(lane_sh_a, va);
      ReadGroupSharedAt<TB>(lane_sh_b, vb);
    } else {
      const bool full = aligned && wb + kWarpSpan <= n;
      LoadGroup(a, wb, lane, n, full, va);
      LoadGroup(b, wb, lane, n, full, vb);
    }
    float ma = ninf, mb = ninf;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      ma = fmaxf(ma, va[j]);
      mb = fmaxf(mb, vb[j]);
    }
    float m2[2] = {ma, mb};
    BlockReduceN<kW>(m2, sh.fmax, MaxOp());
    ma = m2[0];
    mb = m2[1];
    if (begin == 0) {
      Ma = ma;
      Mb = mb;
    }
    if (ma > ninf && mb > ninf) {
      c0 = ma - mb;
      break;
    }
  }

  LP_PHASE(kPhFirst);
  const int K = p.kmax;
  // This thread's own maxima, the step of the group that reached each, and
  // the largest maximum of its other groups (top-k after the sweep:
  // RescanTopK).
  float own_a = ninf, own_b = ninf, other_a = ninf, other_b = ninf;
  unsigned at_a = 0, at_b = 0;

  // The target and its two logits, read now by the last thread (its warp
  // waits for them instead of thread 0 at the row's end, where the block,
  // down to one thread, held its multiprocessor's resources for two memory
  // round trips); used after the main loop's barriers.
  if (tid == kBlock - 1) {
    const long long t = targets != nullptr ? targets[row] : -1;
    sh.target = t;
    if (t >= 0 && t < static_cast<long long>(n)) {
      sh.target_logits[0] = Loader<TA>::One(a, static_cast<size_t>(t));
      sh.target_logits[1] = Loader<TB>::One(b, static_cast<size_t>(t));
    }
  }

  SideSums A{0, 0, 0, 0}, B{0, 0, 0, 0};
  double abs_sum = 0, d2 = 0, xs = 0, na = 0, nb = 0;
  float d_max = ninf, d_min = pinf;  // over the tokens live on both sides
  unsigned both_masked = 0, a_only = 0, b_only = 0, bad_a = 0, bad_b = 0;


  // A warp stops at the first step whose span starts past the row's end
  // (n = 151936: six of the eight warps in the last step), which would only
  // add nothing: an empty group took the clean path, failed its check and
  // then went through DirtyGroup.
  for (unsigned begin = 0, step = 0; begin + warp_elem < n32; begin += kStep, ++step) {
    const size_t wb = begin + warp_elem;
    issue(step + kStages - 1);
    asm volatile("cp.async.wait_group %0;" ::"n"(kStages - 1));
    float va[kGroup], vb[kGroup];
    const bool piped = step < piped_steps;
    const unsigned stage = (step % kStages) * 2 * kStageBytes;
    read_step(piped, stage, wb, va, vb);
    // Group maxima (pads past the row's end read as -inf).
    // (From the first element, not from -inf: an all-NaN group then has a
    // NaN maximum instead of -inf, and both fail every comparison below.)
    float ga = va[0], gb = vb[0];
#pragma unroll
    for (int j = 1; j < kGroup; ++j) {
      ga = fmaxf(ga, va[j]);
      gb = fmaxf(gb, vb[j]);
    }
    other_a = fmaxf(other_a, fminf(own_a, ga));  // a tie goes to the other groups
    other_b = fmaxf(other_b, fminf(own_b, gb));
    if (ga > own_a) {
      at_a = step;
      if (piped) {
#pragma unroll
        for (int v = 0; v < kVecs; ++v) {
          sh.saved[0][v][tid] = make_float4(va[4 * v], va[4 * v + 1], va[4 * v + 2], va[4 * v + 3]);
        }
      }
    }
    if (gb > own_b) {
      at_b = step;
      if (piped) {
#pragma unroll
        for (int v = 0; v < kVecs; ++v) {
          sh.saved[1][v][tid] = make_float4(vb[4 * v], vb[4 * v + 1], vb[4 * v + 2], vb[4 * v + 3]);
        }
      }
    }
    own_a = fmaxf(own_a, ga);
    own_b = fmaxf(own_b, gb);
    if (ga > Ma) {
      if (Ma > ninf) A = Rescale(A, static_cast<double>(Ma) - ga);
      Ma = ga;
    }
    if (gb > Mb) {
      if (Mb > ninf) B = Rescale(B, static_cast<double>(Mb) - gb);
      Mb = gb;
    }
    GroupSums g = GroupSums::Zero();
    if (!CleanGroup<kBlock>(va, vb, Ma, Mb, c0, a, b, piped ? stage : kNoStage, wb, lane, n, g)) {
      g = DirtyGroup(a, b, Ma, Mb, c0, wb, lane, n);
      both_masked += g.both_masked;
      a_only += g.a_only;
      b_only += g.b_only;
      bad_a += g.bad_a;
      bad_b += g.bad_b;
    }
    d_max = fmaxf(d_max, g.d_max);
    d_min = fminf(d_min, g.d_min);
    abs_sum += g.abs;
    d2 += g.d2;
    xs += g.x;
    na += g.na;
    nb += g.nb;
    A.s += g.sa;
    B.s += g.sb;
    A.t += g.ta;
    B.t += g.tb;
    A.e += g.ea;
    B.e += g.eb;
    A.g += g.g;
    B.g += g.h;
  }

  LP_PHASE(kPhLoop0);
#if LOGITPARITY_CUDA_PHASES
  if (lane == 0) atomicMax(reinterpret_cast<unsigned long long*>(&ph[kPhLoopLast]), clock64());
#endif
  // Top-k: the K-th largest of the threads' own maxima per side; the
  // threads that reach it reread their maximum's group (or, where another of
  // their groups reaches it too, their whole share) into the warps' lists;
  // each list sorted, then the lists merged over the block.
  RowTopK top_a, top_b;
  top_a.Init(sh.top.v[0][warp], sh.top.i[0][warp]);
  top_b.Init(sh.top.v[1][warp], sh.top.i[1][warp]);
  if (!(kAblate & 1)) {
    const float own[2] = {own_a, own_b};
    BlockKth<kW>(own, K, sh.thread_max, sh.kth);
    LP_PHASE(kPhKth);
    const float thr[2] = {sh.kth[0], sh.kth[1]}, others[2] = {other_a, other_b};
    const unsigned at[2] = {at_a, at_b};
    // The maximum's group, where the sweep saved it (it came through the
    // pipeline), is offered from shared memory; it is read before the
    // barrier below, after which the lists overwrite it. Every thread reads
    // its slot (no branch); only the flagged ones offer it.
    bool from_saved[2];
    float sv[2][kGroup];
#pragma unroll
    for (int side = 0; side < 2; ++side) {
      from_saved[side] = own[side] >= thr[side] && others[side] < thr[side] && at[side] < piped_steps;
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        const float4 x = sh.saved[side][v][tid];
        sv[side][4 * v] = x.x;
        sv[side][4 * v + 1] = x.y;
        sv[side][4 * v + 2] = x.z;
        sv[side][4 * v + 3] = x.w;
      }
    }
#pragma unroll
    for (int side = 0; side < 2; ++side) {
      if (own[side] >= thr[side] && !from_saved[side]) {
        if (others[side] < thr[side]) {
          sh.rescan.groups[side][atomicAdd(&sh.rescan.num_groups[side], 1)] =
              static_cast<int>(tid | at[side] << 8);
        } else {
          sh.rescan.whole[side][atomicAdd(&sh.rescan.num_whole[side], 1)] = tid;
        }
      }
    }
    __syncthreads();
    LP_PHASE(kPhFlag);
    if (__any_sync(kFull, from_saved[0] || from_saved[1])) {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        const int ia = static_cast<int>(at_a * kStep + ElemIndex(warp_elem, lane, j));
        const int ib = static_cast<int>(at_b * kStep + ElemIndex(warp_elem, lane, j));
        top_a.Offer(sv[0][j], ia, from_saved[0] && sv[0][j] >= thr[0], K, lane);
        top_b.Offer(sv[1][j], ib, from_saved[1] && sv[1][j] >= thr[1], K, lane);
      }
    }
    RescanTopK<kBlock>(top_a, top_b, a, b, n, aligned, sh.kth, sh.rescan, K, lane, warp);
    LP_PHASE(kPhRescan);
  }
  top_a.Compact(K, lane);
  top_b.Compact(K, lane);
  if (lane == 0) {
    sh.top_count[0][warp] = top_a.count;
    sh.top_count[1][warp] = top_b.count;
  }
  __syncthreads();
  MergeTopLists(sh, K);
  LP_PHASE(kPhMerge);

  // Bring every thread's sums to the block maxima, then reduce (one pass per
  // kind, in BlockReduce's fixed tree).
  float row_max[2] = {Ma, Mb};
  BlockReduceN<kW>(row_max, sh.fmax, MaxOp());
  const float Ma_all = row_max[0], Mb_all = row_max[1];
  if (Ma > ninf && Ma < Ma_all) A = Rescale(A, static_cast<double>(Ma) - Ma_all);
  if (Mb > ninf && Mb < Mb_all) B = Rescale(B, static_cast<double>(Mb) - Mb_all);
  double sums[kNumSums] = {A.s, B.s, A.t, B.t, A.e, B.e, A.g, B.g, abs_sum, d2, xs, na, nb};
  float maxima[kNumMaxima] = {d_max, -d_min};
  unsigned long long counts[kNumCounts] = {both_masked, a_only, b_only, bad_a, bad_b};
  BlockReduceN3<kW>(sums, sh.dsums, AddOp(), maxima, sh.fmax, MaxOp(), counts, sh.counts, AddOp());
  LP_PHASE(kPhReduce);
  const double Sa = sums[0], Sb = sums[1], Ta = sums[2], Tb = sums[3];
  const double Ea = sums[4], Eb = sums[5], Ga = sums[6], Gb = sums[7];
  const double abs_all = sums[8], d2_all = sums[9], x_all = sums[10];
  const double na_all = sums[11], nb_all = sums[12];
  // max |d| = max(d_max, -d_min) (0 with no token live on both sides), and
  // the extremes of e = d - c0 are those of d shifted (monotonic rounding).
  const float max_abs_all = fmaxf(0.0f, fmaxf(maxima[0], maxima[1]));
  const float e_hi_f = maxima[0] - c0, e_lo_f = -maxima[1] - c0;
  const unsigned long long both_all = counts[0], aonly_all = counts[1], bonly_all = counts[2];
  const unsigned long long bad_a_all = counts[3], bad_b_all = counts[4];

  double* out = sh.record.fields;
  int32_t* overlap = sh.record.overlap;
  unsigned* record_dst = out_records + row * RecordWords(p.num_ks);
  const float* ta_v = sh.merged_v[0];
  const int* ta_i = sh.merged_i[0];
  const float* tb_v = sh.merged_v[1];
  const int* tb_i = sh.merged_i[1];

  // Targets out of range are reported by the host (the first such row); the
  // row's fields are computed as if it had none.
  const long long target = sh.target;
  const bool target_ok = target >= -1 && target < static_cast<long long>(n);
  if (tid == 0) sh.record.bad_target = target_ok ? 0 : 1;

  if (bad_a_all + bad_b_all > 0) {
    if (warp != 0) return;
    if (tid < kNumRowFields) {
      double v = kNaN;
      if (tid == kNonfiniteRef) v = static_cast<double>(bad_a_all);
      if (tid == kNonfiniteCand) v = static_cast<double>(bad_b_all);
      if (tid == kArgmaxRef || tid == kArgmaxCand || tid == kRankOfRefTop1InCand) v = -1;
      out[tid] = v;
    }
    for (int q = lane; q < p.num_ks; q += 32) overlap[q] = -1;
    WriteRecord(sh.record, record_dst, p.num_ks, lane);
    return;
  }

  const bool dist_a = Ma_all > ninf, dist_b = Mb_all > ninf;
  const double lse_a = dist_a ? Ma_all + log(Sa) : -kInfD;
  const double lse_b = dist_b ? Mb_all + log(Sb) : -kInfD;

  // Jensen-Shannon: a second sweep now that both log-sum-exps are known.
  double js = kNaN;
  if (p.js && dist_a && dist_b) {
    const float inv_sa = static_cast<float>(1.0 / Sa), inv_sb = static_cast<float>(1.0 / Sb);
    double js_sum = 0;
    // Through the main sweep's pipeline again (its copies are all done: each
    // step waited for its own, and the steps past piped_steps copy nothing;
    // each thread rereads only what it copied itself, so no barrier). The
    // sweep used to read the rows directly with an L2 prefetch of the next
    // step, and took longer than the main sweep (js: 843k rows/s against
    // 1.37M without at 512 x 151936 fp32 on the H200).
    asm volatile("cp.async.wait_all;" ::: "memory");
    for (int st = 0; st < kStages - 1; ++st) issue(st);
    for (unsigned begin = 0, step = 0; begin + warp_elem < n32; begin += kStep, ++step) {
      const size_t wb = begin + warp_elem;
      issue(step + kStages - 1);
      asm volatile("cp.async.wait_group %0;" ::"n"(kStages - 1));
      float va[kGroup], vb[kGroup];
      read_step(step < piped_steps, (step % kStages) * 2 * kStageBytes, wb, va, vb);
      float js_s = 0;
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        const float x = va[j], y = vb[j];
        const float pp = x > ninf ? ExpNonPositive(x - Ma_all) * inv_sa : 0.0f;
        const float qq = y > ninf ? ExpNonPositive(y - Mb_all) * inv_sb : 0.0f;
        const float sum = pp + qq;
        // __fdividef: 2 ulp (sum <= 2), against an IEEE division with its
        // slow-path call.
        const float u = sum > 0 ? __fdividef(pp - qq, fmaxf(sum, 1e-38f)) : 0.0f;
        js_s = fmaf(sum, JsTerm(u), js_s);
      }
      js_sum += js_s;
    }
    js = 0.25 * BlockSum<kW>(js_sum, sh.dscratch);
  }

  // Rank of the reference's top-1 in the candidate: from the candidate's
  // top-k list, else by counting the entries ranked above it.
  const int t = ta_i[0];
  __shared__ int rank_sh;
  if (tid == 0) {
    rank_sh = -1;
    for (int j = 0; j < K; ++j) {
      if (tb_i[j] == t) rank_sh = j;
    }
  }
  __syncthreads();
  long long rank = rank_sh;
  // (Timing builds that skip the top-k rescan have empty lists: t is then no
  // index, and the count below would read out of the row.)
  if (rank < 0 && !(kAblate & 1)) {
    const float bt = Loader<TB>::One(b, static_cast<size_t>(t));
    unsigned long long above = 0;
    for (size_t begin = 0; begin < n; begin += kStep) {
      const size_t wb = begin + static_cast<size_t>(warp) * kWarpSpan;
      float vb[kGroup];
      LoadGroup(b, wb, lane, n, aligned && wb + kWarpSpan <= n, vb);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        const size_t i = ElemIndex(wb, lane, j);
        above += (vb[j] > bt) || (vb[j] == bt && i < static_cast<size_t>(t));
      }
    }
    rank = static_cast<long long>(BlockCount<kW>(above, sh.cscratch));
  }

  // Top-k overlaps: thread x checks entry x of the reference's list.
  for (int q = 0; q < p.num_ks; ++q) {
    const int k = p.ks[q];
    bool found = false;
    if (tid < k) {
      for (int y = 0; y < k; ++y) found |= tb_i[y] == ta_i[tid];
    }
    const int common = __syncthreads_count(found);
    if (tid == 0) overlap[q] = common;
  }

  if (warp != 0) return;
  if (tid == 0) {
    out[kNonfiniteRef] = 0;
    out[kNonfiniteCand] = 0;
    out[kLseRef] = lse_a;
    out[kLseCand] = lse_b;
    out[kEntropyRef] = dist_a ? log(Sa) - Ta / Sa : kNaN;
    out[kEntropyCand] = dist_b ? log(Sb) - Tb / Sb : kNaN;
    const unsigned long long compared = n - both_all;
    const bool one_sided = aonly_all + bonly_all > 0;
    out[kMaxAbsLogit] =
        compared > 0 ? (one_sided ? kInfD : static_cast<double>(max_abs_all)) : kNaN;
    out[kMeanAbsLogit] =
        compared > 0 ? (one_sided ? kInfD : abs_all / static_cast<double>(compared)) : kNaN;
    out[kCosine] = kNaN;
    if (na_all > 0 && nb_all > 0) {
      const double ra = sqrt(na_all), rb = sqrt(nb_all);
      const double norm_diff = x_all / (ra + rb);
      out[kCosine] = 1.0 - (d2_all - norm_diff * norm_diff) / (2.0 * ra * rb);
    }
    out[kKlRefCand] = out[kKlCandRef] = out[kMaxAbsLogprob] = kNaN;
    out[kJs] = js;
    if (dist_a && dist_b) {
      const double direct = static_cast<double>(c0) + lse_b - lse_a;
      const double e_hi = e_hi_f, e_lo = e_lo_f;
      const bool usable = !one_sided && fmax(e_hi, -e_lo) <= 60.0;
      const double mean_pe = Ea / Sa, mean_qe = Eb / Sb;
      const double mean_pg = Ga / Sa, mean_qg = Gb / Sb;
      const double direct_err = fmax(fmax(fabs(lse_a), fabs(lse_b)), 1.0);
      const double xp = mean_pg - mean_pe, xq = mean_qg + mean_qe;
      const bool precise_p =
          usable && xp > -1 && fmax(fabs(mean_pg), fabs(mean_pe)) / (1 + xp) <= direct_err;
      const bool precise_q =
          usable && xq > -1 && fmax(fabs(mean_qg), fabs(mean_qe)) / (1 + xq) <= direct_err;
      const double L = precise_p ? log1p(xp) : direct;
      const double L_q = precise_q ? log1p(xq) : -direct;
      out[kKlRefCand] = bonly_all ? kInfD : mean_pe + L;
      out[kKlCandRef] = aonly_all ? kInfD : -mean_qe + L_q;
      out[kMaxAbsLogprob] = one_sided ? kInfD : fmax(fabs(e_hi + L), fabs(e_lo + L));
    }
    out[kArgmaxRef] = static_cast<double>(t);
    out[kArgmaxCand] = static_cast<double>(tb_i[0]);
    out[kMarginRef] = n > 1 ? static_cast<double>(ta_v[0]) - ta_v[1] : kInfD;
    out[kMarginCand] = n > 1 ? static_cast<double>(tb_v[0]) - tb_v[1] : kInfD;
    out[kRankOfRefTop1InCand] = static_cast<double>(rank);
    out[kNllRef] = out[kNllCand] = out[kDeltaP] = kNaN;
    if (target_ok && target >= 0) {
      const double nll_a = dist_a ? lse_a - sh.target_logits[0] : kNaN;
      const double nll_b = dist_b ? lse_b - sh.target_logits[1] : kNaN;
      out[kNllRef] = nll_a;
      out[kNllCand] = nll_b;
      out[kDeltaP] = exp(-nll_b) - exp(-nll_a);
    }
#if LOGITPARITY_CUDA_PHASES
    ph[kPhEnd] = clock64();
    if (blockIdx.x % LOGITPARITY_CUDA_PHASES == 0) printf("phases %d %llu %llu %lld %lld %lld %lld %lld %lld %lld %lld %lld\n",
           static_cast<int>(blockIdx.x), ph_start_ns, GlobalNs(), ph[kPhFirst] - ph[kPhStart],
           ph[kPhLoop0] - ph[kPhStart], ph[kPhLoopLast] - ph[kPhStart], ph[kPhKth] - ph[kPhStart],
           ph[kPhFlag] - ph[kPhStart], ph[kPhRescan] - ph[kPhStart], ph[kPhMerge] - ph[kPhStart],
           ph[kPhReduce] - ph[kPhStart], ph[kPhEnd] - ph[kPhStart]);
#endif
  }
  WriteRecord(sh.record, record_dst, p.num_ks, lane);
}
#undef LP_PHASE


// Launch arguments shared by every dtype pair.
struct LaunchArgs {
  const RowsView* ref;
  const RowsView* cand;
  const int64_t* targets;  // device-readable memory, or null
  Params p;
  unsigned* records;       // rows x RecordWords(p.num_ks) words, mapped host memory
  cudaStream_t stream;
  int device;
};

// The device's multiprocessor count, asked once per device (calls hold
// ScratchMutex).
int Multiprocessors(int device) {
  static std::vector<int> counts;
  int& count = DeviceSlot(counts, device);
  if (count == 0) {
    Check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
          "cudaDeviceGetAttribute");
  }
  return count;
}

// cudaFuncSetAttribute belongs to the current device and costs a driver call:
// once per kernel and device (calls hold ScratchMutex).
template <typename TA, typename TB, int kBlock>
void AllowPipeSharedMemory(int device) {
  static std::vector<char> done_per_device;
  char& done = DeviceSlot(done_per_device, device);
  if (done) return;
  Check(cudaFuncSetAttribute(CompareRowsKernel<TA, TB, kBlock>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             BlockShape<kBlock>::kPipeBytes),
        "cudaFuncSetAttribute");
  done = 1;
}

template <typename TA, typename TB, int kBlock>
void LaunchBlock(const LaunchArgs& l) {
  AllowPipeSharedMemory<TA, TB, kBlock>(l.device);
  CompareRowsKernel<TA, TB, kBlock>
      <<<static_cast<unsigned>(l.ref->rows), kBlock, BlockShape<kBlock>::kPipeBytes, l.stream>>>(
          static_cast<const TA*>(l.ref->data), l.ref->row_stride,
          static_cast<const TB*>(l.cand->data), l.cand->row_stride, l.ref->vocab, l.targets, l.p,
          l.records);
}

template <typename TA, typename TB>
void Launch(const LaunchArgs& l) {
  if (CompareRowsBlockThreads(l.ref->rows, Multiprocessors(l.device)) == 128) {
    LaunchBlock<TA, TB, 128>(l);
  } else {
    LaunchBlock<TA, TB, 256>(l);
  }
}

template <typename TA>
void LaunchB(const LaunchArgs& l) {
  switch (l.cand->dtype) {
    case Dtype::kF32: return Launch<TA, float>(l);
    case Dtype::kF16: return Launch<TA, __half>(l);
    case Dtype::kBF16: return Launch<TA, Bf16>(l);
  }
}

// Pinned host memory, mapped into every device's address space (portable):
// the kernel writes each row's record there and reads host targets from
// there, so a call queues one launch and no copies (on the H200's host, a
// 96 KB copy to pinned memory made a launch and synchronize 12.3 us instead
// of 8.4, a memset 1 us more: benchmarks/cuda_api_cost.cu; a copy to
// pageable memory is staged by the driver through its own pinned buffer).
// With unified addressing (every 64-bit platform CUDA supports) the device
// address is the host address. Buffers are kept in a pool, one per job in
// flight.
struct MappedBuffer {
  char* ptr = nullptr;
  size_t size = 0;
};

std::mutex& PoolMutex() {
  static std::mutex mu;
  return mu;
}

std::vector<MappedBuffer>& Pool() {
  static std::vector<MappedBuffer> pool;
  return pool;
}

MappedBuffer TakeMapped(size_t bytes) {
  MappedBuffer small;
  {
    std::lock_guard<std::mutex> lock(PoolMutex());
    std::vector<MappedBuffer>& pool = Pool();
    for (size_t i = 0; i < pool.size(); ++i) {
      if (pool[i].size >= bytes) {
        const MappedBuffer b = pool[i];
        pool.erase(pool.begin() + i);
        return b;
      }
    }
    if (!pool.empty()) {  // too small: replaced by a larger one
      small = pool.back();
      pool.pop_back();
    }
  }
  if (small.ptr != nullptr) Check(cudaFreeHost(small.ptr), "cudaFreeHost");
  MappedBuffer b;
  b.size = std::max<size_t>(bytes, size_t{1} << 20);
  void* p = nullptr;
  Check(cudaHostAlloc(&p, b.size, cudaHostAllocMapped | cudaHostAllocPortable), "cudaHostAlloc");
  b.ptr = static_cast<char*>(p);
  return b;
}

void ReturnMapped(const MappedBuffer& b) {
  std::lock_guard<std::mutex> lock(PoolMutex());
  Pool().push_back(b);
}

}  // namespace

bool CudaBuilt() { return true; }

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

// Returns its buffer to the pool when destroyed: the job's destructor waits
// for the kernel first; a constructor that throws has queued nothing.
struct CompareRowsCudaJob::State {
  size_t rows = 0, num_ks = 0, vocab = 0, record_bytes = 0;
  MappedBuffer buf;
  const int64_t* targets = nullptr;  // what the kernel reads (device or mapped memory)
  cudaStream_t stream = nullptr;
  bool waited = false;
  ~State() {
    if (buf.ptr != nullptr) ReturnMapped(buf);
  }
};

CompareRowsCudaJob::CompareRowsCudaJob(const RowsView& ref, const RowsView& cand,
                                       const RowMetricsOptions& options, uintptr_t stream_handle,
                                       const int64_t* device_targets) {
  CheckCompareArgs(ref, cand, options);
  if (device_targets != nullptr && options.targets != nullptr) {
    throw std::invalid_argument("give targets either on the host or on the device, not both");
  }
  if (ref.vocab > static_cast<size_t>(std::numeric_limits<int>::max())) {
    throw std::invalid_argument("vocab must be below 2^31 for the CUDA kernels, got " +
                                std::to_string(ref.vocab));
  }
  if (ref.rows > static_cast<size_t>(std::numeric_limits<int>::max())) {
    throw std::invalid_argument("rows must be below 2^31 for the CUDA kernels, got " +
                                std::to_string(ref.rows));
  }
  RequireCudaDevice();
  const int device = DeviceOf(ref.data, "ref");
  const int device_b = DeviceOf(cand.data, "cand");
  if (device != device_b) {
    throw std::invalid_argument("ref and cand must be on the same CUDA device, got cuda:" +
                                std::to_string(device) + " and cuda:" +
                                std::to_string(device_b) + "; move one with .to(other.device)");
  }
  if (device_targets != nullptr && DeviceOf(device_targets, "targets") != device) {
    throw std::invalid_argument("targets must be on the rows' CUDA device (cuda:" +
                                std::to_string(device) + "); move them with .to(ref.device)");
  }
  DeviceGuard guard(device);

  Params p{};
  p.num_ks = static_cast<int>(options.topk.size());
  for (int q = 0; q < p.num_ks; ++q) p.ks[q] = options.topk[q];
  p.kmax = static_cast<int>(std::min<size_t>(ref.vocab, std::max(2, options.topk.back())));
  p.js = options.js ? 1 : 0;

  // The job's mapped buffer: [records, rows x RecordWords words | host targets].
  auto st = std::make_unique<State>();
  st->rows = ref.rows;
  st->num_ks = options.topk.size();
  st->vocab = ref.vocab;
  st->record_bytes = RecordWords(p.num_ks) * sizeof(unsigned);
  st->stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const size_t records_bytes = ref.rows * st->record_bytes;
  const size_t targets_bytes = options.targets ? ref.rows * sizeof(int64_t) : 0;
  st->buf = TakeMapped(records_bytes + targets_bytes);
  st->targets = device_targets;
  if (options.targets) {
    std::memcpy(st->buf.ptr + records_bytes, options.targets, targets_bytes);
    st->targets = reinterpret_cast<const int64_t*>(st->buf.ptr + records_bytes);
  }
  const LaunchArgs l{&ref, &cand, st->targets, p, reinterpret_cast<unsigned*>(st->buf.ptr),
                     st->stream, device};
  cudaError_t err;
  {
    // AllowPipeSharedMemory's and Multiprocessors' tables
    std::lock_guard<std::mutex> lock(ScratchMutex());
    switch (ref.dtype) {
      case Dtype::kF32: LaunchB<float>(l); break;
      case Dtype::kF16: LaunchB<__half>(l); break;
      case Dtype::kBF16: LaunchB<Bf16>(l); break;
    }
    err = cudaGetLastError();
  }
  Check(err, "CompareRowsCuda");  // on an error nothing was queued: st returns its buffer
  state_ = std::move(st);
}

CompareRowsCudaJob::~CompareRowsCudaJob() {
  // The kernel writes the buffer that state_ returns to the pool.
  if (state_ && !state_->waited) cudaStreamSynchronize(state_->stream);
}

void CompareRowsCudaJob::Finish(double* fields, int32_t* topk_common, int64_t* int_fields) {
  State& st = *state_;
  if (st.waited) throw std::logic_error("CompareRowsCudaJob::Finish called twice");
  const cudaError_t err = cudaStreamSynchronize(st.stream);
  st.waited = true;
  Check(err, "CompareRowsCuda");
  const char* host = st.buf.ptr;
  for (size_t r = 0; r < st.rows; ++r) {
    int32_t bad;
    std::memcpy(&bad, host + r * st.record_bytes + offsetof(RowRecord, bad_target), sizeof(bad));
    if (bad != 0) {
      int64_t got = 0;
      Check(cudaMemcpy(&got, st.targets + r, sizeof(got), cudaMemcpyDefault),
            "CompareRowsCuda targets");
      throw TargetOutOfRange(st.vocab, got, r);
    }
  }
  for (size_t r = 0; r < st.rows; ++r) {
    const char* rec = host + r * st.record_bytes;
    std::memcpy(fields + r * kNumRowFields, rec, kNumRowFields * sizeof(double));
    std::memcpy(topk_common + r * st.num_ks, rec + offsetof(RowRecord, overlap),
                st.num_ks * sizeof(int32_t));
  }
  if (int_fields == nullptr) return;
  for (int f = kFirstIntField; f < kNumRowFields; ++f) {
    int64_t* out = int_fields + static_cast<size_t>(f - kFirstIntField) * st.rows;
    for (size_t r = 0; r < st.rows; ++r) {
      out[r] = static_cast<int64_t>(fields[r * kNumRowFields + f]);
    }
  }
}

RowMetricsResult CompareRowsCuda(const RowsView& ref, const RowsView& cand,
                                 const RowMetricsOptions& options, uintptr_t stream_handle,
                                 const int64_t* device_targets) {
  RowMetricsResult result;
  result.rows = ref.rows;
  result.topk = options.topk;
  result.fields.resize(ref.rows * kNumRowFields);
  result.topk_common.resize(ref.rows * options.topk.size());
  CompareRowsCudaJob job(ref, cand, options, stream_handle, device_targets);
  job.Finish(result.fields.data(), result.topk_common.data());
  return result;
}

}  // namespace logitparity
