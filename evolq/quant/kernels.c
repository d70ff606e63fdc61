/* Passes over activations that take torch several (see kernels.py).
 *
 * Rounding onto a grid: out = clamp(rint(x * inverse), low, high), then times scale where a scale
 * is given (fake quantization); the parameters are one value for the whole tensor or one per
 * column (the last axis). The operations and their order are torch's own (mul, round, clamp,
 * mul; an add first where a bias comes in), so the result is the same bit for bit; rint rounds
 * halves to even, as torch.round does; NaN stays NaN, as with torch.clamp. The threads are those
 * of torch's OpenMP runtime (the same libgomp.so.1).
 *
 * The same numbers on every machine: each kernel is compiled for several instruction sets (the
 * clones below; GCC picks one by the CPU at load time) and gives the same bits in every clone and
 * with any number of threads. kernels.py compiles with -ffp-contract=off, so no a * b + c becomes
 * a fused multiply-add behind our back; the polynomials call fmaf() where they mean one (always
 * correctly rounded: one instruction where the CPU has FMA, glibc's exact routine where it has
 * not). Sums over a row (softmax, LayerNorm) run in LANES partial sums and a fixed tree (see
 * row_sum), an order that is the same whatever the vector width; no OpenMP simd reductions,
 * which may reassociate by the width. A row is never split between threads. Tested:
 * tests/evolq/test_evolq_kernels.py builds each clone alone (EVOLQ_KERNELS=generic, x86-64-v3,
 * avx512f) and compares bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* EVOLQ_ONLY_* (kernels.py, EVOLQ_KERNELS=...) builds one clone alone, for the tests above. */
#if defined(EVOLQ_ONLY_GENERIC)
#define CLONES
#elif defined(EVOLQ_ONLY_X86_64_V3)
#define CLONES __attribute__((target("arch=x86-64-v3")))
#elif defined(EVOLQ_ONLY_AVX512F)
#define CLONES __attribute__((target("avx512f")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* x86-64-v3: AVX2 with FMA (a plain "avx2" clone leaves FMA out: 10-20 % slower GELU and softmax). */
#define CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* The clone that runs, as kernels.py names them: 0 generic, 1 x86-64-v3, 2 avx512f; -1 where a
 * clone forced by EVOLQ_ONLY_* needs more than this CPU has. GCC's dispatcher prefers them in
 * this order (its priorities: avx512f over arch=x86-64-v3 over default). */
int evolq_instruction_set(void) {
#if defined(EVOLQ_ONLY_GENERIC) || !(defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__))
    return 0;
#else
    __builtin_cpu_init();
#if defined(EVOLQ_ONLY_X86_64_V3)
    return __builtin_cpu_supports("x86-64-v3") ? 1 : -1;
#elif defined(EVOLQ_ONLY_AVX512F)
    return __builtin_cpu_supports("avx512f") ? 2 : -1;
#else
    return __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
#endif
#endif
}

/* 1 where fmaf() is one instruction: an x86 CPU with FMA, or another architecture (aarch64 has it
 * always). Elsewhere glibc computes it exactly in software, a call per multiply-add: kernels.py
 * then runs torch's softmax and GELU instead of these. */
int evolq_has_fma(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("fma") != 0;
#else
    return 1;
#endif
}

#define MIN_PARALLEL 16384 /* elements below which one thread is faster */

static inline float clamp(float v, float low, float high) { /* in this order a max and a min; NaN stays NaN */
    const float above = low > v ? low : v;
    return high < above ? high : above;
}

/* Sums in an order of their own, the same in every clone: element j goes into partial sum
 * j % LANES, and the partial sums are added in a fixed tree. The compiler keeps the partial sums
 * in one AVX-512 register, two AVX2 or four SSE registers: the same additions in the same order
 * (it may not reassociate float additions without -ffast-math). "omp simd" on the loops over the
 * lanes only says that the lanes are independent (no reduction clause: nothing is reordered);
 * without it GCC leaves the maximum's lanes scalar. */
#define LANES 16

static inline float sum_of_lanes(float *lane) { /* lane is overwritten */
    for (int width = LANES / 2; width >= 1; width /= 2)
        for (int k = 0; k < width; ++k) lane[k] = lane[k] + lane[k + width];
    return lane[0];
}

