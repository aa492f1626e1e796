/* The CPU linear layer, y = x Wᵀ (+ bias), over weights packed once in panels of 16 output features: p [ceil(out/16),
 * in, 16], panel i holding features 16i..16i+15, each input feature's 16 weights side by side (zeros past `out`).
 *
 * For a few rows a linear is a stream over its weights; for many it is arithmetic. A panel serves both: RB rows at a
 * time keep their 16 sums each in registers over the whole input (per input feature: two vector loads of the panel,
 * a broadcast of each row's x, two FMAs a row), so the panel streams from memory once for RB rows and from cache for
 * the next RB, and the weights are one forward stream per thread, prefetched in software: PF floats ahead when one
 * pass covers the rows (without it the stream ran at half the memory's speed once the rows' arithmetic was beside
 * it), else each pass over a panel fetches its share of the next panel, so the memory works during the passes
 * from cache too (1.05-1.25x at 8-256 rows, ad hoc). On this 2-core machine it read SmolLM2's linears 1.1-1.5x
 * faster than oneDNN's prepacked GEMM from 1 to 64 rows and as fast at 256 (`python -m bench.small_linear`).
 *
 * Each output is one sum over the input features in order, on one thread: a row's result does not depend on the
 * other rows of the call or on the thread count. */
#include <omp.h>

#include "lora.h"

#define PANEL 16 /* output features per panel: two vectors */
#define PF 4096  /* software prefetch distance in floats (256 panel rows) for one pass over a panel */
#define RC 64    /* rows per work item (with the panel, what one thread computes) */
#if defined(__AVX512VL__)
#define RB 8 /* rows per pass over a panel: 2 RB sums + 3 in the 32 vector registers */
#else
#define RB 6 /* 16 registers */
#endif
#define MAX_ROWS 8 /* mux_linear_lora's rows (a decode step of a few sequences) */

/* 16 weights of one input feature as two vectors: floats, or bf16 (the top half of a float: a shift widens it) */
INLINE void weights(const void *p, int64_t k, const int half, vf *w0, vf *w1)
{
    if (half) {
        typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));
        typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
        vh h0, h1;
        memcpy(&h0, (const uint16_t *)p + k * PANEL, sizeof h0);
        memcpy(&h1, (const uint16_t *)p + k * PANEL + W, sizeof h1);
        const vu u0 = __builtin_convertvector(h0, vu) << 16, u1 = __builtin_convertvector(h1, vu) << 16;
        memcpy(w0, &u0, sizeof *w0);
        memcpy(w1, &u1, sizeof *w1);
    } else {
        *w0 = load((const float *)p + k * PANEL);
        *w1 = load((const float *)p + k * PANEL + W);
    }
}

/* y[q, 0..cols) = x_q . panel (+ bias) for the M rows x_q = x + q xs, y_q = y + q ys; cols <= PANEL are stored.
 * Input feature k prefetches pf + k * step (bytes). `half`: the panel holds bf16 weights (sums in float). */
INLINE void panel_rows(const float *x, int64_t xs, float *y, int64_t ys, const void *restrict p, int64_t in,
                       int64_t cols, const float *bias, const char *pf, int64_t step, const int M, const int half)
{
    vf s[RB][2];
    for (int q = 0; q < M; q++) s[q][0] = s[q][1] = (vf){0};
    for (int64_t k = 0; k < in; k++) {
        __builtin_prefetch(pf + k * step, 0, 0);
        vf w0, w1;
        weights(p, k, half, &w0, &w1);
#pragma GCC unroll 8
        for (int q = 0; q < M; q++) {
            const float xv = x[q * xs + k];
            s[q][0] += xv * w0;
            s[q][1] += xv * w1;
        }
    }
    for (int q = 0; q < M; q++) {
        float out[PANEL];
        store(out, s[q][0]);
        store(out + W, s[q][1]);
        if (bias)
            for (int64_t c = 0; c < cols; c++) out[c] += bias[c];
        memcpy(y + q * ys, out, (size_t)cols * sizeof(float));
    }
}

