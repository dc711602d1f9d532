// The fused row comparison kernel, one Highway target per inclusion.
//
// Input domain: raw logits of one reference row a and one candidate row b of
// length n (float32, float16 or bfloat16, each side its own dtype). Units:
// nats (natural log). Accumulation: float64 for every sum (products of two
// floats are formed in double, where they are exact); exp of max-subtracted
// logits is ExpNonPositive (row_load-inl.h, <= 8.6e-8 relative), log and
// the rare large-argument exp are Highway's float32 versions (<= 4 ulp).
// Tolerances against CompareRowRef are pinned in row_metrics_test.cc.
//
// One sweep over the row reads each element once from memory, in chunks of
// kChunk elements (float32 ones in place, others converted to float in an L1
// buffer; the chunk kPrefetchChunks ahead prefetched meanwhile): a first
// loop over the chunk finds its maxima, a second one exponentiates relative
// to the running maxima Ma, Mb (online softmax: when a maximum grows, the
// sums scale by exp(M_old - M_new) in double). Jensen-Shannon needs the
// final log-sum-exps and, when requested, takes a second sweep over the
// exponentials the first one saved (SavedExps). Speed, step by step:
// docs/metrics.md ("Speed of the CPU kernel").
//
// KL is computed in a form that stays accurate when the two rows are close,
// which is the case this project exists for. With d_i = a_i - b_i, a shift
// c0 fixed at the first chunk (close to every d_i for close rows) and
// e_i = d_i - c0, exactly
//   KL(P||Q) = E_p[e] + L,   L = log E_p[exp(-e)] = log1p(E_p[g(e)] - E_p[e]),
//   KL(Q||P) = -E_q[e] + L', L' = log E_q[exp(e)] = log1p(E_q[g(-e)] + E_q[e]),
//   g(e) = expm1(-e) + e (second order in e, see AddSecondOrderTerms),
// and L = -L' = c0 + lse_b - lse_a.
// Computing L from the float64 means of e and g(e) leaves no cancellation in
// float32: identical rows give exactly 0, and the error of KL is relative to
// KL itself (pinned at 1e-4 for rows that differ by 1e-4 in
// TestKlTightOnCloseRows) instead of to |lse|. Where some
// token is masked (-inf) on one side only, or |e| is large (> 60, where
// exp(-e) would overflow and the rows are far apart anyway), L falls back to
// the direct c0 + lse_b - lse_a.

#if defined(LOGITPARITY_SRC_ROW_METRICS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOGITPARITY_SRC_ROW_METRICS_INL_H_
#undef LOGITPARITY_SRC_ROW_METRICS_INL_H_
#else
#define LOGITPARITY_SRC_ROW_METRICS_INL_H_
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>

#include "hwy/cache_control.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "logitparity/row_metrics.h"
#include "src/row_load-inl.h"
#include "src/topk-inl.h"

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

HWY_INLINE bool IsNanOrPosInf(float x) { return !(x < std::numeric_limits<float>::infinity()); }

// Vectors per float32 partial sum before it is added to a float64 total.
constexpr size_t kBlockVectors = 8;
// Beyond this |e| = |a_i - b_i - c0| exp(-e) could overflow float32 and the
// rows are far apart anyway: KL takes the direct form c0 + lse_b - lse_a.
constexpr double kMaxShiftForCloseForm = 60.0;

// The float64 totals of one sweep. p = exp(a - Ma), q = exp(b - Mb) (relative
// to the running maxima), x = a - Ma, y = b - Mb, d = a - b, e = d - c0 and g
// as in SecondOrderTerms; the rest are summed where both sides are finite.
enum Total : size_t {
  kSumP,      // sum p                 -> lse_a
  kSumQ,      // sum q                 -> lse_b
  kSumPX,     // sum p x               -> entropy_a = log S - T / S, no
  kSumQY,     // sum q y                  cancellation against lse
  kSumPE,     // sum p e               -> E_p[e]
  kSumQE,     // sum q e               -> E_q[e]
  kSumPG,     // sum p g(e)            -> E_p[g(e)]
  kSumQG,     // sum q g(-e)           -> E_q[g(-e)]
  kSumAbsD,   // sum |d|               -> mean |Δ logit|
  // Cosine from |a|^2, |b|^2, |d|^2 and sum d (a + b) = |a|^2 - |b|^2, so
  // that 1 - cosine keeps its relative precision when the rows are close.
  kSumD2,     // sum d^2
  kSumDSum,   // sum d (a + b)
  kSumA2,     // sum a^2
  kSumB2,     // sum b^2
  kNumTotals
};

// Totals accumulate in float64 lanes kept in memory: a block's float32
// partial sum is promoted and added once per kBlockVectors vectors, so the
// extra load and store cost nothing measurable, 13 x 2 vector accumulators
// no longer compete for registers, and no vector is a struct member (SVE and
// RVV vectors are sizeless).
struct Totals {
  static constexpr size_t kLanes = HWY_MAX_BYTES / sizeof(double);
  alignas(HWY_MAX_BYTES) double lo[kNumTotals][kLanes];
  alignas(HWY_MAX_BYTES) double hi[kNumTotals][kLanes];

  template <class DF>
  HWY_INLINE void Zero(DF df) {
    const F64Tag<DF> dd;
    for (size_t i = 0; i < kNumTotals; ++i) {
      hn::Store(hn::Zero(dd), dd, lo[i]);
      hn::Store(hn::Zero(dd), dd, hi[i]);
    }
  }
  // Adds the lanes of a float32 partial sum to total i.
  template <class DF>
  HWY_INLINE void Add(DF df, size_t i, hn::Vec<DF> v) {
    const F64Tag<DF> dd;
    auto l = hn::Load(dd, lo[i]), h = hn::Load(dd, hi[i]);
    AddF64(df, dd, v, l, h);
    hn::Store(l, dd, lo[i]);
    hn::Store(h, dd, hi[i]);
  }
  template <class DF>
  HWY_INLINE double Sum(DF /*df*/, size_t i) const {
    const F64Tag<DF> dd;
    return SumF64(dd, hn::Load(dd, lo[i]), hn::Load(dd, hi[i]));
  }
  template <class DF>
  HWY_INLINE void Scale(DF /*df*/, size_t i, double factor) {
    const F64Tag<DF> dd;
    const auto f = hn::Set(dd, factor);
    hn::Store(hn::Mul(hn::Load(dd, lo[i]), f), dd, lo[i]);
    hn::Store(hn::Mul(hn::Load(dd, hi[i]), f), dd, hi[i]);
  }
  // total[t] = (total[s] * shift + total[t]) * factor
  template <class DF>
  HWY_INLINE void ShiftScale(DF /*df*/, size_t t, size_t s, double shift, double factor) {
    const F64Tag<DF> dd;
    const auto vs = hn::Set(dd, shift), f = hn::Set(dd, factor);
    hn::Store(hn::Mul(hn::MulAdd(hn::Load(dd, lo[s]), vs, hn::Load(dd, lo[t])), f), dd, lo[t]);
    hn::Store(hn::Mul(hn::MulAdd(hn::Load(dd, hi[s]), vs, hn::Load(dd, hi[t])), f), dd, hi[t]);
  }
};

