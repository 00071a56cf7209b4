// carcli::resample and carcli::resample_backward: operator schemas, the CPU
// implementation of the shared per-pixel arithmetic (resample_arith.h) and,
// when built with -DCARCLI_WITH_CUDA, the CUDA bindings around the kernels in
// resample_cuda.cu. Autograd and the fake (meta) implementation are
// registered from Python (carcli/ops/native.py) once this library is loaded.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <tuple>

#include "resample_host.h"

#ifdef CARCLI_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "resample_cuda.h"
#endif

namespace carcli {
namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Outputs of the backward: gK, gDX, gDY like their inputs; gimg in the
// accumulation dtype, zeroed (only if image_grad, else a 0-element tensor).
struct BackwardBuffers {
  at::Tensor grad, gK, gDX, gDY, gimg;
};

BackwardBuffers backward_buffers(const at::Tensor& grad, const Problem& p, bool image_grad) {
  const Geometry& g = p.geom;
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == p.batch && grad.size(1) == g.channels &&
          grad.size(2) == g.lr_height && grad.size(3) == g.lr_width,
      "carcli::resample_backward: grad has shape ", grad.sizes(), ", expected [", p.batch,
      ", ", g.channels, ", ", g.lr_height, ", ", g.lr_width, "]");
  TORCH_CHECK(
      grad.device() == p.hr.device(), "carcli::resample_backward: grad is on another device");
  BackwardBuffers out;
  out.grad = grad.to(p.hr.scalar_type()).contiguous();
  out.gK = at::empty_like(p.kernels);
  out.gDX = at::empty_like(p.offsets_h);
  out.gDY = at::empty_like(p.offsets_v);
  const at::ScalarType acc = p.hr.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  out.gimg = image_grad ? at::zeros(p.hr.sizes(), p.hr.options().dtype(acc))
                        : at::empty({0}, p.hr.options());
  if (p.kernels.numel() == 0 || g.channels == 0) {
    out.gK.zero_();
    out.gDX.zero_();
    out.gDY.zero_();
  }
  return out;
}

// Rows per parallel task such that a task holds at least ~64K tap samples:
// tiny problems (gradcheck, tests) then run inline instead of paying for a
// thread-pool round trip on every call.
int64_t grain_rows(int64_t samples_per_row) {
  constexpr int64_t kMinSamplesPerTask = 1 << 16;
  return std::max<int64_t>(1, kMinSamplesPerTask / std::max<int64_t>(1, samples_per_row));
}

Grads finish_backward(BackwardBuffers& buf, const Problem& p, bool image_grad) {
  if (image_grad && buf.gimg.scalar_type() != p.hr.scalar_type()) {
    buf.gimg = buf.gimg.to(p.hr.scalar_type());
  }
  return {buf.gimg, buf.gK, buf.gDX, buf.gDY};
}

// ---------------------------------------------------------------- CPU --

at::Tensor resample_cpu(
    const at::Tensor& hr,
    const at::Tensor& kernels,
    const at::Tensor& offsets_h,
    const at::Tensor& offsets_v,
    int64_t scale) {
  const Problem p = prepare(hr, kernels, offsets_h, offsets_v, scale, "carcli::resample");
  const Geometry g = p.geom;
  const int64_t h = g.lr_height, w = g.lr_width, C = g.channels;
  at::Tensor out = at::empty({p.batch, C, h, w}, p.hr.options());
  if (out.numel() == 0) return out;
  const int64_t plane = static_cast<int64_t>(g.height) * g.width;
  const int64_t lr_plane = h * w;
  const int64_t taps = static_cast<int64_t>(g.k) * g.k;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.hr.scalar_type(), "carcli_resample_cpu", [&] {
        using acc_t = typename AccType<scalar_t>::type;
        constexpr int CH = 4;
        const scalar_t* img = p.hr.const_data_ptr<scalar_t>();
        const scalar_t* K = p.kernels.const_data_ptr<scalar_t>();
        const scalar_t* DX = p.offsets_h.const_data_ptr<scalar_t>();
        const scalar_t* DY = p.offsets_v.const_data_ptr<scalar_t>();
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        // Tasks of whole LR rows; a row costs w * k*k * C bilinear samples.
        at::parallel_for(0, p.batch * h, grain_rows(w * taps * C), [&](int64_t begin, int64_t end) {
          acc_t acc[CH];
          for (int64_t row = begin; row < end; ++row) {
            const int64_t b = row / h, i = row % h;
            for (int64_t j = 0; j < w; ++j) {
              const int64_t pix = (b * taps) * lr_plane + i * w + j;
              for (int64_t c0 = 0; c0 < C; c0 += CH) {
                const int nc = static_cast<int>(std::min<int64_t>(CH, C - c0));
                forward_pixel<scalar_t, acc_t, int64_t, CH>(
                    g, img + (b * C + c0) * plane, K + pix, DX + pix, DY + pix, lr_plane,
                    plane, nc, static_cast<int>(i), static_cast<int>(j), acc);
                for (int cc = 0; cc < nc; ++cc) {
                  o[((b * C + c0 + cc) * h + i) * w + j] = static_cast<scalar_t>(acc[cc]);
                }
              }
            }
          }
        });
      });
  return out;
}

