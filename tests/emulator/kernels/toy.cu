// Toy kernels exercising every CUDA feature the emulator's shim promises
// (tests/emulator/test_shim.py checks each against NumPy).  Plain CUDA: this
// file is meant to compile under nvcc/NVRTC as well.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifdef CUBN_EMULATED
#define CUBN_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(cubn_emu::dynamic_shared())
#else
#define CUBN_DYNAMIC_SHARED(T, name) \
  extern __shared__ __align__(16) unsigned char cubn_dyn_smem_[]; T* name = reinterpret_cast<T*>(cubn_dyn_smem_)
#endif

__device__ __forceinline__ unsigned linear_thread() {
  return threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
}
__device__ __forceinline__ unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }

// A static __shared__ inside a device template helper.
template <class T>
__device__ T block_reduce_sum(T v) {
  __shared__ T buf[1024];
  const unsigned t = linear_thread(), n = block_threads();
  buf[t] = v;
  __syncthreads();
  unsigned p = 1;
  while (p < n) p <<= 1;
  for (unsigned s = p / 2; s > 0; s >>= 1) {
    if (t < s && t + s < n) buf[t] += buf[t + s];
    __syncthreads();
  }
  const T total = buf[0];
  __syncthreads();  // buf is reused by the next call
  return total;
}

// One partial sum per block, any block shape.
template <class T>
__global__ void __launch_bounds__(1024) block_sum(const T* __restrict__ x, T* __restrict__ out, long long n) {
  const unsigned long long block = blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned long long i = block * block_threads() + linear_thread();
  const T total = block_reduce_sum<T>(i < (unsigned long long)n ? __ldg(x + i) : T(0));
  if (linear_thread() == 0) out[block] = total;
}

// ------------------------------------------------------------------ Welford
template <class T>
struct Welford {
  T count, mean, m2;
};

