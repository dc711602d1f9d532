// Per-target kernels for activation statistics. Input: one row (or one chunk
// of a row) of activations already converted to float32 in an L1-resident
// buffer padded to whole vectors (LoadChunk); the pad lanes are masked off
// here with FirstN, never counted. Every sum accumulates in float64 (each
// float is promoted first, so products of two floats are exact). Tolerances
// against the float64 references (reference.cc) are pinned in
// activation_stats_test.cc: 1e-12 relative for the sums, exact for counts,
// min, max, max |diff| and the per-channel max.

#if defined(LOGITPARITY_SRC_ACTIVATION_STATS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOGITPARITY_SRC_ACTIVATION_STATS_INL_H_
#undef LOGITPARITY_SRC_ACTIVATION_STATS_INL_H_
#else
#define LOGITPARITY_SRC_ACTIVATION_STATS_INL_H_
#endif

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "logitparity/activation_stats.h"
#include "src/row_metrics-inl.h"

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The two float64 halves of a float vector; on HWY_SCALAR (one lane) the
// upper half is zero, which every consumer below treats as a neutral lane.
template <class DF, class DD>
HWY_INLINE void PromoteHalves(DF /*df*/, DD dd, hn::Vec<DF> v, hn::Vec<DD>& lo,
                              hn::Vec<DD>& hi) {
#if HWY_TARGET == HWY_SCALAR
  lo = hn::PromoteTo(dd, v);
  hi = hn::Zero(dd);
#else
  lo = hn::PromoteTo(dd, hn::LowerHalf(v));
  hi = hn::PromoteTo(dd, hn::UpperHalf(hn::Half<DF>(), v));
#endif
}

// Lanes [0, len - i) of the vector at i are real elements; the rest are pad.
template <class DF>
HWY_INLINE hn::Mask<DF> ValidLanes(DF df, size_t i, size_t len) {
  const size_t N = hn::Lanes(df);
  return i + N <= len ? hn::FirstN(df, N) : hn::FirstN(df, len - i);
}

// One group of figures: the float64 sums of a reference/candidate pair.
template <class DF>
struct DiffAccumulator {
  using DD = F64Tag<DF>;
  using VD = hn::Vec<DD>;
  DD dd;
  VD dot, ref_sq, cand_sq, diff_sq, max_abs;
  uint64_t count = 0, nonfinite_ref = 0, nonfinite_cand = 0;

  // Written out: an implicit constructor would not carry the target's
  // attributes (GCC then refuses to inline hn::Zero into it).
  HWY_INLINE DiffAccumulator()
      : dot(hn::Zero(dd)),
        ref_sq(hn::Zero(dd)),
        cand_sq(hn::Zero(dd)),
        diff_sq(hn::Zero(dd)),
        max_abs(hn::Zero(dd)) {}

  HWY_INLINE void Update(DF df, hn::Vec<DF> a, hn::Vec<DF> b, hn::Mask<DF> valid) {
    const auto fa = hn::IsFinite(a);
    const auto fb = hn::IsFinite(b);
    nonfinite_ref += hn::CountTrue(df, hn::AndNot(fa, valid));
    nonfinite_cand += hn::CountTrue(df, hn::AndNot(fb, valid));
    const auto both = hn::And(valid, hn::And(fa, fb));
    count += hn::CountTrue(df, both);
    const auto az = hn::IfThenElseZero(both, a);
    const auto bz = hn::IfThenElseZero(both, b);
    VD alo, ahi, blo, bhi;
    PromoteHalves(df, dd, az, alo, ahi);
    PromoteHalves(df, dd, bz, blo, bhi);
    dot = hn::MulAdd(alo, blo, hn::MulAdd(ahi, bhi, dot));
    ref_sq = hn::MulAdd(alo, alo, hn::MulAdd(ahi, ahi, ref_sq));
    cand_sq = hn::MulAdd(blo, blo, hn::MulAdd(bhi, bhi, cand_sq));
    const VD dlo = hn::Sub(blo, alo), dhi = hn::Sub(bhi, ahi);
    diff_sq = hn::MulAdd(dlo, dlo, hn::MulAdd(dhi, dhi, diff_sq));
    max_abs = hn::Max(max_abs, hn::Max(hn::Abs(dlo), hn::Abs(dhi)));
  }

