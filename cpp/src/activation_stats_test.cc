// Activation statistics on every compiled target against the scalar float64
// references: difference sums of row pairs and the distribution accumulator,
// on lengths around the vector width, misaligned starts, NaN, +-inf, zeros,
// large offsets and every storage dtype.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/activation_stats_test.cc"
#include "hwy/foreach_target.h"  // must come before highway.h
#include "hwy/highway.h"
#include "hwy/tests/hwy_gtest.h"
#include "src/activation_stats-inl.h"
#include "src/reference.h"
#include "src/test_util.h"

#ifndef LOGITPARITY_ACTIVATION_STATS_TEST_ONCE_
#define LOGITPARITY_ACTIVATION_STATS_TEST_ONCE_
namespace logitparity {

// Activations shaped like a transformer's hidden states: a Gaussian bulk
// around `offset`, a few outlier channels 30x larger.
inline std::vector<float> Activations(size_t n, uint64_t seed, float offset = 0.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> bulk(0.0f, 1.0f);
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = offset + bulk(rng) * ((i % 97 == 5) ? 30.0f : 1.0f);
  return x;
}

// Rows x channels stored in `dtype`, each row starting `misalign` elements
// into a padded stride (rows are never aligned), with the exact values.
struct TypedRows {
  TypedRow storage;
  RowsView view;
  std::vector<float> values;  // rows x channels, row-major
};

inline TypedRows MakeRows(const std::vector<float>& x, size_t rows, size_t channels, Dtype dtype,
                          size_t misalign) {
  const size_t stride = channels + 3;
  std::vector<float> padded(rows * stride, 0.0f);
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < channels; ++c) padded[r * stride + c] = x[r * channels + c];
  }
  TypedRows t;
  t.storage = MakeRow(padded, dtype, misalign);
  t.view = RowsView{t.storage.data(), dtype, rows, channels, stride};
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < channels; ++c) t.values.push_back(t.storage.values[r * stride + c]);
  }
  return t;
}

inline bool CloseRel(double got, double want, double rtol, double atol = 0.0) {
  return Close(got, want, atol, rtol);
}

}  // namespace logitparity
#endif

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

void CheckDiff(const DiffSums& got, const DiffSums& want, const char* what, size_t n, Dtype da,
               Dtype db) {
  const char* t = hwy::TargetName(HWY_TARGET);
  // Sums of products of floats in float64, in another order than the
  // reference: 1e-12 relative (measured: below 1e-15 for n <= 5000).
  const double scale = want.ref_sq + want.cand_sq;
  if (!CloseRel(got.dot, want.dot, 1e-12, 1e-12 * scale) ||
      !CloseRel(got.ref_sq, want.ref_sq, 1e-12) || !CloseRel(got.cand_sq, want.cand_sq, 1e-12) ||
      !CloseRel(got.diff_sq, want.diff_sq, 1e-12)) {
    HWY_ABORT("%s %s n=%zu %s/%s: dot %.17g/%.17g ref_sq %.17g/%.17g cand_sq %.17g/%.17g "
              "diff_sq %.17g/%.17g (got/want)",
              t, what, n, DtypeName(da), DtypeName(db), got.dot, want.dot, got.ref_sq, want.ref_sq,
              got.cand_sq, want.cand_sq, got.diff_sq, want.diff_sq);
  }
  if (got.max_abs != want.max_abs || got.count != want.count ||
      got.nonfinite_ref != want.nonfinite_ref || got.nonfinite_cand != want.nonfinite_cand) {
    HWY_ABORT("%s %s n=%zu: max_abs %.17g/%.17g count %llu/%llu nonfinite %llu,%llu/%llu,%llu", t,
              what, n, got.max_abs, want.max_abs, static_cast<unsigned long long>(got.count),
              static_cast<unsigned long long>(want.count),
              static_cast<unsigned long long>(got.nonfinite_ref),
              static_cast<unsigned long long>(got.nonfinite_cand),
              static_cast<unsigned long long>(want.nonfinite_ref),
              static_cast<unsigned long long>(want.nonfinite_cand));
  }
}