// Chan et al.'s merge of two partial (count, mean, M2).
template <class T>
__device__ __forceinline__ Welford<T> merge(Welford<T> a, Welford<T> b) {
  const T count = a.count + b.count;
  if (count == T(0)) return a;
  const T delta = b.mean - a.mean;
  const T wb = b.count / count;
  return {count, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

// Row r of x (rows x cols) -> out[3r..3r+2] = (count, mean, M2).  One block per
// row; per-thread Welford, warp merge by __shfl_down_sync, then across warps
// through __shared__.  Any block size (partial warps included).
template <class T>
__global__ void __launch_bounds__(1024, 1) welford_rows(const T* x, T* out, int cols) {
  const T* row = x + (long long)blockIdx.x * cols;
  const unsigned t = linear_thread(), n = block_threads();
  Welford<T> w{0, 0, 0};
  for (int c = t; c < cols; c += n) {
    const T v = row[c];
    w.count += T(1);
    const T delta = v - w.mean;
    w.mean += delta / w.count;
    w.m2 += delta * (v - w.mean);
  }
  const unsigned lane = t % warpSize, warp = t / warpSize;
  const unsigned lanes = min(n - warp * warpSize, (unsigned)warpSize);  // live lanes in this warp
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    Welford<T> o;
    o.count = __shfl_down_sync(0xffffffffu, w.count, offset);
    o.mean = __shfl_down_sync(0xffffffffu, w.mean, offset);
    o.m2 = __shfl_down_sync(0xffffffffu, w.m2, offset);
    if (lane + offset < lanes) w = merge(w, o);
  }
  __shared__ Welford<T> per_warp[32];
  if (lane == 0) per_warp[warp] = w;
  __syncthreads();
  if (t == 0) {
    Welford<T> total = per_warp[0];
    for (unsigned k = 1; k < (n + warpSize - 1) / warpSize; ++k) total = merge(total, per_warp[k]);
    out[3 * blockIdx.x] = total.count;
    out[3 * blockIdx.x + 1] = total.mean;
    out[3 * blockIdx.x + 2] = total.m2;
  }
}

// ------------------------------------------------------------------ shuffles and votes
// out[4 * t + k]: the four shuffles of in[t] (global thread index t).
template <class T>
__global__ void shuffles(const T* in, T* out, int src_lane, unsigned delta, int lane_mask, int width) {
  const unsigned long long t = (unsigned long long)blockIdx.x * block_threads() + linear_thread();
  const T v = in[t];
  out[4 * t + 0] = __shfl_sync(0xffffffffu, v, src_lane, width);
  out[4 * t + 1] = __shfl_up_sync(0xffffffffu, v, delta, width);
  out[4 * t + 2] = __shfl_down_sync(0xffffffffu, v, delta, width);
  out[4 * t + 3] = __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
}

// Threads with linear index >= keep return first; the rest shuffle down by 1.
__global__ void shuffle_after_exit(const int* in, int* out, unsigned keep) {
  const unsigned t = linear_thread();
  if (t >= keep) return;
  out[t] = __shfl_down_sync(0xffffffffu, in[t], 1);
}

__global__ void votes(const int* pred, unsigned mask, unsigned* ballot, int* any, int* all) {
  const unsigned long long t = (unsigned long long)blockIdx.x * block_threads() + linear_thread();
  const int p = pred[t];
  ballot[t] = __ballot_sync(mask, p);
  any[t] = __any_sync(mask, p);
  all[t] = __all_sync(mask, p);
  __syncwarp();
}

// ------------------------------------------------------------------ indices
// 12 values per thread: threadIdx, blockIdx, blockDim, gridDim.
__global__ void indices(unsigned* out) {
  const unsigned long long block = blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  unsigned* o = out + 12 * (block * block_threads() + linear_thread());
  const unsigned v[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                          blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
  for (int k = 0; k < 12; ++k) o[k] = v[k];
}

// ------------------------------------------------------------------ dynamic shared memory
// Each block reverses its chunk through dynamic shared memory.
template <class T>
__global__ void reverse_chunks(const T* x, T* y) {
  CUBN_DYNAMIC_SHARED(T, tile);
  const unsigned t = threadIdx.x, n = blockDim.x;
  const long long base = (long long)blockIdx.x * n;
  tile[t] = x[base + t];
  __syncthreads();
  y[base + t] = tile[n - 1 - t];
}

// Block 0 writes every element of the dynamic shared buffer; every block then
// reads all of them: blocks after the first see the 0xFF fill.
__global__ void read_shared(float* out_f, int* out_i, int n) {
  CUBN_DYNAMIC_SHARED(float, f);
  int* i = reinterpret_cast<int*>(f + n);
  if (blockIdx.x == 0)
    for (int k = threadIdx.x; k < n; k += blockDim.x) f[k] = float(k), i[k] = k;
  __syncthreads();
  for (int k = threadIdx.x; k < n; k += blockDim.x) {
    out_f[blockIdx.x * n + k] = f[k];
    out_i[blockIdx.x * n + k] = i[k];
  }
}

// ------------------------------------------------------------------ half types
__global__ void half_types(const float* x, unsigned short* h_bits, float* h_back, unsigned short* b_bits,
                           float* b_back, float* h_sum, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half h = __float2half_rn(x[i]);
  const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
  memcpy(&h_bits[i], &h, 2);
  memcpy(&b_bits[i], &b, 2);
  h_back[i] = __half2float(h);
  b_back[i] = __bfloat162float(b);
  const __half next = __float2half(x[(i + 1) % n]);
  h_sum[i] = __half2float(h + next);  // __half arithmetic rounds to half
  // Implicit conversions, as CUDA has them; any failure poisons h_back.
  const __nv_bfloat16 implicit = 1.5f;
  const __half zero = 0;
  const __nv_bfloat16 three = 3;
  const float f = implicit;
  if (f != 1.5f || float(zero) != 0.0f || float(three) != 3.0f || sizeof(__half) != 2 ||
      alignof(__nv_bfloat16) != 2)
    h_back[i] = -1.0f;
}

// ------------------------------------------------------------------ atomics
__global__ void atomics(const int* x, int* i_out, unsigned* u_out, unsigned long long* ull_out, int n) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= n) return;
  const int v = x[k];
  atomicAdd(&i_out[0], v);
  atomicSub(&i_out[1], v);
  atomicMax(&i_out[2], v);
  atomicMin(&i_out[3], v);
  atomicAdd(&u_out[0], 1);  // an int literal into unsigned*: type_identity_t
  atomicMax(&u_out[1], (unsigned)v);
  atomicMin(&u_out[2], (unsigned)v);
  atomicExch(&u_out[3], 7u);
  atomicAdd(&ull_out[0], (unsigned long long)(unsigned)v);
  atomicMax(&ull_out[1], (unsigned long long)(unsigned)v);
  // Increment through a CAS loop.
  int old = atomicAdd(&i_out[4], 0), assumed;  // an atomic read: a plain one would race
  do {
    assumed = old;
    old = atomicCAS(&i_out[4], assumed, assumed + 1);
  } while (old != assumed);
}

