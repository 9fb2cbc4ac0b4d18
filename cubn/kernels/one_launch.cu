// Training forward in one launch, for tensors whose every channel fits in
// the registers of one block: the block reads its channels' data once, keeps
// it in registers, reduces the statistics (two passes over the registers:
// the sum of x - p about a pivot p, the channel's first finite element, then
// the squared deviations from the mean), finalizes them (finalize.cuh:
// moving update, renorm, adjustment -- the same code as cubn_bn_finalize)
// and writes y = act((x - mean) * scale + shift + side) from the same
// registers. One read of x instead of two, and one launch instead of three:
// no block waits on another, so there is no grid-wide synchronization and
// nothing the emulator cannot run. NaN and Inf are not filtered: they reach
// their channel's sums, so its statistics and outputs are NaN (or the mean
// is +-Inf) as on the NumPy backend.
//   CL == 0 (channels first, inner > 1): block b owns channel b; thread t
//           holds vectors t, t + blockDim.x, ... of the channel's
//           L = outer * inner elements (VEC > 1 needs inner % VEC == 0).
//   CL == 1 (channels last, inner == 1): x is (rows, C); the block owns the
//           columns [blockIdx.x * blockDim.x * VEC, ...) and every row;
//           thread (tx, ty) holds rows ty, ty + blockDim.y, ... of its VEC
//           columns (VEC > 1 needs C % VEC == 0). blockDim.y is a power of 2.
// ITEMS: vectors each thread keeps in registers (the per-thread register
// cache; registry.one_launch_items lists the built ones, one_launch.decide
// takes the smallest that fits). The host launches this only when
// L <= ITEMS * VEC * threads; otherwise the three-launch path runs.
#include "finalize.cuh"

// Channels first: the flat offset of the vector a thread holds as item k
// (vectors t, t + blockDim.x, ... of channel c's L = outer * inner elements),
// or -1 past the end of the channel.
template <int VEC>
__device__ __forceinline__ i64 cf_item_offset(int k, i64 L, i64 inner, int C, int c) {
  const i64 j = ((i64)k * blockDim.x + threadIdx.x) * VEC;
  if (j >= L) return -1;
  const i64 o = j / inner, i = j - o * inner;
  return (o * C + c) * inner + i;
}

// The pivot of a channel's shifted sums: its first element, or 0 where that
// is NaN or infinite (then the non-finite value reaches the sums, and from
// them the channel's statistics, as on the NumPy backend).
template <typename A>
__device__ __forceinline__ A finite_or_zero(A v) {
  return v - v == A(0) ? v : A(0);
}

// From the shifted sum s = sum(x - p) of n elements: the mean p + s / n
// rounded to A, and what that rounding left out (r = mean_exact - mean, up
// to a rounding of s / n). Deviations are then taken as (x - mean) - r:
// x - mean is exact for x near the mean, so a large offset costs neither
// the variance nor y any digits, and a channel of equal values gives
// deviations of exactly 0 (y = beta).
template <typename A>
__device__ __forceinline__ void mean_and_rest(A p, A s, A n, A& mean, A& rest) {
  const A dev = s / n;
  mean = p + dev;
  rest = dev - (mean - p);
}

// Column sums for 2-D blocks, one value per column: v (VEC columns per
// thread) is summed over ty in a fixed tree ([blockDim.y][width] in part,
// blockDim.y a power of two); column j's total ends in part[j]. Every thread
// of the block calls it; it ends with a barrier.
template <typename A, int VEC>
__device__ __forceinline__ void column_sum1(const A* v, A* part, int width) {
  const int tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
  for (int e = 0; e < VEC; ++e) part[ty * width + tx * VEC + e] = v[e];
  __syncthreads();
  for (int h = blockDim.y >> 1; h > 0; h >>= 1) {
    if (ty < h)
#pragma unroll
      for (int e = 0; e < VEC; ++e) part[ty * width + tx * VEC + e] += part[(ty + h) * width + tx * VEC + e];
    __syncthreads();
  }
}

