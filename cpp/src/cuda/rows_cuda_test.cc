// The CUDA single-row kernels (LogSumExpCuda, NllCuda, LogSoftmaxCuda,
// TopKCuda) against the scalar float64 references with the tolerances of
// log_softmax_test.cc: lengths around the block's step (1024) and real vocab
// sizes, every storage dtype, misaligned starts, masked rows, ties, NaN and
// +inf, row strides, in-place log-softmax, and the argument errors. Every
// test skips where no CUDA device is usable (the CI machine compiles it only).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "logitparity/cuda.h"
#include "logitparity/log_softmax.h"
#include "logitparity/topk.h"
#include "src/cuda/cuda_test_util.h"
#include "src/reference.h"
#include "src/test_util.h"

namespace logitparity {
namespace {

const float kNinf = -std::numeric_limits<float>::infinity();

// The standalone kernels' rows (test_util.h) and one more: every token masked.
std::vector<std::vector<float>> Rows(size_t n) {
  std::vector<std::vector<float>> rows = KernelTestRows(n);
  rows.push_back(std::vector<float>(n, kNinf));
  return rows;
}

void CheckRow(const std::vector<float>& x, Dtype dt, size_t misalign) {
  const size_t n = x.size();
  const TypedRow row = MakeRow(x, dt, misalign);
  const float* v = row.values.data();
  DeviceBuffer d(row.bytes.data(), row.bytes.size());
  const RowsView view{static_cast<const uint8_t*>(d.ptr) + row.offset * DtypeSize(dt), dt, 1, n,
                      n};
  const std::string what = "n=" + std::to_string(n) + " " + DtypeName(dt) + " misalign " +
                           std::to_string(misalign);

  double lse = 0;
  LogSumExpCuda(view, &lse, 0);
  const double want_lse = LogSumExpRef(v, n);
  ASSERT_TRUE(Close(lse, want_lse, 1e-12, 1e-12)) << what << " lse: got " << lse << " want "
                                                  << want_lse;

  const int64_t t = static_cast<int64_t>((n * 7) / 11);
  double nll = 0;
  NllCuda(view, &t, &nll, 0);
  const double want_nll = NllRef(v, n, t);
  ASSERT_TRUE(Close(nll, want_nll, 1e-12, 1e-12)) << what << " nll: got " << nll << " want "
                                                  << want_nll;

  float* d_out = nullptr;
  ASSERT_EQ(cudaSuccess, cudaMalloc(&d_out, n * sizeof(float)));
  LogSoftmaxCuda(view, d_out, 0);
  std::vector<float> out(n);
  ASSERT_EQ(cudaSuccess, cudaMemcpy(out.data(), d_out, n * sizeof(float), cudaMemcpyDeviceToHost));
  cudaFree(d_out);
  std::vector<double> want(n);
  LogSoftmaxRef(v, n, want.data());
  for (size_t i = 0; i < n; ++i) {
    // One rounding to float32 of the float64 difference.
    ASSERT_TRUE(Close(out[i], want[i], 1e-12, 6e-8))
        << what << " log_softmax i=" << i << ": got " << out[i] << " want " << want[i];
  }

  for (size_t k : {size_t{1}, size_t{2}, size_t{5}, size_t{64}, size_t{100}, size_t{256}}) {
    if (k > n) continue;
    std::vector<float> vals(k);
    std::vector<int64_t> idx(k);
    double top_lse = 0;
    TopKCuda(view, k, vals.data(), idx.data(), &top_lse, 0);
    ASSERT_TRUE(Close(top_lse, lse, 1e-13, 1e-13)) << what << " topk lse " << top_lse;
    const std::vector<int64_t> want_idx = TopKRef(v, n, k);
    for (size_t j = 0; j < k; ++j) {
      ASSERT_TRUE(idx[j] == want_idx[j] && vals[j] == v[want_idx[j]])
          << what << " topk k=" << k << " j=" << j << ": got " << idx[j] << " (" << vals[j]
          << ") want " << want_idx[j] << " (" << v[want_idx[j]] << ")";
    }
  }
}

// Lengths around a warp's span (128), the block's step (1024) and two steps,
// then real vocabulary sizes.
TEST(RowsCuda, AgainstReference) {
  SKIP_WITHOUT_GPU();
  for (size_t n : {1, 2, 3, 5, 127, 128, 129, 1023, 1024, 1025, 2049, 5003}) {
    for (const auto& x : Rows(n)) {
      for (Dtype dt : {Dtype::kF32, Dtype::kF16, Dtype::kBF16}) {
        for (size_t mis : {size_t{0}, size_t{1}, size_t{3}}) {
          CheckRow(x, dt, mis);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
  for (size_t n : {32000, 49152, 151936, 262144}) {
    for (const auto& x : Rows(n)) {
      CheckRow(x, Dtype::kF32, 0);
      CheckRow(x, Dtype::kBF16, 1);
      if (HasFatalFailure()) return;
    }
  }
}

// NaN rows: NaN lse, NLL and log-probs, NaN values with -1 indices; +inf
// rows: NaN lse and NLL but +inf ranks first in the top-k; a -inf target
// logit gives NLL +inf.
TEST(RowsCuda, NonFinite) {
  SKIP_WITHOUT_GPU();
  const size_t n = 3000;
  std::vector<float> nan = LmLogits(n, 3), pinf = LmLogits(n, 4), masked = LmLogits(n, 5);
  nan[1500] = std::numeric_limits<float>::quiet_NaN();
  pinf[2999] = std::numeric_limits<float>::infinity();
  masked[7] = kNinf;
  std::vector<float> all;
  for (const auto* r : {&nan, &pinf, &masked}) all.insert(all.end(), r->begin(), r->end());
  DeviceBuffer d(all.data(), all.size() * 4);
  const RowsView view{d.ptr, Dtype::kF32, 3, n, n};
  std::vector<double> lse(3), nll(3);
  LogSumExpCuda(view, lse.data(), 0);
  EXPECT_TRUE(std::isnan(lse[0]) && std::isnan(lse[1]));
  EXPECT_TRUE(Close(lse[2], LogSumExpRef(masked.data(), n), 1e-12, 1e-12));
  const std::vector<int64_t> t = {0, 0, 7};
  NllCuda(view, t.data(), nll.data(), 0);
  EXPECT_TRUE(std::isnan(nll[0]) && std::isnan(nll[1]));
  EXPECT_EQ(std::numeric_limits<double>::infinity(), nll[2]);
  std::vector<float> vals(3 * 4);
  std::vector<int64_t> idx(3 * 4);
  TopKCuda(view, 4, vals.data(), idx.data(), nullptr, 0);
  for (int j = 0; j < 4; ++j) EXPECT_TRUE(idx[j] == -1 && std::isnan(vals[j])) << j;
  EXPECT_EQ(2999, idx[4]);
  EXPECT_EQ(std::numeric_limits<float>::infinity(), vals[4]);
  const std::vector<int64_t> want = TopKRef(pinf.data(), n, 4);
  for (int j = 0; j < 4; ++j) EXPECT_EQ(want[j], idx[4 + j]);
}

// Row strides (padding never read), bitwise batching invariance, the CPU
// kernels within their tolerances, and in-place log-softmax.
TEST(RowsCuda, StridesBatchingCpuAndInPlace) {
  SKIP_WITHOUT_GPU();
  const size_t rows = 23, vocab = 4099, stride = 4107;
  std::vector<float> a(rows * stride, 1e30f);
  for (size_t r = 0; r < rows; ++r) {
    const std::vector<float> x = LmLogits(vocab, 7 * r);
    std::copy(x.begin(), x.end(), a.begin() + r * stride);
  }
  DeviceBuffer d(a.data(), a.size() * 4);
  const RowsView view{d.ptr, Dtype::kF32, rows, vocab, stride};
  std::vector<double> lse(rows), part(5), cpu(rows);
  LogSumExpCuda(view, lse.data(), 0);
  const RowsView sub{static_cast<const float*>(d.ptr) + 9 * stride, Dtype::kF32, 5, vocab, stride};
  LogSumExpCuda(sub, part.data(), 0);
  EXPECT_EQ(0, std::memcmp(lse.data() + 9, part.data(), 5 * sizeof(double)));
  const RowsView host{a.data(), Dtype::kF32, rows, vocab, stride};
  LogSumExp(host, cpu.data());
  for (size_t r = 0; r < rows; ++r) {
    EXPECT_TRUE(Close(lse[r], cpu[r], 1e-6, 1e-6)) << "row " << r;
    EXPECT_TRUE(Close(lse[r], LogSumExpRef(a.data() + r * stride, vocab), 1e-12, 1e-12));
  }
  const size_t k = 40;
  std::vector<float> vals(rows * k), cvals(rows * k);
  std::vector<int64_t> idx(rows * k), cidx(rows * k);
  TopKCuda(view, k, vals.data(), idx.data(), nullptr, 0);
  TopK(host, k, cvals.data(), cidx.data());
  EXPECT_EQ(cidx, idx);
  EXPECT_EQ(cvals, vals);

  // In place: contiguous float32 rows overwritten with their log-probs.
  std::vector<float> c(rows * vocab);
  for (size_t r = 0; r < rows; ++r) {
    std::copy(a.begin() + r * stride, a.begin() + r * stride + vocab, c.begin() + r * vocab);
  }
  DeviceBuffer dc(c.data(), c.size() * 4);
  const RowsView cv{dc.ptr, Dtype::kF32, rows, vocab, vocab};
  LogSoftmaxCuda(cv, static_cast<float*>(dc.ptr), 0);
  std::vector<float> got(c.size());
  ASSERT_EQ(cudaSuccess, cudaMemcpy(got.data(), dc.ptr, got.size() * 4, cudaMemcpyDeviceToHost));
  std::vector<double> want(vocab);
  for (size_t r = 0; r < rows; ++r) {
    LogSoftmaxRef(c.data() + r * vocab, vocab, want.data());
    for (size_t i = 0; i < vocab; ++i) {
      ASSERT_TRUE(Close(got[r * vocab + i], want[i], 1e-12, 6e-8)) << "row " << r << " i " << i;
    }
  }
}

TEST(RowsCuda, Errors) {
  SKIP_WITHOUT_GPU();
  std::vector<float> host(300, 1.0f);
  DeviceBuffer dev(host.data(), host.size() * 4);
  const RowsView d{dev.ptr, Dtype::kF32, 1, 300, 300};
  const RowsView h{host.data(), Dtype::kF32, 1, 300, 300};
  double lse;
  EXPECT_THROW(LogSumExpCuda(h, &lse, 0), std::invalid_argument);
  const int64_t bad_t = 300;
  EXPECT_THROW(NllCuda(d, &bad_t, &lse, 0), std::invalid_argument);
  std::vector<float> vals(300);
  std::vector<int64_t> idx(300);
  EXPECT_THROW(TopKCuda(d, 0, vals.data(), idx.data(), nullptr, 0), std::invalid_argument);
  EXPECT_THROW(TopKCuda(d, kMaxTopKCuda + 1, vals.data(), idx.data(), nullptr, 0),
               std::invalid_argument);
  EXPECT_THROW(LogSoftmaxCuda(d, vals.data(), 0), std::invalid_argument);  // host output
  const RowsView strided{dev.ptr, Dtype::kF32, 2, 100, 150};
  EXPECT_THROW(LogSoftmaxCuda(strided, static_cast<float*>(dev.ptr), 0), std::invalid_argument);
}

}  // namespace
}  // namespace logitparity
