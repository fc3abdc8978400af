// plan_packs on the CPU: windowed first-fit packing (see planner.h for the rule).
#include "planner.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace fineviti {

namespace {

template <typename T>
std::tuple<at::Tensor, at::Tensor> pack(const T* lengths, int64_t n, int64_t budget, int64_t window) {
  int64_t shortest = std::numeric_limits<int64_t>::max();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t length = lengths[i];
    TORCH_CHECK_VALUE(length >= 1 && length <= budget, "plan_packs: lengths[", i, "] = ", length,
                      " is outside [1, budget = ", budget, "]; every sample must fit one pack");
    shortest = std::min(shortest, length);
  }
  at::Tensor order = at::empty({n}, at::kLong);
  int64_t* out = order.data_ptr<int64_t>();
  std::vector<int64_t> offsets{0};
  offsets.reserve(static_cast<size_t>(n / 8 + 2));
  std::vector<int64_t> buffer;
  buffer.reserve(static_cast<size_t>(std::min(window, n)));
  int64_t next = 0, placed = 0;
  while (static_cast<int64_t>(buffer.size()) < window && next < n) buffer.push_back(next++);
  while (!buffer.empty()) {
    int64_t room = budget;
    size_t kept = 0;
    size_t k = 0;
    // buffer grows while it is scanned: every sample placed lets one more sample of the stream in, so that
    // `window` samples are always pending. Below `shortest` nothing fits: stop scanning.
    for (; k < buffer.size() && room >= shortest; ++k) {
      const int64_t sample = buffer[k];
      const int64_t length = lengths[sample];
      if (length <= room) {
        out[placed++] = sample;
        room -= length;
        if (next < n) buffer.push_back(next++);
      } else {
        buffer[kept++] = sample;
      }
    }
    for (; k < buffer.size(); ++k) buffer[kept++] = buffer[k];
    buffer.resize(kept);
    offsets.push_back(placed);
  }
  at::Tensor pack_offsets = at::empty({static_cast<int64_t>(offsets.size())}, at::kLong);
  std::copy(offsets.begin(), offsets.end(), pack_offsets.data_ptr<int64_t>());
  return {pack_offsets, order};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> plan_packs_cpu(const at::Tensor& lengths, int64_t budget, int64_t window) {
  TORCH_CHECK_VALUE(budget >= 1, "plan_packs: budget must be >= 1, got ", budget);
  TORCH_CHECK_VALUE(window >= 1, "plan_packs: window must be >= 1, got ", window);
  TORCH_CHECK_VALUE(lengths.dim() == 1, "plan_packs: lengths must be 1-D, got shape ", lengths.sizes());
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kLong || lengths.scalar_type() == at::kInt,
                   "plan_packs: lengths must be int32 or int64, got ", lengths.scalar_type());
  const at::Tensor host = lengths.contiguous();
  if (host.scalar_type() == at::kLong) return pack(host.data_ptr<int64_t>(), host.numel(), budget, window);
  return pack(host.data_ptr<int32_t>(), host.numel(), budget, window);
}

}  // namespace fineviti

TORCH_LIBRARY_IMPL(fineviti, CPU, m) { m.impl("plan_packs", &fineviti::plan_packs_cpu); }
