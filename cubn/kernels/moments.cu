// Per-channel Welford moments: each block reduces a slice of the data of its
// channels to (count, mean, M2) partials; cubn_bn_finalize (finalize.cu)
// merges the partials of a channel with Chan's formula in a fixed order, or,
// in the fused kernels at the end of this file, the last block of each
// channel group to finish does (finalize.cuh), in the same launch.
// Two layouts, each read coalesced:
//   channels last  (inner == 1): x is a (rows, cols) matrix, column j holds
//                  channel j % C (cols = k*C: k consecutive outer rows are
//                  folded into one matrix row so that small C still fills
//                  whole warps); threads run along columns. A block merges
//                  the folded columns of each channel itself, so it writes
//                  one partial per channel (cols == C: one per column).
//   channels first (inner > 1):  the data of channel c are `outer` runs of
//                  `inner` contiguous elements; a block reduces one
//                  contiguous chunk of them.
// Every element is taken relative to a pivot: the first element each thread
// loads (0 when not finite), so no extra read. Differences of nearby floats
// are exact, so the accumulators hold small values and keep the digits a
// large offset would cost (float32 data at offset 1e6, std 1e-2 keeps ~1e-7
// relative variance error instead of ~0.4). A block re-expresses its
// threads' means about one pivot (exact for nearby pivots) and writes it
// beside its partial (p_pivot, the partials' layout); finalize merges
// partials about common pivots and adds the last one back.
// A thread whose accumulation ends non-finite (Inf/NaN in its data) walks its
// data again to sum the non-finite values alone: its partial mean becomes
// that sum (+-Inf, or NaN for NaN or Inf - Inf) and its M2 NaN, which
// chan_merge carries on -- the NumPy backend's pattern, and finite data pay
// one check per thread.
// WMODE: 0 unweighted; 1 one weight per outer index group (w[o / wdiv]);
// 2 one weight per element (w has x's layout). Zero weights are skipped.
#include "common.cuh"
#include "finalize.cuh"

// Mean and M2 of VEC values held in registers (two passes over registers).
template <typename A, int VEC>
__device__ __forceinline__ void vec_moments(const A* v, A& mean, A& m2) {
  A sum = A(0);
#pragma unroll
  for (int k = 0; k < VEC; ++k) sum += v[k];
  mean = sum * (A(1) / A(VEC));
  m2 = A(0);
#pragma unroll
  for (int k = 0; k < VEC; ++k) { const A d = v[k] - mean; m2 += d * d; }
}

template <typename A>
__device__ __forceinline__ A finite_or_zero(A v) { return is_finite(v) ? v : A(0); }

// The rows r, r + step, ... of columns j0 .. j0+VEC of a thread. BAD == 0:
// Welford on the shifted values into (n, mean, m2); BAD == 1: only the sum
// of the non-finite shifted values (weight != 0) into bad.
template <int BAD, int WMODE, int VEC, typename T, typename A>
__device__ __forceinline__ void cl_walk(const T* __restrict__ x, i64 rows, int cols, int j0, i64 r, i64 step,
                                        const A* __restrict__ w, i64 wdiv, A* piv, A* n, A* mean, A* m2,
                                        A* bad) {
  bool first = !BAD;
  for (; r < rows; r += step * CUBN_UNROLL) {
    Vec<T, VEC> q[CUBN_UNROLL];
#pragma unroll
    for (int u = 0; u < CUBN_UNROLL; ++u)
      if (r + u * step < rows) q[u] = load_vec<T, VEC>(x + (r + u * step) * cols + j0);
    if (first) {  // the pivots: this thread's first row, already loaded
      first = false;
#pragma unroll
      for (int k = 0; k < VEC; ++k) piv[k] = finite_or_zero(to_acc(q[0].v[k]));
    }
#pragma unroll
    for (int u = 0; u < CUBN_UNROLL; ++u) {
      const i64 ru = r + u * step;
      if (ru >= rows) break;
      if (BAD) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A wt = WMODE == 0 ? A(1) : WMODE == 1 ? w[ru / wdiv] : w[ru * cols + j0 + k];
          const A v = to_acc(q[u].v[k]) - piv[k];
          if (wt != A(0) && !is_finite(v)) bad[k] += v;
        }
      } else if (WMODE == 0) {
        n[0] += A(1);
        const A inv = A(1) / n[0];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A v = to_acc(q[u].v[k]) - piv[k];
          const A d = v - mean[k];
          mean[k] += d * inv;
          m2[k] += d * (v - mean[k]);
        }
      } else if (WMODE == 1) {
        const A wt = w[ru / wdiv];
        if (wt == A(0)) continue;
        n[0] += wt;
        const A f = wt / n[0];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A v = to_acc(q[u].v[k]) - piv[k];
          const A d = v - mean[k];
          mean[k] += d * f;
          m2[k] += wt * d * (v - mean[k]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A wt = w[ru * cols + j0 + k];
          if (wt == A(0)) continue;
          n[k] += wt;
          const A v = to_acc(q[u].v[k]) - piv[k];
          const A d = v - mean[k];
          mean[k] += d * (wt / n[k]);
          m2[k] += wt * d * (v - mean[k]);
        }
      }
    }
  }
}

