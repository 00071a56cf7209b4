// CUDA kernels of carcli::resample and carcli::resample_backward (the op
// bindings are in resample.cpp). One thread per LR pixel: each thread reads
// its pixel's k*k kernel weights and offsets once and applies them to all
// channels (in register chunks of 4), so the dominant traffic, the
// B x k*k x h x w weight and offset tensors, is read exactly once and
// coalesced along LR rows; the image taps are gathers that mostly hit L1/L2.
// The per-pixel arithmetic is in resample_arith.h, shared with the CPU build.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "resample_cuda.h"

namespace carcli {
namespace {

constexpr int kChannelChunk = 4;

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kCudaThreads) resample_forward_kernel(
    const Geometry g,
    const index_t n_pixels,  // B * h * w
    const scalar_t* __restrict__ img,
    const scalar_t* __restrict__ K,
    const scalar_t* __restrict__ DX,
    const scalar_t* __restrict__ DY,
    scalar_t* __restrict__ out) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t n64 = static_cast<int64_t>(blockIdx.x) * kCudaThreads + threadIdx.x;
  if (n64 >= static_cast<int64_t>(n_pixels)) return;
  const index_t n = static_cast<index_t>(n64);
  const index_t w = g.lr_width, h = g.lr_height, C = g.channels;
  const index_t lr_plane = h * w;
  const index_t plane = static_cast<index_t>(g.height) * g.width;
  const index_t taps = static_cast<index_t>(g.k) * g.k;
  const index_t j = n % w;
  const index_t i = (n / w) % h;
  const index_t b = n / lr_plane;
  const index_t pix = b * taps * lr_plane + i * w + j;
  acc_t acc[kChannelChunk];
  for (index_t c0 = 0; c0 < C; c0 += kChannelChunk) {
    const int nc = static_cast<int>(C - c0 < kChannelChunk ? C - c0 : kChannelChunk);
    forward_pixel<scalar_t, acc_t, index_t, kChannelChunk>(
        g, img + (b * C + c0) * plane, K + pix, DX + pix, DY + pix, lr_plane, plane, nc,
        static_cast<int>(i), static_cast<int>(j), acc);
#pragma unroll
    for (int cc = 0; cc < kChannelChunk; ++cc) {
      if (cc < nc) {
        out[((b * C + c0 + cc) * h + i) * w + j] = static_cast<scalar_t>(acc[cc]);
      }
    }
  }
}

struct AtomicAdd {
  __device__ __forceinline__ void operator()(float* ptr, float value) const {
    atomicAdd(ptr, value);
  }
  __device__ __forceinline__ void operator()(double* ptr, double value) const {
    atomicAdd(ptr, value);
  }
};

template <typename scalar_t, typename index_t, bool IMAGE_GRAD>
__global__ void __launch_bounds__(kCudaThreads) resample_backward_kernel(
    const Geometry g,
    const index_t n_pixels,
    const scalar_t* __restrict__ img,
    const scalar_t* __restrict__ K,
    const scalar_t* __restrict__ DX,
    const scalar_t* __restrict__ DY,
    const scalar_t* __restrict__ G,
    scalar_t* __restrict__ gK,
    scalar_t* __restrict__ gDX,
    scalar_t* __restrict__ gDY,
    typename AccType<scalar_t>::type* gimg) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t n64 = static_cast<int64_t>(blockIdx.x) * kCudaThreads + threadIdx.x;
  if (n64 >= static_cast<int64_t>(n_pixels)) return;
  const index_t n = static_cast<index_t>(n64);
  const index_t w = g.lr_width, h = g.lr_height, C = g.channels;
  const index_t lr_plane = h * w;
  const index_t plane = static_cast<index_t>(g.height) * g.width;
  const index_t taps = static_cast<index_t>(g.k) * g.k;
  const index_t j = n % w;
  const index_t i = (n / w) % h;
  const index_t b = n / lr_plane;
  const index_t pix = b * taps * lr_plane + i * w + j;
  backward_pixel<scalar_t, acc_t, index_t, true, IMAGE_GRAD>(
      g, img + b * C * plane, K + pix, DX + pix, DY + pix, G + b * C * lr_plane + i * w + j,
      lr_plane, plane, 0, static_cast<int>(C), static_cast<int>(i), static_cast<int>(j),
      gK + pix, gDX + pix, gDY + pix, IMAGE_GRAD ? gimg + b * C * plane : gimg, AtomicAdd());
}

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>((n + kCudaThreads - 1) / kCudaThreads);
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_resample_forward(
    const Geometry& g,
    int64_t n_pixels,
    bool index64,
    const scalar_t* img,
    const scalar_t* K,
    const scalar_t* DX,
    const scalar_t* DY,
    scalar_t* out,
    cudaStream_t stream) {
  if (n_pixels <= 0) return cudaSuccess;
  const unsigned int blocks = blocks_for(n_pixels);
  if (index64) {
    resample_forward_kernel<scalar_t, int64_t>
        <<<blocks, kCudaThreads, 0, stream>>>(g, n_pixels, img, K, DX, DY, out);
  } else {
    resample_forward_kernel<scalar_t, int32_t><<<blocks, kCudaThreads, 0, stream>>>(
        g, static_cast<int32_t>(n_pixels), img, K, DX, DY, out);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_resample_backward(
    const Geometry& g,
    int64_t n_pixels,
    bool index64,
    const scalar_t* img,
    const scalar_t* K,
    const scalar_t* DX,
    const scalar_t* DY,
    const scalar_t* G,
    scalar_t* gK,
    scalar_t* gDX,
    scalar_t* gDY,
    typename AccType<scalar_t>::type* gimg,
    cudaStream_t stream) {
  if (n_pixels <= 0) return cudaSuccess;
  const unsigned int blocks = blocks_for(n_pixels);
  if (index64) {
    if (gimg != nullptr) {
      resample_backward_kernel<scalar_t, int64_t, true><<<blocks, kCudaThreads, 0, stream>>>(
          g, n_pixels, img, K, DX, DY, G, gK, gDX, gDY, gimg);
    } else {
      resample_backward_kernel<scalar_t, int64_t, false><<<blocks, kCudaThreads, 0, stream>>>(
          g, n_pixels, img, K, DX, DY, G, gK, gDX, gDY, gimg);
    }
  } else {
    const int32_t n = static_cast<int32_t>(n_pixels);
    if (gimg != nullptr) {
      resample_backward_kernel<scalar_t, int32_t, true><<<blocks, kCudaThreads, 0, stream>>>(
          g, n, img, K, DX, DY, G, gK, gDX, gDY, gimg);
    } else {
      resample_backward_kernel<scalar_t, int32_t, false><<<blocks, kCudaThreads, 0, stream>>>(
          g, n, img, K, DX, DY, G, gK, gDX, gDY, gimg);
    }
  }
  return cudaGetLastError();
}

#define CARCLI_INSTANTIATE(T)                                                               \
  template cudaError_t launch_resample_forward<T>(                                          \
      const Geometry&, int64_t, bool, const T*, const T*, const T*, const T*, T*,           \
      cudaStream_t);                                                                        \
  template cudaError_t launch_resample_backward<T>(                                         \
      const Geometry&, int64_t, bool, const T*, const T*, const T*, const T*, const T*, T*, \
      T*, T*, typename AccType<T>::type*, cudaStream_t);

CARCLI_INSTANTIATE(float)
CARCLI_INSTANTIATE(double)
CARCLI_INSTANTIATE(c10::Half)
CARCLI_INSTANTIATE(c10::BFloat16)

#undef CARCLI_INSTANTIATE

}  // namespace carcli
