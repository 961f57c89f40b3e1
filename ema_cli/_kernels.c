/*
 * Hot loops of the replay, in C: float16 <-> float32 conversion, the fused EMA update, the
 * profiles' float64 sums and the CRC-32C of TensorBundle inputs.
 *
 * This module is optional: when it is not built, or the CPU lacks the instructions used here
 * (x86-64 AVX2 and F16C), ema_cli.kernels falls back to numpy, with the same results.
 *
 * Conversion. numpy converts float16 one element at a time with integer bit manipulation (about
 * 3 ns per element each way on a 2020s x86 core), which made float16 replays about 3x slower per
 * byte than float32 ones. F16C converts 8 elements per instruction. Results are bit for bit those
 * of numpy's cast: round to nearest even, overflow to infinity, float16 subnormals produced and
 * read exactly, whatever the thread's MXCSR flush bits (F16C ignores DAZ for float16 sources
 * and FTZ for float16 results; a float32 subnormal rounds to a signed zero either way). The one
 * difference of the hardware is NaN: it sets the quiet bit of a signalling NaN, which numpy
 * keeps clear. A group of 8 that holds a NaN is therefore redone by the scalar code below, which
 * follows numpy. bfloat16 <-> float32 is bit shifting and integer rounding, 8 at a time here,
 * where ml_dtypes' cast goes one element at a time (0.4 ns each, a tenth of a bfloat16 replay's
 * CPU: it widens every block's first checkpoint and rounds every average).
 *
 * EMA update. TF's assign_sub, s = s - (s - x) * c, is three numpy passes over a block; here it
 * is one, with the same three operations in the same order and operand order, each rounded (no
 * fused multiply-add: the build passes -ffp-contract=off and the vector code names each
 * instruction), under the calling thread's MXCSR, so flush-to-zero behaves as in numpy.
 * - ema_update: a float32 shadow; x may be float32, float16 or bfloat16, widened exactly inside
 *   the loop, which gives what widening first would.
 * - ema_update_native: a float16 or bfloat16 shadow and x (--precision native), every operation
 *   rounded back to that dtype as numpy's float16 and ml_dtypes' bfloat16 arithmetic does, one
 *   element at a time in software.
 *
 * Sums. The linear profiles (ema_cli.profiles) accumulate float16/bfloat16/float32 blocks in a
 * float64 array: sum_update does numpy's two or three passes (widen, multiply, add) in one, with
 * the same operations in the same order, each rounded.
 *
 * CRC-32C. TensorBundle stores a CRC-32C of every tensor and ema-cli checks every byte it reads
 * (ema_cli.formats.tensorbundle_crc). On x86-64 with SSE4.2 the crc32 instruction does 8 bytes
 * at a time; its latency is 3 cycles and its throughput 1 per cycle, so a large buffer is cut
 * into chunks of 3 equal streams, computed interleaved and joined with a precomputed shift
 * operator (below). Where AVX-512 VPCLMULQDQ is there, buffers of 1 KiB and more are folded
 * 256 bytes at a time by carry-less multiplication instead, about 2x faster again. Where
 * VPCLMULQDQ comes with AVX2 only (Zen 3), the same folds on ymm registers are no faster than
 * crc32 alone, so from 1792 bytes each pass folds 256 bytes while crc32 runs over three streams
 * of the rest, the vector and the integer units at work together (about 1.5x crc32's speed).
 * Elsewhere a portable table-driven loop (slicing-by-8) gives the same values. crc32c_combine
 * joins two pieces' CRCs (the TensorBundle reader checks a tensor block by block).
 *
 * The update functions take objects with the buffer protocol, C-contiguous, of equal element
 * counts, and release the GIL while they run; crc32c takes any C-contiguous buffer and releases
 * the GIL for buffers of CRC_NOGIL_BYTES or more.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define KERNELS_X86 1
#include <immintrin.h>
#else
#define KERNELS_X86 0
#endif

/* --- scalar reference: numpy's conversions ----------------------------------------------- */

static uint32_t half_to_float_bits(uint16_t h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t exponent = h & 0x7c00u;
    uint32_t significand = h & 0x03ffu;
    if (exponent == 0x7c00u) { /* inf or NaN: the payload moves up, quiet bit untouched */
        return sign | 0x7f800000u | (significand << 13);
    }
    if (exponent == 0) {
        if (significand == 0) {
            return sign;
        }
        /* subnormal: normalise */
        uint32_t shift = 0;
        while ((significand & 0x0400u) == 0) {
            significand <<= 1;
            shift++;
        }
        return sign | ((113u - shift) << 23) | ((significand & 0x03ffu) << 13);
    }
    return sign | ((((uint32_t)h & 0x7fffu) + 0x1c000u) << 13);
}

static uint16_t float_to_half_bits(uint32_t f)
{
    uint16_t sign = (uint16_t)((f >> 16) & 0x8000u);
    uint32_t magnitude = f & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) { /* inf or NaN */
        if (magnitude == 0x7f800000u) {
            return sign | 0x7c00u;
        }
        uint16_t nan = (uint16_t)(0x7c00u | ((magnitude & 0x007fffffu) >> 13));
        return sign | (nan == 0x7c00u ? 0x7c01u : nan); /* keep it a NaN */
    }
    if (magnitude >= 0x477ff000u) { /* rounds to 65536 or more */
        return sign | 0x7c00u;
    }
    if (magnitude < 0x38800000u) { /* below 2**-14: a float16 subnormal, or zero */
        if (magnitude < 0x33000000u) { /* at most 2**-25: rounds to zero */
            return sign;
        }
        uint32_t exponent = magnitude >> 23;
        uint32_t significand = (magnitude & 0x007fffffu) | 0x00800000u;
        uint32_t shift = 126u - exponent; /* 14..24: aligns to units of 2**-24 */
        uint32_t half = significand >> shift;
        uint32_t rest = significand & ((1u << shift) - 1u);
        uint32_t tie = 1u << (shift - 1u);
        if (rest > tie || (rest == tie && (half & 1u))) {
            half++;
        }
        return sign | (uint16_t)half;
    }
    uint32_t half = (magnitude - 0x38000000u) >> 13; /* rebias, drop 13 bits */
    uint32_t rest = magnitude & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) {
        half++; /* may carry into the exponent, up to infinity: still right */
    }
    return sign | (uint16_t)half;
}