// Online softmax for one side: when the chunk maximum m exceeds the running
// maximum M, every sum weighted by w = exp(x - M) is rescaled by exp(M - m),
// and the sum of w (x - M) first gains (M - m) sum w because its offset
// moved. sum_w, sum_wx: that side's sum w and sum w (x - M); others: its
// other w-weighted totals.
template <class DF>
HWY_INLINE void RaiseMax(DF df, float m, float& M, Totals& tot, size_t sum_w, size_t sum_wx,
                         size_t other0, size_t other1) {
  if (!(m > M)) return;
  if (M > -std::numeric_limits<float>::infinity()) {
    const double shift = static_cast<double>(M) - m, factor = exp(shift);
    tot.ShiftScale(df, sum_wx, sum_w, shift, factor);
    tot.Scale(df, sum_w, factor);
    tot.Scale(df, other0, factor);
    tot.Scale(df, other1, factor);
  }
  M = m;
}

// Scratch owned by one worker: two chunk buffers.
struct ChunkScratch {
  float* a;  // kChunk + kMaxLanesF32 floats, aligned
  float* b;
};

// How many chunks ahead of the one being summed both rows are prefetched
// (into L1, one slice per block of the sums). The sweep alternates reading a
// chunk (memory-bound) and summing it in L1 (arithmetic-bound), and the
// hardware prefetcher does not run far enough ahead during the sums to keep
// the two overlapped. Measured one thread here (AMD EPYC, AVX3, shared),
// 32 x 151936 fp32, rows/s without / with JS: none 2954 / 1985, 1 chunk
// ahead 3625 / 2327, 2 chunks 3853 / 2411, 3 chunks 3514 / 2383, 4 chunks
// 3804 / 2407; 2 chunks into L2 (prefetcht1) 3702 / 2390.
constexpr size_t kPrefetchChunks = 2;

// The bytes of a later chunk of both rows, fetched into the cache slice by
// slice while the current chunk is summed (ChunkSums, JensenShannon).
struct NextChunk {
  const uint8_t* a = nullptr;
  size_t a_bytes = 0;
  const uint8_t* b = nullptr;
  size_t b_bytes = 0;

  // Prefetches slice `i` of `slices` of both byte ranges.
  HWY_INLINE void Fetch(size_t i, size_t slices) const {
    FetchSlice(a, a_bytes, i, slices);
    FetchSlice(b, b_bytes, i, slices);
  }
  static HWY_INLINE void FetchSlice(const uint8_t* p, size_t bytes, size_t i, size_t slices) {
    const size_t step = (bytes + slices - 1) / slices;
    const size_t end = std::min(bytes, (i + 1) * step);
    for (size_t off = i * step; off < end; off += kCacheLine) hwy::Prefetch(p + off);
  }
  static constexpr size_t kCacheLine = 64;
};

struct RowArgs {
  const void* a;
  Dtype a_dtype;
  const void* b;
  Dtype b_dtype;
  size_t n;
  int64_t target;  // < 0: none
  const int* ks;   // sorted, unique, each in [1, n]
  size_t num_ks;
  bool js;
};

// The exponentials of the first sweep, kept for the Jensen-Shannon sweep
// (only when it is asked for): p[i] = exp(a_i - ma[c]), q[i] = exp(b_i -
// mb[c]), where ma[c], mb[c] are the running maxima with which chunk c was
// summed. JS then costs a multiply per side instead of an exp, and reads
// them (as many bytes as float32 rows) instead of the rows.
struct SavedExps {
  float* p = nullptr;  // the row's padded length, aligned
  float* q = nullptr;
  float* ma = nullptr;  // one per chunk
  float* mb = nullptr;
};

// Storage for SavedExps of a row of length n, owned by the calling thread
// (a pool worker or the caller) and kept between rows and calls.
HWY_INLINE SavedExps SavedExpsFor(size_t n) {
  thread_local hwy::AlignedFreeUniquePtr<float[]> buf;
  thread_local size_t size = 0;
  const size_t padded = hwy::RoundUpTo(n, kMaxLanesF32);
  const size_t chunks = hwy::RoundUpTo((n + kChunk - 1) / kChunk, kMaxLanesF32);
  const size_t need = 2 * padded + 2 * chunks;
  if (size < need) {
    buf = hwy::AllocateAligned<float>(need);
    if (!buf) throw std::bad_alloc();
    size = need;
  }
  SavedExps saved;
  saved.p = buf.get();
  saved.q = saved.p + padded;
  saved.ma = saved.q + padded;
  saved.mb = saved.ma + chunks;
  return saved;
}

