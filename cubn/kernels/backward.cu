// Batch-norm backward in two passes over memory:
//   1. cubn_bwd_reduce_{cl,cf}: per-channel partial sums
//        S1 = sum(dy'),  S2 = sum(dy' * (x - mean)),
//      where dy' = dy * act'(z) and z = (x - mean) * scale + shift (+ side) is
//      recomputed from x, never stored. Same layouts and work split as the
//      moments kernels; cubn_bwd_finalize (finalize.cu) merges the partials.
//   2. cubn_bwd_apply: dx = scale * dy' - w * (k1 + k2 * (x - mean)), and
//      d side = dy' when asked (w: batch weights, 1 when unweighted).
//      x - mean stays a float subtraction: in 16-bit (half2) arithmetic the
//      mean would be rounded to the data's precision first, an error of up
//      to half a unit of the offset, comparable to the spread of offset data.
// Sums are deterministic: fixed trees, no atomics.
#include "elementwise.cuh"

template <int ACT, typename A>
__device__ __forceinline__ void bwd_accumulate(A dy, A xv, A sidev, A m, A s, A t, A alpha, A& s1, A& s2) {
  const A xm = xv - m;
  A g = dy;
  if (ACT != ACT_NONE) g *= act_grad<ACT>(xm * s + t + sidev, alpha);
  s1 += g;
  s2 += g * xm;
}

// Resident blocks per SM asked of ptxas (__launch_bounds__' second
// argument: a register cap of 64K / (256 * n); 0: none), chosen where the
// variant does not spill on sm_80 and sm_90 (ptxas -v, NVRTC 12).
// cubn_bwd_reduce_cl: float without an activation gets 64 registers and 4
// blocks per SM instead of 80 and 3; the 16-bit types (their vectors widened
// with to_acc_vec) 80 and 3 without an activation, <= 128 with one.
// cubn_bwd_reduce_cf: without a hint ptxas keeps the 16-bit variants with an
// activation at 80 registers and spills in the loop (24-140 bytes on sm_80);
// asking for 2 blocks (<= 128 registers, still 12 loads in flight per
// thread) removes them but for 8-16 bytes with sigmoid, GELU or SiLU on
// sm_90 (both kernels), where 1 block (up to 183 registers) would halve the
// resident warps.
template <typename T, int ACT> struct ReduceClBlocks { enum { n = 0 }; };
template <int ACT> struct ReduceClBlocks<float, ACT> { enum { n = ACT == ACT_NONE ? 4 : 2 }; };
template <int ACT> struct ReduceClBlocks<__half, ACT> { enum { n = ACT == ACT_NONE ? 3 : 2 }; };
template <int ACT> struct ReduceClBlocks<__nv_bfloat16, ACT> : ReduceClBlocks<__half, ACT> {};
template <typename T, int ACT> struct ReduceCfBlocks { enum { n = 0 }; };
template <int ACT> struct ReduceCfBlocks<__half, ACT> { enum { n = ACT == ACT_NONE ? 0 : 2 }; };
template <int ACT> struct ReduceCfBlocks<__nv_bfloat16, ACT> : ReduceCfBlocks<__half, ACT> {};

