// rope_2d on a GPU. A block takes `tokens_per_block` tokens: its threads first compute those tokens' cos/sin
// (head_dim/2 each, angle in double reduced to [-pi, pi], then sincosf) into shared memory, then rotate every head of
// q (and k) with VEC-wide loads of the two halves (16 bytes when alignment allows). Each element is read and
// written once; q and k share one launch and one set of cos/sin. In place when the output is the input.
#include "rope.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <tuple>

namespace fineviti {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTensors = 2;

template <typename scalar_t>
struct RopeCudaTensors {
  const scalar_t* in[kMaxTensors];
  scalar_t* out[kMaxTensors];
  int64_t stride_in_t[kMaxTensors], stride_in_h[kMaxTensors], stride_out_t[kMaxTensors], stride_out_h[kMaxTensors];
  int count;
};

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// cos_sin: dynamic shared memory, 2 * tokens_per_block * half floats (cos then sin).
// kernel-report: rope_2d_cuda_kernel dynamic shared memory up to 16384 bytes (launch_typed caps it there)
template <typename scalar_t, typename pos_t, int VEC>
__global__ void __launch_bounds__(kThreads) rope_2d_cuda_kernel(RopeCudaTensors<scalar_t> tensors,
                                                                const pos_t* __restrict__ pos, int64_t stride_pos_t,
                                                                int64_t stride_pos_c, int64_t total, int64_t heads,
                                                                int64_t half, int64_t tokens_per_block,
                                                                double log2_theta, float sign) {
  extern __shared__ float cos_sin[];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  const int64_t tokens = min(tokens_per_block, total - first);
  const int64_t quarter = half / 2;
  float* cos_s = cos_sin;
  float* sin_s = cos_sin + tokens_per_block * half;
  for (int64_t i = threadIdx.x; i < tokens * half; i += blockDim.x) {
    const int64_t t = first + i / half, j = i % half;
    const float angle = rope_reduced_angle(pos[t * stride_pos_t], pos[t * stride_pos_t + stride_pos_c], j, quarter,
                                           log2_theta);
    float s, c;
    sincosf(angle, &s, &c);
    cos_s[i] = c;
    sin_s[i] = sign * s;
  }
  __syncthreads();

  // 32-bit index arithmetic inside the block (the host caps tokens * heads * half well below 2^31).
  const int packs = static_cast<int>(half / VEC);
  const int heads32 = static_cast<int>(heads);
  const int items = static_cast<int>(tokens) * heads32 * packs;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int p = item % packs;
    const int h = (item / packs) % heads32;
    const int t = item / (packs * heads32);
    const int64_t token = first + t;
    const float* c = cos_s + t * half + p * VEC;
    const float* s = sin_s + t * half + p * VEC;
    Pack<scalar_t, VEC> x1[kMaxTensors], x2[kMaxTensors];
#pragma unroll
    for (int n = 0; n < kMaxTensors; ++n) {  // every load before any store: in and out may be the same memory
      if (n < tensors.count) {
        const scalar_t* x = tensors.in[n] + token * tensors.stride_in_t[n] + h * tensors.stride_in_h[n] + p * VEC;
        x1[n] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(x);
        x2[n] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(x + half);
      }
    }
#pragma unroll
    for (int n = 0; n < kMaxTensors; ++n) {
      if (n < tensors.count) {
        Pack<scalar_t, VEC> y1, y2;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float a = static_cast<float>(x1[n].v[e]), b = static_cast<float>(x2[n].v[e]);
          y1.v[e] = static_cast<scalar_t>(a * c[e] - b * s[e]);
          y2.v[e] = static_cast<scalar_t>(b * c[e] + a * s[e]);
        }
        scalar_t* y = tensors.out[n] + token * tensors.stride_out_t[n] + h * tensors.stride_out_h[n] + p * VEC;
        *reinterpret_cast<Pack<scalar_t, VEC>*>(y) = y1;
        *reinterpret_cast<Pack<scalar_t, VEC>*>(y + half) = y2;
      }
    }
  }
}

// The widest vector (at most 16 bytes) that every pointer, stride and the half-row offset allow.
template <typename scalar_t>
int pick_vec(const RopeCudaTensors<scalar_t>& tensors, int64_t half) {
  for (int vec = 16 / static_cast<int>(sizeof(scalar_t)); vec > 1; vec /= 2) {
    bool ok = half % vec == 0;
    const uintptr_t bytes = static_cast<uintptr_t>(vec) * sizeof(scalar_t);
    for (int n = 0; n < tensors.count; ++n) {
      ok = ok && reinterpret_cast<uintptr_t>(tensors.in[n]) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(tensors.out[n]) % bytes == 0 && tensors.stride_in_t[n] % vec == 0 &&
           tensors.stride_in_h[n] % vec == 0 && tensors.stride_out_t[n] % vec == 0 &&
           tensors.stride_out_h[n] % vec == 0;
    }
    if (ok) return vec;
  }
  return 1;
}

