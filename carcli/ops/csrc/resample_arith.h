// Per-pixel arithmetic of the adaptive resampler (method section 2), shared by
// the CUDA kernels (resample_cuda.cu) and the C++ CPU build (resample.cpp).
//
// Everything here is plain C++ usable as __host__ __device__ code: no ATen,
// no allocation. The callers own the loops over LR pixels and the memory.
//
// Semantics (must match carcli/ops/reference.py exactly):
//   px = (j + 0.5) * s + v + s * dX[t, i, j] - 0.5     (padded coordinates)
//   py = (i + 0.5) * s + u + s * dY[t, i, j] - 0.5
//   LR[c, i, j] = sum_t K[t, i, j] * bilinear(xpad[c], py, px)
// with both coordinates clamped to the padded image (grid_sample 'border',
// align_corners=True) and xpad the image reflect-padded by P = k // 2 in the
// periodic mirror (see pad_source). The padded image is never built: each
// padded row/column is mapped back to the source row/column it copies.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CARCLI_HD __host__ __device__ __forceinline__
#define CARCLI_UNROLL _Pragma("unroll")
#else
#define CARCLI_HD inline
#define CARCLI_UNROLL
#endif

namespace carcli {

// Source index (0..n-1) copied into padded index q (0..n+2P-1) along one axis
// of length n, for reflect padding by `pad`: the periodic mirror extension
// (period 2 * (n - 1)) that reference.py's repeated reflection produces, so a
// pad wider than the image is fine. A 1-pixel axis replicates.
CARCLI_HD int pad_source(int q, int n, int pad) {
  if (n <= 1) return 0;
  const int period = 2 * (n - 1);
  int i = (q - pad) % period;
  if (i < 0) i += period;
  return i < n ? i : period - i;
}

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Bilinear support along one axis: padded indices i0 <= i1 = i0 + 1 (or
// i0 == i1 when clamped), weight w1 of i1, and whether the position lies
// strictly inside (0, n - 1), where the sample has a non-zero derivative
// (grid_sample's border clipping has zero gradient at and beyond the border).
template <typename acc_t>
struct AxisSample {
  int i0;
  int i1;
  acc_t w1;
  bool inside;
};

// Position = base2 / 2 + shift, where base2 = 2 * (index * s + tap) + s - 1 is
// an exact integer (twice the zero-offset position) and shift = s * offset.
// Splitting the integer part off keeps the fractional weight accurate to the
// precision of `shift` even far from the origin of a large image.
template <typename acc_t>
CARCLI_HD AxisSample<acc_t> axis_sample(int base2, acc_t shift, int n) {
  AxisSample<acc_t> r;
  const int ip = base2 >> 1;
  const acc_t f = shift + ((base2 & 1) ? acc_t(0.5) : acc_t(0));
  const acc_t pos = acc_t(ip) + f;  // coarse position, only for the range tests
  // !(a > b) also sends NaN to the clamped branch.
  if (!(pos > acc_t(0))) {
    r.i0 = r.i1 = 0;
    r.w1 = acc_t(0);
    r.inside = false;
    return r;
  }
  if (!(pos < acc_t(n - 1))) {
    r.i0 = r.i1 = n - 1;
    r.w1 = acc_t(0);
    r.inside = false;
    return r;
  }
  // floor(f) by truncation: |f| < n + ip here, so it fits an int (and this
  // avoids a libm call on CPUs without SSE4.1 rounding instructions).
  int fl = static_cast<int>(f);
  if (acc_t(fl) > f) --fl;
  int i0 = ip + fl;
  acc_t w1 = f - acc_t(fl);
  // Guard the rounding of `pos` near either border.
  if (i0 < 0 || (i0 == 0 && w1 == acc_t(0))) {
    r.i0 = r.i1 = 0;
    r.w1 = acc_t(0);
    r.inside = false;
    return r;
  }
  if (i0 >= n - 1) {
    r.i0 = r.i1 = n - 1;
    r.w1 = acc_t(0);
    r.inside = false;
    return r;
  }
  r.i0 = i0;
  r.i1 = i0 + 1;
  r.w1 = w1;
  r.inside = true;
  return r;
}

// Sizes of one resampling problem (all batch items).
struct Geometry {
  int channels;  // C
  int height;    // H (HR, unpadded)
  int width;     // W
  int lr_height;  // h = H / s
  int lr_width;   // w = W / s
  int k;          // kernel side, taps = k * k
  int scale;      // s
  int pad;        // P = k / 2
  int padded_height;  // H + 2P
  int padded_width;   // W + 2P
};

// One tap of one LR pixel: the four source pixels (as offsets into a
// channel plane of the unpadded image) and their bilinear weights.
template <typename acc_t, typename index_t>
struct TapSample {
  index_t o00, o01, o10, o11;  // (row0,col0) (row0,col1) (row1,col0) (row1,col1)
  acc_t wx1, wy1;              // weights of col1 and row1
  bool inside_x, inside_y;
};

template <typename acc_t, typename index_t>
CARCLI_HD TapSample<acc_t, index_t> tap_sample(
    const Geometry& g, int i, int j, int u, int v, acc_t dx, acc_t dy) {
  const int s = g.scale;
  const AxisSample<acc_t> ax =
      axis_sample<acc_t>(2 * (j * s + v) + s - 1, acc_t(s) * dx, g.padded_width);
  const AxisSample<acc_t> ay =
      axis_sample<acc_t>(2 * (i * s + u) + s - 1, acc_t(s) * dy, g.padded_height);
  const index_t r0 = static_cast<index_t>(pad_source(ay.i0, g.height, g.pad)) * g.width;
  const index_t r1 = static_cast<index_t>(pad_source(ay.i1, g.height, g.pad)) * g.width;
  const index_t c0 = pad_source(ax.i0, g.width, g.pad);
  const index_t c1 = pad_source(ax.i1, g.width, g.pad);
  TapSample<acc_t, index_t> t;
  t.o00 = r0 + c0;
  t.o01 = r0 + c1;
  t.o10 = r1 + c0;
  t.o11 = r1 + c1;
  t.wx1 = ax.w1;
  t.wy1 = ay.w1;
  t.inside_x = ax.inside;
  t.inside_y = ay.inside;
  return t;
}

// Forward for LR pixel (i, j) and channels [c0, c0 + nc), nc <= CH:
//   acc[cc] = sum_t K[t] * bilinear(image channel c0 + cc)
// img points at channel c0 of this batch item; K/DX/DY at tap 0 of the pixel,
// with consecutive taps tap_stride (= h * w) apart; channel planes are
// `plane` (= H * W) apart. Each tap's weight and offsets are read once for
// all nc channels.
template <typename scalar_t, typename acc_t, typename index_t, int CH>
CARCLI_HD void forward_pixel(
    const Geometry& g,
    const scalar_t* __restrict__ img,
    const scalar_t* __restrict__ K,
    const scalar_t* __restrict__ DX,
    const scalar_t* __restrict__ DY,
    index_t tap_stride,
    index_t plane,
    int nc,
    int i,
    int j,
    acc_t* acc) {
CARCLI_UNROLL
  for (int cc = 0; cc < CH; ++cc) acc[cc] = acc_t(0);
  const int k = g.k;
  for (int u = 0; u < k; ++u) {
    for (int v = 0; v < k; ++v) {
      const index_t t = static_cast<index_t>(u * k + v) * tap_stride;
      const acc_t kw = static_cast<acc_t>(K[t]);
      const TapSample<acc_t, index_t> s = tap_sample<acc_t, index_t>(
          g, i, j, u, v, static_cast<acc_t>(DX[t]), static_cast<acc_t>(DY[t]));
      const acc_t wy0 = acc_t(1) - s.wy1;
      const acc_t wx0 = acc_t(1) - s.wx1;
      const acc_t w00 = kw * wy0 * wx0, w01 = kw * wy0 * s.wx1;
      const acc_t w10 = kw * s.wy1 * wx0, w11 = kw * s.wy1 * s.wx1;
CARCLI_UNROLL
      for (int cc = 0; cc < CH; ++cc) {
        if (cc < nc) {
          const scalar_t* p = img + cc * plane;
          acc[cc] += w00 * static_cast<acc_t>(p[s.o00]) + w01 * static_cast<acc_t>(p[s.o01]) +
              w10 * static_cast<acc_t>(p[s.o10]) + w11 * static_cast<acc_t>(p[s.o11]);
        }
      }
    }
  }
}

// Backward for LR pixel (i, j) over channels [c_begin, c_end).
//  PARAM_GRADS: writes dL/dK, dL/dDX, dL/dDY of all taps of the pixel (gK/gDX/gDY
//    at tap 0, tap_stride apart); needs all channels in the range.
//  IMAGE_GRAD: adds dL/dimage into gimg (accumulation type, channel 0 of this batch
//    item, `plane` apart) with add(ptr, value) (an atomic add on the GPU).
// G points at channel 0 of the incoming gradient for this pixel; its channel
// planes are tap_stride (= h * w) apart.
template <
    typename scalar_t,
    typename acc_t,
    typename index_t,
    bool PARAM_GRADS,
    bool IMAGE_GRAD,
    typename Adder>
CARCLI_HD void backward_pixel(
    const Geometry& g,
    const scalar_t* __restrict__ img,
    const scalar_t* __restrict__ K,
    const scalar_t* __restrict__ DX,
    const scalar_t* __restrict__ DY,
    const scalar_t* __restrict__ G,
    index_t tap_stride,
    index_t plane,
    int c_begin,
    int c_end,
    int i,
    int j,
    scalar_t* __restrict__ gK,
    scalar_t* __restrict__ gDX,
    scalar_t* __restrict__ gDY,
    acc_t* gimg,
    Adder add) {
  const int k = g.k;
  const acc_t s_f = acc_t(g.scale);
  for (int u = 0; u < k; ++u) {
    for (int v = 0; v < k; ++v) {
      const index_t t = static_cast<index_t>(u * k + v) * tap_stride;
      const acc_t kw = static_cast<acc_t>(K[t]);
      const TapSample<acc_t, index_t> s = tap_sample<acc_t, index_t>(
          g, i, j, u, v, static_cast<acc_t>(DX[t]), static_cast<acc_t>(DY[t]));
      const acc_t wy0 = acc_t(1) - s.wy1;
      const acc_t wx0 = acc_t(1) - s.wx1;
      acc_t sum_k = acc_t(0), sum_x = acc_t(0), sum_y = acc_t(0);
      for (int c = c_begin; c < c_end; ++c) {
        const acc_t go = static_cast<acc_t>(G[c * tap_stride]);
        if (PARAM_GRADS) {
          const scalar_t* p = img + c * plane;
          const acc_t v00 = static_cast<acc_t>(p[s.o00]);
          const acc_t v01 = static_cast<acc_t>(p[s.o01]);
          const acc_t v10 = static_cast<acc_t>(p[s.o10]);
          const acc_t v11 = static_cast<acc_t>(p[s.o11]);
          const acc_t top = wx0 * v00 + s.wx1 * v01;
          const acc_t bottom = wx0 * v10 + s.wx1 * v11;
          sum_k += go * (wy0 * top + s.wy1 * bottom);
          sum_x += go * (wy0 * (v01 - v00) + s.wy1 * (v11 - v10));
          sum_y += go * (bottom - top);
        }
        if (IMAGE_GRAD) {
          const acc_t gk = go * kw;
          acc_t* q = gimg + c * plane;
          const acc_t w00 = gk * wy0 * wx0, w01 = gk * wy0 * s.wx1;
          const acc_t w10 = gk * s.wy1 * wx0, w11 = gk * s.wy1 * s.wx1;
          if (w00 != acc_t(0)) add(q + s.o00, w00);
          if (w01 != acc_t(0)) add(q + s.o01, w01);
          if (w10 != acc_t(0)) add(q + s.o10, w10);
          if (w11 != acc_t(0)) add(q + s.o11, w11);
        }
      }
      if (PARAM_GRADS) {
        gK[t] = static_cast<scalar_t>(sum_k);
        gDX[t] = static_cast<scalar_t>(s.inside_x ? kw * s_f * sum_x : acc_t(0));
        gDY[t] = static_cast<scalar_t>(s.inside_y ? kw * s_f * sum_y : acc_t(0));
      }
    }
  }
}

}  // namespace carcli
