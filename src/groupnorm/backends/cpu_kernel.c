/* Group norm on the CPU, exact at any offset.

   x is (N, C, L) NCHW-contiguous (cl = 0) or (N, L, C) channels-last-contiguous (cl = 1), in
   float32, float64, bfloat16 or float16; groups are channel ranges offsets[g]..offsets[g+1].
   Arithmetic is in W (float64 for float64 x, else float32: half precision is widened
   exactly), sums in float64.

   Statistics, per (n, g), from blocks (NCHW: a range of the group's contiguous elements;
   channels-last: a range of positions with all channels):
     e       = x - shift in W, rounded relative to |e|, not to |x|: no loss at an offset;
             shift is near the block's mean: NCHW the mean of its first SHIFT elements;
             channels-last the group mean of the sample's first block in W (that block is
             two-pass: its mean around the group's first element p, then its squares
             around that mean);
     one pass S1 = sum(e), S2 = sum(e^2), each lane summing RUN terms in W before float64 takes
             them (positive e^2 terms: relative error <= RUN ulp of W); m = S1 / n and
             q = S2 - S1 m lose about 1 + m^2 n / q of that to cancellation, so a block with
             m^2 n > TRUST q (NaN included) takes both sums again while it is in cache,
             around its mean in W, c = shift + m: x - c is rounded relative to the spread,
             where x - shift was rounded relative to |m| (an outlier first element), and
             q = sum((x - c)^2) - n d^2 with d = mean(x - c) does not cancel;
     merged  in block order with Chan's formula in float64 (means relative to p), so results
             do not depend on the thread count: mean = p + m, var = q / count, and the
             mean's low part, what the float64 sum p + m leaves (two_sum_lo).
   Output, per element:
     y = ((x - hi) - lo) * A + B in W, hi + lo = mean with its low part (two W numbers:
     x - hi is rounded relative to |x - mean|; for float64 x, hi is the mean's float64
     number and lo its low part, without which xhat was off by |mean| rstd / 2^53),
     A = rstd * w[c] * (1 + scale[n,c]), B = b[c] * (1 + scale[n,c]) + shift[n,c] formed in
     float64, rstd = 1 / sqrt(var + eps); relu as max(y, 0) with NaN
     kept; rounded once to y's dtype (x's, or float32 when an epilogue follows).
     Channels-last folds lo into B (y = (x - hi) * A + (B - lo A), B - lo A in float64): one
     load fewer per vector; the extra rounding is relative to |B| + |lo A|, and
     |lo A| <= ulp(mean) rstd |w| / 2, far under the tolerance at any offset.

   Blocks and rows are shared among nthreads OpenMP threads when the tensor is large enough to
   pay for waking them. Entry points return 0, or -1 for dtypes this build does not serve.

   It is built as the Python extension module groupnorm_cpu_kernel (bottom of the file), whose
   functions take the tensors' data pointers as ints: a call costs well under a microsecond. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__AVX__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

/* Elements per block: a block read a second time is still in L2. */
#define BLOCK 16384
/* Terms each lane sums in W before float64 takes them. */
#define RUN 8
/* Channels-last sums sweep rows in strips of at most this many bytes of each row: RUN rows of
   all channels, with the next RUN prefetched, outgrew L1 at C = 1280 float32 (two 40 KB
   bands). Strips of 2 KB took the statistics 0.78x the time at (2, 1280, 16, 16), 0.90x at
   (2, 640, 32, 32) and 0.54x at (2, 960, 64, 64) float32 (float64 0.83-0.86x), the same bits;
   1 KB and 3 KB strips did worse (AMD EPYC, one thread). */
#define SWEEP_BYTES 2048
/* Rows of a channels-last sample in cache that its output takes per load of a channel
   vector's coefficients: (2, 1280, 8, 8) float32 0.87x the forward's time with two, 0.91x
   with four (on tensors streamed from memory interleaved rows had cost up to 1.4x). */
#define BAND 2
/* Per-chunk scratch of at most this many bytes lives on the stack: from the heap it took 9 %
   of the channels-last statistics' time at (2, 1280, 8, 8) (20 chunks a call). */
#define NEAR_BYTES 16384
/* NCHW blocks sum d = x - shift, shift the mean of their first SHIFT elements, in one pass;
   the largest m^2 n / q at which that variance is kept (it loses about 1 + that). */
#define SHIFT 8 /* the tree sum below takes 8 */
#define TRUST 1.0
/* NCHW groups of at most fused_max(dtype) elements are normalized right after their
   statistics, while in L2: x is read from memory once. 512 KB of float32 or float64 (a
   float32 (2, 960, 64, 64), groups of 480 KB: 0.90-0.94x the time of statistics then output);
   half precision 64K elements (128 KB): its larger groups took 1.03-1.11x as long fused. */
#define FUSED_MAX 131072 /* float32's, the largest of them, a multiple of BLOCK */
static int64_t fused_max(int dtype) { return dtype == F32 ? FUSED_MAX : FUSED_MAX / 2; }
/* Channels-last samples of at most this many bytes, when there are at least as many samples
   (or samples' chunks, cl_chunks) as threads, are each done whole by one thread (statistics,
   then output while in L2): one parallel region instead of three, no thread waiting on
   another's block (SD 8^2, (1, 1280, 8, 8) at two threads in chunks: 33-41 us where the two
   stages took 42-44, cpu_kernel_ab --forward, Intel Xeon). Half a core's L2, set by the
   loader (fused_cl_bytes()); 512 KB until then and at least. */
static int64_t fused_cl_bytes = 524288;
static int64_t elem_size(int dtype) { return dtype == F64 ? 8 : dtype == F32 ? 4 : 2; }
/* y of at least this many bytes is stored around the caches (put_f32); set by the loader
   (stream_min()), none until then. */
static int64_t stream_min = INT64_MAX;
static int streams(int64_t bytes) { return bytes >= stream_min; }
/* Below this many elements one thread does all: waking the others costs more. */
#define PARALLEL_MIN 65536
/* The forward below PARALLEL_MIN: as many threads as have this many elements each (NCHW, a
   task a group; channels-last, a task a sample). At two threads, against one (Intel Xeon,
   2026-12-05, the kernel's call): NCHW 8K-32K elements 0.72-0.95x the time (bfloat16
   0.72-0.85x), channels-last 32K 0.74-0.94x but 8K-16K 0.97-1.26x. */
#define FORWARD_THREAD_MIN_NCHW 4096
#define FORWARD_THREAD_MIN_CL 16384
static int forward_threads(int64_t n, int cl, int nthreads) {
    if (n >= PARALLEL_MIN) return nthreads;
    int64_t most = n / (cl ? FORWARD_THREAD_MIN_CL : FORWARD_THREAD_MIN_NCHW);
    return most < 1 ? 1 : most < nthreads ? (int)most : nthreads;
}

/* Channels-last statistics blocks: rows of all C channels, at least BLOCK elements and, up
   to BLOCK_MAX, at least CL_ROWS rows. Each block's per-channel sums are folded into groups,
   2 C scalar adds: blocks of BLOCK / C = 12 rows at C = 1280 spent 40 % of their summing
   time on the folds (perf). */
#define CL_ROWS 64
#define BLOCK_MAX 131072
static int64_t stats_rows(int64_t C) {
    int64_t want = CL_ROWS * C < BLOCK_MAX ? CL_ROWS * C : BLOCK_MAX;
    want = want < BLOCK ? BLOCK : want;
    return want / C > 0 ? want / C : 1;
}

typedef struct {
    double count, mean, m2; /* mean relative to the group's pivot */
} part_t;

typedef struct {
    int64_t base, start, len; /* an NCHW block: the group's first element, its own, its length */
} block_t;

/* What the output coefficients of every (n, c) are made of: mean and rstd per (n, g), the
   parameters in float64, scale and shift per (n, c) or NULL. */
typedef struct {
    int64_t N, C, G;
    const int64_t *offsets, *group_of;
    const double *mean, *rstd, *wd, *bd, *scale, *shift;
    double *lo; /* the part of each mean that a float64 number leaves (two_sum_lo), or NULL */
} coef_in_t;
/* Channels whose coefficients one task makes. */
#define COEF_CHUNK 256

/* for (t = 0; t < tasks; t++) BODY, shared among nthreads OpenMP threads when nthreads > 1;
   one thread does not enter OpenMP at all (a region costs microseconds even when off). */
#define FOR_TASKS(t, tasks, ...)                                                            \
    if (nthreads > 1) {                                                                     \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                  \
        for (int64_t t = 0; t < (tasks); t++) __VA_ARGS__                                   \
    } else                                                                                  \
        for (int64_t t = 0; t < (tasks); t++) __VA_ARGS__

/* for (t = 0; t < n1; t++) ONE; then, once all are done, for (u = 0; u < n2; u++) TWO: in
   one OpenMP region when nthreads > 1 (one wake-up of the threads, not two). ONE and TWO are
   single statements. */
#define FOR_TWO(t, n1, ONE, u, n2, TWO)                                                     \
    if (nthreads > 1) {                                                                     \
        _Pragma("omp parallel num_threads(nthreads)") {                                     \
            _Pragma("omp for schedule(static)") for (int64_t t = 0; t < (n1); t++) ONE;     \
            _Pragma("omp for schedule(static)") for (int64_t u = 0; u < (n2); u++) TWO;     \
        }                                                                                   \
    } else {                                                                                \
        for (int64_t t = 0; t < (n1); t++) ONE;                                             \
        for (int64_t u = 0; u < (n2); u++) TWO;                                             \
    }

/* Vectors of 8 elements (GCC vector extensions: AVX-512, AVX2 or SSE as the CPU has). */
typedef float vf __attribute__((vector_size(32)));
typedef double vd __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint64_t vq __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(16)));

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(u >> 16 | 0x40u); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + (u >> 16 & 1u)) >> 16); /* nearest, ties to even */
}

static inline vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vd load_f64(const double *p) { vd v; memcpy(&v, p, sizeof v); return v; }
/* 8 bfloat16 widened: zero-extended and shifted up (GCC's generic widening took four
   instructions, a shuffle and an insert among them, where vpmovzxwd from memory is one). */
#ifdef __AVX2__
static inline vf load_bf16(const uint16_t *p) {
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
#else
static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
}
#endif
static inline void store_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline void store_f64(double *p, vd v) { memcpy(p, &v, sizeof v); }
/* y's stores: where nt, float32 and float64 vectors go around the caches (non-temporal, at
   32-byte aligned addresses), as memcpy does for copies larger than the last-level cache:
   caching such a y only evicts x and whatever else is there, and a cached store first reads
   the line it writes. Each put_ returns whether the vector must be stored again exactly
   (put_bf16's fast store flushes subnormal lanes); the others store exactly and return 0. */
static inline int put_f32(float *p, vf v, int nt) {
#ifdef __AVX__
    if (nt && !((uintptr_t)p & 31)) {
        __m256 q;
        memcpy(&q, &v, sizeof q);
        _mm256_stream_ps(p, q);
        return 0;
    }
#endif
    store_f32(p, v);
    return 0;
}
static inline int put_f64(double *p, vd v, int nt) {
#ifdef __AVX__
    if (nt && !((uintptr_t)p & 31)) {
        __m256d q[2];
        memcpy(q, &v, sizeof q);
        _mm256_stream_pd(p, q[0]);
        _mm256_stream_pd(p + 4, q[1]);
        return 0;
    }
#endif
    store_f64(p, v);
    return 0;
}
/* Prefetches K vectors of 8 elements of `size` bytes at p, one per cache line: the
   channels-last sweeps call it for the same columns RUN rows on, whose strided rows defeat
   the hardware prefetcher. */
static inline __attribute__((always_inline)) void prefetch_slice(const void *p, int K,
                                                                 int size) {
    for (int k = 0; k < K; k += 64 / size / 8)
        __builtin_prefetch((const char *)p + 8 * k * size);
}
/* Orders a task's non-temporal stores before what follows it. */
static inline void drain(int nt) {
#ifdef __AVX__
    if (nt) _mm_sfence();
#else
    (void)nt;
#endif
}
/* Rounded to nearest even, a NaN quieted, subnormals kept (as torch converts). */
#ifdef __AVX2__
/* The generic form below in AVX2, with the NaN lanes found by one unordered compare and
   chosen by one blend, and the narrowing a pack of the two halves: the integer rounding had
   bound the bfloat16 output passes (AMD EPYC Zen 3: NCHW forward 1.1-1.2x torch's kernel,
   float16 with F16C 0.3x). */
static inline void store_bf16(uint16_t *p, vf v) {
    __m256i u = _mm256_castps_si256((__m256)v), top = _mm256_srli_epi32(u, 16);
    __m256i odd = _mm256_and_si256(top, _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps((__m256)v, (__m256)v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
    __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128((__m128i *)p, h);
}
#else
static inline void store_bf16(uint16_t *p, vf v) {
    vu u;
    memcpy(&u, &v, sizeof u);
    vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u);
    vu r = (((u + 0x7fffu + (u >> 16 & 1u)) >> 16) & ~nan) | ((u >> 16 | 0x40u) & nan);
    vh h = __builtin_convertvector(r, vh);
    memcpy(p, &h, sizeof h);
}
#endif
static inline int put_bf16(uint16_t *p, vf v, int nt) {
    (void)nt;
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
    /* One vcvtneps2bf16: it rounds to nearest even and quiets a NaN as store_bf16 does, but
       flushes a subnormal lane to zero, which the caller then stores again (the integer
       rounding took about a third of the channels-last output pass; testing each vector
       before its store, about a tenth of the forward). */
    __m128bh h = _mm256_cvtneps_pbh((__m256)v);
    memcpy(p, &h, sizeof h);
    return _mm256_fpclass_ps_mask((__m256)v, 0x20); /* 0x20: subnormal */
#else
    store_bf16(p, v);
    return 0;
#endif
}
#ifdef __AVX512F__
/* One vcvtps2pd to 512 bits, where GCC's generic conversion takes two 256-bit halves and an
   insert, which bound the float64 sums (float32, one thread: the backward 0.87-0.99x its
   time, the forward 0.92-0.98x). */
static inline vd wide_f(vf v) { return (vd)_mm512_cvtps_pd((__m256)v); }
#else
static inline vd wide_f(vf v) { return __builtin_convertvector(v, vd); }
#endif
/* The sum of a vector's lanes as a tree (3 dependent adds, not 8). */
static inline double lanes(vd v) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}
static inline vd wide_d(vd v) { return v; }
/* Float64 sums of 8 lanes: acc_t in registers (acc_add_f a float32 vector widened, acc_add_d
   a float64 one; acc_lanes as lanes()), add_wide_S onto 8 doubles in memory. Without AVX-512
   they work on two 256-bit halves: GCC kept 64-byte vectors in memory, writing them in
   16-byte pieces through general registers and reading them back in 32-byte ones, whose
   stalls bound the sums (float32 NCHW forward 0.81-0.87x the time without them, AMD EPYC
   Zen 3, one thread). The same additions in the same order either way: the same bits. */
#if defined(__AVX__) && !defined(__AVX512F__)
typedef struct {
    __m256d lo, hi;
} acc_t;
static const acc_t ACC_ZERO = {{0}, {0}};
static inline void acc_add_halves(acc_t *a, __m256d lo, __m256d hi) {
    a->lo = _mm256_add_pd(a->lo, lo);
    a->hi = _mm256_add_pd(a->hi, hi);
}
static inline void acc_add_f(acc_t *a, vf v) {
    __m256 f = (__m256)v;
    acc_add_halves(a, _mm256_cvtps_pd(_mm256_castps256_ps128(f)),
                   _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
}
static inline void acc_add_d(acc_t *a, vd v) {
    __m256d h[2];
    memcpy(h, &v, sizeof h);
    acc_add_halves(a, h[0], h[1]);
}
static inline double acc_lanes(acc_t a) {
    double s[4];
    _mm256_storeu_pd(s, _mm256_add_pd(a.lo, a.hi)); /* lane i: v[i] + v[i + 4] */
    return (s[0] + s[2]) + (s[1] + s[3]);
}
static inline void add_wide_f(double *p, vf v) {
    __m256 f = (__m256)v;
    _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p),
                                      _mm256_cvtps_pd(_mm256_castps256_ps128(f))));
    _mm256_storeu_pd(p + 4, _mm256_add_pd(_mm256_loadu_pd(p + 4),
                                          _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1))));
}
static inline void add_wide_d(double *p, vd v) {
    __m256d h[2];
    memcpy(h, &v, sizeof h);
    _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), h[0]));
    _mm256_storeu_pd(p + 4, _mm256_add_pd(_mm256_loadu_pd(p + 4), h[1]));
}
#else
typedef vd acc_t;
static const acc_t ACC_ZERO = {0};
static inline void acc_add_f(acc_t *a, vf v) { *a += wide_f(v); }
static inline void acc_add_d(acc_t *a, vd v) { *a += v; }
static inline double acc_lanes(acc_t a) { return lanes(a); }
static inline void add_wide_f(double *p, vf v) { store_f64(p, load_f64(p) + wide_f(v)); }
static inline void add_wide_d(double *p, vd v) { store_f64(p, load_f64(p) + v); }
#endif
static inline vf narrow_f(vd v) { return __builtin_convertvector(v, vf); }
/* max(v, 0) with NaN kept. */
static inline vf relu_f(vf v) {
    vu u;
    memcpy(&u, &v, sizeof u);
    u &= ~(vu)(v < 0);
    memcpy(&v, &u, sizeof v);
    return v;
}
/* Float64 comparisons: with AVX and without AVX-512, on 256-bit halves (vmaxpd, vminpd,
   vcmppd), where GCC compared 64-byte vectors one lane at a time through general registers
   (the float64 relu output and the SiLU and GELU passes). The same lanes either way: max and
   min return their second operand where a lane is NaN, and a NaN compares false. */
