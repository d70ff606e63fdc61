/* Passes over activations that take torch several (see kernels.py).
 *
 * Rounding onto a grid: out = clamp(rint(x * inverse), low, high), then times scale where a scale
 * is given (fake quantization); the parameters are one value for the whole tensor or one per
 * column (the last axis). The operations and their order are torch's own (mul, round, clamp,
 * mul; an add first where a bias comes in), so the result is the same bit for bit; rint rounds
 * halves to even, as torch.round does; NaN stays NaN, as with torch.clamp. The threads are those
 * of torch's OpenMP runtime (the same libgomp.so.1).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* x86-64-v3: AVX2 with FMA (a plain "avx2" clone leaves FMA out: 10-20 % slower GELU and softmax). */
#define CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define MIN_PARALLEL 16384 /* elements below which one thread is faster */

static inline float clamp(float v, float low, float high) { /* in this order a max and a min; NaN stays NaN */
    const float above = low > v ? low : v;
    return high < above ? high : above;
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
 * puts GELU within 9e-7 of float64, torch's own kernel within 1.2e-6 (measured on [-30, 30]). */
static inline float erf_approx(float x) {
    const float a = fabsf(x);
    float p = (((((4.30638e-5f * a + 2.765672e-4f) * a + 1.520143e-4f) * a + 9.2705272e-3f) * a + 4.22820123e-2f) * a
               + 7.05230784e-2f) * a + 1.0f;
    p = p * p;
    p = p * p;
    p = p * p;
    p = p * p;
    return copysignf(1.0f - 1.0f / p, x);
}

CLONES static void bias_gelu_rows(float *x, const float *bias, int64_t begin, int64_t end, int64_t cols,
                                  float inverse, float low, float high) {
    for (int64_t r = begin; r < end; ++r) {
        float *row = x + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
            const float v = bias ? row[j] + bias[j] : row[j];
            row[j] = clamp(rintf(0.5f * v * (1.0f + erf_approx(v * 0.70710678118654752f)) * inverse), low, high);
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
        float *row = out + r * cols, sum = 0.0f, squares = 0.0f;
        #pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < cols; ++j) {
            row[j] = clamp(rintf(in[j] * inverse[j]), low[j], high[j]) * scale[j];
            sum += row[j];
        }
        const float mean = sum / (float)cols;
        #pragma omp simd reduction(+ : squares)
        for (int64_t j = 0; j < cols; ++j) squares += (row[j] - mean) * (row[j] - mean);
        const float rstd = 1.0f / sqrtf(squares / (float)cols + eps);
        if (weight && bias) {
            for (int64_t j = 0; j < cols; ++j) row[j] = (row[j] - mean) * rstd * weight[j] + bias[j];
        } else {
            for (int64_t j = 0; j < cols; ++j) row[j] = (row[j] - mean) * rstd;
        }
    }
}

/* LayerNorm of the fake-quantized residual stream (FQ-ViT's PTF quantizer: one grid per channel),
 * one pass: out = layer_norm(fake_quantize(x)) over each row of cols values; params: inverse,
 * low, high, scale, cols values each; weight and bias: cols values each, or both none. Not bit
 * for bit torch's LayerNorm (its own order of the sums; the same within float rounding). */
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
 * Cephes' degree-5 polynomial (within 1e-7 relative, as torch's exp); the whole number n of
 * x / ln 2 is taken from the bits of a float sum (no float-to-int conversion), so NaN stays NaN. */
static inline float exp_nonpositive(float y) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: its sum rounds to a whole */
    const float shifted = y * 1.44269504088896341f + magic, n = shifted - magic;
    const float r = (y - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000 + 127) << 23; /* 2^n: n + 127 in the exponent field */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

CLONES static void softmax_rows(float *x, int64_t begin, int64_t end, int64_t cols, float inverse, float low,
                                float high) {
    for (int64_t r = begin; r < end; ++r) {
        float *row = x + r * cols, top = row[0], sum = 0.0f;
        #pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < cols; ++j) top = row[j] > top ? row[j] : top;
        for (int64_t j = 0; j < cols; ++j) { /* shifted into the exp's domain; NaN stays NaN */
            const float shifted = row[j] - top;
            row[j] = shifted < -87.0f ? -87.0f : shifted;
        }
        #pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < cols; ++j) {
            row[j] = exp_nonpositive(row[j]);
            sum += row[j];
        }
        const float norm = 1.0f / sum;
        for (int64_t j = 0; j < cols; ++j) row[j] = clamp(rintf(row[j] * norm * inverse), low, high);
    }
}

/* Attention's probabilities on the softmax quantizer's grid, in place: x (rows x cols, contiguous)
 * becomes clamp(rint(softmax(x) * inverse), low, high), softmax along each row; params: one grid.
 * Not bit for bit torch's softmax (another exp, another order of the sum). */
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
static inline int exponent_of(float size) { /* frexpf's (and torch.frexp's) exponent, from the bits */
    uint32_t bits;
    memcpy(&bits, &size, sizeof bits);
    const int field = (int)((bits >> 23) & 0xff);
    /* zero, inf and NaN: 0; a subnormal: below -125, which the caller clamps as it would the true one */
    return field == 0xff || size == 0.0f ? 0 : (field == 0 ? -126 : field - 126);
}

static inline float power_of_two(int shifts) { /* 2^shifts for -31 <= shifts <= 31, from its bits */
    const uint32_t bits = (uint32_t)(shifts + 127) << 23;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

CLONES static void integer_norm_rows(const float *x, float *out, int64_t begin, int64_t end, int64_t cols,
                                     const float *scale, const float *factor, float unit, const float *gain_step,
                                     const float *shift_step, float step) {
    for (int64_t i = begin; i < end; ++i) {
        const float *row = x + i * cols;
        float *to = out + i * cols;
        double total = 0.0, squares = 0.0;
        for (int64_t j = 0; j < cols; ++j) {
            const float level = rintf(row[j] / scale[j]) * factor[j];
            to[j] = level;
            total += (double)level;
            squares += (double)(level * level);
        }
        const float mean = (float)(total / (double)cols) * unit;
        float std = (unit / (float)cols) * (float)sqrt((double)cols * squares - total * total);
        std = std > 1.17549435e-38f ? std : 1.17549435e-38f;
        const float ratio = unit / std, centre = mean / std;
        for (int64_t j = 0; j < cols; ++j) {
            const float multiplier = ratio * gain_step[j], size = fabsf(multiplier);
            const int exponent = exponent_of(size);
            const int shifts = exponent > 8 ? 0 : (8 - exponent > 31 ? 31 : 8 - exponent);
            const float power = power_of_two(shifts), inverse = power_of_two(-shifts);
            const float sign = multiplier > 0.0f ? 1.0f : (multiplier < 0.0f ? -1.0f : 0.0f);
            const float integer = clamp(floorf(size * power), 0.0f, 255.0f) * sign;
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
