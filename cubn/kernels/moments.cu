// Per-channel Welford moments: each block reduces a slice of the data of its
// channels to (count, mean, M2) partials; cubn_bn_finalize (finalize.cu)
// merges the partials of a channel with Chan's formula in a fixed order.
// Two layouts, each read coalesced:
//   channels last  (inner == 1): x is a (rows, cols) matrix, column j holds
//                  channel j % C (cols = k*C: k consecutive outer rows are
//                  folded into one matrix row so that small C still fills
//                  whole warps); threads run along columns.
//   channels first (inner > 1):  the data of channel c are `outer` runs of
//                  `inner` contiguous elements; a block reduces one
//                  contiguous chunk of them.
// WMODE: 0 unweighted; 1 one weight per outer index group (w[o / wdiv]);
// 2 one weight per element (w has x's layout). Zero weights are skipped.
#include "common.cuh"

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

template <typename T, int WMODE, int VEC>
__global__ void __launch_bounds__(CUBN_REDUCE_THREADS)
cubn_moments_cl(const T* __restrict__ x, i64 rows, int cols,
                const typename AccOf<T>::type* __restrict__ w, i64 wdiv,
                typename AccOf<T>::type* __restrict__ p_count,
                typename AccOf<T>::type* __restrict__ p_mean,
                typename AccOf<T>::type* __restrict__ p_m2) {
  typedef typename AccOf<T>::type A;
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int j0 = (blockIdx.x * bx + tx) * VEC;  // first column of this thread
  const bool active = j0 < cols;                // cols % VEC == 0 (host guarantees)

  // WMODE 2 needs a count per column; otherwise every column of the thread
  // sees the same rows (and row weights), so one count serves all VEC.
  A n[WMODE == 2 ? VEC : 1], mean[VEC], m2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) { mean[k] = A(0); m2[k] = A(0); }
#pragma unroll
  for (int k = 0; k < (WMODE == 2 ? VEC : 1); ++k) n[k] = A(0);

  if (active) {
    const i64 step = (i64)gridDim.y * by;
    i64 r = (i64)blockIdx.y * by + ty;
    for (; r < rows; r += step * CUBN_UNROLL) {
      Vec<T, VEC> q[CUBN_UNROLL];
#pragma unroll
      for (int u = 0; u < CUBN_UNROLL; ++u)
        if (r + u * step < rows) q[u] = load_vec<T, VEC>(x + (r + u * step) * cols + j0);
#pragma unroll
      for (int u = 0; u < CUBN_UNROLL; ++u) {
        const i64 ru = r + u * step;
        if (ru >= rows) break;
        if (WMODE == 0) {
          n[0] += A(1);
          const A inv = A(1) / n[0];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A v = to_acc(q[u].v[k]);
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
            const A v = to_acc(q[u].v[k]);
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
            const A v = to_acc(q[u].v[k]);
            const A d = v - mean[k];
            mean[k] += d * (wt / n[k]);
            m2[k] += wt * d * (v - mean[k]);
          }
        }
      }
    }
  }

  // Merge the by rows of the block through shared memory, in a fixed tree.
  CUBN_DYNAMIC_SHARED(A, sh);
  const int width = bx * VEC;
  A* sh_n = sh;
  A* sh_mean = sh + by * width;
  A* sh_m2 = sh + 2 * by * width;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int idx = ty * width + tx * VEC + k;
    sh_n[idx] = n[WMODE == 2 ? k : 0];
    sh_mean[idx] = mean[k];
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
  if (ty == 0 && active) {
    const i64 base = (i64)blockIdx.y * cols + j0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      p_count[base + k] = sh_n[tx * VEC + k];
      p_mean[base + k] = sh_mean[tx * VEC + k];
      p_m2[base + k] = sh_m2[tx * VEC + k];
    }
  }
}

// Channels first: block b reduces chunk (b % nsplit) of channel (b / nsplit).
// The channel's data, flattened as j = o * inner + i, is cut into nsplit
// chunks of `chunk` elements (a multiple of VEC; inner % VEC == 0 when VEC > 1).
template <typename T, int WMODE, int VEC>
__global__ void __launch_bounds__(CUBN_REDUCE_THREADS)
cubn_moments_cf(const T* __restrict__ x, i64 outer, int C, i64 inner, int nsplit, i64 chunk,
                const typename AccOf<T>::type* __restrict__ w, i64 wdiv,
                typename AccOf<T>::type* __restrict__ p_count,
                typename AccOf<T>::type* __restrict__ p_mean,
                typename AccOf<T>::type* __restrict__ p_m2) {
  typedef typename AccOf<T>::type A;
  const int c = blockIdx.x / nsplit, s = blockIdx.x % nsplit;
  const i64 L = outer * inner;
  const i64 begin = (i64)s * chunk;
  const i64 end = begin + chunk < L ? begin + chunk : L;
  A n = A(0), mean = A(0), m2 = A(0);

  // Walk j = begin + threadIdx.x*VEC, then + blockDim.x*VEC, keeping (o, i).
  const i64 stride = (i64)blockDim.x * VEC;
  const i64 so = stride / inner, si = stride - so * inner;
  i64 j = begin + (i64)threadIdx.x * VEC;
  i64 o = j / inner, i = j - o * inner;
  while (j < end) {
    Vec<T, VEC> q[CUBN_UNROLL];
    i64 row[CUBN_UNROLL];
    int m = 0;
#pragma unroll
    for (int u = 0; u < CUBN_UNROLL; ++u) {
      if (j < end) {
        row[u] = o;
        q[u] = load_vec<T, VEC>(x + (o * C + c) * inner + i);
        m = u + 1;
        j += stride; o += so; i += si;
        if (i >= inner) { i -= inner; ++o; }
      }
    }
#pragma unroll
    for (int u = 0; u < CUBN_UNROLL; ++u) {
      if (u >= m) break;
      A v[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = to_acc(q[u].v[k]);
      if (WMODE == 0) {
        // mean and M2 of the vector, then one Chan merge
        A lm, lm2;
        vec_moments<A, VEC>(v, lm, lm2);
        chan_merge(n, mean, m2, A(VEC), lm, lm2);
      } else if (WMODE == 1) {
        const A wt = w[row[u] / wdiv];  // the vector lies in one outer row: one weight
        if (wt == A(0)) continue;
        A lm, lm2;
        vec_moments<A, VEC>(v, lm, lm2);
        chan_merge(n, mean, m2, wt * A(VEC), lm, wt * lm2);
      } else {
        // element weights: recover the element offset of this vector
        const i64 jj = j - (i64)(m - u) * stride;
        const i64 oo = jj / inner, ii = jj - oo * inner;
        const A* wp = w + (oo * C + c) * inner + ii;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A wt = wp[k];
          if (wt == A(0)) continue;
          chan_merge(n, mean, m2, wt, v[k], A(0));
        }
      }
    }
  }
  __shared__ A sh[96];
  block_chan_merge(n, mean, m2, sh);
  if (threadIdx.x == 0) {
    const i64 idx = (i64)s * C + c;
    p_count[idx] = n;
    p_mean[idx] = mean;
    p_m2[idx] = m2;
  }
}