static inline float row_sum(const float *v, int64_t n) {
    float lane[LANES] = {0.0f};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        #pragma omp simd
        for (int k = 0; k < LANES; ++k) lane[k] += v[j + k];
    }
    for (int k = 0; j + k < n; ++k) lane[k] += v[j + k];
    return sum_of_lanes(lane);
}

static inline float row_squares(const float *v, int64_t n, float mean) { /* sum of (v - mean)^2, in row_sum's order */
    float lane[LANES] = {0.0f};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        #pragma omp simd
        for (int k = 0; k < LANES; ++k) lane[k] += (v[j + k] - mean) * (v[j + k] - mean);
    }
    for (int k = 0; j + k < n; ++k) lane[k] += (v[j + k] - mean) * (v[j + k] - mean);
    return sum_of_lanes(lane);
}

static inline float larger(float a, float b) { return a > b ? a : b; }

/* The largest number of v, -inf where there is none (NaN never enters): exact in any order. */
static inline float row_max(const float *v, int64_t n) {
    float lane[LANES];
    for (int k = 0; k < LANES; ++k) lane[k] = -INFINITY;
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        #pragma omp simd
        for (int k = 0; k < LANES; ++k) lane[k] = larger(v[j + k], lane[k]);
    }
    for (int k = 0; j + k < n; ++k) lane[k] = larger(v[j + k], lane[k]);
    for (int width = LANES / 2; width >= 1; width /= 2)
        for (int k = 0; k < width; ++k) lane[k] = larger(lane[k + width], lane[k]);
    return lane[0];
}

CLONES static void run_flat(const float *x, float *out, int64_t begin, int64_t end, float inverse, float low,
                            float high, const float *scale) {
    if (scale) {
        const float s = *scale;
        for (int64_t i = begin; i < end; ++i) out[i] = clamp(rintf(x[i] * inverse), low, high) * s;
    } else {
        for (int64_t i = begin; i < end; ++i) out[i] = clamp(rintf(x[i] * inverse), low, high);
    }
}

CLONES static void run_rows(const float *x, float *out, int64_t begin, int64_t end, int64_t cols,
                            const float *inverse, const float *low, const float *high, const float *scale) {
    for (int64_t r = begin; r < end; ++r) {
        const float *in = x + r * cols;
        float *to = out + r * cols;
        if (scale) {
            for (int64_t j = 0; j < cols; ++j) to[j] = clamp(rintf(in[j] * inverse[j]), low[j], high[j]) * scale[j];
        } else {
            for (int64_t j = 0; j < cols; ++j) to[j] = clamp(rintf(in[j] * inverse[j]), low[j], high[j]);
        }
    }
}

/* x and out: rows x cols, contiguous (out may be x). params: inverse, low, high, scale, each one
 * value (per_column = 0) or cols values (per_column = 1), one after the other. */
void evolq_quantize(const float *x, float *out, int64_t rows, int64_t cols, const float *params, int per_column,
                    int dequantize, int threads) {
    const int64_t n = rows * cols, width = per_column ? cols : 1;
    const float *inverse = params, *low = params + width, *high = params + 2 * width;
    const float *scale = dequantize ? params + 3 * width : 0;
    if (n < MIN_PARALLEL) threads = 1;
    if (!per_column) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int part = 0; part < threads; ++part)
            run_flat(x, out, n * part / threads, n * (part + 1) / threads, *inverse, *low, *high, scale);
    } else {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int part = 0; part < threads; ++part)
            run_rows(x, out, rows * part / threads, rows * (part + 1) / threads, cols, inverse, low, high, scale);
    }
}

/* Attention's q, k and v, each on its own grid, from the qkv product without its bias: bias,
 * rounding and the layout of the batched GEMMs in one pass (torch: an add, the rounding, and a
 * copy for each of q, k and v). product: (batch, tokens, 3, heads, head_dim), contiguous; bias:
 * 3 * heads * head_dim values or none; params: inverse, low, high (then an unused scale), one per
 * product column each. out: (3, batch, heads, tokens, head_dim), with
 * out[s, b, h, t, :] = clamp(rint((product[b, t, s, h, :] + bias) * inverse), low, high). */
