/* The elementwise parts of a Llama-family decoder layer on the CPU (mux/model/cpu_layers.py): the RMSNorms (with
 * the residual add before the second one) and RoPE on q and k. In transformers they are ~22 small torch ops a
 * layer, each its own pass over memory and its own parallel region; here each is one pass.
 *
 * Built by mux/native.py. Rows are shared out over the thread team; every row is independent.
 */
#include <math.h>

#include "simd.h"

/* out[i] = w * (x[i] / sqrt(mean(x[i]^2) + eps)) over n floats, rows i (row strides xs, os). With res: first
 * x[i] += res[i], written back into x (the residual stream's sum). transformers' formula; the sum of squares is
 * taken in another order than torch's mean, so results differ from it in the last bits. */
void mux_rms_norm(float *restrict x, int64_t xs, const float *restrict res, int64_t rs, const float *restrict w,
                  float *restrict out, int64_t os, int64_t rows, int64_t n, float eps)
{
    const int64_t nv = n / W * W;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t i = 0; i < rows; i++) {
        float *xr = x + i * xs, *o = out + i * os;
        if (res) {
            const float *r = res + i * rs;
            int64_t j = 0;
            for (; j < nv; j += W) store(xr + j, load(xr + j) + load(r + j));
            for (; j < n; j++) xr[j] += r[j];
        }
        const float inv = 1.0f / sqrtf(dot(xr, xr, n) / (float)n + eps);
        int64_t j = 0;
        for (; j < nv; j += W) store(o + j, load(w + j) * (load(xr + j) * inv));
        for (; j < n; j++) o[j] = w[j] * (xr[j] * inv);
    }
}

/* One head's D values rotated in place by its row's cos/sin: the first half x1 c - x2 s, the second x2 c + x1 s,
 * as transformers' q * cos + rotate_half(q) * sin. No fused multiply-adds, so the results equal torch's. */
__attribute__((optimize("fp-contract=off"))) static inline void rotate(float *restrict x, const float *restrict c,
                                                                      const float *restrict s, int64_t D)
{
    const int64_t h = D / 2;
    int64_t j = 0;
    if (h % W == 0)
        for (; j < h; j += W) {
            const vf x1 = load(x + j), x2 = load(x + j + h);
            const vf a = x1 * load(c + j), b = x2 * load(s + j), p = x2 * load(c + j + h), q = x1 * load(s + j + h);
            store(x + j, a - b);
            store(x + j + h, p + q);
        }
    for (; j < h; j++) {
        const float x1 = x[j], x2 = x[j + h];
        const float a = x1 * c[j], b = x2 * s[j], p = x2 * c[j + h], q = x1 * s[j + h];
        x[j] = a - b;
        x[j + h] = p + q;
    }
}

/* RoPE in place on rows t of q ([rows, qh heads * D], row stride qs) and k ([rows, kh * D], stride ks) with row
 * t's cos and sin ([rows, D], row stride cs). */
void mux_rope(float *q, int64_t qs, int64_t qh, float *k, int64_t ks, int64_t kh, const float *cos,
              const float *sin, int64_t cs, int64_t rows, int64_t D)
{
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t t = 0; t < rows; t++) {
        const float *c = cos + t * cs, *s = sin + t * cs;
        for (int64_t h = 0; h < qh; h++) rotate(q + t * qs + h * D, c, s, D);
        for (int64_t h = 0; h < kh; h++) rotate(k + t * ks + h * D, c, s, D);
    }
}
