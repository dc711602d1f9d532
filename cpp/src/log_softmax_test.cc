// Standalone kernels (log-sum-exp, log-softmax, NLL) on every compiled
// target against the scalar float64 references.
#include <cmath>
#include <limits>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/log_softmax_test.cc"
#include "hwy/foreach_target.h"  // must come before highway.h
#include "hwy/highway.h"
#include "hwy/tests/hwy_gtest.h"
#include "logitparity/log_softmax.h"
#include "src/log_softmax-inl.h"
#include "src/reference.h"
#include "src/test_util.h"

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

void TestStandaloneKernels() {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  auto buf = hwy::AllocateAligned<float>(kChunk + kMaxLanesF32);
  ForEachKernelTestRow(N, kChunk, [&](size_t n, const TypedRow& row) {
    const Dtype dt = row.dtype;
    const float* v = row.values.data();
    const double want_lse = LogSumExpRef(v, n);
    const double got_lse = LogSumExpRow(df, dt, row.data(), n, buf.get());
    if (!Close(got_lse, want_lse, 1e-6, 1e-6)) {
      HWY_ABORT("%s lse n=%zu %s: got %.12g want %.12g", hwy::TargetName(HWY_TARGET), n,
                DtypeName(dt), got_lse, want_lse);
    }
    std::vector<float> out(n);
    std::vector<double> want(n);
    LogSoftmaxRow(df, dt, row.data(), n, buf.get(), out.data());
    LogSoftmaxRef(v, n, want.data());
    for (size_t i = 0; i < n; ++i) {
      // One rounding to float32 of the float64 difference, plus the lse error.
      if (!Close(out[i], want[i], 2e-6, 1.2e-7)) {
        HWY_ABORT("%s log_softmax n=%zu %s i=%zu: got %.9g want %.9g",
                  hwy::TargetName(HWY_TARGET), n, DtypeName(dt), i, out[i], want[i]);
      }
    }
    const size_t t = (n * 7) / 11;
    const double want_nll = NllRef(v, n, static_cast<int64_t>(t));
    const double got_nll = got_lse > -HUGE_VAL ? got_lse - v[t] : NAN;
    if (!Close(got_nll, want_nll, 1e-6, 1e-6)) {
      HWY_ABORT("%s nll n=%zu: got %.12g want %.12g", hwy::TargetName(HWY_TARGET), n,
                got_nll, want_nll);
    }
  });
  // NaN: NaN log-sum-exp.
  std::vector<float> x = LmLogits(100, 3);
  x[50] = NAN;
  if (!std::isnan(LogSumExpRow(df, Dtype::kF32, x.data(), x.size(), buf.get()))) {
    HWY_ABORT("lse of a NaN row must be NaN");
  }
}

// ExpNonPositive against std::exp in double on a dense grid of [-87, 0]:
// within 2e-7 relative (measured 8e-8 on AVX2/AVX3, the ulp-level error of
// Highway's own Exp); 0 below -87 and for -inf; exactly 1 at 0.
void TestExpNonPositive() {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  std::vector<float> x;
  for (float v = -87.0f; v < 0.0f; v += 0.00731f) x.push_back(v);
  x.push_back(0.0f);
  x.push_back(-0.0f);
  x.push_back(-1e-30f);
  x.push_back(-87.5f);
  x.push_back(-1000.0f);
  x.push_back(-std::numeric_limits<float>::infinity());
  while (x.size() % N) x.push_back(0.0f);
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); i += N) {
    hn::StoreU(ExpNonPositive(df, hn::LoadU(df, x.data() + i)), df, out.data() + i);
  }
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = x[i] > -87.0f ? std::exp(static_cast<double>(x[i])) : 0.0;
    const bool ok = want == 0.0 ? out[i] == 0.0f : std::fabs(out[i] - want) <= 2e-7 * want;
    if (!ok || (x[i] == 0.0f && out[i] != 1.0f)) {
      HWY_ABORT("%s ExpNonPositive(%.9g) = %.9g, want %.9g", hwy::TargetName(HWY_TARGET), x[i],
                out[i], want);
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace logitparity {
HWY_BEFORE_TEST(LogSoftmaxTest);
HWY_EXPORT_AND_TEST_P(LogSoftmaxTest, TestStandaloneKernels);
HWY_EXPORT_AND_TEST_P(LogSoftmaxTest, TestExpNonPositive);

TEST(LogSoftmaxPublic, InPlaceAndErrors) {
  const size_t rows = 4, vocab = 1000;
  std::vector<float> x;
  for (size_t r = 0; r < rows; ++r) {
    const std::vector<float> v = LmLogits(vocab, r);
    x.insert(x.end(), v.begin(), v.end());
  }
  std::vector<float> copy = x, out(x.size());
  RowsView view{x.data(), Dtype::kF32, rows, vocab, vocab};
  LogSoftmax(view, out.data(), 2);
  LogSoftmax(view, x.data(), 1);  // in place
  EXPECT_EQ(out, x);
  std::vector<int64_t> t = {0, 1, 2, 1000};
  std::vector<double> nll(rows);
  RowsView cv{copy.data(), Dtype::kF32, rows, vocab, vocab};
  EXPECT_THROW(Nll(cv, t.data(), nll.data()), std::invalid_argument);
  RowsView strided{copy.data(), Dtype::kF32, 2, vocab, 2 * vocab};
  EXPECT_THROW(LogSoftmax(strided, copy.data()), std::invalid_argument);
}
}  // namespace logitparity
#endif  // HWY_ONCE