static inline void split_row(const float *x, const float *bias, float *out, int64_t length, const float *inverse,
                             const float *low, const float *high) {
    if (bias) {
        for (int64_t j = 0; j < length; ++j) out[j] = clamp(rintf((x[j] + bias[j]) * inverse[j]), low[j], high[j]);
    } else {
        for (int64_t j = 0; j < length; ++j) out[j] = clamp(rintf(x[j] * inverse[j]), low[j], high[j]);
    }
}

CLONES static void split_rows(const float *product, const float *bias, float *out, int64_t batch, int64_t tokens,
                              int64_t heads, int64_t head_dim, const float *params, int64_t begin, int64_t end) {
    const int64_t width = 3 * heads * head_dim;
    const float *inverse = params, *low = params + width, *high = params + 2 * width;
    for (int64_t r = begin; r < end; ++r) { /* r = b * tokens + t */
        const int64_t b = r / tokens, t = r % tokens;
        for (int64_t g = 0; g < 3 * heads; ++g) { /* g = s * heads + h, col: where its columns start */
            const int64_t s = g / heads, h = g % heads, col = g * head_dim;
            split_row(product + r * width + col, bias ? bias + col : 0,
                      out + (((s * batch + b) * heads + h) * tokens + t) * head_dim, head_dim, inverse + col,
                      low + col, high + col);
        }
    }
}

void evolq_split_heads(const float *product, const float *bias, float *out, int64_t batch, int64_t tokens,
                       int64_t heads, int64_t head_dim, const float *params, int threads) {
    const int64_t rows = batch * tokens;
    if (rows * 3 * heads * head_dim < MIN_PARALLEL) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int part = 0; part < threads; ++part)
        split_rows(product, bias, out, batch, tokens, heads, head_dim, params, rows * part / threads,
                   rows * (part + 1) / threads);
}

/* erf by Abramowitz & Stegun 7.1.28, 1 - 1/p(|x|)^16 (|error| < 3e-7); evaluated in float32 it
 * puts GELU within 9e-7 of float64, torch's own kernel within 1.2e-6 (measured on [-30, 30]).
 * Horner's steps are fused multiply-adds, written out (fmaf), so every clone rounds them alike. */
static inline float erf_approx(float x) {
    const float a = fabsf(x);
    float p = fmaf(4.30638e-5f, a, 2.765672e-4f);
    p = fmaf(p, a, 1.520143e-4f);
    p = fmaf(p, a, 9.2705272e-3f);
    p = fmaf(p, a, 4.22820123e-2f);
    p = fmaf(p, a, 7.05230784e-2f);
    p = fmaf(p, a, 1.0f);
    p = p * p;
    p = p * p;
    p = p * p;
    p = p * p;
    return copysignf(1.0f - 1.0f / p, x);
}

static inline float gelu_level(float v, float inverse, float low, float high) {
    return clamp(rintf(0.5f * v * (1.0f + erf_approx(v * 0.70710678118654752f)) * inverse), low, high);
}

CLONES static void bias_gelu_rows(float *x, const float *bias, int64_t begin, int64_t end, int64_t cols,
                                  float inverse, float low, float high) {
    for (int64_t r = begin; r < end; ++r) { /* two loops: a test of bias inside keeps GCC from vectorizing for AVX2 */
        float *row = x + r * cols;
        if (bias) {
            for (int64_t j = 0; j < cols; ++j) row[j] = gelu_level(row[j] + bias[j], inverse, low, high);
        } else {
            for (int64_t j = 0; j < cols; ++j) row[j] = gelu_level(row[j], inverse, low, high);
        }
    }
}

/* The MLP's hidden layer on the next layer's grid, in place: x = levels(gelu(x + bias)), exact
 * (erf) GELU; x: rows x cols, contiguous; bias: cols values or none; params: one grid. Not bit
 * for bit torch's GELU (another erf): a value within ~1e-6 of a rounding boundary may land on
 * the neighbouring level. */
