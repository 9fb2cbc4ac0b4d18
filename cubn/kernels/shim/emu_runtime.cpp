// emu_runtime.cpp: the machinery behind cuda_shim.h, built once per process
// (and per sanitizer) into its own shared object; every kernel library is bound
// to it with cubn_emu_bind(cubn_emu_runtime()).
//
// Model: the blocks of a grid run one after another; the threads of a block
// are real OS threads from one persistent pool, so barriers are real and the
// sanitizers see real concurrency.  One launch at a time per process.
//
// A barrier (the block's, or one per warp) is a 64-bit atomic holding the
// live participants and the arrivals, plus a generation counter that waiters
// futex-wait on; a block-wide census counts live threads and waiting ones.
// Lock-free, and still exact enough to detect misuse:
//  * threads that return drop out of the barriers, as exited GPU threads do;
//  * a __syncthreads reached at different source lines in one generation is
//    reported (divergent barrier, undefined on the GPU);
//  * when every live thread waits on a barrier that cannot complete, the
//    launch fails at once with who waits where (a deadlock), instead of hanging;
//  * a block that makes no progress for CUBN_EMU_BARRIER_TIMEOUT seconds
//    (default 20; a thread spinning on something another block would do)
//    is reported and the process aborted, as a hang in CI is worse than a crash.
// Reported misuse unwinds every thread of the block with an exception and the
// launch returns the message; the Python side raises RuntimeError.
#include "cuda_shim.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxWarps = kMaxThreads / 32;
constexpr uint32_t kNoTag = 0xffffffffu;

using Word = std::atomic<uint32_t>;
static_assert(sizeof(Word) == sizeof(uint32_t) && Word::is_always_lock_free);

void futex_wait(Word& w, uint32_t seen, const timespec* timeout) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&w), FUTEX_WAIT_PRIVATE, seen, timeout, nullptr, 0);
}
void futex_wake(Word& w, int count) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&w), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
}
// Waits until w no longer holds `seen` (no timeout: the launching thread is the watchdog).
void wait_while_equal(Word& w, uint32_t seen) {
  while (w.load(std::memory_order_acquire) == seen) futex_wait(w, seen, nullptr);
}

// Two 32-bit counters updated together by one atomic read-modify-write.
constexpr uint64_t kHigh = 1ull << 32;
constexpr uint32_t high(uint64_t v) { return static_cast<uint32_t>(v >> 32); }
constexpr uint32_t low(uint64_t v) { return static_cast<uint32_t>(v); }

// Thrown into every thread of a block whose launch failed; caught by the worker.
struct LaunchAborted {};

enum class State : uint8_t { running, in_syncthreads, in_warp_op, exited };

struct Site {
  const char* op;
  const char* file;
  unsigned line;
};

// Written by its own thread (relaxed atomics, so that the watchdog may read
// them at any time); read by others after the barrier hand-off.
struct ThreadSlot {
  std::atomic<State> state{State::exited};
  std::atomic<const char*> op{""}, file{""};
  std::atomic<unsigned> line{0};
  uint32_t warp_seq = 0;  // warp operations done so far in this block; owner only

  void enter(State s, const Site& site) {
    op.store(site.op, std::memory_order_relaxed);
    file.store(site.file, std::memory_order_relaxed);
    line.store(site.line, std::memory_order_relaxed);
    state.store(s, std::memory_order_relaxed);
  }
  Site site() const {
    return {op.load(std::memory_order_relaxed), file.load(std::memory_order_relaxed),
            line.load(std::memory_order_relaxed)};
  }
};

struct alignas(64) Barrier {
  std::atomic<uint64_t> count{0};  // (live participants << 32) | arrived
  Word generation{0};              // bumped on each release; waiters futex-wait on it
};

struct Warp {
  Barrier barrier;
  // Shuffle exchange, double-buffered by warp_seq parity: a lane can only
  // rewrite a buffer after every lane has passed the next warp barrier, that
  // is after they all read this one.  A slot whose tag is not the reader's
  // warp_seq was not written in this round (missing or exited lane).
  struct Slot {
    unsigned long long bits;
    uint32_t tag;
  } slots[2][32];
};

struct Block {
  Barrier barrier;
  // (live threads << 32) | (kBias + threads waiting on a barrier not yet
  // released).  A releaser subtracts its waiters, possibly before they have
  // added themselves: the bias keeps the transiently negative count from
  // borrowing from `live`.  blocked == live means deadlock.
  static constexpr uint32_t kBias = 1u << 31;
  std::atomic<uint64_t> census{0};
  std::atomic<uint64_t> progress{0};  // releases and exits, for the watchdog
  std::atomic<bool> aborted{false};
  std::mutex error_mu;
  std::string error;  // guarded by error_mu

