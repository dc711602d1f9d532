#include "src/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "hwy/aligned_allocator.h"

namespace logitparity {
namespace {

size_t Cores() { return std::max<unsigned>(1, std::thread::hardware_concurrency()); }

// Workers wait on a condition variable for a new job (a generation number)
// and take row blocks from the job's counter; the caller works too and waits
// until every worker of the job has finished. Before, every call started and
// joined its threads (compare_dumps calls the core once per prompt).
class Pool {
 public:
  void Run(size_t workers, size_t rows, size_t block,
           const std::function<void(size_t, size_t, size_t)>& body) {
    std::lock_guard<std::mutex> serial(run_mu_);  // one job at a time
    {
      std::unique_lock<std::mutex> lock(mu_);
      while (threads_.size() < workers - 1) {
        const size_t id = threads_.size() + 1;
        threads_.emplace_back([this, id] { Loop(id); });
      }
      body_ = &body;
      rows_ = rows;
      block_ = block;
      next_.store(0);
      error_ = nullptr;
      wanted_ = workers - 1;
      pending_ = workers - 1;
      ++generation_;
    }
    cv_work_.notify_all();
    Work(0);
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, [this] { return pending_ == 0; });
    body_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void Work(size_t worker) {
    try {
      for (;;) {
        const size_t begin = next_.fetch_add(block_);
        if (begin >= rows_) break;
        (*body_)(worker, begin, std::min(rows_, begin + block_));
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      next_.store(rows_);
    }
  }

  void Loop(size_t id) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_work_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (id > wanted_) continue;  // not needed for this job
      }
      Work(id);
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) cv_done_.notify_one();
    }
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> threads_;  // never joined: they live as long as the process
  uint64_t generation_ = 0;
  const std::function<void(size_t, size_t, size_t)>* body_ = nullptr;
  size_t rows_ = 0, block_ = 1, wanted_ = 0, pending_ = 0;
  std::atomic<size_t> next_{0};
  std::exception_ptr error_;
};

// Leaked on purpose: workers may still be parked when the process exits, and
// a child of fork() gets a fresh pool (its parent's threads do not exist
// there, and the old pool's mutexes may be held).
Pool* g_pool = nullptr;
std::once_flag g_pool_once;

Pool& GetPool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool(); });
  });
  return *g_pool;
}

}  // namespace

size_t MaxThreads() { return std::max<size_t>(64, 4 * Cores()); }

size_t ResolveThreads(int threads, size_t rows) {
  if (threads < 0 || static_cast<size_t>(threads) > MaxThreads()) {
    throw std::invalid_argument("threads must be in [0, " + std::to_string(MaxThreads()) +
                                "] (0 = all " + std::to_string(Cores()) +
                                " cores; at most 4x the cores or 64), got " +
                                std::to_string(threads));
  }
  size_t n = threads == 0 ? Cores() : static_cast<size_t>(threads);
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
  GetPool().Run(workers, rows, block, body);
}

float* ThreadScratch(size_t floats) {
  thread_local hwy::AlignedFreeUniquePtr<float[]> buf;
  thread_local size_t size = 0;
  if (size < floats) {
    buf = hwy::AllocateAligned<float>(floats);
    if (!buf) throw std::bad_alloc();
    size = floats;
  }
  return buf.get();
}

}  // namespace logitparity
