// Test helpers shared by the kernel tests: typed row storage, generators and
// tolerance checks. Not part of the library.
#ifndef LOGITPARITY_SRC_TEST_UTIL_H_
#define LOGITPARITY_SRC_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "logitparity/row_metrics.h"
#include "logitparity/rows.h"

namespace logitparity {

// A row stored in `dtype` at element offset `misalign` inside its buffer,
// plus the exact float values it represents (what the reference sees).
struct TypedRow {
  Dtype dtype;
  std::vector<uint8_t> bytes;
  size_t offset = 0;  // elements
  std::vector<float> values;

  const void* data() const { return bytes.data() + offset * DtypeSize(dtype); }
};

inline TypedRow MakeRow(const std::vector<float>& x, Dtype dtype, size_t misalign = 0) {
  TypedRow r;
  r.dtype = dtype;
  r.offset = misalign;
  const size_t es = DtypeSize(dtype);
  r.bytes.assign((x.size() + misalign + 1) * es, 0xAB);  // 0xAB: garbage around it
  r.values.resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint8_t* p = r.bytes.data() + (misalign + i) * es;
    if (dtype == Dtype::kF32) {
      std::memcpy(p, &x[i], 4);
      r.values[i] = x[i];
    } else {
      const uint16_t b = dtype == Dtype::kF16 ? F32ToF16Bits(x[i]) : F32ToBF16Bits(x[i]);
      std::memcpy(p, &b, 2);
      r.values[i] = dtype == Dtype::kF16 ? F16BitsToF32(b) : BF16BitsToF32(b);
    }
  }
  return r;
}

// Logits shaped like a language model's: a Gaussian bulk, a few strong
// candidates near the top, a positive offset (LM logits are not centred).
inline std::vector<float> LmLogits(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> bulk(0.0f, 2.5f);
  std::vector<float> x(n);
  for (auto& v : x) v = bulk(rng) + 4.0f;
  std::uniform_int_distribution<size_t> pick(0, n - 1);
  for (int j = 0; j < 5 && n > 1; ++j) x[pick(rng)] += 8.0f + 2.0f * j;
  return x;
}

// b = a + Gaussian noise of scale `sigma`.
inline std::vector<float> Perturb(const std::vector<float>& a, float sigma, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> noise(0.0f, sigma);
  std::vector<float> b(a);
  for (auto& v : b) v += noise(rng);
  return b;
}

// A reference row and a candidate row with a target token (-1: none): the
// row-pair cases of the CPU and CUDA row-metrics tests.
struct RowPair {
  std::string name;
  std::vector<float> a, b;
  int64_t target = -1;
};

// identical, close (1e-3 noise), noisy (0.3), shifted by a constant (the
// same distribution), far (an unrelated row, no target) and spiked (noisy,
// with a spike of +100 in the reference and +120 elsewhere in the
// candidate; n >= 16), of length n.
inline std::vector<RowPair> RowPairCases(size_t n, uint64_t seed) {
  const std::vector<float> a = LmLogits(n, seed);
  std::vector<RowPair> cases;
  const int64_t t = static_cast<int64_t>((seed * 7919) % n);
  cases.push_back({"identical", a, a, t});
  cases.push_back({"close", a, Perturb(a, 1e-3f, seed + 1), t});
  cases.push_back({"noisy", a, Perturb(a, 0.3f, seed + 2), t});
  std::vector<float> shifted(a);
  for (auto& v : shifted) v += 3.25f;
  cases.push_back({"shifted", a, shifted, t});
  cases.push_back({"far", a, LmLogits(n, seed + 99), -1});
  if (n >= 16) {
    // Noisy rows with a spike on each side, away from the row's start (so
    // that the running maxima rise far above the first chunk's on one side
    // only): the far terms of rows that share little.
    std::vector<float> sa(a), sb = Perturb(a, 0.3f, seed + 3);
    sa[n - 1 - n / 7] += 100.0f;
    sb[n / 3] += 120.0f;
    cases.push_back({"spiked", sa, sb, static_cast<int64_t>(n / 3)});
  }
  return cases;
}

