// Per-channel finalize logic shared by cubn_bn_finalize (finalize.cu) and
// the one-launch training forward (one_launch.cu): from a channel's batch
// statistics to every output of the statistics step -- mean, biased
// variance, 1/std, the folded normalization coefficients, the renorm
// corrections and the moving-statistics update.
#pragma once

#include "common.cuh"

// max / min that keep a NaN first argument (fmax/fmin drop it): a channel
// with Inf/NaN data keeps NaN statistics, as NumPy's maximum and clip do.
template <typename A>
__device__ __forceinline__ A nan_max(A v, A lo) { return v < lo ? lo : v; }
template <typename A>
__device__ __forceinline__ A nan_min(A v, A hi) { return v > hi ? hi : v; }

// Partial p of channel c in a (rows, C * fold) partial array: row p / fold,
// column c + (p % fold) * C. Finalize blocks are (bx, by): bx consecutive
// channels (32 bytes of each partial row) by `by` walkers.
__device__ __forceinline__ i64 partial_index(int p, int C, int fold, int c) {
  const int row = p / fold, m = p - row * fold;
  return (i64)row * C * fold + (i64)m * C + c;
}

// Chan-merge (in A) the partials (of type P) of channel c = blockIdx.x * bx +
// tx over the block's walkers, each partial's mean relative to its pivot
// (p_pivot NULL: 0); the result's mean is relative to the returned pivot
// `piv`. Valid in threadIdx.y == 0. Every thread of the block must call it.
template <typename A, typename P>
__device__ __forceinline__ void merge_channel(int c, int C, int nparts, int fold, const P* p_count,
                                              const P* p_mean, const P* p_m2, const P* p_pivot, A& n, A& mean,
                                              A& m2, A& piv) {
  __shared__ A sh[4 * CUBN_FINALIZE_THREADS];
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  n = A(0); mean = A(0); m2 = A(0); piv = A(0);
  const int total = nparts * fold;
  if (c < C) {
    for (int p = ty; p < total; p += by) {
      const i64 k = partial_index(p, C, fold, c);
      chan_merge_pivot(n, mean, m2, piv, A(p_count[k]), A(p_mean[k]), A(p_m2[k]),
                       p_pivot != nullptr ? A(p_pivot[k]) : A(0));
    }
  }
  const int nt = bx * by, idx = ty * bx + tx;
  sh[idx] = n; sh[nt + idx] = mean; sh[2 * nt + idx] = m2; sh[3 * nt + idx] = piv;
  __syncthreads();
  for (int s = by >> 1; s > 0; s >>= 1) {
    if (ty < s) {
      const int b = idx + s * bx;
      chan_merge_pivot(n, mean, m2, piv, sh[b], sh[nt + b], sh[2 * nt + b], sh[3 * nt + b]);
      sh[idx] = n; sh[nt + idx] = mean; sh[2 * nt + idx] = m2; sh[3 * nt + idx] = piv;
    }
    __syncthreads();
  }
}

// Statistics from merged (count, mean - piv, M2). No data: NaN (0/0); a
// weighted reduction whose weights sum to 0: mean 0 and variance 0, as
// tf.nn.weighted_moments' div_no_nan. Inf/NaN in M2 stay (no clamp drops them).
template <typename A>
__device__ __forceinline__ void channel_stats(A n, A& mean, A m2, A& var, A piv, int weighted) {
  if (n > A(0)) {
    var = m2 / n;
    if (var < A(0)) var = A(0);  // M2 >= 0 in exact arithmetic; NaN passes
    mean = piv + mean;
  } else if (weighted) {
    mean = A(0);
    var = A(0);
  } else {
    mean = m_sqrt(A(-1));
    var = mean;
  }
}