// Partials: cols == C: (gridDim.y, cols), one per column; cols > C (folded):
// (gridDim.y, gridDim.x * C), block x's partial of channel c at column
// blockIdx.x * C + c (empty (0, 0, 0) where the block has no column of c).
template <typename T, int WMODE, int VEC>
__device__ __forceinline__ void moments_cl_block(const T* __restrict__ x, i64 rows, int cols, int C,
                                                 const typename AccOf<T>::type* __restrict__ w, i64 wdiv,
                                                 typename AccOf<T>::type* p_count,
                                                 typename AccOf<T>::type* p_mean,
                                                 typename AccOf<T>::type* p_m2,
                                                 typename AccOf<T>::type* p_pivot) {
  typedef typename AccOf<T>::type A;
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int j0 = (blockIdx.x * bx + tx) * VEC;  // first column of this thread
  const bool active = j0 < cols;                // cols % VEC == 0 (host guarantees)

  // WMODE 2 needs a count per column; otherwise every column of the thread
  // sees the same rows (and row weights), so one count serves all VEC.
  A n[WMODE == 2 ? VEC : 1], mean[VEC], m2[VEC], piv[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) { mean[k] = A(0); m2[k] = A(0); piv[k] = A(0); }
#pragma unroll
  for (int k = 0; k < (WMODE == 2 ? VEC : 1); ++k) n[k] = A(0);

  if (active) {
    const i64 step = (i64)gridDim.y * by;
    const i64 r0 = (i64)blockIdx.y * by + ty;
    cl_walk<0, WMODE, VEC>(x, rows, cols, j0, r0, step, w, wdiv, piv, n, mean, m2, (A*)nullptr);
    bool finite = true;
#pragma unroll
    for (int k = 0; k < VEC; ++k) finite = finite && is_finite(mean[k]) && is_finite(m2[k]);
    if (!finite) {
      A bad[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) bad[k] = A(0);
      cl_walk<1, WMODE, VEC>(x, rows, cols, j0, r0, step, w, wdiv, piv, n, mean, m2, bad);
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        if (bad[k] != A(0)) { mean[k] = bad[k]; m2[k] = bad[k] - bad[k]; }
    }
  }

  // The block's pivots are row ty == 0's (it has data whenever any row of the
  // block has); every thread re-expresses its means about them, then the by
  // rows merge through shared memory in a fixed tree.
  CUBN_DYNAMIC_SHARED(A, sh);
  const int width = bx * VEC;
  A* sh_n = sh;
  A* sh_mean = sh + by * width;
  A* sh_m2 = sh + 2 * by * width;
  A* sh_p = sh_n + width;  // row 1 of sh_n (by >= 8): free before the rows are stored and after the tree
  A P[VEC];
  if (ty == 0) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) sh_p[tx * VEC + k] = piv[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < VEC; ++k) P[k] = sh_p[tx * VEC + k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int idx = ty * width + tx * VEC + k;
    const A nk = n[WMODE == 2 ? k : 0];
    sh_n[idx] = nk;
    sh_mean[idx] = nk != A(0) ? mean[k] + (piv[k] - P[k]) : A(0);
    sh_m2[idx] = m2[k];
  }
  __syncthreads();
  for (int s = by >> 1; s > 0; s >>= 1) {
    if (ty < s) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int a = ty * width + tx * VEC + k, b = (ty + s) * width + tx * VEC + k;
        A na = sh_n[a], ma = sh_mean[a], m2a = sh_m2[a];
        chan_merge(na, ma, m2a, sh_n[b], sh_mean[b], sh_m2[b]);
        sh_n[a] = na; sh_mean[a] = ma; sh_m2[a] = m2a;
      }
    }
    __syncthreads();
  }
  if (ty == 0) {  // the pivots back, beside row 0
#pragma unroll
    for (int k = 0; k < VEC; ++k) sh_p[tx * VEC + k] = P[k];
  }
  __syncthreads();
  // Row 0 of sh holds the block's columns jb .. jb + wl. Written by linear
  // thread index, so consecutive threads write consecutive partials.
  const int tid = ty * bx + tx, nthreads = bx * by;
  const int jb = blockIdx.x * width;
  const int wl = cols - jb < width ? cols - jb : width;
  if (cols == C) {
    const i64 base = (i64)blockIdx.y * cols + jb;
    for (int l = tid; l < wl; l += nthreads) {
      p_count[base + l] = sh_n[l];
      p_mean[base + l] = sh_mean[l];
      p_m2[base + l] = sh_m2[l];
      p_pivot[base + l] = sh_p[l];
    }
    return;
  }
  // Folded: channel c's columns here are l = l0(c) + m*C, m < M(c); merge
  // them in a fixed tree over m (pairs m, m + s for m % 2s == 0).
  const int off = jb % C;
  const int mmax = (wl + C - 1) / C;
  for (int s = 1; s < mmax; s <<= 1) {
    for (int t = tid; t < C * mmax; t += nthreads) {
      const int c = t % C, m = t / C;
      const int l0 = (c - off + C) % C;
      const int M = l0 < wl ? (wl - l0 + C - 1) / C : 0;
      if (m % (2 * s) == 0 && m + s < M) {
        const int a = l0 + m * C, b = a + s * C;
        A na = sh_n[a], ma = sh_mean[a], m2a = sh_m2[a], pa = sh_p[a];
        chan_merge_pivot(na, ma, m2a, pa, sh_n[b], sh_mean[b], sh_m2[b], sh_p[b]);
        sh_n[a] = na; sh_mean[a] = ma; sh_m2[a] = m2a; sh_p[a] = pa;
      }
    }
    __syncthreads();
  }
  const i64 base = (i64)blockIdx.y * gridDim.x * C + (i64)blockIdx.x * C;
  for (int c = tid; c < C; c += nthreads) {
    const int l0 = (c - off + C) % C;
    const bool has = l0 < wl;
    p_count[base + c] = has ? sh_n[l0] : A(0);
    p_mean[base + c] = has ? sh_mean[l0] : A(0);
    p_m2[base + c] = has ? sh_m2[l0] : A(0);
    p_pivot[base + c] = has ? sh_p[l0] : A(0);
  }
}

