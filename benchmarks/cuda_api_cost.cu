// Host cost of single CUDA runtime calls on this machine (medians of 2000
// calls each, steady_clock): what docs/gpu.md cites for the row kernel's host
// side (why a call queues one launch and no copies). Build and run on a GPU
// machine:
//   nvcc -O2 -arch=sm_90 -o /tmp/cuda_api_cost benchmarks/cuda_api_cost.cu && /tmp/cuda_api_cost
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

__global__ void Empty() {}

template <class F>
double MedianMicros(F f) {
  std::vector<double> t;
  for (int i = 0; i < 2000; ++i) {
    const auto a = std::chrono::steady_clock::now();
    f();
    const auto b = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double, std::micro>(b - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  const size_t kBytes = 98304;  // the results of 512 rows: 22 doubles and 3 overlaps each
  void* dev = nullptr;
  void* host = nullptr;
  cudaStream_t s;
  if (cudaMalloc(&dev, 1 << 20) != cudaSuccess ||
      cudaHostAlloc(&host, 1 << 20, cudaHostAllocMapped) != cudaSuccess ||
      cudaStreamCreate(&s) != cudaSuccess) {
    std::printf("no usable CUDA device\n");
    return 1;
  }
  Empty<<<1, 1, 0, s>>>();
  cudaStreamSynchronize(s);
  cudaPointerAttributes attr;
  int device = 0;
  auto launch = [&] { Empty<<<1, 1, 0, s>>>(); };
  auto copy = [&] { cudaMemcpyAsync(host, dev, kBytes, cudaMemcpyDeviceToHost, s); };
  auto sync = [&] { cudaStreamSynchronize(s); };
  std::printf("cudaPointerGetAttributes            %6.2f us\n",
              MedianMicros([&] { cudaPointerGetAttributes(&attr, dev); }));
  std::printf("cudaGetDevice                       %6.2f us\n",
              MedianMicros([&] { cudaGetDevice(&device); }));
  std::printf("cudaStreamSynchronize, idle         %6.2f us\n", MedianMicros(sync));
  std::printf("launch (not waited for)             %6.2f us\n", MedianMicros(launch));
  sync();
  std::printf("memsetAsync of 8 B (not waited for) %6.2f us\n",
              MedianMicros([&] { cudaMemsetAsync(dev, 0, 8, s); }));
  sync();
  std::printf("launch + sync                       %6.2f us\n", MedianMicros([&] {
                launch();
                sync();
              }));
  std::printf("96 KB copy to pinned + sync         %6.2f us\n", MedianMicros([&] {
                copy();
                sync();
              }));
  std::printf("launch + 96 KB copy + sync          %6.2f us\n", MedianMicros([&] {
                launch();
                copy();
                sync();
              }));
  std::printf("memset + launch + copy + sync       %6.2f us\n", MedianMicros([&] {
                cudaMemsetAsync(dev, 0, 8, s);
                launch();
                copy();
                sync();
              }));
  return 0;
}
