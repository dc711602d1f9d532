// The fused row comparison: one call compares each reference row with the
// candidate row of the same index and yields every field of the DESIGN table.
#ifndef LOGITPARITY_ROW_METRICS_H_
#define LOGITPARITY_ROW_METRICS_H_

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "logitparity/rows.h"
#include "logitparity/topk.h"

namespace logitparity {

struct RowMetricsOptions {
  // Sorted, unique, each in [1, min(kMaxTopK, vocab)].
  std::vector<int> topk = {1, 5, 10};
  // Target token per row, or -1 for none; empty = no targets.
  const int64_t* targets = nullptr;
  // Jensen-Shannon costs a second sweep with two logs per element; off (the
  // default, as in the Python API) skips it and js is NaN.
  bool js = false;
  // 0 = all cores; at most MaxThreads().
  int threads = 0;
};

// Field order of the per-row double results. Integer-valued fields are stored
// as doubles too (exact below 2^53), -1 where undefined (NaN rows).
enum RowField : int {
  kLseRef = 0,
  kLseCand,
  kKlRefCand,
  kKlCandRef,
  kJs,
  kCosine,
  kMaxAbsLogit,
  kMeanAbsLogit,
  kMaxAbsLogprob,
  kEntropyRef,
  kEntropyCand,
  kMarginRef,
  kMarginCand,
  kNllRef,
  kNllCand,
  kDeltaP,
  kArgmaxRef,
  kArgmaxCand,
  kRankOfRefTop1InCand,
  kNonfiniteRef,
  kNonfiniteCand,
  kNumRowFields
};
// The integer-valued fields are the last ones, from here on.
constexpr int kFirstIntField = kArgmaxRef;

const char* RowFieldName(int field);

// Largest accepted thread count (every `threads` argument): 4x the cores, at
// least 64. Larger requests are std::invalid_argument.
size_t MaxThreads();

struct RowMetricsResult {
  size_t rows = 0;
  std::vector<int> topk;
  // rows x kNumRowFields, row-major.
  std::vector<double> fields;
  // rows x topk.size(), row-major; -1 for NaN rows.
  std::vector<int32_t> topk_common;
};

// The checks of CompareRows (and CompareRowsCuda): same vocab and rows, topk
// sorted and in range, targets in [-1, vocab). std::invalid_argument naming
// the argument.
void CheckCompareArgs(const RowsView& ref, const RowsView& cand,
                      const RowMetricsOptions& options);

// The error for target id `got` at `row` outside [-1, vocab): the one message
// of CheckCompareArgs and of CompareRowsCuda's check of device targets.
std::invalid_argument TargetOutOfRange(size_t vocab, int64_t got, size_t row);

// Checks shapes and options (std::invalid_argument naming the argument), then
// computes every row, splitting rows over a thread pool. Results are bitwise
// identical for any thread count and any row batching.
RowMetricsResult CompareRows(const RowsView& ref, const RowsView& cand,
                             const RowMetricsOptions& options);

}  // namespace logitparity

#endif  // LOGITPARITY_ROW_METRICS_H_
