// build_positions: shared argument checks and the token -> (row, col) rule, for the CPU and CUDA files.
//
// Token order (Qwen2-VL's vision tower): images one after another; within an image, merge x merge
// groups in row-major order of groups, and within a group row-major: for group row br, group col bc,
// then i, j in [0, merge): row = br * merge + i, col = bc * merge + j. With merge 1, plain row-major.
#pragma once

#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace fineviti {

#if defined(__CUDACC__)
#define FINEVITI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FINEVITI_HOST_DEVICE inline
#endif

// The (row, col) of token `local` (0-based within its image) of an image `cols` patches wide.
FINEVITI_HOST_DEVICE void position_of_token(int64_t local, int64_t cols, int64_t merge, int32_t* row, int32_t* col) {
  const int64_t group_size = merge * merge;
  const int64_t groups_per_row = cols / merge;
  const int64_t group = local / group_size;
  const int64_t within = local - group * group_size;
  const int64_t group_row = group / groups_per_row;
  const int64_t group_col = group - group_row * groups_per_row;
  *row = static_cast<int32_t>(group_row * merge + within / merge);
  *col = static_cast<int32_t>(group_col * merge + within % merge);
}

// Shape, dtype and merge checks (no reads of tensor values).
inline void check_build_positions_args(const at::Tensor& grid_hw, int64_t merge) {
  TORCH_CHECK_VALUE(merge >= 1, "build_positions: merge must be an integer >= 1, got ", merge);
  TORCH_CHECK_TYPE(grid_hw.scalar_type() == at::kInt, "build_positions: grid_hw must be int32, got ",
                   grid_hw.scalar_type());
  TORCH_CHECK_VALUE(grid_hw.dim() == 2 && grid_hw.size(1) == 2,
                    "build_positions: grid_hw must have shape (n, 2) holding each image's (rows, cols), got shape ",
                    grid_hw.sizes());
}

// Checks every image's grid and writes cu_seqlens (n + 1 entries); returns the total token count.
// `hw` is a contiguous host array of n (rows, cols) pairs.
inline int64_t check_grids_and_offsets(const int32_t* hw, int64_t n, int64_t merge, int32_t* cu_seqlens) {
  int64_t total = 0;
  cu_seqlens[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t rows = hw[2 * i];
    const int64_t cols = hw[2 * i + 1];
    TORCH_CHECK_VALUE(rows > 0 && cols > 0, "build_positions: grid_hw[", i, "] = (", rows, ", ", cols,
                      ") has a non-positive side; expected rows >= 1 and cols >= 1");
    TORCH_CHECK_VALUE(rows % merge == 0 && cols % merge == 0, "build_positions: grid_hw[", i, "] = (", rows, ", ",
                      cols, ") is not divisible by merge = ", merge, "; expected both sides to be multiples of it");
    total += rows * cols;
    TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), "build_positions: the total token count up to ",
                      "grid_hw[", i, "] is ", total, ", which does not fit in int32 cu_seqlens");
    cu_seqlens[i + 1] = static_cast<int32_t>(total);
  }
  return total;
}

}  // namespace fineviti