void evolq_bias_gelu_levels(float *x, const float *bias, int64_t rows, int64_t cols, const float *params,
                            int threads) {
    if (rows * cols < MIN_PARALLEL) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int part = 0; part < threads; ++part)
        bias_gelu_rows(x, bias, rows * part / threads, rows * (part + 1) / threads, cols, params[0], params[1],
                       params[2]);
}

CLONES static void ptf_norm_rows(const float *x, float *out, int64_t begin, int64_t end, int64_t cols,
                                 const float *params, const float *weight, const float *bias, float eps) {
    const float *inverse = params, *low = params + cols, *high = params + 2 * cols, *scale = params + 3 * cols;
    for (int64_t r = begin; r < end; ++r) {
        const float *in = x + r * cols;
        float *row = out + r * cols;
        float lane[LANES] = {0.0f}; /* the fake quantization and its sum (row_sum's order) in one pass */
        int64_t j = 0;
        for (; j + LANES <= cols; j += LANES) {
            #pragma omp simd
            for (int64_t i = j; i < j + LANES; ++i)
                lane[i - j] += row[i] = clamp(rintf(in[i] * inverse[i]), low[i], high[i]) * scale[i];
        }
        for (int64_t i = j; i < cols; ++i) lane[i - j] += row[i] = clamp(rintf(in[i] * inverse[i]), low[i], high[i]) * scale[i];
        const float mean = sum_of_lanes(lane) / (float)cols;
        const float rstd = 1.0f / sqrtf(row_squares(row, cols, mean) / (float)cols + eps);
        if (weight && bias) {
            for (j = 0; j < cols; ++j) row[j] = (row[j] - mean) * rstd * weight[j] + bias[j];
        } else {
            for (j = 0; j < cols; ++j) row[j] = (row[j] - mean) * rstd;
        }
    }
}

/* LayerNorm of the fake-quantized residual stream (FQ-ViT's PTF quantizer: one grid per channel),
 * one pass: out = layer_norm(fake_quantize(x)) over each row of cols values; params: inverse,
 * low, high, scale, cols values each; weight and bias: cols values each, or both none. Not bit
 * for bit torch's LayerNorm (its own order of the sums, row_sum's; the same within float rounding). */
void evolq_ptf_layer_norm(const float *x, float *out, int64_t rows, int64_t cols, const float *params,
                          const float *weight, const float *bias, double eps, int threads) {
    if (rows * cols < MIN_PARALLEL) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int part = 0; part < threads; ++part)
        ptf_norm_rows(x, out, rows * part / threads, rows * (part + 1) / threads, cols, params, weight, bias,
                      (float)eps);
}

/* e^x for -87 <= x <= 0 (the caller clamps: a clamp in here becomes a branch that GCC cannot
 * vectorize for AVX2, since the clamped value's result is a constant): Cody-Waite reduction and
 * Cephes' degree-5 polynomial (within 1e-7 relative, as torch's exp), its steps fused
 * multiply-adds written out (fmaf: the same in every clone); the whole number n of x / ln 2 is
 * taken from the bits of a float sum (no float-to-int conversion), so NaN stays NaN. */
static inline float exp_nonpositive(float y) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: its sum rounds to a whole */
    const float shifted = fmaf(y, 1.44269504088896341f, magic), n = shifted - magic;
    const float r = fmaf(n, 2.12194440e-4f, fmaf(-n, 0.693359375f, y));
    float p = fmaf(1.9875691500e-4f, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000 + 127) << 23; /* 2^n: n + 127 in the exponent field */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static inline float exp_into(float *v, float *lane) { /* v = e^v, its sum into the lane (row_sum's order) */
    const float e = exp_nonpositive(*v);
    *v = e;
    return *lane + e;
}

/* A row with a NaN comes out all NaN, as torch's: its sum is NaN (row_max leaves NaN out; a row
 * with +inf, or only -inf or NaN, gives inf - inf = NaN). The exp and the sum share one pass. */