// Sum of x through per-block partials; the last block to finish adds them up
// (the "last block done" pattern: __threadfence + atomicAdd on a ticket).
__global__ void grid_sum(const double* x, double* partial, unsigned* ticket, double* result, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const double s = block_reduce_sum<double>(i < n ? x[i] : 0.0);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = s;
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last) {
    double total = 0.0;
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) total += partial[b];
    total = block_reduce_sum<double>(total);
    if (threadIdx.x == 0) {
      *result = total;
      *ticket = 0;  // ready for the next launch
    }
  }
}

// ------------------------------------------------------------------ math
__global__ void math_float(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = x[i], a = fabsf(v) + 0.5f;
  float* o = out + 20 * i;
  o[0] = rsqrtf(a);
  o[1] = sqrtf(a);
  o[2] = expf(v);
  o[3] = exp2f(v);
  o[4] = logf(a);
  o[5] = log1pf(a);
  o[6] = expm1f(v);
  o[7] = erff(v);
  o[8] = erfcf(v);
  o[9] = tanhf(v);
  o[10] = fmaxf(v, 0.25f) + fminf(v, -0.25f);
  o[11] = fmaf(v, v, 1.0f);
  o[12] = powf(a, 1.5f);
  o[13] = __expf(v) + __logf(a);
  o[14] = __fdividef(v, a) + __frcp_rn(a) + __fsqrt_rn(a);
  o[15] = max(v, 0.0f) + min(v, 0.0f);
  o[16] = sqrt(a);  // the float overload, as in CUDA
  o[17] = isnan(v / 0.0f * 0.0f) + 2 * isinf(1.0f / (v - v)) + 4 * isfinite(v);
  o[18] = (float)max(3, (int)v) + (float)min(2u, 5u) + (float)max(-1ll, 2ll) + (float)min(7ull, 9ull);
  o[19] = (float)(sizeof(sqrt(a)) + sizeof(max(v, 1.0f)));
}

__global__ void math_double(const double* x, double* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double v = x[i], a = fabs(v) + 0.5;
  double* o = out + 14 * i;
  o[0] = rsqrt(a);
  o[1] = sqrt(a);
  o[2] = exp(v);
  o[3] = log(a);
  o[4] = log1p(a);
  o[5] = expm1(v);
  o[6] = erf(v);
  o[7] = erfc(v);
  o[8] = tanh(v);
  o[9] = fmax(v, 0.25) + fmin(v, -0.25);
  o[10] = fma(v, v, 1.0);
  o[11] = pow(a, 1.5);
  o[12] = max(v, 0.0) + min(v, 0.0);
  o[13] = isnan(v) + 2 * isinf(v) + 4 * isfinite(v);
}

__global__ void int_intrinsics(const unsigned* x, const unsigned long long* y, unsigned long long* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const unsigned a = x[i], b = x[(i + 1) % n];
  unsigned long long* o = out + 6 * i;
  o[0] = __umulhi(a, b);
  o[1] = __umul64hi(y[i], y[(i + 1) % n]);
  o[2] = __popc(a);
  o[3] = __clz((int)a);
  o[4] = __ffs((int)a);
  o[5] = (unsigned long long)(long long)min((int)a, (int)b);
}

// Every scalar parameter kind, for the argument checks: out = [a, b, c, d, e, f].
__global__ void scalars(double* out, int a, unsigned b, long long c, unsigned long long d, float e, double f) {
  out[0] = a, out[1] = b, out[2] = (double)c, out[3] = (double)d, out[4] = e, out[5] = f;
}

// ------------------------------------------------------------------ vector types
__global__ void vectors(const float4* x, float4* y, double2* d, uint4* u, float2* f2) {
  const unsigned t = threadIdx.x;
  const float4 v = x[t];
  y[t] = make_float4(v.w, v.z, v.y, v.x);
  d[t] = make_double2(v.x, v.y);
  u[t] = make_uint4(t, 2 * t, 3 * t, 4 * t);
  f2[t] = make_float2(v.x + v.y, v.z + v.w);
}