  HWY_INLINE DiffSums Reduce() const {
    DiffSums s;
    s.dot = hn::GetLane(hn::SumOfLanes(dd, dot));
    s.ref_sq = hn::GetLane(hn::SumOfLanes(dd, ref_sq));
    s.cand_sq = hn::GetLane(hn::SumOfLanes(dd, cand_sq));
    s.diff_sq = hn::GetLane(hn::SumOfLanes(dd, diff_sq));
    s.max_abs = hn::GetLane(hn::MaxOfLanes(dd, max_abs));
    s.count = count;
    s.nonfinite_ref = nonfinite_ref;
    s.nonfinite_cand = nonfinite_cand;
    return s;
  }
};

// Difference sums of one row pair of length n >= 1. bufa, bufb: kChunk +
// kMaxLanesF32 floats each.
template <class DF>
HWY_NOINLINE DiffSums DiffRow(DF df, Dtype a_dtype, const void* a, Dtype b_dtype, const void* b,
                              size_t n, float* HWY_RESTRICT bufa, float* HWY_RESTRICT bufb) {
  const size_t N = hn::Lanes(df);
  DiffAccumulator<DF> acc;
  for (size_t begin = 0; begin < n; begin += kChunk) {
    const size_t len = std::min(kChunk, n - begin);
    LoadChunk(df, a_dtype, a, begin, len, bufa);
    LoadChunk(df, b_dtype, b, begin, len, bufb);
    for (size_t i = 0; i < len; i += N) {
      acc.Update(df, hn::LoadU(df, bufa + i), hn::LoadU(df, bufb + i), ValidLanes(df, i, len));
    }
  }
  return acc.Reduce();
}

// Figures of one chunk of one tensor (ChunkFigures): counts, extremes and
// the chunk's own mean and central sums (two sweeps over the L1-resident
// chunk), which the caller merges into its running moments.
// x: len floats (padded to whole vectors). channel_max: len (padded) running
// per-channel max |x| for the channels of this chunk. bins: len (padded)
// histogram bin of |x| per element, kAbsHistBins for non-finite ones.
template <class DF>
HWY_NOINLINE ChunkFigures MomentsChunk(DF df, const float* HWY_RESTRICT x, size_t len,
                                       float* HWY_RESTRICT channel_max,
                                       uint32_t* HWY_RESTRICT bins) {
  using DD = F64Tag<DF>;
  using VD = hn::Vec<DD>;
  const DD dd;
  const hn::RebindToUnsigned<DF> du;
  const size_t N = hn::Lanes(df);
  const float kInf = std::numeric_limits<float>::infinity();
  ChunkFigures c;
  VD sum = hn::Zero(dd);
  auto vmin = hn::Set(df, kInf), vmax = hn::Set(df, -kInf);
  const auto zero = hn::Zero(df);
  for (size_t i = 0; i < len; i += N) {
    const auto v = hn::LoadU(df, x + i);
    const auto valid = ValidLanes(df, i, len);
    const auto fin = hn::And(valid, hn::IsFinite(v));
    c.n += hn::CountTrue(df, fin);
    c.nans += hn::CountTrue(df, hn::And(valid, hn::IsNaN(v)));
    c.infs += hn::CountTrue(df, hn::And(valid, hn::IsInf(v)));
    c.zeros += hn::CountTrue(df, hn::And(valid, hn::Eq(v, zero)));
    vmin = hn::Min(vmin, hn::IfThenElse(fin, v, hn::Set(df, kInf)));
    vmax = hn::Max(vmax, hn::IfThenElse(fin, v, hn::Set(df, -kInf)));
    const auto av = hn::IfThenElseZero(fin, hn::Abs(v));
    hn::StoreU(hn::Max(hn::LoadU(df, channel_max + i), av), df, channel_max + i);
    // The histogram bin is the top bits of |x| (exponent and 7 mantissa bits).
    const auto bin = hn::ShiftRight<23 - kAbsHistMantissaBits>(hn::BitCast(du, av));
    hn::StoreU(hn::IfThenElse(hn::RebindMask(du, fin), bin,
                              hn::Set(du, static_cast<uint32_t>(kAbsHistBins))),
               du, bins + i);
    VD lo, hi;
    PromoteHalves(df, dd, hn::IfThenElseZero(fin, v), lo, hi);
    sum = hn::Add(sum, hn::Add(lo, hi));
  }
  c.min = hn::GetLane(hn::MinOfLanes(df, vmin));
  c.max = hn::GetLane(hn::MaxOfLanes(df, vmax));
  if (c.n == 0) return c;
  c.mean = hn::GetLane(hn::SumOfLanes(dd, sum)) / static_cast<double>(c.n);
  // Second sweep: central sums; non-finite and pad lanes get weight 0 (their
  // value is zeroed first so that inf * 0 never makes a NaN).
  const VD mean = hn::Set(dd, c.mean);
  VD m2 = hn::Zero(dd), m3 = hn::Zero(dd), m4 = hn::Zero(dd);
  for (size_t i = 0; i < len; i += N) {
    const auto v = hn::LoadU(df, x + i);
    const auto fin = hn::And(ValidLanes(df, i, len), hn::IsFinite(v));
    VD lo, hi, wlo, whi;
    PromoteHalves(df, dd, hn::IfThenElseZero(fin, v), lo, hi);
    PromoteHalves(df, dd, hn::IfThenElseZero(fin, hn::Set(df, 1.0f)), wlo, whi);
    const VD dlo = hn::Mul(hn::Sub(lo, mean), wlo), dhi = hn::Mul(hn::Sub(hi, mean), whi);
    const VD d2lo = hn::Mul(dlo, dlo), d2hi = hn::Mul(dhi, dhi);
    m2 = hn::Add(m2, hn::Add(d2lo, d2hi));
    m3 = hn::MulAdd(d2lo, dlo, hn::MulAdd(d2hi, dhi, m3));
    m4 = hn::MulAdd(d2lo, d2lo, hn::MulAdd(d2hi, d2hi, m4));
  }
  c.m2 = hn::GetLane(hn::SumOfLanes(dd, m2));
  c.m3 = hn::GetLane(hn::SumOfLanes(dd, m3));
  c.m4 = hn::GetLane(hn::SumOfLanes(dd, m4));
  return c;
}

