// Per-target helpers shared by every row kernel: loading a chunk of a row in
// any storage dtype as float32, exp of max-subtracted logits, and the float64
// accumulation of float vectors.
//
// Chunks are converted into a small float buffer (L1-resident) padded to a
// whole number of vectors with -inf, the neutral element of every kernel
// here: a pad is a masked token on both sides and is never compared
// (ChunkAsF32 skips the copy for float32 chunks of whole vectors).

// Toggle include guard: this file is included once per Highway target.
#if defined(LOGITPARITY_SRC_ROW_LOAD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOGITPARITY_SRC_ROW_LOAD_INL_H_
#undef LOGITPARITY_SRC_ROW_LOAD_INL_H_
#else
#define LOGITPARITY_SRC_ROW_LOAD_INL_H_
#endif

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <limits>

#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "logitparity/rows.h"

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Elements per chunk: two float chunks (ref and cand) take 16 KiB, well
// inside L1, and a multiple of every vector length up to 512 bits.
constexpr size_t kChunk = 2048;
// Largest vector in floats for any target (stack buffers for tails).
constexpr size_t kMaxLanesF32 = HWY_MAX_BYTES / sizeof(float);

// IEEE binary16 bits (in the low half of u32 lanes) to float32. Written with
// integer ops rather than PromoteTo because Highway 1.0.3's f16 promotion on
// targets without F16C turns inf/NaN into large finite values; this version is
// exact for every input on every target (pinned by F16ConversionAllBits).
template <class DF, class VU>
HWY_INLINE hn::Vec<DF> F16BitsToF32(DF df, VU h) {
  const hn::RebindToUnsigned<DF> du;
  const VU sign = hn::ShiftLeft<16>(hn::And(h, hn::Set(du, 0x8000u)));
  const VU shifted = hn::ShiftLeft<13>(hn::And(h, hn::Set(du, 0x7FFFu)));
  const VU exp = hn::And(shifted, hn::Set(du, 0x0F800000u));
  // Normal: rebias the exponent from 15 to 127.
  const VU normal = hn::Add(shifted, hn::Set(du, 0x38000000u));
  // Inf/NaN: exponent 31 -> 255, mantissa (payload) kept.
  const VU infnan = hn::Add(shifted, hn::Set(du, 0x70000000u));
  // Zero/subnormal: m * 2^-24 computed exactly as (1 + m/1024) 2^-14 - 2^-14.
  const hn::Vec<DF> magic = hn::BitCast(df, hn::Set(du, 0x38800000u));
  const hn::Vec<DF> sub =
      hn::Sub(hn::BitCast(df, hn::Add(shifted, hn::Set(du, 0x38800000u))), magic);
  const auto is_infnan = hn::Eq(exp, hn::Set(du, 0x0F800000u));
  const auto is_sub = hn::Eq(exp, hn::Zero(du));
  const hn::Vec<DF> normal_f = hn::BitCast(df, hn::IfThenElse(is_infnan, infnan, normal));
  const hn::Vec<DF> mag = hn::IfThenElse(hn::RebindMask(df, is_sub), sub, normal_f);
  return hn::Or(mag, hn::BitCast(df, sign));
}

template <class DF, class VU>
HWY_INLINE hn::Vec<DF> BF16BitsToF32(DF df, VU h) {
  return hn::BitCast(df, hn::ShiftLeft<16>(h));
}

// One vector of 16-bit elements starting at p, converted to float.
template <Dtype kDtype, class DF>
HWY_INLINE hn::Vec<DF> LoadHalfAsF32(DF df, const uint16_t* HWY_RESTRICT p) {
  const hn::Rebind<uint16_t, DF> d16;
  const hn::RebindToUnsigned<DF> du;
  const auto h = hn::PromoteTo(du, hn::LoadU(d16, p));
  if (kDtype == Dtype::kF16) return F16BitsToF32(df, h);
  return BF16BitsToF32(df, h);
}

template <Dtype kDtype, class DF>
HWY_INLINE hn::Vec<DF> LoadAsF32(DF df, const void* HWY_RESTRICT base, size_t i) {
  if (kDtype == Dtype::kF32) return hn::LoadU(df, static_cast<const float*>(base) + i);
  return LoadHalfAsF32<kDtype>(df, static_cast<const uint16_t*>(base) + i);
}