static void half_to_float_scalar(const uint16_t *src, uint32_t *dst, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        dst[i] = half_to_float_bits(src[i]);
    }
}

static void float_to_half_scalar(const uint32_t *src, uint16_t *dst, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        dst[i] = float_to_half_bits(src[i]);
    }
}

/* --- EMA update ---------------------------------------------------------------------------- */

enum source_kind { SOURCE_FLOAT32 = 0, SOURCE_FLOAT16 = 1, SOURCE_BFLOAT16 = 2 };

static float widen16(uint16_t h, int kind)
{
    uint32_t bits = kind == SOURCE_FLOAT16 ? half_to_float_bits(h) : (uint32_t)h << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static float widen(const void *x, Py_ssize_t i, int kind)
{
    if (kind == SOURCE_FLOAT32) {
        return ((const float *)x)[i];
    }
    return widen16(((const uint16_t *)x)[i], kind);
}

static void ema_scalar(float *s, const void *x, int kind, float c, Py_ssize_t start, Py_ssize_t n)
{
    for (Py_ssize_t i = start; i < n; i++) {
        float t = s[i] - widen(x, i, kind);
        t = t * c;
        s[i] = s[i] - t;
    }
}

/* Native precision (TF's arithmetic in float16 or bfloat16): numpy's float16 ufuncs and
 * ml_dtypes' bfloat16 ufuncs widen both operands to float32, compute there (under the thread's
 * MXCSR) and round the result back, one element at a time. The same, per operation: */

static uint16_t narrow(float value, int kind)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if (kind == SOURCE_FLOAT16) {
        return float_to_half_bits(bits);
    }
    /* bfloat16 as ml_dtypes (Eigen) rounds: a NaN becomes the quiet NaN of its sign; anything
     * else rounds to nearest even by adding 0x7fff plus the last kept bit. */
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (bits & 0x80000000u) ? 0xffc0u : 0x7fc0u;
    }
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static void ema_native_scalar(uint16_t *s, const uint16_t *x, int kind, float c,
                              Py_ssize_t start, Py_ssize_t n)
{
    for (Py_ssize_t i = start; i < n; i++) {
        float s_wide = widen16(s[i], kind);
        uint16_t t = narrow(s_wide - widen16(x[i], kind), kind);
        t = narrow(widen16(t, kind) * c, kind);
        s[i] = narrow(s_wide - widen16(t, kind), kind);
    }
}

/* bfloat16 <-> float32, as ml_dtypes casts: widening puts the 16 bits on top (a NaN keeps its
 * payload, a signalling one included), narrowing is narrow()'s rounding. Integer operations
 * only, so the thread's flush-to-zero mode does not touch subnormals, as it does not ml_dtypes'
 * cast. */
static void bfloat16_to_float_scalar(const uint16_t *src, uint32_t *dst, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        dst[i] = (uint32_t)src[i] << 16;
    }
}

static void float_to_bfloat16_scalar(const uint32_t *src, uint16_t *dst, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        float value;
        memcpy(&value, &src[i], sizeof value);
        dst[i] = narrow(value, SOURCE_BFLOAT16);
    }
}

/* Float64 accumulation of the linear profiles (ema_cli.profiles.Accumulator, one lane): the
 * same operations in the same order as its numpy code, each rounded, x widened exactly.
 *   SUM_ADD:        a = a + x
 *   SUM_MUL_ADD:    a = a + x * w
 *   SUM_RECURRENCE: a = x + (a - x) * w */
enum sum_mode { SUM_ADD = 0, SUM_MUL_ADD = 1, SUM_RECURRENCE = 2 };

/* The NaN x86's vector instructions (and so numpy's loops) give for p op q = r: p's if p is a
 * NaN, else q's, quieted. A C compiler may swap the operands of a commutative scalar operation,
 * so the scalar code below says which NaN it means. */
static inline double nan_of(double p, double q, double r)
{
    if (r == r) {
        return r;
    }
    double nan = p != p ? p : q != q ? q : r;
    uint64_t bits;
    memcpy(&bits, &nan, sizeof bits);
    bits |= 0x0008000000000000ull; /* quiet */
    memcpy(&nan, &bits, sizeof nan);
    return nan;
}

static void sum_scalar(double *a, const void *x, int kind, double w, int mode, Py_ssize_t start,
                       Py_ssize_t n)
{
    for (Py_ssize_t i = start; i < n; i++) {
        double xd = (double)widen(x, i, kind);
        double s = a[i];
        if (mode == SUM_ADD) {
            a[i] = nan_of(s, xd, s + xd);
        } else if (mode == SUM_MUL_ADD) {
            double t = nan_of(xd, w, xd * w);
            a[i] = nan_of(s, t, s + t);
        } else {
            double t = nan_of(s, xd, s - xd);
            t = nan_of(t, w, t * w);
            a[i] = nan_of(xd, t, xd + t);
        }
    }
}

/* A linear profile's result: float64 a / d rounded once to float32 (to nearest, ties to even, as
 * numpy's divide and cast). Division does not commute: the NaN is a's (or d's), as numpy's. */
static void finish_scalar(const double *a, float *out, double d, Py_ssize_t start, Py_ssize_t n)
{
    for (Py_ssize_t i = start; i < n; i++) {
        out[i] = (float)(a[i] / d);
    }
}

/* --- x86: F16C and AVX2 ---------------------------------------------------------------- */

#if KERNELS_X86
__attribute__((target("avx,f16c"))) static void
half_to_float_f16c(const uint16_t *src, uint32_t *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        __m256 f = _mm256_cvtph_ps(h);
        _mm256_storeu_ps((float *)(dst + i), f);
        if (_mm256_movemask_ps(_mm256_cmp_ps(f, f, _CMP_UNORD_Q))) {
            half_to_float_scalar(src + i, dst + i, 8);
        }
    }
    half_to_float_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx,f16c"))) static void
float_to_half_f16c(const uint32_t *src, uint16_t *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 f = _mm256_loadu_ps((const float *)(src + i));
        __m128i h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(dst + i), h);
        if (_mm256_movemask_ps(_mm256_cmp_ps(f, f, _CMP_UNORD_Q))) {
            float_to_half_scalar(src + i, dst + i, 8);
        }
    }
    float_to_half_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) static inline __m256 widen_bf16(__m128i h)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Elements i..i+7 of a float32, float16 or bfloat16 source, widened exactly to float32 (F16C
 * quiets a float16 signalling NaN: the arithmetic that follows would too). */
