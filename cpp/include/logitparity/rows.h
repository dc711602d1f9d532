// A read-only view of logit rows as the caller stores them. Plain types only:
// no Highway types cross this header.
#ifndef LOGITPARITY_ROWS_H_
#define LOGITPARITY_ROWS_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace logitparity {

enum class Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

const char* DtypeName(Dtype dtype);
size_t DtypeSize(Dtype dtype);

// rows x vocab elements; row r starts at data + r * row_stride elements and
// its vocab elements are contiguous. row_stride >= vocab (padding allowed).
struct RowsView {
  const void* data = nullptr;
  Dtype dtype = Dtype::kF32;
  size_t rows = 0;
  size_t vocab = 0;
  size_t row_stride = 0;  // in elements
};

// Throws std::invalid_argument naming `name` if the view is empty or
// inconsistent.
void CheckRows(const RowsView& view, const char* name);

// Scalar conversions, exact for every input including inf, NaN and
// subnormals (NaN payloads are kept quiet).
float F16BitsToF32(uint16_t bits);
float BF16BitsToF32(uint16_t bits);
uint16_t F32ToF16Bits(float f);   // round to nearest even
uint16_t F32ToBF16Bits(float f);  // round to nearest even

// Element i of row r as float.
float LoadElement(const RowsView& view, size_t r, size_t i);

}  // namespace logitparity

#endif  // LOGITPARITY_ROWS_H_
