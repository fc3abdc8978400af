// build_positions: the token -> (row, col) rule, shared by the CPU and CUDA files, and the checked offsets.
//
// Token order (Qwen2-VL's vision tower): images one after another; within an image, merge x merge
// groups in row-major order of groups, and within a group row-major: for group row br, group col bc,
// then i, j in [0, merge): row = br * merge + i, col = bc * merge + j. With merge 1, plain row-major.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

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

// Checks grid_hw and merge and returns cu_seqlens (int32, on the host) and the total token count. A grid on
// a GPU is read to the host first: one synchronising copy of n * 8 bytes. Defined in positions.cpp, so that
// every check (and its exception) runs in host-compiled code, for the CUDA implementation too.
std::tuple<at::Tensor, int64_t> checked_offsets(const at::Tensor& grid_hw, int64_t merge);

}  // namespace fineviti