struct PlainAdd {
  template <typename T>
  void operator()(T* ptr, T value) const {
    *ptr += value;
  }
};

// Returns (grad_hr, grad_kernels, grad_offsets_h, grad_offsets_v); grad_hr is
// a 0-element tensor unless image_grad.
Grads resample_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& hr,
    const at::Tensor& kernels,
    const at::Tensor& offsets_h,
    const at::Tensor& offsets_v,
    int64_t scale,
    bool image_grad) {
  const Problem p =
      prepare(hr, kernels, offsets_h, offsets_v, scale, "carcli::resample_backward");
  BackwardBuffers buf = backward_buffers(grad, p, image_grad);
  const Geometry g = p.geom;
  const int64_t h = g.lr_height, w = g.lr_width, C = g.channels;
  if (p.kernels.numel() == 0 || C == 0) return finish_backward(buf, p, image_grad);
  const int64_t plane = static_cast<int64_t>(g.height) * g.width;
  const int64_t lr_plane = h * w;
  const int64_t taps = static_cast<int64_t>(g.k) * g.k;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.hr.scalar_type(), "carcli_resample_backward_cpu", [&] {
        using acc_t = typename AccType<scalar_t>::type;
        const scalar_t* img = p.hr.const_data_ptr<scalar_t>();
        const scalar_t* K = p.kernels.const_data_ptr<scalar_t>();
        const scalar_t* DX = p.offsets_h.const_data_ptr<scalar_t>();
        const scalar_t* DY = p.offsets_v.const_data_ptr<scalar_t>();
        const scalar_t* G = buf.grad.const_data_ptr<scalar_t>();
        scalar_t* gk = buf.gK.mutable_data_ptr<scalar_t>();
        scalar_t* gdx = buf.gDX.mutable_data_ptr<scalar_t>();
        scalar_t* gdy = buf.gDY.mutable_data_ptr<scalar_t>();
        // Kernel and offset gradients: each LR pixel owns its taps.
        at::parallel_for(0, p.batch * h, grain_rows(w * taps * C), [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const int64_t b = row / h, i = row % h;
            for (int64_t j = 0; j < w; ++j) {
              const int64_t pix = (b * taps) * lr_plane + i * w + j;
              backward_pixel<scalar_t, acc_t, int64_t, true, false>(
                  g, img + b * C * plane, K + pix, DX + pix, DY + pix,
                  G + (b * C) * lr_plane + i * w + j, lr_plane, plane, 0,
                  static_cast<int>(C), static_cast<int>(i), static_cast<int>(j), gk + pix,
                  gdx + pix, gdy + pix, static_cast<acc_t*>(nullptr), PlainAdd());
            }
          }
        });
        if (!image_grad) return;
        // Image gradient: a scatter, so one task per (batch, channel) plane
        // keeps the writes of different threads apart without atomics.
        acc_t* gi = buf.gimg.mutable_data_ptr<acc_t>();
        at::parallel_for(0, p.batch * C, grain_rows(h * w * taps), [&](int64_t begin, int64_t end) {
          for (int64_t bc = begin; bc < end; ++bc) {
            const int64_t b = bc / C, c = bc % C;
            for (int64_t i = 0; i < h; ++i) {
              for (int64_t j = 0; j < w; ++j) {
                const int64_t pix = (b * taps) * lr_plane + i * w + j;
                backward_pixel<scalar_t, acc_t, int64_t, false, true>(
                    g, img + b * C * plane, K + pix, DX + pix, DY + pix,
                    G + (b * C) * lr_plane + i * w + j, lr_plane, plane, static_cast<int>(c),
                    static_cast<int>(c + 1), static_cast<int>(i), static_cast<int>(j),
                    static_cast<scalar_t*>(nullptr), static_cast<scalar_t*>(nullptr),
                    static_cast<scalar_t*>(nullptr), gi + b * C * plane, PlainAdd());
              }
            }
          }
        });
      });
  return finish_backward(buf, p, image_grad);
}

