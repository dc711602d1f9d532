// Rows loop, dispatch and the checked entry point of the standalone top-k
// (topk.h).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/topk.cc"
#include "hwy/foreach_target.h"  // must come before highway.h
#include "hwy/highway.h"
#include "src/thread_pool.h"
#include "src/topk-inl.h"

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {

void TopKRows(const RowsView& x, size_t k, size_t begin, size_t end, float* values,
              int64_t* indices) {
  const hn::ScalableTag<float> df;
  float* const buf = ThreadScratch(kChunk + kMaxLanesF32);  // per worker, kept
  for (size_t r = begin; r < end; ++r) {
    const void* row = static_cast<const uint8_t*>(x.data) + r * x.row_stride * DtypeSize(x.dtype);
    TopKRow(df, x.dtype, row, x.vocab, k, buf, values + r * k, indices + r * k);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <stdexcept>
#include <string>

#include "logitparity/topk.h"

namespace logitparity {

HWY_EXPORT(TopKRows);

void TopK(const RowsView& logits, size_t k, float* values, int64_t* indices, int threads) {
  CheckRows(logits, "logits");
  if (k < 1 || k > logits.vocab) {
    throw std::invalid_argument("k must be in [1, " + std::to_string(logits.vocab) +
                                "] (the vocab size), got " + std::to_string(k));
  }
  const auto kernel = HWY_DYNAMIC_DISPATCH(TopKRows);
  ParallelForRows(logits.rows, threads, [&](size_t, size_t begin, size_t end) {
    kernel(logits, k, begin, end, values, indices);
  });
}

}  // namespace logitparity
#endif  // HWY_ONCE
