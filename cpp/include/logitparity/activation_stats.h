// Statistics of activation tensors (rows x width, e.g. positions x hidden):
// the difference between a reference and a candidate tensor, and the
// distribution of one tensor as a mergeable accumulator. Plain types only: no
// Highway types cross this header.
#ifndef LOGITPARITY_ACTIVATION_STATS_H_
#define LOGITPARITY_ACTIVATION_STATS_H_

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "logitparity/rows.h"

namespace logitparity {

// Sums over the entries finite on both sides (a = reference, b = candidate),
// accumulated in float64, from which every difference figure is derived.
// Entries where either side is NaN or +-inf are left out of the sums and
// counted in nonfinite_ref / nonfinite_cand (per side).
struct DiffSums {
  double dot = 0;      // sum a_i b_i
  double ref_sq = 0;   // sum a_i^2
  double cand_sq = 0;  // sum b_i^2
  double diff_sq = 0;  // sum (b_i - a_i)^2, the difference taken in float64
  double max_abs = 0;  // max |b_i - a_i|
  uint64_t count = 0;  // entries finite on both sides
  uint64_t nonfinite_ref = 0;
  uint64_t nonfinite_cand = 0;

  // Merge another set of sums (sums add, max_abs takes the max).
  void Merge(const DiffSums& o);
  // dot / sqrt(ref_sq cand_sq); 1 when both are all zeros, 0 when only one is.
  double Cosine() const;
  // sqrt(diff_sq / ref_sq); 0 when diff_sq == 0, +inf when ref_sq == 0 < diff_sq.
  double RelL2() const;
  // 10 log10(ref_sq / diff_sq) in dB; +inf when diff_sq == 0.
  double SqnrDb() const;
};

// The checks of CompareActivations (and of its CUDA twin): both views valid,
// the same rows x width; std::invalid_argument naming both shapes otherwise.
void CheckActivationShapes(const RowsView& ref, const RowsView& cand);

// Row-wise sums of ref vs cand (same rows x width, any storage dtypes) into
// per_row[0, rows); returns their merge (in row order, so bitwise the same for
// any thread count). threads: 0 = all cores.
DiffSums CompareActivations(const RowsView& ref, const RowsView& cand,
                            DiffSums* per_row, int threads = 0);

// Count, mean and central sums M2 = sum (x - mean)^2, M3, M4 of a set of
// values; Merge combines two disjoint sets with the pairwise formulas of Chan,
// Golub and LeVeque (1979) and Pebay (2008), exact in exact arithmetic.
struct Moments {
  uint64_t n = 0;
  double mean = 0, m2 = 0, m3 = 0, m4 = 0;
  void Merge(const Moments& o);
};

// Elements per chunk of a row for the moments: each chunk's mean and central
// sums are computed on their own and merged in row and chunk order.
constexpr size_t kActivationChunk = 2048;

// What one chunk of a block contributes to a DistributionAccumulator (the
// CPU kernel and the CUDA kernels compute these; they are merged in row and
// chunk order).
struct ChunkFigures {
  uint64_t n = 0, zeros = 0, nans = 0, infs = 0;  // finite, == 0, NaN, +-inf entries
  double mean = 0, m2 = 0, m3 = 0, m4 = 0;        // over the finite entries (0 when none)
  // over the finite entries (+inf, -inf when none)
  float min = std::numeric_limits<float>::infinity();
  float max = -std::numeric_limits<float>::infinity();
};

// A chunk's moments, to merge into the running ones.
inline Moments MomentsOf(const ChunkFigures& c) {
  Moments m;
  m.n = c.n;
  m.mean = c.mean;
  m.m2 = c.m2;
  m.m3 = c.m3;
  m.m4 = c.m4;
  return m;
}

// |x| quantiles from the histogram carry a relative error of at most
// 2^-(kAbsHistMantissaBits + 1) (half a bin; bins are 2^-kAbsHistMantissaBits
// wide relative to their lower edge) for |x| >= 2^-126, and an absolute error
// below 2^-126 under it. 7 bits: 0.39%, 32640 bins (255 KiB of counts).
constexpr int kAbsHistMantissaBits = 7;
constexpr size_t kAbsHistBins = 0x7F800000u >> (23 - kAbsHistMantissaBits);

// The distribution of one activation tensor, accumulated block by block
// (Add one block, Merge another accumulator). Moments are central sums merged
// with the pairwise formulas of Chan et al. and Pebay (2008), one chunk of
// 2048 elements at a time, so they stay accurate for large offsets.
class DistributionAccumulator {
 public:
  // channels: the width of every block (the per-channel max has this length).
  explicit DistributionAccumulator(size_t channels);

  // rows x channels, any storage dtype. Throws std::invalid_argument if the
  // width differs from `channels`.
  void Add(const RowsView& block);
  // Add for a block in CUDA device memory, read in place on `stream` (a
  // cudaStream_t as an integer); returns when the block's figures are merged.
  // The same figures as Add: counts, extremes, per-channel max and histogram
  // exactly, moments up to the summation order inside each chunk.
  // std::runtime_error in a build without CUDA or without a usable GPU.
  void AddCuda(const RowsView& block, uintptr_t stream);
  // Throws std::invalid_argument if the channel counts differ.
  void Merge(const DistributionAccumulator& other);

  size_t channels() const { return channels_; }
  uint64_t count() const { return count_; }        // every element seen
  uint64_t finite() const { return moments_.n; }          // finite elements (in the moments)
  uint64_t zeros() const { return zeros_; }        // == 0 (either sign)
  uint64_t nans() const { return nans_; }
  uint64_t infs() const { return infs_; }          // +inf or -inf
  double mean() const;                             // NaN when no finite element
  double variance() const;                         // population: M2 / n
  double skewness() const;                         // sqrt(n) M3 / M2^1.5
  double kurtosis() const;                         // n M4 / M2^2 (Pearson; 3 for a Gaussian)
  double min() const { return min_; }              // over finite elements; +inf when none
  double max() const { return max_; }              // -inf when none
  // max |x| per channel over finite elements (0 for a channel with none).
  std::vector<float> channel_max_abs() const;
  // Nearest-rank quantile of |x| over finite elements (the smallest v with at
  // least ceil(q n) values <= v), from the histogram; error bound above. q in
  // (0, 1]; NaN when there are no finite elements.
  double AbsQuantile(double q) const;

  // Raw central sums (for tests and for merging state across processes).
  const Moments& moments() const { return moments_; }
  const std::vector<uint64_t>& abs_histogram() const { return hist_; }

 private:
  size_t channels_;
  uint64_t count_ = 0, zeros_ = 0, nans_ = 0, infs_ = 0;
  Moments moments_;
  double min_, max_;
  void CheckBlock(const RowsView& block) const;
  void MergeChunk(const ChunkFigures& c);
  std::vector<float> channel_max_abs_;  // padded to whole vectors of any target
  std::vector<uint64_t> hist_;
};

// 1-based nearest rank of quantile q among n values: ceil(q n), computed so
// that q n landing on an integer up to rounding (0.99 * 100) is not bumped to
// the next rank; at least 1, at most n.
uint64_t NearestRank(double q, uint64_t n);

// Exact nearest-rank quantiles of |x| over the finite elements of a view
// (nth_element on a copy): one value per q in qs, q in (0, 1]; NaN where
// there is no finite element.
std::vector<double> ExactAbsQuantiles(const RowsView& x, const std::vector<double>& qs);

}  // namespace logitparity

#endif  // LOGITPARITY_ACTIVATION_STATS_H_