__attribute__((target("avx2,f16c"))) static inline __m256
load8(const void *x, Py_ssize_t i, int kind)
{
    if (kind == SOURCE_FLOAT32) {
        return _mm256_loadu_ps((const float *)x + i);
    }
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    return kind == SOURCE_FLOAT16 ? _mm256_cvtph_ps(h) : widen_bf16(h);
}

__attribute__((target("avx2,f16c"))) static void
ema_avx2(float *s, const void *x, int kind, float c, Py_ssize_t n)
{
    const __m256 vc = _mm256_set1_ps(c);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 vx = load8(x, i, kind);
        __m256 vs = _mm256_loadu_ps(s + i);
        __m256 t = _mm256_sub_ps(vs, vx);
        t = _mm256_mul_ps(t, vc);
        _mm256_storeu_ps(s + i, _mm256_sub_ps(vs, t));
    }
    ema_scalar(s, x, kind, c, i, n);
}

/* Round float32 lanes to bfloat16 as narrow() does, keeping them as float32 (low bits zero). */
__attribute__((target("avx2,f16c"))) static inline __m256 round_bf16(__m256 v)
{
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u));
    const __m256i nan = _mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi32((int)0x80000000u)),
                                        _mm256_set1_epi32(0x7fc00000));
    const __m256 is_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(nan), is_nan);
}

__attribute__((target("avx2,f16c"))) static inline __m128i pack_bf16(__m256 rounded)
{
    __m256i high = _mm256_srli_epi32(_mm256_castps_si256(rounded), 16);
    __m256i packed = _mm256_packus_epi32(high, high); /* per 128-bit lane: a0-3 a0-3 | a4-7 a4-7 */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

__attribute__((target("avx2,f16c"))) static inline __m256 round_f16(__m256 v)
{
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

__attribute__((target("avx2"))) static void
bfloat16_to_float_avx2(const uint16_t *src, uint32_t *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    bfloat16_to_float_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) static void
float_to_bfloat16_avx2(const uint32_t *src, uint16_t *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 f = _mm256_loadu_ps((const float *)(src + i));
        _mm_storeu_si128((__m128i *)(dst + i), pack_bf16(round_bf16(f)));
    }
    float_to_bfloat16_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) static void
ema_native_avx2(uint16_t *s, const uint16_t *x, int kind, float c, Py_ssize_t n)
{
    const __m256 vc = _mm256_set1_ps(c);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i s_half = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i x_half = _mm_loadu_si128((const __m128i *)(x + i));
        __m128i out;
        if (kind == SOURCE_FLOAT16) {
            __m256 vs = _mm256_cvtph_ps(s_half);
            __m256 t = round_f16(_mm256_sub_ps(vs, _mm256_cvtph_ps(x_half)));
            t = round_f16(_mm256_mul_ps(t, vc));
            out = _mm256_cvtps_ph(_mm256_sub_ps(vs, t), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        } else {
            __m256 vs = widen_bf16(s_half);
            __m256 t = round_bf16(_mm256_sub_ps(vs, widen_bf16(x_half)));
            t = round_bf16(_mm256_mul_ps(t, vc));
            out = pack_bf16(round_bf16(_mm256_sub_ps(vs, t)));
        }
        _mm_storeu_si128((__m128i *)(s + i), out);
    }
    ema_native_scalar(s, x, kind, c, i, n);
}

__attribute__((target("avx2,f16c"))) static void
sum_avx2(double *a, const void *x, int kind, double w, int mode, Py_ssize_t n)
{
    const __m256d vw = _mm256_set1_pd(w);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        /* load8(x, i, kind), spelled out: through the helper gcc 12 makes this loop 12% slower
         * for float32 sources (48.5 -> 54.5 us per MiB, measured 2026-12-02). */
        __m256 vx;
        if (kind == SOURCE_FLOAT32) {
            vx = _mm256_loadu_ps((const float *)x + i);
        } else {
            __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
            vx = kind == SOURCE_FLOAT16 ? _mm256_cvtph_ps(h) : widen_bf16(h);
        }
        __m256d halves[2] = {_mm256_cvtps_pd(_mm256_castps256_ps128(vx)),
                             _mm256_cvtps_pd(_mm256_extractf128_ps(vx, 1))};
        __m256d out[2];
        int nan = 0;
        for (int k = 0; k < 2; k++) {
            __m256d va = _mm256_loadu_pd(a + i + 4 * k);
            __m256d xd = halves[k];
            if (mode == SUM_ADD) {
                va = _mm256_add_pd(va, xd);
            } else if (mode == SUM_MUL_ADD) {
                va = _mm256_add_pd(va, _mm256_mul_pd(xd, vw));
            } else {
                va = _mm256_add_pd(xd, _mm256_mul_pd(_mm256_sub_pd(va, xd), vw));
            }
            out[k] = va;
            nan |= _mm256_movemask_pd(_mm256_cmp_pd(va, va, _CMP_UNORD_Q));
        }
        if (nan) { /* which NaN: the compiler may have swapped commutative operands */
            sum_scalar(a, x, kind, w, mode, i, i + 8);
            continue;
        }
        _mm256_storeu_pd(a + i, out[0]);
        _mm256_storeu_pd(a + i + 4, out[1]);
    }
    sum_scalar(a, x, kind, w, mode, i, n);
}

__attribute__((target("avx2,f16c"))) static void
finish_avx2(const double *a, float *out, double d, Py_ssize_t n)
{
    const __m256d vd = _mm256_set1_pd(d);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128 low = _mm256_cvtpd_ps(_mm256_div_pd(_mm256_loadu_pd(a + i), vd));
        __m128 high = _mm256_cvtpd_ps(_mm256_div_pd(_mm256_loadu_pd(a + i + 4), vd));
        _mm256_storeu_ps(out + i, _mm256_set_m128(high, low));
    }
    finish_scalar(a, out, d, i, n);
}