#if defined(__AVX__) && !defined(__AVX512F__)
#define ON_HALVES_D(v, EXPR)                                                                 \
    do {                                                                                    \
        __m256d h_[2];                                                                      \
        memcpy(h_, &(v), sizeof h_);                                                        \
        for (int k_ = 0; k_ < 2; k_++) {                                                    \
            __m256d h = h_[k_];                                                             \
            h_[k_] = (EXPR);                                                                \
        }                                                                                   \
        memcpy(&(v), h_, sizeof h_);                                                        \
    } while (0)
static inline vd relu_d(vd v) {
    ON_HALVES_D(v, _mm256_max_pd(_mm256_setzero_pd(), h));
    return v;
}
/* max(lo, min(hi, x)) lane by lane, NaN kept. */
static inline vd clamp_d(vd x, double lo, double hi) {
    ON_HALVES_D(x, _mm256_max_pd(_mm256_set1_pd(lo), _mm256_min_pd(_mm256_set1_pd(hi), h)));
    return x;
}
/* All ones where u == s (u >= s), else 0. */
static inline vq eq_mask_d(vd u, double s) {
    ON_HALVES_D(u, _mm256_cmp_pd(h, _mm256_set1_pd(s), _CMP_EQ_OQ));
    return (vq)u;
}
static inline vq ge_mask_d(vd u, double s) {
    ON_HALVES_D(u, _mm256_cmp_pd(h, _mm256_set1_pd(s), _CMP_GE_OQ));
    return (vq)u;
}
#else
static inline vd relu_d(vd v) {
    vq u;
    memcpy(&u, &v, sizeof u);
    u &= ~(vq)(v < 0);
    memcpy(&v, &u, sizeof v);
    return v;
}
#ifdef __AVX512F__
static inline vd clamp_d(vd x, double lo, double hi) {
    return (vd)_mm512_max_pd(_mm512_set1_pd(lo), _mm512_min_pd(_mm512_set1_pd(hi), (__m512d)x));
}
#else
static inline vd clamp_d(vd x, double lo, double hi) {
    for (int i = 0; i < 8; i++) x[i] = x[i] > hi ? hi : x[i] < lo ? lo : x[i];
    return x;
}
#endif
static inline vq eq_mask_d(vd u, double s) { return (vq)(u == s); }
static inline vq ge_mask_d(vd u, double s) { return (vq)(u >= s); }
#endif
/* exp(x) for x in [-708, 708] (NaN gives NaN), in float64: x = k ln2 / 16 + r (ln2 in two
   parts, k ln2_hi exact), exp(x) = 2^(k >> 4) 2^((k & 15) / 16) exp(r). k comes from adding
   1.5 2^52, which rounds 16 x / ln2 to an integer in the low bits; 2^(k >> 4) is made in the
   exponent bits. With AVX-512 the 16 values 2^(j / 16) are one two-register permute away:
   |r| <= ln2 / 32 and exp(r) to r^5 (relative error 1.5e-13 the largest found against long
   double on 2e7 points); without it, k counts whole ln2 and exp(r) goes to r^10 (3.0e-13).
   The callers round to float32; the table took 0.86x the time of the SiLU derivative. */