// Channels first: block b reduces chunk (b % nsplit) of channel (b / nsplit).
// The channel's data, flattened as j = o * inner + i, is cut into nsplit
// chunks of `chunk` elements (a multiple of VEC; inner % VEC == 0 when VEC > 1).
// BAD as in cl_walk.
// Unweighted, each thread keeps VEC Welford accumulators, one per position
// in the vector, sharing one count (kn, kmean, km2): one reciprocal per
// vector, as in the channels-last loop; they are merged after the walk.
template <int BAD, int WMODE, int VEC, typename T, typename A>
__device__ __forceinline__ void cf_walk(const T* __restrict__ x, int C, int c, i64 inner, i64 j, i64 end,
                                        const A* __restrict__ w, i64 wdiv, A& piv, A& n, A& mean, A& m2, A& bad,
                                        A& kn, A* kmean, A* km2) {
  bool first = !BAD;
  // Walk j, j + blockDim.x*VEC, ..., keeping (o, i) and the element offset
  // off = (o*C + c)*inner + i, advanced by additions only.
  const i64 stride = (i64)blockDim.x * VEC;
  const i64 so = stride / inner, si = stride - so * inner;
  const i64 dstep = so * C * inner + si, wrap = (i64)(C - 1) * inner;
  i64 o = j / inner, i = j - o * inner;
  i64 off = (o * C + c) * inner + i;
  int left = j < end ? int((end - j + stride - 1) / stride) : 0;  // vectors of this thread
  while (left > 0) {
    Vec<T, VEC> q[CUBN_UNROLL];
    i64 row[CUBN_UNROLL], at[CUBN_UNROLL];
    int m = 0;
#pragma unroll
    for (int u = 0; u < CUBN_UNROLL; ++u) {
      if (u < left) {
        if (WMODE == 1) row[u] = o;
        if (WMODE == 2) at[u] = off;
        q[u] = load_vec<T, VEC>(x + off);
        m = u + 1;
        off += dstep; i += si;
        if (WMODE == 1) o += so;
        if (i >= inner) { i -= inner; off += wrap; if (WMODE == 1) ++o; }
      }
    }
    left -= m;
    if (first) {  // the pivot: this thread's first element, already loaded
      first = false;
      piv = finite_or_zero(to_acc(q[0].v[0]));
    }
#pragma unroll
    for (int u = 0; u < CUBN_UNROLL; ++u) {
      if (u >= m) break;
      A v[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = to_acc(q[u].v[k]) - piv;
      const A* wp = WMODE == 2 ? w + at[u] : nullptr;  // element weights: x's layout
      if (BAD) {
        const A wrow = WMODE == 1 ? w[row[u] / wdiv] : A(1);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A wt = WMODE == 2 ? wp[k] : wrow;
          if (wt != A(0) && !is_finite(v[k])) bad += v[k];
        }
      } else if (WMODE == 0) {
        kn += A(1);
        const A inv = m_rcp(kn);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A d = v[k] - kmean[k];
          kmean[k] += d * inv;
          km2[k] += d * (v[k] - kmean[k]);
        }
      } else if (WMODE == 1) {
        const A wt = w[row[u] / wdiv];  // the vector lies in one outer row: one weight
        if (wt == A(0)) continue;
        A lm, lm2;
        vec_moments<A, VEC>(v, lm, lm2);
        chan_merge_live(n, mean, m2, wt * A(VEC), lm, wt * lm2);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A wt = wp[k];
          if (wt == A(0)) continue;
          chan_merge_live(n, mean, m2, wt, v[k], A(0));
        }
      }
    }
  }
}

