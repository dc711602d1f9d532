#include "logitparity/rows.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace logitparity {

const char* DtypeName(Dtype dtype) {
  switch (dtype) {
    case Dtype::kF32: return "float32";
    case Dtype::kF16: return "float16";
    case Dtype::kBF16: return "bfloat16";
  }
  return "unknown";
}

size_t DtypeSize(Dtype dtype) { return dtype == Dtype::kF32 ? 4 : 2; }

void CheckRows(const RowsView& view, const char* name) {
  if (view.data == nullptr) {
    throw std::invalid_argument(std::string(name) + " has no data (null pointer)");
  }
  if (view.rows == 0 || view.vocab == 0) {
    throw std::invalid_argument(std::string(name) + " is empty: got " +
                                std::to_string(view.rows) + " rows x " +
                                std::to_string(view.vocab) +
                                " vocab; expected at least 1 x 1");
  }
  if (view.row_stride < view.vocab) {
    throw std::invalid_argument(std::string(name) + ": row_stride " +
                                std::to_string(view.row_stride) +
                                " is smaller than vocab " +
                                std::to_string(view.vocab));
  }
}

float F16BitsToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal, exact
    return sign ? -f : f;
  }
  uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf or NaN (payload kept)
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  std::memcpy(&f, &bits, 4);
  return f;
}

float BF16BitsToF32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t F32ToBF16Bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

uint16_t F32ToF16Bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7E00u);
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to inf
  if (a < 6.103515625e-05f) {  // subnormal half: multiple of 2^-24
    const float m = std::nearbyint(std::ldexp(a, 24));  // ties to even
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(m));
  }
  int e;
  const float frac = std::frexp(a, &e);  // a = frac * 2^e, frac in [0.5, 1)
  float m = std::nearbyint(std::ldexp(frac, 11));  // 11 significant bits
  if (m >= 2048.0f) {
    m *= 0.5f;
    ++e;
  }
  if (e + 14 >= 31) return static_cast<uint16_t>(sign | 0x7C00u);
  const uint16_t exp_field = static_cast<uint16_t>(e + 14);
  return static_cast<uint16_t>(sign | (exp_field << 10) |
                               (static_cast<uint16_t>(m) & 0x3FFu));
}

float LoadElement(const RowsView& view, size_t r, size_t i) {
  const size_t off = r * view.row_stride + i;
  switch (view.dtype) {
    case Dtype::kF32: return static_cast<const float*>(view.data)[off];
    case Dtype::kF16: return F16BitsToF32(static_cast<const uint16_t*>(view.data)[off]);
    case Dtype::kBF16: return BF16BitsToF32(static_cast<const uint16_t*>(view.data)[off]);
  }
  return NAN;
}

}  // namespace logitparity