void TestDiffRows() {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  const float kInf = std::numeric_limits<float>::infinity();
  const Dtype pairs[][2] = {{Dtype::kF32, Dtype::kF32}, {Dtype::kF32, Dtype::kBF16},
                            {Dtype::kF32, Dtype::kF16}, {Dtype::kBF16, Dtype::kBF16},
                            {Dtype::kF16, Dtype::kF16}, {Dtype::kBF16, Dtype::kF32}};
  for (size_t n : {size_t{1}, N - 1, N, N + 1, 3 * N + 2, size_t{576}, kChunk + 3, size_t{5000}}) {
    if (n == 0) continue;
    for (const auto& pair : pairs) {
      for (size_t misalign : {size_t{0}, size_t{1}}) {
        const size_t rows = 4;
        std::vector<float> a, b;
        for (size_t r = 0; r < rows; ++r) {
          std::vector<float> ar = Activations(n, 10 * n + r);
          std::vector<float> br = Perturb(ar, 0.01f, 10 * n + r + 7);
          if (r == 1) {  // non-finite entries on one side or both
            ar[n / 2] = NAN;
            br[n - 1] = kInf;
            if (n > 2) br[0] = -kInf;
          }
          if (r == 2) {
            for (auto& v : br) v = 0.0f;  // an all-zero candidate row
          }
          if (r == 3 && n > 1) {
            ar[1] = kInf;
            br[1] = kInf;  // inf on both sides: out of the sums, counted on both
          }
          a.insert(a.end(), ar.begin(), ar.end());
          b.insert(b.end(), br.begin(), br.end());
        }
        const TypedRows ta = MakeRows(a, rows, n, pair[0], misalign);
        const TypedRows tb = MakeRows(b, rows, n, pair[1], misalign + 1);
        std::vector<DiffSums> got(rows);
        DiffRows(ta.view, tb.view, 0, rows, got.data());
        for (size_t r = 0; r < rows; ++r) {
          const DiffSums want =
              DiffSumsRef(ta.values.data() + r * n, tb.values.data() + r * n, n);
          CheckDiff(got[r], want, "row", n, pair[0], pair[1]);
        }
      }
    }
  }
  // Identical rows: exactly zero difference, cosine 1, relative L2 0, SQNR +inf.
  const std::vector<float> x = Activations(3 * N + 1, 5);
  auto bufa = hwy::AllocateAligned<float>(kChunk + kMaxLanesF32);
  auto bufb = hwy::AllocateAligned<float>(kChunk + kMaxLanesF32);
  const DiffSums same = DiffRow(df, Dtype::kF32, x.data(), Dtype::kF32, x.data(), x.size(),
                                bufa.get(), bufb.get());
  if (same.diff_sq != 0 || same.max_abs != 0 || same.RelL2() != 0 ||
      !(same.SqnrDb() == HUGE_VAL) || !(std::fabs(same.Cosine() - 1.0) < 1e-15)) {
    HWY_ABORT("%s identical rows: diff_sq %g max_abs %g cosine %.17g", hwy::TargetName(HWY_TARGET),
              same.diff_sq, same.max_abs, same.Cosine());
  }
}

// The accumulator state driven by this target's AddBlock.
struct TargetAccumulator {
  explicit TargetAccumulator(size_t channels)
      : channel_max(channels + 64, 0.0f), hist(kAbsHistBins, 0) {}
  std::vector<float> channel_max;
  std::vector<uint64_t> hist;
  Moments moments;
  uint64_t counts[3] = {0, 0, 0};
  double minmax[2] = {HUGE_VAL, -HUGE_VAL};
  void Add(const RowsView& v) {
    AddBlock(v, channel_max.data(), hist.data(), &moments, counts, minmax);
  }
};