#ifdef __AVX512F__
static inline vd exp_d(vd x) {
    static const double pow2[16] = {
        0x1.0000000000000p+0, 0x1.0b5586cf9890fp+0, 0x1.172b83c7d517bp+0, 0x1.2387a6e756238p+0,
        0x1.306fe0a31b715p+0, 0x1.3dea64c123422p+0, 0x1.4bfdad5362a27p+0, 0x1.5ab07dd485429p+0,
        0x1.6a09e667f3bcdp+0, 0x1.7a11473eb0187p+0, 0x1.8ace5422aa0dbp+0, 0x1.9c49182a3f090p+0,
        0x1.ae89f995ad3adp+0, 0x1.c199bdd85529cp+0, 0x1.d5818dcfba487p+0, 0x1.ea4afa2a490dap+0,
    };
    const double magic = 0x1.8p52;
    vd t = x * (16 * 0x1.71547652b82fep0) + magic, k = t - magic;
    vd r = (x - k * (0x1.62e42fee00000p-1 / 16)) - k * (0x1.a39ef35793c76p-33 / 16);
    vd p = (vd){0} + 1.0 / 120;
    p = p * r + 1.0 / 24;
    p = p * r + 1.0 / 6;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    __m512i bits = (__m512i)t; /* k in the low bits (only the low 4 index the table) */
    __m512d lo = _mm512_loadu_pd(pow2), hi = _mm512_loadu_pd(pow2 + 8);
    __m512d frac = _mm512_permutex2var_pd(lo, bits, hi);
    __m512i k16 = _mm512_sub_epi64(bits, _mm512_set1_epi64(0x4338000000000000)); /* k */
    __m512i whole = _mm512_srai_epi64(k16, 4);
    return p * (vd)_mm512_add_epi64((__m512i)frac, _mm512_slli_epi64(whole, 52));
}
#else
static inline vd exp_d(vd x) {
    const double magic = 0x1.8p52;
    vd t = x * 0x1.71547652b82fep0 + magic, k = t - magic;
    vd r = (x - k * 0x1.62e42fee00000p-1) - k * 0x1.a39ef35793c76p-33;
    static const double inv_fact[10] = {1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720,
                                        1.0 / 120,    1.0 / 24,    1.0 / 6,    0.5,
                                        1.0,          1.0};
    vd p = (vd){0} + 1.0 / 3628800;
    for (int i = 0; i < 10; i++) p = p * r + inv_fact[i];
    vq bits;
    memcpy(&bits, &t, sizeof bits);
    bits = (bits - 0x4338000000000000u + 1023) << 52; /* 0x43380... : the bits of magic */
    vd scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
#endif
/* s = 1 / (1 + e), e = exp(-u), in float64, -u clamped to +-708: where u > 708, e is under
   1e-307 and s rounds to 1; where u < -708, s is under 1e-307: both as they should be. */
static inline vd sigmoid_d(vd u, vd *e_out) {
    vd e = exp_d(clamp_d(-u, -708.0, 708.0));
    *e_out = e;
    return 1.0 / (1.0 + e);
}
/* NaN where u = -inf, else v: silu and gelu there are -inf 0 (torch's, too). */
static inline vd nan_at_minus_inf(vd u, vd v) {
    return (vd)((vq)v | (eq_mask_d(u, -(double)INFINITY) & 0x7ff8000000000000u));
}
/* silu(u) = u s in float64. */
static inline vd silu_d(vd u) {
    vd e;
    return nan_at_minus_inf(u, u * sigmoid_d(u, &e));
}
/* silu'(u) = s (1 + u (1 - s)) in float64, 1 - s formed as e s (exact where s rounds to 1);
   u = +-inf gives NaN through u - u, as torch's silu_backward does. (Selecting the clamped
   lanes instead took a fifth of the time.) */
static inline vd silu_grad_d(vd u) {
    vd e, s = sigmoid_d(u, &e);
    return s * (1.0 + u * (e * s)) + (u - u);
}
/* Phi(u) and phi(u), the normal distribution and density, in float64. With a = |u|, the
   upper tail 1 - Phi(a) = phi(a) R(a), R the Mills ratio, evaluated as a polynomial of degree
   17 in t = 4 / (4 + a) (fitted by tools/fit_mills_ratio.py, which prints these
   coefficients: relative error 2.6e-13 on a in [0, 40]); Phi(u) is that tail for u < 0 and 1
   minus it for u >= 0. a is clamped to 37.5 in phi (phi < 1e-305 beyond) and to 40 in R. */
static inline vd normal_d(vd u, vd *phi_out) {
    static const double mills[18] = {
        0.009004913386934465,
        -0.08729199990232238,
        0.3774223404421331,
        -0.9516841488713326,
        1.5421320468614113,
        -1.694715688712275,
        1.3497859939126453,
        -0.8434892680049016,
        0.37774889152779956,
        -0.12102472199163772,
        0.09747679184559027,
        0.10006213169817929,
        0.1605374382925201,
        0.20296106277303214,
        0.23438914686728823,
        0.24999917907055486,
        0.25000002856848913,
        -4.4859355119442057e-10,
    };
    vd a = clamp_d((vd)((vq)u & 0x7fffffffffffffffu), 0.0, 40.0); /* |u|, NaN kept */
    vd t = 4.0 / (4.0 + a), r = (vd){0} + mills[0];
    for (int i = 1; i < 18; i++) r = r * t + mills[i];
    vd c = clamp_d(a, 0.0, 37.5);
    vd phi = exp_d(-0.5 * (c * c)) * 0.3989422804014327; /* 1 / sqrt(2 pi) */
    vd one = (vd)(ge_mask_d(u, 0.0) & 0x3ff0000000000000u); /* 1.0 where u >= 0, else 0.0 */
    *phi_out = phi;
    return one + (1.0 - 2.0 * one) * (phi * r);
}
/* gelu(u) = u Phi(u) in float64. */
static inline vd gelu_d(vd u) {
    vd phi;
    return nan_at_minus_inf(u, u * normal_d(u, &phi));
}
/* gelu'(u) = Phi(u) + u phi(u) in float64; u = +-inf gives NaN through u - u, as torch's
   gelu_backward does. */
static inline vd gelu_grad_d(vd u) {
    vd phi, cdf = normal_d(u, &phi);
    return cdf + u * phi + (u - u);
}

#define F32_IN(v) (v)
#define F64_IN(v) (v)
#define BF16_IN(v) bf16_to_float(v)
#define F32_OUT(v) (v)
#define F64_OUT(v) (v)
#define BF16_OUT(v) float_to_bf16(v)

#ifdef __FLT16_MAX__
#define HAVE_F16 1
typedef _Float16 f16_t;
typedef _Float16 vhf __attribute__((vector_size(16)));
#ifdef __F16C__
/* F16C's conversions (to half: round to nearest even, as a cast): GCC 12 converts a _Float16
   vector to half one lane at a time, which made the float16 channels-last forward 5.7-7.5x
   torch's kernel, and a scalar through a library call (the parameters' and the pivots'
   conversions took a fifth of the forward of a (2, 1280, 8, 8) tensor). */
static inline float f16_to_float(f16_t h) {
    uint16_t u;
    memcpy(&u, &h, sizeof u);
    return _cvtsh_ss(u);
}
static inline f16_t float_to_f16(float f) {
    uint16_t u = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    f16_t h;
    memcpy(&h, &u, sizeof h);
    return h;
}
static inline vf load_f16(const f16_t *p) {
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline void store_f16(f16_t *p, vf v) {
    _mm_storeu_si128((__m128i *)p,
                     _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
static inline float f16_to_float(f16_t h) { return (float)h; }
static inline f16_t float_to_f16(float f) { return (f16_t)f; }
static inline vf load_f16(const f16_t *p) {
    vhf h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vf);
}
static inline void store_f16(f16_t *p, vf v) {
    vhf h = __builtin_convertvector(v, vhf);
    memcpy(p, &h, sizeof h);
}
#endif
#define F16_IN(v) f16_to_float(v)
#define F16_OUT(v) float_to_f16(v)
static inline int put_f16(f16_t *p, vf v, int nt) {
    (void)nt;
    store_f16(p, v);
    return 0;
}
#else
#define HAVE_F16 0
#endif

/* Vectors of 16 floats for half precision's channels-last passes, its sums (cols_S) and its
   output (rows_S_O): one AVX-512 register each. With 8 lanes the output pass ran at about
   40 % of a copy's speed on data in L3 (each vector of x takes three coefficient loads, two
   conversions and an FMA), and the sums were bound by instructions too; with 16 (the same
   operations lane by lane, so the same bits) the float16 and bfloat16 channels-last forwards
   took 0.69-0.87x the time at one thread and 0.80-0.99x at two (AMD EPYC, Zen 5, 2026-12-07,
   benchmarks/cpu_kernel_ab.py --forward --dtype). Float32 stays at 8: its 16-lane output
   took 1.1-1.5x as long on 5-16 MB tensors there, its 16-lane sums 1.01-1.05x on tensors of
   0.3-5 MB (0.84-0.89x on a 31 MB one). Only with AVX-512 (HALF_X below): without it GCC
   kept a vx in memory and moved its halves through general registers, and the 32-byte loads
   of what two 16-byte stores had written stalled (bfloat16 channels-last forward 3.7-4.5x
   torch's kernel on an AVX2 AMD EPYC, Zen 3). */
typedef float vx __attribute__((vector_size(64)));
static inline vx join(vf lo, vf hi) {
    vx v;
    memcpy(&v, &lo, sizeof lo);
    memcpy((char *)&v + sizeof lo, &hi, sizeof hi);
    return v;
}
static inline vf half(vx v, int upper) {
    vf h;
    memcpy(&h, (const char *)&v + (upper ? sizeof h : 0), sizeof h);
    return h;
}
static inline vx load16_f32(const float *p) { vx v; memcpy(&v, p, sizeof v); return v; }
static inline vx relu16(vx v) { return join(relu_f(half(v, 0)), relu_f(half(v, 1))); }
static inline vx load16_bf16(const uint16_t *p) {
#ifdef __AVX512F__
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return (vx)_mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
#else
    return join(load_bf16(p), load_bf16(p + 8));
#endif
}
static inline int put16_bf16(uint16_t *p, vx v, int nt) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    (void)nt; /* as put_bf16 */
    __m256bh h = _mm512_cvtneps_pbh((__m512)v);
    memcpy(p, &h, sizeof h);
    return _mm512_fpclass_ps_mask((__m512)v, 0x20) != 0;
#else
    return put_bf16(p, half(v, 0), nt) | put_bf16(p + 8, half(v, 1), nt);
#endif
}
#if HAVE_F16
static inline vx load16_f16(const f16_t *p) {
#if defined(__AVX512F__) && defined(__F16C__)
    return (vx)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    return join(load_f16(p), load_f16(p + 8));
#endif
}
static inline int put16_f16(f16_t *p, vx v, int nt) {
#if defined(__AVX512F__) && defined(__F16C__)
    (void)nt;
    _mm256_storeu_si256((__m256i *)p,
                        _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return 0;
#else
    return put_f16(p, half(v, 0), nt) | put_f16(p + 8, half(v, 1), nt);
#endif
}
#endif

/* Half precision's channels-last vectors for DEFINE_STATS and DEFINE_APPLY: 16 lanes (vx) with
   AVX-512, else 8 (vf, as float32's). */
#ifdef __AVX512F__
#define HALF_X 16
#define HALF_VX vx
#define HALF_LOADW load16_f32
#define HALF_SPLIT HALF16
#define HALF_RELU relu16
#define BF16_LOADX load16_bf16
#define BF16_PUTX put16_bf16
#define F16_LOADX load16_f16
#define F16_PUTX put16_f16
#else
#define HALF_X 8
#define HALF_VX vf
#define HALF_LOADW load_f32
#define HALF_SPLIT HALF8
#define HALF_RELU relu_f
#define BF16_LOADX load_bf16
#define BF16_PUTX put_bf16
#define F16_LOADX load_f16
#define F16_PUTX put_f16
#endif

static double param(const void *p, int dtype, int64_t i, double none) {
    if (!p) return none;
    switch (dtype) {
    case F32: return ((const float *)p)[i];
    case F64: return ((const double *)p)[i];
    case BF16: return bf16_to_float(((const uint16_t *)p)[i]);
#if HAVE_F16
    case F16: return f16_to_float(((const f16_t *)p)[i]);
#endif
    default: return NAN;
    }
}

/* A, B of y = (x - mean) * A + B for element j = n * C + c (float64). Multiply-adds that
   the compiler may contract are written as fma: contracted in one inlined copy and not in
   another, the fused channels-last path (one thread a sample) and the two-stage one gave
   float64 outputs 1-2 ulp apart, so the bits depended on the thread count. */
static inline void affine(double rstd, double w, double b, const double *scale,
                          const double *shift, int64_t j, double *a, double *bb) {
    double s1 = scale ? 1.0 + scale[j] : 1.0;
    *a = w * rstd * s1;
    *bb = shift ? fma(b, s1, shift[j]) : b * s1;
}

/* Sum of acc over group g's channels, acc[c - base] for channel c. */
static double fold(const double *acc, int64_t base, const int64_t *offsets, int64_t g) {
    double s = 0;
    for (int64_t c = offsets[g]; c < offsets[g + 1]; c++) s += acc[c - base];
    return s;
}

/* g (N G): the per-(n, c) sums s (N C) folded per group. */
static void fold_sums(const double *s, int64_t N, int64_t C, const int64_t *offsets, int64_t G,
                      double *g) {
    for (int64_t i = 0; i < N * G; i++) g[i] = fold(s + i / G * C, 0, offsets, i % G);
}

/* A float32 input's statistics in float64 from the float64 sums g1 = sum e and g2 = sum e^2
   per group (n, g) of e = x - m around the forward's mean m: the mean's remainder t = g1 /
   n_g into mlo, var = g2 / n_g - t^2, 1 / sqrt(var + eps) into rstd and, per channel, krd.
   Groups of at most two elements were made exact from x already. */
static void centered_stats(const double *g1, const double *g2, int64_t N, int64_t C, int64_t L,
                           const int64_t *offsets, int64_t G, double eps, double *mlo,
                           double *rstd, double *krd) {
    for (int64_t n = 0, i = 0; n < N; n++)
        for (int64_t g = 0; g < G; g++, i++) {
            double n_g = (double)((offsets[g + 1] - offsets[g]) * L);
            if (n_g <= 2) continue;
            double t = g1[i] / n_g, v = g2[i] / n_g - t * t;
            double r = 1.0 / sqrt((v < 0 ? 0.0 : v) + eps);
            mlo[i] = t;
            rstd[i] = r;
            for (int64_t j = n * C + offsets[g]; j < n * C + offsets[g + 1]; j++) krd[j] = r;
        }
}

/* Chan's merge of parts[0..k) in order; returns the merged (count, mean, m2). One part is
   itself (the loop would return it unchanged, after two divisions: per group of a small
   tensor they were a tenth of the forward's time). */
static part_t merge(const part_t *parts, int64_t k, int64_t stride) {
    if (k == 1) return parts[0];
    part_t acc = {0.0, 0.0, 0.0};
    for (int64_t i = 0; i < k; i++) {
        const part_t *p = parts + i * stride;
        double total = acc.count + p->count;
        double delta = p->mean - acc.mean;
        acc.mean += delta * (p->count / total);
        acc.m2 += p->m2 + delta * delta * (acc.count * p->count / total);
        acc.count = total;
    }
    return acc;
}

/* The rounding error of s = p + m (Knuth's TwoSum, exact): a mean is its pivot p plus the mean
   relative to it, m, and s alone is off by up to half an ulp of p, which in xhat is
   |mean| rstd / 2^53: 1e-10 at a float64 input's mean 1e4 and std 1e-2. lo keeps it. */
static inline double two_sum_lo(double p, double m, double s) {
    double bb = s - p;
    return (p - (s - bb)) + (m - bb);
}

/* Channels-last statistics blocks of a sample: a head of BLOCK / C rows, rounded down to a
   multiple of RUN where that is at least RUN (a sweep's last short run of rows is its slow
   one; (2, 1280, 8, 8): 12 rows, then 52), at most L; then blocks of stats_rows(C) rows. */
static int64_t cl_head(int64_t C, int64_t L) {
    int64_t rows = BLOCK / C < 1 ? 1 : BLOCK / C;
    int64_t head = rows < RUN ? rows : rows / RUN * RUN;
    return head < L ? head : L;
}
static int64_t cl_blocks(int64_t C, int64_t L) {
    int64_t rows = stats_rows(C);
    return 1 + (L - cl_head(C, L) + rows - 1) / rows;
}
/* Where C >= 2 CL_CHUNK and a sample makes at most two statistics blocks (few positions),
   channels-last statistics take its groups in chunks of whole groups, each of at least
   CL_CHUNK channels (the last may be narrower), as tasks of their own: such a sample was one
   or two tasks (SD 8^2: C = 1280, 64 positions, the head block and one more), and at two
   threads one thread waited. The chunks follow from C, L and the plan alone, so the
   statistics' bits depend neither on the thread count nor on the batch. bounds[0..k] (k
   returned; bounds NULL: the count alone): the chunks' first groups, then G. */
#define CL_CHUNK 128
static int64_t cl_chunks(int64_t C, int64_t L, const int64_t *offsets, int64_t G,
                         int64_t *bounds) {
    int64_t k = 1, start = 0;
    if (C >= 2 * CL_CHUNK && cl_blocks(C, L) <= 2)
        for (int64_t g = 1; g < G; g++)
            if (offsets[g] - offsets[start] >= CL_CHUNK) {
                if (bounds) bounds[k] = g;
                start = g;
                k++;
            }
    if (bounds) {
        bounds[0] = 0;
        bounds[k] = G;
    }
    return k;
}
/* HALFX of DEFINE_STATS: lanes 8 h .. 8 h + 7 of a VX (X = 8: never called). */
#define HALF16(v, h) half(v, h)
#define HALF8(v, h) (v)
/* Per input type S (element T, arithmetic W in vectors VW of 8, IN widens one element to W,
   LOAD 8 of them, WK f or d as W is float or double (acc_add_WK, add_wide_WK), LOADW 8 W
   values; the channels-last sums 32 channels at a time as two VX of X = 16 lanes where X is
   16, LOADX, LOADWX and HALFX as above):
   sums_S    S1 = sum(x - p), S2 = sum((x - p)^2) over a contiguous run;
   stats_nchw_S / stats_cl_S   every block's part, the second pass where the first cancels,
             merged per (n, g). */
#define DEFINE_STATS(S, T, W, VW, IN, LOAD, WK, LOADW, X, VX, LOADX, LOADWX, HALFX)        \
    static void sums_##S(const T *x, int64_t n, W p, double *s1, double *s2) {              \
        acc_t a1 = ACC_ZERO, a2 = ACC_ZERO;                                                 \
        int64_t i = 0;                                                                      \
        while (i + 32 <= n) { /* 4 chains of up to RUN vectors, then float64 */             \
            int64_t runs = (n - i) / 32 < RUN ? (n - i) / 32 : RUN;                         \
            VW f1[4] = {0}, f2[4] = {0};                                                    \
            for (int64_t j = 0; j < runs; j++)                                              \
                for (int k = 0; k < 4; k++) {                                               \
                    VW d = LOAD(x + i + 32 * j + 8 * k) - p;                                \
                    f1[k] += d;                                                             \
                    f2[k] += d * d;                                                         \
                }                                                                           \
            for (int k = 0; k < 4; k++) {                                                   \
                acc_add_##WK(&a1, f1[k]);                                                   \
                acc_add_##WK(&a2, f2[k]);                                                   \
            }                                                                               \
            i += 32 * runs;                                                                 \
        }                                                                                   \
        for (; i + 8 <= n; i += 8) {                                                        \
            VW d = LOAD(x + i) - p;                                                         \
            acc_add_##WK(&a1, d);                                                           \
            acc_add_##WK(&a2, d * d);                                                       \
        }                                                                                   \
        double t1 = 0, t2 = 0;                                                              \
        for (; i < n; i++) {                                                                \
            double d = (double)(IN(x[i]) - p);                                              \
            t1 += d;                                                                        \
            t2 += d * d;                                                                    \
        }                                                                                   \
        *s1 = t1 + acc_lanes(a1);                                                           \
        *s2 = t2 + acc_lanes(a2);                                                           \
    }                                                                                       \
    /* A contiguous block's part around pivot: summed around the mean of its first SHIFT    \
       elements, again around the block's mean (in W) where that cancels. */                \
    static part_t part_##S(const T *block, int64_t len, double pivot) {                     \
        int64_t h = len < SHIFT ? len : SHIFT;                                              \
        double head[SHIFT] = {0};                                                           \
        for (int64_t j = 0; j < h; j++) head[j] = (double)IN(block[j]);                     \
        W shift = (W)((((head[0] + head[4]) + (head[2] + head[6])) +                        \
                       ((head[1] + head[5]) + (head[3] + head[7]))) / (double)h);           \
        double s1, s2;                                                                      \
        sums_##S(block, len, shift, &s1, &s2);                                              \
        part_t part = {(double)len, s1 / (double)len, s2 - s1 * (s1 / (double)len)};        \
        if (!(part.mean * part.mean * (double)len <= TRUST * part.m2)) {                    \
            shift = (W)((double)shift + part.mean);                                         \
            sums_##S(block, len, shift, &s1, &s2);                                          \
            part = (part_t){(double)len, s1 / (double)len, s2 - s1 * (s1 / (double)len)};   \
        }                                                                                   \
        part.mean += (double)shift - pivot;                                                 \
        return part;                                                                        \
    }                                                                                       \
    static void stats_nchw_##S(const T *x, int64_t N, int64_t C, int64_t L,                 \
                               const int64_t *offsets, int64_t G, double *mean, double *var, \
                               double *lo, int nthreads) {                                  \
        int64_t NG = N * G, tasks = 0;                                                      \
        for (int64_t g = 0; g < G; g++)                                                     \
            tasks += N * (((offsets[g + 1] - offsets[g]) * L + BLOCK - 1) / BLOCK);         \
        block_t *todo = malloc((size_t)tasks * sizeof(block_t));                            \
        int64_t *first = malloc((size_t)(NG + 1) * sizeof(int64_t));                        \
        part_t *parts = malloc((size_t)tasks * sizeof(part_t));                             \
        int64_t t = 0;                                                                      \
        for (int64_t n = 0; n < N; n++)                                                     \
            for (int64_t g = 0; g < G; g++) {                                               \
                int64_t base = (n * C + offsets[g]) * L, count = (offsets[g + 1] - offsets[g]) * L; \
                first[n * G + g] = t;                                                       \
                for (int64_t start = 0; start < count; start += BLOCK)                      \
                    todo[t++] = (block_t){base, start,                                      \
                                          count - start < BLOCK ? count - start : BLOCK};   \
            }                                                                               \
        first[NG] = t;                                                                      \
        FOR_TASKS(k, tasks, {                                                               \
            parts[k] = part_##S(x + todo[k].base + todo[k].start, todo[k].len,              \
                                (double)IN(x[todo[k].base]));                               \
        })                                                                                  \
        for (int64_t i = 0; i < NG; i++) {                                                  \
            part_t acc = merge(parts + first[i], first[i + 1] - first[i], 1);               \
            double p = (double)IN(x[todo[first[i]].base]);                                  \
            mean[i] = p + acc.mean;                                                         \
            if (lo) lo[i] = two_sum_lo(p, acc.mean, mean[i]);                               \
            var[i] = acc.m2 < 0 ? 0.0 : acc.m2 / acc.count; /* NaN kept */                  \
        }                                                                                   \
        free(parts);                                                                        \
        free(first);                                                                        \
        free(todo);                                                                         \
    }                                                                                       \
    /* Channels-last, per channel over rows r0..r1: sum(e) into a1 and sum(e^2) into a2 (either \
       may be NULL), e = x - shift, RUN rows at a time in W, then in float64. Channels go K \
       vectors at a time: whole cache lines per row, K independent chains. Inlined with     \
       constant K, row count and wants (w1: a1, w2: a2), so the loop holds no branches. */  \
    static inline __attribute__((always_inline)) void cols_##S(                             \
        const T *slab, int64_t C, int64_t r, int64_t rows, int64_t c, int K, const W *shift, \
        double *a1, double *a2, int w1, int w2) {                                           \
        if (X == 16 && K == 4) { /* as two vectors of 16 lanes: the same sums, lane by lane */ \
            VX sx[2], g1[2] = {0}, g2[2] = {0};                                             \
            for (int k = 0; k < 2; k++) sx[k] = LOADWX(shift + c + 16 * k);                 \
            for (int64_t q = r; q < r + rows; q++) {                                        \
                prefetch_slice(slab + (q + RUN) * C + c, K, (int)sizeof(T));                \
                for (int k = 0; k < 2; k++) {                                               \
                    VX e = LOADX(slab + q * C + c + 16 * k) - sx[k];                        \
                    if (w1) g1[k] += e;                                                     \
                    if (w2) g2[k] += e * e;                                                 \
                }                                                                           \
            }                                                                               \
            for (int k = 0; k < 4; k++) {                                                   \
                double *p1 = a1 + c + 8 * k, *p2 = a2 + c + 8 * k;                          \
                if (w1) add_wide_##WK(p1, HALFX(g1[k / 2], k % 2));                         \
                if (w2) add_wide_##WK(p2, HALFX(g2[k / 2], k % 2));                         \
            }                                                                               \
            return;                                                                         \
        }                                                                                   \
        VW sv[4], f1[4] = {0}, f2[4] = {0};                                                 \
        for (int k = 0; k < K; k++) sv[k] = LOADW(shift + c + 8 * k);                       \
        for (int64_t q = r; q < r + rows; q++) {                                            \
            prefetch_slice(slab + (q + RUN) * C + c, K, (int)sizeof(T));                    \
            for (int k = 0; k < K; k++) {                                                   \
                VW e = LOAD(slab + q * C + c + 8 * k) - sv[k];                              \
                if (w1) f1[k] += e;                                                         \
                if (w2) f2[k] += e * e;                                                     \
            }                                                                               \
        }                                                                                   \
        for (int k = 0; k < K; k++) {                                                       \
            if (w1) add_wide_##WK(a1 + c + 8 * k, f1[k]);                                   \
            if (w2) add_wide_##WK(a2 + c + 8 * k, f2[k]);                                   \
        }                                                                                   \
    }                                                                                       \
    static inline __attribute__((always_inline)) void sweep_##S(                            \
        const T *slab, int64_t C, int64_t w, int64_t r0, int64_t r1, const W *shift,        \
        double *a1, double *a2, int w1, int w2) {                                           \
        int64_t C32 = w - w % 32, C8 = w - w % 8;                                           \
        for (int64_t r = r0; r < r1; r += RUN) {                                            \
            int64_t n = r + RUN < r1 ? RUN : r1 - r;                                        \
            for (int64_t c = 0; c < C32; c += 32)                                           \
                if (n == RUN) cols_##S(slab, C, r, RUN, c, 4, shift, a1, a2, w1, w2);       \
                else cols_##S(slab, C, r, n, c, 4, shift, a1, a2, w1, w2);                  \
            for (int64_t c = C32; c < C8; c += 8)                                           \
                cols_##S(slab, C, r, n, c, 1, shift, a1, a2, w1, w2);                       \
            for (int64_t c = C8; c < w; c++) {                                              \
                W f1 = 0, f2 = 0;                                                           \
                for (int64_t q = r; q < r + n; q++) {                                       \
                    W e = IN(slab[q * C + c]) - shift[c];                                   \
                    f1 += e;                                                                \
                    f2 += e * e;                                                            \
                }                                                                           \
                if (w1) a1[c] += f1;                                                        \
                if (w2) a2[c] += f2;                                                        \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    /* strip_S / rows_S: the w channels from slab's first (rows C apart), shift and sums    \
       from their first; rows_S in strips of SWEEP_BYTES, at multiples of 32 channels: each \
       channel's sums as in one sweep. */                                                   \
    static void strip_##S(const T *slab, int64_t C, int64_t w, int64_t r0, int64_t r1,      \
                          const W *shift, double *a1, double *a2) {                         \
        if (a1 && a2) sweep_##S(slab, C, w, r0, r1, shift, a1, a2, 1, 1);                   \
        else if (a1) sweep_##S(slab, C, w, r0, r1, shift, a1, a2, 1, 0);                    \
        else sweep_##S(slab, C, w, r0, r1, shift, a1, a2, 0, 1);                            \
    }                                                                                       \
    static void rows_##S(const T *slab, int64_t C, int64_t w, int64_t r0, int64_t r1,       \
                         const W *shift, double *a1, double *a2) {                          \
        int64_t tile = SWEEP_BYTES / (int64_t)sizeof(T);                                    \
        for (int64_t t = 0; t < w; t += tile)                                               \
            strip_##S(slab + t, C, w - t < tile ? w - t : tile, r0, r1, shift + t,          \
                      a1 ? a1 + t : NULL, a2 ? a2 + t : NULL);                              \
    }                                                                                       \
    /* A block's parts, two-pass: the group means (relative to the pivot), then both sums \
       again around them in W, from which the parts are made: x - pivot was rounded        \
       relative to the pivot's distance from the data (an outlier first element put the   \
       mean 8e-6 std off and dweight at 355x the float32 bound). centers gets each          \
       channel's group mean in W (absolute, not relative to the pivot). Groups g0..g1,      \
       channels c0 = offsets[g0] .. c1: a1 and a2 hold c1 - c0 sums each (from c0), pivot   \
       and centers all C, out[g - g0] g's part. */                                          \
    static void two_pass_##S(const T *slab, int64_t C, int64_t r0, int64_t r1,              \
                             const int64_t *offsets, int64_t g0, int64_t g1, const W *pivot, \
                             W *centers, double *a1, double *a2, part_t *out) {             \
        int64_t c0 = offsets[g0], w = offsets[g1] - c0;                                     \
        memset(a1, 0, (size_t)w * sizeof(double));                                          \
        memset(a2, 0, (size_t)w * sizeof(double));                                          \
        rows_##S(slab + c0, C, w, r0, r1, pivot + c0, a1, NULL);                            \
        for (int64_t g = g0; g < g1; g++) {                                                 \
            double n_g = (double)((offsets[g + 1] - offsets[g]) * (r1 - r0));               \
            W at = (W)((double)pivot[offsets[g]] + fold(a1, c0, offsets, g) / n_g);         \
            for (int64_t c = offsets[g]; c < offsets[g + 1]; c++) centers[c] = at;          \
        }                                                                                   \
        memset(a1, 0, (size_t)w * sizeof(double));                                          \
        rows_##S(slab + c0, C, w, r0, r1, centers + c0, a1, a2);                            \
        for (int64_t g = g0; g < g1; g++) {                                                 \
            double n_g = (double)((offsets[g + 1] - offsets[g]) * (r1 - r0));               \
            double s1 = fold(a1, c0, offsets, g), d = s1 / n_g;                             \
            out[g - g0] = (part_t){n_g,                                                     \
                                   ((double)centers[offsets[g]] - (double)pivot[offsets[g]]) + d, \
                                   fold(a2, c0, offsets, g) - s1 * d};                      \
        }                                                                                   \
    }                                                                                       \
    /* Channels-last: block 0 of each sample (its first BLOCK / C rows) two-pass; its group \
       means center every other block's one pass (the same for any thread count), which     \
       takes a second pass only where it cancels. cl_block_S makes block b's parts of one   \
       sample (slab) for groups g0..g1 (a chunk: cl_chunks), out[g - g0] g's: b = 0 writes  \
       pilot, the others read it; cl_merge_S merges a sample's parts into its G means and   \
       variances. */                                                                        \
    static void cl_block_##S(const T *slab, int64_t C, int64_t L, const int64_t *offsets,   \
                             int64_t g0, int64_t g1, const W *pivot, W *pilot, int64_t b,   \
                             part_t *out) {                                                 \
        int64_t head = cl_head(C, L), rows = stats_rows(C);                                 \
        int64_t c0 = offsets[g0], w = offsets[g1] - c0;                                     \
        double near[NEAR_BYTES / sizeof(double)];                                           \
        double *a1 = 2 * w <= (int64_t)(NEAR_BYTES / sizeof(double))                        \
                         ? near                                                             \
                         : malloc((size_t)(2 * w) * sizeof(double));                        \
        double *a2 = a1 + w;                                                                \
        if (b == 0) { /* two_pass_S zeroes the sums */                                      \
            two_pass_##S(slab, C, 0, head, offsets, g0, g1, pivot, pilot, a1, a2, out);     \
            if (a1 != near) free(a1);                                                       \
            return;                                                                         \
        }                                                                                   \
        memset(a1, 0, (size_t)(2 * w) * sizeof(double));                                    \
        int64_t r0 = head + (b - 1) * rows, r1 = r0 + rows < L ? r0 + rows : L;             \
        rows_##S(slab + c0, C, w, r0, r1, pilot + c0, a1, a2);                              \
        int cancels = 0;                                                                    \
        for (int64_t g = g0; g < g1; g++) {                                                 \
            double n_g = (double)((offsets[g + 1] - offsets[g]) * (r1 - r0));               \
            double s1 = fold(a1, c0, offsets, g), m = s1 / n_g;                             \
            part_t *o = out + (g - g0);                                                     \
            *o = (part_t){n_g, ((double)pilot[offsets[g]] - (double)pivot[offsets[g]]) + m, \
                          fold(a2, c0, offsets, g) - s1 * m};                               \
            cancels |= !(m * m * n_g <= TRUST * o->m2);                                     \
        }                                                                                   \
        if (cancels) {                                                                      \
            W *centers = malloc((size_t)C * sizeof(W));                                     \
            two_pass_##S(slab, C, r0, r1, offsets, g0, g1, pivot, centers, a1, a2, out);    \
            free(centers);                                                                  \
        }                                                                                   \
        if (a1 != near) free(a1);                                                           \
    }                                                                                       \
    /* One sample's means and variances of groups g0..g1 from its blocks' parts (parts[b    \
       stride + g - g0]) and its pivots, merged in block order, into mean[g] and var[g]. */ \
    static void cl_merge_##S(const part_t *parts, int64_t blocks, int64_t stride,           \
                             int64_t g0, int64_t g1, const int64_t *offsets, const W *pivot, \
                             double *mean, double *var, double *lo) {                       \
        for (int64_t g = g0; g < g1; g++) {                                                 \
            part_t acc = merge(parts + (g - g0), blocks, stride);                           \
            double p = (double)pivot[offsets[g]];                                           \
            mean[g] = p + acc.mean;                                                         \
            if (lo) lo[g] = two_sum_lo(p, acc.mean, mean[g]);                               \
            var[g] = acc.m2 < 0 ? 0.0 : acc.m2 / acc.count;                                 \
        }                                                                                   \
    }                                                                                       \
    /* pivot[c]: the first element of c's group in the sample. */                           \
    static void cl_pivots_##S(const T *slab, const int64_t *offsets, int64_t g0, int64_t g1, \
                              W *pivot) {                                                   \
        for (int64_t g = g0; g < g1; g++)                                                   \
            for (int64_t c = offsets[g]; c < offsets[g + 1]; c++)                           \
                pivot[c] = IN(slab[offsets[g]]);                                            \
    }                                                                                       \
    /* Task t of N samples x chunks x per blocks each, blocks b0 .. b0 + per: its parts go  \
       to parts[(n blocks + b) G + g]. */                                                   \
    static void cl_task_##S(const T *x, int64_t C, int64_t L, const int64_t *offsets,       \
                            int64_t G, const int64_t *bounds, int64_t chunks, int64_t per,  \
                            int64_t b0, const W *pivots, W *pilots, part_t *parts,          \
                            int64_t t) {                                                    \
        int64_t n = t / (chunks * per), k = t / per % chunks, b = b0 + t % per;             \
        cl_block_##S(x + n * L * C, C, L, offsets, bounds[k], bounds[k + 1], pivots + n * C, \
                     pilots + n * C, b, parts + (n * cl_blocks(C, L) + b) * G + bounds[k]); \
    }                                                                                       \
    static void stats_cl_##S(const T *x, int64_t N, int64_t C, int64_t L,                   \
                             const int64_t *offsets, int64_t G, double *mean, double *var,  \
                             double *lo, int nthreads) {                                    \
        int64_t blocks = cl_blocks(C, L), *bounds = malloc((size_t)(G + 1) * sizeof(int64_t)); \
        int64_t chunks = cl_chunks(C, L, offsets, G, bounds), per = blocks - 1;                \
        part_t *parts = malloc((size_t)(N * blocks * G) * sizeof(part_t));                  \
        W *pivots = malloc((size_t)(2 * N * C) * sizeof(W)), *pilots = pivots + N * C;      \
        for (int64_t n = 0; n < N; n++)                                                     \
            cl_pivots_##S(x + n * L * C, offsets, 0, G, pivots + n * C);                    \
        /* A chunk's blocks in one task where the chunks alone fill the threads (one region, \
           no wait between the head blocks and the rest); else the head blocks, then the    \
           rest. Either way each block is computed alike: the same bits. */                 \
        if (N * chunks >= nthreads)                                                         \
            FOR_TASKS(t, N * chunks, {                                                      \
                for (int64_t b = 0; b < blocks; b++)                                        \
                    cl_task_##S(x, C, L, offsets, G, bounds, chunks, blocks, 0, pivots, pilots, \
                                parts, t * blocks + b);                                     \
            })                                                                              \
        else                                                                                \
            FOR_TWO(t, N * chunks,                                                          \
                    cl_task_##S(x, C, L, offsets, G, bounds, chunks, 1, 0, pivots, pilots,  \
                                parts, t),                                                  \
                    u, N * chunks * per,                                                    \
                    cl_task_##S(x, C, L, offsets, G, bounds, chunks, per, 1, pivots, pilots, \
                                parts, u))                                                  \
        free(bounds);                                                                       \
        for (int64_t n = 0; n < N; n++)                                                     \
            cl_merge_##S(parts + n * blocks * G, blocks, G, 0, G, offsets, pivots + n * C,  \
                         mean + n * G, var + n * G, lo ? lo + n * G : NULL);                \
        free(pivots);                                                                       \
        free(parts);                                                                        \
    }