#define ROWS_CASE(n, h) case n: panel_rows(x, xs, y, ys, p, in, cols, bias, pf, step, n, h); break;
#if RB == 8
#define ALL_ROWS(h) ROWS_CASE(8, h) ROWS_CASE(7, h) ROWS_CASE(6, h) ROWS_CASE(5, h) ROWS_CASE(4, h) \
    ROWS_CASE(3, h) ROWS_CASE(2, h)
#else
#define ALL_ROWS(h) ROWS_CASE(6, h) ROWS_CASE(5, h) ROWS_CASE(4, h) ROWS_CASE(3, h) ROWS_CASE(2, h)
#endif

/* panel_rows for m <= RB rows, m and half made constants for each inlined copy */
static void panel_any(const float *x, int64_t xs, float *y, int64_t ys, const void *p, int64_t in, int64_t cols,
                      const float *bias, const char *pf, int64_t step, int64_t m, int half)
{
    if (half)
        switch (m) {
            ALL_ROWS(1)
        default: panel_rows(x, xs, y, ys, p, in, cols, bias, pf, step, 1, 1);
        }
    else
        switch (m) {
            ALL_ROWS(0)
        default: panel_rows(x, xs, y, ys, p, in, cols, bias, pf, step, 1, 0);
        }
}

/* Rows r0..r1 of y over panels i0..i1 (output features 16 i0 .. min(16 i1, out)); `half`: bf16 panels. */
static void panels(const float *x, int64_t xs, float *y, int64_t ys, const void *p, const float *bias, int64_t r0,
                   int64_t r1, int64_t in, int64_t out, int64_t i0, int64_t i1, int half)
{
    const int64_t passes = (r1 - r0 + RB - 1) / RB, bytes = in * PANEL * (half ? 2 : 4); /* a panel's bytes */
    for (int64_t i = i0; i < i1; i++) {
        const int64_t j = i * PANEL, cols = out - j < PANEL ? out - j : PANEL;
        const char *panel = (const char *)p + i * bytes;
        for (int64_t q = 0; q < passes; q++) { /* pass q prefetches PF ahead, or the q-th share of the next panel */
            const int64_t r = r0 + q * RB;
            const char *pf = passes == 1 ? panel + PF * (int64_t)sizeof(float) : panel + bytes + q * bytes / passes;
            panel_any(x + r * xs, xs, y + r * ys + j, ys, panel, in, cols, bias ? bias + j : NULL, pf,
                      PANEL * (half ? 2 : 4) / passes, r1 - r < RB ? r1 - r : RB, half);
        }
    }
}

static void linear(const float *x, int64_t xs, float *y, int64_t ys, const void *restrict p, const float *bias,
                   int64_t m, int64_t in, int64_t out, int half)
{
    const int64_t chunks = (m + RC - 1) / RC, np = (out + PANEL - 1) / PANEL;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t c = 0; c < chunks; c++)
        for (int64_t i = 0; i < np; i++)
            panels(x, xs, y, ys, p, bias, c * RC, (c + 1) * RC < m ? (c + 1) * RC : m, in, out, i, i + 1, half);
}

/* x [m, in] rows of stride xs, y [m, out] rows of stride ys (unit column strides), p the packed weights, bias [out] or
 * NULL. Work items (RC rows, one panel) are shared out over the thread team. */
void mux_linear(const float *x, int64_t xs, float *y, int64_t ys, const float *restrict p, const float *bias,
                int64_t m, int64_t in, int64_t out)
{
    linear(x, xs, y, ys, p, bias, m, in, out, 0);
}

/* mux_linear over bf16 panels (uint16 [ceil(out/16), in, 16]): half the bytes, the same float sums of the weights'
 * float values */
