#include "src/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace logitparity {

size_t ResolveThreads(int threads, size_t rows) {
  if (threads < 0) {
    throw std::invalid_argument("threads must be >= 0 (0 = all cores), got " +
                                std::to_string(threads));
  }
  size_t n = threads == 0 ? std::thread::hardware_concurrency() : static_cast<size_t>(threads);
  n = std::max<size_t>(1, n);
  return std::min(n, std::max<size_t>(1, rows));
}

void ParallelForRows(size_t rows, int threads,
                     const std::function<void(size_t, size_t, size_t)>& body) {
  const size_t workers = ResolveThreads(threads, rows);
  if (workers == 1) {
    body(0, 0, rows);
    return;
  }
  // Blocks of a few rows: large enough to amortise the counter, small enough
  // to balance the tail.
  const size_t block = std::max<size_t>(1, std::min<size_t>(16, rows / (workers * 8)));
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&](size_t worker) {
    try {
      for (;;) {
        const size_t begin = next.fetch_add(block);
        if (begin >= rows) break;
        body(worker, begin, std::min(rows, begin + block));
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(rows);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (size_t w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace logitparity