// log x for normal positive finite x (no zero, subnormal, inf or NaN), with
// no division: x = 2^k y, y in
// [sqrt(1/2), sqrt(2)), log x = k ln 2 + t Q(t), t = y - 1, where Q is a
// degree-8 fit of log1p(t) / t on that range (weighted to minimax relative
// error; with float32 coefficients max 5.8e-8 relative in float64,
// evaluated by Horner's FMAs). hn::Log reduces the same way but takes
// (y - 1) / (y + 1), a division per call, and JsKernel's two logs were most
// of the JS sweep's time on rows that differ.
template <class DF>
HWY_INLINE hn::Vec<DF> LogNormal(DF df, hn::Vec<DF> x) {
  const hn::RebindToSigned<DF> di;
  using VI = hn::Vec<decltype(di)>;
  // Adding 1 - sqrt(1/2) (in bits) moves y's range to [sqrt(1/2), sqrt(2)).
  const VI magic = hn::Set(di, 0x3F3504F3);  // bits of sqrt(1/2)
  const VI bits = hn::Add(hn::BitCast(di, x), hn::Sub(hn::Set(di, 0x3F800000), magic));
  const VI k = hn::Sub(hn::ShiftRight<23>(bits), hn::Set(di, 0x7F));
  const auto y = hn::BitCast(df, hn::Add(hn::And(bits, hn::Set(di, 0x7FFFFF)), magic));
  const auto t = hn::Sub(y, hn::Set(df, 1.0f));
  auto q = hn::Set(df, 0.08722199499607086f);
  q = hn::MulAdd(q, t, hn::Set(df, -0.14366766810417175f));
  q = hn::MulAdd(q, t, hn::Set(df, 0.14952290058135986f));
  q = hn::MulAdd(q, t, hn::Set(df, -0.16562405228614807f));
  q = hn::MulAdd(q, t, hn::Set(df, 0.19956833124160767f));
  q = hn::MulAdd(q, t, hn::Set(df, -0.25002074241638184f));
  q = hn::MulAdd(q, t, hn::Set(df, 0.3333418667316437f));
  q = hn::MulAdd(q, t, hn::Set(df, -0.49999988079071045f));
  q = hn::MulAdd(q, t, hn::Set(df, 1.0f));
  // k ln 2 in two parts (k is at most 8 bits, so k * kLn2Hi is exact).
  const auto kf = hn::ConvertTo(df, k);
  const auto kLn2Hi = hn::Set(df, 0.693145751953125f), kLn2Lo = hn::Set(df, 1.428606765330187e-06f);
  return hn::MulAdd(kf, kLn2Hi, hn::MulAdd(t, q, hn::Mul(kf, kLn2Lo)));
}

// (1+u) log(1+u) + (1-u) log(1-u) for u in [-1, 1]. For |u| < 1/4 its series
// sum_k u^(2k) / (k (2k-1)) (six terms, truncation < 1e-9 relative) avoids the
// cancellation between the two logs.
template <class DF>
HWY_INLINE hn::Vec<DF> JsKernel(DF df, hn::Vec<DF> u) {
  const auto one = hn::Set(df, 1.0f);
  const auto u2 = hn::Mul(u, u);
  auto s = hn::Set(df, 1.0f / 66);
  s = hn::MulAdd(s, u2, hn::Set(df, 1.0f / 45));
  s = hn::MulAdd(s, u2, hn::Set(df, 1.0f / 28));
  s = hn::MulAdd(s, u2, hn::Set(df, 1.0f / 15));
  s = hn::MulAdd(s, u2, hn::Set(df, 1.0f / 6));
  s = hn::MulAdd(s, u2, one);
  const auto series = hn::Mul(s, u2);
  const auto up = hn::Add(one, u);
  const auto um = hn::Sub(one, u);
  const auto zero = hn::Zero(df);
  // x log x with 0 log 0 = 0; Log is only called on positive inputs.
  const auto small = hn::Lt(hn::Abs(u), hn::Set(df, 0.25f));
  if (HWY_LIKELY(hn::AllTrue(df, small))) return series;
  // 1 - u and 1 + u are 0 or at least 2^-24 (never subnormal); the zeros
  // are raised for LogNormal and masked out.
  const auto lo = hn::Set(df, 1e-30f);
  const auto lp = hn::IfThenElseZero(hn::Gt(up, zero), hn::Mul(up, LogNormal(df, hn::Max(up, lo))));
  const auto lm = hn::IfThenElseZero(hn::Gt(um, zero), hn::Mul(um, LogNormal(df, hn::Max(um, lo))));
  return hn::IfThenElse(small, series, hn::Add(lp, lm));
}

// K = e^(Mb - Ma + c0), from the float64 difference and split in two floats,
// so that exp(xa - e) = exp(b - Ma + c0) = pb K and exp(xb + e) = pa / K: far
// vectors (|e| > 1/2 in a lane, nearly every vector of rows that differ by
// half a logit) need no exp of their own (two hn::Exp per such vector before;
// rows b = a + 0.5 randn, 512 x 151936, one thread, this 2-core EPYC: 2754 ->
// 4496 rows/s without JS, docs/metrics.md). Only where |Mb - Ma + c0| <= 80,
// so that pb K stays below e^80 where the exps' clamp would cut; otherwise, or
// while a side has no finite maximum yet, the exps. Scalars (no vector is a
// struct member: see Totals), set once per chunk.
struct FarFactors {
  float K, K_lo, K_inv, K_inv_lo;  // e^D = K + K_lo and e^-D = K_inv + K_inv_lo
  bool k_form;

  FarFactors(float Ma, float Mb, float c0) {
    const double D = static_cast<double>(Mb) - Ma + c0;
    k_form = std::fabs(D) <= 80.0;  // false for NaN (a maximum still -inf)
    const double k = k_form ? std::exp(D) : 0.0, k_inv = k_form ? std::exp(-D) : 0.0;
    K = static_cast<float>(k);
    K_lo = static_cast<float>(k - K);
    K_inv = static_cast<float>(k_inv);
    K_inv_lo = static_cast<float>(k_inv - K_inv);
  }
};