static int have_simd(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#else
static int have_simd(void) { return 0; }
#endif

/* Whether the AVX2/F16C loops run; off by set_hardware(False) (tests of the portable loops). */
static int use_simd = 0;

/* --- CRC-32C -------------------------------------------------------------------------------
 *
 * The CRC-32C (Castagnoli) of a message: reflected polynomial 0x82F63B78, register preset to
 * 0xFFFFFFFF and the result xored with 0xFFFFFFFF. The loops below work on the register itself
 * (between the two xors). In the reflected register bit i is the coefficient of x^(31 - i), so
 * a right shift multiplies by x, and feeding one byte is reg = (reg ^ byte) * x^8 mod P.
 *
 * That map is linear over GF(2), so the register after a message M from a start value r is
 *     reg(r, M) = reg(0, M) ^ r * x^(8 |M|)   (mod P).
 * Three streams A, B, C of L bytes each, computed independently from r, 0 and 0, join as
 *     reg(r, ABC) = ((reg(r, A) * x^(8L)) ^ reg(0, B)) * x^(8L) ^ reg(0, C),
 * and multiplying a 32-bit value by the constant x^(8L) is a 32x32 bit matrix: four tables of
 * 256 entries, one per byte of the value, computed at import for the two stream lengths used. */

#define CRC32C_POLY 0x82f63b78u
/* Stream lengths (multiples of 8): long streams for the bulk of a buffer, short ones for what
 * is left, then one stream. 3 x 8 KiB keeps the join (two table lookups per 24 KiB) under 1% of
 * the time; 3 x 256 bytes still pays for its join against a lone stream's 3-cycle latency. */
#define CRC_LONG 8192
#define CRC_SHORT 256
/* Buffers from this size release the GIL (about half a microsecond of work at 20 GB/s). */
#define CRC_NOGIL_BYTES 8192

/* crc_table[k][b]: the register after byte b followed by k zero bytes, from 0 (slicing-by-8). */
static uint32_t crc_table[8][256];
/* Multiplication by x^(8 L) mod P for L = CRC_LONG and CRC_SHORT, by the bytes of the value. */
static uint32_t crc_shift_long[4][256];
static uint32_t crc_shift_short[4][256];
/* VPCLMULQDQ's constants for moving a 16-byte lane 2048 bits on (below). */
static uint64_t crc_fold_2048[2];

/* a * b mod P, both reflected (bit 31 is x^0). */
static uint32_t gf2_multiply(uint32_t a, uint32_t b)
{
    uint32_t product = 0;
    for (uint32_t bit = 0x80000000u; bit; bit >>= 1) {
        if (a & bit) {
            product ^= b;
        }
        b = (b & 1u) ? (b >> 1) ^ CRC32C_POLY : b >> 1; /* b * x */
    }
    return product;
}

/* x^(2^k) mod P for k = 0..63, filled by crc_init_tables (0 until then). */
static uint32_t crc_x2n[64];

/* x^nbits mod P: the product of x^(2^k) over the bits k set in nbits. */
static uint32_t x_to_bits(uint64_t nbits)
{
    uint32_t power = 0x80000000u; /* x^0 */
    for (int k = 0; nbits; k++, nbits >>= 1) {
        if (nbits & 1u) {
            power = gf2_multiply(power, crc_x2n[k]);
        }
    }
    return power;
}

static void make_shift_table(uint32_t table[4][256], uint64_t nbytes)
{
    uint32_t power = x_to_bits(8 * nbytes);
    for (int k = 0; k < 4; k++) {
        for (uint32_t b = 0; b < 256; b++) {
            table[k][b] = gf2_multiply(b << (8 * k), power);
        }
    }
}

static void crc_init_tables(void)
{
    crc_x2n[0] = 0x40000000u; /* x^1 */
    for (int k = 1; k < 64; k++) {
        crc_x2n[k] = gf2_multiply(crc_x2n[k - 1], crc_x2n[k - 1]);
    }
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t crc = b;
        for (int i = 0; i < 8; i++) {
            crc = (crc & 1u) ? (crc >> 1) ^ CRC32C_POLY : crc >> 1;
        }
        crc_table[0][b] = crc;
    }
    for (int k = 1; k < 8; k++) {
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t prev = crc_table[k - 1][b];
            crc_table[k][b] = (prev >> 8) ^ crc_table[0][prev & 0xffu];
        }
    }
    make_shift_table(crc_shift_long, CRC_LONG);
    make_shift_table(crc_shift_short, CRC_SHORT);
    crc_fold_2048[0] = (uint64_t)x_to_bits(2048 + 63) << 32;
    crc_fold_2048[1] = (uint64_t)x_to_bits(2048 - 1) << 32;
}

static inline uint32_t crc_shift(const uint32_t table[4][256], uint32_t value)
{
    return table[0][value & 0xffu] ^ table[1][(value >> 8) & 0xffu] ^
           table[2][(value >> 16) & 0xffu] ^ table[3][value >> 24];
}

static inline uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The register after p[0..n) from reg, portably: 8 bytes per step through 8 tables. */
static uint32_t crc32c_portable(uint32_t reg, const uint8_t *p, size_t n)
{
    for (; n >= 8; p += 8, n -= 8) {
        uint32_t lo = reg ^ load_le32(p);
        uint32_t hi = load_le32(p + 4);
        reg = crc_table[7][lo & 0xffu] ^ crc_table[6][(lo >> 8) & 0xffu] ^
              crc_table[5][(lo >> 16) & 0xffu] ^ crc_table[4][lo >> 24] ^
              crc_table[3][hi & 0xffu] ^ crc_table[2][(hi >> 8) & 0xffu] ^
              crc_table[1][(hi >> 16) & 0xffu] ^ crc_table[0][hi >> 24];
    }
    for (; n; p++, n--) {
        reg = (reg >> 8) ^ crc_table[0][(reg ^ *p) & 0xffu];
    }
    return reg;
}

#if KERNELS_X86
static inline uint64_t load64(const uint8_t *p)
{
    uint64_t word;
    memcpy(&word, p, sizeof word); /* x86: little-endian, unaligned loads allowed */
    return word;
}

