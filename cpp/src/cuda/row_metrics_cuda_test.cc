// The CUDA row comparison against the scalar float64 reference (CompareRowRef)
// with the CPU test's tolerances (test_util.h): lengths around the block's
// step and group, one row and batches past one wave of 256-thread blocks
// (the kernel then takes 128-thread blocks), real vocabulary sizes, every
// storage dtype pair, misaligned starts (the scalar load path), ties, -inf, NaN and +inf, huge finite
// logits, the tight KL of close rows, row strides and batching, and the
// argument errors. Every test
// skips where no CUDA device is usable (the CI machine compiles it only).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "logitparity/cuda.h"
#include "src/cuda/cuda_test_util.h"
#include "src/reference.h"
#include "src/test_util.h"

namespace logitparity {
namespace {

// The TypedRow's bytes with its row repeated `rows` times (row stride n),
// the garbage before and after kept: row r starts at offset + r n elements,
// so odd n gives rows of every alignment.
std::vector<uint8_t> RepeatRow(const TypedRow& r, size_t rows) {
  const size_t es = DtypeSize(r.dtype), n = r.values.size();
  const auto begin = r.bytes.begin() + r.offset * es, end = begin + n * es;
  std::vector<uint8_t> out(r.bytes.begin(), begin);
  for (size_t i = 0; i < rows; ++i) out.insert(out.end(), begin, end);
  out.insert(out.end(), end, r.bytes.end());
  return out;
}

// A batch of more rows than fit in one wave of 256-thread blocks, so that
// the kernel runs with 128-thread blocks (CompareRowsBlockThreads).
size_t RowsFor128ThreadBlocks() {
  int sms = 0;
  EXPECT_EQ(cudaSuccess, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const size_t rows = 2 * static_cast<size_t>(sms) + 1;
  EXPECT_EQ(128, CompareRowsBlockThreads(rows, sms));
  EXPECT_EQ(256, CompareRowsBlockThreads(rows - 1, sms));
  return rows;
}

// One row pair through the CUDA kernel, as `rows` rows of a batch (the same
// pair repeated; fields rows x kNumRowFields, overlaps rows x ks);
// misalignment is kept (the device buffer holds the TypedRow's bytes with
// the same offset).
std::vector<double> RunCuda(const TypedRow& a, const TypedRow& b, int64_t target,
                            const std::vector<int>& ks, bool js, std::vector<int32_t>* overlap,
                            size_t rows = 1) {
  const std::vector<uint8_t> ha = RepeatRow(a, rows), hb = RepeatRow(b, rows);
  DeviceBuffer da(ha.data(), ha.size()), db(hb.data(), hb.size());
  const size_t n = a.values.size();
  RowsView va{static_cast<const uint8_t*>(da.ptr) + a.offset * DtypeSize(a.dtype), a.dtype, rows,
              n, n};
  RowsView vb{static_cast<const uint8_t*>(db.ptr) + b.offset * DtypeSize(b.dtype), b.dtype, rows,
              n, n};
  RowMetricsOptions opt;
  opt.topk = ks;
  opt.js = js;
  std::vector<int64_t> t(rows, target);
  opt.targets = target >= 0 ? t.data() : nullptr;
  const RowMetricsResult res = CompareRowsCuda(va, vb, opt, 0);
  *overlap = res.topk_common;
  return res.fields;
}

void CheckCase(const std::string& name, const std::vector<float>& xa, const std::vector<float>& xb,
               int64_t target, Dtype da, Dtype db, size_t misalign, const std::vector<int>& ks,
               bool batch_large = false) {
  const TypedRow a = MakeRow(xa, da, misalign);
  const TypedRow b = MakeRow(xb, db, (misalign * 3) % 7);
  std::vector<int> kv;
  for (int k : ks) {
    if (static_cast<size_t>(k) <= xa.size()) kv.push_back(k);
  }
  if (kv.empty()) kv.push_back(1);
  const RefRowResult want =
      CompareRowRef(a.values.data(), b.values.data(), a.values.size(), target, kv);
  // One row (256-thread blocks) and a batch of its copies (128-thread
  // blocks, rows of every alignment for odd n; rows above 16384 elements
  // only where asked, to keep the copies small): every row against the
  // reference.
  static const size_t many = RowsFor128ThreadBlocks();
  const double cos_tol = 1e-12 + 1e-6 * CosineScale(a.values, b.values);
  std::vector<size_t> batches = {1};
  if (batch_large || xa.size() <= 16384) batches.push_back(many);
  for (const size_t rows : batches) {
    std::vector<int32_t> overlap;
    const std::vector<double> got = RunCuda(a, b, target, kv, true, &overlap, rows);
    for (size_t r = 0; r < rows; ++r) {
      for (int f = 0; f < kNumRowFields; ++f) {
        const Tol tol = FieldTol(f);
        const double g = got[r * kNumRowFields + f];
        const bool ok = f == kCosine ? Close(g, want.fields[f], cos_tol, 0)
                                     : Close(g, want.fields[f], tol.atol, tol.rtol);
        ASSERT_TRUE(ok) << "case " << name << " n=" << xa.size() << " dtypes " << DtypeName(da)
                        << "/" << DtypeName(db) << " misalign " << misalign << " row " << r << "/"
                        << rows << " field " << RowFieldName(f) << ": got " << g << " want "
                        << want.fields[f];
      }
      for (size_t k = 0; k < kv.size(); ++k) {
        ASSERT_EQ(want.topk_common[k], overlap[r * kv.size() + k])
            << "case " << name << " n=" << xa.size() << " row " << r << "/" << rows << " top-"
            << kv[k] << " overlap";
      }
    }
  }
}


const Dtype kDtypes[] = {Dtype::kF32, Dtype::kF16, Dtype::kBF16};

// Lengths around a group (8), a warp's span (256), the steps of a 128- and
// a 256-thread block (1024, 2048) and two steps.
TEST(RowMetricsCuda, AgainstReferenceSmall) {
  SKIP_WITHOUT_GPU();
  const std::vector<int> ks = {1, 2, 5, 10, 64};
  // (1024: the step of a 128-thread block, 2048 of a 256-thread one.)
  for (size_t n : {1, 2, 3, 7, 8, 9, 17, 255, 256, 257, 1023, 1024, 1025, 2047, 2048, 2049, 4097,
                   8197}) {
    for (const RowPair& c : RowPairCases(n, 1000 + n)) {
      for (Dtype da : kDtypes) {
        for (Dtype db : kDtypes) {
          for (size_t mis : {size_t{0}, size_t{1}, size_t{3}}) {
            CheckCase(c.name, c.a, c.b, c.target, da, db, mis, ks);
            if (HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

TEST(RowMetricsCuda, AgainstReferenceVocabSizes) {
  SKIP_WITHOUT_GPU();
  const std::vector<int> ks = {1, 5, 10};
  for (size_t n : {32000, 49152, 128256, 151936, 262144}) {
    for (const RowPair& c : RowPairCases(n, n)) {
      CheckCase(c.name, c.a, c.b, c.target, Dtype::kF32, Dtype::kF32, 0, ks);
      CheckCase(c.name, c.a, c.b, c.target, Dtype::kF32, Dtype::kBF16, 1, ks);
      CheckCase(c.name, c.a, c.b, c.target, Dtype::kBF16, Dtype::kBF16, 0, ks);
      if (HasFatalFailure()) return;
    }
    const RowPair close = RowPairCases(n, n)[1];
    CheckCase(close.name, close.a, close.b, close.target, Dtype::kF16, Dtype::kF16, 2, ks, true);
  }
}

TEST(RowMetricsCuda, TiesAndMasks) {
  SKIP_WITHOUT_GPU();
  const float ninf = -std::numeric_limits<float>::infinity();
  const std::vector<int> ks = {1, 2, 3, 5};
  for (size_t n : {size_t{5}, size_t{17}, size_t{2100}, size_t{9000}}) {
    std::vector<float> ta(n, 1.5f), tb(n, 1.5f);
    tb[n - 1] = 1.25f;
    CheckCase("ties", ta, tb, 0, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase("ties", ta, tb, 0, Dtype::kBF16, Dtype::kF16, 1, ks);

    std::vector<float> oa(n, ninf), ob(n, ninf);
    oa[n / 2] = 3.0f;
    ob[n / 2] = -7.0f;
    CheckCase("all -inf but one", oa, ob, static_cast<int64_t>(n / 2), Dtype::kF32, Dtype::kF32,
              0, ks);
    CheckCase("all -inf but one", oa, ob, static_cast<int64_t>(n / 2), Dtype::kF16, Dtype::kBF16,
              1, ks);
    CheckCase("all -inf", std::vector<float>(n, ninf), std::vector<float>(n, ninf), -1,
              Dtype::kF32, Dtype::kF32, 0, ks);

    const std::vector<float> a = LmLogits(n, 5 + n);
    std::vector<float> ma = a, mb = Perturb(a, 1e-2f, 6);
    for (size_t i = 0; i < n; i += 3) ma[i] = mb[i] = ninf;
    CheckCase("masked both sides", ma, mb, 1, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase("masked both sides", ma, mb, 1, Dtype::kBF16, Dtype::kBF16, 2, ks);

    std::vector<float> mc = a;
    mc[n - 2] = ninf;
    CheckCase("masked in cand only", a, mc, 1, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase("masked in ref only", mc, a, static_cast<int64_t>(n - 2), Dtype::kF32, Dtype::kF16,
              0, ks);

    std::vector<float> nan = a;
    nan[n / 3] = std::numeric_limits<float>::quiet_NaN();
    CheckCase("NaN", a, nan, 0, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase("NaN", a, nan, 0, Dtype::kF16, Dtype::kBF16, 0, ks);
    std::vector<float> pinf = a;
    pinf[n - 1] = std::numeric_limits<float>::infinity();
    pinf[0] = std::numeric_limits<float>::quiet_NaN();
    CheckCase("+inf", pinf, a, 0, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase("+inf", pinf, a, 0, Dtype::kBF16, Dtype::kF16, 1, ks);
    if (HasFatalFailure()) return;
  }
}

// Orders and ties that stress the top-k: ascending rows (the largest
// elements in the last threads), descending rows (in the first), the same
// value everywhere but the row's end (every thread's maximum ties at the
// k-th, so every thread's elements are reread), logits on a half-logit grid
// (ties at every rank, several per thread), and a row of +0 and -0 only,
// which compare equal, so their ties go by index. k up to 64 and lengths of
// one to several steps.
TEST(RowMetricsCuda, TopKOrders) {
  SKIP_WITHOUT_GPU();
  const std::vector<int> ks = {1, 2, 10, 33, 64};
  for (size_t n : {size_t{300}, size_t{4099}, size_t{70001}}) {
    std::vector<float> up(n), down(n), flat(n, 0.75f), zeros(n);
    for (size_t i = 0; i < n; ++i) {
      up[i] = -8.0f + 16.0f * static_cast<float>(i) / static_cast<float>(n);
      down[i] = -up[i];
      zeros[i] = (i * 7919) % 3 == 0 ? -0.0f : 0.0f;
    }
    flat[n - 3] = 0.5f;
    const std::vector<float> noisy = Perturb(up, 1e-3f, 11);
    CheckCase("ascending", up, noisy, 3, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase("ascending", up, noisy, 3, Dtype::kBF16, Dtype::kF16, 1, ks);
    CheckCase("descending", down, Perturb(down, 1e-3f, 12), 5, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase("descending vs ascending", down, up, 5, Dtype::kF32, Dtype::kF16, 0, ks);
    CheckCase("flat", flat, up, 0, Dtype::kF32, Dtype::kF32, 0, ks);
    std::vector<float> grid = LmLogits(n, 21), grid_b = Perturb(grid, 0.3f, 22);
    for (float& x : grid) x = std::round(2.0f * x) / 2.0f;
    for (float& x : grid_b) x = std::round(2.0f * x) / 2.0f;
    CheckCase("half-logit grid", grid, grid_b, 2, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase("half-logit grid", grid, grid_b, 2, Dtype::kBF16, Dtype::kF16, 1, ks);
    CheckCase("signed zeros", zeros, flat, 1, Dtype::kF32, Dtype::kF32, 0, ks);
    CheckCase("signed zeros", zeros, zeros, 1, Dtype::kF16, Dtype::kBF16, 2, ks);
    if (HasFatalFailure()) return;
  }
}

// Fills a and b (rows of `stride`, a.size() / stride of them; what lies past
// n in a row is left as it is) with pairs of close rows: LmLogits(n, seed_a +
// r) and that perturbed by 0.05 randn (seed seed_b + r).
void FillClosePairs(size_t n, size_t stride, uint64_t seed_a, uint64_t seed_b,
                    std::vector<float>& a, std::vector<float>& b) {
  for (size_t r = 0; r < a.size() / stride; ++r) {
    const std::vector<float> x = LmLogits(n, seed_a + r), y = Perturb(x, 0.05f, seed_b + r);
    std::copy(x.begin(), x.end(), a.begin() + r * stride);
    std::copy(y.begin(), y.end(), b.begin() + r * stride);
  }
}

// Targets in device memory (CompareRowsCuda's device_targets) give the same
// fields as the same ids from the host, bitwise, -1 included; an id out of
// range is an error naming the first such row and its id. (Rows past one
// wave of 256-thread blocks: the 128-thread kernel; Jobs below has 19.)
TEST(RowMetricsCuda, DeviceTargets) {
  SKIP_WITHOUT_GPU();
  const size_t rows = RowsFor128ThreadBlocks() + 2, n = 5000;
  std::vector<float> a(rows * n), b(rows * n);
  FillClosePairs(n, n, 100, 200, a, b);
  std::vector<int64_t> t(rows);
  for (size_t r = 0; r < rows; ++r) t[r] = r % 5 == 4 ? -1 : static_cast<int64_t>((r * 131) % n);
  DeviceBuffer da(a.data(), a.size() * 4), db(b.data(), b.size() * 4), dt(t.data(), t.size() * 8);
  RowsView va{da.ptr, Dtype::kF32, rows, n, n}, vb{db.ptr, Dtype::kF32, rows, n, n};
  RowMetricsOptions host;
  host.targets = t.data();
  const RowMetricsResult want = CompareRowsCuda(va, vb, host, 0);
  const RowMetricsResult got =
      CompareRowsCuda(va, vb, RowMetricsOptions(), 0, static_cast<const int64_t*>(dt.ptr));
  ASSERT_EQ(want.fields.size(), got.fields.size());
  EXPECT_EQ(0, std::memcmp(want.fields.data(), got.fields.data(), want.fields.size() * 8));
  EXPECT_EQ(want.topk_common, got.topk_common);

  std::vector<int64_t> bad = t;
  bad[9] = static_cast<int64_t>(n);
  bad[20] = -2;
  DeviceBuffer dbad(bad.data(), bad.size() * 8);
  try {
    CompareRowsCuda(va, vb, RowMetricsOptions(), 0, static_cast<const int64_t*>(dbad.ptr));
    FAIL() << "no error for an out-of-range device target";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string("targets must be in [0, 5000) (the vocab size) or -1 for none, got "
                          "5000 at row 9"),
              e.what());
  }
  EXPECT_THROW(CompareRowsCuda(va, vb, host, 0, static_cast<const int64_t*>(dt.ptr)),
               std::invalid_argument);
  EXPECT_THROW(CompareRowsCuda(va, vb, RowMetricsOptions(), 0, t.data()), std::invalid_argument);
}

// CompareRowsCudaJob (what the Python binding calls: the kernel writes its
// records to mapped host memory, Finish copies them into the caller's arrays)
// gives CompareRowsCuda's bits, for rows with NaN or +inf (the record's NaN
// branch) and for up to 64 ks (the longest record); jobs may overlap and be
// finished in any order, or dropped unfinished; on an out-of-range target
// Finish throws and leaves the caller's arrays as they were.
TEST(RowMetricsCuda, Jobs) {
  SKIP_WITHOUT_GPU();
  const size_t rows = 19, n = 3001;
  std::vector<float> a(rows * n), b(rows * n);
  FillClosePairs(n, n, 300, 400, a, b);
  a[4 * n + 17] = std::numeric_limits<float>::quiet_NaN();
  b[11 * n + 5] = std::numeric_limits<float>::infinity();
  std::vector<int64_t> t(rows);
  for (size_t r = 0; r < rows; ++r) t[r] = static_cast<int64_t>((r * 97) % n);
  DeviceBuffer da(a.data(), a.size() * 4), db(b.data(), b.size() * 4), dt(t.data(), t.size() * 8);
  const RowsView va{da.ptr, Dtype::kF32, rows, n, n}, vb{db.ptr, Dtype::kF32, rows, n, n};
  const int64_t* tp = static_cast<const int64_t*>(dt.ptr);
  std::vector<int> all(64);
  for (int k = 0; k < 64; ++k) all[k] = k + 1;
  const std::vector<std::vector<int>> topks = {{1}, {1, 5, 10}, all};
  std::vector<RowMetricsOptions> opts(topks.size());
  std::vector<RowMetricsResult> want;
  for (size_t q = 0; q < topks.size(); ++q) {
    opts[q].topk = topks[q];
    want.push_back(CompareRowsCuda(va, vb, opts[q], 0, tp));
  }
  // Three jobs in flight at once, finished last to first.
  std::vector<std::unique_ptr<CompareRowsCudaJob>> jobs;
  for (size_t q = 0; q < topks.size(); ++q) {
    jobs.push_back(std::make_unique<CompareRowsCudaJob>(va, vb, opts[q], 0, tp));
  }
  for (size_t q = topks.size(); q-- > 0;) {
    std::vector<double> fields(rows * kNumRowFields, 7.0);
    std::vector<int32_t> overlap(rows * topks[q].size(), 7);
    const size_t num_int = kNumRowFields - kFirstIntField;
    std::vector<int64_t> ints(num_int * rows, 7);
    jobs[q]->Finish(fields.data(), overlap.data(), q == 0 ? nullptr : ints.data());
    for (size_t f = 0; f < num_int && q != 0; ++f) {
      for (size_t r = 0; r < rows; ++r) {
        EXPECT_EQ(static_cast<int64_t>(fields[r * kNumRowFields + kFirstIntField + f]),
                  ints[f * rows + r]);
      }
    }
    if (q != 0) EXPECT_EQ(-1, ints[4]);  // argmax_ref (field-major row 0) of the NaN row 4
    EXPECT_EQ(0, std::memcmp(want[q].fields.data(), fields.data(), fields.size() * 8)) << q;
    EXPECT_EQ(want[q].topk_common, overlap) << q;
    EXPECT_TRUE(std::isnan(fields[4 * kNumRowFields + kKlRefCand]));
    EXPECT_EQ(1.0, fields[11 * kNumRowFields + kNonfiniteCand]);
    EXPECT_EQ(-1, overlap[4 * topks[q].size()]);
    EXPECT_THROW(jobs[q]->Finish(fields.data(), overlap.data()), std::logic_error);
  }
  { CompareRowsCudaJob dropped(va, vb, opts[2], 0, tp); }  // waits in its destructor

  std::vector<int64_t> bad = t;
  bad[13] = -5;
  DeviceBuffer dbad(bad.data(), bad.size() * 8);
  std::vector<double> fields(rows * kNumRowFields, 7.0);
  std::vector<int32_t> overlap(rows * 3, 7);
  CompareRowsCudaJob job(va, vb, opts[1], 0, static_cast<const int64_t*>(dbad.ptr));
  try {
    job.Finish(fields.data(), overlap.data());
    FAIL() << "no error for an out-of-range device target";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string("targets must be in [0, 3001) (the vocab size) or -1 for none, got "
                          "-5 at row 13"),
              e.what());
  }
  EXPECT_EQ(std::vector<double>(rows * kNumRowFields, 7.0), fields);
  EXPECT_EQ(std::vector<int32_t>(rows * 3, 7), overlap);
  // The same job after a bad one: the pool's buffers hold no stale flag.
  CompareRowsCudaJob again(va, vb, opts[1], 0, tp);
  again.Finish(fields.data(), overlap.data());
  EXPECT_EQ(0, std::memcmp(want[1].fields.data(), fields.data(), fields.size() * 8));
}

// Close rows: KL ~ sigma^2 / 2 must still come to a relative 1e-4.
TEST(RowMetricsCuda, KlTightOnCloseRows) {
  SKIP_WITHOUT_GPU();
  const std::vector<int> ks = {1};
  for (size_t n : {size_t{1000}, size_t{49152}, size_t{151936}}) {
    const std::vector<float> a = LmLogits(n, 42);
    for (float sigma : {1e-4f, 1e-3f, 1e-2f}) {
      const TypedRow ra = MakeRow(a, Dtype::kF32), rb = MakeRow(Perturb(a, sigma, 7), Dtype::kF32);
      std::vector<int32_t> ov;
      const std::vector<double> got = RunCuda(ra, rb, -1, ks, false, &ov);
      const RefRowResult want = CompareRowRef(ra.values.data(), rb.values.data(), n, -1, ks);
      for (int f : {kKlRefCand, kKlCandRef}) {
        EXPECT_TRUE(Close(got[f], want.fields[f], 1e-15, 1e-4))
            << "n=" << n << " sigma=" << sigma << " " << RowFieldName(f) << ": got " << got[f]
            << " want " << want.fields[f];
      }
    }
  }
}

// Huge finite logits (+-2e38, one entry per row, the same on both sides) as
// in the CPU test's TestHugeFiniteLogits, same fields (x^2 overflows float32,
// so the cosine is not checked): such groups fail the clean groups' check
// (their x^2, or the thread maximum's square, is not finite) and take the
// element-by-element path, whose exps are clamped. 2e38 in the first chunk
// raises every thread's maximum; at 5000 only one thread's (a rescale by
// e^-2e38 = 0).
TEST(RowMetricsCuda, HugeFiniteLogits) {
  SKIP_WITHOUT_GPU();
  const std::vector<int> ks = {1, 5};
  for (size_t n : {size_t{17}, size_t{2100}, size_t{151936}}) {
    const std::vector<float> a = LmLogits(n, 9 + n);
    for (float huge : {2e38f, -2e38f}) {
      for (size_t at : {huge > 0 ? size_t{1} : n - 2, std::min<size_t>(5000, n - 3)}) {
        std::vector<float> xa = a, xb = Perturb(a, 1e-2f, 10);
        xa[at] = xb[at] = huge;
        const TypedRow ra = MakeRow(xa, Dtype::kF32), rb = MakeRow(xb, Dtype::kF32);
        std::vector<int32_t> ov;
        const std::vector<double> got = RunCuda(ra, rb, 0, ks, true, &ov);
        const RefRowResult want = CompareRowRef(ra.values.data(), rb.values.data(), n, 0, ks);
        for (int f : kHugeFiniteFields) {
          const Tol tol = FieldTol(f);
          EXPECT_TRUE(Close(got[f], want.fields[f], tol.atol, tol.rtol))
              << "huge " << huge << " at " << at << " n=" << n << " " << RowFieldName(f)
              << ": got " << got[f] << " want " << want.fields[f];
        }
      }
    }
  }
}

// Many rows with a row stride and padding that must not be read; the same
// rows computed alone give bitwise the same fields (batching invariance), and
// the CPU kernel agrees within the tolerances.
TEST(RowMetricsCuda, RowsStrideBatchAndCpuAgreement) {
  SKIP_WITHOUT_GPU();
  const size_t rows = 37, vocab = 5003, stride = 5011;
  std::vector<float> a(rows * stride, 99.0f), b(rows * stride, -99.0f);
  FillClosePairs(vocab, stride, 0, 100, a, b);
  std::vector<int64_t> targets(rows);
  for (size_t r = 0; r < rows; ++r) targets[r] = static_cast<int64_t>((r * 131) % vocab);
  DeviceBuffer da(a.data(), a.size() * 4), db(b.data(), b.size() * 4);
  RowsView va{da.ptr, Dtype::kF32, rows, vocab, stride};
  RowsView vb{db.ptr, Dtype::kF32, rows, vocab, stride};
  RowMetricsOptions opt;
  opt.targets = targets.data();
  opt.js = true;
  const RowMetricsResult all = CompareRowsCuda(va, vb, opt, 0);
  const RowMetricsResult again = CompareRowsCuda(va, vb, opt, 0);
  ASSERT_EQ(0, std::memcmp(all.fields.data(), again.fields.data(), all.fields.size() * 8));
  RowsView sa{static_cast<const float*>(da.ptr) + 10 * stride, Dtype::kF32, 10, vocab, stride};
  RowsView sb{static_cast<const float*>(db.ptr) + 10 * stride, Dtype::kF32, 10, vocab, stride};
  opt.targets = targets.data() + 10;
  const RowMetricsResult part = CompareRowsCuda(sa, sb, opt, 0);
  ASSERT_EQ(0, std::memcmp(all.fields.data() + 10 * kNumRowFields, part.fields.data(),
                           part.fields.size() * 8));
  RowsView ha{a.data(), Dtype::kF32, rows, vocab, stride};
  RowsView hb{b.data(), Dtype::kF32, rows, vocab, stride};
  opt.targets = targets.data();
  const RowMetricsResult cpu = CompareRows(ha, hb, opt);
  for (size_t r = 0; r < rows; ++r) {
    const RefRowResult want = CompareRowRef(a.data() + r * stride, b.data() + r * stride, vocab,
                                            targets[r], opt.topk);
    for (int f = 0; f < kNumRowFields; ++f) {
      if (f == kCosine) continue;
      const Tol tol = FieldTol(f);
      const double got = all.fields[r * kNumRowFields + f];
      EXPECT_TRUE(Close(got, want.fields[f], tol.atol, tol.rtol))
          << "row " << r << " " << RowFieldName(f) << ": got " << got << " want "
          << want.fields[f];
      EXPECT_TRUE(Close(got, cpu.fields[r * kNumRowFields + f], 2 * tol.atol, 2 * tol.rtol))
          << "row " << r << " " << RowFieldName(f) << " vs CPU";
    }
  }
  EXPECT_EQ(cpu.topk_common, all.topk_common);
}

TEST(RowMetricsCuda, Errors) {
  SKIP_WITHOUT_GPU();
  std::vector<float> host(100, 1.0f);
  DeviceBuffer dev(host.data(), host.size() * 4);
  RowsView d{dev.ptr, Dtype::kF32, 1, 100, 100};
  RowsView h{host.data(), Dtype::kF32, 1, 100, 100};
  EXPECT_THROW(CompareRowsCuda(h, d, RowMetricsOptions(), 0), std::invalid_argument);
  EXPECT_THROW(CompareRowsCuda(d, h, RowMetricsOptions(), 0), std::invalid_argument);
  RowsView bad = d;
  bad.vocab = 99;
  EXPECT_THROW(CompareRowsCuda(d, bad, RowMetricsOptions(), 0), std::invalid_argument);
  RowMetricsOptions opt;
  opt.topk = {65};
  EXPECT_THROW(CompareRowsCuda(d, d, opt, 0), std::invalid_argument);
  std::vector<int64_t> t = {100};
  opt = RowMetricsOptions();
  opt.targets = t.data();
  EXPECT_THROW(CompareRowsCuda(d, d, opt, 0), std::invalid_argument);
}

TEST(RowMetricsCuda, BuiltFlag) { EXPECT_TRUE(CudaBuilt()); }

}  // namespace
}  // namespace logitparity
