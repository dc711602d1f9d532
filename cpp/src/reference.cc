#include "src/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace logitparity {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

bool IsBad(float x) { return std::isnan(x) || x == std::numeric_limits<float>::infinity(); }

}  // namespace

double LogSumExpRef(const float* x, size_t n) {
  double m = -kInf;
  for (size_t i = 0; i < n; ++i) m = std::max(m, static_cast<double>(x[i]));
  if (m == -kInf) return -kInf;
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(x[i]) - m);
  return m + std::log(s);
}

void LogSoftmaxRef(const float* x, size_t n, double* out) {
  const double lse = LogSumExpRef(x, n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<double>(x[i]) - lse;
}

std::vector<int64_t> TopKRef(const float* x, size_t n, size_t k) {
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(),
                   [x](int64_t i, int64_t j) { return x[i] > x[j]; });
  idx.resize(std::min(k, n));
  return idx;
}

double NllRef(const float* x, size_t n, int64_t target) {
  for (size_t i = 0; i < n; ++i) {
    if (IsBad(x[i])) return kNaN;
  }
  const double lse = LogSumExpRef(x, n);
  if (lse == -kInf) return kNaN;
  return lse - static_cast<double>(x[target]);
}

RefRowResult CompareRowRef(const float* a, const float* b, size_t n,
                           int64_t target, const std::vector<int>& ks) {
  RefRowResult r;
  double* f = r.fields;
  for (int i = 0; i < kNumRowFields; ++i) f[i] = kNaN;
  r.topk_common.assign(ks.size(), -1);
  double bad_a = 0, bad_b = 0;
  for (size_t i = 0; i < n; ++i) {
    bad_a += IsBad(a[i]);
    bad_b += IsBad(b[i]);
  }
  f[kNonfiniteRef] = bad_a;
  f[kNonfiniteCand] = bad_b;
  f[kArgmaxRef] = f[kArgmaxCand] = f[kRankOfRefTop1InCand] = -1;
  if (bad_a + bad_b > 0) return r;

  const double lse_a = LogSumExpRef(a, n);
  const double lse_b = LogSumExpRef(b, n);
  f[kLseRef] = lse_a;
  f[kLseCand] = lse_b;
  const bool dist_a = lse_a > -kInf, dist_b = lse_b > -kInf;

  // Distribution terms, each definition written out directly.
  double kl_pq = 0, kl_qp = 0, js = 0, h_a = 0, h_b = 0, max_lp = -kInf;
  double dot = 0, na = 0, nb = 0, max_abs = -kInf, sum_abs = 0;
  size_t compared = 0;
  for (size_t i = 0; i < n; ++i) {
    const double x = a[i], y = b[i];
    const bool fx = x > -kInf, fy = y > -kInf;
    if (!fx && !fy) continue;  // masked on both sides: not compared
    ++compared;
    const double diff = (fx && fy) ? std::fabs(x - y) : kInf;
    max_abs = std::max(max_abs, diff);
    sum_abs += diff;
    if (fx && fy) {
      dot += x * y;
      na += x * x;
      nb += y * y;
    }
    if (!dist_a || !dist_b) continue;
    const double lp = x - lse_a, lq = y - lse_b;  // -inf where masked
    const double p = std::exp(lp), q = std::exp(lq);
    max_lp = std::max(max_lp, (fx && fy) ? std::fabs(lp - lq) : kInf);
    if (p > 0) kl_pq += (q > 0) ? p * (lp - lq) : kInf;
    if (q > 0) kl_qp += (p > 0) ? q * (lq - lp) : kInf;
    // Masked entries have p == 0 exactly; an entry whose exp underflows in
    // double still has a finite log-probability and enters KL above.
    if (!fx) kl_qp = kInf;
    if (!fy) kl_pq = kInf;
    const double m = 0.5 * (p + q);
    if (p > 0) js += 0.5 * p * std::log(p / m);
    if (q > 0) js += 0.5 * q * std::log(q / m);
    if (p > 0) h_a -= p * lp;
    if (q > 0) h_b -= q * lq;
  }
  if (dist_a) f[kEntropyRef] = h_a;
  if (dist_b) f[kEntropyCand] = h_b;
  if (dist_a && dist_b) {
    f[kKlRefCand] = kl_pq;
    f[kKlCandRef] = kl_qp;
    f[kJs] = js;
    f[kMaxAbsLogprob] = max_lp;
  }
  if (na > 0 && nb > 0) f[kCosine] = dot / std::sqrt(na * nb);
  if (compared > 0) {
    f[kMaxAbsLogit] = max_abs;
    f[kMeanAbsLogit] = sum_abs / static_cast<double>(compared);
  }

  const size_t kmax = std::max<size_t>(2, ks.empty() ? 0 : ks.back());
  const std::vector<int64_t> ta = TopKRef(a, n, kmax);
  const std::vector<int64_t> tb = TopKRef(b, n, kmax);
  f[kArgmaxRef] = static_cast<double>(ta[0]);
  f[kArgmaxCand] = static_cast<double>(tb[0]);
  f[kMarginRef] = n > 1 ? static_cast<double>(a[ta[0]]) - a[ta[1]] : kInf;
  f[kMarginCand] = n > 1 ? static_cast<double>(b[tb[0]]) - b[tb[1]] : kInf;
  const int64_t t = ta[0];
  double rank = 0;
  for (size_t j = 0; j < n; ++j) {
    rank += (b[j] > b[t]) || (b[j] == b[t] && static_cast<int64_t>(j) < t);
  }
  f[kRankOfRefTop1InCand] = rank;
  for (size_t i = 0; i < ks.size(); ++i) {
    const size_t k = static_cast<size_t>(ks[i]);
    int32_t common = 0;
    for (size_t x = 0; x < k && x < ta.size(); ++x) {
      for (size_t y = 0; y < k && y < tb.size(); ++y) common += ta[x] == tb[y];
    }
    r.topk_common[i] = common;
  }
  if (target >= 0) {
    const double nll_a = dist_a ? lse_a - a[target] : kNaN;
    const double nll_b = dist_b ? lse_b - b[target] : kNaN;
    f[kNllRef] = nll_a;
    f[kNllCand] = nll_b;
    f[kDeltaP] = std::exp(-nll_b) - std::exp(-nll_a);
  }
  return r;
}

