// Rows loop, dynamic dispatch and the checked entry point of the fused row
// comparison (the per-target kernel is in row_metrics-inl.h).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/row_metrics.cc"
#include "hwy/foreach_target.h"  // must come before highway.h
#include "hwy/highway.h"
#include "src/row_metrics-inl.h"
#include "src/thread_pool.h"

HWY_BEFORE_NAMESPACE();
namespace logitparity {
namespace HWY_NAMESPACE {

// Rows [begin, end) of a checked pair of views.
void CompareRowsRange(const RowsView& ref, const RowsView& cand, const int64_t* targets,
                      const int* ks, size_t num_ks, bool js, size_t begin, size_t end,
                      double* fields, int32_t* overlap) {
  const hn::ScalableTag<float> df;
  // Per-worker scratch, kept for the thread's lifetime.
  float* buf = ThreadScratch(2 * (kChunk + kMaxLanesF32));
  ChunkScratch scratch{buf, buf + kChunk + kMaxLanesF32};
  const size_t ea = DtypeSize(ref.dtype), eb = DtypeSize(cand.dtype);
  for (size_t row = begin; row < end; ++row) {
    RowArgs args;
    args.a = static_cast<const uint8_t*>(ref.data) + row * ref.row_stride * ea;
    args.a_dtype = ref.dtype;
    args.b = static_cast<const uint8_t*>(cand.data) + row * cand.row_stride * eb;
    args.b_dtype = cand.dtype;
    args.n = ref.vocab;
    args.target = targets ? targets[row] : -1;
    args.ks = ks;
    args.num_ks = num_ks;
    args.js = js;
    CompareRowImpl(df, args, scratch, fields + row * kNumRowFields, overlap + row * num_ks);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace logitparity
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <stdexcept>
#include <string>

#include "src/thread_pool.h"

namespace logitparity {

HWY_EXPORT(CompareRowsRange);

const char* RowFieldName(int field) {
  static const char* const kNames[kNumRowFields] = {
      "lse_ref",       "lse_cand",     "kl_ref_cand",
      "kl_cand_ref",   "js",           "cosine",
      "max_abs_logit", "mean_abs_logit", "max_abs_logprob",
      "entropy_ref",   "entropy_cand", "margin_ref",
      "margin_cand",   "nll_ref",      "nll_cand",
      "delta_p",       "argmax_ref",   "argmax_cand",
      "rank_of_ref_top1_in_cand", "nonfinite_ref", "nonfinite_cand"};
  if (field < 0 || field >= kNumRowFields) return "unknown";
  return kNames[field];
}

std::invalid_argument TargetOutOfRange(size_t vocab, int64_t got, size_t row) {
  return std::invalid_argument("targets must be in [0, " + std::to_string(vocab) +
                               ") (the vocab size) or -1 for none, got " + std::to_string(got) +
                               " at row " + std::to_string(row));
}

void CheckCompareArgs(const RowsView& ref, const RowsView& cand,
                      const RowMetricsOptions& options) {
  CheckRows(ref, "ref");
  CheckRows(cand, "cand");
  if (ref.vocab != cand.vocab) {
    throw std::invalid_argument(
        "ref and cand must have the same vocab size, got " + std::to_string(ref.vocab) +
        " and " + std::to_string(cand.vocab) +
        "; were both runs made with the same tokenizer (or is one vocabulary padded)?");
  }
  if (ref.rows != cand.rows) {
    throw std::invalid_argument("ref and cand must have the same number of rows, got " +
                                std::to_string(ref.rows) + " and " +
                                std::to_string(cand.rows));
  }
  if (options.topk.empty()) {
    throw std::invalid_argument("topk must hold at least one k, got an empty list");
  }
  const size_t kmax_allowed = std::min(kMaxTopK, ref.vocab);
  for (size_t i = 0; i < options.topk.size(); ++i) {
    const int k = options.topk[i];
    if (k < 1 || static_cast<size_t>(k) > kmax_allowed) {
      throw std::invalid_argument("topk must be in [1, " + std::to_string(kmax_allowed) +
                                  "] (min of 64 and the vocab size), got " + std::to_string(k));
    }
    if (i > 0 && k <= options.topk[i - 1]) {
      throw std::invalid_argument("topk must be sorted ascending without repeats");
    }
  }
  if (options.targets) {
    for (size_t r = 0; r < ref.rows; ++r) {
      const int64_t t = options.targets[r];
      if (t < -1 || t >= static_cast<int64_t>(ref.vocab)) throw TargetOutOfRange(ref.vocab, t, r);
    }
  }
}

RowMetricsResult CompareRows(const RowsView& ref, const RowsView& cand,
                             const RowMetricsOptions& options) {
  CheckCompareArgs(ref, cand, options);
  RowMetricsResult result;
  result.rows = ref.rows;
  result.topk = options.topk;
  result.fields.resize(ref.rows * kNumRowFields);
  result.topk_common.resize(ref.rows * options.topk.size());
  const auto kernel = HWY_DYNAMIC_DISPATCH(CompareRowsRange);
  ParallelForRows(ref.rows, options.threads, [&](size_t, size_t begin, size_t end) {
    kernel(ref, cand, options.targets, options.topk.data(), options.topk.size(), options.js,
           begin, end, result.fields.data(), result.topk_common.data());
  });
  return result;
}

}  // namespace logitparity
#endif  // HWY_ONCE
