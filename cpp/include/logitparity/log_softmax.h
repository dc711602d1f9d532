// Standalone row kernels: log-softmax, negative log-likelihood of a target,
// log-sum-exp. Units: nats (natural log).
#ifndef LOGITPARITY_LOG_SOFTMAX_H_
#define LOGITPARITY_LOG_SOFTMAX_H_

#include <cstddef>
#include <cstdint>

#include "logitparity/rows.h"

namespace logitparity {

// Row-wise log-softmax into out (rows x vocab, contiguous, float32). out may
// alias ref.data when ref is float32 with row_stride == vocab (in place).
void LogSoftmax(const RowsView& logits, float* out, int threads = 0);

// Per-row negative log-likelihood of targets[r] in nats (lse - logit_t).
// A row holding NaN or +inf gives NaN; a -inf target logit gives +inf.
void Nll(const RowsView& logits, const int64_t* targets, double* out,
         int threads = 0);

// Per-row log-sum-exp (natural log). -inf for a row of only -inf.
void LogSumExp(const RowsView& logits, double* out, int threads = 0);

}  // namespace logitparity

#endif  // LOGITPARITY_LOG_SOFTMAX_H_