// Channels last: a (rows, cols) matrix, column j is channel j % C.
// Partials: cols == C: (gridDim.y, cols), one per column; cols > C (folded):
// (gridDim.y, gridDim.x * C), block x's partial of channel c at column
// blockIdx.x * C + c (0 where the block has no column of c).
template <typename T, int ACT, int VEC>
__global__ void __launch_bounds__(CUBN_REDUCE_THREADS, ReduceClBlocks<T, ACT>::n)
cubn_bwd_reduce_cl(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ side,
                   i64 rows, int cols, int C,
                   const typename AccOf<T>::type* __restrict__ mean,
                   const typename AccOf<T>::type* __restrict__ scale,
                   const typename AccOf<T>::type* __restrict__ shift,
                   typename AccOf<T>::type alpha,
                   typename AccOf<T>::type* __restrict__ p_s1,
                   typename AccOf<T>::type* __restrict__ p_s2) {
  typedef typename AccOf<T>::type A;
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int j0 = (blockIdx.x * bx + tx) * VEC;
  const bool active = j0 < cols;
  const bool has_side = ACT != ACT_NONE && side != nullptr;
  A m[VEC], s[VEC], t[VEC], s1[VEC], s2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    s1[k] = A(0); s2[k] = A(0); m[k] = A(0); s[k] = A(0); t[k] = A(0);
    if (active) {
      const int c = (j0 + k) % C;
      m[k] = mean[c];
      if (ACT != ACT_NONE) { s[k] = scale[c]; t[k] = shift[c]; }
    }
  }
  if (active) {
    const i64 step = (i64)gridDim.y * by;
    for (i64 r = (i64)blockIdx.y * by + ty; r < rows; r += step * CUBN_UNROLL) {
      Vec<T, VEC> dv[CUBN_UNROLL], xv[CUBN_UNROLL], sv[CUBN_UNROLL];
#pragma unroll
      for (int u = 0; u < CUBN_UNROLL; ++u) {
        const i64 ru = r + u * step;
        if (ru < rows) {
          dv[u] = load_vec<T, VEC>(dy + ru * cols + j0);
          xv[u] = load_vec<T, VEC>(x + ru * cols + j0);
          if (has_side) sv[u] = load_vec<T, VEC>(side + ru * cols + j0);
        }
      }
#pragma unroll
      for (int u = 0; u < CUBN_UNROLL; ++u) {
        if (r + u * step >= rows) break;
        A da[VEC], xa[VEC], sa[VEC];
        to_acc_vec(dv[u], da);
        to_acc_vec(xv[u], xa);
        if (has_side) to_acc_vec(sv[u], sa);
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          bwd_accumulate<ACT, A>(da[k], xa[k], has_side ? sa[k] : A(0), m[k], s[k], t[k], alpha, s1[k], s2[k]);
      }
    }
  }
  CUBN_DYNAMIC_SHARED(A, sh);
  const int width = bx * VEC;
  A* sh1 = sh;
  A* sh2 = sh + by * width;
  column_sum2<A, VEC>(s1, s2, sh1, sh2, width);
  // Row 0 of sh holds the block's columns jb .. jb + wl. Written by linear
  // thread index, so consecutive threads write consecutive partials.
  const int tid = ty * bx + tx, nthreads = bx * by;
  const int jb = blockIdx.x * width;
  const int wl = cols - jb < width ? cols - jb : width;
  if (cols == C) {
    const i64 base = (i64)blockIdx.y * cols + jb;
    for (int l = tid; l < wl; l += nthreads) {
      p_s1[base + l] = sh1[l];
      p_s2[base + l] = sh2[l];
    }
    return;
  }
  // Folded: channel c's columns here are l = l0(c) + m*C, m < M(c); summed
  // in a fixed tree over m (pairs m, m + s for m % 2s == 0), as moments.cu
  // merges them, so the block writes one partial per channel.
  const int off = jb % C;
  const int mmax = (wl + C - 1) / C;
  for (int s = 1; s < mmax; s <<= 1) {
    for (int t = tid; t < C * mmax; t += nthreads) {
      const int c = t % C, m = t / C;
      const int l0 = (c - off + C) % C;
      const int M = l0 < wl ? (wl - l0 + C - 1) / C : 0;
      if (m % (2 * s) == 0 && m + s < M) {
        const int a = l0 + m * C, b = a + s * C;
        sh1[a] += sh1[b];
        sh2[a] += sh2[b];
      }
    }
    __syncthreads();
  }
  const i64 base = (i64)blockIdx.y * gridDim.x * C + (i64)blockIdx.x * C;
  for (int c = tid; c < C; c += nthreads) {
    const int l0 = (c - off + C) % C;
    const bool has = l0 < wl;
    p_s1[base + c] = has ? sh1[l0] : A(0);
    p_s2[base + c] = has ? sh2[l0] : A(0);
  }
}

// Channels first: block b reduces chunk (b % nsplit) of channel (b / nsplit).
template <typename T, int ACT, int VEC>
__global__ void __launch_bounds__(CUBN_REDUCE_THREADS, ReduceCfBlocks<T, ACT>::n)
cubn_bwd_reduce_cf(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ side,
                   i64 outer, int C, i64 inner, int nsplit, i64 chunk,
                   const typename AccOf<T>::type* __restrict__ mean,
                   const typename AccOf<T>::type* __restrict__ scale,
                   const typename AccOf<T>::type* __restrict__ shift,
                   typename AccOf<T>::type alpha,
                   typename AccOf<T>::type* __restrict__ p_s1,
                   typename AccOf<T>::type* __restrict__ p_s2) {
  typedef typename AccOf<T>::type A;
  const int c = blockIdx.x / nsplit, sp = blockIdx.x % nsplit;
  const bool has_side = ACT != ACT_NONE && side != nullptr;
  const A m = mean[c];
  const A s = ACT != ACT_NONE ? scale[c] : A(0);
  const A t = ACT != ACT_NONE ? shift[c] : A(0);
  const i64 L = outer * inner;
  const i64 begin = (i64)sp * chunk;
  const i64 end = begin + chunk < L ? begin + chunk : L;
  A s1 = A(0), s2 = A(0);
  const i64 stride = (i64)blockDim.x * VEC;
  const i64 so = stride / inner, si = stride - so * inner;
  i64 j = begin + (i64)threadIdx.x * VEC;
  i64 o = j / inner, i = j - o * inner;
  while (j < end) {
    Vec<T, VEC> dv[CUBN_UNROLL], xv[CUBN_UNROLL], sv[CUBN_UNROLL];
    int cnt = 0;
#pragma unroll
    for (int u = 0; u < CUBN_UNROLL; ++u) {
      if (j < end) {
        const i64 off = (o * C + c) * inner + i;
        dv[u] = load_vec<T, VEC>(dy + off);
        xv[u] = load_vec<T, VEC>(x + off);
        if (has_side) sv[u] = load_vec<T, VEC>(side + off);
        cnt = u + 1;
        j += stride; o += so; i += si;
        if (i >= inner) { i -= inner; ++o; }
      }
    }
#pragma unroll
    for (int u = 0; u < CUBN_UNROLL; ++u) {
      if (u >= cnt) break;
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        bwd_accumulate<ACT, A>(to_acc(dv[u].v[k]), to_acc(xv[u].v[k]), has_side ? to_acc(sv[u].v[k]) : A(0),
                               m, s, t, alpha, s1, s2);
    }
  }
  __shared__ A sh[64];
  block_sum2(s1, s2, sh);
  if (threadIdx.x == 0) {
    const i64 idx = (i64)sp * C + c;
    p_s1[idx] = s1;
    p_s2[idx] = s2;
  }
}