// Moving statistics (see backends/base.py MovingUpdate for the formulas).
// Pointers may alias their "_in" counterparts: each channel is read then
// written by one thread.
template <typename A>
__device__ __forceinline__ void moving_update(
    int c, A bm, A bv, A n, A eps,
    A a, int bessel, const A* mm_in, A* mm_out, const A* mv_in, A* mv_out,
    A* zd_biased, A zd_factor, A renorm_a, A* rn_mean, A* rn_std, A* moving_std) {
  const A sd = m_sqrt(bv + eps);
  if (rn_mean != nullptr) {
    rn_mean[c] = rn_mean[c] - (rn_mean[c] - bm) * renorm_a;
    rn_std[c] = rn_std[c] - (rn_std[c] - sd) * renorm_a;
  }
  if (mm_out != nullptr) {
    if (zd_biased != nullptr) {
      const A b = zd_biased[c] - (zd_biased[c] - bm) * a;
      zd_biased[c] = b;
      mm_out[c] = b / zd_factor;
    } else if (mm_in != nullptr) {
      mm_out[c] = mm_in[c] - (mm_in[c] - bm) * a;
    } else {
      mm_out[c] = bm;
    }
  }
  if (mv_out != nullptr) {
    const A v = bessel ? bv * (n / m_max(n - A(1), A(1))) : bv;
    if (moving_std != nullptr) {
      const A s = moving_std[c] - (moving_std[c] - sd) * a;
      moving_std[c] = s;
      mv_out[c] = nan_max(s * s - eps, A(0));
    } else if (mv_in != nullptr) {
      mv_out[c] = mv_in[c] - (mv_in[c] - v) * a;
    } else {
      mv_out[c] = v;
    }
  }
}

// The parameters every finalize takes after the statistics themselves
// (see KernelBackend.finalize for what each one is; most are nullable).
#define CUBN_FINALIZE_PARAMS(A)                                                            \
  A eps, const A *gamma, const A *beta, const A *adj_scale, const A *adj_bias,             \
      const A *renorm_mean, const A *renorm_std, A rmin, A rmax, A dmax, A *o_count,      \
      A *o_mean, A *o_var, A *o_invstd, A *o_scale, A *o_shift, A *o_g, A *o_h, A *o_r,    \
      A *o_d, A upd_a, int bessel, const A *mm_in, A *mm_out, const A *mv_in, A *mv_out,  \
      A *zd_biased, A zd_factor, A renorm_a, A *rn_mean_io, A *rn_std_io, A *moving_std_io
#define CUBN_FINALIZE_ARGS                                                                 \
  eps, gamma, beta, adj_scale, adj_bias, renorm_mean, renorm_std, rmin, rmax, dmax,        \
      o_count, o_mean, o_var, o_invstd, o_scale, o_shift, o_g, o_h, o_r, o_d, upd_a, bessel, \
      mm_in, mm_out, mv_in, mv_out, zd_biased, zd_factor, renorm_a, rn_mean_io, rn_std_io,  \
      moving_std_io

// Writes the outputs of channel c whose statistics are (n, mean, var) and
// returns its folded coefficients: y = (x - mean) * scale + shift.
template <typename A>
__device__ __forceinline__ void finalize_channel(int c, A n, A mean, A var, A& scale, A& shift,
                                                 CUBN_FINALIZE_PARAMS(A)) {
  if (o_count != nullptr) o_count[c] = n;
  if (o_mean != nullptr) o_mean[c] = mean;
  if (o_var != nullptr) o_var[c] = var;
  const A invstd = A(1) / m_sqrt(var + eps);
  if (o_invstd != nullptr) o_invstd[c] = invstd;
  const A g1 = gamma != nullptr ? gamma[c] : A(1);
  const A b1 = beta != nullptr ? beta[c] : A(0);
  const A as = adj_scale != nullptr ? adj_scale[c] : A(1);
  const A ab = adj_bias != nullptr ? adj_bias[c] : A(0);
  A g, h;
  if (renorm_mean != nullptr) {
    // Batch renormalization: r and d from the pre-update renorm statistics.
    const A sd = m_sqrt(var + eps);
    const A rs = nan_max(renorm_std[c], m_sqrt(eps));
    const A r = nan_min(nan_max(sd / rs, rmin), rmax);
    const A d = nan_min(nan_max((mean - renorm_mean[c]) / rs, -dmax), dmax);
    if (o_r != nullptr) { o_r[c] = r; o_d[c] = d; }
    g = as * r * invstd;
    h = as * d + ab;
  } else {
    g = as * invstd;
    h = ab;
  }
  scale = g1 * g;
  shift = g1 * h + b1;
  if (o_scale != nullptr) { o_scale[c] = scale; o_shift[c] = shift; }
  if (o_g != nullptr) { o_g[c] = g; o_h[c] = h; }
  moving_update<A>(c, mean, var, n, eps, upd_a, bessel, mm_in, mm_out, mv_in, mv_out,
                   zd_biased, zd_factor, renorm_a, rn_mean_io, rn_std_io, moving_std_io);
}

