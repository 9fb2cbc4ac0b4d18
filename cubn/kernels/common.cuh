// Shared device code for cubn's kernels: types, vector access, Welford/Chan
// merges, warp/block reductions, fused activations, and flat-index walking.
//
// Every kernel is compiled by NVRTC (CuPy) for the GPU and by g++ with
// shim/cuda_shim.h for the emulated backend, so this file keeps to the CUDA
// subset the shim models (see docs/emulator.md).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long i64;

// Launch constants and activation ids are stated once, in
// cubn/kernels/registry.py, and reach every compiler (NVRTC for the GPU, g++
// for the emulator) as -D defines: registry.define_options().
#if !defined(CUBN_REDUCE_THREADS) || !defined(CUBN_ELEMENTWISE_THREADS) || !defined(CUBN_FINALIZE_THREADS) || \
    !defined(CUBN_ONE_LAUNCH_THREADS) || !defined(CUBN_TRANSPOSE_THREADS) || !defined(CUBN_UNROLL) ||     \
    !defined(CUBN_ACT_NONE)
#error "cubn kernels need the -D options of cubn.kernels.registry.define_options()"
#endif

#ifdef CUBN_EMULATED
#define CUBN_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(cubn_emu::dynamic_shared())
#else
#define CUBN_DYNAMIC_SHARED(T, name) \
  extern __shared__ __align__(16) unsigned char cubn_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(cubn_dyn_smem_)
#endif

// ---------------------------------------------------------------------------
// Types: statistics accumulate in float for 16-bit inputs, else in T itself.
// ---------------------------------------------------------------------------
template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> struct Out;
template <> struct Out<float> { __device__ static float cast(float v) { return v; } };
template <> struct Out<double> { __device__ static double cast(double v) { return v; } };
template <> struct Out<__half> { __device__ static __half cast(float v) { return __float2half_rn(v); } };
template <> struct Out<__nv_bfloat16> {
  __device__ static __nv_bfloat16 cast(float v) { return __float2bfloat16_rn(v); }
};

// 16-byte vectors: VEC = 16 / sizeof(T) elements per load when aligned.
template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// A full vector at flat index e0, or the elements of it that exist (< n)
// when the tensor ends inside it; missing elements are left unset.
template <typename T, int N>
__device__ __forceinline__ void load_or_tail(Vec<T, N>& out, const T* p, i64 e0, i64 n, bool full) {
  if (full) {
    out = load_vec<T, N>(p + e0);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (e0 + k < n) out.v[k] = p[e0 + k];
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_or_tail(T* p, const Vec<T, N>& v, i64 e0, i64 n, bool full) {
  if (full) {
    store_vec<T, N>(p + e0, v);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (e0 + k < n) p[e0 + k] = v.v[k];
  }
}

// ---------------------------------------------------------------------------
// Welford triples and Chan's merge: never E[x^2] - E[x]^2.
// ---------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ bool is_finite(A v) { return v - v == A(0); }  // false for Inf and NaN

// Merge of two arbitrary triples. A side of count 0 holds nothing, whatever
// its mean says: it is skipped, never averaged in. A non-finite mean marks
// data with Inf/NaN: the merged mean is the sum of the non-finite means (as a
// plain sum of the data: Inf + Inf = Inf, Inf - Inf = NaN) and M2 is NaN.
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& mean, A& m2, A nb, A mb, A m2b) {
  if (nb == A(0)) return;
  if (n == A(0)) { n = nb; mean = mb; m2 = m2b; return; }
  const A nn = n + nb;
  if (!(is_finite(mean) && is_finite(mb))) {
    const A bad = (is_finite(mean) ? A(0) : mean) + (is_finite(mb) ? A(0) : mb);
    m2 = bad - bad;  // NaN
    mean = bad;
    n = nn;
    return;
  }
  A delta = mb - mean;
  A fb = nb / nn;
  mean += delta * fb;
  m2 += m2b + delta * delta * n * fb;
  n = nn;
}

// The same for triples whose means are relative to pivots p and pb (the
// first element each accumulation saw): b is re-expressed about p, exactly
// for nearby pivots; an empty a takes b's pivot with its data.
template <typename A>
__device__ __forceinline__ void chan_merge_pivot(A& n, A& mean, A& m2, A& p, A nb, A mb, A m2b, A pb) {
  if (nb == A(0)) return;
  if (n == A(0)) { n = nb; mean = mb; m2 = m2b; p = pb; return; }
  chan_merge(n, mean, m2, nb, mb + (pb - p), m2b);
}

// The merge inside a thread's own accumulation: nb > 0, and (0, 0, 0) as the
// empty start is exact (mean + (mb - 0) * 1 == mb). Non-finite data are
// handled after the loop (see moments.cu).
template <typename A>
__device__ __forceinline__ void chan_merge_live(A& n, A& mean, A& m2, A nb, A mb, A m2b) {
  A nn = n + nb;
  A delta = mb - mean;
  A fb = nb / nn;
  mean += delta * fb;
  m2 += m2b + delta * delta * n * fb;
  n = nn;
}

// Tree merge over the 32 lanes; the result is valid in lane 0.
template <typename A>
__device__ __forceinline__ void warp_chan_merge(A& n, A& mean, A& m2) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    A nb = __shfl_down_sync(0xffffffffu, n, off);
    A mb = __shfl_down_sync(0xffffffffu, mean, off);
    A m2b = __shfl_down_sync(0xffffffffu, m2, off);
    chan_merge(n, mean, m2, nb, mb, m2b);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide Chan merge for 1-D blocks (blockDim.x a multiple of 32, <= 1024);
// the result is valid in thread 0. `sh` holds 3 * 32 values.
template <typename A>
__device__ __forceinline__ void block_chan_merge(A& n, A& mean, A& m2, A* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  warp_chan_merge(n, mean, m2);
  if (lane == 0) { sh[wid] = n; sh[32 + wid] = mean; sh[64 + wid] = m2; }
  __syncthreads();
  if (wid == 0) {
    n = lane < nw ? sh[lane] : A(0);
    mean = lane < nw ? sh[32 + lane] : A(0);
    m2 = lane < nw ? sh[64 + lane] : A(0);
    warp_chan_merge(n, mean, m2);
  }
}

// Block-wide sum of two values for 1-D blocks; valid in thread 0. `sh`: 2 * 32.
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b, A* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) { sh[wid] = a; sh[32 + wid] = b; }
  __syncthreads();
  if (wid == 0) {
    a = warp_sum(lane < nw ? sh[lane] : A(0));
    b = warp_sum(lane < nw ? sh[32 + lane] : A(0));
  }
}