// The general walk (the weighted backward): every element's channel and
// weight index followed along the flat index.
template <typename T, int ACT, int VEC>
__device__ __forceinline__ void bwd_apply_walk(const T* __restrict__ dy, const T* __restrict__ x,
                                               const T* __restrict__ side, T* __restrict__ dx,
                                               T* __restrict__ dside, i64 n, int C, i64 inner,
                                               const typename AccOf<T>::type* __restrict__ mean,
                                               const typename AccOf<T>::type* __restrict__ scale,
                                               const typename AccOf<T>::type* __restrict__ shift,
                                               const typename AccOf<T>::type* __restrict__ k1,
                                               const typename AccOf<T>::type* __restrict__ k2,
                                               const typename AccOf<T>::type* __restrict__ w, int wmode, i64 wdiv,
                                               typename AccOf<T>::type alpha) {
  typedef typename AccOf<T>::type A;
  const bool has_side = ACT != ACT_NONE && side != nullptr;
  const bool want_dside = dside != nullptr;
  const i64 nvec = (n + VEC - 1) / VEC;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  int cc = -1;
  A m = A(0), s = A(0), t = A(0), a1 = A(0), a2 = A(0);
  for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const i64 e0 = v * VEC;
    const bool full = e0 + VEC <= n;
    Vec<T, VEC> dv, xv, sv, ov, dsv;
    load_or_tail(dv, dy, e0, n, full);
    load_or_tail(xv, x, e0, n, full);
    if (has_side) load_or_tail(sv, side, e0, n, full);
    FlatPos pos;
    pos.seek(e0, inner, C, wmode == 1 ? wdiv : 1);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (pos.c != cc) {
        cc = pos.c;
        m = mean[cc]; s = scale[cc]; a1 = k1[cc]; a2 = k2[cc];
        if (ACT != ACT_NONE) t = shift[cc];
      }
      const A xm = to_acc(xv.v[k]) - m;
      A g = to_acc(dv.v[k]);
      if (ACT != ACT_NONE) g *= act_grad<ACT>(xm * s + t + (has_side ? to_acc(sv.v[k]) : A(0)), alpha);
      A wt = A(1);
      if (wmode == 1) wt = w[pos.w];
      else if (wmode == 2 && e0 + k < n) wt = w[e0 + k];
      ov.v[k] = Out<T>::cast(s * g - wt * (a1 + a2 * xm));
      dsv.v[k] = ACT == ACT_NONE ? dv.v[k] : Out<T>::cast(g);  // dy' = dy: its own bits, no round trip
      pos.next(inner, C, wmode == 1 ? wdiv : 1);
    }
    store_or_tail(dx, ov, e0, n, full);
    if (want_dside) store_or_tail(dside, dsv, e0, n, full);
  }
}

