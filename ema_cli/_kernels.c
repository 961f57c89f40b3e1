/*
 * Hot loops of the replay, in C: float16 <-> float32 conversion and the fused EMA update.
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
 * follows numpy.
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
 * The functions take objects with the buffer protocol, C-contiguous, of equal element counts,
 * and release the GIL while they run.
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

/* half_to_float(src, dst) and float_to_half(src, dst). */
static PyObject *convert(PyObject *args, int to_float)
{
    const char *name = to_float ? "half_to_float" : "float_to_half";
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
#if KERNELS_X86
        if (use_simd) {
            half_to_float_f16c((const uint16_t *)src.buf, (uint32_t *)dst.buf, n);
        } else
#endif
            half_to_float_scalar((const uint16_t *)src.buf, (uint32_t *)dst.buf, n);
    } else {
#if KERNELS_X86
        if (use_simd) {
            float_to_half_f16c((const uint32_t *)src.buf, (uint16_t *)dst.buf, n);
        } else
#endif
            float_to_half_scalar((const uint32_t *)src.buf, (uint16_t *)dst.buf, n);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyObject *py_half_to_float(PyObject *self, PyObject *args)
{
    (void)self;
    return convert(args, 1);
}

static PyObject *py_float_to_half(PyObject *self, PyObject *args)
{
    (void)self;
    return convert(args, 0);
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

static PyObject *py_set_hardware(PyObject *self, PyObject *arg)
{
    (void)self;
    int wanted = PyObject_IsTrue(arg);
    if (wanted < 0) {
        return NULL;
    }
    use_simd = wanted && have_simd();
    return PyBool_FromLong(use_simd);
}

static PyMethodDef methods[] = {
    {"half_to_float", py_half_to_float, METH_VARARGS,
     "half_to_float(src, dst): float16 bits in src -> float32 bits in dst, as numpy casts."},
    {"float_to_half", py_float_to_half, METH_VARARGS,
     "float_to_half(src, dst): float32 bits in src -> float16 bits in dst, as numpy casts."},
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
    {"set_hardware", py_set_hardware, METH_O,
     "set_hardware(flag) -> bool: use AVX2 and F16C when flag is true and the CPU has both; "
     "returns whether they are used."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "The replay's hot loops: float16 conversion and the fused EMA update.", -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void)
{
    use_simd = have_simd();
    return PyModule_Create(&module);
}