// The second launch bound (one resident block per SM suffices) lets ptxas
// give the cache the registers it needs rather than spill to fit two.
template <typename T, int ACT, int VEC, int CL, int ITEMS>
__global__ void __launch_bounds__(CUBN_ONE_LAUNCH_THREADS, 1)
cubn_bn_train_one_launch(const T* __restrict__ x, const T* __restrict__ side, T* __restrict__ y,
                         i64 outer, int C, i64 inner, typename AccOf<T>::type alpha,
                         CUBN_FINALIZE_PARAMS(typename AccOf<T>::type)) {
  typedef typename AccOf<T>::type A;
  const bool has_side = side != nullptr;
  Vec<T, VEC> q[ITEMS];
  CUBN_DYNAMIC_SHARED(A, sh);

  if (CL == 0) {
    // sh[0..63]: block_sum2's scratch; sh[64..68]: pivot, mean, rest, scale, shift.
    i64 at[ITEMS];  // flat element offset of each held vector, -1: none
    const int c = blockIdx.x;
    const i64 L = outer * inner;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      at[k] = cf_item_offset<VEC>(k, L, inner, C, c);
      if (at[k] >= 0) q[k] = load_vec<T, VEC>(x + at[k]);
    }
    // The channel's first element is thread 0's first item.
    if (threadIdx.x == 0) sh[64] = at[0] >= 0 ? finite_or_zero(to_acc(q[0].v[0])) : A(0);
    __syncthreads();
    const A p = sh[64];
    // Pass 1: the shifted sum; pass 2: squared deviations from the mean (registers only).
    A s = A(0), unused = A(0);
#pragma unroll
    for (int k = 0; k < ITEMS; ++k)
      if (at[k] >= 0)
#pragma unroll
        for (int e = 0; e < VEC; ++e) s += to_acc(q[k].v[e]) - p;
    block_sum2(s, unused, sh);
    if (threadIdx.x == 0) {
      A mean, rest;
      mean_and_rest<A>(p, s, A(L), mean, rest);
      sh[65] = mean;
      sh[66] = rest;
    }
    __syncthreads();
    const A mean = sh[65], rest = sh[66];
    A m2 = A(0);
#pragma unroll
    for (int k = 0; k < ITEMS; ++k)
      if (at[k] >= 0)
#pragma unroll
        for (int e = 0; e < VEC; ++e) { const A d = (to_acc(q[k].v[e]) - mean) - rest; m2 += d * d; }
    __syncthreads();  // sh[0..63] is reused by the second reduction
    unused = A(0);
    block_sum2(m2, unused, sh);
    if (threadIdx.x == 0) {
      // m2 is a sum of squares: >= 0, or NaN, which must stay NaN (no clamp)
      A scale, shift;
      finalize_channel<A>(c, A(L), mean, m2 / A(L), scale, shift, CUBN_FINALIZE_ARGS);
      sh[67] = scale;
      sh[68] = shift - rest * scale;  // y = (x - mean) * scale + this
    }
    __syncthreads();
    const A scale = sh[67], shift = sh[68];
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      if (at[k] < 0) continue;
      Vec<T, VEC> sv;
      if (has_side) sv = load_vec<T, VEC>(side + at[k]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {  // y overwrites x in the cache
        A z = (to_acc(q[k].v[e]) - mean) * scale + shift;
        if (has_side) z += to_acc(sv.v[e]);
        q[k].v[e] = Out<T>::cast(act_fwd<ACT>(z, alpha));
      }
      store_vec<T, VEC>(y + at[k], q[k]);
    }
  } else {
    // Channels last: rows = outer; shared memory holds one value per
    // (ty, column) for the tree over ty, then per-column values: the pivot,
    // later the mean, rest, scale and shift ([3][width]).
    const int tx = threadIdx.x, ty = threadIdx.y, by = blockDim.y;
    const int width = blockDim.x * VEC;
    const int j0 = blockIdx.x * width + tx * VEC;
    const bool active = j0 < C;
    const int rows = (int)outer;
    // Row of item k: k * by + ty (held or not). Offsets from the block's
    // columns are 32-bit (decide: the whole tensor has < 2^31 elements) and
    // recomputed, not stored, to leave registers to the cache itself.
    const T* xc = x + j0;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int r = k * by + ty;
      if (active && r < rows) q[k] = load_vec<T, VEC>(xc + r * C);
    }
    A* part = sh;                  // [by][width]
    A* coef = sh + by * width;     // [3][width]
    // The pivots: row 0, item 0 of the threads ty == 0 (rows >= 1).
    if (ty == 0)
#pragma unroll
      for (int e = 0; e < VEC; ++e) coef[tx * VEC + e] = active ? finite_or_zero(to_acc(q[0].v[e])) : A(0);
    __syncthreads();
    A m[VEC], acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      m[e] = coef[tx * VEC + e];
      acc[e] = A(0);
    }
#pragma unroll
    for (int k = 0; k < ITEMS; ++k)
      if (active && k * by + ty < rows)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += to_acc(q[k].v[e]) - m[e];
    column_sum1<A, VEC>(acc, part, width);
    if (ty == 0)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int col = tx * VEC + e;
        A mean, rest;
        mean_and_rest<A>(m[e], part[col], A(rows), mean, rest);
        coef[col] = mean;
        coef[width + col] = rest;
      }
    __syncthreads();
    // sum((x - mean)^2) = M2 + rows * rest^2: each x - mean is exact near
    // the mean, and the correction is taken off below (the rest is not kept
    // per column here: 16-bit columns are 8 per thread, registers are short).
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      m[e] = coef[tx * VEC + e];
      acc[e] = A(0);
    }