void CheckDistribution(const TargetAccumulator& got, const DistributionRef& want, size_t channels,
                       const char* what, size_t rows, Dtype dt) {
  const char* t = hwy::TargetName(HWY_TARGET);
  const Moments& m = got.moments;
  if (m.n != want.finite || got.counts[0] != want.zeros || got.counts[1] != want.nans ||
      got.counts[2] != want.infs) {
    HWY_ABORT("%s %s %zux%zu %s: counts n %llu/%llu zeros %llu/%llu nans %llu/%llu infs %llu/%llu",
              t, what, rows, channels, DtypeName(dt), static_cast<unsigned long long>(m.n),
              static_cast<unsigned long long>(want.finite),
              static_cast<unsigned long long>(got.counts[0]),
              static_cast<unsigned long long>(want.zeros),
              static_cast<unsigned long long>(got.counts[1]),
              static_cast<unsigned long long>(want.nans),
              static_cast<unsigned long long>(got.counts[2]),
              static_cast<unsigned long long>(want.infs));
  }
  if (want.finite == 0) return;
  if (got.minmax[0] != want.min || got.minmax[1] != want.max) {
    HWY_ABORT("%s %s: min %.9g/%.9g max %.9g/%.9g", t, what, got.minmax[0], want.min,
              got.minmax[1], want.max);
  }
  for (size_t c = 0; c < channels; ++c) {
    if (got.channel_max[c] != want.channel_max_abs[c]) {
      HWY_ABORT("%s %s channel %zu: max|x| %.9g want %.9g", t, what, c, got.channel_max[c],
                want.channel_max_abs[c]);
    }
  }
  // Chunk moments merged pairwise vs one two-pass sum: the mean within 1e-13
  // of the spread (sqrt(m2/n)) plus 1e-15 |mean|; M2 within 1e-11 relative;
  // M3 and M4 within 1e-9 of their natural scales n sigma^3 and n sigma^4.
  const double n = static_cast<double>(want.finite);
  const double sigma = std::sqrt(want.m2 / n);
  if (!CloseRel(m.mean, want.mean, 1e-15, 1e-13 * sigma) ||
      !CloseRel(m.m2, want.m2, 1e-11, 1e-300) ||
      !CloseRel(m.m3, want.m3, 0.0, 1e-9 * n * sigma * sigma * sigma + 1e-300) ||
      !CloseRel(m.m4, want.m4, 1e-9, 1e-300)) {
    HWY_ABORT("%s %s %zux%zu %s: mean %.17g/%.17g m2 %.17g/%.17g m3 %.17g/%.17g m4 %.17g/%.17g",
              t, what, rows, channels, DtypeName(dt), m.mean, want.mean, m.m2, want.m2, m.m3,
              want.m3, m.m4, want.m4);
  }
  // Histogram counts: each finite |x| in the bin of its top bits.
  uint64_t total = 0;
  for (uint64_t h : got.hist) total += h;
  if (total != want.finite) HWY_ABORT("%s %s: histogram holds %llu of %llu", t, what,
                                      static_cast<unsigned long long>(total),
                                      static_cast<unsigned long long>(want.finite));
}

