// build_positions on a GPU. The output length is the sum of rows * cols, so the grid (n * 8 bytes) is
// read to the host once (checked_offsets, in positions.cpp): that one synchronising copy sizes the output
// and lets every value check run for free. The (row, col) fill runs on the device, one thread per token.
#include "positions.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace fineviti {
namespace {

// hw: (n, 2) int32 rows, cols; cu_seqlens: (n + 1,) int32; pos: (total, 2) int32 (written).
__global__ void fill_positions_kernel(const int32_t* __restrict__ hw, const int32_t* __restrict__ cu_seqlens,
                                      int32_t* __restrict__ pos, int64_t n, int64_t total, int64_t merge) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token >= total) return;
  // The image holding `token`: the last i with cu_seqlens[i] <= token.
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu_seqlens[mid] <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  position_of_token(token - cu_seqlens[lo], hw[2 * lo + 1], merge, &pos[2 * token], &pos[2 * token + 1]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> build_positions_cuda(const at::Tensor& grid_hw, int64_t merge) {
  auto [cu_host, total] = checked_offsets(grid_hw, merge);  // the one device -> host read, and every check
  const c10::cuda::CUDAGuard device_guard(grid_hw.device());
  const at::Tensor cu_seqlens = cu_host.to(grid_hw.device());
  const int64_t n = grid_hw.size(0);
  at::Tensor pos = at::empty({total, 2}, grid_hw.options());
  if (total > 0) {
    const at::Tensor hw = grid_hw.contiguous();
    constexpr int threads = 256;
    const int64_t blocks = (total + threads - 1) / threads;
    fill_positions_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        hw.data_ptr<int32_t>(), cu_seqlens.data_ptr<int32_t>(), pos.data_ptr<int32_t>(), n, total, merge);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {cu_seqlens, pos};
}

}  // namespace fineviti

TORCH_LIBRARY_IMPL(fineviti, CUDA, m) { m.impl("build_positions", &fineviti::build_positions_cuda); }
