// Top-k of each row: the k largest logits and their indices.
#ifndef LOGITPARITY_TOPK_H_
#define LOGITPARITY_TOPK_H_

#include <cstddef>
#include <cstdint>

#include "logitparity/rows.h"

namespace logitparity {

// Largest k of the fused comparison (RowMetricsOptions::topk): its running
// selection keeps k (value, index) pairs per side in a fixed array, and 64
// covers every overlap@k a report shows. The standalone TopK accepts any k up
// to the vocab size (larger k take a partial sort).
constexpr size_t kMaxTopK = 64;

// Top-k values (as float32) and indices per row, sorted by value descending,
// ties to the lower index. values/indices are rows x k.
void TopK(const RowsView& logits, size_t k, float* values, int64_t* indices,
          int threads = 0);

}  // namespace logitparity

#endif  // LOGITPARITY_TOPK_H_
