// Deliberately broken kernels: the emulator and its sanitizer runs must
// report each of them (tests/emulator/test_shim.py, test_sanitizers.py).

// Off-by-one guard: thread n writes one element past the end of y.
__global__ void oob_global_write(float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) y[i] = 1.0f;
}

// Writes one element past the end of a static __shared__ array.
__global__ void shared_off_by_one(const float* x, float* y) {
  __shared__ float tile[256];
  const unsigned t = threadIdx.x;
  tile[t + 1] = x[t];
  __syncthreads();
  y[t] = tile[t];
}

// Reads what another thread wrote to shared memory without a __syncthreads
// in between: a data race.
__global__ void missing_syncthreads(const float* x, float* y) {
  __shared__ float tile[256];
  const unsigned t = threadIdx.x;
  tile[t] = x[t];
  y[t] = tile[(t + 1) % blockDim.x];
}

// Half of block 1's threads reach one __syncthreads, the other half another.
__global__ void divergent_syncthreads(float* y) {
  if (blockIdx.x == 1 && threadIdx.x < 16) {
    __syncthreads();  // barrier A
  } else {
    __syncthreads();  // barrier B
  }
  y[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

// In block 1, lanes 0-15 of every warp wait at __syncthreads while lanes
// 16-31 wait at __syncwarp for them: nobody can move.
__global__ void deadlock(float* y) {
  if (blockIdx.x == 1 && threadIdx.x % 32 < 16) __syncthreads();
  else __syncwarp();
  y[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

// Thread 0 waits for a flag nobody sets (as if another block would) while the
// others wait at the barrier: only the watchdog can end this.
__global__ void spin_forever(volatile int* flag) {
  if (threadIdx.x == 0)
    while (*flag == 0) {
    }
  __syncthreads();  // the others wait here
}

__global__ void bad_shuffle_width(float* y) {
  y[threadIdx.x] = __shfl_sync(0xffffffffu, y[threadIdx.x], 0, 3);
}