/* Per (input, output) pair: y = ((x - hi) - lo) * a + b in W, 8 at a time. NCHW: per (n, c)
   row of L, in chunks of BLOCK; channels-last: blocks of positions, per-channel coefficients
   made from coef_in_t's float64 values, X at a time in VX (LOADX, LOADWX, RELUX, STOREX: 16
   lanes for half-precision output, vx above), the last C % X channels as before. */
#define DEFINE_APPLY(S, T, W, VW, IN, LOAD, LOADW, RELU, O, TO, OUT, STORE, EXACT, X, VX,   \
                     LOADX, LOADWX, RELUX, STOREX)                                         \
    static void row_##S##_##O(const T *xr, TO *yr, int64_t i0, int64_t i1, W hi, W lo, W a, \
                              W b, int relu, int nt) {                                      \
        int64_t i = i0;                                                                     \
        int again = 0; /* a vector STORE did not store exactly: the row's vectors again */  \
        for (; i + 8 <= i1; i += 8) {                                                       \
            VW v = ((LOAD(xr + i) - hi) - lo) * a + b;                                      \
            again |= STORE(yr + i, relu ? RELU(v) : v, nt);                                 \
        }                                                                                   \
        if (again)                                                                          \
            for (int64_t k = i0; k + 8 <= i1; k += 8) {                                     \
                VW v = ((LOAD(xr + k) - hi) - lo) * a + b;                                  \
                EXACT(yr + k, relu ? RELU(v) : v);                                          \
            }                                                                               \
        for (; i < i1; i++) {                                                               \
            W v = ((IN(xr[i]) - hi) - lo) * a + b;                                          \
            yr[i] = OUT(relu && v < 0 ? (W)0 : v);                                          \
        }                                                                                   \
    }                                                                                       \
    /* NCHW, every group within FUSED_MAX elements: per (n, g) its statistics, then its     \
       output while the group is in cache, so x is read from memory once. The same blocks,  \
       merge and coefficients as the two-stage path: the same result. */                    \
    static void fused_##S##_##O(const T *x, TO *y, int64_t N, int64_t C, int64_t L,         \
                                const int64_t *offsets, int64_t G, double *mean, double *var, \
                                double *lo_out, double eps, const double *wd, const double *bd, \
                                const double *scale, const double *shift, int relu,         \
                                int nthreads) {                                             \
        int nt = streams(N * C * L * (int64_t)sizeof(TO));                                  \
        FOR_TASKS(i, N * G, {                                                               \
            int64_t n = i / G, g = i - n * G, base = (n * C + offsets[g]) * L;              \
            int64_t count = (offsets[g + 1] - offsets[g]) * L, k = 0;                       \
            part_t parts[FUSED_MAX / BLOCK];                                                \
            for (int64_t start = 0; start < count; start += BLOCK)                          \
                parts[k++] = part_##S(x + base + start,                                     \
                                      count - start < BLOCK ? count - start : BLOCK,        \
                                      (double)IN(x[base]));                                 \
            part_t acc = merge(parts, k, 1);                                                \
            double p = (double)IN(x[base]);                                                 \
            mean[i] = p + acc.mean;                                                         \
            double low = two_sum_lo(p, acc.mean, mean[i]);                                  \
            if (lo_out) lo_out[i] = low;                                                    \
            var[i] = acc.m2 < 0 ? 0.0 : acc.m2 / acc.count;                                 \
            double rstd = 1.0 / sqrt(var[i] + eps);                                         \
            W hi = (W)mean[i], lo = (W)((mean[i] - (double)hi) + low);                      \
            for (int64_t c = offsets[g]; c < offsets[g + 1]; c++) {                         \
                double a, b;                                                                \
                affine(rstd, wd[c], bd[c], scale, shift, n * C + c, &a, &b);                \
                row_##S##_##O(x + (n * C + c) * L, y + (n * C + c) * L, 0, L, hi, lo, (W)a, \
                              (W)b, relu, nt);                                              \
            }                                                                               \
            drain(nt);                                                                      \
        })                                                                                  \
    }                                                                                       \
    /* Channels-last rows r0..r1 of one sample, w channels (rows C apart): y = (x - hi) * a \
       + b per channel. */                                                                  \
    static void rows_##S##_##O(const T *x, TO *y, int64_t C, int64_t w, int64_t r0,         \
                               int64_t r1, const W *hi, const W *a, const W *b, int relu,   \
                               int nt) {                                                    \
        int64_t C8 = w - w % 8;                                                             \
        for (int64_t r = r0; r < r1; r++) {                                                 \
            const T *xr = x + r * C;                                                        \
            TO *yr = y + r * C;                                                             \
            int again = 0; /* as in row_S_O */                                              \
            int64_t c = 0;                                                                  \
            for (; c + X <= C8; c += X) {                                                   \
                VX v = (LOADX(xr + c) - LOADWX(hi + c)) * LOADWX(a + c) + LOADWX(b + c);    \
                again |= STOREX(yr + c, relu ? RELUX(v) : v, nt);                           \
            }                                                                               \
            for (; c < C8; c += 8) {                                                        \
                VW v = (LOAD(xr + c) - LOADW(hi + c)) * LOADW(a + c) + LOADW(b + c);        \
                again |= STORE(yr + c, relu ? RELU(v) : v, nt);                             \
            }                                                                               \
            if (again)                                                                      \
                for (int64_t c = 0; c < C8; c += 8) {                                       \
                    VW v = (LOAD(xr + c) - LOADW(hi + c)) * LOADW(a + c) + LOADW(b + c);    \
                    EXACT(yr + c, relu ? RELU(v) : v);                                      \
                }                                                                           \
            for (int64_t c = C8; c < w; c++) {                                              \
                W v = (IN(xr[c]) - hi[c]) * a[c] + b[c];                                    \
                yr[c] = OUT(relu && v < 0 ? (W)0 : v);                                      \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    /* rows_S_O over a whole sample in cache (C channels, L rows), BAND rows per load of a  \
       channel vector's coefficients; the same values. */                                  \
    static void band_##S##_##O(const T *x, TO *y, int64_t C, int64_t L, const W *hi,        \
                               const W *a, const W *b, int relu, int nt) {                  \
        int64_t CX = C - C % X, r = 0;                                                      \
        for (; r + BAND <= L; r += BAND) {                                                  \
            int again = 0; /* as in row_S_O: then the rows whole, again */                  \
            for (int64_t c = 0; c < CX; c += X) {                                           \
                VX h = LOADWX(hi + c), av = LOADWX(a + c), bv = LOADWX(b + c);              \
                for (int64_t q = r; q < r + BAND; q++) {                                    \
                    VX v = (LOADX(x + q * C + c) - h) * av + bv;                            \
                    again |= STOREX(y + q * C + c, relu ? RELUX(v) : v, nt);                \
                }                                                                           \
            }                                                                               \
            if (again) rows_##S##_##O(x, y, C, C, r, r + BAND, hi, a, b, relu, nt);         \
            else if (CX < C)                                                                \
                rows_##S##_##O(x + CX, y + CX, C, C - CX, r, r + BAND, hi + CX, a + CX,     \
                               b + CX, relu, nt);                                           \
        }                                                                                   \
        if (r < L) rows_##S##_##O(x, y, C, C, r, L, hi, a, b, relu, nt);                    \
    }                                                                                       \
    /* Coefficients of channels j0..j1 (j = n * C + c) in W: channels-last (hi, A, B - lo A) \
       as three arrays of NC, NCHW (hi, lo, A, B) per channel; from the same float64 values \
       in either case. A run of one group's channels at a time, its mean and rstd shared: per \
       channel a division and a lookup for the group had cost half the output's time at     \
       (2, 1280, 8, 8) (perf), and without them the loops vectorize. */                     \
    static void coefs_##S##_##O(const coef_in_t *q, int64_t j0, int64_t j1, int cl, W *k) { \
        int64_t C = q->C, NC = q->N * C;                                                    \
        for (int64_t j = j0; j < j1;) {                                                     \
            int64_t n = j / C, c0 = j - n * C, g = q->group_of[c0];                         \
            int64_t c1 = q->offsets[g + 1] < c0 + (j1 - j) ? q->offsets[g + 1] : c0 + (j1 - j); \
            int64_t i = n * q->G + g, row = n * C;                                          \
            double r = q->rstd[i];                                                          \
            W hi = (W)q->mean[i];                                                           \
            double lo = (q->mean[i] - (double)hi) + (q->lo ? q->lo[i] : 0.0);               \
            const double *wd = q->wd, *bd = q->bd, *sc = q->scale, *sh = q->shift;          \
            if (cl && !sc && !sh)                                                           \
                for (int64_t c = c0; c < c1; c++) {                                         \
                    double a = wd[c] * r;                                                   \
                    k[row + c] = hi;                                                        \
                    k[NC + row + c] = (W)a;                                                 \
                    k[2 * NC + row + c] = (W)fma(-lo, a, bd[c]);                            \
                }                                                                           \
            else                                                                            \
                for (int64_t c = c0; c < c1; c++) {                                         \
                    double a, b;                                                            \
                    affine(r, wd[c], bd[c], sc, sh, row + c, &a, &b);                       \
                    if (cl) { /* lo folded into b: b - lo * a, in float64 */                \
                        k[row + c] = hi;                                                    \
                        k[NC + row + c] = (W)a;                                             \
                        k[2 * NC + row + c] = (W)fma(-lo, a, b);                            \
                    } else {                                                                \
                        W v[4] = {hi, (W)lo, (W)a, (W)b};                                   \
                        for (int m = 0; m < 4; m++) k[4 * (row + c) + m] = v[m];            \
                    }                                                                       \
                }                                                                           \
            j += c1 - c0;                                                                   \
        }                                                                                   \
    }                                                                                       \
    /* Output task t: NCHW a chunk of BLOCK of one (n, c) row, channels-last `rows` rows of \
       one sample. */                                                                       \
    static void apply_task_##S##_##O(const T *x, TO *y, int64_t N, int64_t C, int64_t L,    \
                                     int cl, int64_t rows, const W *k, int relu, int nt,    \
                                     int64_t t) {                                           \
        if (!cl) {                                                                          \
            int64_t chunks = (L + BLOCK - 1) / BLOCK, row = chunks == 1 ? t : t / chunks;   \
            int64_t i0 = (t - row * chunks) * BLOCK, i1 = i0 + BLOCK < L ? i0 + BLOCK : L;  \
            const W *kr = k + 4 * row;                                                      \
            row_##S##_##O(x + row * L, y + row * L, i0, i1, kr[0], kr[1], kr[2], kr[3], relu, nt); \
        } else {                                                                            \
            int64_t blocks = (L + rows - 1) / rows, n = t / blocks, r0 = t % blocks * rows; \
            const W *hi = k + n * C;                                                        \
            rows_##S##_##O(x + n * L * C, y + n * L * C, C, C, r0,                          \
                           r0 + rows < L ? r0 + rows : L, hi, hi + N * C, hi + 2 * N * C, relu, \
                           nt);                                                             \
        }                                                                                   \
        drain(nt);                                                                          \
    }                                                                                       \
    /* Channels-last groups g0..g1 (a chunk: cl_chunks) of sample n whole, while they stay  \
       in L2: their statistics (cl_block_S's blocks and cl_merge_S's order, as stats_cl_S   \
       makes them: the same bits), rstd, their channels' coefficients into k (q's layout)   \
       and, where out, their output. */                                                     \
    static void cl_part_##S##_##O(const T *x, TO *y, int64_t L, const int64_t *offsets,     \
                                  const coef_in_t *q, double *mean, double *var,            \
                                  double *rstd, double eps, W *k, int relu, int nt,         \
                                  int64_t n, int64_t g0, int64_t g1, int out) {             \
        int64_t C = q->C, G = q->G, NC = q->N * C, blocks = cl_blocks(C, L);                \
        int64_t c0 = offsets[g0], j = n * C + c0;                                           \
        const T *slab = x + n * L * C;                                                      \
        part_t near_parts[64];                                                              \
        W near_pivot[NEAR_BYTES / sizeof(W)];                                               \
        int64_t np = blocks * (g1 - g0);                                                    \
        part_t *parts = np <= 64 ? near_parts : malloc((size_t)np * sizeof(part_t));        \
        W *pivot = 2 * C <= (int64_t)(NEAR_BYTES / sizeof(W))                               \
                       ? near_pivot                                                         \
                       : malloc((size_t)(2 * C) * sizeof(W));                               \
        W *pilot = pivot + C;                                                               \
        cl_pivots_##S(slab, offsets, g0, g1, pivot);                                        \
        for (int64_t b = 0; b < blocks; b++)                                                \
            cl_block_##S(slab, C, L, offsets, g0, g1, pivot, pilot, b, parts + b * (g1 - g0)); \
        cl_merge_##S(parts, blocks, g1 - g0, g0, g1, offsets, pivot, mean + n * G,          \
                     var + n * G, q->lo ? q->lo + n * G : NULL);                            \
        for (int64_t i = n * G + g0; i < n * G + g1; i++) rstd[i] = 1.0 / sqrt(var[i] + eps); \
        coefs_##S##_##O(q, j, n * C + offsets[g1], 1, k);                                   \
        if (out) {                                                                          \
            rows_##S##_##O(slab + c0, y + n * L * C + c0, C, offsets[g1] - c0, 0, L, k + j, \
                           k + NC + j, k + 2 * NC + j, relu, nt);                           \
            drain(nt);                                                                      \
        }                                                                                   \
        if (pivot != near_pivot) free(pivot);                                               \
        if (parts != near_parts) free(parts);                                               \
    }                                                                                       \
    static void fused_cl_##S##_##O(const T *x, TO *y, int64_t L, const int64_t *offsets,    \
                                   const coef_in_t *q, double *mean, double *var,           \
                                   double *rstd, double eps, int relu, int nthreads) {      \
        W *k = malloc((size_t)(3 * q->N * q->C) * sizeof(W));                               \
        int nt = streams(q->N * q->C * L * (int64_t)sizeof(TO));                            \
        int64_t *bounds = malloc((size_t)(q->G + 1) * sizeof(int64_t));                     \
        int64_t chunks = cl_chunks(q->C, L, offsets, q->G, bounds);                         \
        /* A task a sample where the samples fill the threads (its chunks' statistics in    \
           turn, then its output row by row, all in one core's cache: written chunk by      \
           chunk, the output's rows were strided), else a task a chunk, its statistics and  \
           output: the same bits either way. */                                             \
        int whole = q->N >= nthreads;                                                       \
        int64_t per = whole ? chunks : 1;                                                   \
        FOR_TASKS(t, q->N * chunks / per, {                                                 \
            for (int64_t u = t * per; u < (t + 1) * per; u++)                               \
                cl_part_##S##_##O(x, y, L, offsets, q, mean, var, rstd, eps, k, relu, nt,   \
                                  u / chunks, bounds[u % chunks], bounds[u % chunks + 1],   \
                                  !whole);                                                  \
            if (whole) {                                                                    \
                int64_t NC = q->N * q->C, j = t * q->C;                                     \
                band_##S##_##O(x + t * L * q->C, y + t * L * q->C, q->C, L, k + j,          \
                               k + NC + j, k + 2 * NC + j, relu, nt);                       \
                drain(nt);                                                                  \
            }                                                                               \
        })                                                                                  \
        free(bounds);                                                                       \
        free(k);                                                                            \
    }                                                                                       \
    /* y from the coefficients of q: first all of them (COEF_CHUNK channels a task), then   \
       the output, in one parallel region. */                                               \
    static void apply_##S##_##O(const T *x, TO *y, int64_t L, int cl, const coef_in_t *q,   \
                                int relu, int nthreads) {                                   \
        int64_t N = q->N, C = q->C, NC = N * C;                                             \
        int nt = streams(NC * L * (int64_t)sizeof(TO));                                     \
        int64_t rows = C >= BLOCK / 4 ? 4 : BLOCK / C;                                      \
        int64_t tasks = cl ? N * ((L + rows - 1) / rows) : NC * ((L + BLOCK - 1) / BLOCK);  \
        int64_t parts = (NC + COEF_CHUNK - 1) / COEF_CHUNK;                                 \
        W *k = malloc((size_t)(4 * NC) * sizeof(W));                                        \
        FOR_TWO(j, parts,                                                                   \
                coefs_##S##_##O(q, j * COEF_CHUNK,                                          \
                                (j + 1) * COEF_CHUNK < NC ? (j + 1) * COEF_CHUNK : NC, cl, k), \
                t, tasks, apply_task_##S##_##O(x, y, N, C, L, cl, rows, k, relu, nt, t))    \
        free(k);                                                                            \
    }

