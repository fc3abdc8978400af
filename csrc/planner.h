// plan_packs: windowed first-fit packing of sample lengths into packs of at most `budget` tokens (the data
// planner's hot loop; fineviti/data/planner.py holds the Python reference and the rest of the planner).
//
// Rule (the Python reference `plan_packs_ref` follows it step for step): a buffer holds up to `window` samples,
// refilled in stream order. Each pack scans the buffer in order and takes every sample that still fits; the
// samples it skips stay in the buffer, in order, for the next pack. The oldest sample always fits an empty pack
// (lengths are at most the budget), so no sample waits more than `window` packs. Cost O(n * window) at worst.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace fineviti {

// lengths: int32 or int64 (n,) on the CPU, each in [1, budget]. Returns (pack_offsets int64 (n_packs + 1,)
// starting at 0, order int64 (n,)): pack j holds the samples order[pack_offsets[j] : pack_offsets[j + 1]],
// given as indices into `lengths`.
std::tuple<at::Tensor, at::Tensor> plan_packs_cpu(const at::Tensor& lengths, int64_t budget, int64_t window);

}  // namespace fineviti
