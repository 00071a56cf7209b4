// Launchers of the CUDA kernels in resample_cuda.cu, called by the op bindings
// in resample.cpp (built with -DCARCLI_WITH_CUDA). Kept free of ATen so that
// nvcc only has to parse this small header and resample_arith.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "resample_arith.h"

namespace carcli {

constexpr int kCudaThreads = 256;

// out = resample(img, K, DX, DY) for all B * h * w LR pixels (n_pixels).
// index64: use 64-bit index arithmetic (some tensor has >= 2^31 elements).
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
    cudaStream_t stream);

// gK, gDX, gDY (written) and, if gimg is not null, gimg += dL/dimage
// (accumulation dtype, zero-initialised by the caller, atomics).
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
    cudaStream_t stream);

}  // namespace carcli
