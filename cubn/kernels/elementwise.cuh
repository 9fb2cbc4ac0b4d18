// Position helpers of the elementwise kernels (normalize.cu, backward.cu's
// apply): which channel each element of a thread's vectors belongs to, found
// once per thread instead of once per vector.
//
// Element e of a flat (outer, C, inner) tensor has channel (e / inner) % C,
// a function of e modulo the period P = C * inner. A grid-stride loop moves
// each thread by S = gridDim.x * blockDim.x * VEC elements per iteration, so
// when the host makes S a multiple of P -- or launches enough threads that
// none has a second iteration -- every vector a thread touches has the same
// channels as its first one. The kernels then load the per-channel
// coefficients into registers before the loop and the loop itself does no
// index arithmetic beyond the vector's address (cubn/backends/kernel_backend.py,
// _elementwise_grid, sizes the grid for this).
//
// POS (template argument, chosen on the host):
//   POS_ELEMENT  every element's channel followed along (today's general walk;
//                the weighted backward, whose weight index runs with the
//                outer index and is not periodic in P);
//   POS_CHANNEL  each vector lies in one channel (inner % VEC == 0, or VEC 1),
//                fixed per thread: one set of coefficients;
//   POS_PATTERN  the vector's VEC elements have their own channels, fixed per
//                thread (channels-last data, inner not a multiple of VEC):
//                VEC sets of coefficients.
// IDX32: 32-bit flat indices, when n + S < 2^31 (the host checks).
#pragma once

#include "common.cuh"

enum { POS_ELEMENT = 0, POS_CHANNEL = 1, POS_PATTERN = 2 };

template <int IDX32> struct IndexOf { typedef i64 type; };
template <> struct IndexOf<1> { typedef int type; };

// Coefficient sets a thread keeps: one per channel its vectors can touch.
template <int POS, int VEC> struct CoefSets { enum { n = POS == POS_PATTERN ? VEC : 1 }; };

// The channels of elements e0 .. e0 + N - 1 (the tail past the tensor's end
// gets channels too: they index real coefficients and are never stored).
template <typename I, int N>
__device__ __forceinline__ void channels_from(I e0, I inner, int C, int (&c)[N]) {
  const I row = e0 / inner;
  I i = e0 - row * inner;
  int ch = int(row % C);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    c[k] = ch;
    if (++i == inner) {
      i = 0;
      if (++ch == C) ch = 0;
    }
  }
}

// The tail: the elements of the vector at e0 that exist (< n), one by one.
template <typename T, int N, typename I>
__device__ __forceinline__ void load_tail(Vec<T, N>& out, const T* p, I e0, I n) {
#pragma unroll
  for (int k = 0; k < N; ++k)
    if (e0 + k < n) out.v[k] = p[e0 + k];
}

template <typename T, int N, typename I>
__device__ __forceinline__ void store_tail(T* p, const Vec<T, N>& v, I e0, I n) {
#pragma unroll
  for (int k = 0; k < N; ++k)
    if (e0 + k < n) p[e0 + k] = v.v[k];
}

// A vector's elements in the accumulation type. bfloat16 -> float is the 16
// bits moved up (exact), one instruction per element from the 32-bit words
// (the generic conversion of a word's upper half takes two).
__device__ __forceinline__ float float_of_bits(unsigned u) {
#ifdef CUBN_EMULATED
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#else
  return __uint_as_float(u);
#endif
}

template <typename T, int N>
__device__ __forceinline__ void to_acc_vec(const Vec<T, N>& v, typename AccOf<T>::type (&a)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) a[k] = to_acc(v.v[k]);
}

template <int N>
__device__ __forceinline__ void to_acc_vec(const Vec<__nv_bfloat16, N>& v, float (&a)[N]) {
  if constexpr (N % 2 == 0) {
    unsigned w[N / 2];
#ifdef CUBN_EMULATED
    std::memcpy(w, &v, sizeof w);
#else
    const unsigned* p = reinterpret_cast<const unsigned*>(&v);
#pragma unroll
    for (int k = 0; k < N / 2; ++k) w[k] = p[k];
#endif
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      a[2 * k] = float_of_bits(w[k] << 16);
      a[2 * k + 1] = float_of_bits(w[k] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) a[k] = to_acc(v.v[k]);
  }
}