// Adds the weighted second-order terms pa g(e) and pb g(-e) to g_s and h_s,
// where g(e) = expm1(-e) + e, pa = exp(xa), pb = exp(xb), to a relative 1e-7
// however small e is. For |e| <= 1/2 g comes from its Taylor series split
// into even and odd powers (g(+-e) = even -+ odd), shared by both sides,
// through degree 9: the first term left out, e^10 / 10!, is < 2.6e-9 of g at
// |e| = 1/2, below float32 rounding (degree 12 before: three more FMAs per
// vector for nothing visible in float32). Beyond that the products are
// formed as exp(xa - e) - pa + pa e and exp(xb + e) - pb - pb e, where the
// cancellation costs at most a factor 4 and, unlike pb * expm1(e), nothing
// underflows when pb is tiny but pb exp(e) is not. The two exps come from the
// weights where FarFactors allow: exp(xa - e) = pb K and exp(xb + e) = pa / K
// (see FarFactors).
template <class DF>
HWY_INLINE void AddSecondOrderTerms(DF df, hn::Vec<DF> e, hn::Vec<DF> xa, hn::Vec<DF> xb,
                                    hn::Vec<DF> pa, hn::Vec<DF> pb, const FarFactors& far,
                                    hn::Vec<DF>& g_s, hn::Vec<DF>& h_s) {
  const auto u = hn::Mul(e, e);
  auto even = hn::MulAdd(hn::Set(df, 1.0f / 40320), u, hn::Set(df, 1.0f / 720));
  even = hn::MulAdd(even, u, hn::Set(df, 1.0f / 24));
  even = hn::MulAdd(even, u, hn::Set(df, 0.5f));
  even = hn::Mul(even, u);
  auto odd = hn::MulAdd(hn::Set(df, 1.0f / 362880), u, hn::Set(df, 1.0f / 5040));
  odd = hn::MulAdd(odd, u, hn::Set(df, 1.0f / 120));
  odd = hn::MulAdd(odd, u, hn::Set(df, 1.0f / 6));
  odd = hn::Mul(odd, hn::Mul(u, e));
  const auto g_plus = hn::Sub(even, odd), g_minus = hn::Add(even, odd);
  const auto big = hn::Gt(hn::Abs(e), hn::Set(df, 0.5f));
  if (HWY_LIKELY(hn::AllFalse(df, big))) {
    g_s = hn::MulAdd(pa, g_plus, g_s);
    h_s = hn::MulAdd(pb, g_minus, h_s);
    return;
  }
  hn::Vec<DF> ea, eb;
  if (HWY_LIKELY(far.k_form)) {
    // K in two floats: K's own rounding would be the same relative error
    // on every far term of the chunk, a bias that does not average out like
    // pb's and the product's roundings. With K in one float, KL of rows
    // b = a + s randn (s = 0.3, 0.5, 1; 192 rows of 151936) was off float64
    // by up to 6.0e-7 relative; with the split 1.4e-7, and 1.3e-7 with the
    // exps.
    ea = hn::MulAdd(pb, hn::Set(df, far.K), hn::Mul(pb, hn::Set(df, far.K_lo)));
    eb = hn::MulAdd(pa, hn::Set(df, far.K_inv), hn::Mul(pa, hn::Set(df, far.K_inv_lo)));
  } else {
    const auto lo = hn::Set(df, -104.5f), hi = hn::Set(df, 80.0f);
    ea = hn::Exp(df, hn::Min(hn::Max(hn::Sub(xa, e), lo), hi));
    eb = hn::Exp(df, hn::Min(hn::Max(hn::Add(xb, e), lo), hi));
  }
  g_s = hn::Add(g_s, hn::IfThenElse(big, hn::MulAdd(pa, e, hn::Sub(ea, pa)), hn::Mul(pa, g_plus)));
  h_s = hn::Add(h_s,
                hn::IfThenElse(big, hn::NegMulAdd(pb, e, hn::Sub(eb, pb)), hn::Mul(pb, g_minus)));
}

// Per-row state of the sweep besides the float64 totals: running maxima, the
// KL shift c0, masks, extremes of e and |d|, and both top-k selections.
struct SweepState {
  float Ma = -std::numeric_limits<float>::infinity();  // running maxima
  float Mb = -std::numeric_limits<float>::infinity();
  float c0 = 0.0f;  // a - b maxima difference of the first chunk where both are finite
  bool have_c0 = false;
  size_t both_masked = 0, a_only_masked = 0, b_only_masked = 0, pads = 0;
  float max_abs = 0.0f, e_max = -std::numeric_limits<float>::infinity(),
        e_min = std::numeric_limits<float>::infinity();
  TopKState top_a, top_b;
  // Facts about the chunk being swept, from ChunkMaxima.
  float chunk_ma = 0.0f, chunk_mb = 0.0f;  // its maxima
  bool chunk_masked = false;               // some entry is -inf on a side (pads included)
};

// Loop 1 over a chunk: its maxima (raising the running ones) and the mask
// counts. Returns false if a NaN or +inf was found (the row has no metrics).
// The common chunk costs two maxima and two adds per vector: the lane sums
// of a + b are finite when every entry is, -inf when some entry is -inf and
// none is NaN or +inf, and NaN or +inf when some entry is (or when finite
// entries overflow, which the exact checks then rule out); before, four
// compares and six mask operations per vector (8.3 TSC cycles per vector
// of the ~58 of a whole sweep without JS, this AMD EPYC, AVX3).
template <class DF>
HWY_INLINE bool ChunkMaxima(DF df, const float* HWY_RESTRICT a, const float* HWY_RESTRICT b,
                            size_t padded, Totals& tot, SweepState& st) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  const float kInfF = std::numeric_limits<float>::infinity();
  const V ninf = hn::Set(df, -kInfF), pinf = hn::Set(df, kInfF);
  V vma = ninf, vmb = ninf, sum = hn::Zero(df);
  for (size_t i = 0; i < padded; i += N) {
    const V va = hn::LoadU(df, a + i), vb = hn::LoadU(df, b + i);
    vma = hn::Max(vma, va);
    vmb = hn::Max(vmb, vb);
    sum = hn::Add(sum, hn::Add(va, vb));
  }
  if (!hn::AllTrue(df, hn::Lt(sum, pinf))) {  // NaN or +inf somewhere, or an overflow
    auto bad = hn::FirstN(df, 0);
    for (size_t i = 0; i < padded; i += N) {
      const V va = hn::LoadU(df, a + i), vb = hn::LoadU(df, b + i);
      bad = hn::Or(bad, hn::Or(hn::Not(hn::Lt(va, pinf)), hn::Not(hn::Lt(vb, pinf))));
    }
    if (!hn::AllFalse(df, bad)) return false;
  }
  st.chunk_masked = false;
  if (!hn::AllTrue(df, hn::Gt(sum, ninf))) {  // a -inf somewhere, or an overflow
    size_t masked = 0;
    for (size_t i = 0; i < padded; i += N) {
      const auto ma = hn::Eq(hn::LoadU(df, a + i), ninf);
      const auto mb = hn::Eq(hn::LoadU(df, b + i), ninf);
      const size_t both = hn::CountTrue(df, hn::And(ma, mb));
      const size_t a_only = hn::CountTrue(df, hn::AndNot(mb, ma));
      const size_t b_only = hn::CountTrue(df, hn::AndNot(ma, mb));
      st.both_masked += both;
      st.a_only_masked += a_only;
      st.b_only_masked += b_only;
      masked += both + a_only + b_only;
    }
    st.chunk_masked = masked > 0;
  }
  const float chunk_ma = st.chunk_ma = hn::GetLane(hn::MaxOfLanes(df, vma));
  const float chunk_mb = st.chunk_mb = hn::GetLane(hn::MaxOfLanes(df, vmb));
  RaiseMax(df, chunk_ma, st.Ma, tot, kSumP, kSumPX, kSumPE, kSumPG);
  RaiseMax(df, chunk_mb, st.Mb, tot, kSumQ, kSumQY, kSumQE, kSumQG);
  if (!st.have_c0 && chunk_ma > -kInfF && chunk_mb > -kInfF) {
    st.c0 = chunk_ma - chunk_mb;
    st.have_c0 = true;
  }
  return true;
}