// got vs want within atol + rtol |want|; inf must match inf, NaN must match NaN.
// Rows of length n for the standalone kernels: LM-like logits, every other
// entry masked (-inf), all tied, and a single finite entry at the end.
inline std::vector<std::vector<float>> KernelTestRows(size_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<std::vector<float>> rows;
  rows.push_back(LmLogits(n, n));
  std::vector<float> masked = LmLogits(n, n + 1);
  for (size_t i = 1; i < n; i += 2) masked[i] = ninf;
  rows.push_back(masked);
  rows.push_back(std::vector<float>(n, 0.5f));  // all tied
  std::vector<float> one(n, ninf);
  one[n - 1] = -3.0f;
  rows.push_back(one);
  return rows;
}

// Calls f(n, row) for every case of the single-row kernel tests: lengths
// around a vector of `lanes` floats (1, lanes - 1, lanes, lanes + 1,
// 3 lanes + 2), a chunk and two real vocabulary sizes, each
// KernelTestRows(n) row in every storage dtype, one element misaligned.
template <class F>
void ForEachKernelTestRow(size_t lanes, size_t chunk, F&& f) {
  for (size_t n : {size_t{1}, lanes - 1, lanes, lanes + 1, 3 * lanes + 2, chunk + 3, size_t{49152},
                   size_t{151936}}) {
    if (n == 0) continue;
    for (const auto& x : KernelTestRows(n)) {
      for (Dtype dt : {Dtype::kF32, Dtype::kF16, Dtype::kBF16}) f(n, MakeRow(x, dt, 1));
    }
  }
}

inline bool Close(double got, double want, double atol, double rtol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

// Tolerance per field: |got - want| <= atol + rtol |want|. The kernel takes
// exp/expm1/log in float32 (<= 4 ulp) and sums in float64, so the error of a
// log-sum-exp is bounded by the float32 rounding of (x - max) and of exp,
// ~1e-7 relative per term; KL, JS and entropy inherit ~1e-7 absolute on far
// rows and much less on close rows (the KL form in row_metrics-inl.h), which
// TestKlTightOnCloseRows (row_metrics_test.cc) pins separately. Shared by
// the CPU and the CUDA kernel tests.
struct Tol {
  double atol, rtol;
};
inline Tol FieldTol(int f) {
  switch (f) {
    case kLseRef: case kLseCand: return {1e-6, 1e-6};
    case kKlRefCand: case kKlCandRef: return {1e-6, 1e-5};
    case kJs: return {1e-6, 1e-5};
    case kMaxAbsLogit: return {0, 1.2e-7};      // |a - b| rounded to float once
    case kMeanAbsLogit: return {0, 1e-6};
    case kMaxAbsLogprob: return {1e-6, 1e-6};
    case kEntropyRef: case kEntropyCand: return {1e-6, 1e-6};
    case kNllRef: case kNllCand: return {1e-6, 1e-6};
    case kDeltaP: return {1e-7, 1e-6};
    default: return {0, 0};  // margins, indices, ranks, counts: exact
  }
}

// The fields checked on rows holding a huge finite logit (+-2e38, one entry,
// the same on both sides): by the CPU and CUDA tests' HugeFiniteLogits. The
// cosine is left out (the float32 sums of x^2 overflow at such values), and
// so are the margins and the overlaps.
inline constexpr int kHugeFiniteFields[] = {
    kNonfiniteRef, kNonfiniteCand, kLseRef, kLseCand, kKlRefCand, kKlCandRef, kJs,
    kMaxAbsLogit, kMeanAbsLogit, kEntropyRef, kEntropyCand, kArgmaxRef, kArgmaxCand,
    kRankOfRefTop1InCand};

// |1 - cos| + |a-b|^2 / (2 |a| |b|) over entries finite on both sides.
inline double CosineScale(const std::vector<float>& a, const std::vector<float>& b) {
  double d2 = 0, na = 0, nb = 0, dot = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!(a[i] > -HUGE_VALF) || !(b[i] > -HUGE_VALF) || !std::isfinite(a[i]) || !std::isfinite(b[i])) continue;
    const double x = a[i], y = b[i];
    d2 += (x - y) * (x - y);
    na += x * x;
    nb += y * y;
    dot += x * y;
  }
  if (na == 0 || nb == 0) return 0;
  return std::fabs(1 - dot / std::sqrt(na * nb)) + d2 / (2 * std::sqrt(na * nb));
}

}  // namespace logitparity

#endif  // LOGITPARITY_SRC_TEST_UTIL_H_
