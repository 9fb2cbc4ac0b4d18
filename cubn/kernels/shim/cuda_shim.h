// cuda_shim.h: the CUDA programming model on the CPU, for the `emulated` backend.
//
// Force-included (g++ -include cuda_shim.h) in front of a kernel source file so
// that the very .cu file nvcc/NVRTC compiles also builds with the host C++
// compiler.  What the kernels see is defined here; the machinery behind it (the
// thread pool, barriers, warp exchange, watchdog) lives in emu_runtime.cpp,
// built once per process into its own shared object and handed to each kernel
// library through cubn_emu_bind().  docs/emulator.md explains the model and
// what it does not model.
#pragma once

#define CUBN_EMULATED 1

// Every standard header comes first: once `__noinline__` is a macro below,
// libstdc++ headers that spell `__attribute__((__noinline__))` no longer parse.
// Kernels may include any of these again (include guards make that a no-op).
#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <math.h>  // libstdc++'s math.h puts the float overloads (sqrt(float), isnan...) in the global namespace, as CUDA does
#include <memory>
#include <new>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Blocks run one after another, so one static instance per __shared__
// variable is exactly one per running block.
#define __shared__ static
// (__restrict__ is native to g++.)

// ---------------------------------------------------------------- vector types
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(16) double2 { double x, y; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned int x, y; };
struct __align__(16) uint4 { unsigned int x, y, z, w; };
struct __align__(4) ushort2 { unsigned short x, y; };
struct __align__(8) ushort4 { unsigned short x, y, z, w; };
struct __align__(16) longlong2 { long long x, y; };
struct __align__(16) ulonglong2 { unsigned long long x, y; };

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline ushort4 make_ushort4(unsigned short x, unsigned short y, unsigned short z, unsigned short w) { return {x, y, z, w}; }

// ---------------------------------------------------------------- runtime ABI
// The interface between a kernel library and the runtime library.  Plain C so
// that the two shared objects need nothing from each other but this table.
extern "C" {
struct cubn_emu_job {
  const char* kernel_name;
  unsigned grid[3];
  unsigned block[3];
  size_t shared_bytes;
  void* ctx;
  // On the launching thread, before the block's threads start.
  void (*begin_block)(void* ctx, const unsigned* block_idx, unsigned char* dynamic_shared);
  // On a worker thread: run the kernel as thread `linear` of the current block.
  void (*run_thread)(void* ctx, unsigned linear);
};

struct cubn_emu_runtime_api {
  unsigned abi_version;
  int (*launch)(const cubn_emu_job* job, char* err, size_t errlen);
  void (*syncthreads)(const char* file, unsigned line);
  void (*syncwarp)(const char* file, unsigned line);
  // mode: 0 idx, 1 up, 2 down, 3 xor.  Returns the source lane's 8 bytes, or all 0xFF.
  unsigned long long (*shuffle)(unsigned long long bits, int mode, unsigned b, int width,
                                const char* file, unsigned line);
  // Returns (lanes that took part << 32) | (lanes whose predicate was non-zero).
  unsigned long long (*vote)(int predicate, const char* file, unsigned line);
};
}
#define CUBN_EMU_ABI_VERSION 1u
#define CUBN_EMU_EXPORT __attribute__((visibility("default")))

// ---------------------------------------------------------------- built-in variables
inline thread_local uint3 threadIdx;
// Set by the launching thread before each block; the block's threads read
// them after the runtime's release/acquire hand-off.
inline uint3 blockIdx;
inline uint3 blockDim;
inline uint3 gridDim;

namespace cubn_emu {
inline const cubn_emu_runtime_api* rt = nullptr;
inline unsigned char* dynamic_shared_ptr = nullptr;
inline int warp_size_value() { return 32; }

// The launch's dynamic shared memory: exactly shared_bytes, 16-byte aligned,
// refilled with 0xFF before each block.  Used by CUBN_DYNAMIC_SHARED.
inline unsigned char* dynamic_shared() { return dynamic_shared_ptr; }
}  // namespace cubn_emu

// Not a constant expression on the GPU either (warpSize is a runtime value
// there): a kernel that sizes an array with it must fail here as under nvcc.
inline const int warpSize = cubn_emu::warp_size_value();