DEFINE_STATS(f32, float, float, vf, F32_IN, load_f32, f, load_f32, 8, vf, load_f32, load_f32,
             HALF8)
DEFINE_STATS(f64, double, double, vd, F64_IN, load_f64, d, load_f64, 8, vd, load_f64, load_f64,
             HALF8)
DEFINE_STATS(bf16, uint16_t, float, vf, BF16_IN, load_bf16, f, load_f32, HALF_X, HALF_VX,
             BF16_LOADX, HALF_LOADW, HALF_SPLIT)
DEFINE_APPLY(f32, float, float, vf, F32_IN, load_f32, load_f32, relu_f, f32, float, F32_OUT,
             put_f32, store_f32, 8, vf, load_f32, load_f32, relu_f, put_f32)
DEFINE_APPLY(f64, double, double, vd, F64_IN, load_f64, load_f64, relu_d, f64, double,
             F64_OUT, put_f64, store_f64, 8, vd, load_f64, load_f64, relu_d, put_f64)
DEFINE_APPLY(bf16, uint16_t, float, vf, BF16_IN, load_bf16, load_f32, relu_f, bf16, uint16_t,
             BF16_OUT, put_bf16, store_bf16, HALF_X, HALF_VX, BF16_LOADX, HALF_LOADW, HALF_RELU,
             BF16_PUTX)
DEFINE_APPLY(bf16, uint16_t, float, vf, BF16_IN, load_bf16, load_f32, relu_f, f32, float,
             F32_OUT, put_f32, store_f32, 8, vf, load_bf16, load_f32, relu_f, put_f32)
#if HAVE_F16
DEFINE_STATS(f16, f16_t, float, vf, F16_IN, load_f16, f, load_f32, HALF_X, HALF_VX,
             F16_LOADX, HALF_LOADW, HALF_SPLIT)
DEFINE_APPLY(f16, f16_t, float, vf, F16_IN, load_f16, load_f32, relu_f, f16, f16_t, F16_OUT,
             put_f16, store_f16, HALF_X, HALF_VX, F16_LOADX, HALF_LOADW, HALF_RELU, F16_PUTX)
DEFINE_APPLY(f16, f16_t, float, vf, F16_IN, load_f16, load_f32, relu_f, f32, float, F32_OUT,
             put_f32, store_f32, 8, vf, load_f16, load_f32, relu_f, put_f32)
#endif

/* Backward, float32 and float64 (T = W): with xhat = ((x - hi) - lo) * rstd and g = dy * w[c],
     A[n,c] = sum_l dy, B[n,c] = sum_l dy * xhat        (db = sum_n A, dw = sum_n B),
     s1 = sum_{c in g} w[c] A[n,c], s2 = sum_{c in g} w[c] B[n,c], n_g = |g| L,
     dx = rstd * ((dy w[c] - s1 / n_g) - ((x - hi) - lo) * rstd s2 / n_g)
        = (dy (rstd w[c]) - k) - (x - hi) q,   q = rstd^2 s2 / n_g,  k = rstd s1 / n_g - q lo,
   in float64 (x - hi exact there) and rounded once: where g is nearly its group's mean and
   x - hi nearly xhat's share of the rest (a single-element group: exactly), dx is nearly 0
   while each term is up to rstd |dy w|, and any of them rounded to float32 came back that
   large: with dy rstd w - k and q in float32 (each float64 value split into two floats for
   the first), dx missed the float32 bound by up to 2.5x at std 1e-2 (rstd 100, dy of std 1;
   found by fuzzing). The float64 arithmetic took the backward 0.97-1.11x its time, SD 8^2
   the most (benchmarks/cpu_kernel_ab.py, Intel Xeon, one and two threads); lane-by-lane
   fma() calls instead of a * b + c (which GCC contracts) had taken 1.7-1.8x. lo, the part of
   the mean that hi leaves, enters through k. A and B are
   summed per (n, c) in float64, their terms too (B as rstd sum dy (x - mean), x - mean from
   the float64 mean), in a fixed order: dweight and dbias sum N L terms, and float32 terms
   (or float32 runs of them) missed the float32 bound on them by up to 1.3x where the sum is
   small. NCHW: one task
   per (n, c) row; channels-last: per (n, 64-channel slice), rows in order, 8 channels a
   vector; with an activation after the norm its pass makes them (act_sums_S). With
   per_sample, w[c] is w[n, c] throughout. */
/* Whether the sums pass also takes sum e and sum e^2 (e = x - mu) for the statistics again:
   float32 x, whose forward statistics came from float32 runs. */