HWY_INLINE const void* ActRowPtr(const RowsView& v, size_t r) {
  return static_cast<const uint8_t*>(v.data) + r * v.row_stride * DtypeSize(v.dtype);
}

HWY_INLINE void DiffRows(const RowsView& a, const RowsView& b, size_t begin, size_t end,
                         DiffSums* out) {
  const hn::ScalableTag<float> df;
  auto bufa = hwy::AllocateAligned<float>(kChunk + kMaxLanesF32);
  auto bufb = hwy::AllocateAligned<float>(kChunk + kMaxLanesF32);
  for (size_t r = begin; r < end; ++r) {
    out[r] = DiffRow(df, a.dtype, ActRowPtr(a, r), b.dtype, ActRowPtr(b, r), a.vocab, bufa.get(),
                     bufb.get());
  }
}

// Chunk by chunk over each row, in row order: the chunk's own moments are
// merged into `moments`, so how a tensor is split into blocks changes the
// result only by the merge formulas' rounding.
// channel_max: x.vocab rounded up to whole vectors; hist: kAbsHistBins.
HWY_INLINE void AddBlock(const RowsView& x, float* channel_max, uint64_t* hist,
                         Moments* moments, uint64_t* counts, double* minmax) {
  const hn::ScalableTag<float> df;
  auto buf = hwy::AllocateAligned<float>(kChunk + kMaxLanesF32);
  auto bins = hwy::AllocateAligned<uint32_t>(kChunk + kMaxLanesF32);
  for (size_t r = 0; r < x.rows; ++r) {
    const void* row = ActRowPtr(x, r);
    for (size_t begin = 0; begin < x.vocab; begin += kChunk) {
      const size_t len = std::min(kChunk, x.vocab - begin);
      LoadChunk(df, x.dtype, row, begin, len, buf.get());
      const ChunkFigures c = MomentsChunk(df, buf.get(), len, channel_max + begin, bins.get());
      for (size_t i = 0; i < len; ++i) {
        if (bins[i] < kAbsHistBins) ++hist[bins[i]];
      }
      counts[0] += c.zeros;
      counts[1] += c.nans;
      counts[2] += c.infs;
      minmax[0] = std::min(minmax[0], static_cast<double>(c.min));
      minmax[1] = std::max(minmax[1], static_cast<double>(c.max));
      moments->Merge(MomentsOf(c));
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#endif  // include guard