// Column sums for 2-D blocks: s1 and s2 (VEC columns per thread) are stored
// in shared memory as [blockDim.y][width] and summed over the rows ty in a
// fixed tree (blockDim.y a power of two); the totals of column j end in
// p1[j], p2[j]. Every thread of the block must call it.
template <typename A, int VEC>
__device__ __forceinline__ void column_sum2(const A* s1, const A* s2, A* p1, A* p2, int width) {
  const int tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    p1[ty * width + tx * VEC + e] = s1[e];
    p2[ty * width + tx * VEC + e] = s2[e];
  }
  __syncthreads();
  for (int h = blockDim.y >> 1; h > 0; h >>= 1) {
    if (ty < h) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int a = ty * width + tx * VEC + e, b = (ty + h) * width + tx * VEC + e;
        p1[a] += p1[b];
        p2[a] += p2[b];
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Activations (ids: cubn/activations.py, as CUBN_ACT_* defines). fwd: act(z); grad: act'(z).
// ---------------------------------------------------------------------------
enum { ACT_NONE = CUBN_ACT_NONE, ACT_RELU = CUBN_ACT_RELU, ACT_RELU6 = CUBN_ACT_RELU6,
       ACT_LEAKY_RELU = CUBN_ACT_LEAKY_RELU, ACT_ELU = CUBN_ACT_ELU, ACT_SIGMOID = CUBN_ACT_SIGMOID,
       ACT_TANH = CUBN_ACT_TANH, ACT_GELU = CUBN_ACT_GELU, ACT_GELU_TANH = CUBN_ACT_GELU_TANH,
       ACT_SILU = CUBN_ACT_SILU };

__device__ __forceinline__ float m_exp(float v) { return expf(v); }
__device__ __forceinline__ double m_exp(double v) { return exp(v); }
__device__ __forceinline__ float m_expm1(float v) { return expm1f(v); }
__device__ __forceinline__ double m_expm1(double v) { return expm1(v); }
__device__ __forceinline__ float m_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double m_tanh(double v) { return tanh(v); }
__device__ __forceinline__ float m_erf(float v) { return erff(v); }
__device__ __forceinline__ double m_erf(double v) { return erf(v); }
__device__ __forceinline__ float m_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double m_sqrt(double v) { return sqrt(v); }
// 1 / v rounded to nearest: the value of A(1) / v, without the general
// division's numerator scaling and fix-up (fewer SASS instructions in the
// channels-first statistics loop; the channels-last one counts fewer with the division)
__device__ __forceinline__ float m_rcp(float v) { return __frcp_rn(v); }
__device__ __forceinline__ double m_rcp(double v) { return __drcp_rn(v); }
__device__ __forceinline__ float m_rsqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double m_rsqrt(double v) { return rsqrt(v); }
__device__ __forceinline__ float m_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double m_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float m_min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double m_min(double a, double b) { return fmin(a, b); }

template <typename A>
__device__ __forceinline__ A sigmoid(A z) {
  // exp of -|z| never overflows
  A e = m_exp(-(z < A(0) ? -z : z));
  return z >= A(0) ? A(1) / (A(1) + e) : e / (A(1) + e);
}

template <int ACT, typename A>
__device__ __forceinline__ A act_fwd(A z, A alpha) {
  if (ACT == ACT_NONE) return z;
  // Written so that a NaN falls through to z (as NumPy's maximum/minimum keep NaN).
  if (ACT == ACT_RELU) return z < A(0) ? A(0) : z;
  if (ACT == ACT_RELU6) return z < A(0) ? A(0) : (z > A(6) ? A(6) : z);
  if (ACT == ACT_LEAKY_RELU) return z > A(0) ? z : alpha * z;
  if (ACT == ACT_ELU) return z > A(0) ? z : alpha * m_expm1(z);
  if (ACT == ACT_SIGMOID) return sigmoid(z);
  if (ACT == ACT_TANH) return m_tanh(z);
  if (ACT == ACT_GELU) return A(0.5) * z * (A(1) + m_erf(z * A(0.70710678118654752440)));
  if (ACT == ACT_GELU_TANH) {
    const A k = A(0.79788456080286535588), c = A(0.044715);
    return A(0.5) * z * (A(1) + m_tanh(k * (z + c * z * z * z)));
  }
  if (ACT == ACT_SILU) return z * sigmoid(z);
  return z;
}

template <int ACT, typename A>
__device__ __forceinline__ A act_grad(A z, A alpha) {
  if (ACT == ACT_NONE) return A(1);
  if (ACT == ACT_RELU) return z > A(0) ? A(1) : A(0);
  if (ACT == ACT_RELU6) return (z > A(0) && z < A(6)) ? A(1) : A(0);
  if (ACT == ACT_LEAKY_RELU) return z > A(0) ? A(1) : alpha;
  if (ACT == ACT_ELU) return z > A(0) ? A(1) : alpha * m_exp(z);
  if (ACT == ACT_SIGMOID) { A s = sigmoid(z); return s * (A(1) - s); }
  if (ACT == ACT_TANH) { A t = m_tanh(z); return A(1) - t * t; }
  if (ACT == ACT_GELU) {
    A cdf = A(0.5) * (A(1) + m_erf(z * A(0.70710678118654752440)));
    A pdf = A(0.39894228040143267794) * m_exp(A(-0.5) * z * z);
    return cdf + z * pdf;
  }
  if (ACT == ACT_GELU_TANH) {
    const A k = A(0.79788456080286535588), c = A(0.044715);
    A t = m_tanh(k * (z + c * z * z * z));
    return A(0.5) * (A(1) + t) + A(0.5) * z * (A(1) - t * t) * k * (A(1) + A(3) * c * z * z);
  }
  if (ACT == ACT_SILU) { A s = sigmoid(z); return s * (A(1) + z * (A(1) - s)); }
  return A(1);
}

// ---------------------------------------------------------------------------
// Walking a flat (outer, C, inner) index: channel and weight index of each
// element, with divisions only once per thread-step.
// ---------------------------------------------------------------------------
struct FlatPos {
  i64 i;     // position inside the inner run
  int c;     // channel
  i64 w;     // weight index (outer index / wdiv)
  i64 wrem;  // outer index % wdiv

  __device__ __forceinline__ void seek(i64 e, i64 inner, int C, i64 wdiv) {
    i64 row = e / inner;
    i = e - row * inner;
    i64 o = row / C;
    c = int(row - o * C);
    w = o / wdiv;
    wrem = o - w * wdiv;
  }
  __device__ __forceinline__ void next(i64 inner, int C, i64 wdiv) {
    if (++i == inner) {
      i = 0;
      if (++c == C) {
        c = 0;
        if (++wrem == wdiv) { wrem = 0; ++w; }
      }
    }
  }
};