// ---------------------------------------------------------------- synchronisation
inline void __syncthreads(std::source_location at = std::source_location::current()) {
  cubn_emu::rt->syncthreads(at.file_name(), at.line());
}
// The mask is not modelled: every live lane of the warp must take part.
inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu,
                       std::source_location at = std::source_location::current()) {
  cubn_emu::rt->syncwarp(at.file_name(), at.line());
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---------------------------------------------------------------- warp shuffles and votes
namespace cubn_emu {
template <class T>
T shuffle(int mode, T var, unsigned b, int width, const std::source_location& at) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
  unsigned long long bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = rt->shuffle(bits, mode, b, width, at.file_name(), at.line());
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace cubn_emu

// One overload per type, as CUDA declares them, so that arguments convert the
// same way they do under nvcc.
#define CUBN_EMU_SHUFFLES(T)                                                                    \
  inline T __shfl_sync(unsigned, T var, int srcLane, int width = warpSize,                      \
                       std::source_location at = std::source_location::current()) {             \
    return cubn_emu::shuffle<T>(0, var, static_cast<unsigned>(srcLane), width, at);             \
  }                                                                                             \
  inline T __shfl_up_sync(unsigned, T var, unsigned delta, int width = warpSize,                \
                          std::source_location at = std::source_location::current()) {          \
    return cubn_emu::shuffle<T>(1, var, delta, width, at);                                      \
  }                                                                                             \
  inline T __shfl_down_sync(unsigned, T var, unsigned delta, int width = warpSize,              \
                            std::source_location at = std::source_location::current()) {        \
    return cubn_emu::shuffle<T>(2, var, delta, width, at);                                      \
  }                                                                                             \
  inline T __shfl_xor_sync(unsigned, T var, int laneMask, int width = warpSize,                 \
                           std::source_location at = std::source_location::current()) {         \
    return cubn_emu::shuffle<T>(3, var, static_cast<unsigned>(laneMask), width, at);            \
  }
CUBN_EMU_SHUFFLES(int)
CUBN_EMU_SHUFFLES(unsigned int)
CUBN_EMU_SHUFFLES(long)
CUBN_EMU_SHUFFLES(unsigned long)
CUBN_EMU_SHUFFLES(long long)
CUBN_EMU_SHUFFLES(unsigned long long)
CUBN_EMU_SHUFFLES(float)
CUBN_EMU_SHUFFLES(double)

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location at = std::source_location::current()) {
  return static_cast<unsigned>(cubn_emu::rt->vote(predicate, at.file_name(), at.line())) & mask;
}
inline int __any_sync(unsigned mask, int predicate,
                      std::source_location at = std::source_location::current()) {
  return (static_cast<unsigned>(cubn_emu::rt->vote(predicate, at.file_name(), at.line())) & mask) != 0;
}
inline int __all_sync(unsigned mask, int predicate,
                      std::source_location at = std::source_location::current()) {
  const unsigned long long v = cubn_emu::rt->vote(predicate, at.file_name(), at.line());
  const unsigned took_part = static_cast<unsigned>(v >> 32) & mask;
  return (static_cast<unsigned>(v) & took_part) == took_part;
}

// ---------------------------------------------------------------- atomics
// seq_cst, stronger than the GPU's relaxed atomics; see docs/emulator.md.
namespace cubn_emu {
template <class T, class... U>
concept one_of = (std::is_same_v<T, U> || ...);
template <class T>
concept atomic_int = one_of<T, int, unsigned int, unsigned long long>;
}  // namespace cubn_emu

template <class T>
  requires cubn_emu::atomic_int<T> || cubn_emu::one_of<T, float, double>
T atomicAdd(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_add(val);
}
template <cubn_emu::atomic_int T>
T atomicSub(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_sub(val);
}
template <class T>
  requires cubn_emu::atomic_int<T> || std::is_same_v<T, float>
T atomicExch(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).exchange(val);
}
template <cubn_emu::atomic_int T>
T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> val) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, val);
  return compare;  // the old value, whether or not it was replaced
}
template <cubn_emu::atomic_int T>
T atomicMax(T* address, std::type_identity_t<T> val) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (old < val && !a.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <cubn_emu::atomic_int T>
T atomicMin(T* address, std::type_identity_t<T> val) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (val < old && !a.compare_exchange_weak(old, val)) {
  }
  return old;
}

// ---------------------------------------------------------------- loads
template <class T>
T __ldg(const T* p) { return *p; }

// ---------------------------------------------------------------- math
// CPU results are correctly rounded where CUDA's fast versions are not
// (rsqrtf, __expf...): compare across backends with last-bit tolerances.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline double __dsqrt_rn(double x) { return std::sqrt(x); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

// CUDA's global min/max overloads, mixed signedness included (the result is
// the unsigned type, as in CUDA's math_functions.hpp).
#define CUBN_EMU_MINMAX(R, A, B)                                               \
  inline R min(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); } \
  inline R max(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(b) : static_cast<R>(a); }
