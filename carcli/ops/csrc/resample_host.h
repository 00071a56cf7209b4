// Host-side glue shared by the CPU (resample.cpp) and CUDA (resample_cuda.cu)
// implementations: argument checks, contiguity, geometry and index width.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>

#include "resample_arith.h"

namespace carcli {

struct Problem {
  at::Tensor hr, kernels, offsets_h, offsets_v;  // contiguous
  Geometry geom;
  int64_t batch;
  bool index64;  // some tensor has more than INT_MAX elements
};

inline Problem prepare(
    const at::Tensor& hr,
    const at::Tensor& kernels,
    const at::Tensor& offsets_h,
    const at::Tensor& offsets_v,
    int64_t scale,
    const char* where) {
  TORCH_CHECK(
      hr.dim() == 4 && kernels.dim() == 4,
      where, ": hr and kernels must be 4-D (B x C x H x W, B x k*k x h x w)");
  TORCH_CHECK(
      offsets_h.sizes() == kernels.sizes() && offsets_v.sizes() == kernels.sizes(),
      where, ": kernels ", kernels.sizes(), ", offsets_h ", offsets_h.sizes(),
      " and offsets_v ", offsets_v.sizes(), " must have the same shape");
  TORCH_CHECK(
      hr.scalar_type() == kernels.scalar_type() && hr.scalar_type() == offsets_h.scalar_type() &&
          hr.scalar_type() == offsets_v.scalar_type(),
      where, ": all inputs must have one dtype, got ", hr.scalar_type(), ", ",
      kernels.scalar_type(), ", ", offsets_h.scalar_type(), ", ", offsets_v.scalar_type());
  TORCH_CHECK(at::isFloatingType(hr.scalar_type()), where, ": inputs must be floating point");
  TORCH_CHECK(
      hr.device() == kernels.device() && hr.device() == offsets_h.device() &&
          hr.device() == offsets_v.device(),
      where, ": all inputs must be on one device");
  TORCH_CHECK(scale >= 1, where, ": scale must be a positive integer, got ", scale);
  const int64_t batch = hr.size(0);
  TORCH_CHECK(
      kernels.size(0) == batch, where, ": batch sizes differ: hr ", batch, ", kernels ",
      kernels.size(0));
  const int64_t taps = kernels.size(1);
  int64_t k = 0;
  while ((k + 1) * (k + 1) <= taps) ++k;
  TORCH_CHECK(
      k * k == taps && k % 2 == 1, where, ": kernels must have k*k channels with k odd, got ",
      taps);
  const int64_t H = hr.size(2), W = hr.size(3), h = kernels.size(2), w = kernels.size(3);
  TORCH_CHECK(
      H == h * scale && W == w * scale, where, ": hr is ", H, "x", W, " but kernels are ", h,
      "x", w, ": at scale ", scale, " hr must be ", h * scale, "x", w * scale);
  const int64_t pad = k / 2;
  // Coordinates are ints: 2 * (padded size) must fit.
  TORCH_CHECK(
      2 * (H + 2 * pad) < INT_MAX && 2 * (W + 2 * pad) < INT_MAX && hr.size(1) < INT_MAX,
      where, ": image too large");

  Problem p;
  p.hr = hr.contiguous();
  p.kernels = kernels.contiguous();
  p.offsets_h = offsets_h.contiguous();
  p.offsets_v = offsets_v.contiguous();
  p.batch = batch;
  Geometry& g = p.geom;
  g.channels = static_cast<int>(hr.size(1));
  g.height = static_cast<int>(H);
  g.width = static_cast<int>(W);
  g.lr_height = static_cast<int>(h);
  g.lr_width = static_cast<int>(w);
  g.k = static_cast<int>(k);
  g.scale = static_cast<int>(scale);
  g.pad = static_cast<int>(pad);
  g.padded_height = static_cast<int>(H + 2 * pad);
  g.padded_width = static_cast<int>(W + 2 * pad);
  const int64_t out_numel = batch * hr.size(1) * h * w;
  const int64_t limit = INT_MAX;
  p.index64 = hr.numel() >= limit || kernels.numel() >= limit || out_numel >= limit;
  return p;
}

}  // namespace carcli
