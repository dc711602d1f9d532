// A persistent fork-join pool over rows. Each row is computed by exactly one
// thread with a fixed reduction order, so results never depend on the thread
// count or the split.
#ifndef LOGITPARITY_SRC_THREAD_POOL_H_
#define LOGITPARITY_SRC_THREAD_POOL_H_

#include <cstddef>
#include <functional>

namespace logitparity {

// Largest accepted thread request: 4x the cores, at least 64.
size_t MaxThreads();

// Number of workers for a request: 0 = all cores (hardware_concurrency), and
// never more than `rows`. Throws std::invalid_argument outside
// [0, MaxThreads()].
size_t ResolveThreads(int threads, size_t rows);

// Calls body(worker, begin, end) on contiguous row ranges. Rows are handed out
// in small blocks from a shared counter so uneven rows balance. The calling
// thread takes part; the other workers are threads of one pool started at the
// first parallel call and kept for the module's lifetime (grown when a call
// asks for more), so a call costs a wake-up, not thread creation. Calls from
// several threads at once run one after the other. The first exception
// thrown by any worker is rethrown on the calling thread.
void ParallelForRows(size_t rows, int threads,
                     const std::function<void(size_t worker, size_t begin,
                                              size_t end)>& body);

// Scratch owned by the calling thread (a pool worker or the caller), aligned
// for every SIMD target and kept between calls: at least `floats` floats.
float* ThreadScratch(size_t floats);

}  // namespace logitparity

#endif  // LOGITPARITY_SRC_THREAD_POOL_H_
