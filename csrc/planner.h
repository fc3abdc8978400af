// plan_packs: windowed first-fit packing of sample lengths into packs of at most `budget` tokens (the data
// planner's hot loop; fineviti/data/planner.py holds the Python reference and the rest of the planner).
//
// Rule (the Python reference `plan_packs_ref` follows it step for step): a buffer holds the next `window`
// pending samples of the stream, in stream order. A pack scans the buffer in order and takes every sample that
// still fits; each sample taken lets the next sample of the stream into the buffer's end, where the same scan
// reaches it, so `window` samples are always pending. Samples skipped stay, in order, for the next pack. The
// oldest pending sample always fits an empty pack (lengths are at most the budget), so no sample waits more than
// `window` packs. Cost O(window + samples placed) per pack.
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