// One vector pair's softmax weights pa = e^xa, pb = e^xb (kept for the JS
// sweep when kSave) and their first moments: the sums of p, p x and p e per
// side. xa_t, xb_t: x where the token is live (the masked loop zeroes the
// others, whose weights are 0).
template <bool kSave, class DF, class V = hn::Vec<DF>>
HWY_INLINE void AddWeights(DF df, V xa, V xb, V xa_t, V xb_t, V e, float* HWY_RESTRICT p_out,
                           float* HWY_RESTRICT q_out, size_t i, V& pa, V& pb, V& sa_s, V& sb_s,
                           V& ta_s, V& tb_s, V& ea_s, V& eb_s) {
  pa = ExpNonPositive(df, xa);
  pb = ExpNonPositive(df, xb);
  if (kSave) {
    hn::Store(pa, df, p_out + i);
    hn::Store(pb, df, q_out + i);
  }
  sa_s = hn::Add(sa_s, pa);
  sb_s = hn::Add(sb_s, pb);
  ta_s = hn::MulAdd(pa, xa_t, ta_s);
  tb_s = hn::MulAdd(pb, xb_t, tb_s);
  ea_s = hn::MulAdd(pa, e, ea_s);
  eb_s = hn::MulAdd(pb, e, eb_s);
}

// Adds one block's float32 partial sums to the float64 totals (the sweep's
// masked and clean chunk loops; vectors are arguments, not struct members:
// see Totals).
template <class DF, class V = hn::Vec<DF>>
HWY_INLINE void AddBlockSums(DF df, Totals& tot, V abs_s, V d2_s, V x_s, V na_s, V nb_s, V sa_s,
                             V sb_s, V ta_s, V tb_s, V ea_s, V eb_s, V g_s, V h_s) {
  tot.Add(df, kSumAbsD, abs_s);
  tot.Add(df, kSumD2, d2_s);
  tot.Add(df, kSumDSum, x_s);
  tot.Add(df, kSumA2, na_s);
  tot.Add(df, kSumB2, nb_s);
  tot.Add(df, kSumP, sa_s);
  tot.Add(df, kSumQ, sb_s);
  tot.Add(df, kSumPX, ta_s);
  tot.Add(df, kSumQY, tb_s);
  tot.Add(df, kSumPE, ea_s);
  tot.Add(df, kSumQE, eb_s);
  tot.Add(df, kSumPG, g_s);
  tot.Add(df, kSumQG, h_s);
}

// Loop 2 over a chunk: every total. Sums run in float32 over blocks of
// kBlockVectors vectors (at most 8 terms per lane) and are then added to the
// float64 totals: this halves the cost of the sweep, and the relative error
// of a block sum stays ~1e-7, below that of exp.
template <bool kSave, class DF>
HWY_INLINE void ChunkSumsMasked(DF df, const float* HWY_RESTRICT a, const float* HWY_RESTRICT b,
                                size_t padded, const NextChunk& next, Totals& tot,
                                SweepState& st, float* HWY_RESTRICT p_out = nullptr,
    float* HWY_RESTRICT q_out = nullptr) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  const float kInfF = std::numeric_limits<float>::infinity();
  const V ninf = hn::Set(df, -kInfF), pinf = hn::Set(df, kInfF);
  const V vMa = hn::Set(df, st.Ma), vMb = hn::Set(df, st.Mb), vc0 = hn::Set(df, st.c0);
  const FarFactors far(st.Ma, st.Mb, st.c0);
  V max_abs = hn::Set(df, st.max_abs), e_max = hn::Set(df, st.e_max), e_min = hn::Set(df, st.e_min);
  const size_t blocks = (padded + kBlockVectors * N - 1) / (kBlockVectors * N);
  for (size_t block = 0; block < padded; block += kBlockVectors * N) {
    next.Fetch(block / (kBlockVectors * N), blocks);
    const size_t block_end = std::min(padded, block + kBlockVectors * N);
    const V z = hn::Zero(df);
    V abs_s = z, d2_s = z, x_s = z, na_s = z, nb_s = z, sa_s = z, sb_s = z;
    V ta_s = z, tb_s = z, ea_s = z, eb_s = z, g_s = z, h_s = z;
    for (size_t i = block; i < block_end; i += N) {
      const V va = hn::LoadU(df, a + i), vb = hn::LoadU(df, b + i);
      const auto fa = hn::Gt(va, ninf), fb = hn::Gt(vb, ninf);
      const auto both = hn::And(fa, fb);
      const V d = hn::Sub(va, vb);
      const V e = hn::IfThenElseZero(both, hn::Sub(d, vc0));
      e_max = hn::Max(e_max, hn::IfThenElse(both, e, ninf));
      e_min = hn::Min(e_min, hn::IfThenElse(both, e, pinf));
      const V absd = hn::IfThenElseZero(both, hn::Abs(d));
      max_abs = hn::Max(max_abs, absd);
      abs_s = hn::Add(abs_s, absd);
      const V az = hn::IfThenElseZero(both, va), bz = hn::IfThenElseZero(both, vb);
      const V dz = hn::IfThenElseZero(both, d);
      na_s = hn::MulAdd(az, az, na_s);
      nb_s = hn::MulAdd(bz, bz, nb_s);
      d2_s = hn::MulAdd(dz, dz, d2_s);
      x_s = hn::MulAdd(dz, hn::Add(az, bz), x_s);

      const V xa = hn::Sub(va, vMa), xb = hn::Sub(vb, vMb);
      const V xa_t = hn::IfThenElseZero(fa, xa), xb_t = hn::IfThenElseZero(fb, xb);
      V pa, pb;
      AddWeights<kSave>(df, xa, xb, xa_t, xb_t, e, p_out, q_out, i, pa, pb, sa_s, sb_s, ta_s, tb_s,
                        ea_s, eb_s);
      AddSecondOrderTerms(df, e, xa_t, xb_t, pa, pb, far, g_s, h_s);
    }
    AddBlockSums(df, tot, abs_s, d2_s, x_s, na_s, nb_s, sa_s, sb_s, ta_s, tb_s, ea_s, eb_s, g_s,
                 h_s);
  }
  st.max_abs = hn::GetLane(hn::MaxOfLanes(df, max_abs));
  st.e_max = hn::GetLane(hn::MaxOfLanes(df, e_max));
  st.e_min = hn::GetLane(hn::MinOfLanes(df, e_min));
}

