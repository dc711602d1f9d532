// The standalone top-k (and the selection the fused comparison shares) on
// every compiled target against the scalar float64 reference TopKRef: ties
// to the lower index, masked rows, odd lengths, NaN rows.
#include <cmath>
#include <limits>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/topk_test.cc"
#include "hwy/foreach_target.h"  // must come before highway.h
#include "hwy/highway.h"
#include "hwy/tests/hwy_gtest.h"
#include "logitparity/topk.h"
#include "src/reference.h"
#include "src/test_util.h"
#include "src/topk-inl.h"

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

void TestTopKRow() {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  auto buf = hwy::AllocateAligned<float>(kChunk + kMaxLanesF32);
  ForEachKernelTestRow(N, kChunk, [&](size_t n, const TypedRow& row) {
    const Dtype dt = row.dtype;
    const float* v = row.values.data();
    for (size_t k : {size_t{1}, size_t{2}, size_t{5}, size_t{64}, size_t{100}}) {
      if (k > n) continue;
      std::vector<float> vals(k);
      std::vector<int64_t> idx(k);
      TopKRow(df, dt, row.data(), n, k, buf.get(), vals.data(), idx.data());
      const std::vector<int64_t> want_idx = TopKRef(v, n, k);
      for (size_t j = 0; j < k; ++j) {
        if (idx[j] != want_idx[j] || !(vals[j] == v[want_idx[j]])) {
          HWY_ABORT("%s topk n=%zu k=%zu j=%zu: got %lld (%g) want %lld (%g)",
                    hwy::TargetName(HWY_TARGET), n, k, j, static_cast<long long>(idx[j]), vals[j],
                    static_cast<long long>(want_idx[j]), v[want_idx[j]]);
        }
      }
    }
  });
  // NaN: NaN values, -1 indices.
  std::vector<float> x = LmLogits(100, 3);
  x[50] = NAN;
  float val[3];
  int64_t idx[3];
  TopKRow(df, Dtype::kF32, x.data(), x.size(), 3, buf.get(), val, idx);
  if (idx[0] != -1 || !std::isnan(val[0])) HWY_ABORT("topk of a NaN row must be NaN/-1");
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace logitparity {
HWY_BEFORE_TEST(TopKTest);
HWY_EXPORT_AND_TEST_P(TopKTest, TestTopKRow);

TEST(TopKPublic, ThreadsAndErrors) {
  const size_t rows = 4, vocab = 1000;
  std::vector<float> x;
  for (size_t r = 0; r < rows; ++r) {
    const std::vector<float> v = LmLogits(vocab, r);
    x.insert(x.end(), v.begin(), v.end());
  }
  RowsView cv{x.data(), Dtype::kF32, rows, vocab, vocab};
  std::vector<float> v1(rows * 5), v2(rows * 5);
  std::vector<int64_t> i1(rows * 5), i2(rows * 5);
  TopK(cv, 5, v1.data(), i1.data(), 1);
  TopK(cv, 5, v2.data(), i2.data(), 3);
  EXPECT_EQ(v1, v2);
  EXPECT_EQ(i1, i2);
  for (size_t r = 0; r < rows; ++r) {
    const std::vector<int64_t> want = TopKRef(x.data() + r * vocab, vocab, 5);
    for (size_t j = 0; j < 5; ++j) EXPECT_EQ(i1[r * 5 + j], want[j]) << r << " " << j;
  }
  std::vector<float> vals(rows * 2);
  std::vector<int64_t> idx(rows * 2);
  EXPECT_THROW(TopK(cv, 0, vals.data(), idx.data()), std::invalid_argument);
  EXPECT_THROW(TopK(cv, vocab + 1, vals.data(), idx.data()), std::invalid_argument);
}
}  // namespace logitparity
#endif  // HWY_ONCE
