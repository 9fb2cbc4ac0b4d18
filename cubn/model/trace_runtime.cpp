// trace_runtime.cpp: records the global-memory accesses of traced emulated kernels.
//
// A traced kernel library is the kernel source built by g++ with
// -fsanitize=thread instrumentation (every load and store becomes a call to
// __tsan_readN / __tsan_writeN) but linked against this library instead of
// libtsan: the hooks below keep the accesses that fall inside one of the
// launch's argument arrays (its global memory) and drop everything else
// (stack, static __shared__, dynamic shared memory, the runtime's own state).
//
// This library is loaded once per process with RTLD_GLOBAL before any traced
// kernel library, so that their __tsan_* references bind here.  Python sets
// the launch's address ranges, the kernel library's launch entry marks each
// emulated thread's start and end, and Python takes the records after the
// launch.  One traced launch at a time per process (Python holds a lock).
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

struct Record {
  uint64_t addr;
  uint64_t pc;      // return address of the hook call: the access site
  uint32_t block;   // index of the block in the launch's sample
  uint16_t thread;  // linear thread index in the block
  uint8_t size;     // bytes
  uint8_t write;    // 0 read, 1 write, 2 atomic read-modify-write
  uint32_t range;   // which argument array
  uint32_t seq;     // order of the access within its thread
};
static_assert(sizeof(Record) == 32);

struct Range {
  uint64_t lo, len;
};

constexpr int kMaxRanges = 64;
Range g_ranges[kMaxRanges];
int g_nranges = 0;
uint64_t g_lo = ~0ull, g_hi = 0;  // bounding box of the ranges
uint32_t g_block = 0;

std::mutex g_mu;
std::vector<Record> g_records;  // guarded by g_mu
std::atomic<uint64_t> g_dropped{0};

struct ThreadBuffer {
  bool active = false;
  uint16_t thread = 0;
  uint32_t seq = 0;
  std::vector<Record> records;
};
thread_local ThreadBuffer t_buf;

inline void record(const void* p, unsigned size, uint8_t kind, void* pc) {
  const uint64_t a = reinterpret_cast<uint64_t>(p);
  if (a < g_lo || a >= g_hi) return;
  ThreadBuffer& t = t_buf;
  if (!t.active) return;
  for (int i = 0; i < g_nranges; ++i) {
    if (a - g_ranges[i].lo < g_ranges[i].len) {
      t.records.push_back(Record{a, reinterpret_cast<uint64_t>(pc), g_block, t.thread,
                                 static_cast<uint8_t>(size), kind, static_cast<uint32_t>(i), t.seq++});
      return;
    }
  }
}

}  // namespace

#define CUBN_TRACE_EXPORT extern "C" __attribute__((visibility("default")))
#define PC __builtin_return_address(0)

// ---------------------------------------------------------------- control (Python, launch entry)
CUBN_TRACE_EXPORT int cubn_trace_abi() { return 1; }

CUBN_TRACE_EXPORT int cubn_trace_set_ranges(const uint64_t* lo_len, int n) {
  if (n < 0 || n > kMaxRanges) return 1;
  g_nranges = n;
  g_lo = ~0ull;
  g_hi = 0;
  for (int i = 0; i < n; ++i) {
    g_ranges[i] = Range{lo_len[2 * i], lo_len[2 * i + 1]};
    if (g_ranges[i].len == 0) continue;
    if (g_ranges[i].lo < g_lo) g_lo = g_ranges[i].lo;
    if (g_ranges[i].lo + g_ranges[i].len > g_hi) g_hi = g_ranges[i].lo + g_ranges[i].len;
  }
  return 0;
}

CUBN_TRACE_EXPORT void cubn_trace_begin_block(uint32_t sample_index) { g_block = sample_index; }

CUBN_TRACE_EXPORT void cubn_trace_begin_thread(unsigned linear) {
  t_buf.active = true;
  t_buf.thread = static_cast<uint16_t>(linear);
  t_buf.seq = 0;
  t_buf.records.clear();
}

CUBN_TRACE_EXPORT void cubn_trace_end_thread() {
  ThreadBuffer& t = t_buf;
  t.active = false;
  std::lock_guard<std::mutex> lock(g_mu);
  g_records.insert(g_records.end(), t.records.begin(), t.records.end());
  t.records.clear();
}

CUBN_TRACE_EXPORT size_t cubn_trace_count() { return g_records.size(); }

// Copies the records into `out` (room for cubn_trace_count() of them) and clears them.
CUBN_TRACE_EXPORT void cubn_trace_take(void* out) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_records.empty()) std::memcpy(out, g_records.data(), g_records.size() * sizeof(Record));
  g_records.clear();
  g_records.shrink_to_fit();
}

// ---------------------------------------------------------------- the instrumentation's entry points
CUBN_TRACE_EXPORT void __tsan_init() {}
CUBN_TRACE_EXPORT void __tsan_func_entry(void*) {}
CUBN_TRACE_EXPORT void __tsan_func_exit() {}
CUBN_TRACE_EXPORT void __tsan_ignore_thread_begin() {}
CUBN_TRACE_EXPORT void __tsan_ignore_thread_end() {}
CUBN_TRACE_EXPORT void __tsan_vptr_read(void**) {}
CUBN_TRACE_EXPORT void __tsan_vptr_update(void**, void*) {}