CLONES static void softmax_rows(float *x, int64_t begin, int64_t end, int64_t cols, float inverse, float low,
                                float high) {
    for (int64_t r = begin; r < end; ++r) {
        float *row = x + r * cols, lane[LANES] = {0.0f};
        const float top = row_max(row, cols);
        for (int64_t j = 0; j < cols; ++j) { /* shifted into the exp's domain; NaN stays NaN */
            const float shifted = row[j] - top;
            row[j] = shifted < -87.0f ? -87.0f : shifted;
        }
        int64_t j = 0;
        for (; j + LANES <= cols; j += LANES) {
            #pragma omp simd
            for (int k = 0; k < LANES; ++k) lane[k] = exp_into(row + j + k, lane + k);
        }
        for (int k = 0; j + k < cols; ++k) lane[k] = exp_into(row + j + k, lane + k);
        const float norm = 1.0f / sum_of_lanes(lane);
        for (j = 0; j < cols; ++j) row[j] = clamp(rintf(row[j] * norm * inverse), low, high);
    }
}

/* Attention's probabilities on the softmax quantizer's grid, in place: x (rows x cols, contiguous)
 * becomes clamp(rint(softmax(x) * inverse), low, high), softmax along each row; params: one grid.
 * Not bit for bit torch's softmax (another exp, another order of the sum: row_sum's). */
void evolq_softmax_levels(float *x, int64_t rows, int64_t cols, const float *params, int threads) {
    if (rows * cols < MIN_PARALLEL) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int part = 0; part < threads; ++part)
        softmax_rows(x, rows * part / threads, rows * (part + 1) / threads, cols, params[0], params[1], params[2]);
}

/* FQ-ViT's integer LayerNorm (evolq.quant.layers.integer_layer_norm: the same float operations in
 * the same order, so the same result bit for bit). x: rows x cols on a grid of one scale per column
 * (scale: cols values, each a power of two times unit, the smallest); the levels counted in units of
 * unit are whole numbers, so their sums in double are exact. Each column's multiplier
 * weight / step / std becomes an 8-bit integer over 2^shifts, the offset an integer over the same;
 * out = rint((multiplier * level + offset) / 2^shifts) * step. gain_step, shift_step: weight / step
 * and bias / step, cols values each. */
static inline int32_t bits_of(float value) { int32_t bits; memcpy(&bits, &value, sizeof bits); return bits; }
static inline float from_bits(int32_t bits) { float value; memcpy(&value, &bits, sizeof value); return value; }

/* frexpf's (and torch.frexp's) exponent of size >= 0, from the bits: 0 for zero, inf and NaN; a
 * subnormal gets -126, below the -125 at which the caller clamps, as it would the true exponent. */
static inline int32_t exponent_of(float size) {
    const int32_t field = (bits_of(size) >> 23) & 0xff;
    const int32_t exponent = field == 0 ? -126 : field - 126;
    return (field == 0xff) | (size == 0.0f) ? 0 : exponent;
}

/* floorf(v), bit for bit, for v >= 0 (and inf, NaN), from rintf: GCC vectorizes rintf but not
 * floorf (it must not raise "inexact"). The whole number nearest v, less one where that is above v;
 * written as an addition of -1 or +0 (v >= 0: no -0 to lose), the one form GCC 12 if-converts. */
static inline float floor_of(float v) {
    const float nearest = rintf(v);
    return nearest + (nearest > v ? -1.0f : 0.0f);
}

/* Everything below is written without branches, so that the compiler vectorizes the loops over a
 * row (selects for the conditions, the bits of 2^shifts built as integers). The sums are exact, so
 * any order gives the same bits: the levels are whole numbers and their squares too (floats above
 * 2^24 are whole), well below 2^53 in double; partial sums over LANES lanes only let them vectorize. */
