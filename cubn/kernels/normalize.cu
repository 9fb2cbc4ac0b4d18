// Fused normalize + scale/offset + residual add + activation, one pass:
//   y = act((x - mean[c]) * scale[c] + shift[c] + side)
// over the flat tensor, whatever the layout: element e of an
// (outer, C, inner) tensor has channel (e / inner) % C. Each thread moves VEC
// elements per 16-byte access (VEC == 1: unaligned inputs). The grid is sized
// so that a thread's vectors all have the channels of its first one
// (elementwise.cuh): the coefficients are loaded, and for RAW folded, once
// per thread, and the loop is loads, one FMA per element, the store.
//   RAW == 0: p1 = scale, p2 = shift (folded by cubn_bn_finalize).
//   RAW == 1: p1 = variance, p2 = gamma (nullable), p3 = beta (nullable):
//             inference straight from statistics in this single launch.
// The mean is subtracted before scaling, so a large common offset costs no
// digits.
#include "elementwise.cuh"

template <typename T, int ACT, int VEC, int RAW, int POS, int SIDE, int IDX32>
__global__ void __launch_bounds__(CUBN_ELEMENTWISE_THREADS)
cubn_normalize(const T* __restrict__ x, const T* __restrict__ side, T* __restrict__ y,
               i64 n, int C, i64 inner,
               const typename AccOf<T>::type* __restrict__ mean,
               const typename AccOf<T>::type* __restrict__ p1,
               const typename AccOf<T>::type* __restrict__ p2,
               const typename AccOf<T>::type* __restrict__ p3,
               typename AccOf<T>::type eps, typename AccOf<T>::type alpha) {
  typedef typename AccOf<T>::type A;
  typedef typename IndexOf<IDX32>::type I;
  enum { NC = CoefSets<POS, VEC>::n };
  const bool has_side = SIDE && side != nullptr;
  const I ne = I(n);
  const I nvec = (ne + VEC - 1) / VEC;
  const I stride = I(gridDim.x) * I(blockDim.x);
  I v = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x);
  if (v >= nvec) return;
  int ch[NC];
  channels_from<I, NC>(v * VEC, I(inner), C, ch);
  A m[NC], s[NC], t[NC];
#pragma unroll
  for (int j = 0; j < NC; ++j) {
    const int c = ch[j];
    m[j] = mean[c];
    if (RAW) {
      s[j] = m_rsqrt(p1[c] + eps);
      if (p2 != nullptr) s[j] *= p2[c];
      t[j] = p3 != nullptr ? p3[c] : A(0);
    } else {
      s[j] = p1[c];
      t[j] = p2[c];
    }
  }
  // Full vectors in the loop (not unrolled: the resident warps keep enough
  // loads in flight, and the loop stays small); the partial last one
  // (n % VEC elements) after it, by the one thread whose sequence reaches it.
  auto one = [&](const Vec<T, VEC>& xv, const Vec<T, VEC>& sv) {
    Vec<T, VEC> yv;
    A xa[VEC], sa[VEC];
    to_acc_vec(xv, xa);
    if (has_side) to_acc_vec(sv, sa);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int j = NC == 1 ? 0 : k;
      A z = (xa[k] - m[j]) * s[j] + t[j];
      if (has_side) z += sa[k];
      yv.v[k] = Out<T>::cast(act_fwd<ACT>(z, alpha));
    }
    return yv;
  };
  const I nfull = ne / VEC;
  Vec<T, VEC> xv, sv;
  if (IDX32) {
#pragma unroll 1
    for (; v < nfull; v += stride) {
      const I e0 = v * VEC;
      xv = load_vec<T, VEC>(x + e0);
      if (has_side) sv = load_vec<T, VEC>(side + e0);
      store_vec<T, VEC>(y + e0, one(xv, sv));
    }
  } else if (v < nfull) {
    // 64-bit: pointers stepped by the stride and an int count of
    // iterations, no 64-bit index arithmetic in the loop
    const int iters = int((nfull - 1 - v) / stride) + 1;
    const i64 step = i64(stride) * VEC;
    const T* xp = x + i64(v) * VEC;
    const T* sp = side + i64(v) * VEC;
    T* yp = y + i64(v) * VEC;
#pragma unroll 1
    for (int it = 0; it < iters; ++it) {
      xv = load_vec<T, VEC>(xp);
      if (has_side) sv = load_vec<T, VEC>(sp);
      store_vec<T, VEC>(yp, one(xv, sv));
      xp += step; sp += step; yp += step;
    }
    v += I(iters) * stride;
  }
  if (v == nfull && nfull < nvec) {
    const I e0 = v * VEC;
    load_tail(xv, x, e0, ne);
    if (has_side) load_tail(sv, side, e0, ne);
    store_tail(y, one(xv, sv), e0, ne);
  }
}
