// Rows loops, dispatch and checked entry points of log-sum-exp, log-softmax
// and NLL (log_softmax.h).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/log_softmax.cc"
#include "hwy/foreach_target.h"  // must come before highway.h
#include "hwy/highway.h"
#include "src/log_softmax-inl.h"
#include "src/thread_pool.h"

// Defined once: foreach_target.h re-includes this file per target.
#ifndef LOGITPARITY_SRC_LOG_SOFTMAX_OPS_
#define LOGITPARITY_SRC_LOG_SOFTMAX_OPS_
namespace logitparity {
enum RowsOpKind : int { kOpLogSumExp = 0, kOpLogSoftmax, kOpNll };
}  // namespace logitparity
#endif

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {

namespace {
const void* RowPtr(const RowsView& v, size_t r) {
  return static_cast<const uint8_t*>(v.data) + r * v.row_stride * DtypeSize(v.dtype);
}
}  // namespace

// kOpLogSumExp -> out_d, kOpLogSoftmax -> out_f (rows x vocab), kOpNll of
// targets -> out_d.
void RowsOp(int op, const RowsView& x, const int64_t* targets, size_t begin, size_t end,
            double* out_d, float* out_f) {
  const hn::ScalableTag<float> df;
  float* const buf = ThreadScratch(kChunk + kMaxLanesF32);  // per worker, kept
  for (size_t r = begin; r < end; ++r) {
    const void* row = RowPtr(x, r);
    switch (op) {
      case kOpLogSumExp:
        out_d[r] = LogSumExpRow(df, x.dtype, row, x.vocab, buf);
        break;
      case kOpLogSoftmax:
        LogSoftmaxRow(df, x.dtype, row, x.vocab, buf, out_f + r * x.vocab);
        break;
      case kOpNll: {
        const double lse = LogSumExpRow(df, x.dtype, row, x.vocab, buf);
        out_d[r] = (lse > -HUGE_VAL) ? lse - ScalarAt(x.dtype, row, static_cast<size_t>(targets[r]))
                                     : std::numeric_limits<double>::quiet_NaN();
        break;
      }
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <stdexcept>
#include <string>

#include "logitparity/log_softmax.h"
#include "src/thread_pool.h"

namespace logitparity {

HWY_EXPORT(RowsOp);

namespace {
void Run(RowsOpKind op, const RowsView& x, const int64_t* targets, double* out_d, float* out_f,
         int threads) {
  const auto kernel = HWY_DYNAMIC_DISPATCH(RowsOp);
  ParallelForRows(x.rows, threads, [&](size_t, size_t begin, size_t end) {
    kernel(op, x, targets, begin, end, out_d, out_f);
  });
}
}  // namespace

void LogSumExp(const RowsView& logits, double* out, int threads) {
  CheckRows(logits, "logits");
  Run(kOpLogSumExp, logits, nullptr, out, nullptr, threads);
}

void LogSoftmax(const RowsView& logits, float* out, int threads) {
  CheckRows(logits, "logits");
  if (out == logits.data &&
      (logits.dtype != Dtype::kF32 || logits.row_stride != logits.vocab)) {
    throw std::invalid_argument(
        "in-place log_softmax needs contiguous float32 logits (row_stride == vocab)");
  }
  Run(kOpLogSoftmax, logits, nullptr, nullptr, out, threads);
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
  Run(kOpNll, logits, targets, out, nullptr, threads);
}

}  // namespace logitparity
#endif  // HWY_ONCE