CLONES static void integer_norm_rows(const float *x, float *out, int64_t begin, int64_t end, int64_t cols,
                                     const float *scale, const float *factor, float unit, const float *gain_step,
                                     const float *shift_step, float step) {
    for (int64_t i = begin; i < end; ++i) {
        const float *row = x + i * cols;
        float *to = out + i * cols;
        for (int64_t j = 0; j < cols; ++j) to[j] = rintf(row[j] / scale[j]) * factor[j];
        double totals[LANES] = {0.0}, squares[LANES] = {0.0};
        int64_t j = 0;
        for (; j + LANES <= cols; j += LANES) {
            #pragma omp simd
            for (int k = 0; k < LANES; ++k) {
                totals[k] += (double)to[j + k];
                squares[k] += (double)(to[j + k] * to[j + k]);
            }
        }
        for (int k = 0; j + k < cols; ++k) {
            totals[k] += (double)to[j + k];
            squares[k] += (double)(to[j + k] * to[j + k]);
        }
        double total = 0.0, square = 0.0;
        for (int k = 0; k < LANES; ++k) {
            total += totals[k];
            square += squares[k];
        }
        const float mean = (float)(total / (double)cols) * unit;
        float std = (unit / (float)cols) * (float)sqrt((double)cols * square - total * total);
        std = std > 1.17549435e-38f ? std : 1.17549435e-38f;
        const float ratio = unit / std, centre = mean / std;
        for (int64_t j = 0; j < cols; ++j) {
            const float multiplier = ratio * gain_step[j], size = fabsf(multiplier);
            const int32_t exponent = exponent_of(size);
            int32_t shifts = 8 - exponent; /* N, 0 <= N <= 31, as a max and a min: selects the vectorizer takes */
            shifts = shifts < 0 ? 0 : shifts;
            shifts = shifts > 31 ? 31 : shifts;
            const float power = from_bits((shifts + 127) << 23), inverse = from_bits((127 - shifts) << 23);
            const float sign = (float)(multiplier > 0.0f) - (float)(multiplier < 0.0f); /* NaN: 0 */
            const float integer = clamp(floor_of(size * power), 0.0f, 255.0f) * sign;
            const float offset = rintf((shift_step[j] - centre * gain_step[j]) * power);
            to[j] = rintf((integer * to[j] + offset) * inverse) * step;
        }
    }
}

void evolq_integer_layer_norm(const float *x, float *out, int64_t rows, int64_t cols, const float *scale,
                              const float *factor, float unit, const float *gain_step, const float *shift_step,
                              float step, int threads) {
    if (rows * cols < MIN_PARALLEL) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int part = 0; part < threads; ++part)
        integer_norm_rows(x, out, rows * part / threads, rows * (part + 1) / threads, cols, scale, factor, unit,
                          gain_step, shift_step, step);
}

/* Squared fake-quantization errors summed per candidate grid: how OMSE and PTF score their candidate
 * scales. x: rows x cols, contiguous. params: `candidates` grids one after another, each inverse, low,
 * high, scale as evolq_quantize takes them: one value each (per_column = 0: the sums run over all
 * values), or cols values each (per_column = 1: one sum per column). Each term (fq(v) - v)^2 is
 * float32, torch's elementwise numbers; the sums are double, in an order of their own that no
 * thread count or clone changes: blocks of about ERROR_BLOCK values (whole rows where per_column),
 * each summed in a fixed order, then the blocks' sums one after another. With tail_low and
 * tail_high (one value, or cols values where per_column) only the values outside
 * [tail_low, tail_high] count, and counts gets how many per column (one number where not
 * per_column). sums: candidates (x cols where per_column) values. Returns 0, or -1 where the
 * blocks' sums found no memory. */
#define ERROR_BLOCK 16384

static inline double squared_error(float v, float inverse, float low, float high, float scale) {
    const float d = clamp(rintf(v * inverse), low, high) * scale - v;
    return (double)(d * d);
}

CLONES static void tensor_errors(const float *v, int64_t n, const float *params, int64_t candidates,
                                 const float *tail, double *sums, int64_t *count, float *buffer) {
    if (tail) { /* the tail values, in order; then the same sums over them */
        int64_t m = 0;
        for (int64_t i = 0; i < n; ++i)
            if (v[i] < tail[0] || v[i] > tail[1]) buffer[m++] = v[i];
        v = buffer;
        n = m;
        *count = m;
    }
    for (int64_t c = 0; c < candidates; ++c) {
        const float *p = params + 4 * c;
        const float inverse = p[0], low = p[1], high = p[2], scale = p[3];
        double lane[LANES] = {0.0};
        int64_t j = 0;
        for (; j + LANES <= n; j += LANES) {
            #pragma omp simd
            for (int k = 0; k < LANES; ++k) lane[k] += squared_error(v[j + k], inverse, low, high, scale);
        }
        for (int k = 0; j + k < n; ++k) lane[k] += squared_error(v[j + k], inverse, low, high, scale);
        for (int width = LANES / 2; width >= 1; width /= 2)
            for (int k = 0; k < width; ++k) lane[k] = lane[k] + lane[k + width];
        sums[c] = lane[0];
    }
}