/* The register after 3 * len bytes at p from reg: three interleaved streams, joined. */
__attribute__((target("sse4.2"))) static inline uint32_t
crc_three_streams(uint32_t reg, const uint8_t *p, size_t len, const uint32_t shift[4][256])
{
    const uint8_t *q = p + len, *r = p + 2 * len;
    uint64_t a = reg, b = 0, c = 0;
    for (size_t i = 0; i < len; i += 8) {
        a = _mm_crc32_u64(a, load64(p + i));
        b = _mm_crc32_u64(b, load64(q + i));
        c = _mm_crc32_u64(c, load64(r + i));
    }
    return crc_shift(shift, crc_shift(shift, (uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
}

__attribute__((target("sse4.2"))) static uint32_t
crc32c_sse42(uint32_t reg, const uint8_t *p, size_t n)
{
    for (; n && ((uintptr_t)p & 7u); p++, n--) { /* 8-byte loads from here on are aligned */
        reg = _mm_crc32_u8(reg, *p);
    }
    for (; n >= 3 * CRC_LONG; p += 3 * CRC_LONG, n -= 3 * CRC_LONG) {
        reg = crc_three_streams(reg, p, CRC_LONG, crc_shift_long);
    }
    for (; n >= 3 * CRC_SHORT; p += 3 * CRC_SHORT, n -= 3 * CRC_SHORT) {
        reg = crc_three_streams(reg, p, CRC_SHORT, crc_shift_short);
    }
    uint64_t wide = reg;
    for (; n >= 8; p += 8, n -= 8) {
        wide = _mm_crc32_u64(wide, load64(p));
    }
    reg = (uint32_t)wide;
    for (; n; p++, n--) {
        reg = _mm_crc32_u8(reg, *p);
    }
    return reg;
}

/* The same by carry-less multiplication (AVX-512 VPCLMULQDQ), for 1 KiB and more: 64 bytes
 * per two multiplications, against 8 bytes per crc32.
 *
 * Read 16 bytes as a polynomial of degree < 128, the first message bit (bit 0 of the first
 * byte) its highest term: the low quadword L holds x^127..x^64, the high one H x^63..x^0, and
 * the lane is L x^64 + H. The carry-less product of two quadwords read so is their product
 * times x (read back the same way, it lands one place up). A lane moved d bits on and reduced,
 * lane * x^d mod P, is therefore, within a polynomial of degree < 96 congruent to it,
 *     clmul(L, x^(d + 63) mod P) ^ clmul(H, x^(d - 1) mod P),
 * each constant a reflected 32-bit value in the top half of its quadword (crc_fold_2048).
 * Four zmm accumulators hold 256 bytes; each pass moves them 2048 bits on and adds the next 256
 * bytes. What they hold stays congruent, mod P, to the message so far (with the incoming
 * register xored into its first 4 bytes), so that message's register is the register of the
 * 256 accumulator bytes as a message, which the crc32 instruction gives. */
#define CRC_VPCLMUL_MIN 1024

__attribute__((target("avx512f,vpclmulqdq"))) static inline __m512i
crc_fold_lanes(__m512i lanes, __m512i constants, const uint8_t *next)
{
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(lanes, constants, 0x00),
                                     _mm512_clmulepi64_epi128(lanes, constants, 0x11),
                                     _mm512_loadu_si512(next), 0x96); /* a ^ b ^ c */
}

__attribute__((target("sse4.2,avx512f,vpclmulqdq"))) static uint32_t
crc32c_vpclmul(uint32_t reg, const uint8_t *p, size_t n)
{
    if (n < CRC_VPCLMUL_MIN) {
        return crc32c_sse42(reg, p, n);
    }
    const __m512i k = _mm512_broadcast_i32x4(
        _mm_set_epi64x((long long)crc_fold_2048[1], (long long)crc_fold_2048[0]));
    __m512i a0 = _mm512_xor_si512(_mm512_loadu_si512(p),
                                  _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)reg)));
    __m512i a1 = _mm512_loadu_si512(p + 64);
    __m512i a2 = _mm512_loadu_si512(p + 128);
    __m512i a3 = _mm512_loadu_si512(p + 192);
    for (p += 256, n -= 256; n >= 256; p += 256, n -= 256) {
        a0 = crc_fold_lanes(a0, k, p);
        a1 = crc_fold_lanes(a1, k, p + 64);
        a2 = crc_fold_lanes(a2, k, p + 128);
        a3 = crc_fold_lanes(a3, k, p + 192);
    }
    uint8_t state[256];
    _mm512_storeu_si512(state, a0);
    _mm512_storeu_si512(state + 64, a1);
    _mm512_storeu_si512(state + 128, a2);
    _mm512_storeu_si512(state + 192, a3);
    return crc32c_sse42(crc32c_sse42(0, state, sizeof state), p, n);
}

/* The same fold with 256-bit registers (VPCLMULQDQ on ymm, with AVX2: Zen 3, Alder Lake and
 * later, where AVX-512 may be missing), for crc32c_hybrid_256 below: eight ymm accumulators hold
 * the same 256 bytes, each 16-byte lane moved 2048 bits on by the same constants. Alone, these
 * folds were no faster than crc32 x 3 on Zen 3 (24.5 against 23.6 GB/s at 1 MiB). */
__attribute__((target("avx2,vpclmulqdq"))) static inline __m256i
crc_fold_lanes_256(__m256i lanes, __m256i constants, const uint8_t *next)
{
    __m256i low = _mm256_clmulepi64_epi128(lanes, constants, 0x00);
    __m256i high = _mm256_clmulepi64_epi128(lanes, constants, 0x11);
    return _mm256_xor_si256(_mm256_xor_si256(low, high),
                            _mm256_loadu_si256((const __m256i *)next));
}

/* gf2_multiply with one carry-less multiplication: the 64-bit product of two reflected 32-bit
 * values, shifted up one place, is a*b reflected in 64 bits (bit 63 is x^0); its low half is
 * the x^63..x^32 terms, which crc32 of those 4 bytes reduces (d * x^32 mod P), and its high half
 * the x^31..x^0 terms, added as they are. About 10 cycles where the loop takes some 100. */
__attribute__((target("sse4.2,pclmul"))) static inline uint32_t
gf2_multiply_clmul(uint32_t a, uint32_t b)
{
    __m128i product =
        _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)a), _mm_cvtsi32_si128((int)b), 0x00);
    uint64_t wide = (uint64_t)_mm_cvtsi128_si64(product) << 1;
    return _mm_crc32_u32(0, (uint32_t)wide) ^ (uint32_t)(wide >> 32);
}