template <typename T, int WMODE, int VEC>
__device__ __forceinline__ void moments_cf_block(const T* __restrict__ x, i64 outer, int C, i64 inner, int nsplit,
                                                 i64 chunk, const typename AccOf<T>::type* __restrict__ w, i64 wdiv,
                                                 typename AccOf<T>::type* p_count,
                                                 typename AccOf<T>::type* p_mean,
                                                 typename AccOf<T>::type* p_m2,
                                                 typename AccOf<T>::type* p_pivot) {
  typedef typename AccOf<T>::type A;
  const int c = blockIdx.x / nsplit, s = blockIdx.x % nsplit;
  const i64 L = outer * inner;
  const i64 begin = (i64)s * chunk;
  const i64 end = begin + chunk < L ? begin + chunk : L;
  A n = A(0), mean = A(0), m2 = A(0);
  A piv = A(0);
  const i64 j = begin + (i64)threadIdx.x * VEC;
  A bad = A(0), kn = A(0), kmean[VEC], km2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) { kmean[k] = A(0); km2[k] = A(0); }
  cf_walk<0, WMODE, VEC>(x, C, c, inner, j, end, w, wdiv, piv, n, mean, m2, bad, kn, kmean, km2);
  if (WMODE == 0 && kn > A(0)) {  // the VEC accumulators, merged in a fixed order
    n = kn; mean = kmean[0]; m2 = km2[0];
#pragma unroll
    for (int k = 1; k < VEC; ++k) chan_merge_live(n, mean, m2, kn, kmean[k], km2[k]);
  }
  if (!(is_finite(mean) && is_finite(m2))) {
    cf_walk<1, WMODE, VEC>(x, C, c, inner, j, end, w, wdiv, piv, n, mean, m2, bad, kn, kmean, km2);
    if (bad != A(0)) { mean = bad; m2 = bad - bad; }
  }
  // Thread 0's pivot is the block's (it has data whenever any thread has):
  // every thread re-expresses its mean about it, then the block merges.
  __shared__ A sh[96];
  __shared__ A sh_p;
  if (threadIdx.x == 0) sh_p = piv;
  __syncthreads();
  const A P = sh_p;
  if (n != A(0)) mean = mean + (piv - P);
  block_chan_merge(n, mean, m2, sh);
  if (threadIdx.x == 0) {
    const i64 idx = (i64)s * C + c;
    p_count[idx] = n;
    p_mean[idx] = mean;
    p_m2[idx] = m2;
    p_pivot[idx] = P;
  }
}