#pragma unroll
    for (int k = 0; k < ITEMS; ++k)
      if (active && k * by + ty < rows)
#pragma unroll
        for (int e = 0; e < VEC; ++e) { const A d = to_acc(q[k].v[e]) - m[e]; acc[e] += d * d; }
    column_sum1<A, VEC>(acc, part, width);  // part's last readers passed the barrier above
    if (ty == 0 && active) {
#pragma unroll 1
      for (int e = 0; e < VEC; ++e) {  // not unrolled: once per column, and finalize is long
        const int col = tx * VEC + e;
        const A mean = coef[col], rest = coef[width + col];
        A var = part[col] / A(rows) - rest * rest;
        var = var < A(0) ? A(0) : var;  // the last bit of the difference; a NaN stays NaN
        A scale, shift;
        finalize_channel<A>(j0 + e, A(rows), mean, var, scale, shift, CUBN_FINALIZE_ARGS);
        coef[width + col] = scale;
        coef[2 * width + col] = shift - rest * scale;  // y = (x - mean) * scale + this
      }
    }
    __syncthreads();
    // The largest caches leave no registers for the coefficients: they are
    // read from shared memory for each vector then (ptxas spilled on sm_80).
    constexpr bool kCoefInShared = ITEMS * VEC >= 64;
    A sc[VEC], sf[VEC];
    if (!kCoefInShared)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        m[e] = coef[tx * VEC + e];
        sc[e] = coef[width + tx * VEC + e];
        sf[e] = coef[2 * width + tx * VEC + e];
      }
    const T* sc0 = has_side ? side + j0 : nullptr;
    T* yc = y + j0;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int r = k * by + ty;
      if (!active || r >= rows) continue;
      Vec<T, VEC> sv;
      if (has_side) sv = load_vec<T, VEC>(sc0 + r * C);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {  // y overwrites x in the cache
        const int col = tx * VEC + e;
        A z = kCoefInShared ? (to_acc(q[k].v[e]) - coef[col]) * coef[width + col] + coef[2 * width + col]
                            : (to_acc(q[k].v[e]) - m[e]) * sc[e] + sf[e];
        if (has_side) z += to_acc(sv.v[e]);
        q[k].v[e] = Out<T>::cast(act_fwd<ACT>(z, alpha));
      }
      store_vec<T, VEC>(yc + r * C, q[k]);
    }
  }
}