void TestDistribution() {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  const float kInf = std::numeric_limits<float>::infinity();
  struct Shape {
    size_t rows, channels;
  };
  for (const Shape s : {Shape{1, 1}, Shape{3, N - 1}, Shape{2, N}, Shape{2, N + 1},
                        Shape{4, 3 * N + 2}, Shape{5, 576}, Shape{2, kChunk + 3}}) {
    if (s.channels == 0) continue;
    for (Dtype dt : {Dtype::kF32, Dtype::kF16, Dtype::kBF16}) {
      for (float offset : {0.0f, 300.0f}) {  // large mean: the two-pass sums must hold
        std::vector<float> x = Activations(s.rows * s.channels, s.rows * 131 + s.channels, offset);
        if (x.size() > 4) {
          x[1] = 0.0f;
          x[2] = -0.0f;
          x[3] = NAN;
          x[x.size() - 1] = kInf;
          x[x.size() / 2] = -kInf;
        }
        for (size_t misalign : {size_t{0}, size_t{1}}) {
          const TypedRows tr = MakeRows(x, s.rows, s.channels, dt, misalign);
          const DistributionRef want = DistributionOfRef(tr.values, s.channels);
          TargetAccumulator one(s.channels);
          one.Add(tr.view);
          CheckDistribution(one, want, s.channels, "one block", s.rows, dt);
          // Row by row into two accumulators, then merged: the same figures.
          TargetAccumulator a(s.channels), b(s.channels);
          for (size_t r = 0; r < s.rows; ++r) {
            RowsView row = tr.view;
            row.data = static_cast<const uint8_t*>(tr.view.data) +
                       r * tr.view.row_stride * DtypeSize(dt);
            row.rows = 1;
            (r % 2 ? b : a).Add(row);
          }
          a.moments.Merge(b.moments);
          for (int i = 0; i < 3; ++i) a.counts[i] += b.counts[i];
          a.minmax[0] = std::min(a.minmax[0], b.minmax[0]);
          a.minmax[1] = std::max(a.minmax[1], b.minmax[1]);
          for (size_t c = 0; c < s.channels; ++c) {
            a.channel_max[c] = std::max(a.channel_max[c], b.channel_max[c]);
          }
          for (size_t h = 0; h < kAbsHistBins; ++h) a.hist[h] += b.hist[h];
          CheckDistribution(a, want, s.channels, "merged rows", s.rows, dt);
        }
      }
    }
  }
  // All non-finite: no moments, counts only.
  std::vector<float> bad = {NAN, kInf, -kInf};
  TargetAccumulator acc(3);
  acc.Add(RowsView{bad.data(), Dtype::kF32, 1, 3, 3});
  if (acc.moments.n != 0 || acc.counts[1] != 1 || acc.counts[2] != 2) {
    HWY_ABORT("%s all non-finite: n %llu nans %llu infs %llu", hwy::TargetName(HWY_TARGET),
              static_cast<unsigned long long>(acc.moments.n),
              static_cast<unsigned long long>(acc.counts[1]),
              static_cast<unsigned long long>(acc.counts[2]));
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace logitparity {
HWY_BEFORE_TEST(ActivationStatsTest);
HWY_EXPORT_AND_TEST_P(ActivationStatsTest, TestDiffRows);
HWY_EXPORT_AND_TEST_P(ActivationStatsTest, TestDistribution);

TEST(ActivationStatsPublic, CompareActivationsMergedAndThreads) {
  const size_t rows = 37, width = 577;
  std::vector<float> a = Activations(rows * width, 1), b = Perturb(a, 0.05f, 2);
  b[5] = NAN;
  RowsView va{a.data(), Dtype::kF32, rows, width, width};
  RowsView vb{b.data(), Dtype::kF32, rows, width, width};
  std::vector<DiffSums> r1(rows), r3(rows);
  const DiffSums m1 = CompareActivations(va, vb, r1.data(), 1);
  const DiffSums m3 = CompareActivations(va, vb, r3.data(), 3);
  EXPECT_EQ(m1.diff_sq, m3.diff_sq);  // bitwise for any thread count
  EXPECT_EQ(m1.dot, m3.dot);
  const DiffSums want = DiffSumsRef(a.data(), b.data(), a.size());
  EXPECT_NEAR(m1.diff_sq, want.diff_sq, 1e-12 * want.diff_sq);
  EXPECT_EQ(m1.nonfinite_cand, 1u);
  EXPECT_EQ(m1.count, rows * width - 1);
  EXPECT_NEAR(m1.RelL2(), std::sqrt(want.diff_sq / want.ref_sq), 1e-12);
  EXPECT_NEAR(m1.SqnrDb(), 10 * std::log10(want.ref_sq / want.diff_sq), 1e-9);
  EXPECT_NEAR(m1.Cosine(), want.dot / std::sqrt(want.ref_sq * want.cand_sq), 1e-12);
  RowsView bad = vb;
  bad.vocab = width - 1;
  EXPECT_THROW(CompareActivations(va, bad, r1.data()), std::invalid_argument);
  // Degenerate rows: all zeros on both sides, or only on the reference side.
  DiffSums z;
  EXPECT_EQ(z.Cosine(), 1.0);
  EXPECT_EQ(z.RelL2(), 0.0);
  z.diff_sq = 1.0;
  EXPECT_EQ(z.RelL2(), HUGE_VAL);
  EXPECT_EQ(z.SqnrDb(), -HUGE_VAL);
}

TEST(ActivationStatsPublic, NearestRank) {
  EXPECT_EQ(NearestRank(0.99, 100), 99u);   // 0.99 * 100 rounds above 99 in binary
  EXPECT_EQ(NearestRank(0.999, 1000), 999u);
  EXPECT_EQ(NearestRank(0.5, 3), 2u);
  EXPECT_EQ(NearestRank(1.0, 7), 7u);
  EXPECT_EQ(NearestRank(1e-9, 7), 1u);
  EXPECT_EQ(NearestRank(0.9999, 10), 10u);
}

TEST(ActivationStatsPublic, AccumulatorQuantilesAndMerge) {
  const size_t channels = 576, rows = 300;
  std::vector<float> x = Activations(rows * channels, 9, 0.5f);
  x[17] = NAN;
  x[18] = std::numeric_limits<float>::infinity();
  x[19] = 0.0f;
  DistributionAccumulator whole(channels), first(channels), second(channels);
  whole.Add(RowsView{x.data(), Dtype::kF32, rows, channels, channels});
  first.Add(RowsView{x.data(), Dtype::kF32, 100, channels, channels});
  second.Add(RowsView{x.data() + 100 * channels, Dtype::kF32, 200, channels, channels});
  first.Merge(second);
  const DistributionRef want = DistributionOfRef(x, channels);
  for (const DistributionAccumulator* acc : {&whole, &first}) {
    EXPECT_EQ(acc->count(), rows * channels);
    EXPECT_EQ(acc->finite(), want.finite);
    EXPECT_EQ(acc->nans(), 1u);
    EXPECT_EQ(acc->infs(), 1u);
    EXPECT_EQ(acc->zeros(), want.zeros);
    EXPECT_EQ(acc->min(), want.min);
    EXPECT_EQ(acc->max(), want.max);
    const double n = static_cast<double>(want.finite);
    EXPECT_NEAR(acc->mean(), want.mean, 1e-13);
    EXPECT_NEAR(acc->variance(), want.m2 / n, 1e-11 * want.m2 / n);
    EXPECT_NEAR(acc->skewness(), std::sqrt(n) * want.m3 / std::pow(want.m2, 1.5), 1e-9);
    EXPECT_NEAR(acc->kurtosis(), n * want.m4 / (want.m2 * want.m2), 1e-9);
    const std::vector<float> cm = acc->channel_max_abs();
    ASSERT_EQ(cm.size(), channels);
    for (size_t c = 0; c < channels; ++c) EXPECT_EQ(cm[c], want.channel_max_abs[c]);
    // The histogram quantile is within half a bin (2^-8 relative) of the exact one.
    const std::vector<double> qs = {0.5, 0.99, 0.999, 0.9999, 1.0};
    const std::vector<double> exact =
        ExactAbsQuantiles(RowsView{x.data(), Dtype::kF32, rows, channels, channels}, qs);
    for (size_t i = 0; i < qs.size(); ++i) {
      EXPECT_EQ(exact[i], want.AbsQuantile(qs[i]));
      const double bound = std::ldexp(1.0, -(kAbsHistMantissaBits + 1));
      EXPECT_LE(std::fabs(acc->AbsQuantile(qs[i]) - exact[i]), bound * exact[i]) << qs[i];
    }
  }
  EXPECT_THROW(whole.AbsQuantile(0.0), std::invalid_argument);
  EXPECT_THROW(whole.AbsQuantile(1.5), std::invalid_argument);
  DistributionAccumulator other(channels + 1);
  EXPECT_THROW(whole.Merge(other), std::invalid_argument);
  EXPECT_THROW(whole.Add(RowsView{x.data(), Dtype::kF32, 1, channels - 1, channels}),
               std::invalid_argument);
  EXPECT_THROW(DistributionAccumulator(0), std::invalid_argument);
  DistributionAccumulator empty(4);
  EXPECT_TRUE(std::isnan(empty.mean()));
  EXPECT_TRUE(std::isnan(empty.AbsQuantile(0.99)));
}
// The public accumulator on channel counts that are not whole vectors (its
// per-channel storage is padded; the best target's full-vector stores must
// stay inside it).
TEST(ActivationStatsPublic, AccumulatorOddChannelCounts) {
  for (size_t channels : {size_t{1}, size_t{5}, size_t{17}, size_t{63}, size_t{577}, size_t{2051}}) {
    const size_t rows = 3;
    std::vector<float> x = Activations(rows * channels, channels, -2.0f);
    DistributionAccumulator acc(channels);
    acc.Add(RowsView{x.data(), Dtype::kF32, rows, channels, channels});
    const DistributionRef want = DistributionOfRef(x, channels);
    EXPECT_EQ(acc.finite(), want.finite);
    EXPECT_EQ(acc.min(), want.min);
    EXPECT_EQ(acc.max(), want.max);
    const std::vector<float> cm = acc.channel_max_abs();
    ASSERT_EQ(cm.size(), channels);
    for (size_t c = 0; c < channels; ++c) EXPECT_EQ(cm[c], want.channel_max_abs[c]) << channels;
    EXPECT_NEAR(acc.mean(), want.mean, 1e-12 * (1 + std::fabs(want.mean)));
  }
}
}  // namespace logitparity
#endif  // HWY_ONCE