#define CUBN_TRACE_RW(N)                                                                        \
  CUBN_TRACE_EXPORT void __tsan_read##N(void* p) { record(p, N, 0, PC); }                       \
  CUBN_TRACE_EXPORT void __tsan_write##N(void* p) { record(p, N, 1, PC); }                      \
  CUBN_TRACE_EXPORT void __tsan_unaligned_read##N(void* p) { record(p, N, 0, PC); }             \
  CUBN_TRACE_EXPORT void __tsan_unaligned_write##N(void* p) { record(p, N, 1, PC); }            \
  CUBN_TRACE_EXPORT void __tsan_volatile_read##N(void* p) { record(p, N, 0, PC); }              \
  CUBN_TRACE_EXPORT void __tsan_volatile_write##N(void* p) { record(p, N, 1, PC); }             \
  CUBN_TRACE_EXPORT void __tsan_unaligned_volatile_read##N(void* p) { record(p, N, 0, PC); }    \
  CUBN_TRACE_EXPORT void __tsan_unaligned_volatile_write##N(void* p) { record(p, N, 1, PC); }   \
  CUBN_TRACE_EXPORT void __tsan_read##N##_pc(void* p, void* pc) { record(p, N, 0, pc); }        \
  CUBN_TRACE_EXPORT void __tsan_write##N##_pc(void* p, void* pc) { record(p, N, 1, pc); }
CUBN_TRACE_RW(1)
CUBN_TRACE_RW(2)
CUBN_TRACE_RW(4)
CUBN_TRACE_RW(8)
CUBN_TRACE_RW(16)
#undef CUBN_TRACE_RW

// Accesses of other sizes (aggregates): one record per range, sizes above
// 255 bytes clipped (none of cubn's kernels makes one; counted as dropped).
CUBN_TRACE_EXPORT void __tsan_read_range(void* p, unsigned long size) {
  if (size > 255) g_dropped.fetch_add(1, std::memory_order_relaxed);
  record(p, size > 255 ? 255 : static_cast<unsigned>(size), 0, PC);
}
CUBN_TRACE_EXPORT void __tsan_write_range(void* p, unsigned long size) {
  if (size > 255) g_dropped.fetch_add(1, std::memory_order_relaxed);
  record(p, size > 255 ? 255 : static_cast<unsigned>(size), 1, PC);
}
CUBN_TRACE_EXPORT uint64_t cubn_trace_dropped() { return g_dropped.exchange(0); }

// Atomics: the access is recorded (kind 2), then done for real with the
// compiler's own atomic builtins (the memory order does not matter here:
// blocks run one at a time and x86 is strongly ordered).
#define CUBN_TRACE_ATOMIC(N, T)                                                                   \
  CUBN_TRACE_EXPORT T __tsan_atomic##N##_load(const volatile T* a, int) {                         \
    record(const_cast<T*>(a), N / 8, 0, PC);                                                     \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                 \
  }                                                                                               \
  CUBN_TRACE_EXPORT void __tsan_atomic##N##_store(volatile T* a, T v, int) {                      \
    record(const_cast<T*>(a), N / 8, 1, PC);                                                     \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                    \
  }                                                                                               \
  CUBN_TRACE_EXPORT T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                      \
    record(const_cast<T*>(a), N / 8, 2, PC);                                                     \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                               \
  CUBN_TRACE_EXPORT T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) {                     \
    record(const_cast<T*>(a), N / 8, 2, PC);                                                     \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                           \
  }                                                                                               \
  CUBN_TRACE_EXPORT T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) {                     \
    record(const_cast<T*>(a), N / 8, 2, PC);                                                     \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                           \
  }                                                                                               \
  CUBN_TRACE_EXPORT T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) {                     \
    record(const_cast<T*>(a), N / 8, 2, PC);                                                     \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                           \
  }                                                                                               \
  CUBN_TRACE_EXPORT T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) {                      \
    record(const_cast<T*>(a), N / 8, 2, PC);                                                     \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                            \
  }                                                                                               \
  CUBN_TRACE_EXPORT T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) {                     \
    record(const_cast<T*>(a), N / 8, 2, PC);                                                     \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                           \
  }                                                                                               \
  CUBN_TRACE_EXPORT T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) {                    \
    record(const_cast<T*>(a), N / 8, 2, PC);                                                     \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                               \
  CUBN_TRACE_EXPORT int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, \
                                                                   int) {                        \
    record(const_cast<T*>(a), N / 8, 2, PC);                                                     \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);      \
  }                                                                                               \
  CUBN_TRACE_EXPORT int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int,   \
                                                                 int) {                          \
    record(const_cast<T*>(a), N / 8, 2, PC);                                                     \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);       \
  }                                                                                               \
  CUBN_TRACE_EXPORT T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int,      \
                                                              int) {                             \
    record(const_cast<T*>(a), N / 8, 2, PC);                                                     \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);            \
    return c;                                                                                    \
  }
CUBN_TRACE_ATOMIC(8, uint8_t)
CUBN_TRACE_ATOMIC(16, uint16_t)
CUBN_TRACE_ATOMIC(32, uint32_t)
CUBN_TRACE_ATOMIC(64, uint64_t)
#undef CUBN_TRACE_ATOMIC

CUBN_TRACE_EXPORT void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
CUBN_TRACE_EXPORT void __tsan_atomic_signal_fence(int) {}