DiffSums DiffSumsRef(const float* a, const float* b, size_t n) {
  DiffSums s;
  for (size_t i = 0; i < n; ++i) {
    const bool fa = std::isfinite(a[i]), fb = std::isfinite(b[i]);
    if (!fa) ++s.nonfinite_ref;
    if (!fb) ++s.nonfinite_cand;
    if (!fa || !fb) continue;
    const double x = a[i], y = b[i];
    ++s.count;
    s.dot += x * y;
    s.ref_sq += x * x;
    s.cand_sq += y * y;
    s.diff_sq += (y - x) * (y - x);
    s.max_abs = std::max(s.max_abs, std::fabs(y - x));
  }
  return s;
}

DistributionRef DistributionOfRef(const std::vector<float>& values, size_t channels) {
  DistributionRef d;
  d.count = values.size();
  d.channel_max_abs.assign(channels, 0.0);
  d.min = HUGE_VAL;
  d.max = -HUGE_VAL;
  double sum = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const float v = values[i];
    if (std::isnan(v)) ++d.nans;
    if (std::isinf(v)) ++d.infs;
    if (v == 0.0f) ++d.zeros;
    if (!std::isfinite(v)) continue;
    ++d.finite;
    sum += v;
    d.min = std::min(d.min, static_cast<double>(v));
    d.max = std::max(d.max, static_cast<double>(v));
    double& cm = d.channel_max_abs[i % channels];
    cm = std::max(cm, std::fabs(static_cast<double>(v)));
    d.sorted_abs.push_back(std::fabs(static_cast<double>(v)));
  }
  std::sort(d.sorted_abs.begin(), d.sorted_abs.end());
  if (d.finite == 0) return d;
  d.mean = sum / static_cast<double>(d.finite);
  for (float v : values) {
    if (!std::isfinite(v)) continue;
    const double e = v - d.mean;
    d.m2 += e * e;
    d.m3 += e * e * e;
    d.m4 += e * e * e * e;
  }
  return d;
}

double DistributionRef::AbsQuantile(double q) const {
  if (sorted_abs.empty()) return NAN;
  return sorted_abs[NearestRank(q, sorted_abs.size()) - 1];
}

}  // namespace logitparity
