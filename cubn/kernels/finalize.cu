// Per-channel finalize steps. Blocks are (bx, by): bx consecutive channels
// (32 bytes of each partial row, one sector) by `by` walkers, so a warp
// reads whole sectors of several partial rows; each walker merges every
// by-th partial of its channel, then the walkers merge in a fixed tree:
//   cubn_bn_finalize  merges the Welford partials of a channel (Chan, fixed
//                     order), adds the pivot back, then writes mean, biased
//                     variance, 1/std, the folded normalization coefficients
//                     and, when asked, the moving-statistics update -- all in
//                     one launch, so no statistic goes back to the host.
//   cubn_bn_update    the same moving-statistics update, later, from saved
//                     batch statistics (deferred UPDATE_OPS).
//   cubn_bwd_finalize merges the backward partial sums and turns them into
//                     d gamma, d beta and the two dx coefficients.
// Partial p of channel c lives at row p / fold, column c + (p % fold) * C of
// a (rows, C * fold) array; its mean is relative to its pivot (the same
// layout), and merges re-express it about a common one. The order of every merge depends only on the
// shapes: results are bitwise reproducible.
#include "finalize.cuh"

// Sum the backward partial sums of channel c the same way; valid in ty == 0.
template <typename A>
__device__ __forceinline__ void sum_channel(int c, int C, int nparts, int fold, const A* s1p, const A* s2p,
                                            A& s1, A& s2) {
  __shared__ A sh[2 * CUBN_FINALIZE_THREADS];
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  s1 = A(0); s2 = A(0);
  const int total = nparts * fold;
  if (c < C) {
    for (int p = ty; p < total; p += by) {
      const i64 k = partial_index(p, C, fold, c);
      s1 += s1p[k];
      s2 += s2p[k];
    }
  }
  const int nt = bx * by, idx = ty * bx + tx;
  sh[idx] = s1; sh[nt + idx] = s2;
  __syncthreads();
  for (int s = by >> 1; s > 0; s >>= 1) {
    if (ty < s) {
      s1 += sh[idx + s * bx];
      s2 += sh[nt + idx + s * bx];
      sh[idx] = s1; sh[nt + idx] = s2;
    }
    __syncthreads();
  }
}

template <typename A>
__global__ void __launch_bounds__(CUBN_FINALIZE_THREADS)
cubn_bn_finalize(int C, int nparts, int fold,
                 const A* p_count, const A* p_mean, const A* p_m2, const A* pivot, int weighted,
                 const A* given_mean, const A* given_var, CUBN_FINALIZE_PARAMS(A)) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  A n = A(0), mean = A(0), m2 = A(0), piv = A(0);
  if (p_count != nullptr) merge_channel(c, C, nparts, fold, p_count, p_mean, p_m2, pivot, n, mean, m2, piv);
  if (threadIdx.y != 0 || c >= C) return;
  A var;
  if (p_count != nullptr) {
    channel_stats(n, mean, m2, var, piv, weighted);
  } else {
    mean = given_mean[c];
    var = given_var[c];
  }
  A scale, shift;
  finalize_channel<A>(c, n, mean, var, scale, shift, CUBN_FINALIZE_ARGS);
}

template <typename A>
__global__ void __launch_bounds__(CUBN_FINALIZE_THREADS)
cubn_bn_update(int C, const A* mean, const A* var, const A* count, A eps,
               A upd_a, int bessel, const A* mm_in, A* mm_out, const A* mv_in, A* mv_out,
               A* zd_biased, A zd_factor, A renorm_a, A* rn_mean_io, A* rn_std_io, A* moving_std_io) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  moving_update<A>(c, mean[c], var[c], count[c], eps, upd_a, bessel, mm_in, mm_out, mv_in, mv_out,
                   zd_biased, zd_factor, renorm_a, rn_mean_io, rn_std_io, moving_std_io);
}

// dgamma = g * S2 + h * S1, dbeta = S1, and for training statistics
// k1 = scale * S1 / n, k2 = scale * invstd^2 * S2 / n, so that
// dx = scale * dy' - w * (k1 + k2 * (x - mean)).
template <typename A>
__global__ void __launch_bounds__(CUBN_FINALIZE_THREADS)
cubn_bwd_finalize(int C, int nparts, int fold, const A* s1p, const A* s2p,
                  const A* count, const A* invstd, const A* scale, const A* g, const A* h, int training,
                  A* dgamma, A* dbeta, A* k1, A* k2) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  A s1, s2;
  sum_channel(c, C, nparts, fold, s1p, s2p, s1, s2);
  if (threadIdx.y != 0 || c >= C) return;
  A a1, a2;
  bwd_channel<A>(c, s1, s2, count, invstd, scale, g, h, training, dgamma, dbeta, a1, a2);
  k1[c] = a1;
  k2[c] = a2;
}

// Merge the partials of each channel into one (count, mean - pivot, M2)
// triple -- what ranks exchange in SyncBatchNorm (empty channels stay
// (0, 0, 0)); o_pivot receives the pivot (0 without one).
template <typename A>
__global__ void __launch_bounds__(CUBN_FINALIZE_THREADS)
cubn_merge_partials(int C, int nparts, int fold, const A* p_count, const A* p_mean, const A* p_m2,
                    const A* pivot, A* o_count, A* o_mean, A* o_m2, A* o_pivot) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  A n, mean, m2, piv;
  merge_channel(c, C, nparts, fold, p_count, p_mean, p_m2, pivot, n, mean, m2, piv);
  if (threadIdx.y != 0 || c >= C) return;
  o_count[c] = n; o_mean[c] = mean; o_m2[c] = m2; o_pivot[c] = piv;
}

// Sum the backward partial sums of each channel (S1, S2).
template <typename A>
__global__ void __launch_bounds__(CUBN_FINALIZE_THREADS)
cubn_merge_sums(int C, int nparts, int fold, const A* s1p, const A* s2p, A* o1, A* o2) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  A s1, s2;
  sum_channel(c, C, nparts, fold, s1p, s2p, s1, s2);
  if (threadIdx.y == 0 && c < C) { o1[c] = s1; o2[c] = s2; }
}
