// Top-k selection of one row, one Highway target per inclusion: the running
// k largest (value, index) pairs, shared by the fused comparison
// (row_metrics-inl.h) and the standalone TopK (topk.cc). Order: value
// descending, ties to the lower index; NaN never enters (a row holding NaN
// gives NaN values and -1 indices in TopKRow). Tests: topk_test.cc.

#if defined(LOGITPARITY_SRC_TOPK_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOGITPARITY_SRC_TOPK_INL_H_
#undef LOGITPARITY_SRC_TOPK_INL_H_
#else
#define LOGITPARITY_SRC_TOPK_INL_H_
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "hwy/highway.h"
#include "logitparity/topk.h"
#include "src/row_load-inl.h"

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The k largest (value, index) pairs seen so far, sorted by value descending
// then index ascending. Elements must be offered in increasing index order:
// an element equal to the current k-th value then has a higher index and
// does not qualify, which is exactly the "ties to the lower index" rule.
struct TopKState {
  size_t k = 0;
  size_t size = 0;
  float values[kMaxTopK];
  int64_t indices[kMaxTopK];

  void Reset(size_t new_k) {
    k = new_k;
    size = 0;
  }
  bool Full() const { return size == k; }
  float Threshold() const { return values[k - 1]; }

  void Offer(float v, int64_t idx) {
    if (size == k && !(v > values[k - 1])) return;
    // First position whose value is smaller than v (equal values stay ahead).
    size_t pos = size < k ? size : k - 1;
    while (pos > 0 && values[pos - 1] < v) --pos;
    const size_t last = size < k ? size : k - 1;
    for (size_t j = last; j > pos; --j) {
      values[j] = values[j - 1];
      indices[j] = indices[j - 1];
    }
    values[pos] = v;
    indices[pos] = idx;
    if (size < k) ++size;
  }
};

// Offers the `len` floats at x (indices base, base+1, ...) to the state,
// skipping whole vectors that cannot enter once the state is full. NaN never
// enters (callers treat rows holding NaN separately).
template <class DF>
HWY_INLINE void TopKOffer(DF df, const float* HWY_RESTRICT x, size_t len, int64_t base,
                          TopKState& state) {
  const size_t N = hn::Lanes(df);
  size_t i = 0;
  while (i < len && !state.Full()) {
    state.Offer(x[i], base + static_cast<int64_t>(i));
    ++i;
  }
  for (; i + N <= len; i += N) {
    const auto v = hn::LoadU(df, x + i);
    if (hn::AllFalse(df, hn::Gt(v, hn::Set(df, state.Threshold())))) continue;
    for (size_t j = 0; j < N; ++j) state.Offer(x[i + j], base + static_cast<int64_t>(i + j));
  }
  for (; i < len; ++i) state.Offer(x[i], base + static_cast<int64_t>(i));
}

// Top-k of one row into values/indices (k entries). A row holding NaN gets
// NaN values and -1 indices.
template <class DF>
HWY_NOINLINE void TopKRow(DF df, Dtype dtype, const void* row, size_t n, size_t k, float* buf,
                          float* values, int64_t* indices) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  TopKState state;
  // k may exceed kMaxTopK for the standalone function: select in blocks of
  // kMaxTopK is not needed for the sizes used here, so larger k falls back to
  // a partial sort of (value, index) pairs.
  if (k > kMaxTopK) {
    std::vector<std::pair<float, int64_t>> all(n);
    for (size_t i = 0; i < n; ++i) all[i] = {ScalarAt(dtype, row, i), static_cast<int64_t>(i)};
    for (const auto& p : all) {
      if (std::isnan(p.first)) {
        for (size_t j = 0; j < k; ++j) { values[j] = NAN; indices[j] = -1; }
        return;
      }
    }
    std::partial_sort(all.begin(), all.begin() + k, all.end(),
                      [](const std::pair<float, int64_t>& x, const std::pair<float, int64_t>& y) {
                        return x.first > y.first || (x.first == y.first && x.second < y.second);
                      });
    for (size_t j = 0; j < k; ++j) { values[j] = all[j].first; indices[j] = all[j].second; }
    return;
  }
  state.Reset(k);
  for (size_t begin = 0; begin < n; begin += kChunk) {
    const size_t len = std::min(kChunk, n - begin);
    const size_t padded = LoadChunk(df, dtype, row, begin, len, buf);
    auto nan = hn::FirstN(df, 0);
    for (size_t i = 0; i < padded; i += N) {
      const V v = hn::Load(df, buf + i);
      nan = hn::Or(nan, hn::Not(hn::Eq(v, v)));  // Ne is an ordered compare
    }
    if (!hn::AllFalse(df, nan)) {
      for (size_t j = 0; j < k; ++j) { values[j] = NAN; indices[j] = -1; }
      return;
    }
    TopKOffer(df, buf, len, static_cast<int64_t>(begin), state);
  }
  for (size_t j = 0; j < k; ++j) {
    values[j] = state.values[j];
    indices[j] = state.indices[j];
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#endif  // include guard
