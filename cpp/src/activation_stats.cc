// Rows loops, dispatch and checked entry points of the activation statistics.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/activation_stats.cc"
#include "hwy/foreach_target.h"  // must come before highway.h
#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "src/activation_stats-inl.h"

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {

// The CUDA kernels' chunks (ChunkFiguresCuda) are the CPU's.
static_assert(kChunk == kActivationChunk, "the moments' chunks must agree");

void DiffRowsT(const RowsView& a, const RowsView& b, size_t begin, size_t end, DiffSums* out) {
  DiffRows(a, b, begin, end, out);
}

void AddBlockT(const RowsView& x, float* channel_max, uint64_t* hist, Moments* moments,
               uint64_t* counts, double* minmax) {
  AddBlock(x, channel_max, hist, moments, counts, minmax);
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <cstring>
#include <stdexcept>
#include <string>

#include "logitparity/cuda.h"
#include "src/thread_pool.h"

namespace logitparity {

HWY_EXPORT(DiffRowsT);
HWY_EXPORT(AddBlockT);

namespace {
// The per-channel max is updated with full-vector loads and stores, so its
// storage is padded to whole vectors of any target: 64 floats (2048 bits). Not
// HWY_MAX_BYTES: here, after foreach_target, it holds the last compiled
// target's width (8 bytes for HWY_SCALAR), which made AVX2 write past the end.
constexpr size_t kChannelPad = 64;

size_t PaddedChannels(size_t channels) {
  return (channels + kChannelPad - 1) / kChannelPad * kChannelPad + kChannelPad;
}
}  // namespace

void DiffSums::Merge(const DiffSums& o) {
  dot += o.dot;
  ref_sq += o.ref_sq;
  cand_sq += o.cand_sq;
  diff_sq += o.diff_sq;
  max_abs = std::max(max_abs, o.max_abs);
  count += o.count;
  nonfinite_ref += o.nonfinite_ref;
  nonfinite_cand += o.nonfinite_cand;
}

double DiffSums::Cosine() const {
  if (ref_sq == 0 && cand_sq == 0) return 1.0;
  if (ref_sq == 0 || cand_sq == 0) return 0.0;
  return dot / std::sqrt(ref_sq * cand_sq);
}

double DiffSums::RelL2() const {
  if (diff_sq == 0) return 0.0;
  if (ref_sq == 0) return std::numeric_limits<double>::infinity();
  return std::sqrt(diff_sq / ref_sq);
}

double DiffSums::SqnrDb() const {
  if (diff_sq == 0) return std::numeric_limits<double>::infinity();
  if (ref_sq == 0) return -std::numeric_limits<double>::infinity();
  return 10.0 * std::log10(ref_sq / diff_sq);
}

void CheckActivationShapes(const RowsView& ref, const RowsView& cand) {
  CheckRows(ref, "reference");
  CheckRows(cand, "candidate");
  if (ref.rows != cand.rows || ref.vocab != cand.vocab) {
    throw std::invalid_argument(
        "reference and candidate activations must have the same shape, got (" +
        std::to_string(ref.rows) + ", " + std::to_string(ref.vocab) + ") and (" +
        std::to_string(cand.rows) + ", " + std::to_string(cand.vocab) +
        "); were both captured at the same module and positions?");
  }
}

DiffSums CompareActivations(const RowsView& ref, const RowsView& cand, DiffSums* per_row,
                            int threads) {
  CheckActivationShapes(ref, cand);
  const auto kernel = HWY_DYNAMIC_DISPATCH(DiffRowsT);
  ParallelForRows(ref.rows, threads, [&](size_t, size_t begin, size_t end) {
    kernel(ref, cand, begin, end, per_row);
  });
  DiffSums merged;
  for (size_t r = 0; r < ref.rows; ++r) merged.Merge(per_row[r]);
  return merged;
}

void Moments::Merge(const Moments& o) {
  if (o.n == 0) return;
  if (n == 0) {
    *this = o;
    return;
  }
  const double na = static_cast<double>(n), nb = static_cast<double>(o.n);
  const double nt = na + nb;
  const double d = o.mean - mean;
  const double d2 = d * d;
  const double m4n = m4 + o.m4 + d2 * d2 * na * nb * (na * na - na * nb + nb * nb) / (nt * nt * nt) +
                     6.0 * d2 * (na * na * o.m2 + nb * nb * m2) / (nt * nt) +
                     4.0 * d * (na * o.m3 - nb * m3) / nt;
  const double m3n = m3 + o.m3 + d2 * d * na * nb * (na - nb) / (nt * nt) +
                     3.0 * d * (na * o.m2 - nb * m2) / nt;
  const double m2n = m2 + o.m2 + d2 * na * nb / nt;
  mean += d * nb / nt;
  m2 = m2n;
  m3 = m3n;
  m4 = m4n;
  n += o.n;
}

DistributionAccumulator::DistributionAccumulator(size_t channels)
    : channels_(channels),
      min_(std::numeric_limits<double>::infinity()),
      max_(-std::numeric_limits<double>::infinity()),
      channel_max_abs_(PaddedChannels(channels), 0.0f),
      hist_(kAbsHistBins, 0) {
  if (channels == 0) {
    throw std::invalid_argument("channels must be >= 1 (the width of every block), got 0");
  }
}

void DistributionAccumulator::CheckBlock(const RowsView& block) const {
  CheckRows(block, "block");
  if (block.vocab != channels_) {
    throw std::invalid_argument("block has " + std::to_string(block.vocab) +
                                " channels, the accumulator " + std::to_string(channels_) +
                                "; add blocks of one module's activations only");
  }
}

void DistributionAccumulator::Add(const RowsView& block) {
  CheckBlock(block);
  uint64_t counts[3] = {0, 0, 0};
  double minmax[2] = {min_, max_};
  HWY_DYNAMIC_DISPATCH(AddBlockT)(block, channel_max_abs_.data(), hist_.data(), &moments_, counts,
                                  minmax);
  count_ += static_cast<uint64_t>(block.rows) * block.vocab;
  zeros_ += counts[0];
  nans_ += counts[1];
  infs_ += counts[2];
  min_ = minmax[0];
  max_ = minmax[1];
}

void DistributionAccumulator::MergeChunk(const ChunkFigures& c) {
  zeros_ += c.zeros;
  nans_ += c.nans;
  infs_ += c.infs;
  min_ = std::min(min_, static_cast<double>(c.min));
  max_ = std::max(max_, static_cast<double>(c.max));
  moments_.Merge(MomentsOf(c));
}

void DistributionAccumulator::AddCuda(const RowsView& block, uintptr_t stream) {
  CheckBlock(block);
  const size_t per_row = (block.vocab + kActivationChunk - 1) / kActivationChunk;
  std::vector<ChunkFigures> chunks(block.rows * per_row);
  std::vector<uint64_t> hist(kAbsHistBins);
  std::vector<float> channel_max(channels_);
  ChunkFiguresCuda(block, chunks.data(), hist.data(), channel_max.data(), stream);
  // Row and chunk order, as Add merges them.
  for (const ChunkFigures& c : chunks) MergeChunk(c);
  count_ += static_cast<uint64_t>(block.rows) * block.vocab;
  for (size_t b = 0; b < kAbsHistBins; ++b) hist_[b] += hist[b];
  for (size_t c = 0; c < channels_; ++c) {
    channel_max_abs_[c] = std::max(channel_max_abs_[c], channel_max[c]);
  }
}

void DistributionAccumulator::Merge(const DistributionAccumulator& o) {
  if (o.channels_ != channels_) {
    throw std::invalid_argument("cannot merge an accumulator of " + std::to_string(o.channels_) +
                                " channels into one of " + std::to_string(channels_));
  }
  count_ += o.count_;
  zeros_ += o.zeros_;
  nans_ += o.nans_;
  infs_ += o.infs_;
  moments_.Merge(o.moments_);
  min_ = std::min(min_, o.min_);
  max_ = std::max(max_, o.max_);
  for (size_t c = 0; c < channels_; ++c) {
    channel_max_abs_[c] = std::max(channel_max_abs_[c], o.channel_max_abs_[c]);
  }
  for (size_t b = 0; b < kAbsHistBins; ++b) hist_[b] += o.hist_[b];
}

std::vector<float> DistributionAccumulator::channel_max_abs() const {
  return std::vector<float>(channel_max_abs_.begin(), channel_max_abs_.begin() + channels_);
}

double DistributionAccumulator::mean() const {
  return moments_.n ? moments_.mean : std::numeric_limits<double>::quiet_NaN();
}

double DistributionAccumulator::variance() const {
  return moments_.n ? moments_.m2 / static_cast<double>(moments_.n)
                    : std::numeric_limits<double>::quiet_NaN();
}

double DistributionAccumulator::skewness() const {
  if (moments_.n == 0 || moments_.m2 == 0) return std::numeric_limits<double>::quiet_NaN();
  return std::sqrt(static_cast<double>(moments_.n)) * moments_.m3 / std::pow(moments_.m2, 1.5);
}

double DistributionAccumulator::kurtosis() const {
  if (moments_.n == 0 || moments_.m2 == 0) return std::numeric_limits<double>::quiet_NaN();
  return static_cast<double>(moments_.n) * moments_.m4 / (moments_.m2 * moments_.m2);
}

uint64_t NearestRank(double q, uint64_t n) {
  // q n within 1e-9 of an integer counts as that integer (0.99 * 100 is
  // 99.00000000000001 in binary floating point).
  const double x = q * static_cast<double>(n);
  double k = std::ceil(x);
  if (k - x > 1.0 - 1e-9) k -= 1.0;
  return static_cast<uint64_t>(std::min(std::max(k, 1.0), static_cast<double>(n)));
}

namespace {
void CheckQuantile(double q) {
  if (!(q > 0.0 && q <= 1.0)) {
    throw std::invalid_argument("quantile q must be in (0, 1] (e.g. 0.999 for p99.9), got " +
                                std::to_string(q));
  }
}

float FloatFromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
}  // namespace

double DistributionAccumulator::AbsQuantile(double q) const {
  CheckQuantile(q);
  if (moments_.n == 0) return std::numeric_limits<double>::quiet_NaN();
  const uint64_t k = NearestRank(q, moments_.n);
  uint64_t seen = 0;
  for (size_t b = 0; b < kAbsHistBins; ++b) {
    seen += hist_[b];
    if (seen >= k) {
      const int shift = 23 - kAbsHistMantissaBits;
      const double lo = FloatFromBits(static_cast<uint32_t>(b) << shift);
      const double hi = b + 1 < kAbsHistBins
                            ? FloatFromBits(static_cast<uint32_t>(b + 1) << shift)
                            : std::numeric_limits<float>::max();
      return 0.5 * (lo + hi);
    }
  }
  return std::numeric_limits<double>::quiet_NaN();  // unreachable: counts sum to n
}

std::vector<double> ExactAbsQuantiles(const RowsView& x, const std::vector<double>& qs) {
  CheckRows(x, "x");
  for (double q : qs) CheckQuantile(q);
  std::vector<float> v;
  v.reserve(x.rows * x.vocab);
  for (size_t r = 0; r < x.rows; ++r) {
    for (size_t i = 0; i < x.vocab; ++i) {
      const float e = LoadElement(x, r, i);
      if (std::isfinite(e)) v.push_back(std::fabs(e));
    }
  }
  std::vector<double> out;
  for (double q : qs) {
    if (v.empty()) {
      out.push_back(std::numeric_limits<double>::quiet_NaN());
      continue;
    }
    const uint64_t k = NearestRank(q, v.size());
    std::nth_element(v.begin(), v.begin() + (k - 1), v.end());
    out.push_back(v[k - 1]);
  }
  return out;
}

}  // namespace logitparity
#endif  // HWY_ONCE