// ChunkSumsMasked for a chunk where every entry is finite on both sides (the
// common case): no masks, and the extremes of e and |d| come from those of
// d (rounding is monotonic, so max fl(d - c0) = fl(max d - c0), and
// max |d| = max(max d, -min d)): the same totals with fewer instructions.
template <bool kSave, class DF>
HWY_INLINE void ChunkSumsClean(DF df, const float* HWY_RESTRICT a, const float* HWY_RESTRICT b,
                               size_t padded, const NextChunk& next, Totals& tot,
                               SweepState& st, float* HWY_RESTRICT p_out = nullptr,
    float* HWY_RESTRICT q_out = nullptr) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  const float kInfF = std::numeric_limits<float>::infinity();
  const V vMa = hn::Set(df, st.Ma), vMb = hn::Set(df, st.Mb), vc0 = hn::Set(df, st.c0);
  const FarFactors far(st.Ma, st.Mb, st.c0);
  V d_max = hn::Set(df, -kInfF), d_min = hn::Set(df, kInfF);
  const size_t blocks = (padded + kBlockVectors * N - 1) / (kBlockVectors * N);
  for (size_t block = 0; block < padded; block += kBlockVectors * N) {
    next.Fetch(block / (kBlockVectors * N), blocks);
    const size_t block_end = std::min(padded, block + kBlockVectors * N);
    const V z = hn::Zero(df);
    V abs_s = z, d2_s = z, x_s = z, na_s = z, nb_s = z, sa_s = z, sb_s = z;
    V ta_s = z, tb_s = z, ea_s = z, eb_s = z, g_s = z, h_s = z;
    for (size_t i = block; i < block_end; i += N) {
      const V va = hn::LoadU(df, a + i), vb = hn::LoadU(df, b + i);
      const V d = hn::Sub(va, vb);
      const V e = hn::Sub(d, vc0);
      d_max = hn::Max(d_max, d);
      d_min = hn::Min(d_min, d);
      abs_s = hn::Add(abs_s, hn::Abs(d));
      na_s = hn::MulAdd(va, va, na_s);
      nb_s = hn::MulAdd(vb, vb, nb_s);
      d2_s = hn::MulAdd(d, d, d2_s);
      x_s = hn::MulAdd(d, hn::Add(va, vb), x_s);

      const V xa = hn::Sub(va, vMa), xb = hn::Sub(vb, vMb);
      V pa, pb;
      AddWeights<kSave>(df, xa, xb, xa, xb, e, p_out, q_out, i, pa, pb, sa_s, sb_s, ta_s, tb_s, ea_s,
                        eb_s);
      AddSecondOrderTerms(df, e, xa, xb, pa, pb, far, g_s, h_s);
    }
    AddBlockSums(df, tot, abs_s, d2_s, x_s, na_s, nb_s, sa_s, sb_s, ta_s, tb_s, ea_s, eb_s, g_s,
                 h_s);
  }
  const float hi = hn::GetLane(hn::MaxOfLanes(df, d_max));
  const float lo = hn::GetLane(hn::MinOfLanes(df, d_min));
  st.max_abs = std::max({st.max_abs, hi, -lo});
  st.e_max = std::max(st.e_max, hi - st.c0);
  st.e_min = std::min(st.e_min, lo - st.c0);
}

// Both KL directions (and the largest |Δ log-prob|) from the totals, each in
// the form with the smaller rounding error: the log1p form loses
// max(|E[g]|, |E[e]|) / (1 + x) ulps to cancellation inside x, the direct
// form about max(|lse_a|, |lse_b|, 1) ulps. e is 0 wherever a side is masked,
// so max |e| comes from e's extremes.
template <class DF>
HWY_INLINE void FinishKl(DF df, const Totals& tot, const SweepState& st, double Sa, double Sb,
                         double lse_a, double lse_b, double* out) {
  const double kInf = std::numeric_limits<double>::infinity();
  const bool one_sided = st.a_only_masked + st.b_only_masked > 0;
  const double direct = static_cast<double>(st.c0) + lse_b - lse_a;
  const double e_hi = st.e_max, e_lo = st.e_min;
  const bool usable = !one_sided && std::max(e_hi, -e_lo) <= kMaxShiftForCloseForm;
  const double mean_pe = tot.Sum(df, kSumPE) / Sa;  // E_p[e]
  const double mean_qe = tot.Sum(df, kSumQE) / Sb;  // E_q[e]
  const double mean_pg = tot.Sum(df, kSumPG) / Sa;  // E_p[g(e)]
  const double mean_qg = tot.Sum(df, kSumQG) / Sb;  // E_q[g(-e)]
  const double direct_err = std::max({fabs(lse_a), fabs(lse_b), 1.0});
  const double xp = mean_pg - mean_pe, xq = mean_qg + mean_qe;
  const bool precise_p =
      usable && xp > -1 && std::max(fabs(mean_pg), fabs(mean_pe)) / (1 + xp) <= direct_err;
  const bool precise_q =
      usable && xq > -1 && std::max(fabs(mean_qg), fabs(mean_qe)) / (1 + xq) <= direct_err;
  // L from the p side; -L = log E_q[exp(e)] from the q side, so that each
  // direction uses the weights of its own expectation.
  const double L = precise_p ? log1p(xp) : direct;
  const double L_q = precise_q ? log1p(xq) : -direct;
  out[kKlRefCand] = st.b_only_masked ? kInf : mean_pe + L;
  out[kKlCandRef] = st.a_only_masked ? kInf : -mean_qe + L_q;
  out[kMaxAbsLogprob] = one_sided ? kInf : std::max(fabs(e_hi + L), fabs(e_lo + L));
}

