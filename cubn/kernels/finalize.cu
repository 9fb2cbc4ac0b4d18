// Per-channel finalize steps, one warp per channel (4 channels per block):
//   cubn_bn_finalize  merges the Welford partials of a channel (Chan, fixed
//                     order), then writes mean, biased variance, 1/std, the
//                     folded normalization coefficients and, when asked, the
//                     moving-statistics update -- all in one launch, so no
//                     statistic goes back to the host.
//   cubn_bn_update    the same moving-statistics update, later, from saved
//                     batch statistics (deferred UPDATE_OPS).
//   cubn_bwd_finalize merges the backward partial sums and turns them into
//                     d gamma, d beta and the two dx coefficients.
// Partial p of channel c lives at row p / fold, column c + (p % fold) * C of
// a (rows, C * fold) array (fold > 1: the channels-last kernels folded
// several outer rows into one matrix row).
#include "finalize.cuh"

template <typename A>  // A unused: keeps one instantiation per accumulation type
__device__ __forceinline__ i64 partial_index(int p, int C, int fold, int c) {
  const int row = p / fold, m = p - row * fold;
  return (i64)row * C * fold + (i64)m * C + c;
}

// Chan-merge the partials of channel c across a warp (lane-strided, then a
// shuffle tree): a fixed order, so the result is reproducible. Valid in lane 0.
template <typename A>
__device__ __forceinline__ void merge_channel(int c, int C, int nparts, int fold, const A* p_count,
                                              const A* p_mean, const A* p_m2, A& n, A& mean, A& m2) {
  n = A(0); mean = A(0); m2 = A(0);
  const int total = nparts * fold;
  for (int p = (threadIdx.x & 31); p < total; p += 32) {
    const i64 k = partial_index<A>(p, C, fold, c);
    chan_merge(n, mean, m2, p_count[k], p_mean[k], p_m2[k]);
  }
  warp_chan_merge(n, mean, m2);
}

// Sum the backward partial sums of channel c across a warp. Valid in lane 0.
template <typename A>
__device__ __forceinline__ void sum_channel(int c, int C, int nparts, int fold, const A* s1p, const A* s2p,
                                            A& s1, A& s2) {
  s1 = A(0); s2 = A(0);
  const int total = nparts * fold;
  for (int p = (threadIdx.x & 31); p < total; p += 32) {
    const i64 k = partial_index<A>(p, C, fold, c);
    s1 += s1p[k];
    s2 += s2p[k];
  }
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
}

template <typename A>
__global__ void __launch_bounds__(CUBN_FINALIZE_THREADS)
cubn_bn_finalize(int C, int nparts, int fold,
                 const A* p_count, const A* p_mean, const A* p_m2,
                 const A* given_mean, const A* given_var, CUBN_FINALIZE_PARAMS(A)) {
  const int lane = threadIdx.x & 31;
  const int c = blockIdx.x * (CUBN_FINALIZE_THREADS / 32) + (threadIdx.x >> 5);
  if (c >= C) return;  // a whole warp leaves together
  A n = A(0), mean = A(0), m2 = A(0);
  if (p_count != nullptr) merge_channel(c, C, nparts, fold, p_count, p_mean, p_m2, n, mean, m2);
  if (lane != 0) return;
  A var;
  if (p_count != nullptr) {
    if (n > A(0)) {
      var = m_max(m2 / n, A(0));
    } else {  // no data: undefined statistics, as 0/0
      mean = m_sqrt(A(-1));
      var = mean;
    }
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
  const int lane = threadIdx.x & 31;
  const int c = blockIdx.x * (CUBN_FINALIZE_THREADS / 32) + (threadIdx.x >> 5);
  if (c >= C) return;
  A s1, s2;
  sum_channel(c, C, nparts, fold, s1p, s2p, s1, s2);
  if (lane != 0) return;
  A a1, a2;
  bwd_channel<A>(c, s1, s2, count, invstd, scale, g, h, training, dgamma, dbeta, a1, a2);
  k1[c] = a1;
  k2[c] = a2;
}

// Merge the partials of each channel into one (count, mean, M2) triple --
// what ranks exchange in SyncBatchNorm (empty channels stay (0, 0, 0)).
template <typename A>
__global__ void __launch_bounds__(CUBN_FINALIZE_THREADS)
cubn_merge_partials(int C, int nparts, int fold, const A* p_count, const A* p_mean, const A* p_m2,
                    A* o_count, A* o_mean, A* o_m2) {
  const int lane = threadIdx.x & 31;
  const int c = blockIdx.x * (CUBN_FINALIZE_THREADS / 32) + (threadIdx.x >> 5);
  if (c >= C) return;
  A n, mean, m2;
  merge_channel(c, C, nparts, fold, p_count, p_mean, p_m2, n, mean, m2);
  if (lane == 0) { o_count[c] = n; o_mean[c] = mean; o_m2[c] = m2; }
}

// Sum the backward partial sums of each channel (S1, S2).
template <typename A>
__global__ void __launch_bounds__(CUBN_FINALIZE_THREADS)
cubn_merge_sums(int C, int nparts, int fold, const A* s1p, const A* s2p, A* o1, A* o2) {
  const int lane = threadIdx.x & 31;
  const int c = blockIdx.x * (CUBN_FINALIZE_THREADS / 32) + (threadIdx.x >> 5);
  if (c >= C) return;
  A s1, s2;
  sum_channel(c, C, nparts, fold, s1p, s2p, s1, s2);
  if (lane == 0) { o1[c] = s1; o2[c] = s2; }
}
