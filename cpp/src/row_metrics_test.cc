// Every compiled Highway target against the scalar float64 reference
// (CompareRowRef) on lengths around the vector width and the chunk size, real
// vocabulary sizes, every storage dtype pair, misaligned starts, ties, -inf
// (masked tokens), NaN and +inf; thread-count and batching invariance.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/row_metrics_test.cc"
#include "hwy/foreach_target.h"  // must come before highway.h
#include "hwy/highway.h"
#include "hwy/tests/hwy_gtest.h"
#include "src/reference.h"
#include "src/row_metrics-inl.h"
#include "src/test_util.h"


HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;


std::vector<double> RunKernel(const TypedRow& a, const TypedRow& b, int64_t target,
                              const std::vector<int>& ks, bool js, std::vector<int32_t>* overlap) {
  const hn::ScalableTag<float> df;
  auto buf = hwy::AllocateAligned<float>(2 * (kChunk + kMaxLanesF32));
  ChunkScratch s{buf.get(), buf.get() + kChunk + kMaxLanesF32};
  RowArgs args{a.data(), a.dtype, b.data(), b.dtype, a.values.size(), target,
               ks.data(), ks.size(), js};
  std::vector<double> out(kNumRowFields);
  overlap->assign(ks.size(), 0);
  CompareRowImpl(df, args, s, out.data(), overlap->data());
  return out;
}

void CheckCase(const RowPair& c, Dtype da, Dtype db, size_t misalign, const std::vector<int>& ks) {
  const TypedRow a = MakeRow(c.a, da, misalign);
  const TypedRow b = MakeRow(c.b, db, (misalign * 3) % 7);
  std::vector<int> kv;
  for (int k : ks) {
    if (static_cast<size_t>(k) <= c.a.size()) kv.push_back(k);
  }
  if (kv.empty()) kv.push_back(1);
  std::vector<int32_t> overlap;
  const std::vector<double> got = RunKernel(a, b, c.target, kv, true, &overlap);
  const RefRowResult want = CompareRowRef(a.values.data(), b.values.data(), a.values.size(),
                                          c.target, kv);
  for (int f = 0; f < kNumRowFields; ++f) {
    const Tol tol = FieldTol(f);
    // Cosine: to 1e-6 relative of the rows' distance |a-b|^2 / (2 |a| |b|)
    // (1 - cos of close rows is 1e-8 and below, and must stay meaningful).
    const bool ok = f == kCosine
                        ? Close(got[f], want.fields[f], 1e-12 + 1e-6 * CosineScale(a.values, b.values), 0)
                        : Close(got[f], want.fields[f], tol.atol, tol.rtol);
    if (!ok) {
      HWY_ABORT("%s: case %s n=%zu dtypes %s/%s misalign %zu field %s: got %.12g want %.12g "
                "(atol %.2g rtol %.2g)",
                hwy::TargetName(HWY_TARGET), c.name.c_str(), c.a.size(), DtypeName(da),
                DtypeName(db), misalign, RowFieldName(f), got[f], want.fields[f], tol.atol,
                tol.rtol);
    }
  }
  for (size_t k = 0; k < kv.size(); ++k) {
    if (overlap[k] != want.topk_common[k]) {
      HWY_ABORT("%s: case %s n=%zu top-%d overlap: got %d want %d", hwy::TargetName(HWY_TARGET),
                c.name.c_str(), c.a.size(), kv[k], overlap[k], want.topk_common[k]);
    }
  }
}


void TestAgainstReferenceSmall() {
  const size_t N = hn::Lanes(hn::ScalableTag<float>());
  const std::vector<size_t> lengths = {1, 2, 3, N - 1, N, N + 1, 3 * N + 2, 63, 65,
                                       kChunk - 1, kChunk, kChunk + 1, 2 * kChunk + 5};
  const Dtype dtypes[] = {Dtype::kF32, Dtype::kF16, Dtype::kBF16};
  const std::vector<int> ks = {1, 2, 5, 10, 64};
  for (size_t n : lengths) {
    if (n == 0) continue;
    for (const RowPair& c : RowPairCases(n, 1000 + n)) {
      for (Dtype da : dtypes) {
        for (Dtype db : dtypes) {
          for (size_t mis : {size_t{0}, size_t{1}, size_t{3}}) CheckCase(c, da, db, mis, ks);
        }
      }
    }
  }
}

