// build_positions on the CPU: cu_seqlens and the (row, col) of every patch of a packed batch of grids.
#include "positions.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

namespace fineviti {

std::tuple<at::Tensor, at::Tensor> build_positions_cpu(const at::Tensor& grid_hw, int64_t merge) {
  check_build_positions_args(grid_hw, merge);
  const at::Tensor hw = grid_hw.contiguous();
  const int64_t n = hw.size(0);
  at::Tensor cu_seqlens = at::empty({n + 1}, hw.options());
  const int64_t total = check_grids_and_offsets(hw.data_ptr<int32_t>(), n, merge, cu_seqlens.data_ptr<int32_t>());

  at::Tensor pos = at::empty({total, 2}, hw.options());
  const int32_t* hw_data = hw.data_ptr<int32_t>();
  const int32_t* offsets = cu_seqlens.data_ptr<int32_t>();
  int32_t* out = pos.data_ptr<int32_t>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t image = begin; image < end; ++image) {
      const int64_t cols = hw_data[2 * image + 1];
      const int64_t start = offsets[image];
      const int64_t count = offsets[image + 1] - start;
      for (int64_t local = 0; local < count; ++local) {
        position_of_token(local, cols, merge, &out[2 * (start + local)], &out[2 * (start + local) + 1]);
      }
    }
  });
  return {cu_seqlens, pos};
}

}  // namespace fineviti

TORCH_LIBRARY_IMPL(fineviti, CPU, m) { m.impl("build_positions", &fineviti::build_positions_cpu); }
