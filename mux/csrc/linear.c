/* A linear layer for a few rows (decode steps of one or two sequences): y = x Wᵀ (+ bias), W read once, in its
 * plain row-major layout. At so few rows a linear is a stream over its weights; oneDNN's prepacked GEMM
 * (mux/model/cpu.py), built for batches, reads them at about half the memory's speed there
 * (`python -m bench.small_linear`). */
#include "simd.h"

#define MAX_ROWS 4

/* y[q, j] = x[q] . w[j] for q < M and j in [j0, j1): each weight vector loaded once and used for the M rows, two
 * vectors a step into two sums (M is a constant in each inlined copy, so the rows unroll). */
static inline void rows_of(const float *const *xr, float *const *yr, const float *restrict w, int64_t in,
                           int64_t j0, int64_t j1, const float *bias, const int M)
{
    for (int64_t j = j0; j < j1; j++) {
        const float *wj = w + j * in;
        vf s[MAX_ROWS] = {{0}}, t[MAX_ROWS] = {{0}};
        int64_t k = 0;
        for (; k + 2 * W <= in; k += 2 * W) {
            const vf a = load(wj + k), b = load(wj + k + W);
#pragma GCC unroll 4
            for (int q = 0; q < M; q++) {
                s[q] += a * load(xr[q] + k);
                t[q] += b * load(xr[q] + k + W);
            }
        }
        for (; k + W <= in; k += W) {
            const vf a = load(wj + k);
#pragma GCC unroll 4
            for (int q = 0; q < M; q++) s[q] += a * load(xr[q] + k);
        }
        for (int q = 0; q < M; q++) {
            float r = hsum(s[q] + t[q]);
            for (int64_t i = k; i < in; i++) r += wj[i] * xr[q][i];
            yr[q][j] = bias ? r + bias[j] : r;
        }
    }
}

/* x [m, in] rows of stride xs, y [m, out] rows of stride ys, w [out, in] contiguous, bias [out] or NULL; m <= 4.
 * The output features are shared out over the thread team in blocks (each block's weights one stream). */
void mux_small_linear(const float *x, int64_t xs, float *y, int64_t ys, const float *restrict w,
                      const float *bias, int64_t m, int64_t in, int64_t out)
{
    const float *xr[MAX_ROWS];
    float *yr[MAX_ROWS];
    for (int q = 0; q < m; q++) xr[q] = x + q * xs, yr[q] = y + q * ys;
#pragma omp parallel for schedule(static)
    for (int64_t j0 = 0; j0 < out; j0 += 16) {
        const int64_t j1 = j0 + 16 < out ? j0 + 16 : out;
        switch (m) {
        case 4: rows_of(xr, yr, w, in, j0, j1, bias, 4); break;
        case 3: rows_of(xr, yr, w, in, j0, j1, bias, 3); break;
        case 2: rows_of(xr, yr, w, in, j0, j1, bias, 2); break;
        default: rows_of(xr, yr, w, in, j0, j1, bias, 1);
        }
    }
}