void mux_linear_bf16(const float *x, int64_t xs, float *y, int64_t ys, const uint16_t *restrict p, const float *bias,
                     int64_t m, int64_t in, int64_t out)
{
    linear(x, xs, y, ys, p, bias, m, in, out, 1);
}

/* mux_linear followed by mux_lora_add in one call, for a decode step of m <= MAX_ROWS sequences with adapters: y =
 * x Wᵀ (+ bias), then each row q with an adapter (row_slot[q] >= 0) adds (x_q A_slotᵀ) B_slot at rank row_rank[q];
 * the pools a [P, in] and b [P, out] and their table [S, R] as in mux_lora_add. One parallel region instead of two calls: the team shares out each
 * row's shrink by groups of four ranks, each thread writes its range of panels, then (after a barrier, the shrink
 * done) adds the rows' deltas to that range while it is still in cache. The linear is mux_linear's sums; the shrink
 * and the expand are lora.c's, on the same groups of ranks and vector lanes. */
static void linear_lora(const float *x, int64_t xs, float *y, int64_t ys, const void *restrict p, const float *bias,
                        int64_t m, int64_t in, int64_t out, const float *a, const float *b, const int64_t *table,
                        int64_t R, const int64_t *row_slot, const int64_t *row_rank, int half)
{
    const float *xr[MAX_ROWS], *A[MAX_ROWS][R], *B[MAX_ROWS][R]; /* row q's rank-k rows of its slot's A and B */
    float h[MAX_ROWS * R]; /* row q's x_q A_slotᵀ at h[q * R] */
    for (int q = 0; q < m; q++) {
        xr[q] = x + q * xs;
        for (int64_t k = 0; row_slot[q] >= 0 && k < row_rank[q]; k++) {
            const int64_t at = table[row_slot[q] * R + k];
            A[q][k] = a + at * in, B[q][k] = b + at * out;
        }
    }
#pragma omp parallel
    {
        const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
        for (int q = 0; q < m; q++) {
            const int64_t r = row_rank[q], share = ((r + 3) / 4 + team - 1) / team * 4;
            const int64_t k0 = t * share, k1 = k0 + share < r ? k0 + share : r;
            if (row_slot[q] >= 0 && k0 < k1)
                shrink(xr + q, A[q] + k0, in, k1 - k0, h + q * R + k0, 1);
        }
        const int64_t np = (out + PANEL - 1) / PANEL, i0 = t * np / team, i1 = (t + 1) * np / team;
        const int64_t j0 = i0 * PANEL, j1 = i1 * PANEL < out ? i1 * PANEL : out; /* this thread's outputs */
        panels(x, xs, y, ys, p, bias, 0, m, in, out, i0, i1, half);
#pragma omp barrier
        for (int q = 0; q < m; q++)
            if (row_slot[q] >= 0 && j0 < j1) {
                float *yq = y + q * ys + j0;
                expand(&yq, B[q], j0, j1 - j0, row_rank[q], h + q * R, 1);
            }
    }
}

void mux_linear_lora(const float *x, int64_t xs, float *y, int64_t ys, const float *restrict p, const float *bias,
                     int64_t m, int64_t in, int64_t out, const float *a, const float *b, const int64_t *table,
                     int64_t R, const int64_t *row_slot, const int64_t *row_rank)
{
    linear_lora(x, xs, y, ys, p, bias, m, in, out, a, b, table, R, row_slot, row_rank, 0);
}

/* mux_linear_lora over bf16 panels (the LoRA weights stay float) */
void mux_linear_lora_bf16(const float *x, int64_t xs, float *y, int64_t ys, const uint16_t *restrict p,
                          const float *bias, int64_t m, int64_t in, int64_t out, const float *a, const float *b,
                          const int64_t *table, int64_t R, const int64_t *row_slot, const int64_t *row_rank)
{
    linear_lora(x, xs, y, ys, p, bias, m, in, out, a, b, table, R, row_slot, row_rank, 1);
}
