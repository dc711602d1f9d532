// The CUDA activation statistics against the CPU kernels (which
// activation_stats_test.cc checks against the float64 references): every
// dtype pair, widths around a warp, the block's step and a chunk (2048),
// row strides, NaN, +-inf and zeros. Counts, extremes, max |diff|, the
// per-channel max and the histogram must be equal; float64 sums and moments
// within 1e-12 relative (another summation order). Every test skips where no
// CUDA device is usable (the CI machine compiles it only).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "logitparity/activation_stats.h"
#include "logitparity/cuda.h"
#include "src/cuda/cuda_test_util.h"
#include "src/test_util.h"

namespace logitparity {
namespace {

// rows x width activations with a row stride of width + pad (the pad holds
// garbage that must not be read), some entries NaN, +-inf or 0.
std::vector<float> Activations(size_t rows, size_t width, size_t pad, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> v(0.5f, 3.0f);
  std::uniform_int_distribution<int> odd(0, 199);
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x(rows * (width + pad));
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < width + pad; ++c) {
      float& e = x[r * (width + pad) + c];
      if (c >= width) {
        e = std::numeric_limits<float>::quiet_NaN();  // pad: never read
        continue;
      }
      const int k = odd(rng);
      e = k == 0 ? std::numeric_limits<float>::quiet_NaN()
                 : k == 1 ? inf : k == 2 ? -inf : k < 6 ? 0.0f : v(rng) * (c % 17 == 0 ? 40.0f : 1.0f);
    }
  }
  return x;
}

// The storage bytes of x in dtype (float32, or float16 / bfloat16 bits).
std::vector<uint8_t> Stored(const std::vector<float>& x, Dtype dtype) {
  std::vector<uint8_t> bytes(x.size() * DtypeSize(dtype));
  for (size_t i = 0; i < x.size(); ++i) {
    if (dtype == Dtype::kF32) {
      std::memcpy(bytes.data() + 4 * i, &x[i], 4);
    } else {
      const uint16_t b = dtype == Dtype::kF16 ? F32ToF16Bits(x[i]) : F32ToBF16Bits(x[i]);
      std::memcpy(bytes.data() + 2 * i, &b, 2);
    }
  }
  return bytes;
}

void ExpectRel(double got, double want, double rtol, const std::string& what, double atol = 0) {
  const bool ok = got == want || std::fabs(got - want) <= rtol * std::fabs(want) + atol;
  EXPECT_TRUE(ok) << what << ": got " << got << " want " << want;
}

const Dtype kDtypes[] = {Dtype::kF32, Dtype::kF16, Dtype::kBF16};
const size_t kWidths[] = {1, 31, 256, 257, 2047, 2048, 2049, 4099};

TEST(ActivationStatsCuda, DiffAgainstCpu) {
  SKIP_WITHOUT_GPU();
  const size_t rows = 5, pad = 3;
  for (size_t width : kWidths) {
    const std::vector<float> xa = Activations(rows, width, pad, width);
    std::vector<float> xb = Activations(rows, width, pad, width + 1);
    for (size_t i = 0; i < xb.size(); ++i) xb[i] = 0.7f * xb[i] + 0.3f * xa[i];
    for (Dtype da : kDtypes) {
      for (Dtype db : kDtypes) {
        const std::vector<uint8_t> ba = Stored(xa, da), bb = Stored(xb, db);
        DeviceBuffer ga(ba.data(), ba.size()), gb(bb.data(), bb.size());
        const RowsView ha{ba.data(), da, rows, width, width + pad};
        const RowsView hb{bb.data(), db, rows, width, width + pad};
        const RowsView va{ga.ptr, da, rows, width, width + pad};
        const RowsView vb{gb.ptr, db, rows, width, width + pad};
        std::vector<DiffSums> want(rows), got(rows);
        const DiffSums wm = CompareActivations(ha, hb, want.data(), 1);
        const DiffSums gm = CompareActivationsCuda(va, vb, got.data(), 0);
        const std::string at = "width " + std::to_string(width) + " " + DtypeName(da) + "/" +
                               DtypeName(db);
        for (size_t r = 0; r <= rows; ++r) {
          const DiffSums& w = r < rows ? want[r] : wm;
          const DiffSums& g = r < rows ? got[r] : gm;
          const std::string row = at + (r < rows ? " row " + std::to_string(r) : " merged");
          ExpectRel(g.dot, w.dot, 1e-12, row + " dot");
          ExpectRel(g.ref_sq, w.ref_sq, 1e-12, row + " ref_sq");
          ExpectRel(g.cand_sq, w.cand_sq, 1e-12, row + " cand_sq");
          ExpectRel(g.diff_sq, w.diff_sq, 1e-12, row + " diff_sq");
          EXPECT_EQ(w.max_abs, g.max_abs) << row;
          EXPECT_EQ(w.count, g.count) << row;
          EXPECT_EQ(w.nonfinite_ref, g.nonfinite_ref) << row;
          EXPECT_EQ(w.nonfinite_cand, g.nonfinite_cand) << row;
        }
      }
    }
  }
}