  // Set by the launching thread before the block's threads start.
  unsigned nthreads = 0;
  const char* kernel = "";
  unsigned idx[3] = {0, 0, 0}, dim[3] = {1, 1, 1};

  ThreadSlot threads[kMaxThreads];
  Warp warps[kMaxWarps];
};

// Process-wide state, never destroyed: worker threads may still be parked in
// futex_wait when static destructors run at exit.
struct Runtime {
  std::mutex launch_mu;  // one launch at a time: the pool and __shared__ statics are per process
  Block block;
  std::vector<Word*> go;  // per-worker start signal
  Word done_count{0};
  Word done_generation{0};
  const cubn_emu_job* job = nullptr;
};
Runtime& runtime() {
  static Runtime* r = new Runtime;
  return *r;
}

thread_local unsigned t_linear = 0;
thread_local bool t_in_kernel = false;

// ------------------------------------------------------------ messages

std::string thread_name(const Block& b, unsigned t) {
  const unsigned x = t % b.dim[0], y = (t / b.dim[0]) % b.dim[1], z = t / (b.dim[0] * b.dim[1]);
  return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}

std::string block_name(const Block& b) {
  return "block (" + std::to_string(b.idx[0]) + "," + std::to_string(b.idx[1]) + "," +
         std::to_string(b.idx[2]) + ") of " + b.kernel;
}

std::string where(const Site& s) {
  const char* slash = std::strrchr(s.file, '/');
  return std::string(s.op) + " at " + (slash ? slash + 1 : s.file) + ":" + std::to_string(s.line);
}

std::string describe_state(const ThreadSlot& t) {
  switch (t.state.load(std::memory_order_relaxed)) {
    case State::running: return "running (not at a barrier)";
    case State::exited: return "exited";
    default: return "waiting in " + where(t.site());
  }
}

// One line per run of consecutive threads in the same state.
std::string describe_threads(const Block& b, State only = State::exited, bool filter = false) {
  std::string out;
  for (unsigned t = 0; t < b.nthreads;) {
    const std::string what = describe_state(b.threads[t]);
    unsigned end = t + 1;
    while (end < b.nthreads && describe_state(b.threads[end]) == what) ++end;
    if (!filter || b.threads[t].state.load(std::memory_order_relaxed) == only) {
      out += "  thread" + std::string(end - t > 1 ? "s " : " ") + thread_name(b, t);
      if (end - t > 1) out += ".." + thread_name(b, end - 1);
      out += " [linear " + std::to_string(t) + (end - t > 1 ? ".." + std::to_string(end - 1) : "") +
             "]: " + what + "\n";
    }
    t = end;
  }
  return out;
}

// ------------------------------------------------------------ barriers

// Records the first error and wakes every waiter.  Each thread throws
// LaunchAborted at its next barrier, or as soon as it wakes.
void abort_launch(Block& b, std::string message) {
  {
    std::lock_guard<std::mutex> lock(b.error_mu);
    if (b.aborted.load(std::memory_order_relaxed)) return;
    b.error = std::move(message);
    b.aborted.store(true, std::memory_order_release);
  }
  b.barrier.generation.fetch_add(1, std::memory_order_release);
  futex_wake(b.barrier.generation, INT_MAX);
  for (unsigned w = 0; w < (b.nthreads + 31) / 32; ++w) {
    b.warps[w].barrier.generation.fetch_add(1, std::memory_order_release);
    futex_wake(b.warps[w].barrier.generation, INT_MAX);
  }
}

void throw_if_aborted(const Block& b) {
  if (b.aborted.load(std::memory_order_acquire)) throw LaunchAborted{};
}

// `census` is the value after the caller's update.  Every live thread waits
// and only an arrival or an exit could release a barrier: nothing will move.
void check_deadlock(Block& b, uint64_t census) {
  const uint32_t live = high(census);
  if (live == 0 || low(census) - Block::kBias != live) return;
  abort_launch(b, "deadlock in " + block_name(b) +
                      ": every live thread waits at a barrier that the others never reach "
                      "(a __syncthreads or warp operation in divergent code)\n" +
                      describe_threads(b));
}

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0;
}

