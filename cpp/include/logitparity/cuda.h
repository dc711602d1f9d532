// The CUDA kernels of the core: the fused row comparison, log-sum-exp, NLL,
// log-softmax, top-K storage and the activation statistics on rows that live
// in GPU memory, read in place on the caller's stream. Plain types only; the
// kernels are in cpp/src/cuda/. Built when CMake finds a CUDA toolkit; without
// one these functions exist and report that no CUDA is built.
#ifndef LOGITPARITY_CUDA_H_
#define LOGITPARITY_CUDA_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "logitparity/activation_stats.h"
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
//
// device_targets: instead of options.targets (which must then be null), one
// int64 id per row in device memory on the rows' device, read in place by the
// kernel and checked there: an id outside [-1, vocab) throws
// std::invalid_argument naming the first such row and its id.
RowMetricsResult CompareRowsCuda(const RowsView& ref, const RowsView& cand,
                                 const RowMetricsOptions& options, uintptr_t stream,
                                 const int64_t* device_targets = nullptr);

// Threads per block of CompareRowsCuda's kernel (one block per row) for
// `rows` rows on a device of `multiprocessors` multiprocessors: 256 while the
// rows fit in one wave of two such blocks per multiprocessor, else 128 (four
// per multiprocessor: one wave up to 4 x multiprocessors rows, and half as
// many waves beyond). Measured on the H200 (132 multiprocessors; kernel
// times, docs/gpu.md): 128 made 512 x 151936 fp32 2% faster, 2048 x 49152
// 10% and 4096 x 18992 13% (rows far apart, 512 x 151936: 6.5% slower); at
// 264 x 151936 and fewer rows 256 is 20 - 50% faster than 128. The block size sets each row's summation tree, so a row's
// fields can differ in their last bits between calls of different row
// counts (each call is deterministic for its input).
constexpr int CompareRowsBlockThreads(size_t rows, int multiprocessors) {
  return rows > 2 * static_cast<size_t>(multiprocessors > 0 ? multiprocessors : 1) ? 128 : 256;
}

// CompareRowsCuda in two halves, so that the caller's host work overlaps the
// kernel. The constructor checks the input (CompareRowsCuda's errors; nothing
// is queued when it throws) and queues the kernel on `stream`. Finish waits
// for it and writes the caller's host arrays: fields (rows x kNumRowFields,
// row-major), topk_common (rows x options.topk.size()) and, unless null,
// int_fields (the fields from kFirstIntField on as int64, field-major:
// kNumRowFields - kFirstIntField rows of `rows`); for a device
// target out of range it throws TargetOutOfRange for the first such row and
// writes nothing. Finish once; the destructor waits for a kernel that was not
// finished (it writes into the job's buffer). Each job has its own pinned
// buffer (kept in a pool), so jobs may overlap.
class CompareRowsCudaJob {
 public:
  CompareRowsCudaJob(const RowsView& ref, const RowsView& cand, const RowMetricsOptions& options,
                     uintptr_t stream, const int64_t* device_targets = nullptr);
  ~CompareRowsCudaJob();
  CompareRowsCudaJob(const CompareRowsCudaJob&) = delete;
  CompareRowsCudaJob& operator=(const CompareRowsCudaJob&) = delete;
  void Finish(double* fields, int32_t* topk_common, int64_t* int_fields = nullptr);

  struct State;

 private:
  std::unique_ptr<State> state_;
};

// Largest k of TopKCuda (the per-warp lists live in shared memory).
constexpr size_t kMaxTopKCuda = 256;

// The single-row kernels of row_metrics.h (LogSumExp, Nll, TopK, LogSoftmax)
// for device rows, with their semantics; float64 accumulation, exp included.
// Host results (lse, out, values, indices, rows of k) are ready when the call
// returns; targets are host ids in [0, vocab). TopKCuda also gives each row's
// log-sum-exp (lse may be nullptr), one sweep for what a top-K dump stores.
void LogSumExpCuda(const RowsView& logits, double* out, uintptr_t stream);
void NllCuda(const RowsView& logits, const int64_t* targets, double* out, uintptr_t stream);
void TopKCuda(const RowsView& logits, size_t k, float* values, int64_t* indices, double* lse,
              uintptr_t stream);
// out: device memory on the rows' device, rows x vocab float32, contiguous
// (it may alias contiguous float32 logits). Queued on `stream`; the call does
// not wait for it.
void LogSoftmaxCuda(const RowsView& logits, float* out, uintptr_t stream);

// CompareActivations for device views (both on one device), on `stream`:
// the same checks, per-row sums and merge (in row order). Sums agree with the
// CPU's to float64 rounding (another summation order); counts and max_abs
// are exact.
DiffSums CompareActivationsCuda(const RowsView& ref, const RowsView& cand, DiffSums* per_row,
                                uintptr_t stream);

// The figures of every chunk of a device block, row by row (rows x
// ceil(width / kActivationChunk) entries), its |x| histogram (kAbsHistBins
// counts, written) and per-channel max |x| (width floats, written); what
// DistributionAccumulator::AddCuda merges.
void ChunkFiguresCuda(const RowsView& block, ChunkFigures* chunks, uint64_t* hist,
                      float* channel_max, uintptr_t stream);

}  // namespace logitparity

#endif  // LOGITPARITY_CUDA_H_