// The chunk of both rows that starts at element `begin` (empty past the end).
HWY_INLINE NextChunk NextChunkOf(const RowArgs& r, size_t begin) {
  NextChunk next;
  if (begin < r.n) {
    const size_t len = std::min(kChunk, r.n - begin);
    const size_t ea = DtypeSize(r.a_dtype), eb = DtypeSize(r.b_dtype);
    next.a = static_cast<const uint8_t*>(r.a) + begin * ea;
    next.a_bytes = len * ea;
    next.b = static_cast<const uint8_t*>(r.b) + begin * eb;
    next.b_bytes = len * eb;
  }
  return next;
}

// Jensen-Shannon: a second sweep now that both log-sum-exps are known, over
// the exponentials the first sweep saved, each chunk rescaled to the final
// maxima and normalised: p = saved p * exp(ma[c] - Ma) / Sa (one more
// float32 rounding than exp(a - Ma) / Sa, far below the tolerance).
template <class DF>
HWY_INLINE double JensenShannon(DF df, size_t n, const SavedExps& saved, float Ma, float Mb,
                                double Sa, double Sb) {
  using V = hn::Vec<DF>;
  const F64Tag<DF> dd;
  const size_t N = hn::Lanes(df);
  auto js_lo = hn::Zero(dd), js_hi = hn::Zero(dd);
  for (size_t begin = 0; begin < n; begin += kChunk) {
    const size_t c = begin / kChunk;
    const size_t padded = hwy::RoundUpTo(std::min(kChunk, n - begin), N);
    const V scale_a = hn::Set(df, static_cast<float>(exp(static_cast<double>(saved.ma[c]) - Ma) / Sa));
    const V scale_b = hn::Set(df, static_cast<float>(exp(static_cast<double>(saved.mb[c]) - Mb) / Sb));
    const float* HWY_RESTRICT sp = saved.p + begin;
    const float* HWY_RESTRICT sq = saved.q + begin;
    NextChunk next;
    const size_t ahead = begin + kPrefetchChunks * kChunk;
    if (ahead < n) {
      next.a = reinterpret_cast<const uint8_t*>(saved.p + ahead);
      next.b = reinterpret_cast<const uint8_t*>(saved.q + ahead);
      next.a_bytes = next.b_bytes = std::min(kChunk, n - ahead) * sizeof(float);
    }
    const size_t blocks = (padded + kBlockVectors * N - 1) / (kBlockVectors * N);
    for (size_t block = 0; block < padded; block += kBlockVectors * N) {
      next.Fetch(block / (kBlockVectors * N), blocks);
      const size_t block_end = std::min(padded, block + kBlockVectors * N);
      V js_s = hn::Zero(df);
      for (size_t i = block; i < block_end; i += N) {
        const V p = hn::Mul(hn::Load(df, sp + i), scale_a);
        const V q = hn::Mul(hn::Load(df, sq + i), scale_b);
        const V sum = hn::Add(p, q);
        const auto live = hn::Gt(sum, hn::Zero(df));
        const V u = hn::IfThenElseZero(
            live, hn::Div(hn::Sub(p, q), hn::Max(sum, hn::Set(df, 1e-38f))));
        js_s = hn::MulAdd(sum, JsKernel(df, u), js_s);
      }
      AddF64(df, dd, js_s, js_lo, js_hi);
    }
  }
  return 0.25 * SumF64(dd, js_lo, js_hi);
}

// Rank of token t in the candidate row: its position in the candidate's
// top-k if there, else the count of entries ranked above it (greater, or
// equal at a lower index) from one more sweep of the candidate row.
template <class DF>
HWY_INLINE int64_t RankInCand(DF df, const RowArgs& r, ChunkScratch s, const TopKState& top_b,
                              int64_t t) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  for (size_t j = 0; j < top_b.size; ++j) {
    if (top_b.indices[j] == t) return static_cast<int64_t>(j);
  }
  const float bt = ScalarAt(r.b_dtype, r.b, static_cast<size_t>(t));
  const V vbt = hn::Set(df, bt);
  size_t above = 0;
  for (size_t begin = 0; begin < r.n; begin += kChunk) {
    const size_t len = std::min(kChunk, r.n - begin);
    size_t padded;
    const float* cb = ChunkAsF32(df, r.b_dtype, r.b, begin, len, s.b, &padded);
    for (size_t i = 0; i < padded; i += N) {
      const V vb = hn::LoadU(df, cb + i);
      above += hn::CountTrue(df, hn::Gt(vb, vbt));
      const size_t gi = begin + i;  // ties count only below index t
      if (gi + N <= static_cast<size_t>(t)) {
        above += hn::CountTrue(df, hn::Eq(vb, vbt));
      } else if (gi < static_cast<size_t>(t)) {
        for (size_t j = 0; gi + j < static_cast<size_t>(t); ++j) above += cb[i + j] == bt;
      }
    }
  }
  return static_cast<int64_t>(above);
}