// Converts elements [0, len) of `src` (dtype kDtype) to float in out[0, len)
// and fills out[len, RoundUp(len, N)) with -inf. Returns the padded length.
// The partial last vector goes through a padded stack buffer: Highway 1.0.3's
// MaskedLoad reads past the end for 16-bit types.
template <Dtype kDtype, class DF>
HWY_INLINE size_t LoadChunkAsF32(DF df, const void* HWY_RESTRICT src, size_t len,
                                 float* HWY_RESTRICT out) {
  const size_t N = hn::Lanes(df);
  size_t i = 0;
  for (; i + N <= len; i += N) hn::StoreU(LoadAsF32<kDtype>(df, src, i), df, out + i);
  if (i == len) return len;
  const size_t rest = len - i;
  if (kDtype == Dtype::kF32) {
    HWY_ALIGN float buf[kMaxLanesF32];
    for (size_t j = 0; j < N; ++j) buf[j] = -std::numeric_limits<float>::infinity();
    memcpy(buf, static_cast<const float*>(src) + i, rest * sizeof(float));
    hn::StoreU(hn::LoadU(df, buf), df, out + i);
  } else {
    // -inf in binary16 is 0xFC00, in bfloat16 0xFF80.
    const uint16_t pad = kDtype == Dtype::kF16 ? 0xFC00u : 0xFF80u;
    HWY_ALIGN uint16_t buf[kMaxLanesF32];
    for (size_t j = 0; j < N; ++j) buf[j] = pad;
    memcpy(buf, static_cast<const uint16_t*>(src) + i, rest * sizeof(uint16_t));
    hn::StoreU(LoadHalfAsF32<kDtype>(df, buf), df, out + i);
  }
  return i + N;
}

// Converts [begin, begin + len) of a row stored as `dtype` into out.
template <class DF>
HWY_INLINE size_t LoadChunk(DF df, Dtype dtype, const void* row, size_t begin, size_t len,
                            float* HWY_RESTRICT out) {
  switch (dtype) {
    case Dtype::kF16:
      return LoadChunkAsF32<Dtype::kF16>(df, static_cast<const uint16_t*>(row) + begin, len, out);
    case Dtype::kBF16:
      return LoadChunkAsF32<Dtype::kBF16>(df, static_cast<const uint16_t*>(row) + begin, len, out);
    case Dtype::kF32:
    default:
      return LoadChunkAsF32<Dtype::kF32>(df, static_cast<const float*>(row) + begin, len, out);
  }
}

// The chunk [begin, begin + len) of a row as float: the row's own memory when
// it is float32 and len is a whole number of vectors (nothing to convert or
// pad: the sweeps read it in place, unaligned loads), else converted into
// buf as LoadChunk does. *padded: len rounded up to whole vectors.
template <class DF>
HWY_INLINE const float* ChunkAsF32(DF df, Dtype dtype, const void* row, size_t begin, size_t len,
                                   float* HWY_RESTRICT buf, size_t* padded) {
  if (dtype == Dtype::kF32 && len % hn::Lanes(df) == 0) {
    *padded = len;
    return static_cast<const float*>(row) + begin;
  }
  *padded = LoadChunk(df, dtype, row, begin, len, buf);
  return buf;
}

HWY_INLINE float ScalarAt(Dtype dtype, const void* row, size_t i) {
  switch (dtype) {
    case Dtype::kF16: return ::logitparity::F16BitsToF32(static_cast<const uint16_t*>(row)[i]);
    case Dtype::kBF16: return ::logitparity::BF16BitsToF32(static_cast<const uint16_t*>(row)[i]);
    case Dtype::kF32:
    default: return static_cast<const float*>(row)[i];
  }
}

// e^x for x <= 0, including -inf (masked tokens). The range reduction is that
// of Highway's Exp (x = q ln2 + r, ln2 in two parts), but every argument
// here has been max-subtracted, so it is cheaper in three ways:
// - q comes from one FMA with the shifter 1.5 * 2^23 + 127 (round to
//   nearest, exact for |q| < 2^22), and the low bits of that float are
//   already q + 127, the biased exponent of 2^q: no float->int conversion
//   (Highway's ConvertTo adds four overflow fix-up instructions on x86) and
//   no separate rounding;
// - 2^q is built in one step instead of Exp's two-factor scaling for
//   large |x|, and below -87 (results < 2^-125, against a largest term of 1
//   in every sum here) the result is 0, which also covers -inf and keeps q
//   in [-126, 0], so no clamp is needed before the reduction;
// - e^r - 1 = r + r^2 c(r) with c of degree 4, fitted for |r| <= ln2/2
//   (approximation error 4.6e-9 relative, against 1.1e-9 for Exp's degree 5).
// Every float in [-87, 0] (stride 7 in the bit patterns, 1.6e8 points, a C
// emulation of these steps with fmaf): worst error 8.6e-8 relative, 8.2e-8
// with Exp's polynomial; TestExpNonPositive pins 2e-7 on every target.
// Fused row kernel, one thread, one 16384-wide fp32 row pair in L2 (this
// 2-core AMD EPYC, AVX3, shared; min of 2000 calls): 1.64 -> 1.53 ns per
// element without JS, 2.59 -> 2.40 with.
template <class DF>
HWY_INLINE hn::Vec<DF> ExpNonPositive(DF df, hn::Vec<DF> x) {
  const hn::RebindToUnsigned<DF> du;
  const auto lo = hn::Set(df, -87.0f);
  const auto shifter = hn::Set(df, 12582912.0f + 127.0f);  // 1.5 * 2^23 + exponent bias
  const auto t = hn::MulAdd(x, hn::Set(df, 1.442695040888963407359924681f), shifter);
  const auto qf = hn::Sub(t, shifter);
  auto r = hn::MulAdd(qf, hn::Set(df, -0.693145751953125f), x);
  r = hn::MulAdd(qf, hn::Set(df, -1.428606765330187045e-6f), r);
  auto c = hn::Set(df, 0.0013814532f);
  c = hn::MulAdd(c, r, hn::Set(df, 0.008368746f));
  c = hn::MulAdd(c, r, hn::Set(df, 0.041668393f));
  c = hn::MulAdd(c, r, hn::Set(df, 0.1666652f));
  c = hn::MulAdd(c, r, hn::Set(df, 0.49999994f));
  const auto em1 = hn::MulAdd(c, hn::Mul(r, r), r);  // e^r - 1
  const auto scale = hn::BitCast(df, hn::ShiftLeft<23>(hn::BitCast(du, t)));
  return hn::IfThenElseZero(hn::Gt(x, lo), hn::MulAdd(em1, scale, scale));
}