// Backward coefficients of channel c from its sums S1 = sum(dy'),
// S2 = sum(dy' (x - mean)): writes dgamma and dbeta, returns k1 and k2 of
// dx = scale * dy' - w * (k1 + k2 * (x - mean)) (zero for inference).
template <typename A>
__device__ __forceinline__ void bwd_channel(int c, A s1, A s2, const A* count, const A* invstd, const A* scale,
                                            const A* g, const A* h, int training, A* dgamma, A* dbeta,
                                            A& k1, A& k2) {
  dgamma[c] = g[c] * s2 + h[c] * s1;
  dbeta[c] = s1;
  if (training) {
    const A nn = count[c];
    const A inv_n = nn > A(0) ? A(1) / nn : A(0);
    const A is = invstd[c];
    k1 = scale[c] * s1 * inv_n;
    k2 = scale[c] * is * is * s2 * inv_n;
  } else {
    k1 = A(0);
    k2 = A(0);
  }
}

// The last-block-done handshake of the fused statistics kernels (moments.cu).
// Every thread fences its partial writes to device scope before the block
// counts itself in; the block whose increment completes the group sees
// members - 1 and alone goes on (after a second fence, so that its loads
// see the other blocks' partials). Every thread of the block must call it.
__device__ __forceinline__ bool last_block_arrives(unsigned* counter, unsigned members) {
  __shared__ int sh_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0)
    sh_last = atomicAdd(counter, 1u) == members - 1u;
  __syncthreads();
  const bool last = sh_last != 0;
  if (last) __threadfence();
  return last;
}

// The fused finalize of channels c0 .. c0 + nch (partials in the layout of
// partial_index, written by other blocks of this launch: read through
// volatile, never from a stale or non-coherent cache). The block's threads
// act as cubn_bn_finalize's blocks do -- cw = min(32 bytes / sizeof(A),
// pow2 >= C) consecutive channels by threads / cw walkers, walker w merging
// partials w, w + walkers, ... (four loads in flight before their merges),
// then a fixed tree over the walkers; chunks of cw channels one after
// another -- so every channel is merged in exactly the order of the
// two-launch path (and of SyncBatchNorm's merge): bitwise its results.
// Then channel_stats and finalize_channel. Every thread must call it.
template <typename A>
__device__ __forceinline__ void merge_finalize_group(int c0, int nch, int C, int nparts, int fold,
                                                     const A* p_count, const A* p_mean, const A* p_m2,
                                                     const A* p_pivot, int weighted, CUBN_FINALIZE_PARAMS(A)) {
  __shared__ A sh[4 * CUBN_REDUCE_THREADS];
  const int nt = blockDim.x * blockDim.y * blockDim.z;
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int total = nparts * fold;
  int cw = 1;
  while (cw < C && cw < int(32 / sizeof(A))) cw <<= 1;
  const int walkers = nt / cw, lane = tid % cw, wk = tid / cw;
  const volatile A* vc = p_count;
  const volatile A* vm = p_mean;
  const volatile A* v2 = p_m2;
  const volatile A* vp = p_pivot;
  for (int cb = 0; cb < nch; cb += cw) {
    const int c = c0 + cb + lane;
    const bool has = cb + lane < nch;
    A n = A(0), mean = A(0), m2 = A(0), piv = A(0);
    if (has) {
      for (int p = wk; p < total; p += 4 * walkers) {
        A q[4][4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int pu = p + u * walkers;
          if (pu < total) {
            const i64 k = partial_index(pu, C, fold, c);
            q[u][0] = vc[k]; q[u][1] = vm[k]; q[u][2] = v2[k]; q[u][3] = vp[k];
          }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (p + u * walkers < total) chan_merge_pivot(n, mean, m2, piv, q[u][0], q[u][1], q[u][2], q[u][3]);
      }
    }
    sh[tid] = n; sh[nt + tid] = mean; sh[2 * nt + tid] = m2; sh[3 * nt + tid] = piv;
    __syncthreads();
    for (int s = walkers >> 1; s > 0; s >>= 1) {
      if (wk < s) {
        const int b = tid + s * cw;
        chan_merge_pivot(n, mean, m2, piv, sh[b], sh[nt + b], sh[2 * nt + b], sh[3 * nt + b]);
        sh[tid] = n; sh[nt + tid] = mean; sh[2 * nt + tid] = m2; sh[3 * nt + tid] = piv;
      }
      __syncthreads();
    }
    if (wk == 0 && has) {
      A var;
      channel_stats(n, mean, m2, var, piv, weighted);
      A scale, shift;
      finalize_channel<A>(c, n, mean, var, scale, shift, CUBN_FINALIZE_ARGS);
    }
  }
}
