// A minimal fork-join helper over rows. Each row is computed by exactly one
// thread with a fixed reduction order, so results never depend on the thread
// count or the split.
#ifndef LOGITPARITY_SRC_THREAD_POOL_H_
#define LOGITPARITY_SRC_THREAD_POOL_H_

#include <cstddef>
#include <functional>

namespace logitparity {

// Number of workers for a request: 0 = all cores (hardware_concurrency), and
// never more than `rows`.
size_t ResolveThreads(int threads, size_t rows);

// Calls body(worker, begin, end) on contiguous row ranges. Rows are handed out
// in small blocks from a shared counter so uneven rows balance. The first
// exception thrown by any worker is rethrown on the calling thread.
void ParallelForRows(size_t rows, int threads,
                     const std::function<void(size_t worker, size_t begin,
                                              size_t end)>& body);

}  // namespace logitparity

#endif  // LOGITPARITY_SRC_THREAD_POOL_H_
