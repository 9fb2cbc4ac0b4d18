// cuda_fp16.h for the emulated backend: __half as the host compiler's
// _Float16 (IEEE binary16; conversions round to nearest even).
#pragma once

struct __align__(2) __half {
  _Float16 value;
  __half() = default;
  __half(float f) : value(static_cast<_Float16>(f)) {}
  __half(double d) : value(static_cast<_Float16>(d)) {}  // one rounding, as __double2half
  template <class I>
    requires std::is_integral_v<I>  // CUDA's integer constructors: `__half h = 0;` compiles
  __half(I i) : value(static_cast<_Float16>(i)) {}
  operator float() const { return static_cast<float>(value); }
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2);

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }

// Half arithmetic gives a __half, as with CUDA's operators.  Computing in float
// and rounding once is exact for + - * / of two halves.
#define CUBN_EMU_HALF_OPS(H)                                                              \
  inline H operator+(H a, H b) { return H(float(a) + float(b)); }                         \
  inline H operator-(H a, H b) { return H(float(a) - float(b)); }                         \
  inline H operator*(H a, H b) { return H(float(a) * float(b)); }                         \
  inline H operator/(H a, H b) { return H(float(a) / float(b)); }                         \
  inline H operator-(H a) { return H(-float(a)); }                                        \
  inline H& operator+=(H& a, H b) { return a = a + b; }                                   \
  inline H& operator-=(H& a, H b) { return a = a - b; }                                   \
  inline H& operator*=(H& a, H b) { return a = a * b; }                                   \
  inline H& operator/=(H& a, H b) { return a = a / b; }                                   \
  inline bool operator==(H a, H b) { return float(a) == float(b); }                       \
  inline bool operator!=(H a, H b) { return float(a) != float(b); }                       \
  inline bool operator<(H a, H b) { return float(a) < float(b); }                         \
  inline bool operator>(H a, H b) { return float(a) > float(b); }                         \
  inline bool operator<=(H a, H b) { return float(a) <= float(b); }                       \
  inline bool operator>=(H a, H b) { return float(a) >= float(b); }                       \
  inline H __shfl_sync(unsigned, H v, int l, int w = warpSize,                          \
                       std::source_location at = std::source_location::current()) {       \
    return cubn_emu::shuffle<H>(0, v, static_cast<unsigned>(l), w, at);                   \
  }                                                                                       \
  inline H __shfl_up_sync(unsigned, H v, unsigned d, int w = warpSize,                  \
                          std::source_location at = std::source_location::current()) {    \
    return cubn_emu::shuffle<H>(1, v, d, w, at);                                          \
  }                                                                                       \
  inline H __shfl_down_sync(unsigned, H v, unsigned d, int w = warpSize,                \
                            std::source_location at = std::source_location::current()) {  \
    return cubn_emu::shuffle<H>(2, v, d, w, at);                                          \
  }                                                                                       \
  inline H __shfl_xor_sync(unsigned, H v, int l, int w = warpSize,                      \
                           std::source_location at = std::source_location::current()) {   \
    return cubn_emu::shuffle<H>(3, v, static_cast<unsigned>(l), w, at);                   \
  }

CUBN_EMU_HALF_OPS(__half)