CUBN_EMU_MINMAX(int, int, int)
CUBN_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
CUBN_EMU_MINMAX(unsigned int, int, unsigned int)
CUBN_EMU_MINMAX(unsigned int, unsigned int, int)
CUBN_EMU_MINMAX(long, long, long)
CUBN_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
CUBN_EMU_MINMAX(unsigned long, long, unsigned long)
CUBN_EMU_MINMAX(unsigned long, unsigned long, long)
CUBN_EMU_MINMAX(long long, long long, long long)
CUBN_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
CUBN_EMU_MINMAX(unsigned long long, long long, unsigned long long)
CUBN_EMU_MINMAX(unsigned long long, unsigned long long, long long)
#undef CUBN_EMU_MINMAX
// Floating min/max follow fminf/fmax: a NaN operand yields the other one.
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin(static_cast<double>(a), b); }
inline double max(float a, double b) { return std::fmax(static_cast<double>(a), b); }
inline double min(double a, float b) { return std::fmin(a, static_cast<double>(b)); }
inline double max(double a, float b) { return std::fmax(a, static_cast<double>(b)); }

// ---------------------------------------------------------------- integer intrinsics
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __popc(unsigned int x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}

// ---------------------------------------------------------------- launching
namespace cubn_emu {

// Parameter descriptions for Python's argument checks: "p" pointer,
// i/u/f + size in bytes.
template <class P>
constexpr const char* param_code() {
  if constexpr (std::is_pointer_v<P> || std::is_null_pointer_v<P>) return "p";
  else if constexpr (std::is_same_v<P, float>) return "f4";
  else if constexpr (std::is_same_v<P, double>) return "f8";
  else if constexpr (std::is_integral_v<P> && !std::is_same_v<P, bool> && sizeof(P) == 4)
    return std::is_signed_v<P> ? "i4" : "u4";
  else if constexpr (std::is_integral_v<P> && !std::is_same_v<P, bool> && sizeof(P) == 8)
    return std::is_signed_v<P> ? "i8" : "u8";
  else {
    static_assert(sizeof(P) == 0,
                  "emulated backend: kernel parameters must be pointers or 32/64-bit integers, "
                  "float or double");
    return "";
  }
}

template <class... P>
const char* signature(void (*)(P...)) {
  static const std::string s = [] {
    std::string out;
    ((out += out.empty() ? "" : ",", out += param_code<P>()), ...);
    return out;
  }();
  return s.c_str();
}

template <class... P>
struct LaunchContext {
  void (*kernel)(P...);
  std::tuple<P...> args;
  uint3 grid, block;
};

template <class Ctx>
void begin_block(void* ctx, const unsigned* idx, unsigned char* dynamic_shared) {
  auto* c = static_cast<Ctx*>(ctx);
  blockIdx = {idx[0], idx[1], idx[2]};
  blockDim = c->block;
  gridDim = c->grid;
  dynamic_shared_ptr = dynamic_shared;
}

template <class Ctx>
void run_thread(void* ctx, unsigned linear) {
  auto* c = static_cast<Ctx*>(ctx);
  const unsigned bx = c->block.x, by = c->block.y;
  threadIdx = {linear % bx, (linear / bx) % by, linear / (bx * by)};
  std::apply(c->kernel, c->args);  // each thread gets its own copies of the arguments
}

template <class... P, size_t... I>
std::tuple<P...> unpack(void** args, std::index_sequence<I...>) {
  return std::tuple<P...>{*static_cast<P*>(args[I])...};
}

// Like cuLaunchKernel: args[k] points to the k-th argument's value.
template <class... P>
int launch(const char* name, void (*kernel)(P...), const unsigned* grid, const unsigned* block,
           size_t shared_bytes, void** args, char* err, size_t errlen) {
  if (rt == nullptr) {
    std::snprintf(err, errlen, "kernel library used before cubn_emu_bind()");
    return 1;
  }
  using Ctx = LaunchContext<P...>;
  Ctx ctx{kernel, unpack<P...>(args, std::index_sequence_for<P...>{}),
          {grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]}};
  const cubn_emu_job job{name,         {grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]},
                         shared_bytes, &ctx,        &begin_block<Ctx>,
                         &run_thread<Ctx>};
  return rt->launch(&job, err, errlen);
}

inline int bind(const cubn_emu_runtime_api* api) {
  if (api == nullptr || api->abi_version != CUBN_EMU_ABI_VERSION) return 1;
  rt = api;
  return 0;
}

}  // namespace cubn_emu