// Called by whoever completes `bar` (its last arrival, or an exit), with the
// number of threads waiting on it.
void release(Block& b, Barrier& bar, uint32_t waiters, bool block_barrier) {
  b.census.fetch_sub(waiters, std::memory_order_acq_rel);
  if (block_barrier) {
    const ThreadSlot* first = nullptr;
    for (unsigned t = 0; t < b.nthreads; ++t) {
      const ThreadSlot& s = b.threads[t];
      if (s.state.load(std::memory_order_relaxed) != State::in_syncthreads) continue;
      if (first == nullptr) {
        first = &s;
      } else if (!same_site(s.site(), first->site())) {
        abort_launch(b, "__syncthreads reached at different places by the threads of " +
                            block_name(b) +
                            " (a barrier in divergent code: undefined behaviour on the GPU)\n" +
                            describe_threads(b, State::in_syncthreads, true));
        return;
      }
    }
  }
  bar.count.fetch_and(~(kHigh - 1), std::memory_order_acq_rel);  // arrived = 0
  b.progress.fetch_add(1, std::memory_order_relaxed);
  bar.generation.fetch_add(1, std::memory_order_release);
  if (waiters > 0) futex_wake(bar.generation, INT_MAX);
}

// Arrive at `bar` (the block's, or the calling thread's warp's) and wait for
// its release.
void arrive_and_wait(Block& b, Barrier& bar, State state, const Site& site) {
  throw_if_aborted(b);
  ThreadSlot& slot = b.threads[t_linear];
  slot.enter(state, site);
  // The generation cannot move before this thread arrives.
  const uint32_t seen = bar.generation.load(std::memory_order_acquire);
  const uint64_t count = bar.count.fetch_add(1, std::memory_order_acq_rel) + 1;
  if (low(count) == high(count)) {
    release(b, bar, low(count) - 1, state == State::in_syncthreads);
  } else {
    check_deadlock(b, b.census.fetch_add(1, std::memory_order_acq_rel) + 1);
    wait_while_equal(bar.generation, seen);
  }
  slot.state.store(State::running, std::memory_order_relaxed);
  throw_if_aborted(b);
}

// A returning thread leaves both its barriers, possibly completing one.
void thread_exit(Block& b) {
  ThreadSlot& slot = b.threads[t_linear];
  slot.state.store(State::exited, std::memory_order_relaxed);
  b.progress.fetch_add(1, std::memory_order_relaxed);
  if (b.aborted.load(std::memory_order_acquire)) return;
  const bool is_block[2] = {true, false};
  Barrier* bars[2] = {&b.barrier, &b.warps[t_linear / 32].barrier};
  for (int k = 0; k < 2; ++k) {
    const uint64_t count = bars[k]->count.fetch_sub(kHigh, std::memory_order_acq_rel) - kHigh;
    if (low(count) > 0 && low(count) == high(count)) release(b, *bars[k], low(count), is_block[k]);
  }
  check_deadlock(b, b.census.fetch_sub(kHigh, std::memory_order_acq_rel) - kHigh);
}

Block& current_block(const char* op) {
  if (!t_in_kernel) {
    std::fprintf(stderr, "cubn emulator: %s called outside a kernel launch\n", op);
    std::abort();
  }
  return runtime().block;
}

// ------------------------------------------------------------ the API

void rt_syncthreads(const char* file, unsigned line) {
  Block& b = current_block("__syncthreads");
  arrive_and_wait(b, b.barrier, State::in_syncthreads, {"__syncthreads", file, line});
}

// Starts warp operation number warp_seq for the calling lane.
uint32_t next_warp_seq(Block& b) { return b.threads[t_linear].warp_seq++; }

void rt_syncwarp(const char* file, unsigned line) {
  Block& b = current_block("__syncwarp");
  next_warp_seq(b);
  arrive_and_wait(b, b.warps[t_linear / 32].barrier, State::in_warp_op, {"__syncwarp", file, line});
}

constexpr const char* kShuffleNames[4] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                          "__shfl_xor_sync"};