// Backward in one launch, on the same ownership of channels by blocks: each
// thread keeps its x vectors and dy' = dy * act'(z) (in the accumulation
// type) in registers, the block reduces S1 = sum(dy') and S2 = sum(dy' (x -
// mean)), bwd_channel (finalize.cuh, shared with cubn_bwd_finalize) turns
// them into dgamma, dbeta, k1, k2, and the block writes
// dx = scale * dy' - (k1 + k2 * (x - mean)) (and d side = dy') from its
// registers: x and dy are read once instead of twice. Unweighted only.
// ITEMS (registry.one_launch_backward_items): 16 / VEC vectors (8 for
// scalar access), so that x and the float dy' of 16 elements fit (no spills:
// the NVRTC test checks); 4 for float64.
template <typename T, int ACT, int VEC, int CL, int ITEMS>
__global__ void __launch_bounds__(CUBN_ONE_LAUNCH_THREADS)
cubn_bn_bwd_one_launch(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ side,
                       T* __restrict__ dx, T* __restrict__ dside, i64 outer, int C, i64 inner,
                       const typename AccOf<T>::type* __restrict__ mean,
                       const typename AccOf<T>::type* __restrict__ scale,
                       const typename AccOf<T>::type* __restrict__ shift,
                       const typename AccOf<T>::type* __restrict__ count,
                       const typename AccOf<T>::type* __restrict__ invstd,
                       const typename AccOf<T>::type* __restrict__ gcoef,
                       const typename AccOf<T>::type* __restrict__ hcoef, int training,
                       typename AccOf<T>::type alpha,
                       typename AccOf<T>::type* __restrict__ dgamma,
                       typename AccOf<T>::type* __restrict__ dbeta) {
  typedef typename AccOf<T>::type A;
  constexpr int IT = ITEMS;
  const bool has_side = ACT != ACT_NONE && side != nullptr;
  const bool want_dside = dside != nullptr;
  Vec<T, VEC> q[IT];
  A gd[IT][VEC];  // dy'
  CUBN_DYNAMIC_SHARED(A, sh);

  if (CL == 0) {
    i64 at[IT];
    const int c = blockIdx.x;
    const i64 L = outer * inner;
    const A m = mean[c], s = scale[c], t = shift[c];
    A s1 = A(0), s2 = A(0);
#pragma unroll
    for (int k = 0; k < IT; ++k) {
      at[k] = cf_item_offset<VEC>(k, L, inner, C, c);
      if (at[k] >= 0) {
        q[k] = load_vec<T, VEC>(x + at[k]);
        const Vec<T, VEC> dv = load_vec<T, VEC>(dy + at[k]);
        Vec<T, VEC> sv;
        if (has_side) sv = load_vec<T, VEC>(side + at[k]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const A xm = to_acc(q[k].v[e]) - m;
          A g = to_acc(dv.v[e]);
          if (ACT != ACT_NONE) g *= act_grad<ACT>(xm * s + t + (has_side ? to_acc(sv.v[e]) : A(0)), alpha);
          gd[k][e] = g;
          s1 += g;
          s2 += g * xm;
        }
      }
    }
    block_sum2(s1, s2, sh);
    if (threadIdx.x == 0) {
      A k1, k2;
      bwd_channel<A>(c, s1, s2, count, invstd, scale, gcoef, hcoef, training, dgamma, dbeta, k1, k2);
      sh[64] = k1;
      sh[65] = k2;
    }
    __syncthreads();
    const A k1 = sh[64], k2 = sh[65];
#pragma unroll
    for (int k = 0; k < IT; ++k) {
      if (at[k] < 0) continue;
      Vec<T, VEC> dxv, dsv;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const A xm = to_acc(q[k].v[e]) - m;
        dxv.v[e] = Out<T>::cast(s * gd[k][e] - (k1 + k2 * xm));
        if (want_dside) dsv.v[e] = Out<T>::cast(gd[k][e]);
      }
      store_vec<T, VEC>(dx + at[k], dxv);
      if (want_dside) store_vec<T, VEC>(dside + at[k], dsv);
    }
  } else {
    const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
    const int width = bx * VEC;
    const int j0 = blockIdx.x * width + tx * VEC;
    const bool active = j0 < C;
    const i64 rows = outer;
    A m[VEC], s[VEC], t[VEC], s1[VEC], s2[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      m[e] = active ? mean[j0 + e] : A(0);
      s[e] = active ? scale[j0 + e] : A(0);
      t[e] = active ? shift[j0 + e] : A(0);
      s1[e] = A(0);
      s2[e] = A(0);
    }
#pragma unroll
    for (int k = 0; k < IT; ++k) {
      const i64 r = (i64)k * by + ty;
      if (!active || r >= rows) continue;
      const i64 at = r * C + j0;
      q[k] = load_vec<T, VEC>(x + at);
      const Vec<T, VEC> dv = load_vec<T, VEC>(dy + at);
      Vec<T, VEC> sv;
      if (has_side) sv = load_vec<T, VEC>(side + at);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const A xm = to_acc(q[k].v[e]) - m[e];
        A g = to_acc(dv.v[e]);
        if (ACT != ACT_NONE) g *= act_grad<ACT>(xm * s[e] + t[e] + (has_side ? to_acc(sv.v[e]) : A(0)), alpha);
        gd[k][e] = g;
        s1[e] += g;
        s2[e] += g * xm;
      }
    }
    // Tree over ty of both sums; then per-column coefficients.
    A* p1 = sh;                   // [by][width]
    A* p2 = sh + by * width;      // [by][width]
    A* coef = sh + 2 * by * width;  // k1, k2: [2][width]
    column_sum2<A, VEC>(s1, s2, p1, p2, width);
    if (ty == 0 && active) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int col = tx * VEC + e;
        A k1, k2;
        bwd_channel<A>(j0 + e, p1[col], p2[col], count, invstd, scale, gcoef, hcoef, training, dgamma, dbeta,
                       k1, k2);
        coef[col] = k1;
        coef[width + col] = k2;
      }
    }
    __syncthreads();
    A k1[VEC], k2[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      k1[e] = coef[tx * VEC + e];
      k2[e] = coef[width + tx * VEC + e];
    }
#pragma unroll
    for (int k = 0; k < IT; ++k) {
      const i64 r = (i64)k * by + ty;
      if (!active || r >= rows) continue;
      const i64 at = r * C + j0;
      Vec<T, VEC> dxv, dsv;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const A xm = to_acc(q[k].v[e]) - m[e];
        dxv.v[e] = Out<T>::cast(s[e] * gd[k][e] - (k1[e] + k2[e] * xm));
        if (want_dside) dsv.v[e] = Out<T>::cast(gd[k][e]);
      }
      store_vec<T, VEC>(dx + at, dxv);
      if (want_dside) store_vec<T, VEC>(dside + at, dsv);
    }
  }
}