#define EXACT_SUMS(T) (sizeof(T) == 4)
#define DEFINE_BACKWARD(S, T, VW, LOAD, WIDE, NARROW, STORE)                                \
    static void row_sums_##S(const T *x, const T *dy, int64_t n, double m, double *A,       \
                             double *B, double *E1, double *E2) {                           \
        vd a1 = {0}, a2 = {0}, b1 = {0}, b2 = {0}, e1 = {0}, e2 = {0};                      \
        int64_t i = 0;                                                                      \
        for (; i + 16 <= n; i += 16) {                                                      \
            vd d0 = WIDE(LOAD(dy + i)), d1 = WIDE(LOAD(dy + i + 8));                        \
            vd f0 = WIDE(LOAD(x + i)) - m, f1 = WIDE(LOAD(x + i + 8)) - m;                  \
            a1 += d0;                                                                       \
            b1 += d1;                                                                       \
            a2 += d0 * f0;                                                                  \
            b2 += d1 * f1;                                                                  \
            if (EXACT_SUMS(T)) {                                                            \
                e1 += f0 + f1;                                                              \
                e2 += f0 * f0 + f1 * f1;                                                    \
            }                                                                               \
        }                                                                                   \
        for (; i + 8 <= n; i += 8) {                                                        \
            vd d = WIDE(LOAD(dy + i)), f = WIDE(LOAD(x + i)) - m;                           \
            a1 += d;                                                                        \
            a2 += d * f;                                                                    \
            if (EXACT_SUMS(T)) {                                                            \
                e1 += f;                                                                    \
                e2 += f * f;                                                                \
            }                                                                               \
        }                                                                                   \
        double t1 = 0, t2 = 0, t3 = 0, t4 = 0;                                              \
        for (; i < n; i++) {                                                                \
            double f = (double)x[i] - m;                                                    \
            t1 += (double)dy[i];                                                            \
            t2 += (double)dy[i] * f;                                                        \
            t3 += f;                                                                        \
            t4 += f * f;                                                                    \
        }                                                                                   \
        *A = t1 + lanes(a1 + b1);                                                           \
        *B = t2 + lanes(a2 + b2);                                                           \
        if (EXACT_SUMS(T)) {                                                                \
            *E1 = t3 + lanes(e1);                                                           \
            *E2 = t4 + lanes(e2);                                                           \
        }                                                                                   \
    }                                                                                       \
    /* row_sums_S of the four rows j..j + 3 at once (n long each, means m[0..3]): their     \
       loads and sums overlap, where one short row (L = 64) waited on its own horizontal    \
       sums about as long as on its loads. */                                               \
    static void rows4_sums_##S(const T *x, const T *dy, int64_t n, const double *m,         \
                               double *A, double *B, double *E1, double *E2) {              \
        vd a[4] = {{0}}, b[4] = {{0}}, e1[4] = {{0}}, e2[4] = {{0}};                        \
        int64_t i = 0;                                                                      \
        for (; i + 8 <= n; i += 8)                                                          \
            for (int q = 0; q < 4; q++) {                                                   \
                vd d = WIDE(LOAD(dy + q * n + i)), f = WIDE(LOAD(x + q * n + i)) - m[q];    \
                a[q] += d;                                                                  \
                b[q] += d * f;                                                              \
                if (EXACT_SUMS(T)) {                                                        \
                    e1[q] += f;                                                             \
                    e2[q] += f * f;                                                         \
                }                                                                           \
            }                                                                               \
        for (int q = 0; q < 4; q++) {                                                       \
            double t1 = 0, t2 = 0, t3 = 0, t4 = 0;                                          \
            for (int64_t k = i; k < n; k++) {                                               \
                double f = (double)x[q * n + k] - m[q];                                     \
                t1 += (double)dy[q * n + k];                                                \
                t2 += (double)dy[q * n + k] * f;                                            \
                t3 += f;                                                                    \
                t4 += f * f;                                                                \
            }                                                                               \
            A[q] = t1 + lanes(a[q]);                                                        \
            B[q] = t2 + lanes(b[q]);                                                        \
            if (EXACT_SUMS(T)) {                                                            \
                E1[q] = t3 + lanes(e1[q]);                                                  \
                E2[q] = t4 + lanes(e2[q]);                                                  \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    /* Channels-last sums of rows 0..L of one sample over channels c0..c0 + 8 K, K vectors  \
       at a time (lanes are channels: each channel's terms in the same order as a scalar    \
       loop), the next RUN rows prefetched as in the statistics. */                         \
    static inline __attribute__((always_inline)) void cl_sums_##S(                          \
        const T *x, const T *dy, int64_t C, int64_t L, int64_t c0, int K, const double *m,  \
        double *A, double *B, double *E1, double *E2) {                                     \
        /* the means in registers, but for float32's eight vectors (with its four sums they \
           would not fit): memory operands there */                                         \
        int held = !EXACT_SUMS(T) || K <= 4;                                                \
        vd a1[8], a2[8], e1[8], e2[8], mm[8];                                               \
        for (int k = 0; k < K; k++) {                                                       \
            a1[k] = a2[k] = e1[k] = e2[k] = (vd){0};                                        \
            if (held) mm[k] = load_f64(m + c0 + 8 * k);                                     \
        }                                                                                   \
        for (int64_t q = 0; q < L; q++) {                                                   \
            prefetch_slice(dy + (q + RUN) * C + c0, K, (int)sizeof(T));                     \
            prefetch_slice(x + (q + RUN) * C + c0, K, (int)sizeof(T));                      \
            for (int k = 0; k < K; k++) {                                                   \
                int64_t c = c0 + 8 * k;                                                     \
                vd d = WIDE(LOAD(dy + q * C + c));                                          \
                vd f = WIDE(LOAD(x + q * C + c)) - (held ? mm[k] : load_f64(m + c));        \
                a1[k] += d;                                                                 \
                a2[k] += d * f;                                                             \
                if (EXACT_SUMS(T)) {                                                        \
                    e1[k] += f;                                                             \
                    e2[k] += f * f;                                                         \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        for (int k = 0; k < K; k++) {                                                       \
            int64_t c = c0 + 8 * k;                                                         \
            store_f64(A + c, a1[k]);                                                        \
            store_f64(B + c, a2[k]);                                                        \
            if (EXACT_SUMS(T)) {                                                            \
                store_f64(E1 + c, e1[k]);                                                   \
                store_f64(E2 + c, e2[k]);                                                   \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    /* With an activation after the norm, dy is dL/dy of y = act(u): g = dy act'(u) in      \
       float64 (f the derivative, inlined), u = (x - m) rw + ub formed in float64 from x.   \
       One pass makes g and the sums the dx pass needs: g rounded to T into dx's memory and \
       what that rounding leaves, rounded to T, into glo (the dx pass adds both: g in T     \
       alone put dx at up to 1.7x the float32 bound where it cancels, 12-element groups at  \
       rstd 125, found by fuzzing), A = sum g and B = r sum g (x - m) from g in float64. u  \
       is not the forward's: that one is rounded from float32 arithmetic (with scale and    \
       shift off by up to 1200 ulp where u is small), which act'' carried into dweight past \
       the float32 bound. act_row_S: NCHW row j of n elements, its tail as one vector of x  \
       padded with m and dy with 0 (g = 0 there). */                                        \
    static inline __attribute__((always_inline)) void act_row_##S(                          \
        const T *x, const T *dy, T *g, T *glo, int64_t j, int64_t n, const double *m,       \
        const double *r, const double *rw, const double *ub, double *A, double *B,          \
        vd (*f)(vd)) {                                                                      \
        const T *xr = x + j * n, *dr = dy + j * n;                                          \
        T *gr = g + j * n, *lr = glo + j * n;                                               \
        vd a1 = {0}, a2 = {0};                                                              \
        int64_t i = 0;                                                                      \
        for (; i + 8 <= n; i += 8) {                                                        \
            vd e = WIDE(LOAD(xr + i)) - m[j];                                               \
            vd v = WIDE(LOAD(dr + i)) * f(e * rw[j] + ub[j]);                               \
            VW hi = NARROW(v);                                                              \
            STORE(gr + i, hi);                                                              \
            STORE(lr + i, NARROW(v - WIDE(hi)));                                            \
            a1 += v;                                                                        \
            a2 += v * e;                                                                    \
        }                                                                                   \
        if (i < n) {                                                                        \
            T xt[8], dt[8];                                                                 \
            for (int k = 0; k < 8; k++) {                                                   \
                xt[k] = i + k < n ? xr[i + k] : (T)m[j];                                    \
                dt[k] = i + k < n ? dr[i + k] : (T)0;                                       \
            }                                                                               \
            vd e = WIDE(LOAD(xt)) - m[j];                                                   \
            vd v = WIDE(LOAD(dt)) * f(e * rw[j] + ub[j]);                                   \
            VW hi = NARROW(v), lo = NARROW(v - WIDE(hi));                                   \
            memcpy(gr + i, &hi, (size_t)(n - i) * sizeof(T));                               \
            memcpy(lr + i, &lo, (size_t)(n - i) * sizeof(T));                               \
            a1 += v;                                                                        \
            a2 += v * e;                                                                    \
        }                                                                                   \
        A[j] = lanes(a1);                                                                   \
        B[j] = lanes(a2) * r[j];                                                            \
    }                                                                                       \
    /* The same for channels-last rows 0..L of one sample over channels c0..c0 + 8 K, K     \
       vectors at a time (lanes are channels, rows in order, as cl_sums_S), m, r, rw and ub \
       per channel. */                                                                      \
    static inline __attribute__((always_inline)) void act_cl_##S(                           \
        const T *x, const T *dy, T *g, T *glo, int64_t C, int64_t L, int64_t c0, int K,     \
        const double *m, const double *r, const double *rw, const double *ub, double *A,    \
        double *B, vd (*f)(vd)) {                                                           \
        vd a1[8], a2[8];                                                                    \
        for (int k = 0; k < K; k++) a1[k] = a2[k] = (vd){0};                                \
        for (int64_t q = 0; q < L; q++) {                                                   \
            prefetch_slice(dy + (q + RUN) * C + c0, K, (int)sizeof(T));                     \
            prefetch_slice(x + (q + RUN) * C + c0, K, (int)sizeof(T));                      \
            for (int k = 0; k < K; k++) {                                                   \
                int64_t c = c0 + 8 * k, o = q * C + c;                                      \
                vd e = WIDE(LOAD(x + o)) - load_f64(m + c);                                 \
                vd v = WIDE(LOAD(dy + o)) * f(e * load_f64(rw + c) + load_f64(ub + c));     \
                VW hi = NARROW(v);                                                          \
                STORE(g + o, hi);                                                           \
                STORE(glo + o, NARROW(v - WIDE(hi)));                                       \
                a1[k] += v;                                                                 \
                a2[k] += v * e;                                                             \
            }                                                                               \
        }                                                                                   \
        for (int k = 0; k < K; k++) {                                                       \
            store_f64(A + c0 + 8 * k, a1[k]);                                               \
            store_f64(B + c0 + 8 * k, a2[k] * load_f64(r + c0 + 8 * k));                    \
        }                                                                                   \
    }                                                                                       \
    /* act_cl_S's last channels c0..C (fewer than 8) of one sample, each row's as one       \
       vector padded with zeros (g = 0 there). */                                           \
    static void act_cl_tail_##S(const T *x, const T *dy, T *g, T *glo, int64_t C,           \
                                int64_t L, int64_t c0, const double *m, const double *r,    \
                                const double *rw, const double *ub, double *A, double *B,   \
                                vd (*f)(vd)) {                                              \
        size_t w = (size_t)(C - c0);                                                        \
        double t[4][8] = {{0}};                                                             \
        memcpy(t[0], m + c0, w * sizeof(double));                                           \
        memcpy(t[1], rw + c0, w * sizeof(double));                                          \
        memcpy(t[2], ub + c0, w * sizeof(double));                                          \
        vd a1 = {0}, a2 = {0};                                                              \
        for (int64_t q = 0; q < L; q++) {                                                   \
            T xt[8] = {0}, dt[8] = {0};                                                     \
            memcpy(xt, x + q * C + c0, w * sizeof(T));                                      \
            memcpy(dt, dy + q * C + c0, w * sizeof(T));                                     \
            vd e = WIDE(LOAD(xt)) - load_f64(t[0]);                                         \
            vd v = WIDE(LOAD(dt)) * f(e * load_f64(t[1]) + load_f64(t[2]));                 \
            VW hi = NARROW(v), lo = NARROW(v - WIDE(hi));                                   \
            memcpy(g + q * C + c0, &hi, w * sizeof(T));                                     \
            memcpy(glo + q * C + c0, &lo, w * sizeof(T));                                   \
            a1 += v;                                                                        \
            a2 += v * e;                                                                    \
        }                                                                                   \
        memcpy(t[0], &a1, sizeof a1);                                                       \
        memcpy(t[3], &a2, sizeof a2);                                                       \
        for (size_t k = 0; k < w; k++) {                                                    \
            A[c0 + k] = t[0][k];                                                            \
            B[c0 + k] = t[3][k] * r[c0 + k];                                                \
        }                                                                                   \
    }                                                                                       \
    /* act_row_S for every NCHW row, or act_cl_S (and its tail) for every channels-last     \
       32-channel slice of a sample: with 64 (as cl_sums_S) the derivative's registers      \
       spilled, the channels-last activation backward 1.12x its time against 1.04x.         \
       act: 1 SiLU, 2 GELU. */                                                              \
    static void act_sums_##S(const T *x, const T *dy, T *g, T *glo, int64_t N, int64_t C,   \
                             int64_t L, int cl, const double *m, const double *r,           \
                             const double *rw, const double *ub, double *A, double *B,      \
                             int act, int nthreads) {                                       \
        vd (*f)(vd) = act == 1 ? silu_grad_d : gelu_grad_d;                                 \
        if (!cl) {                                                                          \
            FOR_TASKS(j, N * C, {                                                           \
                if (act == 1)                                                               \
                    act_row_##S(x, dy, g, glo, j, L, m, r, rw, ub, A, B, silu_grad_d);      \
                else                                                                        \
                    act_row_##S(x, dy, g, glo, j, L, m, r, rw, ub, A, B, gelu_grad_d);      \
            })                                                                              \
            return;                                                                         \
        }                                                                                   \
        int64_t slices = (C + 31) / 32;                                                     \
        FOR_TASKS(t, N * slices, {                                                          \
            int64_t n = t / slices, c0 = t % slices * 32;                                   \
            int64_t c1 = c0 + 32 < C ? c0 + 32 : C, K = (c1 - c0) / 8;                      \
            int64_t o = n * L * C, p = n * C;                                               \
            const T *xs = x + o, *ds = dy + o;                                              \
            T *gs = g + o, *ls = glo + o;                                                   \
            const double *mp = m + p, *rp = r + p, *wp = rw + p, *up = ub + p;              \
            if (K == 4 && act == 1)                                                         \
                act_cl_##S(xs, ds, gs, ls, C, L, c0, 4, mp, rp, wp, up, A + p, B + p,       \
                           silu_grad_d);                                                    \
            else if (K == 4)                                                                \
                act_cl_##S(xs, ds, gs, ls, C, L, c0, 4, mp, rp, wp, up, A + p, B + p,       \
                           gelu_grad_d);                                                    \
            else                                                                            \
                for (int64_t k = 0; k < K; k++) {                                           \
                    int64_t c = c0 + 8 * k;                                                 \
                    if (act == 1)                                                           \
                        act_cl_##S(xs, ds, gs, ls, C, L, c, 1, mp, rp, wp, up, A + p,       \
                                   B + p, silu_grad_d);                                     \
                    else                                                                    \
                        act_cl_##S(xs, ds, gs, ls, C, L, c, 1, mp, rp, wp, up, A + p,       \
                                   B + p, gelu_grad_d);                                     \
                }                                                                           \
            if (c0 + 8 * K < c1)                                                            \
                act_cl_tail_##S(xs, ds, gs, ls, C, L, c0 + 8 * K, mp, rp, wp, up, A + p,    \
                                B + p, f);                                                  \
        })                                                                                  \
    }                                                                                       \
    /* Channels-last sums of e = x - m[c] and e^2 over rows 0..L of one sample, channels    \
       c0..c0 + 8 K, K vectors at a time, as cl_sums_S. */                                  \
    static inline __attribute__((always_inline)) void cl_centered_##S(                      \
        const T *x, int64_t C, int64_t L, int64_t c0, int K, const double *m, double *s1,   \
        double *s2) {                                                                       \
        vd a1[8], a2[8], mm[8];                                                             \
        for (int k = 0; k < K; k++) {                                                       \
            a1[k] = a2[k] = (vd){0};                                                        \
            mm[k] = load_f64(m + c0 + 8 * k);                                               \
        }                                                                                   \
        for (int64_t q = 0; q < L; q++) {                                                   \
            prefetch_slice(x + (q + RUN) * C + c0, K, (int)sizeof(T));                      \
            for (int k = 0; k < K; k++) {                                                   \
                vd e = WIDE(LOAD(x + q * C + c0 + 8 * k)) - mm[k];                          \
                a1[k] += e;                                                                 \
                a2[k] += e * e;                                                             \
            }                                                                               \
        }                                                                                   \
        for (int k = 0; k < K; k++) {                                                       \
            store_f64(s1 + c0 + 8 * k, a1[k]);                                              \
            store_f64(s2 + c0 + 8 * k, a2[k]);                                              \
        }                                                                                   \
    }                                                                                       \
    /* A float32 input's statistics again, in float64, for the activation's backward (the   \
       other float32 backwards take them in their sums pass): the forward's sums take       \
       float32 runs of x - pivot (relative error ~1e-7 near zero, where the subtraction     \
       rounds), u = xhat w + ub carries that error, and dy act''(u) carries it times rstd   \
       |w| into dx: 1.6-4.2x the float32 bound at rstd 330, |w| = 6, near a zero of act'    \
       (test_regression_float32_activation_gradient_from_float32_statistics). The sums of e \
       = x - m and e^2 around the forward's mean m in float64 (NCHW a task per (n, g), its  \
       elements contiguous; channels-last per (n, c) in 64-channel slices as the sums,      \
       folded per group), made into statistics by centered_stats. */                        \
    static void exact_stats_##S(const T *x, int64_t N, int64_t C, int64_t L, int cl,        \
                                const int64_t *offsets, int64_t G, const double *kmd,       \
                                double *mlo, double *rstd, double *krd, double eps,         \
                                int nthreads) {                                             \
        int64_t NC = N * C, NG = N * G, slices = (C + 63) / 64;                             \
        double *s1 = malloc((size_t)(2 * (NC + NG)) * sizeof(double)), *s2 = s1 + NC;       \
        double *g1 = s2 + NC, *g2 = g1 + NG;                                                \
        if (!cl)                                                                            \
            FOR_TASKS(i, NG, {                                                              \
                int64_t n = i / G, g = i - n * G, c = offsets[g];                           \
                const T *xg = x + (n * C + c) * L;                                          \
                int64_t len = (offsets[g + 1] - c) * L, k = 0;                              \
                vd m = (vd){0} + kmd[n * C + c], a1 = {0}, a2 = {0}, b1 = {0}, b2 = {0};    \
                for (; k + 16 <= len; k += 16) {                                            \
                    vd e = WIDE(LOAD(xg + k)) - m, f = WIDE(LOAD(xg + k + 8)) - m;          \
                    a1 += e;                                                                \
                    a2 += e * e;                                                            \
                    b1 += f;                                                                \
                    b2 += f * f;                                                            \
                }                                                                           \
                double t1 = 0, t2 = 0;                                                      \
                for (; k < len; k++) {                                                      \
                    double e = (double)xg[k] - kmd[n * C + c];                              \
                    t1 += e;                                                                \
                    t2 += e * e;                                                            \
                }                                                                           \
                g1[i] = t1 + lanes(a1 + b1);                                                \
                g2[i] = t2 + lanes(a2 + b2);                                                \
            })                                                                              \
        else {                                                                              \
            FOR_TASKS(t, N * slices, {                                                      \
                int64_t n = t / slices, c0 = t % slices * 64;                               \
                int64_t c1 = c0 + 64 < C ? c0 + 64 : C, K = (c1 - c0) / 8;                  \
                const T *xs = x + n * L * C;                                                \
                const double *m = kmd + n * C;                                              \
                if (K == 8)                                                                 \
                    cl_centered_##S(xs, C, L, c0, 8, m, s1 + n * C, s2 + n * C);            \
                else                                                                        \
                    for (int64_t k = 0; k < K; k++)                                         \
                        cl_centered_##S(xs, C, L, c0 + 8 * k, 1, m, s1 + n * C, s2 + n * C); \
                for (int64_t c = c0 + 8 * K; c < c1; c++) {                                 \
                    double t1 = 0, t2 = 0;                                                  \
                    for (int64_t q = 0; q < L; q++) {                                       \
                        double e = (double)xs[q * C + c] - m[c];                            \
                        t1 += e;                                                            \
                        t2 += e * e;                                                        \
                    }                                                                       \
                    s1[n * C + c] = t1;                                                     \
                    s2[n * C + c] = t2;                                                     \
                }                                                                           \
            })                                                                              \
            fold_sums(s1, N, C, offsets, G, g1);                                            \
            fold_sums(s2, N, C, offsets, G, g2);                                            \
        }                                                                                   \
        centered_stats(g1, g2, N, C, L, offsets, G, eps, mlo, rstd, krd);                   \
        free(s1);                                                                           \
    }                                                                                       \
    /* dx of one element (of coefficients j) as the vectors form it: the scalar tails, and  \
       channels-last rows where a group may have two elements (L <= 2). There dx = rstd^3   \
       eps (g1 w1 - g2 w2) / 2 is nearly 0 but its two terms are each rstd |g1 w1 - g2 w2|  \
       / 2, unbounded as the two values of x approach each other. */                        \
    static inline T dx64_##S(T x, T dy, T dylo, int64_t j, const double *kw,                \
                             const double *km, const T *khi, const double *kq64) {          \
        return (T)((((double)dy + (double)dylo) * kw[j] - km[j]) -                          \
                   ((double)x - (double)khi[j]) * kq64[j]);                                 \
    }                                                                                       \
    static void backward_##S(const T *x, const T *dy, T *dx, int64_t N, int64_t C, int64_t L, \
                             int cl, const int64_t *offsets, int64_t G,                     \
                             const int64_t *group_of, const double *mean, const double *var, \
                             const double *lo, double eps, const double *wd, int per_sample, \
                             double *dw,                                                    \
                             double *db, const double *sa, const double *sb, int given,     \
                             int act, const double *ubd, int nthreads) {                    \
        int64_t NC = N * C;                                                                 \
        double *work = malloc((size_t)(4 * NC + 5 * N * G) * sizeof(double));               \
        double *A = work, *B = A + NC, *rstd = B + NC, *mu = rstd + N * G, *mlo = mu + N * G; \
        /* sums of x - mu and (x - mu)^2 per (n, c), then per group */                      \
        double *E1 = mlo + N * G, *E2 = E1 + NC, *g1 = E2 + NC, *g2 = g1 + N * G;           \
        /* per (n, c), each an array of NC: hi in T; w (then r w), k, the mean, rstd and q in \
           float64 */                                                                       \
        T *khi = malloc((size_t)NC * sizeof(T));                                            \
        T *glo = NULL; /* with an activation: what g's rounding to T left, rounded */       \
        double *kw = malloc((size_t)(5 * NC) * sizeof(double)), *km = kw + NC;              \
        double *kmd = km + NC, *krd = kmd + NC; /* mean and rstd per (n, c) for the sums */ \
        double *kq64 = krd + NC;                                                            \
        /* A group of two elements (or one) takes its mean and variance again from x,       \
           exactly: the forward's are accurate to the spread's T rounding, and dx there is  \
           nearly 0 (see dx64_S), a cancellation that error would show through. */          \
        for (int64_t n = 0, i = 0; n < N; n++)                                              \
            for (int64_t g = 0; g < G; g++, i++) {                                          \
                double m = mean[i], v = var[i], e[2], low = lo ? lo[i] : 0.0;               \
                int64_t k = 0;                                                              \
                if (!given && L > 0 && (offsets[g + 1] - offsets[g]) * L <= 2) {            \
                    for (int64_t c = offsets[g]; c < offsets[g + 1]; c++)                   \
                        for (int64_t l = 0; l < L; l++)                                     \
                            e[k++] = (double)x[cl ? (n * L + l) * C + c : (n * C + c) * L + l]; \
                    m = k == 2 ? 0.5 * (e[0] + e[1]) : e[0];                                \
                    v = k == 2 ? 0.25 * (e[0] - e[1]) * (e[0] - e[1]) : 0.0 * e[0];         \
                    low = k == 2 ? 0.5 * two_sum_lo(e[0], e[1], e[0] + e[1]) : 0.0;         \
                }                                                                           \
                mu[i] = m;                                                                  \
                mlo[i] = low;                                                               \
                rstd[i] = 1.0 / sqrt(v + eps);                                              \
            }                                                                               \
        for (int64_t n = 0, j = 0; n < N; n++)                                              \
            for (int64_t c = 0; c < C; c++, j++) {                                          \
                int64_t i = n * G + group_of[c];                                            \
                khi[j] = (T)mu[i];                                                          \
                kmd[j] = mu[i];                                                             \
                krd[j] = rstd[i];                                                           \
                kw[j] = wd[per_sample ? j : c];                                             \
            }                                                                               \
        if (sizeof(T) == 4 && !given && act)                                                \
            exact_stats_##S(x, N, C, L, cl, offsets, G, kmd, mlo, rstd, krd, eps, nthreads); \
        if (act) { /* g into dx's memory, the dy of what follows */                         \
            double *krw = malloc((size_t)(2 * NC) * sizeof(double)), *kub = krw + NC;       \
            for (int64_t n = 0, j = 0; n < N; n++)                                          \
                for (int64_t c = 0; c < C; c++, j++) {                                      \
                    /* u = (x - kmd - mlo) krw + ub: the mean's low part folded into ub */  \
                    krw[j] = krd[j] * kw[j];                                                \
                    kub[j] = (ubd ? ubd[per_sample ? j : c] : 0.0) -                        \
                             mlo[n * G + group_of[c]] * krw[j];                             \
                }                                                                           \
            glo = malloc((size_t)(NC * L) * sizeof(T));                                     \
            act_sums_##S(x, dy, dx, glo, N, C, L, cl, kmd, krd, krw, kub, A, B, act,        \
                         nthreads);                                                         \
            free(krw);                                                                      \
            dy = dx;                                                                        \
        }                                                                                   \
        if (!glo && !cl) { /* the sums, where the activation's pass has not made them */    \
            /* Short rows four at a time (at most three left over); long ones alone         \
               (eight streams at once measured 3-5 % slower at L = 4096). */                \
            if (L < 512) {                                                                  \
                FOR_TASKS(t, NC / 4, {                                                      \
                    int64_t j = 4 * t;                                                      \
                    rows4_sums_##S(x + j * L, dy + j * L, L, kmd + j, A + j, B + j, E1 + j,   \
                                   E2 + j);                                                 \
                })                                                                          \
                for (int64_t j = NC - NC % 4; j < NC; j++)                                  \
                    row_sums_##S(x + j * L, dy + j * L, L, kmd[j], A + j, B + j, E1 + j,      \
                                 E2 + j);                                                   \
            } else                                                                          \
                FOR_TASKS(j, NC, {                                                          \
                    row_sums_##S(x + j * L, dy + j * L, L, kmd[j], A + j, B + j, E1 + j,      \
                                 E2 + j);                                                   \
                })                                                                          \
        } else if (!glo) {                                                                  \
            /* float32: slices of 32 channels, whose four sums of 4 vectors and the means   \
               fit the registers (64: the sums' 32 vectors and means from memory took the  \
               backward of (2, 320, 64, 64) 1.04-1.10x the time), but a row of 64 whole     \
               (32: (8, 64, 32, 32) 1.06-1.08x) */                                          \
            const int64_t W = EXACT_SUMS(T) && C > 64 ? 32 : 64, K = W / 8;                 \
            const int64_t slices = (C + W - 1) / W;                                         \
            FOR_TASKS(t, N * slices, {                                                      \
                int64_t n = t / slices, c0 = t % slices * W;                                \
                int64_t c1 = c0 + W < C ? c0 + W : C, c8 = c0 + (c1 - c0) / 8 * 8;          \
                const T *xs = x + n * L * C, *ds = dy + n * L * C;                          \
                const double *m = kmd + n * C;                                              \
                double *a = A + n * C, *b = B + n * C, *e1 = E1 + n * C, *e2 = E2 + n * C;  \
                if (c8 - c0 == W)                                                           \
                    cl_sums_##S(xs, ds, C, L, c0, K, m, a, b, e1, e2);                      \
                else                                                                        \
                    for (int64_t c = c0; c < c8; c += 8)                                    \
                        cl_sums_##S(xs, ds, C, L, c, 1, m, a, b, e1, e2);                   \
                for (int64_t c = c8; c < c1; c++) {                                         \
                    double a1 = 0, a2 = 0, a3 = 0, a4 = 0;                                  \
                    for (int64_t q = 0; q < L; q++) {                                       \
                        double d = (double)ds[q * C + c], f = (double)xs[q * C + c] - m[c]; \
                        a1 += d;                                                            \
                        a2 += d * f;                                                        \
                        a3 += f;                                                            \
                        a4 += f * f;                                                        \
                    }                                                                       \
                    a[c] = a1;                                                              \
                    b[c] = a2;                                                              \
                    e1[c] = a3;                                                             \
                    e2[c] = a4;                                                             \
                }                                                                           \
            })                                                                              \
        }                                                                                   \
        if (!glo) {                                                                         \
            /* A float32 input's statistics again, from the sums of x - mu and (x - mu)^2   \
               this pass took beside A and B (as exact_stats_S, without a pass of its own:  \
               that had cost the backward 10-30 %, so it was taken only where rstd |w| /    \
               sqrt(n_g) > 2, 3-element groups at rstd 100 putting dx at 3.9x the float32   \
               bound). The forward's are off by ~1e-8 of the spread in the mean and up to   \
               ~5e-7 in the variance where one element outweighs its group; B carries the   \
               mean's error times sum dy, and dx at a dominant element cancels: dweight at  \
               up to 9x the float32 bound for a dy of nonzero mean (the gradient of y.sum(), \
               groups of one channel), dx at the dominant element 1.3-1.8x                  \
               (test_regression_float32_dweight_of_a_dy_with_a_mean,                        \
               test_regression_a_dominated_group_gets_exact_gradients,                      \
               test_regression_float32_dx_of_small_groups_from_float32_statistics). */      \
            if (EXACT_SUMS(T) && !given) {                                                  \
                fold_sums(E1, N, C, offsets, G, g1);                                        \
                fold_sums(E2, N, C, offsets, G, g2);                                        \
                centered_stats(g1, g2, N, C, L, offsets, G, eps, mlo, rstd, krd);           \
            }                                                                               \
            for (int64_t j = 0; j < NC; j++) B[j] *= krd[j];                                \
        }                                                                                   \
        /* B was summed around mu: around the mean, sum dy (x - mu - lo) = B - lo A */      \
        for (int64_t n = 0, j = 0; n < N; n++)                                              \
            for (int64_t c = 0; c < C; c++, j++)                                            \
                B[j] -= mlo[n * G + group_of[c]] * A[j] * krd[j];                           \
        if (per_sample) {                                                                   \
            if (db) memcpy(db, A, (size_t)NC * sizeof(double));                             \
            if (dw) memcpy(dw, B, (size_t)NC * sizeof(double));                             \
        } else                                                                              \
            for (int64_t c = 0; c < C; c++) {                                               \
                double sa = 0, sb = 0;                                                      \
                for (int64_t n = 0; n < N; n++) {                                           \
                    sa += A[n * C + c];                                                     \
                    sb += B[n * C + c];                                                     \
                }                                                                           \
                if (db) db[c] = sa;                                                         \
                if (dw) dw[c] = sb;                                                         \
            }                                                                               \
        for (int64_t n = 0; n < N; n++)                                                     \
            for (int64_t g = 0; g < G; g++) {                                               \
                double s1 = 0, s2 = 0, r = rstd[n * G + g];                                 \
                double n_g = (double)((offsets[g + 1] - offsets[g]) * L);                   \
                for (int64_t c = offsets[g]; c < offsets[g + 1]; c++) {                     \
                    s1 += kw[n * C + c] * A[n * C + c];                                     \
                    s2 += kw[n * C + c] * B[n * C + c];                                     \
                }                                                                           \
                /* gradients through returned statistics, a (x - mean) + b, folded in:      \
                   dx = r (dy w - m1 - (x - mean) r s2 / n_g) + a (x - mean) + b */         \
                double ea = sa ? sa[n * G + g] / r : 0.0, eb = sb ? sb[n * G + g] / r : 0.0; \
                /* given statistics are constants here: dx = r dy w (their own gradients    \
                   come from A and B) */                                                    \
                if (given) s1 = s2 = 0.0;                                                   \
                /* a group of one element: y is its bias whatever x, and dy w r - r s1 / n_g  \
                   cancelled only to rstd times a rounding (eps 1e-30: dx 0.14 where it is 0) */ \
                int alone = !given && n_g == 1;                                             \
                if (alone) s1 = 0.0;                                                        \
                double q64 = r * (r * s2 / n_g - ea), m1 = r * (s1 / n_g - eb);             \
                for (int64_t c = offsets[g]; c < offsets[g + 1]; c++) {                     \
                    int64_t j = n * C + c;                                                  \
                    km[j] = m1 - q64 * ((kmd[j] - (double)khi[j]) + mlo[n * G + g]);        \
                    kq64[j] = q64;                                                          \
                    kw[j] = alone ? 0.0 : kw[j] * r;                                        \
                }                                                                           \
            }                                                                               \
        /* Given statistics (and none returned): dx = r dy w whatever x holds, so x is not \
           read: (x - hi) q with q = 0 made a NaN or Inf at a masked position a NaN dx. */  \
        int xq = !given || sa;                                                              \
        if (!cl) {                                                                          \
            FOR_TASKS(j, NC, {                                                              \
                const T *xr = x + j * L, *dr = dy + j * L;                                  \
                vd vrw = (vd){0} + kw[j], vmk = (vd){0} - km[j];                            \
                vd vh = (vd){0} + (double)khi[j], vmq = (vd){0} - kq64[j];                  \
                T *out = dx + j * L;                                                        \
                int64_t i = 0;                                                              \
                if (!xq)                                                                    \
                    for (; i + 8 <= L; i += 8) {                                            \
                        vd g = WIDE(LOAD(dr + i));                                          \
                        if (glo) g += WIDE(LOAD(glo + j * L + i));                          \
                        STORE(out + i, NARROW(g * vrw + vmk));                              \
                    }                                                                       \
                else if (glo)                                                               \
                    for (const T *lr = glo + j * L; i + 8 <= L; i += 8) {                   \
                        vd g = (WIDE(LOAD(dr + i)) + WIDE(LOAD(lr + i))) * vrw + vmk;       \
                        STORE(out + i, NARROW((WIDE(LOAD(xr + i)) - vh) * vmq + g));        \
                    }                                                                       \
                else                                                                        \
                    for (; i + 8 <= L; i += 8) {                                            \
                        vd g = WIDE(LOAD(dr + i)) * vrw + vmk;                              \
                        STORE(out + i, NARROW((WIDE(LOAD(xr + i)) - vh) * vmq + g));        \
                    }                                                                       \
                for (; i < L; i++)                                                          \
                    out[i] = dx64_##S(xq ? xr[i] : khi[j], dr[i], glo ? glo[j * L + i] : 0, j, \
                                      kw, km, khi, kq64);                                   \
            })                                                                              \
        } else {                                                                            \
            /* groups of two elements or fewer (L <= 2) all in float64, see dx64_S */       \
            int64_t C8 = L > 2 ? C - C % 8 : 0;                                             \
            FOR_TASKS(t, N * L, {                                                           \
                int64_t o = t / L * C;                                                      \
                const T *xr = x + t * C, *dr = dy + t * C;                                  \
                T *out = dx + t * C;                                                        \
                const T *lr = glo ? glo + t * C : NULL;                                     \
                for (int64_t c = 0; c < C8; c += 8) {                                       \
                    int64_t j = o + c;                                                      \
                    vd d = WIDE(LOAD(dr + c));                                              \
                    if (lr) d += WIDE(LOAD(lr + c));                                        \
                    vd g = d * load_f64(kw + j) - load_f64(km + j);                         \
                    if (!xq) {                                                              \
                        STORE(out + c, NARROW(g));                                          \
                        continue;                                                           \
                    }                                                                       \
                    vd e = WIDE(LOAD(xr + c)) - WIDE(LOAD(khi + j));                        \
                    STORE(out + c, NARROW(g - e * load_f64(kq64 + j)));                     \
                }                                                                           \
                for (int64_t c = C8; c < C; c++)                                            \
                    out[c] = dx64_##S(xq ? xr[c] : khi[o + c], dr[c], lr ? lr[c] : 0, o + c, \
                                      kw, km, khi, kq64);                                   \
            })                                                                              \
        }                                                                                   \
        free(kw);                                                                           \
        free(khi);                                                                          \
        free(glo);                                                                          \
        free(work);                                                                         \
    }

