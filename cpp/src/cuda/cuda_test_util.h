// Helpers shared by the CUDA kernel tests: a device copy of a host buffer and
// the skip for machines without a usable GPU (CI compiles the tests only).
#ifndef LOGITPARITY_SRC_CUDA_CUDA_TEST_UTIL_H_
#define LOGITPARITY_SRC_CUDA_CUDA_TEST_UTIL_H_

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstddef>

#include "logitparity/cuda.h"

namespace logitparity {

#define SKIP_WITHOUT_GPU()                                         \
  do {                                                             \
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";  \
  } while (0)

// A device copy of a host buffer (64 bytes of slack), freed on scope exit.
struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(const void* host, size_t bytes) {
    EXPECT_EQ(cudaSuccess, cudaMalloc(&ptr, bytes + 64));
    EXPECT_EQ(cudaSuccess, cudaMemcpy(ptr, host, bytes, cudaMemcpyHostToDevice));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr); }
};

}  // namespace logitparity

#endif  // LOGITPARITY_SRC_CUDA_CUDA_TEST_UTIL_H_
