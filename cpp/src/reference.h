// Scalar float64 references: the definitions. Plain loops, double
// arithmetic, max-subtracted log-sum-exp; the SIMD kernels are optimisations
// of these and are tested against them.
#ifndef LOGITPARITY_SRC_REFERENCE_H_
#define LOGITPARITY_SRC_REFERENCE_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "logitparity/row_metrics.h"

namespace logitparity {

struct RefRowResult {
  double fields[kNumRowFields];
  std::vector<int32_t> topk_overlap;
};

// One row pair (a, b) of length n, already converted to float. target < 0:
// none. ks: sorted unique top-k sizes.
RefRowResult CompareRowRef(const float* a, const float* b, size_t n,
                           int64_t target, const std::vector<int>& ks);

double LogSumExpRef(const float* x, size_t n);
void LogSoftmaxRef(const float* x, size_t n, double* out);
// Indices of the k largest values, by value descending, ties to lower index.
std::vector<int64_t> TopKRef(const float* x, size_t n, size_t k);
double NllRef(const float* x, size_t n, int64_t target);

}  // namespace logitparity

#endif  // LOGITPARITY_SRC_REFERENCE_H_
