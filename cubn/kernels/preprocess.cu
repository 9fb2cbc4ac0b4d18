// Preprocessing kernels (cubn.preprocessing: RunningMoments, Standardizer,
// normalize_images):
//   cubn_moments_cl/_cf  moments.cu's Welford partials, instantiated here for
//                        uint8 / uint16 inputs (raw images are reduced as
//                        they are, each integer converted in registers) and
//                        for float32 inputs with double partials.
//   cubn_rm_merge        merges the partials of one batch into a running
//                        (count, mean, M2) state, in place, in float64: the
//                        second (and last) launch of RunningMoments.update.
//   cubn_pp_affine       y = (x - a[c]) / d[c] (INVERSE: y = x * d[c] + a[c]),
//                        elementwise in the input's layout, 16-byte vectors.
//   cubn_pp_transpose    the same arithmetic while transposing each
//                        (P, Q) matrix of a (B, P, Q) tensor: NHWC <-> NCHW.
// Arithmetic is in float (double when either side is float64) and written so
// that no compiler can contract it: a division, or __fmul_rn then an add.
// NumPy performs the same two IEEE operations, so integer and 16-bit inputs
// give bit-identical outputs on every backend (see docs/preprocessing.md).
#include "common.cuh"

// Must precede moments.cu: its templates find to_acc by ordinary lookup at
// their definition, and integers have no associated namespace for ADL.
__device__ __forceinline__ float to_acc(unsigned char v) { return float(v); }
__device__ __forceinline__ float to_acc(unsigned short v) { return float(v); }

// float32 data reduced with a double accumulator: the element type of a
// float array seen through this wrapper (same size and alignment) makes
// moments.cu's kernels keep double partials. A float partial mean is only
// good to ulp(|mean|)/2, which Chan's merges of many batches turn into
// variance errors of ~1e-4 at |mean|/std ~ 1e4; RunningMoments' state is
// float64 anyway.
struct __align__(4) cubn_f32_wide { float v; };
template <> struct AccOf<cubn_f32_wide> { typedef double type; };
__device__ __forceinline__ double to_acc(cubn_f32_wide x) { return double(x.v); }

#include "moments.cu"
#include "finalize.cuh"

// ---------------------------------------------------------------------------
// RunningMoments: merge one batch's partials into the state.
// ---------------------------------------------------------------------------
// Blocks as finalize.cu's (bx channels by `by` walkers, the partial layout of
// finalize.cuh): the walkers merge their partials in a fixed order, then a
// fixed tree (about common pivots), and thread (c, 0) adds the pivot back and merges the batch
// into the state: bitwise reproducible, no atomics. The state is float64
// whatever A is, so a count stays exact to 2^53 and long streams do not drift.
template <typename A>
__global__ void __launch_bounds__(CUBN_FINALIZE_THREADS)
cubn_rm_merge(int C, int nparts, int fold, const A* __restrict__ p_count, const A* __restrict__ p_mean,
              const A* __restrict__ p_m2, const A* __restrict__ pivot, double* s_count, double* s_mean,
              double* s_m2) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  double n, mean, m2, piv;
  merge_channel(c, C, nparts, fold, p_count, p_mean, p_m2, pivot, n, mean, m2, piv);
  if (threadIdx.y != 0 || c >= C) return;
  if (n > 0.0) mean = piv + mean;
  double sn = s_count[c], sm = s_mean[c], s2 = s_m2[c];
  chan_merge(sn, sm, s2, n, mean, m2);
  s_count[c] = sn;
  s_mean[c] = sm;
  s_m2[c] = s2;
}

// ---------------------------------------------------------------------------
// Fused conversion + per-channel affine map (+ layout change).
// ---------------------------------------------------------------------------
template <typename Tin, typename Tout> struct PpAcc { typedef float type; };
template <typename Tout> struct PpAcc<double, Tout> { typedef double type; };
template <typename Tin> struct PpAcc<Tin, double> { typedef double type; };
template <> struct PpAcc<double, double> { typedef double type; };

