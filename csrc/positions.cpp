// build_positions on the CPU: cu_seqlens and the (row, col) of every patch of a packed batch of grids.
#include "positions.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

namespace fineviti {

std::tuple<at::Tensor, int64_t> checked_offsets(const at::Tensor& grid_hw, int64_t merge) {
  TORCH_CHECK_VALUE(merge >= 1, "build_positions: merge must be an integer >= 1, got ", merge);
  TORCH_CHECK_TYPE(grid_hw.scalar_type() == at::kInt, "build_positions: grid_hw must be int32, got ",
                   grid_hw.scalar_type());
  TORCH_CHECK_VALUE(grid_hw.dim() == 2 && grid_hw.size(1) == 2,
                    "build_positions: grid_hw must have shape (n, 2) holding each image's (rows, cols), got shape ",
                    grid_hw.sizes());
  const at::Tensor hw = grid_hw.to(at::kCPU).contiguous();
  const int32_t* data = hw.data_ptr<int32_t>();
  const int64_t n = hw.size(0);
  at::Tensor cu_seqlens = at::empty({n + 1}, hw.options());
  int32_t* offsets = cu_seqlens.data_ptr<int32_t>();
  int64_t total = 0;
  offsets[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t rows = data[2 * i];
    const int64_t cols = data[2 * i + 1];
    TORCH_CHECK_VALUE(rows > 0 && cols > 0, "build_positions: grid_hw[", i, "] = (", rows, ", ", cols,
                      ") has a non-positive side; expected rows >= 1 and cols >= 1");
    TORCH_CHECK_VALUE(rows % merge == 0 && cols % merge == 0, "build_positions: grid_hw[", i, "] = (", rows, ", ",
                      cols, ") is not divisible by merge = ", merge, "; expected both sides to be multiples of it");
    total += rows * cols;
    TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), "build_positions: the total token count up to ",
                      "grid_hw[", i, "] is ", total, ", which does not fit in int32 cu_seqlens");
    offsets[i + 1] = static_cast<int32_t>(total);
  }
  return {cu_seqlens, total};
}

std::tuple<at::Tensor, at::Tensor> build_positions_cpu(const at::Tensor& grid_hw, int64_t merge) {
  auto [cu_seqlens, total] = checked_offsets(grid_hw, merge);
  const at::Tensor hw = grid_hw.contiguous();
  const int64_t n = hw.size(0);
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