DEFINE_BACKWARD(f32, float, vf, load_f32, wide_f, narrow_f, store_f32)
DEFINE_BACKWARD(f64, double, vd, load_f64, wide_d, wide_d, store_f64)

/* dx (x's dtype and layout) and, where asked, dw and db (C, summed in float64, stored as
   stype: F32 or F64) for the forward that used mean and var, and lo, the means' low parts
   (or NULL: zeros); dy in x's layout. float32 and
   float64 only. per_sample: w is (N, C), a weight per sample and channel (w[c] (1 + scale[n,
   c]) of a modulated forward), and dw and db get the (N, C) sums B and A themselves (F64).
   sa, sb (float64 (N, G), or NULL): gradients that reach x through returned statistics,
   a (x - mean) + b on every element of group (n, g), added to dx in the same pass. given: mean
   and var were given, constants here: dx = rstd dy w. act (float32 only; 1 SiLU, 2 GELU, 0
   none): the forward's output was act(u), u = xhat w + ub (ub float64, per channel, or per
   (n, c) with per_sample, or NULL for 0), and dy is dL/d act(u): g = dy act'(u), u recomputed
   in float64 around float64 statistics, replaces dy throughout, kept as float32 plus the
   residual of that rounding. */
static int gn_backward(const void *x, const void *dy, void *dx, int dtype, int64_t N, int64_t C,
                       int64_t L, int cl, const int64_t *offsets, int64_t G,
                       const int64_t *group_of, const double *mean, const double *var,
                       const double *lo, double eps, const void *w, int wtype, void *dw,
                       void *db, int stype,
                       const double *sa, const double *sb, int given, int nthreads,
                       int per_sample, int act, const double *ub) {
    if ((dtype != F32 && dtype != F64) || (stype != F64 && (stype != F32 || per_sample)))
        return -1;
    if (act && (dtype != F32 || (act != 1 && act != 2))) return -1;
    if (N * C * L < PARALLEL_MIN) nthreads = 1;
    int64_t nw = per_sample ? N * C : C;
    /* wd, then float64 dw and db where they are stored as float32 */
    double *wd = malloc((size_t)(nw + (stype == F32 ? 2 * C : 0)) * sizeof(double));
    for (int64_t j = 0; j < nw; j++) wd[j] = param(w, wtype, j, 1.0);
    double *dw64 = stype == F32 ? (dw ? wd + nw : NULL) : dw;
    double *db64 = stype == F32 ? (db ? wd + nw + C : NULL) : db;
    if (dtype == F32)
        backward_f32(x, dy, dx, N, C, L, cl, offsets, G, group_of, mean, var, lo, eps, wd,
                     per_sample, dw64, db64, sa, sb, given, act, ub, nthreads);
    else
        backward_f64(x, dy, dx, N, C, L, cl, offsets, G, group_of, mean, var, lo, eps, wd,
                     per_sample, dw64, db64, sa, sb, given, 0, NULL, nthreads);
    if (stype == F32)
        for (int64_t c = 0; c < C; c++) {
            if (dw) ((float *)dw)[c] = (float)dw64[c];
            if (db) ((float *)db)[c] = (float)db64[c];
        }
    free(wd);
    return 0;
}

