// rope_2d on the CPU: one pass over x per token block; each token's cos/sin (head_dim/2 of them) are computed once
// and applied to every head of every input (q and k in one call). In place when the output is the input.
#include "rope.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace fineviti {
namespace {

struct RopeIo {
  const at::Tensor in;  // (total, heads, head_dim), unit last stride
  at::Tensor out;       // same shape, unit last stride; may be `in`
};

template <typename scalar_t>
struct RopePointers {
  const scalar_t* in;
  scalar_t* out;
  int64_t stride_in_t, stride_in_h, stride_out_t, stride_out_h;
};

template <typename scalar_t, typename pos_t>
void rope_2d_cpu_kernel(const std::vector<RopeIo>& io, const pos_t* pos, int64_t stride_pos_t, int64_t stride_pos_c,
                        double theta, bool inverse) {
  std::vector<RopePointers<scalar_t>> tensors;
  for (const RopeIo& t : io) {
    tensors.push_back({t.in.data_ptr<scalar_t>(), t.out.data_ptr<scalar_t>(), t.in.stride(0), t.in.stride(1),
                       t.out.stride(0), t.out.stride(1)});
  }
  const int64_t total = io[0].in.size(0), heads = io[0].in.size(1), head_dim = io[0].in.size(2);
  const int64_t half = head_dim / 2, quarter = head_dim / 4;
  const double log2_theta = std::log2(theta);
  const float sign = inverse ? -1.0f : 1.0f;
  // About 32k elements of work per task, at least one token.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, heads * head_dim * int64_t(io.size())));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> cos_buf(half), sin_buf(half);
    const float* cs = cos_buf.data();
    const float* sn = sin_buf.data();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = pos[t * stride_pos_t], col = pos[t * stride_pos_t + stride_pos_c];
      for (int64_t j = 0; j < half; ++j) {
        const float angle = rope_reduced_angle(row, col, j, quarter, log2_theta);
        cos_buf[j] = std::cos(angle);
        sin_buf[j] = sign * std::sin(angle);
      }
      for (const RopePointers<scalar_t>& tensor : tensors) {
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* x = tensor.in + t * tensor.stride_in_t + h * tensor.stride_in_h;
          scalar_t* y = tensor.out + t * tensor.stride_out_t + h * tensor.stride_out_h;
          // x and y may be the same row (in place): both halves are read before either is written.
          for (int64_t j = 0; j < half; ++j) {
            const float x1 = static_cast<float>(x[j]);
            const float x2 = static_cast<float>(x[j + half]);
            y[j] = static_cast<scalar_t>(x1 * cs[j] - x2 * sn[j]);
            y[j + half] = static_cast<scalar_t>(x2 * cs[j] + x1 * sn[j]);
          }
        }
      }
    }
  });
}

void rope_2d_cpu_apply(const std::vector<RopeIo>& io, const at::Tensor& pos, double theta, bool inverse) {
  if (io[0].in.numel() == 0) return;
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    if (pos.scalar_type() == at::kInt) {
      rope_2d_cpu_kernel<scalar_t>(io, pos.data_ptr<int32_t>(), pos.stride(0), pos.stride(1), theta, inverse);
    } else {
      rope_2d_cpu_kernel<scalar_t>(io, pos.data_ptr<int64_t>(), pos.stride(0), pos.stride(1), theta, inverse);
    }
  };
  switch (io[0].in.scalar_type()) {  // the dtypes check_rope_tensor allows
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: run(at::BFloat16{}); break;
  }
}

void check_cpu(const char* op, const at::Tensor& x, const at::Tensor& pos, bool check_pos) {
  check_rope_tensor(op, "x", x);
  check_rope_pos(op, pos, x);
  if (check_pos) check_rope_positions(pos);
}

}  // namespace

at::Tensor rope_2d_cpu(const at::Tensor& x, const at::Tensor& pos, double theta, bool inverse, bool check_pos) {
  check_cpu("rope_2d", x, pos, check_pos);
  const at::Tensor in = unit_last_stride(x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  rope_2d_cpu_apply({{in, out}}, pos, theta, inverse);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope_2d_qk_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                  double theta, bool inverse, bool check_pos) {
  check_rope_tensor("rope_2d_qk", "q", q);
  check_rope_tensor("rope_2d_qk", "k", k);
  check_rope_pair("rope_2d_qk", q, k);
  check_rope_pos("rope_2d_qk", pos, q);
  if (check_pos) check_rope_positions(pos);
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  rope_2d_cpu_apply({{unit_last_stride(q), q_out}, {unit_last_stride(k), k_out}}, pos, theta, inverse);
  return {q_out, k_out};
}

void rope_2d_inplace_cpu(const at::Tensor& x, const at::Tensor& pos, double theta, bool inverse, bool check_pos) {
  check_cpu("rope_2d_", x, pos, check_pos);
  const at::Tensor work = unit_last_stride(x);
  rope_2d_cpu_apply({{work, work}}, pos, theta, inverse);
  if (!work.is_same(x)) x.copy_(work);
}

}  // namespace fineviti

TORCH_LIBRARY_IMPL(fineviti, CPU, m) {
  m.impl("rope_2d", &fineviti::rope_2d_cpu);
  m.impl("rope_2d_qk", &fineviti::rope_2d_qk_cpu);
  m.impl("rope_2d_", &fineviti::rope_2d_inplace_cpu);
}
