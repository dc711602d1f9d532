// Standalone per-row kernels: log-sum-exp, log-softmax and the NLL of a
// target (top-k: topk-inl.h). Input domain: raw logits (float32, float16 or bfloat16). Units: nats.
// Log-sum-exp accumulates exp(x - running max) in float64 (online softmax,
// one read of the row); log-softmax subtracts it in float64 and rounds once
// to float32. Tolerances against the references: log_softmax_test.cc.

#if defined(LOGITPARITY_SRC_LOG_SOFTMAX_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOGITPARITY_SRC_LOG_SOFTMAX_INL_H_
#undef LOGITPARITY_SRC_LOG_SOFTMAX_INL_H_
#else
#define LOGITPARITY_SRC_LOG_SOFTMAX_INL_H_
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "src/row_load-inl.h"

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// log sum exp(x) of one row; NaN if it holds NaN or +inf, -inf if every
// entry is -inf. buf: kChunk + kMaxLanesF32 floats, aligned.
template <class DF>
HWY_NOINLINE double LogSumExpRow(DF df, Dtype dtype, const void* row, size_t n, float* buf) {
  using V = hn::Vec<DF>;
  const F64Tag<DF> dd;
  const size_t N = hn::Lanes(df);
  const float kInfF = std::numeric_limits<float>::infinity();
  const V pinf = hn::Set(df, kInfF), ninf = hn::Set(df, -kInfF);
  float M = -kInfF;
  auto lo = hn::Zero(dd), hi = hn::Zero(dd);
  for (size_t begin = 0; begin < n; begin += kChunk) {
    const size_t len = std::min(kChunk, n - begin);
    const size_t padded = LoadChunk(df, dtype, row, begin, len, buf);
    V vm = ninf;
    auto bad = hn::FirstN(df, 0);
    for (size_t i = 0; i < padded; i += N) {
      const V v = hn::Load(df, buf + i);
      vm = hn::Max(vm, v);
      bad = hn::Or(bad, hn::Not(hn::Lt(v, pinf)));
    }
    if (!hn::AllFalse(df, bad)) return std::numeric_limits<double>::quiet_NaN();
    const float m = hn::GetLane(hn::MaxOfLanes(df, vm));
    if (m > M) {
      if (M > -kInfF) {
        const auto scale = hn::Set(dd, exp(static_cast<double>(M) - m));
        lo = hn::Mul(lo, scale);
        hi = hn::Mul(hi, scale);
      }
      M = m;
    }
    const V vM = hn::Set(df, M);
    for (size_t i = 0; i < padded; i += N) {
      const V v = hn::Load(df, buf + i);
      AddF64(df, dd, ExpNonPositive(df, hn::Sub(v, vM)), lo, hi);
    }
  }
  if (!(M > -kInfF)) return -std::numeric_limits<double>::infinity();
  return M + log(SumF64(dd, lo, hi));
}

// out[i] = x[i] - lse in float64, rounded once to float32. out may alias the
// row when both are float32 (each chunk is read before it is written).
template <class DF>
HWY_NOINLINE void LogSoftmaxRow(DF df, Dtype dtype, const void* row, size_t n, float* buf,
                                float* out) {
  const F64Tag<DF> dd;
  const size_t N = hn::Lanes(df);
  const double lse = LogSumExpRow(df, dtype, row, n, buf);
  const auto vlse = hn::Set(dd, lse);
  for (size_t begin = 0; begin < n; begin += kChunk) {
    const size_t len = std::min(kChunk, n - begin);
    LoadChunk(df, dtype, row, begin, len, buf);
    size_t i = 0;
    for (; i + N <= len; i += N) {
      hn::StoreU(SubF64(df, dd, hn::Load(df, buf + i), vlse), df, out + begin + i);
    }
    for (; i < len; ++i) out[begin + i] = static_cast<float>(buf[i] - lse);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#endif  // include guard
