// rope_2d (2D rotary position embedding, Qwen2-VL vision RoPE): argument checks and the angle rule shared by
// rope.cpp (CPU) and rope.cu (CUDA). fineviti/ops/rope.py holds the definition (rope_2d_ref) and the autograd.
//
// Token t, head h, pair (j, j + head_dim/2), j < head_dim/2: angle = p * theta^(-f / (head_dim/4)) with
// f = j mod head_dim/4 and p = row for j < head_dim/4, col above; out = x*cos + rotate_half(x)*sin. The angle is
// formed in double and reduced to [-pi, pi] before a float sin/cos, so large positions lose no accuracy.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace fineviti {

#if defined(__CUDACC__)
#define FINEVITI_ROPE_HD __host__ __device__ __forceinline__
#else
#define FINEVITI_ROPE_HD inline
#endif

// Angle of pair j (j < 2 * quarter) for a token at (row, col), reduced to [-pi, pi].
FINEVITI_ROPE_HD float rope_reduced_angle(int64_t row, int64_t col, int64_t j, int64_t quarter, double log2_theta) {
  const int64_t f = j < quarter ? j : j - quarter;
  const double inv_freq = exp2(-(static_cast<double>(f) / static_cast<double>(quarter)) * log2_theta);
  const double angle = static_cast<double>(j < quarter ? row : col) * inv_freq;
  const double turns = floor(angle * 0.15915494309189535 + 0.5);
  return static_cast<float>(angle - turns * 6.283185307179586);
}

// Shape, dtype and device checks (no reads of tensor values).
inline void check_rope_tensor(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": ", name, " must have shape (total, heads, head_dim), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(2) % 4 == 0, op, ": head_dim of ", name,
                    " must be divisible by 4 (row and column halves of cos/sin pairs), got head_dim=", x.size(2));
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_rope_pos(const char* op, const at::Tensor& pos, const at::Tensor& x) {
  TORCH_CHECK_TYPE(pos.scalar_type() == at::kInt || pos.scalar_type() == at::kLong, op,
                   ": pos must be int32 or int64 (row, col) positions, got ", pos.scalar_type());
  TORCH_CHECK_VALUE(pos.dim() == 2 && pos.size(1) == 2, op,
                    ": pos must have shape (total, 2) holding (row, col), got shape ", pos.sizes());
  TORCH_CHECK_VALUE(pos.size(0) == x.size(0), op, ": pos has ", pos.size(0), " rows but the input has ", x.size(0),
                    " tokens; expected one (row, col) per token");
  TORCH_CHECK_VALUE(pos.device() == x.device(), op, ": pos is on ", pos.device(), " but the input is on ", x.device());
}

inline void check_rope_pair(const char* op, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK_VALUE(q.sizes() == k.sizes() && q.scalar_type() == k.scalar_type() && q.device() == k.device(), op,
                    ": q and k must have the same shape, dtype and device, got q ", q.sizes(), " ", q.scalar_type(),
                    " ", q.device(), " and k ", k.sizes(), " ", k.scalar_type(), " ", k.device());
}

// Value check: every position non-negative (and below 2^31). Reads pos on the host (a copy for CUDA tensors).
inline void check_rope_positions(const at::Tensor& pos) {
  if (pos.numel() == 0) return;
  const at::Tensor host = pos.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = host.data_ptr<int64_t>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] <= INT32_MAX, "rope_2d: positions must be non-negative integers below 2**31, ",
                      "got pos[", i / 2, ", ", i % 2, "]=", p[i], " (", i % 2 == 0 ? "row" : "col", " of token ",
                      i / 2, ")");
  }
}

// A view with a unit last stride (a copy only when the input has none).
inline at::Tensor unit_last_stride(const at::Tensor& x) { return x.stride(2) == 1 ? x : x.contiguous(); }

}  // namespace fineviti
