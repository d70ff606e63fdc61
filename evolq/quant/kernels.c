/* Rounding onto a quantization grid in one pass over the data (see kernels.py).
 *
 * out = clamp(rint(x * inverse), low, high), then times scale where a scale is given (fake
 * quantization); the parameters are one value for the whole tensor or one per column (the last
 * axis). The operations and their order are torch's own mul, round, clamp and mul, so the result
 * is the same bit for bit; rint rounds halves to even, as torch.round does. NaN stays NaN, as
 * with torch.clamp. The threads are those of torch's OpenMP runtime (the same libgomp.so.1).
 */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define MIN_PARALLEL 16384 /* elements below which one thread is faster */

static inline float clamp(float v, float low, float high) { return v < low ? low : (v > high ? high : v); }

CLONES static void run_flat(const float *x, float *out, int64_t begin, int64_t end, float inverse, float low,
                            float high, const float *scale) {
    if (scale) {
        const float s = *scale;
        for (int64_t i = begin; i < end; ++i) out[i] = clamp(rintf(x[i] * inverse), low, high) * s;
    } else {
        for (int64_t i = begin; i < end; ++i) out[i] = clamp(rintf(x[i] * inverse), low, high);
    }
}

CLONES static void run_row(const float *x, float *out, int64_t cols, const float *inverse, const float *low,
                           const float *high, const float *scale) {
    if (scale) {
        for (int64_t j = 0; j < cols; ++j) out[j] = clamp(rintf(x[j] * inverse[j]), low[j], high[j]) * scale[j];
    } else {
        for (int64_t j = 0; j < cols; ++j) out[j] = clamp(rintf(x[j] * inverse[j]), low[j], high[j]);
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
        for (int64_t r = 0; r < rows; ++r)
            run_row(x + r * cols, out + r * cols, cols, inverse, low, high, scale);
    }
}