/* x_to_bits with gf2_multiply_clmul. */
__attribute__((target("sse4.2,pclmul"))) static uint32_t x_to_bits_clmul(uint64_t nbits)
{
    uint32_t power = 0x80000000u; /* x^0 */
    for (int k = 0; nbits; k++, nbits >>= 1) {
        if (nbits & 1u) {
            power = gf2_multiply_clmul(power, crc_x2n[k]);
        }
    }
    return power;
}

#ifndef CRC_HYBRID_STREAM
#define CRC_HYBRID_STREAM 64
#endif
/* Folds and crc32 at once, from 4 passes (1792 bytes; shorter buffers go to crc32c_sse42): each
 * pass folds 256 bytes of the buffer's first part on the
 * vector unit and runs the crc32 instruction over CRC_HYBRID_STREAM bytes of each of three
 * streams cut from the rest, which the integer unit executes alongside; the four registers are
 * then joined by shifting each over the bytes after it (x^(8 n) mod P). */
__attribute__((target("sse4.2,pclmul,avx2,vpclmulqdq"))) static uint32_t
crc32c_hybrid_256(uint32_t reg, const uint8_t *p, size_t n)
{
    const size_t stream = CRC_HYBRID_STREAM;
    size_t passes = n / (256 + 3 * stream);
    if (passes < 4) {
        return crc32c_sse42(reg, p, n);
    }
    const size_t length = passes * stream;
    const uint8_t *s0 = p + 256 * passes, *s1 = s0 + length, *s2 = s1 + length;
    const __m256i k = _mm256_broadcastsi128_si256(
        _mm_set_epi64x((long long)crc_fold_2048[1], (long long)crc_fold_2048[0]));
    __m256i a[8];
    for (int j = 0; j < 8; j++) {
        a[j] = _mm256_loadu_si256((const __m256i *)(p + 32 * j));
    }
    a[0] = _mm256_xor_si256(a[0], _mm256_zextsi128_si256(_mm_cvtsi32_si128((int)reg)));
    uint64_t c0 = 0, c1 = 0, c2 = 0;
    for (size_t i = 0; i < passes; i++) {
        if (i) {
            const uint8_t *next = p + 256 * i;
            for (int j = 0; j < 8; j++) {
                a[j] = crc_fold_lanes_256(a[j], k, next + 32 * j);
            }
        }
        const size_t at = i * stream;
        for (size_t w = 0; w < stream; w += 8) {
            c0 = _mm_crc32_u64(c0, load64(s0 + at + w));
            c1 = _mm_crc32_u64(c1, load64(s1 + at + w));
            c2 = _mm_crc32_u64(c2, load64(s2 + at + w));
        }
    }
    uint8_t state[256];
    for (int j = 0; j < 8; j++) {
        _mm256_storeu_si256((__m256i *)(state + 32 * j), a[j]);
    }
    const uint32_t shift = x_to_bits_clmul(8 * (uint64_t)length);
    uint32_t joined = crc32c_sse42(0, state, sizeof state);
    joined = gf2_multiply_clmul(joined, shift) ^ (uint32_t)c0;
    joined = gf2_multiply_clmul(joined, shift) ^ (uint32_t)c1;
    joined = gf2_multiply_clmul(joined, shift) ^ (uint32_t)c2;
    const uint8_t *rest = s2 + length;
    return crc32c_sse42(joined, rest, n - (size_t)(rest - p));
}

static int have_crc_instruction(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
}

static int have_vpclmul_256(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("pclmul") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq");
}

static int have_vpclmul(void)
{
    return have_vpclmul_256() && __builtin_cpu_supports("avx512f");
}
#else
static int have_vpclmul(void) { return 0; }
static int have_vpclmul_256(void) { return 0; }
static int have_crc_instruction(void) { return 0; }
#endif

/* Which loop crc32c runs: 0 the portable one, 1 SSE4.2's crc32, 2 VPCLMULQDQ folding on ymm
 * (AVX2), 3 on zmm (AVX-512), each fold then crc32 for the rest; the fastest the CPU has, 0
 * after set_hardware(False). */
enum crc_level { CRC_PORTABLE = 0, CRC_SSE42 = 1, CRC_VPCLMUL_256 = 2, CRC_VPCLMUL = 3 };
static int crc_level = CRC_PORTABLE;

static int crc_level_runs(int level)
{
    switch (level) {
    case CRC_VPCLMUL:
        return have_vpclmul();
    case CRC_VPCLMUL_256:
        return have_vpclmul_256();
    case CRC_SSE42:
        return have_crc_instruction();
    default:
        return 1;
    }
}

/* The fastest loop up to limit that this CPU runs. */
static int crc_best_level(int limit)
{
    int level = limit < CRC_VPCLMUL ? limit : CRC_VPCLMUL;
    while (level > CRC_PORTABLE && !crc_level_runs(level)) {
        level--;
    }
    return level < CRC_PORTABLE ? CRC_PORTABLE : level;
}

static uint32_t crc32c_extend(uint32_t crc, const uint8_t *p, size_t n)
{
    uint32_t reg = crc ^ 0xffffffffu;
#if KERNELS_X86
    if (crc_level == CRC_VPCLMUL) {
        return crc32c_vpclmul(reg, p, n) ^ 0xffffffffu;
    }
    if (crc_level == CRC_VPCLMUL_256) {
        return crc32c_hybrid_256(reg, p, n) ^ 0xffffffffu;
    }
    if (crc_level == CRC_SSE42) {
        return crc32c_sse42(reg, p, n) ^ 0xffffffffu;
    }
#endif
    return crc32c_portable(reg, p, n) ^ 0xffffffffu;
}

/* --- Python interface ------------------------------------------------------------------- */

/* The buffers of src (read) and dst (written), C-contiguous, holding the same number of elements
 * of src_item and dst_item bytes; that number in *count. On failure: an exception set, nothing
 * held, -1. */
