// Fused normalize + scale/offset + residual add + activation, one pass:
//   y = act((x - mean[c]) * scale[c] + shift[c] + side)
// over the flat tensor, whatever the layout: element e of an
// (outer, C, inner) tensor has channel (e / inner) % C, tracked
// incrementally so the hot loop does no division. Each thread moves VEC
// elements per 16-byte access (VEC == 1: unaligned inputs).
//   RAW == 0: p1 = scale, p2 = shift (folded by cubn_bn_finalize).
//   RAW == 1: p1 = variance, p2 = gamma (nullable), p3 = beta (nullable):
//             inference straight from statistics in this single launch.
// The mean is subtracted before scaling, so a large common offset costs no
// digits.
#include "common.cuh"

template <typename T, int ACT, int VEC, int RAW>
__global__ void __launch_bounds__(CUBN_ELEMENTWISE_THREADS)
cubn_normalize(const T* __restrict__ x, const T* __restrict__ side, T* __restrict__ y,
               i64 n, int C, i64 inner,
               const typename AccOf<T>::type* __restrict__ mean,
               const typename AccOf<T>::type* __restrict__ p1,
               const typename AccOf<T>::type* __restrict__ p2,
               const typename AccOf<T>::type* __restrict__ p3,
               typename AccOf<T>::type eps, typename AccOf<T>::type alpha) {
  typedef typename AccOf<T>::type A;
  const bool has_side = side != nullptr;
  const i64 nvec = (n + VEC - 1) / VEC;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  int cc = -1;  // channel whose coefficients are in registers
  A m = A(0), s = A(0), t = A(0);
  for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const i64 e0 = v * VEC;
    const bool full = e0 + VEC <= n;
    Vec<T, VEC> xv, sv, yv;
    load_or_tail(xv, x, e0, n, full);
    if (has_side) load_or_tail(sv, side, e0, n, full);
    FlatPos pos;
    pos.seek(e0, inner, C, 1);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (pos.c != cc) {
        cc = pos.c;
        m = mean[cc];
        if (RAW) {
          s = m_rsqrt(p1[cc] + eps);
          if (p2 != nullptr) s *= p2[cc];
          t = p3 != nullptr ? p3[cc] : A(0);
        } else {
          s = p1[cc];
          t = p2[cc];
        }
      }
      A z = (to_acc(xv.v[k]) - m) * s + t;
      if (has_side) z += to_acc(sv.v[k]);
      yv.v[k] = Out<T>::cast(act_fwd<ACT>(z, alpha));
      pos.next(inner, C, 1);
    }
    store_or_tail(y, yv, e0, n, full);
  }
}
