// The CUDA kernels of the core: the fused row comparison on rows that live in
// GPU memory, read in place on the caller's stream. Plain types only; the
// kernels are in cpp/src/cuda/. Built when CMake finds a CUDA toolkit; without
// one these functions exist and report that no CUDA is built.
#ifndef LOGITPARITY_CUDA_H_
#define LOGITPARITY_CUDA_H_

#include <cstdint>

#include "logitparity/row_metrics.h"
#include "logitparity/rows.h"

namespace logitparity {

// True when the core was compiled with its CUDA kernels.
bool CudaBuilt();

// CUDA devices usable now: 0 without CUDA kernels, a driver or a GPU.
int CudaDeviceCount();

// CompareRows for views whose data are device pointers (cudaMalloc'd or
// managed memory of one device). Same checks, fields and semantics as the CPU
// kernel; options.targets is a host array. Work is queued on `stream` (a
// cudaStream_t as an integer: 0 the legacy default stream, 2 the per-thread
// one) and the call returns when the small host results are ready. Results
// are deterministic (a fixed reduction order per row) but not bitwise equal
// to the CPU kernel's: both agree with CompareRowRef to the tolerances of
// docs/metrics.md. Throws std::invalid_argument for bad input and
// std::runtime_error for CUDA errors or a build without CUDA.
RowMetricsResult CompareRowsCuda(const RowsView& ref, const RowsView& cand,
                                 const RowMetricsOptions& options, uintptr_t stream);

}  // namespace logitparity

#endif  // LOGITPARITY_CUDA_H_