static int get_buffers(const char *name, PyObject *src_object, Py_ssize_t src_item,
                       PyObject *dst_object, Py_ssize_t dst_item, Py_buffer *src, Py_buffer *dst,
                       Py_ssize_t *count)
{
    if (PyObject_GetBuffer(src_object, src, PyBUF_C_CONTIGUOUS) < 0) {
        return -1;
    }
    if (PyObject_GetBuffer(dst_object, dst, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(src);
        return -1;
    }
    if (src->len % src_item || dst->len % dst_item ||
        src->len / src_item != dst->len / dst_item) {
        PyErr_Format(PyExc_ValueError, "%s: %zd source bytes do not match %zd destination bytes",
                     name, src->len, dst->len);
        PyBuffer_Release(src);
        PyBuffer_Release(dst);
        return -1;
    }
    *count = src->len / src_item;
    return 0;
}

/* half_to_float(src, dst) and float_to_half(src, dst) (kind SOURCE_FLOAT16), and
 * bfloat16_to_float / float_to_bfloat16 (SOURCE_BFLOAT16). */
static PyObject *convert(PyObject *args, int to_float, int kind)
{
    const int bf16 = kind == SOURCE_BFLOAT16;
    const char *name = to_float ? (bf16 ? "bfloat16_to_float" : "half_to_float")
                                : (bf16 ? "float_to_bfloat16" : "float_to_half");
    PyObject *src_object, *dst_object;
    Py_buffer src, dst;
    Py_ssize_t n;
    if (!PyArg_UnpackTuple(args, name, 2, 2, &src_object, &dst_object) ||
        get_buffers(name, src_object, to_float ? 2 : 4, dst_object, to_float ? 4 : 2, &src, &dst,
                    &n) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (to_float) {
        const uint16_t *from = (const uint16_t *)src.buf;
        uint32_t *to = (uint32_t *)dst.buf;
#if KERNELS_X86
        if (use_simd) {
            (bf16 ? bfloat16_to_float_avx2 : half_to_float_f16c)(from, to, n);
        } else
#endif
            (bf16 ? bfloat16_to_float_scalar : half_to_float_scalar)(from, to, n);
    } else {
        const uint32_t *from = (const uint32_t *)src.buf;
        uint16_t *to = (uint16_t *)dst.buf;
#if KERNELS_X86
        if (use_simd) {
            (bf16 ? float_to_bfloat16_avx2 : float_to_half_f16c)(from, to, n);
        } else
#endif
            (bf16 ? float_to_bfloat16_scalar : float_to_half_scalar)(from, to, n);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyObject *py_half_to_float(PyObject *self, PyObject *args)
{
    (void)self;
    return convert(args, 1, SOURCE_FLOAT16);
}

static PyObject *py_float_to_half(PyObject *self, PyObject *args)
{
    (void)self;
    return convert(args, 0, SOURCE_FLOAT16);
}

static PyObject *py_bfloat16_to_float(PyObject *self, PyObject *args)
{
    (void)self;
    return convert(args, 1, SOURCE_BFLOAT16);
}

static PyObject *py_float_to_bfloat16(PyObject *self, PyObject *args)
{
    (void)self;
    return convert(args, 0, SOURCE_BFLOAT16);
}

/* ema_update(s, x, kind, c) (float32 shadow) and ema_update_native(s, x, kind, c) (a shadow of
 * x's own 16-bit dtype). */
static PyObject *ema(PyObject *args, int native)
{
    const char *name = native ? "ema_update_native" : "ema_update";
    PyObject *s_object, *x_object;
    int kind;
    float c;
    Py_buffer s, x;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, native ? "OOif:ema_update_native" : "OOif:ema_update", &s_object,
                          &x_object, &kind, &c)) {
        return NULL;
    }
    if (kind < (native ? SOURCE_FLOAT16 : SOURCE_FLOAT32) || kind > SOURCE_BFLOAT16) {
        return PyErr_Format(PyExc_ValueError, "%s: unknown source kind %d", name, kind);
    }
    Py_ssize_t x_item = kind == SOURCE_FLOAT32 ? 4 : 2;
    if (get_buffers(name, x_object, x_item, s_object, native ? 2 : 4, &x, &s, &n) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (native) {
#if KERNELS_X86
        if (use_simd) {
            ema_native_avx2((uint16_t *)s.buf, (const uint16_t *)x.buf, kind, c, n);
        } else
#endif
            ema_native_scalar((uint16_t *)s.buf, (const uint16_t *)x.buf, kind, c, 0, n);
    } else {
#if KERNELS_X86
        if (use_simd) {
            ema_avx2((float *)s.buf, x.buf, kind, c, n);
        } else
#endif
            ema_scalar((float *)s.buf, x.buf, kind, c, 0, n);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&s);
    PyBuffer_Release(&x);
    Py_RETURN_NONE;
}

static PyObject *py_ema_update(PyObject *self, PyObject *args)
{
    (void)self;
    return ema(args, 0);
}

static PyObject *py_ema_update_native(PyObject *self, PyObject *args)
{
    (void)self;
    return ema(args, 1);
}

/* sum_update(a, x, kind, w, mode): a float64 accumulator and a float32/float16/bfloat16 x. */
static PyObject *py_sum_update(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *a_object, *x_object;
    int kind, mode;
    double w;
    Py_buffer a, x;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OOidi:sum_update", &a_object, &x_object, &kind, &w, &mode)) {
        return NULL;
    }
    if (kind < SOURCE_FLOAT32 || kind > SOURCE_BFLOAT16 || mode < SUM_ADD ||
        mode > SUM_RECURRENCE) {
        return PyErr_Format(PyExc_ValueError, "sum_update: unknown kind %d or mode %d", kind,
                            mode);
    }
    if (get_buffers("sum_update", x_object, kind == SOURCE_FLOAT32 ? 4 : 2, a_object, 8, &x, &a,
                    &n) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#if KERNELS_X86
    if (use_simd) {
        sum_avx2((double *)a.buf, x.buf, kind, w, mode, n);
    } else
#endif
        sum_scalar((double *)a.buf, x.buf, kind, w, mode, 0, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a);
    PyBuffer_Release(&x);
    Py_RETURN_NONE;
}

/* sum_finish(a, out, d): float32 out = a / d, a float64, each element rounded once. */
static PyObject *py_sum_finish(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *a_object, *out_object;
    double d;
    Py_buffer a, out;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OOd:sum_finish", &a_object, &out_object, &d)) {
        return NULL;
    }
    if (get_buffers("sum_finish", a_object, 8, out_object, 4, &a, &out, &n) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#if KERNELS_X86
    if (use_simd) {
        finish_avx2((const double *)a.buf, (float *)out.buf, d, n);
    } else
#endif
        finish_scalar((const double *)a.buf, (float *)out.buf, d, 0, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* crc32c(data, crc=0): crc (the CRC-32C of what came before) extended over data's bytes. */
static PyObject *py_crc32c(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *data_object, *crc_object = NULL;
    if (!PyArg_UnpackTuple(args, "crc32c", 1, 2, &data_object, &crc_object)) {
        return NULL;
    }
    unsigned long crc = 0;
    if (crc_object != NULL) {
        crc = PyLong_AsUnsignedLong(crc_object); /* TypeError, or OverflowError if negative */
        if (crc == (unsigned long)-1 && PyErr_Occurred()) {
            return NULL;
        }
        if (crc > 0xffffffffu) {
            return PyErr_Format(PyExc_OverflowError, "crc32c: crc %lu is not a 32-bit value",
                                crc);
        }
    }
    Py_buffer data;
    /* no PyBUF_FORMAT: numpy exports any dtype's bytes so, ml_dtypes' bfloat16 included */
    if (PyObject_GetBuffer(data_object, &data, PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    uint32_t value;
    if (data.len >= CRC_NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        value = crc32c_extend((uint32_t)crc, (const uint8_t *)data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
    } else {
        value = crc32c_extend((uint32_t)crc, (const uint8_t *)data.buf, (size_t)data.len);
    }
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(value);
}

/* crc32c_combine(crc_a, crc_b, len_b): the CRC-32C of a + b from those of a and b. */
static PyObject *py_crc32c_combine(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long crc_a, crc_b;
    unsigned long long len_b;
    if (!PyArg_ParseTuple(args, "kkK:crc32c_combine", &crc_a, &crc_b, &len_b)) {
        return NULL;
    }
    if (crc_a > 0xffffffffUL || crc_b > 0xffffffffUL || len_b >= (1ULL << 60)) {
        PyErr_SetString(PyExc_ValueError,
                        "crc32c_combine: a CRC over 32 bits or len_b of 2^60 or more");
        return NULL;
    }
    uint32_t shifted = gf2_multiply((uint32_t)crc_a, x_to_bits(8 * (uint64_t)len_b));
    return PyLong_FromUnsignedLong(shifted ^ (uint32_t)crc_b);
}

/* crc32c_level([limit]): use the fastest loop up to limit; returns the one in use. */
static PyObject *py_crc32c_level(PyObject *self, PyObject *args)
{
    (void)self;
    int limit = -1;
    if (!PyArg_ParseTuple(args, "|i:crc32c_level", &limit)) {
        return NULL;
    }
    if (limit >= 0) {
        crc_level = crc_best_level(limit);
    }
    return PyLong_FromLong(crc_level);
}

static PyObject *py_set_hardware(PyObject *self, PyObject *arg)
{
    (void)self;
    int wanted = PyObject_IsTrue(arg);
    if (wanted < 0) {
        return NULL;
    }
    use_simd = wanted && have_simd();
    crc_level = crc_best_level(wanted ? CRC_VPCLMUL : CRC_PORTABLE);
    return PyBool_FromLong(use_simd);
}

static PyMethodDef methods[] = {
    {"half_to_float", py_half_to_float, METH_VARARGS,
     "half_to_float(src, dst): float16 bits in src -> float32 bits in dst, as numpy casts."},
    {"float_to_half", py_float_to_half, METH_VARARGS,
     "float_to_half(src, dst): float32 bits in src -> float16 bits in dst, as numpy casts."},
    {"bfloat16_to_float", py_bfloat16_to_float, METH_VARARGS,
     "bfloat16_to_float(src, dst): bfloat16 bits in src -> float32 bits in dst, as ml_dtypes "
     "casts."},
    {"float_to_bfloat16", py_float_to_bfloat16, METH_VARARGS,
     "float_to_bfloat16(src, dst): float32 bits in src -> bfloat16 bits in dst, as ml_dtypes "
     "casts (to nearest even; a NaN becomes the quiet NaN of its sign)."},
    {"ema_update", py_ema_update, METH_VARARGS,
     "ema_update(s, x, kind, c): s = s - (s - x) * c in float32, in place; x is float32 "
     "(kind 0), float16 (1) or bfloat16 (2) bits."},
    {"ema_update_native", py_ema_update_native, METH_VARARGS,
     "ema_update_native(s, x, kind, c): s = s - (s - x) * c with every operation rounded to "
     "float16 (kind 1) or bfloat16 (2), as numpy and ml_dtypes compute; s and x hold its bits."},
    {"sum_update", py_sum_update, METH_VARARGS,
     "sum_update(a, x, kind, w, mode): float64 a = a + x (mode 0), a + x * w (1) or "
     "x + (a - x) * w (2), in place; x is float32 (kind 0), float16 (1) or bfloat16 (2) bits."},
    {"sum_finish", py_sum_finish, METH_VARARGS,
     "sum_finish(a, out, d): float32 out = float64 a / d, each element rounded once to nearest."},
    {"crc32c", py_crc32c, METH_VARARGS,
     "crc32c(data, crc=0) -> int: the CRC-32C crc (of what came before, 0 to start) extended "
     "over the bytes of data, any C-contiguous buffer."},
    {"crc32c_combine", py_crc32c_combine, METH_VARARGS,
     "crc32c_combine(crc_a, crc_b, len_b) -> int: the CRC-32C of a + b from crc32c(a), "
     "crc32c(b) and len(b)."},
    {"crc32c_level", py_crc32c_level, METH_VARARGS,
     "crc32c_level([limit]) -> int: with limit, make crc32c use the fastest loop up to it that "
     "the CPU has (0 portable, 1 SSE4.2 crc32, 2 AVX2 VPCLMULQDQ, 3 AVX-512 VPCLMULQDQ); "
     "returns the one in use."},
    {"set_hardware", py_set_hardware, METH_O,
     "set_hardware(flag) -> bool: use AVX2 and F16C when flag is true and the CPU has both, "
     "and crc32c's fastest loop (else its portable one); returns whether AVX2 and F16C are "
     "used."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "The replay's hot loops: float16 conversion, the fused EMA update, float64 sums and "
    "CRC-32C.", -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void)
{
    use_simd = have_simd();
    crc_init_tables();
    crc_level = crc_best_level(CRC_VPCLMUL);
    return PyModule_Create(&module);
}
