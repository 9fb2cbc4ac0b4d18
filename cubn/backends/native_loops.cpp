// The NumPy backend's compiled loops (cubn/backends/numpy_native.py builds
// this file with the host C++ compiler and calls it through ctypes).
//
// Every function makes one pass over its part of a C-contiguous array, in one
// thread: the Python side cuts an array into parts by its shape alone, runs
// them on cubn's thread pool (ctypes releases the GIL) and merges the parts'
// sums in a fixed order, so results do not depend on the thread count.
//
// The backend sees a tensor as (outer, C, inner); three layouts of parts:
//   rows  (inner == 1): the array is (rows, C), seen as rows of W = k*C
//         elements (k rows at a time when C is small, so that the inner loop
//         is long enough to vectorize); per-channel values tiled to W + LANES
//         (j % C for j < W + LANES: the streamed loops load LANES at any column).
//   short (inner * itemsize < 4 KiB): a part is every channel's runs for n in
//         [n0, n1), walked in memory order.
//   runs  (longer runs): a part is a piece of one run (n, c).
//
// Statistics are sums of d = x - pivot and d^2 in double (pivot: a value near
// the channel's data), from which the caller forms mean and M2; for float32
// data d and d^2 are exact in double, so only the additions round. Lanes of
// independent accumulators hide the adds' latency and are added in a fixed
// tree. Elementwise loops compute in the data's type. NaN and Inf propagate
// to their channel as in NumPy: the ReLU keeps NaN, and its derivative
// multiplies (Inf * 0 is NaN, as np.multiply(dy, mask) gives).

#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

typedef std::int64_t i64;

// flags select a template: 1 = side input, 2 = ReLU, 4 = write dside, 8 = stream the outputs
#define CUBN_FLAGS2(F, T, flags, ...)                                          \
    switch ((flags) & 3) {                                                     \
        case 0: F<T, false, false>(__VA_ARGS__); break;                        \
        case 1: F<T, true, false>(__VA_ARGS__); break;                         \
        case 2: F<T, false, true>(__VA_ARGS__); break;                         \
        default: F<T, true, true>(__VA_ARGS__); break;                         \
    }

#define CUBN_FLAGS3(F, T, flags, ...)                                          \
    switch ((flags) & 7) {                                                     \
        case 0: F<T, false, false, false>(__VA_ARGS__); break;                 \
        case 1: F<T, true, false, false>(__VA_ARGS__); break;                  \
        case 2: F<T, false, true, false>(__VA_ARGS__); break;                  \
        case 3: F<T, true, true, false>(__VA_ARGS__); break;                   \
        case 4: F<T, false, false, true>(__VA_ARGS__); break;                  \
        case 5: F<T, true, false, true>(__VA_ARGS__); break;                   \
        case 6: F<T, false, true, true>(__VA_ARGS__); break;                   \
        default: F<T, true, true, true>(__VA_ARGS__); break;                   \
    }