template <typename scalar_t, typename pos_t>
void launch_typed(const RopeCudaTensors<scalar_t>& tensors, const at::Tensor& pos, int64_t total, int64_t heads,
                  int64_t half, double theta, bool inverse) {
  const int vec = pick_vec(tensors, half);
  // About eight items (one VEC pack of each half of every tensor) per thread, at least one token per block.
  const int64_t per_token = heads * (half / vec);
  // Capped so that cos/sin take at most 16 KiB of shared memory.
  const int64_t tokens_per_block =
      std::max<int64_t>(1, std::min<int64_t>(8 * kThreads / std::max<int64_t>(1, per_token), 2048 / half));
  const int64_t blocks = (total + tokens_per_block - 1) / tokens_per_block;
  const size_t shared = 2 * tokens_per_block * half * sizeof(float);
  TORCH_CHECK(shared <= 48 * 1024, "rope_2d: head_dim ", 2 * half, " needs ", shared,
              " bytes of shared memory per block, more than 48 KiB");
  TORCH_CHECK(tokens_per_block * heads * half < (int64_t(1) << 31), "rope_2d: ", heads,
              " heads of head_dim ", 2 * half, " exceed the 32-bit in-block indexing");
  TORCH_CHECK(blocks < (int64_t(1) << 31), "rope_2d: ", total, " tokens need ", blocks,
              " blocks, more than a CUDA grid's 2**31 - 1");
  const pos_t* pos_data = pos.data_ptr<pos_t>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const double log2_theta = std::log2(theta);
  const float sign = inverse ? -1.0f : 1.0f;
#define FINEVITI_ROPE_LAUNCH(VEC_)                                                                               \
  rope_2d_cuda_kernel<scalar_t, pos_t, VEC_><<<blocks, kThreads, shared, stream>>>(                               \
      tensors, pos_data, pos.stride(0), pos.stride(1), total, heads, half, tokens_per_block, log2_theta, sign)
  switch (vec) {
    case 8: FINEVITI_ROPE_LAUNCH(8); break;
    case 4: FINEVITI_ROPE_LAUNCH(4); break;
    case 2: FINEVITI_ROPE_LAUNCH(2); break;
    default: FINEVITI_ROPE_LAUNCH(1); break;
  }
#undef FINEVITI_ROPE_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ins and outs: (total, heads, head_dim) with unit last strides, same shape and dtype; outs[i] may be ins[i].
void rope_2d_cuda_apply(std::initializer_list<at::Tensor> ins, std::initializer_list<at::Tensor> outs,
                        const at::Tensor& pos, double theta, bool inverse) {
  const at::Tensor& first = *ins.begin();
  const int64_t total = first.size(0), heads = first.size(1), half = first.size(2) / 2;
  if (first.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(first.device());
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    RopeCudaTensors<scalar_t> tensors{};
    tensors.count = 0;
    auto out_it = outs.begin();
    for (const at::Tensor& in : ins) {
      const at::Tensor& out = *out_it++;
      const int n = tensors.count++;
      tensors.in[n] = in.data_ptr<scalar_t>();
      tensors.out[n] = out.data_ptr<scalar_t>();
      tensors.stride_in_t[n] = in.stride(0);
      tensors.stride_in_h[n] = in.stride(1);
      tensors.stride_out_t[n] = out.stride(0);
      tensors.stride_out_h[n] = out.stride(1);
    }
    if (pos.scalar_type() == at::kInt) {
      launch_typed<scalar_t, int32_t>(tensors, pos, total, heads, half, theta, inverse);
    } else {
      launch_typed<scalar_t, int64_t>(tensors, pos, total, heads, half, theta, inverse);
    }
  };
  switch (first.scalar_type()) {  // the dtypes check_rope_tensor allows
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: run(at::BFloat16{}); break;
  }
}

void check_cuda_args(const char* op, const at::Tensor& x, const at::Tensor& pos, bool check_pos) {
  check_rope_tensor(op, "x", x);
  check_rope_pos(op, pos, x);
  // Opt-in (a device-to-host copy). fineviti/ops/rope.py checks CUDA positions itself and passes false: on the H100
  // machine (torch 2.11) an error thrown inside this extension's CUDA ops crashed the process instead of raising.
  if (check_pos) check_rope_positions(pos);
}

}  // namespace

at::Tensor rope_2d_cuda(const at::Tensor& x, const at::Tensor& pos, double theta, bool inverse, bool check_pos) {
  check_cuda_args("rope_2d", x, pos, check_pos);
  at::Tensor out = at::empty(x.sizes(), x.options());
  rope_2d_cuda_apply({unit_last_stride(x)}, {out}, pos, theta, inverse);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope_2d_qk_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                   double theta, bool inverse, bool check_pos) {
  check_rope_tensor("rope_2d_qk", "q", q);
  check_rope_tensor("rope_2d_qk", "k", k);
  check_rope_pair("rope_2d_qk", q, k);
  check_rope_pos("rope_2d_qk", pos, q);
  if (check_pos) check_rope_positions(pos);
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  rope_2d_cuda_apply({unit_last_stride(q), unit_last_stride(k)}, {q_out, k_out}, pos, theta, inverse);
  return {q_out, k_out};
}

void rope_2d_inplace_cuda(const at::Tensor& x, const at::Tensor& pos, double theta, bool inverse, bool check_pos) {
  check_cuda_args("rope_2d_", x, pos, check_pos);
  const at::Tensor work = unit_last_stride(x);
  rope_2d_cuda_apply({work}, {work}, pos, theta, inverse);
  if (!work.is_same(x)) x.copy_(work);
}

}  // namespace fineviti

TORCH_LIBRARY_IMPL(fineviti, CUDA, m) {
  m.impl("rope_2d", &fineviti::rope_2d_cuda);
  m.impl("rope_2d_qk", &fineviti::rope_2d_qk_cuda);
  m.impl("rope_2d_", &fineviti::rope_2d_inplace_cuda);
}
