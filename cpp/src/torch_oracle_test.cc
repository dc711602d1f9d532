// libtorch as a second, independent oracle for the public entry points:
// torch::log_softmax, torch::kl_div and torch::topk in float64 on the same
// float32 inputs. Built only where CMake finds Torch.
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "logitparity/log_softmax.h"
#include "logitparity/row_metrics.h"
#include "logitparity/topk.h"
#include "src/test_util.h"

namespace logitparity {
namespace {

TEST(TorchOracle, LogSoftmaxKlTopK) {
  torch::manual_seed(0);
  const int64_t rows = 16, vocab = 49152;
  torch::Tensor a = torch::randn({rows, vocab}) * 2.5 + 4.0;
  torch::Tensor b = a + 0.05 * torch::randn({rows, vocab});
  a = a.contiguous();
  b = b.contiguous();
  RowsView va{a.data_ptr<float>(), Dtype::kF32, static_cast<size_t>(rows),
              static_cast<size_t>(vocab), static_cast<size_t>(vocab)};
  RowsView vb{b.data_ptr<float>(), Dtype::kF32, static_cast<size_t>(rows),
              static_cast<size_t>(vocab), static_cast<size_t>(vocab)};
  RowMetricsOptions opt;
  opt.topk = {1, 5, 10};
  const RowMetricsResult res = CompareRows(va, vb, opt);

  const torch::Tensor la = torch::log_softmax(a.to(torch::kFloat64), -1);
  const torch::Tensor lb = torch::log_softmax(b.to(torch::kFloat64), -1);
  // kl_div(input = log q, target = log p, log_target) = sum p (log p - log q)
  const torch::Tensor kl_pq = torch::kl_div(lb, la, at::Reduction::None, true).sum(-1);
  const torch::Tensor kl_qp = torch::kl_div(la, lb, at::Reduction::None, true).sum(-1);
  const torch::Tensor lse_a = torch::logsumexp(a.to(torch::kFloat64), -1);
  const auto ta = std::get<1>(torch::topk(a, 10, -1));
  const auto tb = std::get<1>(torch::topk(b, 10, -1));
  for (int64_t r = 0; r < rows; ++r) {
    const double* f = res.fields.data() + r * kNumRowFields;
    EXPECT_NEAR(f[kKlRefCand], kl_pq[r].item<double>(), 1e-5 * kl_pq[r].item<double>()) << r;
    EXPECT_NEAR(f[kKlCandRef], kl_qp[r].item<double>(), 1e-5 * kl_qp[r].item<double>()) << r;
    EXPECT_NEAR(f[kLseRef], lse_a[r].item<double>(), 1e-6 * (1 + std::fabs(lse_a[r].item<double>())));
    EXPECT_EQ(static_cast<int64_t>(f[kArgmaxRef]), ta[r][0].item<int64_t>()) << r;
    EXPECT_EQ(static_cast<int64_t>(f[kArgmaxCand]), tb[r][0].item<int64_t>()) << r;
    // Overlap of the top-10 sets (random logits have no ties, so torch's
    // unspecified tie order does not matter here).
    int common = 0;
    for (int i = 0; i < 10; ++i) {
      for (int j = 0; j < 10; ++j) common += ta[r][i].item<int64_t>() == tb[r][j].item<int64_t>();
    }
    EXPECT_EQ(res.topk_common[r * 3 + 2], common) << r;
  }

  std::vector<float> ls(static_cast<size_t>(rows * vocab));
  LogSoftmax(va, ls.data());
  const torch::Tensor ours = torch::from_blob(ls.data(), {rows, vocab}, torch::kFloat32);
  const double err = (ours.to(torch::kFloat64) - la).abs().max().item<double>();
  EXPECT_LT(err, 2e-6);
  std::vector<float> vals(rows * 5);
  std::vector<int64_t> idx(rows * 5);
  TopK(va, 5, vals.data(), idx.data());
  const auto t5 = torch::topk(a, 5, -1);
  for (int64_t r = 0; r < rows; ++r) {
    for (int j = 0; j < 5; ++j) {
      EXPECT_EQ(idx[r * 5 + j], std::get<1>(t5)[r][j].item<int64_t>());
      EXPECT_EQ(vals[r * 5 + j], std::get<0>(t5)[r][j].item<float>());
    }
  }
}

}  // namespace
}  // namespace logitparity