// Tag of the float64 accumulators paired with float tag DF: half as many
// lanes (a float vector is promoted in two halves), or one lane on HWY_SCALAR.
#if HWY_TARGET == HWY_SCALAR
template <class DF>
using F64Tag = hn::Rebind<double, DF>;
#else
template <class DF>
using F64Tag = hn::Repartition<double, DF>;
#endif

// f64 accumulation of a float vector: the lower and upper halves are promoted
// and added to two double accumulators.
template <class DF, class DD>
HWY_INLINE void AddF64(DF /*df*/, DD dd, hn::Vec<DF> v, hn::Vec<DD>& lo, hn::Vec<DD>& hi) {
#if HWY_TARGET == HWY_SCALAR
  (void)hi;
  lo = hn::Add(lo, hn::PromoteTo(dd, v));
#else
  lo = hn::Add(lo, hn::PromoteTo(dd, hn::LowerHalf(v)));
  hi = hn::Add(hi, hn::PromoteTo(dd, hn::UpperHalf(hn::Half<DF>(), v)));
#endif
}

// lo/hi += a * b with a, b promoted first: the product of two floats is exact
// in double.
template <class DF, class DD>
HWY_INLINE void MulAddF64(DF /*df*/, DD dd, hn::Vec<DF> a, hn::Vec<DF> b, hn::Vec<DD>& lo,
                          hn::Vec<DD>& hi) {
#if HWY_TARGET == HWY_SCALAR
  (void)hi;
  lo = hn::MulAdd(hn::PromoteTo(dd, a), hn::PromoteTo(dd, b), lo);
#else
  const hn::Half<DF> dh;
  lo = hn::MulAdd(hn::PromoteTo(dd, hn::LowerHalf(a)), hn::PromoteTo(dd, hn::LowerHalf(b)), lo);
  hi = hn::MulAdd(hn::PromoteTo(dd, hn::UpperHalf(dh, a)), hn::PromoteTo(dd, hn::UpperHalf(dh, b)),
                  hi);
#endif
}

// v - sub computed in float64 and rounded once to float. -inf stays -inf
// (DemoteTo would clamp it to -FLT_MAX).
template <class DF, class DD>
HWY_INLINE hn::Vec<DF> SubF64(DF df, DD dd, hn::Vec<DF> v, hn::Vec<DD> sub) {
#if HWY_TARGET == HWY_SCALAR
  const hn::Vec<DF> r = hn::DemoteTo(df, hn::Sub(hn::PromoteTo(dd, v), sub));
#else
  const hn::Half<DF> dh;
  const hn::Vec<DF> r =
      hn::Combine(df, hn::DemoteTo(dh, hn::Sub(hn::PromoteTo(dd, hn::UpperHalf(dh, v)), sub)),
                  hn::DemoteTo(dh, hn::Sub(hn::PromoteTo(dd, hn::LowerHalf(v)), sub)));
#endif
  const hn::Vec<DF> ninf = hn::Set(df, -std::numeric_limits<float>::infinity());
  return hn::IfThenElse(hn::Eq(v, ninf), ninf, r);
}

template <class DD>
HWY_INLINE double SumF64(DD dd, hn::Vec<DD> lo, hn::Vec<DD> hi) {
  return hn::GetLane(hn::SumOfLanes(dd, hn::Add(lo, hi)));
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#endif  // include guard