CLONES static void column_errors(const float *x, int64_t begin, int64_t end, int64_t cols, const float *params,
                                 int64_t candidates, const float *tail_low, const float *tail_high, double *sums,
                                 int64_t *counts) {
    memset(sums, 0, sizeof(double) * candidates * cols);
    if (tail_low) memset(counts, 0, sizeof(int64_t) * cols);
    for (int64_t r = begin; r < end; ++r) {
        const float *row = x + r * cols;
        for (int64_t c = 0; c < candidates; ++c) {
            const float *inverse = params + 4 * cols * c, *low = inverse + cols, *high = low + cols, *scale = high + cols;
            double *sum = sums + c * cols;
            if (!tail_low) {
                for (int64_t j = 0; j < cols; ++j) sum[j] += squared_error(row[j], inverse[j], low[j], high[j], scale[j]);
            } else {
                for (int64_t j = 0; j < cols; ++j)
                    if (row[j] < tail_low[j] || row[j] > tail_high[j])
                        sum[j] += squared_error(row[j], inverse[j], low[j], high[j], scale[j]);
            }
        }
        if (tail_low)
            for (int64_t j = 0; j < cols; ++j) counts[j] += row[j] < tail_low[j] || row[j] > tail_high[j];
    }
}

int evolq_squared_errors(const float *x, int64_t rows, int64_t cols, const float *params, int64_t candidates,
                         int per_column, const float *tail_low, const float *tail_high, double *sums, int64_t *counts,
                         int threads) {
    const int64_t n = rows * cols, width = per_column ? cols : 1;
    const int64_t block = per_column ? (ERROR_BLOCK / cols > 0 ? ERROR_BLOCK / cols : 1) : ERROR_BLOCK;
    const int64_t blocks = ((per_column ? rows : n) + block - 1) / block;
    double *partial = malloc(sizeof(double) * (blocks > 0 ? blocks : 1) * candidates * width);
    int64_t *partial_counts = malloc(sizeof(int64_t) * (blocks > 0 ? blocks : 1) * width);
    float *buffers = tail_low && !per_column ? malloc(sizeof(float) * ERROR_BLOCK * (threads > 0 ? threads : 1)) : 0;
    if (!partial || !partial_counts || (tail_low && !per_column && !buffers)) {
        free(partial);
        free(partial_counts);
        free(buffers);
        return -1;
    }
    if (n < MIN_PARALLEL) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int part = 0; part < threads; ++part) {
        for (int64_t b = blocks * part / threads; b < blocks * (part + 1) / threads; ++b) {
            double *into = partial + b * candidates * width;
            int64_t *counted = partial_counts + b * width;
            if (per_column) {
                const int64_t end = (b + 1) * block < rows ? (b + 1) * block : rows;
                column_errors(x, b * block, end, cols, params, candidates, tail_low, tail_high, into, counted);
            } else {
                const int64_t end = (b + 1) * block < n ? (b + 1) * block : n;
                float tail[2] = {tail_low ? *tail_low : 0.0f, tail_high ? *tail_high : 0.0f};
                tensor_errors(x + b * block, end - b * block, params, candidates, tail_low ? tail : 0, into, counted,
                              buffers ? buffers + (int64_t)part * ERROR_BLOCK : 0);
            }
        }
    }
    for (int64_t i = 0; i < candidates * width; ++i) sums[i] = 0.0;
    if (tail_low)
        for (int64_t j = 0; j < width; ++j) counts[j] = 0;
    for (int64_t b = 0; b < blocks; ++b) {
        for (int64_t i = 0; i < candidates * width; ++i) sums[i] += partial[b * candidates * width + i];
        if (tail_low)
            for (int64_t j = 0; j < width; ++j) counts[j] += partial_counts[b * width + j];
    }
    free(partial);
    free(partial_counts);
    free(buffers);
    return 0;
}
