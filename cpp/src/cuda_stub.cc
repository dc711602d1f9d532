// The CUDA entry points of a core built without a CUDA toolkit: they exist so
// that callers need no #ifdef, and say that no CUDA kernels were built.
#include <stdexcept>

#include "logitparity/cuda.h"

namespace logitparity {

bool CudaBuilt() { return false; }

int CudaDeviceCount() { return 0; }

namespace {
[[noreturn]] void NotBuilt() {
  throw std::runtime_error(
      "logitparity was built without CUDA kernels (CMake found no CUDA toolkit); "
      "rebuild with nvcc on the PATH, or pass host arrays");
}
}  // namespace

RowMetricsResult CompareRowsCuda(const RowsView&, const RowsView&, const RowMetricsOptions&,
                                 uintptr_t, const int64_t*) {
  NotBuilt();
}
struct CompareRowsCudaJob::State {};
CompareRowsCudaJob::CompareRowsCudaJob(const RowsView&, const RowsView&, const RowMetricsOptions&,
                                       uintptr_t, const int64_t*) {
  NotBuilt();
}
CompareRowsCudaJob::~CompareRowsCudaJob() = default;
void CompareRowsCudaJob::Finish(double*, int32_t*, int64_t*) { NotBuilt(); }
void LogSumExpCuda(const RowsView&, double*, uintptr_t) { NotBuilt(); }
void NllCuda(const RowsView&, const int64_t*, double*, uintptr_t) { NotBuilt(); }
void TopKCuda(const RowsView&, size_t, float*, int64_t*, double*, uintptr_t) { NotBuilt(); }
void LogSoftmaxCuda(const RowsView&, float*, uintptr_t) { NotBuilt(); }
DiffSums CompareActivationsCuda(const RowsView&, const RowsView&, DiffSums*, uintptr_t) {
  NotBuilt();
}
void ChunkFiguresCuda(const RowsView&, ChunkFigures*, uint64_t*, float*, uintptr_t) {
  NotBuilt();
}

}  // namespace logitparity