// --------------------------------------------------------------- CUDA --

#ifdef CARCLI_WITH_CUDA

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_blocks(int64_t n_pixels, const char* what) {
  TORCH_CHECK(
      (n_pixels + kCudaThreads - 1) / kCudaThreads <= INT_MAX, what, ": too many LR pixels (",
      n_pixels, ")");
}

at::Tensor resample_cuda(
    const at::Tensor& hr,
    const at::Tensor& kernels,
    const at::Tensor& offsets_h,
    const at::Tensor& offsets_v,
    int64_t scale) {
  const char* what = "carcli::resample";
  const Problem p = prepare(hr, kernels, offsets_h, offsets_v, scale, what);
  const c10::cuda::CUDAGuard guard(p.hr.device());
  const Geometry g = p.geom;
  at::Tensor out = at::empty({p.batch, g.channels, g.lr_height, g.lr_width}, p.hr.options());
  if (out.numel() == 0) return out;
  const int64_t n_pixels = p.batch * g.lr_height * g.lr_width;
  check_blocks(n_pixels, what);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.hr.scalar_type(), "carcli_resample_cuda", [&] {
    check_launch(
        launch_resample_forward<scalar_t>(
            g, n_pixels, p.index64, p.hr.const_data_ptr<scalar_t>(),
            p.kernels.const_data_ptr<scalar_t>(), p.offsets_h.const_data_ptr<scalar_t>(),
            p.offsets_v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), stream),
        what);
  });
  return out;
}

Grads resample_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& hr,
    const at::Tensor& kernels,
    const at::Tensor& offsets_h,
    const at::Tensor& offsets_v,
    int64_t scale,
    bool image_grad) {
  const char* what = "carcli::resample_backward";
  const Problem p = prepare(hr, kernels, offsets_h, offsets_v, scale, what);
  const c10::cuda::CUDAGuard guard(p.hr.device());
  BackwardBuffers buf = backward_buffers(grad, p, image_grad);
  const Geometry g = p.geom;
  if (p.kernels.numel() == 0 || g.channels == 0) return finish_backward(buf, p, image_grad);
  const int64_t n_pixels = p.batch * g.lr_height * g.lr_width;
  check_blocks(n_pixels, what);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.hr.scalar_type(), "carcli_resample_backward_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    check_launch(
        launch_resample_backward<scalar_t>(
            g, n_pixels, p.index64, p.hr.const_data_ptr<scalar_t>(),
            p.kernels.const_data_ptr<scalar_t>(), p.offsets_h.const_data_ptr<scalar_t>(),
            p.offsets_v.const_data_ptr<scalar_t>(), buf.grad.const_data_ptr<scalar_t>(),
            buf.gK.mutable_data_ptr<scalar_t>(), buf.gDX.mutable_data_ptr<scalar_t>(),
            buf.gDY.mutable_data_ptr<scalar_t>(),
            image_grad ? buf.gimg.mutable_data_ptr<acc_t>() : nullptr, stream),
        what);
  });
  return finish_backward(buf, p, image_grad);
}

#endif  // CARCLI_WITH_CUDA

}  // namespace
}  // namespace carcli

TORCH_LIBRARY(carcli, m) {
  m.set_python_module("carcli.ops.native");
  m.def(
      "resample(Tensor hr, Tensor kernels, Tensor offsets_h, Tensor offsets_v, int scale) "
      "-> Tensor");
  m.def(
      "resample_backward(Tensor grad, Tensor hr, Tensor kernels, Tensor offsets_h, "
      "Tensor offsets_v, int scale, bool image_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(carcli, CPU, m) {
  m.impl("resample", &carcli::resample_cpu);
  m.impl("resample_backward", &carcli::resample_backward_cpu);
}

#ifdef CARCLI_WITH_CUDA
TORCH_LIBRARY_IMPL(carcli, CUDA, m) {
  m.impl("resample", &carcli::resample_cuda);
  m.impl("resample_backward", &carcli::resample_backward_cuda);
}
#endif