// dx (and d side) elementwise over the flat tensor. wmode: 0 unweighted,
// 1 w[(outer index) / wdiv], 2 w[e]. POS (elementwise.cuh) is POS_ELEMENT
// for the weighted backward, whose weight index runs with the outer index:
// every element's channel and weight followed along; otherwise the
// coefficients are loaded once per thread and the loop does no index
// arithmetic, as in cubn_normalize (the host never passes weights then).
template <typename T, int ACT, int VEC, int POS, int IDX32>
__global__ void __launch_bounds__(CUBN_ELEMENTWISE_THREADS)
cubn_bwd_apply(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ side,
               T* __restrict__ dx, T* __restrict__ dside, i64 n, int C, i64 inner,
               const typename AccOf<T>::type* __restrict__ mean,
               const typename AccOf<T>::type* __restrict__ scale,
               const typename AccOf<T>::type* __restrict__ shift,
               const typename AccOf<T>::type* __restrict__ k1,
               const typename AccOf<T>::type* __restrict__ k2,
               const typename AccOf<T>::type* __restrict__ w, int wmode, i64 wdiv,
               typename AccOf<T>::type alpha) {
  typedef typename AccOf<T>::type A;
  const bool has_side = ACT != ACT_NONE && side != nullptr;
  const bool want_dside = dside != nullptr;
  if (POS == POS_ELEMENT) {
    bwd_apply_walk<T, ACT, VEC>(dy, x, side, dx, dside, n, C, inner, mean, scale, shift, k1, k2, w, wmode, wdiv,
                                alpha);
    return;
  }
  typedef typename IndexOf<IDX32>::type I;
  enum { NC = CoefSets<POS, VEC>::n };
  const I ne = I(n);
  const I nvec = (ne + VEC - 1) / VEC;
  const I stride = I(gridDim.x) * I(blockDim.x);
  I v = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x);
  if (v >= nvec) return;
  int ch[NC];
  channels_from<I, NC>(v * VEC, I(inner), C, ch);
  A m[NC], s[NC], t[NC], a1[NC], a2[NC];
#pragma unroll
  for (int j = 0; j < NC; ++j) {
    const int c = ch[j];
    m[j] = mean[c]; s[j] = scale[c]; a1[j] = k1[c]; a2[j] = k2[c];
    t[j] = ACT != ACT_NONE ? shift[c] : A(0);
  }
  auto one = [&](const Vec<T, VEC>& dv, const Vec<T, VEC>& xv, const Vec<T, VEC>& sv, Vec<T, VEC>& ov,
                 Vec<T, VEC>& dsv) {
    A da[VEC], xa[VEC], sa[VEC];
    to_acc_vec(dv, da);
    to_acc_vec(xv, xa);
    if (has_side) to_acc_vec(sv, sa);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int j = NC == 1 ? 0 : k;
      const A xm = xa[k] - m[j];
      A g = da[k];
      if (ACT != ACT_NONE) g *= act_grad<ACT>(xm * s[j] + t[j] + (has_side ? sa[k] : A(0)), alpha);
      ov.v[k] = Out<T>::cast(s[j] * g - (a1[j] + a2[j] * xm));
      dsv.v[k] = ACT == ACT_NONE ? dv.v[k] : Out<T>::cast(g);  // dy' = dy: its own bits, no round trip
    }
  };
  const I nfull = ne / VEC;
  Vec<T, VEC> dv, xv, sv, ov, dsv;
  // the loop as in cubn_normalize: full vectors, not unrolled; the partial
  // last vector after it
  if (IDX32) {
#pragma unroll 1
    for (; v < nfull; v += stride) {
      const I e0 = v * VEC;
      dv = load_vec<T, VEC>(dy + e0);
      xv = load_vec<T, VEC>(x + e0);
      if (has_side) sv = load_vec<T, VEC>(side + e0);
      one(dv, xv, sv, ov, dsv);
      store_vec<T, VEC>(dx + e0, ov);
      if (want_dside) store_vec<T, VEC>(dside + e0, dsv);
    }
  } else if (v < nfull) {
    const int iters = int((nfull - 1 - v) / stride) + 1;
    const i64 step = i64(stride) * VEC, e = i64(v) * VEC;
    const T *dp = dy + e, *xp = x + e, *sp = side + e;
    T *op = dx + e, *dsp = dside + e;
#pragma unroll 1
    for (int it = 0; it < iters; ++it) {
      dv = load_vec<T, VEC>(dp);
      xv = load_vec<T, VEC>(xp);
      if (has_side) sv = load_vec<T, VEC>(sp);
      one(dv, xv, sv, ov, dsv);
      store_vec<T, VEC>(op, ov);
      if (want_dside) store_vec<T, VEC>(dsp, dsv);
      dp += step; xp += step; sp += step; op += step; dsp += step;
    }
    v += I(iters) * stride;
  }
  if (v == nfull && nfull < nvec) {
    const I e0 = v * VEC;
    load_tail(dv, dy, e0, ne);
    load_tail(xv, x, e0, ne);
    if (has_side) load_tail(sv, side, e0, ne);
    one(dv, xv, sv, ov, dsv);
    store_tail(dx, ov, e0, ne);
    if (want_dside) store_tail(dside, dsv, e0, ne);
  }
}