unsigned long long rt_shuffle(unsigned long long bits, int mode, unsigned b_operand, int width,
                              const char* file, unsigned line) {
  Block& b = current_block(kShuffleNames[mode]);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    abort_launch(b, std::string(kShuffleNames[mode]) + " with width " + std::to_string(width) +
                        " (must be a power of 2 up to 32) in " + block_name(b) + ", thread " +
                        thread_name(b, t_linear) + ": " + where({kShuffleNames[mode], file, line}));
    throw LaunchAborted{};
  }
  const unsigned lane = t_linear % 32;
  Warp& w = b.warps[t_linear / 32];
  const uint32_t seq = next_warp_seq(b);
  auto& buffer = w.slots[seq & 1];
  buffer[lane] = {bits, seq};
  arrive_and_wait(b, w.barrier, State::in_warp_op, {kShuffleNames[mode], file, line});

  // The source lane as PTX shfl.sync computes it (segments of `width` lanes;
  // an out-of-segment source reads the lane's own value).
  const unsigned seg_mask = 32u - static_cast<unsigned>(width);
  const unsigned min_lane = lane & seg_mask;
  const unsigned max_lane = min_lane | (31u & ~seg_mask);
  const unsigned bv = b_operand & 31u;
  unsigned src = lane;
  bool valid = true;
  switch (mode) {
    case 0: src = min_lane | (bv & ~seg_mask); valid = src <= max_lane; break;
    case 1: valid = lane >= min_lane + bv; src = lane - bv; break;
    case 2: src = lane + bv; valid = src <= max_lane; break;
    default: src = lane ^ bv; valid = src <= max_lane; break;
  }
  if (!valid) src = lane;
  const auto& s = buffer[src];
  return s.tag == seq ? s.bits : ~0ull;  // a missing or exited lane gives 0xFF bytes
}

unsigned long long rt_vote(int predicate, const char* file, unsigned line) {
  Block& b = current_block("__ballot_sync");
  const unsigned lane = t_linear % 32;
  Warp& w = b.warps[t_linear / 32];
  const uint32_t seq = next_warp_seq(b);
  auto& buffer = w.slots[seq & 1];
  buffer[lane] = {predicate != 0 ? 1ull : 0ull, seq};
  arrive_and_wait(b, w.barrier, State::in_warp_op, {"__ballot_sync/__any_sync/__all_sync", file, line});
  unsigned took_part = 0, ballot = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (buffer[l].tag != seq) continue;
    took_part |= 1u << l;
    if (buffer[l].bits) ballot |= 1u << l;
  }
  return (static_cast<unsigned long long>(took_part) << 32) | ballot;
}

// ------------------------------------------------------------ the pool

void run_thread(unsigned linear) {
  Runtime& r = runtime();
  Block& b = r.block;
  t_linear = linear;
  t_in_kernel = true;
  try {
    r.job->run_thread(r.job->ctx, linear);
  } catch (const LaunchAborted&) {
  } catch (...) {
    abort_launch(b, "a C++ exception escaped thread " + thread_name(b, linear) + " of " +
                        block_name(b));
  }
  thread_exit(b);
  t_in_kernel = false;
  // Read before signalling: once the last thread is done the launcher resets the block.
  const unsigned nthreads = b.nthreads;
  if (r.done_count.fetch_add(1, std::memory_order_acq_rel) + 1 == nthreads) {
    r.done_generation.fetch_add(1, std::memory_order_release);
    futex_wake(r.done_generation, 1);
  }
}

void start_worker(Runtime& r, unsigned index) {
  r.go[index]->fetch_add(1, std::memory_order_release);
  futex_wake(*r.go[index], 1);
}

void worker_main(unsigned index, Word* go) {
  Runtime& r = runtime();
  uint32_t seen = 0;
  for (;;) {
    wait_while_equal(*go, seen);
    seen = go->load(std::memory_order_acquire);
    // Start-up is a binary tree (the launcher starts thread 0), so that
    // both cores share the wake-up system calls.
    for (unsigned child = 2 * index + 1; child <= 2 * index + 2 && child < r.block.nthreads; ++child)
      start_worker(r, child);
    run_thread(index);
  }
}

void grow_pool(Runtime& r, unsigned n) {
  while (r.go.size() < n) {
    Word* go = new Word(0);
    r.go.push_back(go);
    std::thread(worker_main, static_cast<unsigned>(r.go.size() - 1), go).detach();
  }
}

double barrier_timeout_seconds() {
  const char* s = std::getenv("CUBN_EMU_BARRIER_TIMEOUT");
  if (s != nullptr && *s != '\0') {
    char* end = nullptr;
    const double v = std::strtod(s, &end);
    if (end != s && v > 0) return v;
  }
  return 20.0;
}

// Waits for the block's threads; aborts the process if they stop making progress.
void wait_for_block(Runtime& r, uint32_t seen, double timeout) {
  Block& b = r.block;
  uint64_t last_progress = ~0ull;
  auto last_change = std::chrono::steady_clock::now();
  const timespec tick{0, 100 * 1000 * 1000};
  while (r.done_generation.load(std::memory_order_acquire) == seen) {
    futex_wait(r.done_generation, seen, &tick);
    const auto now = std::chrono::steady_clock::now();
    const uint64_t progress = b.progress.load(std::memory_order_relaxed);
    if (progress != last_progress) {
      last_progress = progress;
      last_change = now;
    } else if (std::chrono::duration<double>(now - last_change).count() > timeout &&
               r.done_generation.load(std::memory_order_acquire) == seen) {
      std::fprintf(stderr,
                   "cubn emulator: %s made no progress for %g s (CUBN_EMU_BARRIER_TIMEOUT): a "
                   "thread never reaches the barrier the others wait at, or waits for another "
                   "block (blocks run one at a time here). Aborting.\n%s",
                   block_name(b).c_str(), timeout, describe_threads(b).c_str());
      std::fflush(stderr);
      std::abort();
    }
  }
}