/* 8 x 8 block of 4-byte elements: d[j * ld + i] = s[i * ls + j], in registers (three rounds
   of two-vector shuffles). */
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
static inline void transpose8(const uint32_t *s, int64_t ls, uint32_t *d, int64_t ld) {
    vu r[8], t[8];
    for (int i = 0; i < 8; i++) memcpy(&r[i], s + i * ls, sizeof(vu));
    for (int i = 0; i < 8; i += 2) {
        t[i] = SHUF(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = SHUF(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)
        for (int k = 0; k < 2; k++) {
            r[i + 2 * k] = SHUF(t[i + k], t[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            r[i + 2 * k + 1] = SHUF(t[i + k], t[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int j = 0; j < 4; j++) {
        vu lo = SHUF(r[j], r[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        vu hi = SHUF(r[j], r[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
        memcpy(d + j * ld, &lo, sizeof(vu));
        memcpy(d + (j + 4) * ld, &hi, sizeof(vu));
    }
}

/* dst (N, L, C) from src (N, C, L), elements of esize bytes (4 or 8), TILE positions of every
   channel at a time, 4-byte elements in 8 x 8 register blocks (torch's strided copy took 4 ns
   an element on SD's 2 x 320 x 64^2). */
#define TILE 64
#define TRANSPOSE_TILE(T, BLOCKS)                                                           \
    do {                                                                                    \
        const T *s = (const T *)src + n * C * L;                                            \
        T *d = (T *)dst + n * L * C;                                                        \
        int64_t c8 = BLOCKS ? C - C % 8 : 0, l8 = BLOCKS ? l0 + (l1 - l0) / 8 * 8 : l0;     \
        for (int64_t c = 0; c < c8; c += 8)                                                 \
            for (int64_t l = l0; l < l8; l += 8)                                            \
                transpose8((const uint32_t *)s + c * L + l, L, (uint32_t *)d + l * C + c, C); \
        for (int64_t l = l0; l < l1; l++)                                                   \
            for (int64_t c = l < l8 ? c8 : 0; c < C; c++) d[l * C + c] = s[c * L + l];      \
    } while (0)
static int gn_to_channels_last(const void *src, void *dst, int64_t N, int64_t C, int64_t L,
                               int esize, int nthreads) {
    if (esize != 4 && esize != 8) return -1;
    if (N * C * L < PARALLEL_MIN) nthreads = 1;
    int64_t tiles = (L + TILE - 1) / TILE;
    FOR_TASKS(t, N * tiles, {
        int64_t n = t / tiles, l0 = t % tiles * TILE, l1 = l0 + TILE < L ? l0 + TILE : L;
        if (esize == 4) TRANSPOSE_TILE(uint32_t, 1);
        else TRANSPOSE_TILE(uint64_t, 0);
    })
    return 0;
}

/* 1 where every |mean[i] * rstd[i]| <= limit (in float64; a NaN fails), else 0: the check on
   torch's kernel's statistics, which every checked call pays (NumPy took 4-7 us, torch's ops
   on half-precision statistics 11 us). */
static int gn_trusted(const void *mean, const void *rstd, int dtype, int64_t n, double limit) {
    for (int64_t i = 0; i < n; i++)
        if (!(fabs(param(mean, dtype, i, NAN) * param(rstd, dtype, i, NAN)) <= limit)) return 0;
    return 1;
}

/* out = act(u) (dy NULL) or dy act'(u), elementwise over n float32 elements, in float64,
   rounded once: the activation after the kernel's forward and its backward (torch's float32
   SiLU backward rounds several times, and the backward's float64 sums of those dy over N L
   positions carried it into dweight past the float32 bound; torch's float64 ops took 1.1-3.3
   ms on 164K elements). act, as the Triton ACT codes: 1 SiLU, 2 GELU; -1 for any other. */
#define ACT_CHUNK 16384
/* out[i..end) of the above with f (inlined: a constant at each call), the tail through a
   zero-padded vector. */
static inline __attribute__((always_inline)) void act_range(const float *dy, const float *u,
                                                            float *out, int64_t i, int64_t end,
                                                            vd (*f)(vd)) {
    for (; i + 8 <= end; i += 8) {
        vd v = f(wide_f(load_f32(u + i)));
        store_f32(out + i, narrow_f(dy ? wide_f(load_f32(dy + i)) * v : v));
    }
    if (i < end) {
        float d[8] = {0}, w[8] = {0};
        if (dy) memcpy(d, dy + i, (size_t)(end - i) * sizeof(float));
        memcpy(w, u + i, (size_t)(end - i) * sizeof(float));
        vd v = f(wide_f(load_f32(w)));
        vf r = narrow_f(dy ? wide_f(load_f32(d)) * v : v);
        memcpy(out + i, &r, (size_t)(end - i) * sizeof(float));
    }
}
static int gn_activation(const float *dy, const float *u, float *out, int act, int64_t n,
                         int nthreads) {
    if (act != 1 && act != 2) return -1;
    if (n < PARALLEL_MIN) nthreads = 1;
    FOR_TASKS(t, (n + ACT_CHUNK - 1) / ACT_CHUNK, {
        int64_t i = t * ACT_CHUNK, end = i + ACT_CHUNK < n ? i + ACT_CHUNK : n;
        if (act == 1 && dy)
            act_range(dy, u, out, i, end, silu_grad_d);
        else if (act == 1)
            act_range(NULL, u, out, i, end, silu_d);
        else if (dy)
            act_range(dy, u, out, i, end, gelu_grad_d);
        else
            act_range(NULL, u, out, i, end, gelu_d);
    })
    return 0;
}

/* Bit k set: dtype code k is supported by this build. */
static int gn_dtypes(void) { return 1 << F32 | 1 << F64 | 1 << BF16 | HAVE_F16 << F16; }

/* Per-(n, g) mean and var (float64, (N, G)) of x. */
static int gn_stats(const void *x, int dtype, int64_t N, int64_t C, int64_t L, int cl,
             const int64_t *offsets, int64_t G, double *mean, double *var, double *lo,
             int nthreads) {
    if (N * C * L < PARALLEL_MIN) nthreads = 1;
#define STATS_CASE(CODE, S, T)                                                              \
    case CODE:                                                                              \
        if (cl) stats_cl_##S((const T *)x, N, C, L, offsets, G, mean, var, lo, nthreads);   \
        else stats_nchw_##S((const T *)x, N, C, L, offsets, G, mean, var, lo, nthreads);    \
        return 0;
    switch (dtype) {
    STATS_CASE(F32, f32, float)
    STATS_CASE(F64, f64, double)
    STATS_CASE(BF16, bf16, uint16_t)
#if HAVE_F16
    STATS_CASE(F16, f16, f16_t)
#endif
    default: return -1;
    }
}

/* y from x and per-(n, g) mean and var: given (given = 1) or computed here into mean and var.
   lo (or NULL), per (n, g): what the mean's float64 number leaves of it (two_sum_lo), read
   where given, written where computed. */
static int gn_forward(const void *x, int dtype, void *y, int ytype, int64_t N, int64_t C,
                      int64_t L, int cl, const int64_t *offsets, int64_t G,
                      const int64_t *group_of, double *mean, double *var, double *lo, int given,
                      double eps,
                      const void *w, int wtype, const void *b, int btype, const double *scale,
                      const double *shift, int relu, int nthreads) {
    if (ytype != dtype && (ytype != F32 || dtype == F64)) return -1;
    nthreads = forward_threads(N * C * L, cl, nthreads);
    int64_t largest = 0;
    for (int64_t g = 0; g < G; g++)
        if (offsets[g + 1] - offsets[g] > largest) largest = offsets[g + 1] - offsets[g];
    /* The parameters in float64, the moments' scratch where the caller wants none, rstd and
       the means' low parts (computed here: given means have none) per (n, g). */
    double *work = malloc((size_t)(2 * C + 4 * N * G) * sizeof(double));
    double *wd = work, *bd = wd + C, *rstd = bd + C + 2 * N * G;
    if (!lo && !given) lo = rstd + N * G;
    for (int64_t c = 0; c < C; c++) {
        wd[c] = param(w, wtype, c, 1.0);
        bd[c] = param(b, btype, c, 0.0);
    }
    if (!mean) {
        mean = bd + C;
        var = mean + N * G;
    }
    int status = 0;
#define FUSED_CASE(CODE, S, T)                                                              \
    case CODE:                                                                              \
        if (ytype == dtype)                                                                 \
            fused_##S##_##S((const T *)x, (T *)y, N, C, L, offsets, G, mean, var, lo, eps, wd, \
                            bd, scale, shift, relu, nthreads);                              \
        else                                                                                \
            fused_##S##_f32((const T *)x, (float *)y, N, C, L, offsets, G, mean, var, lo, eps, \
                            wd, bd, scale, shift, relu, nthreads);                          \
        break;
    if (!cl && !given && largest * L <= fused_max(dtype)) {
        switch (dtype) {
        case F32:
            fused_f32_f32((const float *)x, (float *)y, N, C, L, offsets, G, mean, var, lo, eps,
                          wd, bd, scale, shift, relu, nthreads);
            break;
        case F64:
            fused_f64_f64((const double *)x, (double *)y, N, C, L, offsets, G, mean, var, lo,
                          eps, wd, bd, scale, shift, relu, nthreads);
            break;
        FUSED_CASE(BF16, bf16, uint16_t)
#if HAVE_F16
        FUSED_CASE(F16, f16, f16_t)
#endif
        default: status = -1;
        }
        free(work);
        return status;
    }
    coef_in_t q = {N, C, G, offsets, group_of, mean, rstd, wd, bd, scale, shift, lo};
#define FUSED_CL_CASE(CODE, S, T)                                                           \
    case CODE:                                                                              \
        if (ytype == dtype)                                                                 \
            fused_cl_##S##_##S((const T *)x, (T *)y, L, offsets, &q, mean, var, rstd, eps, relu, \
                               nthreads);                                                   \
        else                                                                                \
            fused_cl_##S##_f32((const T *)x, (float *)y, L, offsets, &q, mean, var, rstd, eps, \
                               relu, nthreads);                                             \
        break;
    if (cl && !given && C * L * elem_size(dtype) <= fused_cl_bytes &&
        N * cl_chunks(C, L, offsets, G, NULL) >= nthreads) {
        switch (dtype) {
        case F32:
            fused_cl_f32_f32((const float *)x, (float *)y, L, offsets, &q, mean, var, rstd, eps,
                             relu, nthreads);
            break;
        case F64:
            fused_cl_f64_f64((const double *)x, (double *)y, L, offsets, &q, mean, var, rstd, eps,
                             relu, nthreads);
            break;
        FUSED_CL_CASE(BF16, bf16, uint16_t)
#if HAVE_F16
        FUSED_CL_CASE(F16, f16, f16_t)
#endif
        default: status = -1;
        }
        free(work);
        return status;
    }
    if (!given && gn_stats(x, dtype, N, C, L, cl, offsets, G, mean, var, lo, nthreads)) {
        free(work);
        return -1;
    }
    for (int64_t i = 0; i < N * G; i++) rstd[i] = 1.0 / sqrt(var[i] + eps);
#define APPLY_CASE(CODE, S, T)                                                              \
    case CODE:                                                                              \
        if (ytype == dtype) apply_##S##_##S((const T *)x, (T *)y, L, cl, &q, relu, nthreads); \
        else apply_##S##_f32((const T *)x, (float *)y, L, cl, &q, relu, nthreads);          \
        break;
    switch (dtype) {
    case F32: apply_f32_f32((const float *)x, (float *)y, L, cl, &q, relu, nthreads); break;
    case F64: apply_f64_f64((const double *)x, (double *)y, L, cl, &q, relu, nthreads); break;
    APPLY_CASE(BF16, bf16, uint16_t)
#if HAVE_F16
    APPLY_CASE(F16, f16, f16_t)
#endif
    default: status = -1;
    }
    free(work);
    return status;
}

/* Python: forward(x, dtype, y, ytype, N, C, L, cl, offsets, G, group_of, mean, var, lo, given,
   eps, w, wtype, b, btype, scale, shift, relu, nthreads) and stats(x, dtype, N, C, L, cl,
   offsets, G, mean, var, lo, nthreads) and backward(x, dy, dx, dtype, N, C, L, cl, offsets, G,
   group_of, mean, var, lo, eps, w, wtype, dw, db, stype, sa, sb, given, nthreads, per_sample),
   pointers as ints (0: none; forward's mean, var and lo may be 0 when not given; lo 0 given
   or to backward: zeros), return 0 or -1 as above; dtypes() the bit
   mask of dtype codes served; stream_min(bytes) and fused_cl_bytes(bytes) set those limits and
   return the value before.
   The GIL is released while the kernels run. */
/* A call's n arguments: ints into a[], except args[real] (real < 0: none), a float into *x.
   0, or -1 with a Python exception set. */
static int parse(PyObject *const *args, Py_ssize_t nargs, const char *name, Py_ssize_t n,
                 Py_ssize_t real, long long *a, double *x) {
    if (nargs != n) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i == real) *x = PyFloat_AsDouble(args[i]);
        else a[i] = PyLong_AsLongLong(args[i]);
        if (PyErr_Occurred()) return -1;
    }
    return 0;
}

#define PTR(v) ((void *)(intptr_t)(v))

static PyObject *py_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long a[24];
    double eps = 0.0; /* parse sets it; gcc cannot see that */
    if (parse(args, nargs, "forward", 24, 15, a, &eps)) return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = gn_forward(PTR(a[0]), (int)a[1], PTR(a[2]), (int)a[3], a[4], a[5], a[6], (int)a[7],
                        PTR(a[8]), a[9], PTR(a[10]), PTR(a[11]), PTR(a[12]), PTR(a[13]),
                        (int)a[14], eps, PTR(a[16]), (int)a[17], PTR(a[18]), (int)a[19],
                        PTR(a[20]), PTR(a[21]), (int)a[22], (int)a[23]);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(status);
}

static PyObject *py_stats(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long a[12];
    if (parse(args, nargs, "stats", 12, -1, a, NULL)) return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = gn_stats(PTR(a[0]), (int)a[1], a[2], a[3], a[4], (int)a[5], PTR(a[6]), a[7],
                      PTR(a[8]), PTR(a[9]), PTR(a[10]), (int)a[11]);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(status);
}

static PyObject *py_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long a[27];
    double eps = 0.0; /* parse sets it; gcc cannot see that */
    if (parse(args, nargs, "backward", 27, 14, a, &eps)) return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = gn_backward(PTR(a[0]), PTR(a[1]), PTR(a[2]), (int)a[3], a[4], a[5], a[6], (int)a[7],
                         PTR(a[8]), a[9], PTR(a[10]), PTR(a[11]), PTR(a[12]), PTR(a[13]), eps,
                         PTR(a[15]), (int)a[16], PTR(a[17]), PTR(a[18]), (int)a[19], PTR(a[20]),
                         PTR(a[21]), (int)a[22], (int)a[23], (int)a[24], (int)a[25],
                         PTR(a[26]));
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(status);
}

/* Python: activation(dy, u, out, act, n, nthreads) -> 0, or -1 for an activation not
   served; dy 0 for the activation itself. */
static PyObject *py_activation(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long a[6];
    if (parse(args, nargs, "activation", 6, -1, a, NULL)) return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = gn_activation(PTR(a[0]), PTR(a[1]), PTR(a[2]), (int)a[3], a[4], (int)a[5]);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(status);
}

/* Python: trusted(mean, rstd, dtype, n, limit) -> 1 or 0. */
static PyObject *py_trusted(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long a[5];
    double limit;
    if (parse(args, nargs, "trusted", 5, 4, a, &limit)) return NULL;
    return PyLong_FromLong(gn_trusted(PTR(a[0]), PTR(a[1]), (int)a[2], a[3], limit));
}

/* Python: to_channels_last(src, dst, N, C, L, esize, nthreads). */
static PyObject *py_to_channels_last(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long a[7];
    if (parse(args, nargs, "to_channels_last", 7, -1, a, NULL)) return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = gn_to_channels_last(PTR(a[0]), PTR(a[1]), a[2], a[3], a[4], (int)a[5], (int)a[6]);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(status);
}

static PyObject *py_dtypes(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(gn_dtypes());
}

/* *slot = arg (an int); the value before, as a Python int. */
static PyObject *swap_bytes(int64_t *slot, PyObject *arg) {
    long long bytes = PyLong_AsLongLong(arg);
    if (bytes == -1 && PyErr_Occurred()) return NULL;
    int64_t before = *slot;
    *slot = bytes;
    return PyLong_FromLongLong(before);
}
static PyObject *py_stream_min(PyObject *self, PyObject *arg) {
    (void)self;
    return swap_bytes(&stream_min, arg);
}
static PyObject *py_fused_cl_bytes(PyObject *self, PyObject *arg) {
    (void)self;
    return swap_bytes(&fused_cl_bytes, arg);
}

static PyMethodDef methods[] = {
    {"forward", (PyCFunction)(void (*)(void))py_forward, METH_FASTCALL, "group norm forward"},
    {"stats", (PyCFunction)(void (*)(void))py_stats, METH_FASTCALL, "group statistics"},
    {"backward", (PyCFunction)(void (*)(void))py_backward, METH_FASTCALL, "group norm backward"},
    {"activation", (PyCFunction)(void (*)(void))py_activation, METH_FASTCALL,
     "an activation, or dy times its derivative, in float64"},
    {"trusted", (PyCFunction)(void (*)(void))py_trusted, METH_FASTCALL,
     "whether every |mean * rstd| <= limit"},
    {"to_channels_last", (PyCFunction)(void (*)(void))py_to_channels_last, METH_FASTCALL,
     "(N, C, L) to (N, L, C)"},
    {"dtypes", py_dtypes, METH_NOARGS, "bit mask of the dtype codes served"},
    {"stream_min", py_stream_min, METH_O,
     "set the smallest y in bytes stored non-temporally; returns the one before"},
    {"fused_cl_bytes", py_fused_cl_bytes, METH_O,
     "set the largest channels-last sample in bytes done whole by one thread; returns the one "
     "before"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "groupnorm_cpu_kernel", NULL, -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit_groupnorm_cpu_kernel(void) { return PyModule_Create(&module); }
