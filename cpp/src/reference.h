// Scalar float64 references: the definitions. Plain loops, double
// arithmetic, max-subtracted log-sum-exp; the SIMD kernels are optimisations
// of these and are tested against them.
#ifndef LOGITPARITY_SRC_REFERENCE_H_
#define LOGITPARITY_SRC_REFERENCE_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "logitparity/activation_stats.h"
#include "logitparity/row_metrics.h"

namespace logitparity {

struct RefRowResult {
  double fields[kNumRowFields];
  std::vector<int32_t> topk_common;
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

// Activation statistics. DiffSums of one row pair a, b of length n: plain
// loops in double over the entries finite on both sides.
DiffSums DiffSumsRef(const float* a, const float* b, size_t n);

// The distribution of `values` (rows of `channels` values, row-major), by
// definition: two passes in double (mean, then central sums), counts, finite
// min/max, per-channel max |x|, and |x| quantiles by sorting.
struct DistributionRef {
  uint64_t count = 0, finite = 0, zeros = 0, nans = 0, infs = 0;
  double mean = 0, m2 = 0, m3 = 0, m4 = 0, min = 0, max = 0;
  std::vector<double> channel_max_abs;
  std::vector<double> sorted_abs;  // finite |x|, ascending
  double AbsQuantile(double q) const;  // nearest rank, exact
};
DistributionRef DistributionOfRef(const std::vector<float>& values, size_t channels);

}  // namespace logitparity

#endif  // LOGITPARITY_SRC_REFERENCE_H_
