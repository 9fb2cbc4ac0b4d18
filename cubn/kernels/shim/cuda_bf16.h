// cuda_bf16.h for the emulated backend: __nv_bfloat16 as the upper 16 bits of
// a float, converted with round-to-nearest-even.
#pragma once
#include "cuda_fp16.h"  // as CUDA's does; also brings CUBN_EMU_HALF_OPS

struct __align__(2) __nv_bfloat16 {
  unsigned short bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : bits(from_float(f)) {}
  __nv_bfloat16(double d) : bits(from_float(round_to_odd(d))) {}
  template <class I>
    requires std::is_integral_v<I>  // CUDA's integer constructors: `__nv_bfloat16 b = 0;` compiles
  __nv_bfloat16(I i) : __nv_bfloat16(static_cast<double>(i)) {}
  operator float() const { return std::bit_cast<float>(static_cast<unsigned int>(bits) << 16); }

  static unsigned short from_float(float f) {
    const unsigned int u = std::bit_cast<unsigned int>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)  // NaN: keep sign and top payload, force quiet
      return static_cast<unsigned short>((u >> 16) | 0x0040u);
    const unsigned int round = 0x7fffu + ((u >> 16) & 1u);  // ties to even
    return static_cast<unsigned short>((u + round) >> 16);
  }
  // double -> float rounding to odd, so that the float -> bfloat16 rounding
  // that follows gives the correctly rounded result (no double rounding).
  static float round_to_odd(double d) {
    const float f = static_cast<float>(d);
    if (static_cast<double>(f) == d || d != d) return f;
    unsigned int u = std::bit_cast<unsigned int>(f);
    if (std::fabs(static_cast<double>(f)) > std::fabs(d)) --u;  // truncate toward zero
    return std::bit_cast<float>(u | 1u);
  }
};
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2);

inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

CUBN_EMU_HALF_OPS(__nv_bfloat16)