// Computes every field of one row pair into out[kNumRowFields] and
// overlap[num_ks]: one sweep (ChunkMaxima, ChunkSums and the top-k offers per
// chunk), then the fields from the totals; JS and a rank outside the top-k
// take one more sweep each.
template <class DF>
HWY_NOINLINE void CompareRowImpl(DF df, const RowArgs& r, ChunkScratch s, double* out,
                                 int32_t* overlap) {
  const size_t n = r.n;
  const float kInfF = std::numeric_limits<float>::infinity();
  const double kInf = std::numeric_limits<double>::infinity();
  const double kNaN = std::numeric_limits<double>::quiet_NaN();

  for (int i = 0; i < kNumRowFields; ++i) out[i] = kNaN;
  const size_t kmax = std::min<size_t>(n, std::max<size_t>(2, r.ks[r.num_ks - 1]));
  SweepState st;
  st.top_a.Reset(kmax);
  st.top_b.Reset(kmax);
  Totals tot;
  tot.Zero(df);
  const SavedExps saved = r.js ? SavedExpsFor(n) : SavedExps();

  for (size_t begin = 0; begin < n; begin += kChunk) {
    const size_t len = std::min(kChunk, n - begin);
    size_t padded;
    const float* ca = ChunkAsF32(df, r.a_dtype, r.a, begin, len, s.a, &padded);
    const float* cb = ChunkAsF32(df, r.b_dtype, r.b, begin, len, s.b, &padded);
    st.pads += padded - len;
    if (!ChunkMaxima(df, ca, cb, padded, tot, st)) {
      // NaN or +inf: every field is NaN; count them so the caller sees why.
      double bad_a = 0, bad_b = 0;
      for (size_t i = 0; i < n; ++i) {
        bad_a += IsNanOrPosInf(ScalarAt(r.a_dtype, r.a, i));
        bad_b += IsNanOrPosInf(ScalarAt(r.b_dtype, r.b, i));
      }
      out[kNonfiniteRef] = bad_a;
      out[kNonfiniteCand] = bad_b;
      out[kArgmaxRef] = out[kArgmaxCand] = out[kRankOfRefTop1InCand] = -1;
      for (size_t k = 0; k < r.num_ks; ++k) overlap[k] = -1;
      return;
    }
    const NextChunk next = NextChunkOf(r, begin + kPrefetchChunks * kChunk);
    if (r.js) {
      const size_t c = begin / kChunk;
      saved.ma[c] = st.Ma;
      saved.mb[c] = st.Mb;
      float* p_out = saved.p + begin;
      float* q_out = saved.q + begin;
      if (st.chunk_masked) {
        ChunkSumsMasked<true>(df, ca, cb, padded, next, tot, st, p_out, q_out);
      } else {
        ChunkSumsClean<true>(df, ca, cb, padded, next, tot, st, p_out, q_out);
      }
    } else if (st.chunk_masked) {
      ChunkSumsMasked<false>(df, ca, cb, padded, next, tot, st);
    } else {
      ChunkSumsClean<false>(df, ca, cb, padded, next, tot, st);
    }
    // A chunk whose maximum does not beat a full selection's threshold has
    // nothing to offer (ties stay out: they come at higher indices).
    if (!st.top_a.Full() || st.chunk_ma > st.top_a.Threshold()) {
      TopKOffer(df, ca, len, static_cast<int64_t>(begin), st.top_a);
    }
    if (!st.top_b.Full() || st.chunk_mb > st.top_b.Threshold()) {
      TopKOffer(df, cb, len, static_cast<int64_t>(begin), st.top_b);
    }
  }
  st.both_masked -= st.pads;

  out[kNonfiniteRef] = 0;
  out[kNonfiniteCand] = 0;
  const double Sa = tot.Sum(df, kSumP), Sb = tot.Sum(df, kSumQ);
  const bool dist_a = st.Ma > -kInfF, dist_b = st.Mb > -kInfF;
  const double lse_a = dist_a ? st.Ma + log(Sa) : -kInf;
  const double lse_b = dist_b ? st.Mb + log(Sb) : -kInf;
  out[kLseRef] = lse_a;
  out[kLseCand] = lse_b;
  if (dist_a) out[kEntropyRef] = log(Sa) - tot.Sum(df, kSumPX) / Sa;
  if (dist_b) out[kEntropyCand] = log(Sb) - tot.Sum(df, kSumQY) / Sb;

  const size_t compared = n - st.both_masked;
  const bool one_sided = st.a_only_masked + st.b_only_masked > 0;
  if (compared > 0) {
    out[kMaxAbsLogit] = one_sided ? kInf : st.max_abs;
    out[kMeanAbsLogit] = one_sided ? kInf : tot.Sum(df, kSumAbsD) / compared;
  }
  const double na = tot.Sum(df, kSumA2), nb = tot.Sum(df, kSumB2);
  if (na > 0 && nb > 0) {
    // 1 - cos = (|a-b|^2 - (|a| - |b|)^2) / (2 |a| |b|), |a| - |b| = (na - nb) / (|a| + |b|).
    const double ra = sqrt(na), rb = sqrt(nb);
    const double norm_diff = tot.Sum(df, kSumDSum) / (ra + rb);
    out[kCosine] = 1.0 - (tot.Sum(df, kSumD2) - norm_diff * norm_diff) / (2.0 * ra * rb);
  }
  if (dist_a && dist_b) FinishKl(df, tot, st, Sa, Sb, lse_a, lse_b, out);
  if (r.js && dist_a && dist_b) out[kJs] = JensenShannon(df, n, saved, st.Ma, st.Mb, Sa, Sb);

  // Top-k derived fields.
  const int64_t t = st.top_a.indices[0];
  out[kArgmaxRef] = static_cast<double>(t);
  out[kArgmaxCand] = static_cast<double>(st.top_b.indices[0]);
  out[kMarginRef] = n > 1 ? static_cast<double>(st.top_a.values[0]) - st.top_a.values[1] : kInf;
  out[kMarginCand] = n > 1 ? static_cast<double>(st.top_b.values[0]) - st.top_b.values[1] : kInf;
  out[kRankOfRefTop1InCand] = static_cast<double>(RankInCand(df, r, s, st.top_b, t));
  for (size_t q = 0; q < r.num_ks; ++q) {
    const size_t k = static_cast<size_t>(r.ks[q]);
    int32_t common = 0;
    for (size_t x = 0; x < k; ++x) {
      for (size_t y = 0; y < k; ++y) common += st.top_a.indices[x] == st.top_b.indices[y];
    }
    overlap[q] = common;
  }

  if (r.target >= 0) {
    const size_t tt = static_cast<size_t>(r.target);
    const double nll_a = dist_a ? lse_a - ScalarAt(r.a_dtype, r.a, tt) : kNaN;
    const double nll_b = dist_b ? lse_b - ScalarAt(r.b_dtype, r.b, tt) : kNaN;
    out[kNllRef] = nll_a;
    out[kNllCand] = nll_b;
    out[kDeltaP] = exp(-nll_b) - exp(-nll_a);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#endif  // include guard