// F's streamed variant (F##_streamed) when flags has 8, else F; FLAGS is CUBN_FLAGS2 or CUBN_FLAGS3
#define CUBN_DISPATCH(FLAGS, F, T, flags, ...)                                 \
    do {                                                                       \
        if ((flags) & 8) {                                                     \
            FLAGS(F##_streamed, T, flags, __VA_ARGS__)                         \
        } else {                                                               \
            FLAGS(F, T, flags, __VA_ARGS__)                                    \
        }                                                                      \
    } while (0)

namespace {

// Sums are two-level: each accumulator adds BLOCK terms, then its block total
// joins the running sum, so rounding errors grow with BLOCK + n / BLOCK
// terms rather than n (as pairwise summation's do, nearly).
constexpr int LANES = 8;
constexpr i64 BLOCK = 32;

template <class T>
inline T relu(T z) { return z < T(0) ? T(0) : z; }  // NaN stays NaN

// dy' = dy * [pre > 0] for the ReLU (pre = (x - pm) * ps + ph [+ side]), else dy
template <class T, bool SIDE, bool RELU>
inline T dy_prime(T dy, T x, const T* side, i64 e, T pm, T ps, T ph) {
    if (!RELU) return dy;
    T z = (x - pm) * ps + ph;
    if (SIDE) z = z + side[e];
    return dy * (z > T(0) ? T(1) : T(0));
}

// -- statistics: S = sum(x - pivot), Q = sum((x - pivot)^2) -----------------
// Columns are taken TILE at a time through each block of rows, so that a
// tile's block sums stay in registers however wide the rows are (a block
// sum per column over the whole width would not fit in L1 past ~1000
// columns). Per column the additions are the same, in the same order.
// Walking a tile down the rows defeats the hardware's sequential
// prefetch, so each row's visit asks for the same columns BLOCK rows
// further on, into L2, one block ahead of use.
constexpr i64 TILE = 32;

template <class T>
inline void prefetch_ahead(const T* v, i64 width, i64 n) {
    const char* p = reinterpret_cast<const char*>(v) + BLOCK * width * i64(sizeof(T));
    for (i64 b = 0; b < n * i64(sizeof(T)); b += 64) __builtin_prefetch(p + b, 0, 2);
}

template <class T, i64 N>
inline void stats_tile(const T* x, i64 r0, i64 r1, i64 width, i64 j0, i64 n, const double* pivot, double* s,
                       double* q) {
    double bs[N] = {0.0}, bq[N] = {0.0};
    for (i64 r = r0; r < r1; ++r) {
        const T* v = x + r * width + j0;
        prefetch_ahead(v, width, n);
#pragma omp simd
        for (i64 k = 0; k < (N == TILE ? N : n); ++k) {
            const double d = double(v[k]) - pivot[j0 + k];
            bs[k] += d;
            bq[k] += d * d;
        }
    }
    for (i64 k = 0; k < (N == TILE ? N : n); ++k) { s[j0 + k] += bs[k]; q[j0 + k] += bq[k]; }
}

template <class T>
void stats_rows(const T* x, i64 rows, i64 width, const double* pivot, double* s, double* q) {
    for (i64 j = 0; j < width; ++j) { s[j] = 0.0; q[j] = 0.0; }
    const i64 tiles = width / TILE * TILE;
    for (i64 r0 = 0; r0 < rows; r0 += BLOCK) {
        const i64 r1 = (r0 + BLOCK < rows) ? r0 + BLOCK : rows;
        for (i64 j0 = 0; j0 < tiles; j0 += TILE) stats_tile<T, TILE>(x, r0, r1, width, j0, TILE, pivot, s, q);
        if (tiles < width) stats_tile<T, TILE - 1>(x, r0, r1, width, tiles, width - tiles, pivot, s, q);
    }
}

// LANES doubles as one value (GCC/Clang vector extensions: the compiler maps
// them to the CPU's vectors), and LANES values of T
typedef double Lanes __attribute__((vector_size(LANES * sizeof(double))));
template <class T>
struct LanesOf;
template <>
struct LanesOf<float> {
    typedef float type __attribute__((vector_size(LANES * sizeof(float))));
    typedef int mask __attribute__((vector_size(LANES * sizeof(int))));
    typedef int lane_int;
};
template <>
struct LanesOf<double> {
    typedef Lanes type;
    typedef long long mask __attribute__((vector_size(LANES * sizeof(long long))));
    typedef long long lane_int;
};
template <class T>
using TLanes = typename LanesOf<T>::type;

template <class T>
inline TLanes<T> broadcast(T v) { return TLanes<T>{v, v, v, v, v, v, v, v}; }

template <class T>
inline TLanes<T> load_lanes(const T* p) {
    TLanes<T> v;
    __builtin_memcpy(&v, p, sizeof v);  // an unaligned vector load
    return v;
}

template <class T>
inline Lanes to_double(TLanes<T> v) { return __builtin_convertvector(v, Lanes); }

inline Lanes load_sum(const double* p) {
    Lanes v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

inline void store_sum(double* p, Lanes v) { __builtin_memcpy(p, &v, sizeof v); }

// Two-level sums, in LANES lanes, of the pairs of terms over i < len:
// vterm(i, u, w) gives terms i .. i + LANES - 1 as lanes, sterm(i, u, w) term
// i alone. Each lane adds BLOCK terms before its block total joins its running
// sum; the last len % LANES terms are one more vector step over the last LANES
// terms, those already added masked to zero (lane LANES - r + k takes term
// len - r + k: the sums stay in registers; written lane by lane they would
// come back from memory through a failed store-to-load forward, half the
// time of a short run). The lanes' sums are added to A and B.
template <class VTerm, class STerm>
inline void lane_sums_into(i64 len, VTerm vterm, STerm sterm, Lanes& A, Lanes& B) {
    if (len < LANES) {  // no vector step: each term into its lane
        for (int k = 0; k < len; ++k) {
            double u, w;
            sterm(k, u, w);
            A[k] += u;
            B[k] += w;
        }
        return;
    }
    Lanes a = {}, b = {};
    i64 i = 0;
    while (i + LANES <= len) {
        Lanes ba = {}, bb = {};
        const i64 end = (len - i) / LANES > BLOCK ? i + BLOCK * LANES : len - (len - i) % LANES;
        for (; i < end; i += LANES) {
            Lanes u, w;
            vterm(i, u, w);
            ba += u;
            bb += w;
        }
        a += ba;
        b += bb;
    }
    if (i < len) {
        typedef LanesOf<double>::mask Mask;
        const Mask lane = {0, 1, 2, 3, 4, 5, 6, 7};
        const Mask keep = lane >= LANES - (len - i);
        Lanes u, w;
        vterm(len - LANES, u, w);
        const Lanes zero = {};
        a += keep ? u : zero;
        b += keep ? w : zero;
    }
    A += a;
    B += b;
}

// the lanes added in a fixed tree
inline double lane_total(Lanes a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// Short runs (n, c) for n in [n0, n1), every channel: each channel's lanes
// gather its runs' lane sums, added across lanes once at the end (a run is too
// short to pay for its own lane total). The runs are taken SHORT_GROUP values
// of n at a time, channel by channel, so that a channel's lanes stay in
// registers across the group (the group's runs are that many sequential
// streams); per channel the additions are in the order of n either way.
// Runs of 1 KiB or more are long enough to pay for their lanes' trip to memory
// and are walked in memory order (groups of one). The sums stay two-level
// across runs too: a group's sums start from zero and join a block, which
// joins the channel's total every BLOCK groups (a run shorter than LANES puts
// one term in a lane: added straight across n, the lane's error would grow
// with the count of runs).
constexpr i64 SHORT_GROUP = 8, GROUPED_RUN_BYTES = 1024;

template <class Run>
inline void short_runs(i64 n0, i64 n1, i64 channels, i64 run_bytes, Run run, double* s, double* q) {
    const i64 group = run_bytes < GROUPED_RUN_BYTES ? SHORT_GROUP : 1;
    const bool one_group = n1 - n0 <= group;
    // per channel: the block's sums (two vectors), then the total's (two)
    std::vector<double> lanes(one_group ? 0 : 4 * channels * LANES, 0.0);
    i64 groups = 0;
    for (i64 g0 = n0; g0 < n1; g0 += group) {
        const i64 g1 = (g0 + group < n1) ? g0 + group : n1;
        const bool last = g1 == n1, flush = last || ++groups % BLOCK == 0;
        for (i64 c = 0; c < channels; ++c) {
            Lanes a = {}, b = {};
            for (i64 n = g0; n < g1; ++n) run(n, c, a, b);
            if (!one_group) {
                double* la = lanes.data() + 4 * c * LANES;
                a += load_sum(la);
                b += load_sum(la + LANES);
                if (flush) {
                    a += load_sum(la + 2 * LANES);
                    b += load_sum(la + 3 * LANES);
                    store_sum(la + 2 * LANES, a);
                    store_sum(la + 3 * LANES, b);
                    a = b = Lanes{};
                }
                store_sum(la, a);
                store_sum(la + LANES, b);
                if (!last) continue;
                a = load_sum(la + 2 * LANES);
                b = load_sum(la + 3 * LANES);
            }
            if (last) {
                s[c] = lane_total(a);
                q[c] = lane_total(b);
            }
        }
    }
}

template <class T>
inline void run_sums_into(const T* v, i64 len, double pv, Lanes& A, Lanes& B) {
    lane_sums_into(len, [&](i64 i, Lanes& u, Lanes& w) {
        const Lanes d = to_double<T>(load_lanes(v + i)) - pv;
        u = d;
        w = d * d;
    }, [&](i64 i, double& u, double& w) {
        const double d = double(v[i]) - pv;
        u = d;
        w = d * d;
    }, A, B);
}

template <class T>
inline void run_sums(const T* v, i64 len, double pv, double& s, double& q) {
    Lanes a = {}, b = {};
    run_sums_into(v, len, pv, a, b);
    s = lane_total(a);
    q = lane_total(b);
}

template <class T>
void stats_short(const T* x, i64 n0, i64 n1, i64 inner, i64 channels, const double* pivot, double* s, double* q) {
    short_runs(n0, n1, channels, inner * i64(sizeof(T)), [&](i64 n, i64 c, Lanes& A, Lanes& B) {
        run_sums_into(x + (n * channels + c) * inner, inner, pivot[c], A, B);
    }, s, q);
}

template <class T>
void stats_runs(const T* x, i64 inner, i64 channels, i64 piece, i64 pieces, i64 q0, i64 q1,
                const double* pivot, double* s, double* q) {
    for (i64 k = q0; k < q1; ++k) {
        const i64 run = k / pieces, start = (k % pieces) * piece;
        const i64 len = (inner - start < piece) ? inner - start : piece;
        run_sums(x + run * inner + start, len, pivot[run % channels], s[k], q[k]);
    }
}

// -- pivots and totals ---------------------------------------------------------
// pivot[j] for j < width (a multiple of C): the mean of x[n, j % C, i] over n < k1,
// i < k2, or 0 where that is not finite
template <class T>
void pivots(const T* x, i64 channels, i64 inner, i64 k1, i64 k2, i64 width, double* pivot) {
    for (i64 c = 0; c < channels; ++c) {
        double t = 0.0;
        for (i64 n = 0; n < k1; ++n)
            for (i64 i = 0; i < k2; ++i) t += double(x[(n * channels + c) * inner + i]);
        t /= double(k1 * k2);
        pivot[c] = (t - t == 0.0) ? t : 0.0;  // finite
    }
    for (i64 j = channels; j < width; ++j) pivot[j] = pivot[j % channels];
}

// The total over parts of channel c's terms a[c * sc + p * sp + k * sk], p < P, k < K,
// in that order, two-level; plus rest[c] when rest is given.
inline double total(const double* a, i64 c, i64 P, i64 K, i64 sp, i64 sk, i64 sc, const double* rest) {
    double t = 0.0, b = 0.0;
    i64 terms = 0;
    const double* base = a + c * sc;
    for (i64 p = 0; p < P; ++p)
        for (i64 k = 0; k < K; ++k) {
            b += base[p * sp + k * sk];
            if (++terms == BLOCK) { t += b; b = 0.0; terms = 0; }
        }
    t += b;
    if (rest) t += rest[c];
    return t;
}

// mean and M2 per channel from the sums about the pivot; returns 1 when a
// channel's pivot is far from its mean (Q > ratio * M2)
template <class T>
int stats_finish(i64 channels, i64 P, i64 K, i64 sp, i64 sk, i64 sc, const double* s, const double* q,
                 const double* rs, const double* rq, double count, const double* pivot, double ratio, T* mean,
                 T* m2) {
    int far = 0;
    for (i64 c = 0; c < channels; ++c) {
        const double S = total(s, c, P, K, sp, sk, sc, rs), Q = total(q, c, P, K, sp, sk, sc, rq);
        const double dev = S / count, M2 = Q - S * dev;
        if (Q > ratio * M2) far = 1;
        mean[c] = T(pivot[c] + dev);
        m2[c] = T(M2);
    }
    return far;
}

// The whole statistics of one call in the calling thread: pivots, the parts
// of the shape's layout in order (kind 0 rows, 1 short, 2 runs: the cuts the
// Python side makes, so the sums are the very ones its thread pool adds),
// the totals, and once more about the mean where a pivot was far from it.
template <class T>
void stats_serial(const T* x, int kind, i64 outer, i64 channels, i64 inner, i64 width, const i64* bounds,
                  i64 nbounds, i64 rest, i64 piece, i64 pieces, i64 size, i64 P, i64 K, i64 sp, i64 sk, i64 sc,
                  i64 k1, i64 k2, double ratio, T* mean, T* m2) {
    std::vector<double> pivot(width), buf(2 * (size + channels));
    pivots(x, channels, inner, k1, k2, width, pivot.data());
    double *s = buf.data(), *q = s + size, *rs = nullptr, *rq = nullptr;
    const double count = double(outer) * double(inner);
    for (int again = 0; again < 2; ++again) {
        const double* pv = pivot.data();
        if (kind == 0) {
            for (i64 p = 0; p + 1 < nbounds; ++p)
                stats_rows(x + bounds[p] * width, bounds[p + 1] - bounds[p], width, pv, s + p * width, q + p * width);
            if (rest) {
                rs = buf.data() + 2 * size;
                rq = rs + channels;
                stats_rows(x + bounds[nbounds - 1] * width, rest, channels, pv, rs, rq);
            }
        } else if (kind == 1) {
            for (i64 p = 0; p + 1 < nbounds; ++p)
                stats_short(x, bounds[p], bounds[p + 1], inner, channels, pv, s + p * channels, q + p * channels);
        } else {
            stats_runs(x, inner, channels, piece, pieces, 0, outer * channels * pieces, pv, s, q);
        }
        const int far = stats_finish(channels, P, K, sp, sk, sc, s, q, rs, rq, count, pv, ratio, mean, m2);
        if (!far || again) return;
        for (i64 c = 0; c < channels; ++c) {
            const double m = double(mean[c]);
            if (m - m == 0.0) pivot[c] = m;  // about the mean found, where finite
        }
        for (i64 j = channels; j < width; ++j) pivot[j] = pivot[j % channels];
    }
}

template <class T>
void sums_finish(i64 channels, i64 P, i64 K, i64 sp, i64 sk, i64 sc, const double* s, const double* q,
                 const double* rs, const double* rq, T* s1, T* s2) {
    for (i64 c = 0; c < channels; ++c) {
        s1[c] = T(total(s, c, P, K, sp, sk, sc, rs));
        s2[c] = T(total(q, c, P, K, sp, sk, sc, rq));
    }
}

// -- streamed output ---------------------------------------------------------
// An output too large to stay in cache is better written with non-temporal
// stores: a plain store first reads the line it writes (a third stream of
// memory traffic beside x and y). The streamed loops compute whole vectors of
// LANES outputs with the plain loops' expressions and store each one
// non-temporally where the output is aligned to the vector; the elements
// before the first boundary and after the last are stored plainly. (Computing
// into an L1 buffer and streaming it out was slower than plain stores on an
// AMD EPYC: the buffer's extra pass stalls behind the loads of x.)
template <class T>
constexpr i64 VECTOR_BYTES = i64(sizeof(TLanes<T>));

inline bool aligned_to(const void* p, i64 bytes) { return (reinterpret_cast<std::uintptr_t>(p) & (bytes - 1)) == 0; }

// one vector of lanes to p (aligned to VECTOR_BYTES<T>), non-temporally where the CPU has such stores
template <class T>
inline void stream_lanes(T* p, TLanes<T> v) {
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4)
        _mm256_stream_ps(reinterpret_cast<float*>(p), (__m256)v);
    else
        _mm512_stream_pd(reinterpret_cast<double*>(p), (__m512d)v);
#elif defined(__AVX__)
    if constexpr (sizeof(T) == 4) {
        _mm256_stream_ps(reinterpret_cast<float*>(p), (__m256)v);
    } else {
        __m256d h[2];
        __builtin_memcpy(h, &v, sizeof v);
        _mm256_stream_pd(reinterpret_cast<double*>(p), h[0]);
        _mm256_stream_pd(reinterpret_cast<double*>(p) + 4, h[1]);
    }
#elif defined(__SSE2__)
    constexpr int N = int(sizeof v / 16);
    if constexpr (sizeof(T) == 4) {
        __m128 h[N];
        __builtin_memcpy(h, &v, sizeof v);
        for (int k = 0; k < N; ++k) _mm_stream_ps(reinterpret_cast<float*>(p) + 4 * k, h[k]);
    } else {
        __m128d h[N];
        __builtin_memcpy(h, &v, sizeof v);
        for (int k = 0; k < N; ++k) _mm_stream_pd(reinterpret_cast<double*>(p) + 2 * k, h[k]);
    }
#else
    __builtin_memcpy(p, &v, sizeof v);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
    _mm_sfence();  // streamed stores are weakly ordered: visible before the call returns
#endif
}

// Elements [e0, e1) of y0 (and y1, which may be null): one(e) computes and
// stores element e plainly; lanes(e, v0, v1) computes elements e .. e + LANES - 1
// into v0 (and v1), streamed here for each e on y0's vector boundaries. y1 is
// streamed too where it is aligned like y0, else stored plainly. walk.step(n)
// moves a walker (the elements' channel coefficients) n elements on.
template <class T, class Walk, class One, class Vec>
inline void stream_elements(T* y0, T* y1, i64 e0, i64 e1, Walk& walk, One one, Vec lanes) {
    constexpr i64 VB = VECTOR_BYTES<T>;
    i64 e = e0;
    for (; e < e1 && !aligned_to(y0 + e, VB); ++e, walk.step(1)) one(e);
    const bool y1_streamed = y1 && aligned_to(y1 + e, VB);
    for (; e + LANES <= e1; e += LANES, walk.step(LANES)) {
        TLanes<T> v0, v1;
        lanes(e, v0, v1);
        stream_lanes(y0 + e, v0);
        if (y1) {
            if (y1_streamed)
                stream_lanes(y1 + e, v1);
            else
                __builtin_memcpy(y1 + e, &v1, sizeof v1);
        }
    }
    for (; e < e1; ++e, walk.step(1)) one(e);
    stream_fence();
}

// Walkers: the coefficients of the element at hand, one at a time (at) or
// LANES at a time (lanes).
// rows of `width`, coefficients per column, padded: v[j] for j < width + LANES
// (v[j % width]), so that LANES of them load as one vector at any column
template <class T>
struct RowWalk {
    i64 j, width;
    void step(i64 n) {
        j += n;
        if (j >= width) j -= width;
    }
    T at(const T* v) const { return v[j]; }
    TLanes<T> lanes(const T* v) const { return load_lanes(v + j); }
};

// runs of `inner` (at least LANES) elements, channel = run % channels: a
// vector of lanes holds one channel's coefficient, or two where it crosses
// into the next run
template <class T>
struct RunWalk {
    i64 c, i, inner, channels;
    void step(i64 n) {
        i += n;
        if (i >= inner) {
            i -= inner;
            if (++c == channels) c = 0;
        }
    }
    T at(const T* v) const { return v[c]; }
    // (branch-free: a branch here gets the loop body duplicated, and then the
    // compiler no longer fuses its multiply-adds as the plain loops do)
    TLanes<T> lanes(const T* v) const {
        typedef typename LanesOf<T>::mask Mask;
        const Mask lane = {0, 1, 2, 3, 4, 5, 6, 7};
        const i64 next = c + 1 == channels ? 0 : c + 1;
        const i64 left = inner - i < LANES ? inner - i : LANES;  // lanes still in this run
        return lane < typename LanesOf<T>::lane_int(left) ? broadcast(v[c]) : broadcast(v[next]);
    }
};

template <class T>
inline TLanes<T> relu_lanes(TLanes<T> z) {
    const TLanes<T> zero = {};
    return z < T(0) ? zero : z;  // NaN stays NaN
}

// -- normalize: y = act((x - mean) * scale + shift [+ side]) ----------------
template <class T, bool SIDE, bool RELU>
void normalize_rows(const T* x, const T* side, T* y, i64 rows, i64 width,
                    const T* mean, const T* scale, const T* shift) {
    for (i64 r = 0; r < rows; ++r) {
        const i64 o = r * width;
#pragma omp simd
        for (i64 j = 0; j < width; ++j) {
            T z = (x[o + j] - mean[j]) * scale[j] + shift[j];
            if (SIDE) z = z + side[o + j];
            y[o + j] = RELU ? relu(z) : z;
        }
    }
}

// runs [run0, run1) of `inner` elements each, channel = run % channels
template <class T, bool SIDE, bool RELU>
void normalize_runs(const T* x, const T* side, T* y, i64 inner, i64 channels, i64 run0, i64 run1,
                    const T* mean, const T* scale, const T* shift) {
    for (i64 run = run0; run < run1; ++run) {
        const i64 c = run % channels, o = run * inner;
        const T m = mean[c], s = scale[c], h = shift[c];
#pragma omp simd
        for (i64 i = 0; i < inner; ++i) {
            T z = (x[o + i] - m) * s + h;
            if (SIDE) z = z + side[o + i];
            y[o + i] = RELU ? relu(z) : z;
        }
    }
}

// the same two loops, the output streamed (flag 8); the rows' coefficients
// padded (RowWalk)
template <class T, bool SIDE, bool RELU, class Walk>
inline void normalize_streamed(const T* x, const T* side, T* y, i64 e0, i64 e1, Walk& w, const T* mean,
                               const T* scale, const T* shift) {
    stream_elements<T>(y, nullptr, e0, e1, w, [&](i64 e) {
        T z = (x[e] - w.at(mean)) * w.at(scale) + w.at(shift);
        if (SIDE) z = z + side[e];
        y[e] = RELU ? relu(z) : z;
    }, [&](i64 e, TLanes<T>& v, TLanes<T>&) {
        TLanes<T> z = (load_lanes(x + e) - w.lanes(mean)) * w.lanes(scale) + w.lanes(shift);
        if (SIDE) z = z + load_lanes(side + e);
        v = RELU ? relu_lanes<T>(z) : z;
    });
}

template <class T, bool SIDE, bool RELU>
void normalize_rows_streamed(const T* x, const T* side, T* y, i64 rows, i64 width,
                             const T* mean, const T* scale, const T* shift) {
    RowWalk<T> w{0, width};
    normalize_streamed<T, SIDE, RELU>(x, side, y, 0, rows * width, w, mean, scale, shift);
}

template <class T, bool SIDE, bool RELU>
void normalize_runs_streamed(const T* x, const T* side, T* y, i64 inner, i64 channels, i64 run0, i64 run1,
                             const T* mean, const T* scale, const T* shift) {
    if (inner < LANES) {
        normalize_runs<T, SIDE, RELU>(x, side, y, inner, channels, run0, run1, mean, scale, shift);
        return;
    }
    RunWalk<T> w{run0 % channels, 0, inner, channels};
    normalize_streamed<T, SIDE, RELU>(x, side, y, run0 * inner, run1 * inner, w, mean, scale, shift);
}

// -- backward sums: S1 = sum(dy'), S2 = sum(dy' (x - mean)) ------------------
template <class T, bool SIDE, bool RELU, i64 N>
inline void bwd_sums_tile(const T* dy, const T* x, const T* side, i64 r0, i64 r1, i64 width, i64 j0, i64 n,
                          const T* mean, const T* pmean, const T* pscale, const T* pshift, double* s1, double* s2) {
    double ba[N] = {0.0}, bb[N] = {0.0};
    for (i64 r = r0; r < r1; ++r) {
        const i64 o = r * width + j0;
        prefetch_ahead(dy + o, width, n);
        prefetch_ahead(x + o, width, n);
#pragma omp simd
        for (i64 k = 0; k < (N == TILE ? N : n); ++k) {
            const i64 j = j0 + k;
            const T g = dy_prime<T, SIDE, RELU>(dy[o + k], x[o + k], side, o + k, pmean[j], pscale[j], pshift[j]);
            ba[k] += double(g);
            bb[k] += double(g) * double(x[o + k] - mean[j]);
        }
    }
    for (i64 k = 0; k < (N == TILE ? N : n); ++k) { s1[j0 + k] += ba[k]; s2[j0 + k] += bb[k]; }
}

template <class T, bool SIDE, bool RELU>
void bwd_sums_rows(const T* dy, const T* x, const T* side, i64 rows, i64 width, const T* mean,
                   const T* pmean, const T* pscale, const T* pshift, double* s1, double* s2) {
    for (i64 j = 0; j < width; ++j) { s1[j] = 0.0; s2[j] = 0.0; }
    const i64 tiles = width / TILE * TILE;
    for (i64 r0 = 0; r0 < rows; r0 += BLOCK) {
        const i64 r1 = (r0 + BLOCK < rows) ? r0 + BLOCK : rows;
        for (i64 j0 = 0; j0 < tiles; j0 += TILE)
            bwd_sums_tile<T, SIDE, RELU, TILE>(dy, x, side, r0, r1, width, j0, TILE, mean, pmean, pscale, pshift,
                                               s1, s2);
        if (tiles < width)
            bwd_sums_tile<T, SIDE, RELU, TILE - 1>(dy, x, side, r0, r1, width, tiles, width - tiles, mean, pmean,
                                                   pscale, pshift, s1, s2);
    }
}

// dy_prime of LANES elements from e on
template <class T, bool SIDE, bool RELU, class C>
inline TLanes<T> dy_prime_lanes(TLanes<T> dy, TLanes<T> x, const T* side, i64 e, C pm, C ps, C ph) {
    if (!RELU) return dy;
    TLanes<T> z = (x - pm) * ps + ph;
    if (SIDE) z = z + load_lanes(side + e);
    const TLanes<T> zero = {};
    return dy * (z > T(0) ? broadcast(T(1)) : zero);
}

template <class T, bool SIDE, bool RELU>
inline void run_bwd_sums_into(const T* dy, const T* x, const T* side, i64 o, i64 len, T m, T pm, T ps, T ph,
                              Lanes& A, Lanes& B) {
    lane_sums_into(len, [&](i64 i, Lanes& u, Lanes& w) {
        const i64 e = o + i;
        const TLanes<T> xv = load_lanes(x + e);
        const TLanes<T> g = dy_prime_lanes<T, SIDE, RELU>(load_lanes(dy + e), xv, side, e, pm, ps, ph);
        u = to_double<T>(g);
        w = u * to_double<T>(xv - m);
    }, [&](i64 i, double& u, double& w) {
        const i64 e = o + i;
        const T g = dy_prime<T, SIDE, RELU>(dy[e], x[e], side, e, pm, ps, ph);
        u = double(g);
        w = double(g) * double(x[e] - m);
    }, A, B);
}

template <class T, bool SIDE, bool RELU>
inline void run_bwd_sums(const T* dy, const T* x, const T* side, i64 o, i64 len, T m, T pm, T ps, T ph,
                         double& s1, double& s2) {
    Lanes a = {}, b = {};
    run_bwd_sums_into<T, SIDE, RELU>(dy, x, side, o, len, m, pm, ps, ph, a, b);
    s1 = lane_total(a);
    s2 = lane_total(b);
}

template <class T, bool SIDE, bool RELU>
void bwd_sums_short(const T* dy, const T* x, const T* side, i64 n0, i64 n1, i64 inner, i64 channels,
                    const T* mean, const T* pmean, const T* pscale, const T* pshift, double* s1, double* s2) {
    short_runs(n0, n1, channels, inner * i64(sizeof(T)), [&](i64 n, i64 c, Lanes& A, Lanes& B) {
        run_bwd_sums_into<T, SIDE, RELU>(dy, x, side, (n * channels + c) * inner, inner, mean[c], pmean[c],
                                         pscale[c], pshift[c], A, B);
    }, s1, s2);
}

template <class T, bool SIDE, bool RELU>
void bwd_sums_runs(const T* dy, const T* x, const T* side, i64 inner, i64 channels, i64 piece, i64 pieces,
                   i64 q0, i64 q1, const T* mean, const T* pmean, const T* pscale, const T* pshift,
                   double* s1, double* s2) {
    for (i64 k = q0; k < q1; ++k) {
        const i64 run = k / pieces, start = (k % pieces) * piece, c = run % channels;
        const i64 len = (inner - start < piece) ? inner - start : piece;
        run_bwd_sums<T, SIDE, RELU>(dy, x, side, run * inner + start, len, mean[c], pmean[c], pscale[c],
                                    pshift[c], s1[k], s2[k]);
    }
}

// The backward's sums of one call in the calling thread (as stats_serial: the
// Python side's parts, in order, then the totals)
template <class T, bool SIDE, bool RELU>
void bwd_sums_serial(const T* dy, const T* x, const T* side, int kind, i64 outer, i64 channels, i64 inner,
                     i64 width, const i64* bounds, i64 nbounds, i64 rest, i64 piece, i64 pieces, i64 size, i64 P,
                     i64 K, i64 sp, i64 sk, i64 sc, const T* mean, const T* pmean, const T* pscale,
                     const T* pshift, T* s1, T* s2) {
    std::vector<double> buf(2 * (size + channels));
    double *a = buf.data(), *b = a + size, *ra = nullptr, *rb = nullptr;
    if (kind == 0) {
        for (i64 p = 0; p + 1 < nbounds; ++p) {
            const i64 o = bounds[p] * width;
            bwd_sums_rows<T, SIDE, RELU>(dy + o, x + o, SIDE ? side + o : side, bounds[p + 1] - bounds[p], width,
                                         mean, pmean, pscale, pshift, a + p * width, b + p * width);
        }
        if (rest) {
            ra = buf.data() + 2 * size;
            rb = ra + channels;
            const i64 o = bounds[nbounds - 1] * width;
            bwd_sums_rows<T, SIDE, RELU>(dy + o, x + o, SIDE ? side + o : side, rest, channels, mean, pmean,
                                         pscale, pshift, ra, rb);
        }
    } else if (kind == 1) {
        for (i64 p = 0; p + 1 < nbounds; ++p)
            bwd_sums_short<T, SIDE, RELU>(dy, x, side, bounds[p], bounds[p + 1], inner, channels, mean, pmean,
                                          pscale, pshift, a + p * channels, b + p * channels);
    } else {
        bwd_sums_runs<T, SIDE, RELU>(dy, x, side, inner, channels, piece, pieces, 0, outer * channels * pieces,
                                     mean, pmean, pscale, pshift, a, b);
    }
    sums_finish(channels, P, K, sp, sk, sc, a, b, ra, rb, s1, s2);
}

// -- backward apply: dx = dy' * scale - ((x - mean) * k2 + k1); dside = dy' --
template <class T, bool SIDE, bool RELU, bool DSIDE>
void bwd_apply_rows(const T* dy, const T* x, const T* side, T* dx, T* dside, i64 rows, i64 width,
                    const T* pmean, const T* pscale, const T* pshift, const T* mean, const T* k1, const T* k2) {
    for (i64 r = 0; r < rows; ++r) {
        const i64 o = r * width;
#pragma omp simd
        for (i64 j = 0; j < width; ++j) {
            const T g = dy_prime<T, SIDE, RELU>(dy[o + j], x[o + j], side, o + j, pmean[j], pscale[j], pshift[j]);
            dx[o + j] = g * pscale[j] - ((x[o + j] - mean[j]) * k2[j] + k1[j]);
            if (DSIDE) dside[o + j] = g;
        }
    }
}

template <class T, bool SIDE, bool RELU, bool DSIDE>
void bwd_apply_runs(const T* dy, const T* x, const T* side, T* dx, T* dside, i64 inner, i64 channels,
                    i64 run0, i64 run1, const T* pmean, const T* pscale, const T* pshift,
                    const T* mean, const T* k1, const T* k2) {
    for (i64 run = run0; run < run1; ++run) {
        const i64 c = run % channels, o = run * inner;
        const T pm = pmean[c], ps = pscale[c], ph = pshift[c], m = mean[c], a = k1[c], b = k2[c];
#pragma omp simd
        for (i64 i = 0; i < inner; ++i) {
            const i64 e = o + i;
            const T g = dy_prime<T, SIDE, RELU>(dy[e], x[e], side, e, pm, ps, ph);
            dx[e] = g * ps - ((x[e] - m) * b + a);
            if (DSIDE) dside[e] = g;
        }
    }
}

// the same two loops, the outputs streamed (flag 8); the rows' coefficients
// padded (RowWalk)
template <class T, bool SIDE, bool RELU, bool DSIDE, class Walk>
inline void bwd_apply_streamed(const T* dy, const T* x, const T* side, T* dx, T* dside, i64 e0, i64 e1, Walk& w,
                               const T* pmean, const T* pscale, const T* pshift, const T* mean, const T* k1,
                               const T* k2) {
    stream_elements<T>(dx, DSIDE ? dside : nullptr, e0, e1, w, [&](i64 e) {
        const T g = dy_prime<T, SIDE, RELU>(dy[e], x[e], side, e, w.at(pmean), w.at(pscale), w.at(pshift));
        dx[e] = g * w.at(pscale) - ((x[e] - w.at(mean)) * w.at(k2) + w.at(k1));
        if (DSIDE) dside[e] = g;
    }, [&](i64 e, TLanes<T>& v, TLanes<T>& vs) {
        const TLanes<T> xv = load_lanes(x + e), ps = w.lanes(pscale);
        const TLanes<T> g = dy_prime_lanes<T, SIDE, RELU>(load_lanes(dy + e), xv, side, e, w.lanes(pmean), ps,
                                                          w.lanes(pshift));
        v = g * ps - ((xv - w.lanes(mean)) * w.lanes(k2) + w.lanes(k1));
        if (DSIDE) vs = g;
    });
}

template <class T, bool SIDE, bool RELU, bool DSIDE>
void bwd_apply_rows_streamed(const T* dy, const T* x, const T* side, T* dx, T* dside, i64 rows, i64 width,
                             const T* pmean, const T* pscale, const T* pshift, const T* mean, const T* k1,
                             const T* k2) {
    RowWalk<T> w{0, width};
    bwd_apply_streamed<T, SIDE, RELU, DSIDE>(dy, x, side, dx, dside, 0, rows * width, w, pmean, pscale, pshift, mean,
                                             k1, k2);
}

template <class T, bool SIDE, bool RELU, bool DSIDE>
void bwd_apply_runs_streamed(const T* dy, const T* x, const T* side, T* dx, T* dside, i64 inner, i64 channels,
                             i64 run0, i64 run1, const T* pmean, const T* pscale, const T* pshift,
                             const T* mean, const T* k1, const T* k2) {
    if (inner < LANES) {
        bwd_apply_runs<T, SIDE, RELU, DSIDE>(dy, x, side, dx, dside, inner, channels, run0, run1, pmean, pscale,
                                             pshift, mean, k1, k2);
        return;
    }
    RunWalk<T> w{run0 % channels, 0, inner, channels};
    bwd_apply_streamed<T, SIDE, RELU, DSIDE>(dy, x, side, dx, dside, run0 * inner, run1 * inner, w, pmean, pscale,
                                             pshift, mean, k1, k2);
}

// -- the training forward's per-channel steps -----------------------------------
// These round exactly as the NumPy code's ufuncs do, one operation at a time:
// a product stored through a volatile is never fused with the sum after it.

// var = M2 / n (in place), invstd = 1 / sqrt(var + eps), scale = gamma * invstd
// (invstd without gamma), shift = gamma * 0 + beta (NaN where gamma is not finite)
template <class T>
void fold(i64 channels, i64 n, T* var, double eps, const T* gamma, const T* beta, T* invstd, T* scale, T* shift) {
    const T tn = T(n), te = T(eps);
    for (i64 c = 0; c < channels; ++c) {
        const T v = var[c] / tn;
        var[c] = v;
        const T inv = T(1) / std::sqrt(v + te);
        invstd[c] = inv;
        if (gamma) {
            volatile T g0 = gamma[c] * T(0);
            scale[c] = gamma[c] * inv;
            shift[c] = beta ? T(g0) + beta[c] : T(g0);
        } else {
            scale[c] = inv;
            shift[c] = beta ? beta[c] + T(0) : T(0);
        }
    }
}

template <class T>
inline T blend(T old, T batch, T a) {
    volatile T t = (old - batch) * a;
    return old - T(t);
}

// moving statistics: out = in - (in - batch) * a, or batch where there is no
// in; the variance fed in Bessel-corrected (times n / (n - 1)) when asked.
// An out may be its in (in place).
template <class T>
void moving(i64 channels, i64 n, double a, int bessel, const T* mean, const T* var, const T* mean_in,
            const T* var_in, T* mean_out, T* var_out) {
    const T r = T(n) / T(n > 1 ? n - 1 : 1), ta = T(a);
    for (i64 c = 0; c < channels; ++c) {
        T bv = var[c];
        if (bessel) {
            volatile T corrected = var[c] * r;
            bv = corrected;
        }
        if (mean_out) mean_out[c] = mean_in ? blend(mean_in[c], mean[c], ta) : mean[c];
        if (var_out) var_out[c] = var_in ? blend(var_in[c], bv, ta) : bv;
    }
}

// y = act((x - mean) * scale + shift [+ side]) over a whole (outer, C, inner)
// array in this thread: rows of k * C (k = width / C) when inner == 1, as the
// Python side cuts them, else runs
template <class T>
void normalize_all(int flags, const T* x, const T* side, T* y, i64 outer, i64 channels, i64 inner, i64 width,
                   const T* mean, const T* scale, const T* shift) {
    if (inner != 1) {
        CUBN_DISPATCH(CUBN_FLAGS2, normalize_runs, T, flags, x, side, y, inner, channels, 0, outer * channels, mean,
                      scale, shift);
        return;
    }
    const i64 k = width / channels, full = outer / k, rest = outer - full * k;
    const i64 padded = width + LANES;  // (RowWalk)
    std::vector<T> tiled(3 * padded);
    for (i64 j = 0; j < padded; ++j) {
        tiled[j] = mean[j % channels];
        tiled[padded + j] = scale[j % channels];
        tiled[2 * padded + j] = shift[j % channels];
    }
    const T *tm = tiled.data(), *ts = tm + padded, *th = ts + padded;
    CUBN_DISPATCH(CUBN_FLAGS2, normalize_rows, T, flags, x, side, y, full, width, tm, ts, th);
    if (rest) {
        const i64 o = full * width;
        CUBN_DISPATCH(CUBN_FLAGS2, normalize_rows, T, flags, x + o, side ? side + o : side, y + o, rest, channels, tm,
                      ts, th);
    }
}

// -- the backward's per-channel step and the whole backward of one thread --------
// dgamma = gcoef * S2 + hcoef * S1; with training statistics k1 = scale * S1 / n
// and k2 = scale * invstd^2 * S2 / n (as (((scale * invstd) * invstd) * S2) * (1 / n),
// 1 / n = 0 where n is 0), else 0: each product rounded, as the NumPy code's ufuncs
template <class T>
void bwd_coefficients(i64 channels, int training, const T* s1, const T* s2, const T* gcoef, const T* hcoef,
                      const T* count, const T* scale, const T* invstd, T* dgamma, T* k1, T* k2) {
    for (i64 c = 0; c < channels; ++c) {
        volatile T g = gcoef[c] * s2[c];
        volatile T h = hcoef[c] * s1[c];
        dgamma[c] = T(g) + T(h);
        if (training) {
            const T inv_n = count[c] > T(0) ? T(1) / count[c] : T(0);
            k1[c] = (scale[c] * s1[c]) * inv_n;
            k2[c] = (((scale[c] * invstd[c]) * invstd[c]) * s2[c]) * inv_n;
        } else {
            k1[c] = T(0);
            k2[c] = T(0);
        }
    }
}

// dx (and dside) over a whole (outer, C, inner) array in this thread, rows or runs
// as the Python side cuts them
template <class T>
void bwd_apply_all(int flags, const T* dy, const T* x, const T* side, T* dx, T* dside, i64 outer, i64 channels,
                   i64 inner, i64 width, const T* pmean, const T* pscale, const T* pshift, const T* mean,
                   const T* k1, const T* k2) {
    if (inner != 1) {
        CUBN_DISPATCH(CUBN_FLAGS3, bwd_apply_runs, T, flags, dy, x, side, dx, dside, inner, channels, 0,
                      outer * channels, pmean, pscale, pshift, mean, k1, k2);
        return;
    }
    const i64 k = width / channels, full = outer / k, rest = outer - full * k;
    const i64 padded = width + LANES;  // (RowWalk)
    std::vector<T> tiled(6 * padded);
    const T* src[6] = {pmean, pscale, pshift, mean, k1, k2};
    for (int v = 0; v < 6; ++v)
        for (i64 j = 0; j < padded; ++j) tiled[v * padded + j] = src[v][j % channels];
    const T* t = tiled.data();
    const T *tpm = t, *tps = t + padded, *tph = t + 2 * padded, *tm = t + 3 * padded, *ta = t + 4 * padded,
            *tb = t + 5 * padded;
    CUBN_DISPATCH(CUBN_FLAGS3, bwd_apply_rows, T, flags, dy, x, side, dx, dside, full, width, tpm, tps, tph, tm, ta,
                  tb);
    if (rest) {
        const i64 o = full * width;
        CUBN_DISPATCH(CUBN_FLAGS3, bwd_apply_rows, T, flags, dy + o, x + o, side ? side + o : side, dx + o,
                      dside ? dside + o : dside, rest, channels, tpm, tps, tph, tm, ta, tb);
    }
}

// The whole backward in this thread: the sums (bwd_sums_serial), the
// coefficients, then dx (and dside) when dx is given
template <class T>
void backward_serial(int flags, const T* dy, const T* x, const T* side, T* dx, T* dside, int kind, i64 outer,
                     i64 channels, i64 inner, i64 width, const i64* bounds, i64 nbounds, i64 rest, i64 piece,
                     i64 pieces, i64 size, i64 P, i64 K, i64 sp, i64 sk, i64 sc, int training, const T* pmean,
                     const T* pscale, const T* pshift, const T* gcoef, const T* hcoef, const T* count,
                     const T* invstd, T* s1, T* s2, T* dgamma, T* k1, T* k2) {
    std::vector<T> tiled(4 * width);
    for (i64 j = 0; j < width; ++j) {
        tiled[j] = pmean[j % channels];
        tiled[width + j] = pmean[j % channels];
        tiled[2 * width + j] = pscale[j % channels];
        tiled[3 * width + j] = pshift[j % channels];
    }
    const T* t = tiled.data();
    CUBN_FLAGS2(bwd_sums_serial, T, flags, dy, x, side, kind, outer, channels, inner, width, bounds, nbounds, rest,
                piece, pieces, size, P, K, sp, sk, sc, t, t + width, t + 2 * width, t + 3 * width, s1, s2)
    bwd_coefficients(channels, training, s1, s2, gcoef, hcoef, count, pscale, invstd, dgamma, k1, k2);
    if (dx) bwd_apply_all(flags, dy, x, side, dx, dside, outer, channels, inner, width, pmean, pscale, pshift, pmean,
                          k1, k2);
}

// The inference forward's per-channel step, scale = gamma / sqrt(var + eps)
// (as invstd = 1 / sqrt(var + eps), then gamma * invstd) and shift = beta,
// then the normalization in this thread when y is given.
template <class T>
void infer_serial(int flags, const T* x, const T* side, T* y, i64 outer, i64 channels, i64 inner, i64 width,
                  double eps, const T* gamma, const T* beta, const T* mean, const T* var, T* scale, T* shift) {
    const T te = T(eps);
    for (i64 c = 0; c < channels; ++c) {
        const T inv = T(1) / std::sqrt(var[c] + te);
        scale[c] = gamma ? gamma[c] * inv : inv;
        shift[c] = beta ? beta[c] : T(0);
    }
    if (y) normalize_all(flags, x, side, y, outer, channels, inner, width, mean, scale, shift);
}

// A whole training forward in this thread: statistics (stats_serial), fold,
// the normalization when y is given, the moving statistics when an out is
// given. mean and var are outputs (var biased).
template <class T>
void train_serial(int flags, const T* x, const T* side, T* y, int kind, i64 outer, i64 channels, i64 inner,
                  i64 width, const i64* bounds, i64 nbounds, i64 rest, i64 piece, i64 pieces, i64 size, i64 P, i64 K,
                  i64 sp, i64 sk, i64 sc, i64 k1, i64 k2, double ratio, double eps, const T* gamma, const T* beta,
                  T* mean, T* var, T* invstd, T* scale, T* shift, double a, int bessel, const T* mean_in,
                  const T* var_in, T* mean_out, T* var_out) {
    stats_serial(x, kind, outer, channels, inner, width, bounds, nbounds, rest, piece, pieces, size, P, K, sp, sk,
                 sc, k1, k2, ratio, mean, var);
    fold(channels, outer * inner, var, eps, gamma, beta, invstd, scale, shift);
    if (y) normalize_all(flags, x, side, y, outer, channels, inner, width, mean, scale, shift);
    if (mean_out || var_out) moving(channels, outer * inner, a, bessel, mean, var, mean_in, var_in, mean_out, var_out);
}

}  // namespace

// -- the exported entry points (flags: see CUBN_FLAGS2) ----------------------
#define CUBN_EXPORT extern "C" __attribute__((visibility("default")))

// A shape's reduction plan as the Python side packs it (numpy_native._plan_block):
// kind, outer, C, inner, width, nbounds, rest, piece, pieces, size, P, K, sp,
// sk, sc, k1, k2, then the nbounds bounds
#define CUBN_PLAN(pl)                                                                                      \
    int((pl)[0]), (pl)[1], (pl)[2], (pl)[3], (pl)[4], (pl) + 17, (pl)[5], (pl)[6], (pl)[7], (pl)[8], (pl)[9], \
        (pl)[10], (pl)[11], (pl)[12], (pl)[13], (pl)[14]

#define CUBN_ENTRY_POINTS(T, SUF)                                                                          \
    CUBN_EXPORT void cubn_stats_rows_##SUF(const T* x, i64 rows, i64 width, const double* pivot, double* s, \
                                          double* q) {                                                     \
        stats_rows<T>(x, rows, width, pivot, s, q);                                                        \
    }                                                                                                      \
    CUBN_EXPORT void cubn_stats_short_##SUF(const T* x, i64 n0, i64 n1, i64 inner, i64 channels,            \
                                           const double* pivot, double* s, double* q) {                     \
        stats_short<T>(x, n0, n1, inner, channels, pivot, s, q);                                           \
    }                                                                                                      \
    CUBN_EXPORT void cubn_stats_runs_##SUF(const T* x, i64 inner, i64 channels, i64 piece, i64 pieces,       \
                                          i64 q0, i64 q1, const double* pivot, double* s, double* q) {      \
        stats_runs<T>(x, inner, channels, piece, pieces, q0, q1, pivot, s, q);                              \
    }                                                                                                      \
    CUBN_EXPORT void cubn_pivots_##SUF(const T* x, i64 channels, i64 inner, i64 k1, i64 k2, i64 width,         \
                                      double* pivot) {                                                      \
        pivots<T>(x, channels, inner, k1, k2, width, pivot);                                               \
    }                                                                                                      \
    CUBN_EXPORT int cubn_stats_finish_##SUF(i64 channels, i64 P, i64 K, i64 sp, i64 sk, i64 sc,             \
                                           const double* s, const double* q, const double* rs,              \
                                           const double* rq, double count, const double* pivot,             \
                                           double ratio, T* mean, T* m2) {                                  \
        return stats_finish<T>(channels, P, K, sp, sk, sc, s, q, rs, rq, count, pivot, ratio, mean, m2);    \
    }                                                                                                      \
    CUBN_EXPORT void cubn_stats_serial_##SUF(const T* x, const i64* plan, double ratio, T* mean, T* m2) {    \
        stats_serial<T>(x, CUBN_PLAN(plan), plan[15], plan[16], ratio, mean, m2);                           \
    }                                                                                                      \
    CUBN_EXPORT void cubn_fold_##SUF(i64 channels, i64 n, T* var, double eps, const T* gamma, const T* beta,   \
                                    T* invstd, T* scale, T* shift) {                                       \
        fold<T>(channels, n, var, eps, gamma, beta, invstd, scale, shift);                                 \
    }                                                                                                      \
    CUBN_EXPORT void cubn_moving_##SUF(i64 channels, i64 n, double a, int bessel, const T* mean,           \
                                      const T* var, const T* mean_in, const T* var_in, T* mean_out,        \
                                      T* var_out) {                                                        \
        moving<T>(channels, n, a, bessel, mean, var, mean_in, var_in, mean_out, var_out);                  \
    }                                                                                                      \
    CUBN_EXPORT void cubn_train_serial_##SUF(int flags, const T* x, const T* side, T* y, const i64* plan,    \
                                            double ratio, double eps, const T* gamma, const T* beta,         \
                                            T* mean, T* var, T* invstd, T* scale, T* shift, double a,        \
                                            int bessel, const T* mean_in, const T* var_in, T* mean_out,      \
                                            T* var_out) {                                                    \
        train_serial<T>(flags, x, side, y, CUBN_PLAN(plan), plan[15], plan[16], ratio, eps, gamma, beta, mean, \
                        var, invstd, scale, shift, a, bessel, mean_in, var_in, mean_out, var_out);          \
    }                                                                                                      \
    CUBN_EXPORT void cubn_infer_serial_##SUF(int flags, const T* x, const T* side, T* y, i64 outer,          \
                                            i64 channels, i64 inner, i64 width, double eps, const T* gamma,  \
                                            const T* beta, const T* mean, const T* var, T* scale,           \
                                            T* shift) {                                                     \
        infer_serial<T>(flags, x, side, y, outer, channels, inner, width, eps, gamma, beta, mean, var, scale, \
                        shift);                                                                            \
    }                                                                                                      \
    CUBN_EXPORT void cubn_bwd_coefficients_##SUF(i64 channels, int training, const T* s1, const T* s2,        \
                                                const T* gcoef, const T* hcoef, const T* count, const T* scale, \
                                                const T* invstd, T* dgamma, T* k1, T* k2) {                  \
        bwd_coefficients<T>(channels, training, s1, s2, gcoef, hcoef, count, scale, invstd, dgamma, k1, k2);  \
    }                                                                                                      \
    CUBN_EXPORT void cubn_backward_serial_##SUF(int flags, const T* dy, const T* x, const T* side, T* dx,   \
                                               T* dside, const i64* plan, int training, const T* pmean,     \
                                               const T* pscale, const T* pshift, const T* gcoef,            \
                                               const T* hcoef, const T* count, const T* invstd, T* s1,      \
                                               T* s2, T* dgamma, T* k1, T* k2) {                            \
        backward_serial<T>(flags, dy, x, side, dx, dside, CUBN_PLAN(plan), training, pmean, pscale, pshift,  \
                           gcoef, hcoef, count, invstd, s1, s2, dgamma, k1, k2);                            \
    }                                                                                                      \
    CUBN_EXPORT void cubn_sums_finish_##SUF(i64 channels, i64 P, i64 K, i64 sp, i64 sk, i64 sc,             \
                                           const double* s, const double* q, const double* rs,              \
                                           const double* rq, T* s1, T* s2) {                                \
        sums_finish<T>(channels, P, K, sp, sk, sc, s, q, rs, rq, s1, s2);                                  \
    }                                                                                                      \
    CUBN_EXPORT void cubn_normalize_rows_##SUF(int flags, const T* x, const T* side, T* y, i64 rows,         \
                                              i64 width, const T* mean, const T* scale, const T* shift) {    \
        CUBN_DISPATCH(CUBN_FLAGS2, normalize_rows, T, flags, x, side, y, rows, width, mean, scale, shift); \
    }                                                                                                      \
    CUBN_EXPORT void cubn_normalize_runs_##SUF(int flags, const T* x, const T* side, T* y, i64 inner,        \
                                              i64 channels, i64 run0, i64 run1, const T* mean,              \
                                              const T* scale, const T* shift) {                             \
        CUBN_DISPATCH(CUBN_FLAGS2, normalize_runs, T, flags, x, side, y, inner, channels, run0, run1,      \
                      mean, scale, shift);                                                                 \
    }                                                                                                      \
    CUBN_EXPORT void cubn_bwd_sums_rows_##SUF(int flags, const T* dy, const T* x, const T* side, i64 rows,   \
                                             i64 width, const T* mean, const T* pmean, const T* pscale,     \
                                             const T* pshift, double* s1, double* s2) {                     \
        CUBN_FLAGS2(bwd_sums_rows, T, flags, dy, x, side, rows, width, mean, pmean, pscale, pshift, s1, s2) \
    }                                                                                                      \
    CUBN_EXPORT void cubn_bwd_sums_short_##SUF(int flags, const T* dy, const T* x, const T* side, i64 n0,    \
                                              i64 n1, i64 inner, i64 channels, const T* mean,               \
                                              const T* pmean, const T* pscale, const T* pshift, double* s1, \
                                              double* s2) {                                                 \
        CUBN_FLAGS2(bwd_sums_short, T, flags, dy, x, side, n0, n1, inner, channels, mean, pmean, pscale,   \
                    pshift, s1, s2)                                                                        \
    }                                                                                                      \
    CUBN_EXPORT void cubn_bwd_sums_runs_##SUF(int flags, const T* dy, const T* x, const T* side, i64 inner,  \
                                             i64 channels, i64 piece, i64 pieces, i64 q0, i64 q1,           \
                                             const T* mean, const T* pmean, const T* pscale,                \
                                             const T* pshift, double* s1, double* s2) {                     \
        CUBN_FLAGS2(bwd_sums_runs, T, flags, dy, x, side, inner, channels, piece, pieces, q0, q1, mean,    \
                    pmean, pscale, pshift, s1, s2)                                                         \
    }                                                                                                      \
    CUBN_EXPORT void cubn_bwd_sums_serial_##SUF(int flags, const T* dy, const T* x, const T* side,          \
                                               const i64* plan, const T* mean, const T* pmean,              \
                                               const T* pscale, const T* pshift, T* s1, T* s2) {            \
        CUBN_FLAGS2(bwd_sums_serial, T, flags, dy, x, side, CUBN_PLAN(plan), mean, pmean, pscale, pshift, s1, \
                    s2)                                                                                    \
    }                                                                                                      \
    CUBN_EXPORT void cubn_bwd_apply_rows_##SUF(int flags, const T* dy, const T* x, const T* side, T* dx,     \
                                              T* dside, i64 rows, i64 width, const T* pmean,                \
                                              const T* pscale, const T* pshift, const T* mean, const T* k1, \
                                              const T* k2) {                                                \
        CUBN_DISPATCH(CUBN_FLAGS3, bwd_apply_rows, T, flags, dy, x, side, dx, dside, rows, width, pmean,   \
                      pscale, pshift, mean, k1, k2);                                                       \
    }                                                                                                      \
    CUBN_EXPORT void cubn_bwd_apply_runs_##SUF(int flags, const T* dy, const T* x, const T* side, T* dx,     \
                                              T* dside, i64 inner, i64 channels, i64 run0, i64 run1,        \
                                              const T* pmean, const T* pscale, const T* pshift,             \
                                              const T* mean, const T* k1, const T* k2) {                    \
        CUBN_DISPATCH(CUBN_FLAGS3, bwd_apply_runs, T, flags, dy, x, side, dx, dside, inner, channels,      \
                      run0, run1, pmean, pscale, pshift, mean, k1, k2);                                    \
    }

CUBN_ENTRY_POINTS(float, f4)
CUBN_ENTRY_POINTS(double, f8)

CUBN_EXPORT int cubn_native_abi(void) { return 11; }
