// Rows loops, dispatch and checked entry points of the standalone kernels.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/log_softmax.cc"
#include "hwy/foreach_target.h"  // must come before highway.h
#include "hwy/highway.h"
#include "src/log_softmax-inl.h"
#include "src/thread_pool.h"

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {

namespace {
const void* RowPtr(const RowsView& v, size_t r) {
  return static_cast<const uint8_t*>(v.data) + r * v.row_stride * DtypeSize(v.dtype);
}
}  // namespace

// op: 0 lse -> out_d, 1 log-softmax -> out_f, 2 nll(targets) -> out_d,
//     3 top-k -> out_f (values) + out_i (indices)
void RowsOp(int op, const RowsView& x, const int64_t* targets, size_t k, size_t begin,
            size_t end, double* out_d, float* out_f, int64_t* out_i) {
  const hn::ScalableTag<float> df;
  float* const buf = ThreadScratch(kChunk + kMaxLanesF32);  // per worker, kept
  for (size_t r = begin; r < end; ++r) {
    const void* row = RowPtr(x, r);
    switch (op) {
      case 0:
        out_d[r] = LogSumExpRow(df, x.dtype, row, x.vocab, buf);
        break;
      case 1:
        LogSoftmaxRow(df, x.dtype, row, x.vocab, buf, out_f + r * x.vocab);
        break;
      case 2: {
        const double lse = LogSumExpRow(df, x.dtype, row, x.vocab, buf);
        out_d[r] = (lse > -HUGE_VAL) ? lse - ScalarAt(x.dtype, row, static_cast<size_t>(targets[r]))
                                     : std::numeric_limits<double>::quiet_NaN();
        break;
      }
      case 3:
        TopKRow(df, x.dtype, row, x.vocab, k, buf, out_f + r * k, out_i + r * k);
        break;
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <stdexcept>
#include <string>

#include "logitparity/row_metrics.h"
#include "src/thread_pool.h"

namespace logitparity {

HWY_EXPORT(RowsOp);

namespace {
void Run(int op, const RowsView& x, const int64_t* targets, size_t k, double* out_d,
         float* out_f, int64_t* out_i, int threads) {
  const auto kernel = HWY_DYNAMIC_DISPATCH(RowsOp);
  ParallelForRows(x.rows, threads, [&](size_t, size_t begin, size_t end) {
    kernel(op, x, targets, k, begin, end, out_d, out_f, out_i);
  });
}
}  // namespace

void LogSumExp(const RowsView& logits, double* out, int threads) {
  CheckRows(logits, "logits");
  Run(0, logits, nullptr, 0, out, nullptr, nullptr, threads);
}

void LogSoftmax(const RowsView& logits, float* out, int threads) {
  CheckRows(logits, "logits");
  if (out == logits.data &&
      (logits.dtype != Dtype::kF32 || logits.row_stride != logits.vocab)) {
    throw std::invalid_argument(
        "in-place log_softmax needs contiguous float32 logits (row_stride == vocab)");
  }
  Run(1, logits, nullptr, 0, nullptr, out, nullptr, threads);
}

void Nll(const RowsView& logits, const int64_t* targets, double* out, int threads) {
  CheckRows(logits, "logits");
  for (size_t r = 0; r < logits.rows; ++r) {
    if (targets[r] < 0 || targets[r] >= static_cast<int64_t>(logits.vocab)) {
      throw std::invalid_argument("targets must be in [0, " + std::to_string(logits.vocab) +
                                  ") (the vocab size), got " + std::to_string(targets[r]) +
                                  " at row " + std::to_string(r));
    }
  }
  Run(2, logits, targets, 0, out, nullptr, nullptr, threads);
}

void TopK(const RowsView& logits, size_t k, float* values, int64_t* indices, int threads) {
  CheckRows(logits, "logits");
  if (k < 1 || k > logits.vocab) {
    throw std::invalid_argument("k must be in [1, " + std::to_string(logits.vocab) +
                                "] (the vocab size), got " + std::to_string(k));
  }
  Run(3, logits, nullptr, k, nullptr, values, indices, threads);
}

}  // namespace logitparity
#endif  // HWY_ONCE
