/* A linear layer for a few rows (decode steps of one or two sequences): y = x Wᵀ (+ bias), W read once, in its
 * plain row-major layout. At so few rows a linear is a stream over its weights; oneDNN's prepacked GEMM
 * (mux/model/cpu.py), built for batches, reads them at about half the memory's speed there
 * (`python -m bench.small_linear`). */
#include <omp.h>

#include "lora.h"

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

/* rows_of for m <= MAX_ROWS rows, m made a constant for each inlined copy */
static inline void rows_any(const float *const *xr, float *const *yr, const float *restrict w, int64_t in,
                            int64_t j0, int64_t j1, const float *bias, int64_t m)
{
    switch (m) {
    case 4: rows_of(xr, yr, w, in, j0, j1, bias, 4); break;
    case 3: rows_of(xr, yr, w, in, j0, j1, bias, 3); break;
    case 2: rows_of(xr, yr, w, in, j0, j1, bias, 2); break;
    default: rows_of(xr, yr, w, in, j0, j1, bias, 1);
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
    for (int64_t j0 = 0; j0 < out; j0 += 16) rows_any(xr, yr, w, in, j0, j0 + 16 < out ? j0 + 16 : out, bias, m);
}

/* mux_small_linear followed by mux_lora_add in one call, for a decode step of a few sequences with adapters: y =
 * x Wᵀ (+ bias), then each row q with an adapter (row_slot[q] >= 0) adds (x_q A_slotᵀ) B_slot at rank row_rank[q];
 * a [S, R, in] and b [S, R, out] contiguous. One parallel region instead of two calls: the team shares out each
 * row's shrink by groups of four ranks, each thread writes its range of output features, then (after a barrier,
 * the shrink done) adds the rows' deltas to that range while it is still in cache. The shrink and the expand are
 * lora.c's, on the same groups of ranks and vector lanes. */
void mux_small_linear_lora(const float *x, int64_t xs, float *y, int64_t ys, const float *restrict w,
                           const float *bias, int64_t m, int64_t in, int64_t out, const float *a, const float *b,
                           int64_t R, const int64_t *row_slot, const int64_t *row_rank)
{
    const float *xr[MAX_ROWS];
    float *yr[MAX_ROWS];
    for (int q = 0; q < m; q++) xr[q] = x + q * xs, yr[q] = y + q * ys;
    float h[MAX_ROWS * R]; /* row q's x_q A_slotᵀ at h[q * R] */
#pragma omp parallel
    {
        const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
        for (int q = 0; q < m; q++) {
            const int64_t r = row_rank[q], share = ((r + 3) / 4 + team - 1) / team * 4;
            const int64_t k0 = t * share, k1 = k0 + share < r ? k0 + share : r;
            if (row_slot[q] >= 0 && k0 < k1)
                shrink(xr + q, a + (row_slot[q] * R + k0) * in, in, k1 - k0, h + q * R + k0, 1);
        }
        const int64_t blocks = (out + 15) / 16, end = (t + 1) * blocks / team * 16; /* this thread's outputs */
        const int64_t j0 = t * blocks / team * 16, j1 = end < out ? end : out;
        if (j0 < j1) rows_any(xr, yr, w, in, j0, j1, bias, m);
#pragma omp barrier
        for (int q = 0; q < m; q++)
            if (row_slot[q] >= 0 && j0 < j1) {
                float *yq = yr[q] + j0;
                expand(&yq, b + row_slot[q] * R * out + j0, j1 - j0, out, row_rank[q], h + q * R, 1);
            }
    }
}