void TestAgainstReferenceVocabSizes() {
  const std::vector<int> ks = {1, 5, 10};
  for (size_t n : {32000, 49152, 128256, 151936, 262144}) {
    for (const RowPair& c : RowPairCases(n, n)) {
      CheckCase(c, Dtype::kF32, Dtype::kF32, 1, ks);
      CheckCase(c, Dtype::kF32, Dtype::kBF16, 0, ks);
    }
    CheckCase(RowPairCases(n, n)[1], Dtype::kF16, Dtype::kF16, 2, ks);
  }
}

void TestTiesAndMasks() {
  const float ninf = -std::numeric_limits<float>::infinity();
  const std::vector<int> ks = {1, 2, 3, 5};
  for (size_t n : {size_t{5}, size_t{17}, size_t{2100}}) {
    RowPair ties{"ties", std::vector<float>(n, 1.5f), std::vector<float>(n, 1.5f), 0};
    ties.b[n - 1] = 1.25f;
    CheckCase(ties, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase(ties, Dtype::kBF16, Dtype::kF16, 1, ks);

    RowPair one_left{"all -inf but one", std::vector<float>(n, ninf), std::vector<float>(n, ninf),
                  static_cast<int64_t>(n / 2)};
    one_left.a[n / 2] = 3.0f;
    one_left.b[n / 2] = -7.0f;
    CheckCase(one_left, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase(one_left, Dtype::kF16, Dtype::kBF16, 1, ks);

    RowPair all_masked{"all -inf", std::vector<float>(n, ninf), std::vector<float>(n, ninf), -1};
    CheckCase(all_masked, Dtype::kF32, Dtype::kF32, 0, ks);

    std::vector<float> a = LmLogits(n, 5 + n);
    RowPair masked_both{"masked both sides", a, Perturb(a, 1e-2f, 6), 1};
    for (size_t i = 0; i < n; i += 3) masked_both.a[i] = masked_both.b[i] = ninf;
    CheckCase(masked_both, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase(masked_both, Dtype::kBF16, Dtype::kBF16, 2, ks);

    RowPair masked_cand{"masked in cand only (KL(P||Q) = inf)", a, a, 1};
    masked_cand.b[n - 2] = ninf;
    CheckCase(masked_cand, Dtype::kF32, Dtype::kF32, 0, ks);
    RowPair masked_ref{"masked in ref only (KL(Q||P) = inf)", a, a, static_cast<int64_t>(n - 2)};
    masked_ref.a[n - 2] = ninf;
    CheckCase(masked_ref, Dtype::kF32, Dtype::kF16, 0, ks);

    RowPair nan{"NaN", a, a, 0};
    nan.b[n / 3] = std::numeric_limits<float>::quiet_NaN();
    CheckCase(nan, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase(nan, Dtype::kF16, Dtype::kBF16, 0, ks);
    RowPair pinf{"+inf", a, a, 0};
    pinf.a[n - 1] = std::numeric_limits<float>::infinity();
    pinf.a[0] = std::numeric_limits<float>::quiet_NaN();
    CheckCase(pinf, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase(pinf, Dtype::kBF16, Dtype::kF16, 1, ks);
  }
}

// Both KL directions of rows b = a + sigma noise (a = LmLogits(n, row_seed),
// noise seed noise_seed) against the float64 reference, to atol + rtol |want|,
// for every n and sigma.
void CheckKlOfPerturbedRows(const char* what, std::initializer_list<size_t> lengths,
                            std::initializer_list<float> sigmas, uint64_t row_seed,
                            uint64_t noise_seed, bool js, double atol, double rtol) {
  const std::vector<int> ks = {1};
  for (size_t n : lengths) {
    const std::vector<float> a = LmLogits(n, row_seed);
    for (float sigma : sigmas) {
      const TypedRow ra = MakeRow(a, Dtype::kF32);
      const TypedRow rb = MakeRow(Perturb(a, sigma, noise_seed), Dtype::kF32);
      std::vector<int32_t> ov;
      const std::vector<double> got = RunKernel(ra, rb, -1, ks, js, &ov);
      const RefRowResult want = CompareRowRef(ra.values.data(), rb.values.data(), n, -1, ks);
      for (int f : {kKlRefCand, kKlCandRef}) {
        if (!Close(got[f], want.fields[f], atol, rtol)) {
          HWY_ABORT("%s: %s n=%zu sigma=%g %s: got %.12g want %.12g (relative %.2g)",
                    hwy::TargetName(HWY_TARGET), what, n, sigma, RowFieldName(f), got[f],
                    want.fields[f], std::fabs(got[f] - want.fields[f]) / want.fields[f]);
        }
      }
    }
  }
}

// Close rows: KL ~ sigma^2 / 2 is tiny, and the kernel must still get it to
// a relative 1e-4 (an absolute 1e-6 tolerance would accept any answer).
// Measured on AVX2: relative errors 8e-9 (sigma 1e-2), 1e-6 (1e-3), 7e-5
// (1e-4, KL 6e-11, where the float64 reference's own rounding of
// log-probabilities near 20 is of the same order).
void TestKlTightOnCloseRows() {
  CheckKlOfPerturbedRows("tight KL", {1000, 49152}, {1e-4f, 1e-3f, 1e-2f}, 42, 7, true, 1e-15,
                         1e-4);
}

// Far rows (b = a + sigma noise, sigma 0.3 to 1: most vectors hold a lane
// with |e| > 1/2): the far terms come from the weights times
// K = e^(Mb - Ma + c0) (FarFactors), and KL must stay as close to the float64
// reference as with the exps, tighter than the field's 1e-5 + 1e-6 tolerance.
// Worst relative errors on the 2-core EPYC: 1.0e-6 (AVX3; 1.8e-6 with the
// exps), 2.2e-6 (AVX2), 6.7e-7 (SSE4, SSSE3), 1.3e-6 (SCALAR); a c0 off by
// 0.1% in K gives 1.9e-3.
void TestKlOfFarRows() {
  CheckKlOfPerturbedRows("far-row KL", {5000, 151936}, {0.3f, 0.5f, 1.0f}, 77, 8, false, 0, 5e-6);
}

// Huge finite logits: ChunkMaxima flags a chunk from the lane sums of a + b,
// which overflow to +inf (2e38 + 2e38) or -inf (-2e38 + -2e38) although
// nothing is NaN, +inf or -inf; the exact checks behind the flags must then
// find the row valid and unmasked. Cosine is left out: the float32 block
// sums of a^2 overflow at such values (a limit of the kernel, not of the
// flags).
void TestHugeFiniteLogits() {
  const std::vector<int> ks = {1, 5};
  for (size_t n : {size_t{17}, size_t{2100}}) {
    const std::vector<float> a = LmLogits(n, 9 + n);
    for (float huge : {2e38f, -2e38f}) {
      RowPair c{"huge finite", a, Perturb(a, 1e-2f, 10), 0};
      const size_t at = huge > 0 ? 1 : n - 2;  // one entry: the float64 reference stays exact
      c.a[at] = c.b[at] = huge;
      const TypedRow ra = MakeRow(c.a, Dtype::kF32), rb = MakeRow(c.b, Dtype::kF32);
      std::vector<int32_t> ov;
      const std::vector<double> got = RunKernel(ra, rb, c.target, ks, true, &ov);
      const RefRowResult want = CompareRowRef(ra.values.data(), rb.values.data(), n, c.target, ks);
      for (int f : kHugeFiniteFields) {
        const Tol tol = FieldTol(f);
        if (!Close(got[f], want.fields[f], tol.atol, tol.rtol)) {
          HWY_ABORT("%s: huge finite %g n=%zu %s: got %.12g want %.12g",
                    hwy::TargetName(HWY_TARGET), huge, n, RowFieldName(f), got[f],
                    want.fields[f]);
        }
      }
    }
  }
}

// The SIMD f16 conversion against the scalar one for all 65536 bit patterns
// (inf, NaN and subnormals included): Highway 1.0.3's own promotion is wrong
// for inf/NaN on targets without F16C.
void TestF16ConversionAllBits() {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  std::vector<uint16_t> bits(65536);
  for (size_t i = 0; i < bits.size(); ++i) bits[i] = static_cast<uint16_t>(i);
  std::vector<float> out(65536 + N);
  LoadChunkAsF32<Dtype::kF16>(df, bits.data(), bits.size(), out.data());
  std::vector<float> out_bf(65536 + N);
  LoadChunkAsF32<Dtype::kBF16>(df, bits.data(), bits.size(), out_bf.data());
  for (size_t i = 0; i < bits.size(); ++i) {
    const float want = ::logitparity::F16BitsToF32(bits[i]);
    const bool same = std::isnan(want) ? std::isnan(out[i]) : (out[i] == want &&
                                                               std::signbit(out[i]) == std::signbit(want));
    if (!same) HWY_ABORT("%s: f16 0x%04zx -> %g, want %g", hwy::TargetName(HWY_TARGET), i, out[i], want);
    const float want_bf = ::logitparity::BF16BitsToF32(bits[i]);
    const bool same_bf = std::isnan(want_bf) ? std::isnan(out_bf[i]) : out_bf[i] == want_bf;
    if (!same_bf) HWY_ABORT("%s: bf16 0x%04zx -> %g, want %g", hwy::TargetName(HWY_TARGET), i, out_bf[i], want_bf);
  }
  // Spot values that Highway 1.0.3 converts wrongly without F16C.
  const uint16_t special[] = {0x7C00, 0xFC00, 0x7E00, 0x0001, 0x03FF, 0x8001};
  const float expect[] = {INFINITY, -INFINITY, NAN, 5.9604645e-08f, 6.09755516e-05f, -5.9604645e-08f};
  for (size_t i = 0; i < 6; ++i) {
    const float got = out[special[i]];
    if (std::isnan(expect[i]) ? !std::isnan(got) : got != expect[i]) {
      HWY_ABORT("%s: f16 0x%04x -> %g", hwy::TargetName(HWY_TARGET), special[i], got);
    }
  }
}

// LogNormal (JsKernel's division-free log) against std::log in float64 over
// its whole input range (log-spaced from 1e-30, every float in [1, 2) of a
// stride, the ends), and JsKernel against its float64 formula for u in
// [-1, 1]: the far lanes (|u| >= 1/4) go through LogNormal.
void TestLogNormalAndJsKernel() {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  std::vector<float> xs;
  for (double e = -30.0; e <= std::log10(2.0); e += 1e-4) xs.push_back(static_cast<float>(std::pow(10.0, e)));
  for (uint32_t bits = 0x3F800000u; bits < 0x40000000u; bits += 97) {
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    xs.push_back(f);
  }
  for (float f : {1e-30f, 5.9604645e-08f, 0.70710677f, 0.70710683f, 1.0f, 1.4142135f, 1.4142137f,
                  1.9999999f, 2.0f}) {
    xs.push_back(f);
  }
  while (xs.size() % N) xs.push_back(1.0f);
  double worst = 0;
  std::vector<float> out(N);
  for (size_t i = 0; i < xs.size(); i += N) {
    hn::StoreU(LogNormal(df, hn::LoadU(df, xs.data() + i)), df, out.data());
    for (size_t j = 0; j < N; ++j) {
      const double want = std::log(static_cast<double>(xs[i + j]));
      const double err = std::fabs(out[j] - want) / std::max(1.0, std::fabs(want));
      worst = std::max(worst, err);
      if (err > 2e-7) {
        HWY_ABORT("%s: LogNormal(%.9g) = %.9g, want %.9g", hwy::TargetName(HWY_TARGET), xs[i + j],
                  out[j], want);
      }
    }
  }
  double worst_js = 0;
  std::vector<float> us;
  for (int i = -100000; i <= 100000; ++i) us.push_back(static_cast<float>(i / 100000.0));
  while (us.size() % N) us.push_back(0.0f);
  for (size_t i = 0; i < us.size(); i += N) {
    hn::StoreU(JsKernel(df, hn::LoadU(df, us.data() + i)), df, out.data());
    for (size_t j = 0; j < N; ++j) {
      const double u = us[i + j];
      const double want = (u > -1 ? (1 + u) * std::log1p(u) : 0.0) + (u < 1 ? (1 - u) * std::log1p(-u) : 0.0);
      const double err = std::fabs(out[j] - want);
      worst_js = std::max(worst_js, err);
      if (err > 3e-7 * std::max(1.0, want)) {
        HWY_ABORT("%s: JsKernel(%.9g) = %.9g, want %.9g", hwy::TargetName(HWY_TARGET), u, out[j], want);
      }
    }
  }
  printf("%s: LogNormal worst %.3g (relative, or absolute below 1), JsKernel worst %.3g absolute\n",
         hwy::TargetName(HWY_TARGET), worst, worst_js);
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "src/thread_pool.h"

namespace logitparity {
HWY_BEFORE_TEST(RowMetricsTest);
HWY_EXPORT_AND_TEST_P(RowMetricsTest, TestAgainstReferenceSmall);
HWY_EXPORT_AND_TEST_P(RowMetricsTest, TestAgainstReferenceVocabSizes);
HWY_EXPORT_AND_TEST_P(RowMetricsTest, TestTiesAndMasks);
HWY_EXPORT_AND_TEST_P(RowMetricsTest, TestKlTightOnCloseRows);
HWY_EXPORT_AND_TEST_P(RowMetricsTest, TestKlOfFarRows);
HWY_EXPORT_AND_TEST_P(RowMetricsTest, TestF16ConversionAllBits);
HWY_EXPORT_AND_TEST_P(RowMetricsTest, TestHugeFiniteLogits);
HWY_EXPORT_AND_TEST_P(RowMetricsTest, TestLogNormalAndJsKernel);

// Bitwise identical results for 1..8 threads and for any split of the rows.
TEST(RowMetricsPublic, ThreadAndBatchInvariance) {
  const size_t rows = 37, vocab = 5003;
  std::vector<float> a, b;
  for (size_t r = 0; r < rows; ++r) {
    const std::vector<float> x = LmLogits(vocab, r);
    const std::vector<float> y = Perturb(x, 0.05f, r + 100);
    a.insert(a.end(), x.begin(), x.end());
    b.insert(b.end(), y.begin(), y.end());
  }
  std::vector<int64_t> targets(rows);
  for (size_t r = 0; r < rows; ++r) targets[r] = static_cast<int64_t>((r * 131) % vocab);
  RowsView va{a.data(), Dtype::kF32, rows, vocab, vocab};
  RowsView vb{b.data(), Dtype::kF32, rows, vocab, vocab};
  RowMetricsOptions opt;
  opt.targets = targets.data();
  opt.js = true;  // the second sweep is deterministic too
  opt.threads = 1;
  const RowMetricsResult base = CompareRows(va, vb, opt);
  for (int threads : {2, 3, 8}) {
    opt.threads = threads;
    const RowMetricsResult res = CompareRows(va, vb, opt);
    ASSERT_EQ(0, std::memcmp(base.fields.data(), res.fields.data(),
                             base.fields.size() * sizeof(double)))
        << "threads=" << threads;
    ASSERT_EQ(base.topk_common, res.topk_common);
  }
  // Rows 10..19 computed alone equal the same rows of the full batch.
  RowsView sa{a.data() + 10 * vocab, Dtype::kF32, 10, vocab, vocab};
  RowsView sb{b.data() + 10 * vocab, Dtype::kF32, 10, vocab, vocab};
  opt.targets = targets.data() + 10;
  const RowMetricsResult part = CompareRows(sa, sb, opt);
  ASSERT_EQ(0, std::memcmp(base.fields.data() + 10 * kNumRowFields, part.fields.data(),
                           part.fields.size() * sizeof(double)));
}

// The pool is started once and reused: many calls with changing thread
// counts cover every row exactly once; an exception in a worker reaches the
// caller and leaves the pool usable; out-of-range counts are rejected.
TEST(ThreadPool, ReusedRethrowsAndChecksRange) {
  for (int call = 0; call < 200; ++call) {
    const int threads = 1 + call % 7;
    const size_t rows = 1 + static_cast<size_t>(call) * 13 % 97;
    std::vector<int> seen(rows, 0);
    ParallelForRows(rows, threads, [&](size_t, size_t begin, size_t end) {
      for (size_t r = begin; r < end; ++r) ++seen[r];
    });
    for (size_t r = 0; r < rows; ++r) ASSERT_EQ(1, seen[r]) << "call " << call << " row " << r;
  }
  EXPECT_THROW(ParallelForRows(64, 4,
                               [](size_t, size_t begin, size_t end) {
                                 if (begin <= 40 && 40 < end) throw std::runtime_error("row 40");
                               }),
               std::runtime_error);
  std::atomic<size_t> total{0};
  ParallelForRows(64, 4, [&](size_t, size_t begin, size_t end) { total += end - begin; });
  EXPECT_EQ(64u, total.load());
  EXPECT_THROW(ResolveThreads(-1, 10), std::invalid_argument);
  EXPECT_THROW(ResolveThreads(static_cast<int>(MaxThreads()) + 1, 10), std::invalid_argument);
  EXPECT_EQ(3u, ResolveThreads(8, 3));
}

TEST(RowMetricsPublic, RowStrideAndErrors) {
  const size_t rows = 3, vocab = 100, stride = 131;
  std::vector<float> a(rows * stride, 99.0f), b(rows * stride, -99.0f);
  for (size_t r = 0; r < rows; ++r) {
    const std::vector<float> x = LmLogits(vocab, r);
    std::copy(x.begin(), x.end(), a.begin() + r * stride);
    std::copy(x.begin(), x.end(), b.begin() + r * stride);
  }
  RowsView va{a.data(), Dtype::kF32, rows, vocab, stride};
  RowsView vb{b.data(), Dtype::kF32, rows, vocab, stride};
  const RowMetricsResult res = CompareRows(va, vb, RowMetricsOptions());
  for (size_t r = 0; r < rows; ++r) {
    EXPECT_EQ(0.0, res.fields[r * kNumRowFields + kKlRefCand]);  // padding not read
    EXPECT_EQ(0.0, res.fields[r * kNumRowFields + kMaxAbsLogit]);
  }
  RowsView bad = vb;
  bad.vocab = 99;
  EXPECT_THROW(CompareRows(va, bad, RowMetricsOptions()), std::invalid_argument);
  bad = vb;
  bad.rows = 2;
  EXPECT_THROW(CompareRows(va, bad, RowMetricsOptions()), std::invalid_argument);
  RowMetricsOptions opt;
  opt.topk = {0};
  EXPECT_THROW(CompareRows(va, vb, opt), std::invalid_argument);
  opt.topk = {101};
  EXPECT_THROW(CompareRows(va, vb, opt), std::invalid_argument);
  opt.topk = {5, 1};
  EXPECT_THROW(CompareRows(va, vb, opt), std::invalid_argument);
  std::vector<int64_t> t = {0, 100, 1};
  opt = RowMetricsOptions();
  opt.targets = t.data();
  EXPECT_THROW(CompareRows(va, vb, opt), std::invalid_argument);
  RowsView empty = va;
  empty.rows = 0;
  EXPECT_THROW(CompareRows(empty, empty, RowMetricsOptions()), std::invalid_argument);
}

}  // namespace logitparity
#endif  // HWY_ONCE