__device__ __forceinline__ float pp_load(unsigned char v) { return float(v); }
__device__ __forceinline__ float pp_load(unsigned short v) { return float(v); }
__device__ __forceinline__ float pp_load(__half v) { return __half2float(v); }
__device__ __forceinline__ float pp_load(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float pp_load(float v) { return v; }
__device__ __forceinline__ double pp_load(double v) { return v; }

__device__ __forceinline__ float pp_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double pp_mul_rn(double a, double b) { return __dmul_rn(a, b); }

// 16-bit outputs round once from a float (a double is rounded to float
// first, as NumPy's reference does it).
template <typename T> struct PpOut;
template <> struct PpOut<float> {
  template <typename A> __device__ static float cast(A v) { return float(v); }
};
template <> struct PpOut<double> {
  __device__ static double cast(double v) { return v; }
};
template <> struct PpOut<__half> {
  template <typename A> __device__ static __half cast(A v) { return __float2half_rn(float(v)); }
};
template <> struct PpOut<__nv_bfloat16> {
  template <typename A> __device__ static __nv_bfloat16 cast(A v) { return __float2bfloat16_rn(float(v)); }
};

// Forward: (x - a) / d -- a division, not a multiplication by 1/d, so the
// numbers are scikit-learn's (x - mean_) / scale_ and torchvision's
// (x - mean) / std. Inverse: x * d + a with an explicitly rounded product,
// which nvcc cannot fuse into an FMA (NumPy rounds the product too).
template <int INVERSE, typename A>
__device__ __forceinline__ A pp_apply(A v, A a, A d) {
  if (INVERSE) return pp_mul_rn(v, d) + a;
  return (v - a) / d;
}

// Same layout: element e of the (outer, C, inner) tensor has channel
// (e / inner) % C, tracked incrementally (FlatPos). VEC elements per access:
// the host picks VEC so both the Tin and the Tout vector are at most 16 bytes
// and aligned (VEC == 1 otherwise).
template <typename Tin, typename Tout, int INVERSE, int VEC>
__global__ void __launch_bounds__(CUBN_ELEMENTWISE_THREADS)
cubn_pp_affine(const Tin* __restrict__ x, Tout* __restrict__ y, i64 n, int C, i64 inner,
               const typename PpAcc<Tin, Tout>::type* __restrict__ a,
               const typename PpAcc<Tin, Tout>::type* __restrict__ d) {
  typedef typename PpAcc<Tin, Tout>::type A;
  const i64 nvec = (n + VEC - 1) / VEC;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  int cc = -1;  // channel whose coefficients are in registers
  A ca = A(0), cd = A(1);
  for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const i64 e0 = v * VEC;
    const bool full = e0 + VEC <= n;
    Vec<Tin, VEC> xv;
    Vec<Tout, VEC> yv;
    load_or_tail(xv, x, e0, n, full);
    FlatPos pos;
    pos.seek(e0, inner, C, 1);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (pos.c != cc) {
        cc = pos.c;
        ca = a[cc];
        cd = d[cc];
      }
      if (e0 + k < n) yv.v[k] = PpOut<Tout>::cast(pp_apply<INVERSE, A>(A(pp_load(xv.v[k])), ca, cd));
      pos.next(inner, C, 1);
    }
    store_or_tail(y, yv, e0, n, full);
  }
}

// x is (B, P, Q), y is (B, Q, P); the channel is q (CH_Q == 1: NHWC -> NCHW,
// P = H*W, Q = C) or p (CH_Q == 0: NCHW -> NHWC, P = C, Q = H*W).
// A block handles a TP x TQ tile of one batch item at a time: it reads the
// tile along q (coalesced), converts, and stages the results in shared
// memory (rows `pitch` = TQ | 1 words apart, so the column-wise reads below
// hit distinct banks), then writes it along p (coalesced). A tile of whole
// rows (TQ == Q: a few channels of many pixels) is one contiguous run and is
// read as such, so three-channel images use full vectors too.
// VEC > 1 (host-checked): TQ == Q and P*Q % VEC == 0 and TP*Q % VEC == 0, or
// TQ < Q and Q % VEC == 0 and TQ % VEC == 0; x aligned to VEC elements.
template <typename Tin, typename Tout, int CH_Q, int INVERSE, int VEC>
__global__ void __launch_bounds__(CUBN_TRANSPOSE_THREADS)
cubn_pp_transpose(const Tin* __restrict__ x, Tout* __restrict__ y, i64 B, i64 P, int Q, int TP, int TQ,
                  const typename PpAcc<Tin, Tout>::type* __restrict__ a,
                  const typename PpAcc<Tin, Tout>::type* __restrict__ d) {
  typedef typename PpAcc<Tin, Tout>::type A;
  CUBN_DYNAMIC_SHARED(A, sh);
  const int pitch = TQ | 1;
  const i64 ntp = (P + TP - 1) / TP;
  const i64 ntq = (Q + TQ - 1) / TQ;
  const i64 per_item = ntp * ntq;
  const i64 ntiles = B * per_item;
  for (i64 t = blockIdx.x; t < ntiles; t += gridDim.x) {  // block-uniform: barriers are safe
    const i64 b = t / per_item;
    const i64 rest = t - b * per_item;
    const i64 tp = rest / ntq;
    const i64 p0 = tp * TP;
    const int q0 = int(rest - tp * ntq) * TQ;
    const int np = int(P - p0 < TP ? P - p0 : TP);
    const int nq = Q - q0 < TQ ? Q - q0 : TQ;
    const Tin* xt = x + (b * P + p0) * Q + q0;
    if (nq == Q) {
      const int count = np * Q;
      for (int f = threadIdx.x * VEC; f < count; f += blockDim.x * VEC) {
        const Vec<Tin, VEC> v = load_vec<Tin, VEC>(xt + f);
        int r = f / Q, j = f - r * Q;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int c = CH_Q ? j : int(p0 + r);
          sh[r * pitch + j] = pp_apply<INVERSE, A>(A(pp_load(v.v[k])), a[c], d[c]);
          if (++j == Q) { j = 0; ++r; }
        }
      }
    } else {
      const int nqv = nq / VEC;
      const int count = np * nqv;
      for (int f = threadIdx.x; f < count; f += blockDim.x) {
        const int r = f / nqv, j0 = (f - r * nqv) * VEC;
        const Vec<Tin, VEC> v = load_vec<Tin, VEC>(xt + (i64)r * Q + j0);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int c = CH_Q ? q0 + j0 + k : int(p0 + r);
          sh[r * pitch + j0 + k] = pp_apply<INVERSE, A>(A(pp_load(v.v[k])), a[c], d[c]);
        }
      }
    }
    __syncthreads();
    Tout* yt = y + (b * Q + q0) * P + p0;
    const int count = np * nq;
    for (int f = threadIdx.x; f < count; f += blockDim.x) {
      const int j = f / np, r = f - j * np;
      yt[(i64)j * P + r] = PpOut<Tout>::cast(sh[r * pitch + j]);
    }
    __syncthreads();  // the next tile overwrites sh
  }
}