template <typename T, int WMODE, int VEC>
__global__ void __launch_bounds__(CUBN_REDUCE_THREADS)
cubn_moments_cl(const T* __restrict__ x, i64 rows, int cols, int C,
                const typename AccOf<T>::type* __restrict__ w, i64 wdiv,
                typename AccOf<T>::type* __restrict__ p_count,
                typename AccOf<T>::type* __restrict__ p_mean,
                typename AccOf<T>::type* __restrict__ p_m2,
                typename AccOf<T>::type* __restrict__ p_pivot) {
  moments_cl_block<T, WMODE, VEC>(x, rows, cols, C, w, wdiv, p_count, p_mean, p_m2, p_pivot);
}

template <typename T, int WMODE, int VEC>
__global__ void __launch_bounds__(CUBN_REDUCE_THREADS)
cubn_moments_cf(const T* __restrict__ x, i64 outer, int C, i64 inner, int nsplit, i64 chunk,
                const typename AccOf<T>::type* __restrict__ w, i64 wdiv,
                typename AccOf<T>::type* __restrict__ p_count,
                typename AccOf<T>::type* __restrict__ p_mean,
                typename AccOf<T>::type* __restrict__ p_m2,
                typename AccOf<T>::type* __restrict__ p_pivot) {
  moments_cf_block<T, WMODE, VEC>(x, outer, C, inner, nsplit, chunk, w, wdiv, p_count, p_mean, p_m2, p_pivot);
}

// The fused statistics: the same blocks, then the last block of each channel
// group to finish (finalize.cuh, last_block_arrives) merges the group's
// partials exactly as cubn_bn_finalize would -- same walkers, same order, so
// the results are bitwise those of the two-launch path -- and writes every
// finalize output. Groups: channels last unfolded, the blockIdx.x column
// group (gridDim.y blocks); folded, the whole grid (one partial per block and
// channel); channels first, one channel (nsplit blocks). `counters` holds one
// zero per group before the launch and again after it.
template <typename T, int WMODE, int VEC>
__global__ void __launch_bounds__(CUBN_REDUCE_THREADS)
cubn_moments_cl_fused(const T* __restrict__ x, i64 rows, int cols, int C,
                      const typename AccOf<T>::type* __restrict__ w, i64 wdiv,
                      typename AccOf<T>::type* p_count, typename AccOf<T>::type* p_mean,
                      typename AccOf<T>::type* p_m2, typename AccOf<T>::type* p_pivot,
                      unsigned* counters, int weighted, CUBN_FINALIZE_PARAMS(typename AccOf<T>::type)) {
  typedef typename AccOf<T>::type A;
  moments_cl_block<T, WMODE, VEC>(x, rows, cols, C, w, wdiv, p_count, p_mean, p_m2, p_pivot);
  const bool folded = cols != C;
  const int group = folded ? 0 : (int)blockIdx.x;
  if (!last_block_arrives(counters + group, folded ? gridDim.x * gridDim.y : gridDim.y)) return;
  const int width = blockDim.x * VEC;
  const int c0 = folded ? 0 : (int)blockIdx.x * width;
  const int nch = folded ? C : (cols - c0 < width ? cols - c0 : width);
  merge_finalize_group<A>(c0, nch, C, gridDim.y, folded ? gridDim.x : 1, p_count, p_mean, p_m2, p_pivot, weighted,
                          CUBN_FINALIZE_ARGS);
  if (threadIdx.x == 0 && threadIdx.y == 0) counters[group] = 0u;
}

template <typename T, int WMODE, int VEC>
__global__ void __launch_bounds__(CUBN_REDUCE_THREADS)
cubn_moments_cf_fused(const T* __restrict__ x, i64 outer, int C, i64 inner, int nsplit, i64 chunk,
                      const typename AccOf<T>::type* __restrict__ w, i64 wdiv,
                      typename AccOf<T>::type* p_count, typename AccOf<T>::type* p_mean,
                      typename AccOf<T>::type* p_m2, typename AccOf<T>::type* p_pivot,
                      unsigned* counters, int weighted, CUBN_FINALIZE_PARAMS(typename AccOf<T>::type)) {
  typedef typename AccOf<T>::type A;
  moments_cf_block<T, WMODE, VEC>(x, outer, C, inner, nsplit, chunk, w, wdiv, p_count, p_mean, p_m2, p_pivot);
  const int c = blockIdx.x / nsplit;
  if (!last_block_arrives(counters + c, (unsigned)nsplit)) return;
  merge_finalize_group<A>(c, 1, C, nsplit, 1, p_count, p_mean, p_m2, p_pivot, weighted, CUBN_FINALIZE_ARGS);
  if (threadIdx.x == 0) counters[c] = 0u;
}