void ExpectSameDistribution(const DistributionAccumulator& w, const DistributionAccumulator& g,
                            const std::string& at) {
  EXPECT_EQ(w.count(), g.count()) << at;
  EXPECT_EQ(w.finite(), g.finite()) << at;
  EXPECT_EQ(w.zeros(), g.zeros()) << at;
  EXPECT_EQ(w.nans(), g.nans()) << at;
  EXPECT_EQ(w.infs(), g.infs()) << at;
  EXPECT_EQ(w.min(), g.min()) << at;
  EXPECT_EQ(w.max(), g.max()) << at;
  EXPECT_TRUE(w.channel_max_abs() == g.channel_max_abs()) << at << ": per-channel max |x|";
  EXPECT_TRUE(w.abs_histogram() == g.abs_histogram()) << at << ": |x| histogram";
  ExpectRel(g.moments().mean, w.moments().mean, 1e-12, at + " mean");
  ExpectRel(g.moments().m2, w.moments().m2, 1e-12, at + " m2");
  // m3 is a signed sum: relative to the scale m2^1.5 as well.
  ExpectRel(g.moments().m3, w.moments().m3, 1e-12, at + " m3", 1e-12 * std::pow(w.moments().m2, 1.5));
  ExpectRel(g.moments().m4, w.moments().m4, 1e-12, at + " m4");
}

TEST(ActivationStatsCuda, DistributionAgainstCpu) {
  SKIP_WITHOUT_GPU();
  const size_t rows = 6, pad = 5;
  for (size_t width : kWidths) {
    for (Dtype dt : kDtypes) {
      DistributionAccumulator want(width), got(width);
      for (uint64_t block = 0; block < 2; ++block) {  // two blocks: the merge across Add calls
        const std::vector<float> x = Activations(rows, width, pad, 100 * width + block);
        const std::vector<uint8_t> bytes = Stored(x, dt);
        DeviceBuffer gx(bytes.data(), bytes.size());
        want.Add(RowsView{bytes.data(), dt, rows, width, width + pad});
        got.AddCuda(RowsView{gx.ptr, dt, rows, width, width + pad}, 0);
      }
      ExpectSameDistribution(want, got, "width " + std::to_string(width) + " " + DtypeName(dt));
    }
  }
}

TEST(ActivationStatsCuda, AllNonFiniteAndEmptyChunks) {
  SKIP_WITHOUT_GPU();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const size_t width = 2100;
  std::vector<float> x(2 * width, nan);
  for (size_t c = 0; c < width; c += 3) x[c] = inf;  // row 0: NaN and +inf only
  for (size_t c = 0; c < width; ++c) x[width + c] = c < 2048 ? -inf : 1.5f;  // row 1's first chunk
  DeviceBuffer gx(x.data(), x.size() * 4);
  DistributionAccumulator want(width), got(width);
  want.Add(RowsView{x.data(), Dtype::kF32, 2, width, width});
  got.AddCuda(RowsView{gx.ptr, Dtype::kF32, 2, width, width}, 0);
  ExpectSameDistribution(want, got, "non-finite chunks");
  std::vector<DiffSums> w(2), g(2);
  CompareActivations(RowsView{x.data(), Dtype::kF32, 2, width, width},
                     RowsView{x.data(), Dtype::kF32, 2, width, width}, w.data(), 1);
  CompareActivationsCuda(RowsView{gx.ptr, Dtype::kF32, 2, width, width},
                         RowsView{gx.ptr, Dtype::kF32, 2, width, width}, g.data(), 0);
  for (size_t r = 0; r < 2; ++r) {
    EXPECT_EQ(w[r].count, g[r].count);
    EXPECT_EQ(w[r].nonfinite_ref, g[r].nonfinite_ref);
    EXPECT_EQ(w[r].dot, g[r].dot);
    EXPECT_EQ(w[r].diff_sq, g[r].diff_sq);
  }
}

TEST(ActivationStatsCuda, Errors) {
  SKIP_WITHOUT_GPU();
  std::vector<float> host(64, 1.0f);
  DeviceBuffer dev(host.data(), host.size() * 4);
  const RowsView d8{dev.ptr, Dtype::kF32, 8, 8, 8}, d4{dev.ptr, Dtype::kF32, 4, 16, 16};
  std::vector<DiffSums> out(8);
  try {
    CompareActivationsCuda(d8, d4, out.data(), 0);
    ADD_FAILURE() << "shapes (8, 8) and (4, 16) were accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("must have the same shape, got (8, 8) and (4, 16)"),
              std::string::npos)
        << e.what();
  }
  try {
    CompareActivationsCuda(d8, RowsView{host.data(), Dtype::kF32, 8, 8, 8}, out.data(), 0);
    ADD_FAILURE() << "host memory was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("candidate is host memory"), std::string::npos)
        << e.what();
  }
  DistributionAccumulator acc(16);
  try {
    acc.AddCuda(d8, 0);
    ADD_FAILURE() << "a block of 8 channels was added to an accumulator of 16";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("block has 8 channels, the accumulator 16"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace logitparity