// On the launching thread, while no worker runs; the workers' start signal publishes it.
void reset_block(Block& b, const cubn_emu_job& job, unsigned nthreads, const unsigned* idx) {
  b.nthreads = nthreads;
  b.kernel = job.kernel_name;
  for (int k = 0; k < 3; ++k) b.dim[k] = job.block[k], b.idx[k] = idx[k];
  b.barrier.count.store(uint64_t{nthreads} << 32, std::memory_order_relaxed);
  b.census.store((uint64_t{nthreads} << 32) | Block::kBias, std::memory_order_relaxed);
  b.error.clear();
  b.aborted.store(false, std::memory_order_relaxed);
  for (unsigned t = 0; t < nthreads; ++t) {
    b.threads[t].state.store(State::running, std::memory_order_relaxed);
    b.threads[t].warp_seq = 0;
  }
  for (unsigned w = 0; w < (nthreads + 31) / 32; ++w) {
    Warp& warp = b.warps[w];
    warp.barrier.count.store(uint64_t{std::min(32u, nthreads - 32 * w)} << 32, std::memory_order_relaxed);
    for (auto& buffer : warp.slots)
      for (auto& slot : buffer) slot.tag = kNoTag;
  }
}

int rt_launch(const cubn_emu_job* job, char* err, size_t errlen) {
  const unsigned long long nthreads =
      1ull * job->block[0] * job->block[1] * job->block[2];
  if (nthreads == 0 || nthreads > kMaxThreads || job->grid[0] == 0 || job->grid[1] == 0 ||
      job->grid[2] == 0) {
    std::snprintf(err, errlen, "%s: invalid launch: grid (%u,%u,%u), block (%u,%u,%u)",
                  job->kernel_name, job->grid[0], job->grid[1], job->grid[2], job->block[0],
                  job->block[1], job->block[2]);
    return 1;
  }
  Runtime& r = runtime();
  std::lock_guard<std::mutex> launch_lock(r.launch_mu);
  grow_pool(r, static_cast<unsigned>(nthreads));
  r.job = job;
  const double timeout = barrier_timeout_seconds();

  // Exactly the launch's size, so that AddressSanitizer flags an access past its end.
  void* dynamic_shared = nullptr;
  if (posix_memalign(&dynamic_shared, 16, job->shared_bytes) != 0) {
    std::snprintf(err, errlen, "%s: cannot allocate %zu bytes of dynamic shared memory",
                  job->kernel_name, job->shared_bytes);
    return 1;
  }
  Block& b = r.block;
  int rc = 0;
  for (unsigned z = 0; z < job->grid[2] && rc == 0; ++z)
    for (unsigned y = 0; y < job->grid[1] && rc == 0; ++y)
      for (unsigned x = 0; x < job->grid[0] && rc == 0; ++x) {
        const unsigned idx[3] = {x, y, z};
        reset_block(b, *job, static_cast<unsigned>(nthreads), idx);
        // Unwritten shared memory reads as NaN / -1.
        std::memset(dynamic_shared, 0xff, job->shared_bytes);
        job->begin_block(job->ctx, b.idx, static_cast<unsigned char*>(dynamic_shared));
        r.done_count.store(0, std::memory_order_relaxed);
        const uint32_t seen = r.done_generation.load(std::memory_order_relaxed);
        start_worker(r, 0);
        wait_for_block(r, seen, timeout);
        if (b.aborted.load(std::memory_order_acquire)) {
          std::lock_guard<std::mutex> lock(b.error_mu);
          std::snprintf(err, errlen, "%s", b.error.c_str());
          rc = 1;
        }
      }
  std::free(dynamic_shared);
  return rc;
}

}  // namespace

extern "C" CUBN_EMU_EXPORT const cubn_emu_runtime_api* cubn_emu_runtime() {
  static const cubn_emu_runtime_api api{CUBN_EMU_ABI_VERSION, rt_launch, rt_syncthreads,
                                        rt_syncwarp, rt_shuffle, rt_vote};
  return &api;
}
