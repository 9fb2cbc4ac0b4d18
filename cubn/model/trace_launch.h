// trace_launch.h: the launch entry of a traced kernel library.
//
// Included after the kernel source in the translation unit that
// cubn.model._adapter generates.  It runs a *sample* of a grid's blocks: each
// sampled block is one emulator launch of a single block whose blockIdx is
// set to the sampled index while gridDim keeps the whole grid, so the kernel
// computes exactly the addresses that block computes in the full launch.
// Every emulated thread tells trace_runtime.cpp when it starts and ends, so
// that its accesses are recorded with its block and thread.
#pragma once

extern "C" {
void cubn_trace_begin_block(uint32_t sample_index);
void cubn_trace_begin_thread(unsigned linear);
void cubn_trace_end_thread();
}

namespace cubn_trace {

inline const unsigned* sampled_index = nullptr;  // the block being run: 3 unsigned

template <class Ctx>
void begin_block(void* ctx, const unsigned* idx, unsigned char* dynamic_shared) {
  cubn_emu::begin_block<Ctx>(ctx, idx, dynamic_shared);  // gridDim, blockDim from the context
  blockIdx = {sampled_index[0], sampled_index[1], sampled_index[2]};
}

template <class Ctx>
void run_thread(void* ctx, unsigned linear) {
  cubn_trace_begin_thread(linear);
  try {
    cubn_emu::run_thread<Ctx>(ctx, linear);
  } catch (...) {
    cubn_trace_end_thread();
    throw;
  }
  cubn_trace_end_thread();
}

// `blocks`: nblocks (x, y, z) indices of the grid to run, in order.
template <class... P>
int launch(const char* name, void (*kernel)(P...), const unsigned* grid, const unsigned* block,
           size_t shared_bytes, void** args, const unsigned* blocks, size_t nblocks, char* err,
           size_t errlen) {
  if (cubn_emu::rt == nullptr) {
    std::snprintf(err, errlen, "kernel library used before cubn_emu_bind()");
    return 1;
  }
  using Ctx = cubn_emu::LaunchContext<P...>;
  Ctx ctx{kernel, cubn_emu::unpack<P...>(args, std::index_sequence_for<P...>{}),
          {grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]}};
  for (size_t b = 0; b < nblocks; ++b) {
    sampled_index = blocks + 3 * b;
    const cubn_emu_job job{name, {1, 1, 1}, {block[0], block[1], block[2]}, shared_bytes, &ctx,
                           &begin_block<Ctx>, &run_thread<Ctx>};
    cubn_trace_begin_block(static_cast<uint32_t>(b));
    const int rc = cubn_emu::rt->launch(&job, err, errlen);
    if (rc != 0) return rc;
  }
  return 0;
}

}  // namespace cubn_trace
