/* The CPU linear layer, y = x Wᵀ (+ bias), over weights packed once in panels of 16 output features: [ceil(out/16),
 * in, 16], panel i holding features 16i..16i+15, each input feature's 16 weights side by side (zeros past `out`), as
 * fp32, bf16, int8 with a scale per output feature, or int4 with a scale and a minimum per output feature and group of
 * input features (mux/model/quant.py): each weight is widened to a float in registers, the sums are floats.
 *
 * For a few rows a linear is a stream over its weights; for many it is arithmetic. A panel serves both: RB rows at a
 * time keep their 16 sums each in registers over the whole input (per input feature: two vector loads of the panel,
 * a broadcast of each row's x, two FMAs a row), so the panel streams from memory once for RB rows and from cache for
 * the next RB, and the weights are one forward stream per thread, prefetched in software: PF_BYTES ahead when one
 * pass covers the rows (without it the stream ran at half the memory's speed once the rows' arithmetic was beside
 * it), else each pass over a panel fetches its share of the next panel, so the memory works during the passes
 * from cache too (1.05-1.25x at 8-256 rows, ad hoc). `python -m bench.small_linear` times it beside oneDNN's
 * prepacked GEMM; the picks (mux/model/linear_picks.py) choose between them on each machine.
 *
 * Each output is one sum over the input features in order, on one thread: a row's result does not depend on the
 * other rows of the call or on the thread count. */
#include <omp.h>

#include "lora.h"

#define PANEL 16    /* output features per panel: two vectors */
#define PF_BYTES 16384 /* software prefetch distance (256 fp32 panel rows) for one pass over a panel */
#define RC 64       /* rows per work item (with the panel, what one thread computes) */
#if defined(__AVX512VL__)
#define RB 8 /* rows per pass over a panel: 2 RB sums + 3 in the 32 vector registers */
#else
#define RB 6 /* 16 registers */
#endif
#define MAX_ROWS 8 /* mux_linear_lora's rows (a decode step of a few sequences) */

/* The weights' formats: a panel holds, for each input feature, its 16 output features' weights side by side as */
enum { FP32, BF16, INT8, INT4 };
static const int BYTES_X2[] = {8, 4, 2, 1}; /* twice the bytes of one weight of each format */

/* The packed weights of one linear (mux/model/cpu.py builds it beside the tensors it points into). */
typedef struct {
    const void *data;   /* [ceil(out/16), in, 16] weights; INT4: 8 bytes per input feature, byte j holding output
                           features j (low nibble) and j + 8 (high) */
    const void *scales; /* INT8: float [ceil(out/16) * 16], w = q s; INT4: _Float16 [ceil(out/16), in / group, 2, 16]
                           (scale d, then minimum m of each group), w = q d + m; else NULL */
    int64_t format;
    int64_t group; /* INT4: input features per scale (divides `in`); else `in` */
} mux_weights;

/* 8 int8 or uint8 values widened to int32 lanes, 8 fp16 ones to floats: single instructions on AVX2 / F16C (GCC's
 * generic vector conversions of these widths go element by element) */
#if defined(__AVX2__)
#include <immintrin.h>
INLINE vi widen_i8(const void *p) { return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
INLINE vi widen_u8(const void *p) { return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
#else
INLINE vi widen_i8(const void *p)
{
    typedef int8_t vc __attribute__((vector_size(W)));
    vc c;
    memcpy(&c, p, sizeof c);
    return __builtin_convertvector(c, vi);
}
INLINE vi widen_u8(const void *p)
{
    typedef uint8_t vb __attribute__((vector_size(W)));
    vb b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vi);
}
#endif
#if defined(__F16C__)
INLINE vf widen_f16(const void *p) { return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#else
INLINE vf widen_f16(const void *p)
{
    typedef _Float16 vf16 __attribute__((vector_size(W * sizeof(_Float16))));
    vf16 h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vf);
}
#endif

/* 16 weights of input feature k of a panel as two vectors. sc: INT8 the panel's 16 scales; INT4 this group's d and
 * m as four vectors (d0 d1 m0 m1). */
INLINE void weights(const void *p, int64_t k, const int fmt, const vf *sc, vf *w0, vf *w1)
{
    typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));
    typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
    if (fmt == BF16) { /* the top half of a float: a shift widens it */
        vh h0, h1;
        memcpy(&h0, (const uint16_t *)p + k * PANEL, sizeof h0);
        memcpy(&h1, (const uint16_t *)p + k * PANEL + W, sizeof h1);
        const vu u0 = __builtin_convertvector(h0, vu) << 16, u1 = __builtin_convertvector(h1, vu) << 16;
        memcpy(w0, &u0, sizeof *w0);
        memcpy(w1, &u1, sizeof *w1);
    } else if (fmt == INT8) {
        *w0 = __builtin_convertvector(widen_i8((const int8_t *)p + k * PANEL), vf) * sc[0];
        *w1 = __builtin_convertvector(widen_i8((const int8_t *)p + k * PANEL + W), vf) * sc[1];
    } else if (fmt == INT4) {
        const vi u = widen_u8((const uint8_t *)p + k * (PANEL / 2));
        *w0 = __builtin_convertvector(u & 15, vf) * sc[0] + sc[2];
        *w1 = __builtin_convertvector(u >> 4, vf) * sc[1] + sc[3];
    } else {
        *w0 = load((const float *)p + k * PANEL);
        *w1 = load((const float *)p + k * PANEL + W);
    }
}

/* A panel's scales for input features from k on: INT8 its 16 scales, INT4 the d and m of k's group. */
INLINE void group_scales(const mux_weights *w, int64_t panel, int64_t in, int64_t k, const int fmt, vf *sc)
{
    if (fmt == INT8) {
        sc[0] = load((const float *)w->scales + panel * PANEL);
        sc[1] = load((const float *)w->scales + panel * PANEL + W);
    } else if (fmt == INT4) {
        const _Float16 *g = (const _Float16 *)w->scales + (panel * (in / w->group) + k / w->group) * 2 * PANEL;
        for (int v = 0; v < 4; v++) sc[v] = widen_f16(g + v * W);
    }
}

/* y[q, 0..cols) = x_q . panel (+ bias) for the M rows x_q = x + q xs, y_q = y + q ys; cols <= PANEL are stored.
 * Input feature k prefetches pf + k * step (bytes). M and fmt are constants in each inlined copy. */
INLINE void panel_rows(const float *x, int64_t xs, float *y, int64_t ys, const mux_weights *w, int64_t panel,
                       int64_t in, int64_t cols, const float *bias, const char *pf, int64_t step, const int M,
                       const int fmt)
{
    const void *restrict p = (const char *)w->data + panel * in * PANEL * BYTES_X2[fmt] / 2;
    const int64_t group = fmt == INT4 ? w->group : in;
    vf s[RB][2], sc[4];
    for (int q = 0; q < M; q++) s[q][0] = s[q][1] = (vf){0};
    for (int64_t k0 = 0; k0 < in; k0 += group) {
        group_scales(w, panel, in, k0, fmt, sc);
        for (int64_t k = k0; k < k0 + group; k++) {
            __builtin_prefetch(pf + k * step, 0, 0);
            vf w0, w1;
            weights(p, k, fmt, sc, &w0, &w1);
#pragma GCC unroll 8
            for (int q = 0; q < M; q++) {
                const float xv = x[q * xs + k];
                s[q][0] += xv * w0;
                s[q][1] += xv * w1;
            }
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

#define ROWS_CASE(n, f) case n: panel_rows(x, xs, y, ys, w, panel, in, cols, bias, pf, step, n, f); break;
#if RB == 8
#define ALL_ROWS(f) ROWS_CASE(8, f) ROWS_CASE(7, f) ROWS_CASE(6, f) ROWS_CASE(5, f) ROWS_CASE(4, f) \
    ROWS_CASE(3, f) ROWS_CASE(2, f) default: panel_rows(x, xs, y, ys, w, panel, in, cols, bias, pf, step, 1, f);
#else
#define ALL_ROWS(f) ROWS_CASE(6, f) ROWS_CASE(5, f) ROWS_CASE(4, f) ROWS_CASE(3, f) ROWS_CASE(2, f) \
    default: panel_rows(x, xs, y, ys, w, panel, in, cols, bias, pf, step, 1, f);
#endif

/* panel_rows for m <= RB rows, m and the format made constants for each inlined copy */
static void panel_any(const float *x, int64_t xs, float *y, int64_t ys, const mux_weights *w, int64_t panel,
                      int64_t in, int64_t cols, const float *bias, const char *pf, int64_t step, int64_t m)
{
    switch (w->format) {
    case BF16: switch (m) { ALL_ROWS(BF16) } break;
    case INT8: switch (m) { ALL_ROWS(INT8) } break;
    case INT4: switch (m) { ALL_ROWS(INT4) } break;
    default: switch (m) { ALL_ROWS(FP32) }
    }
}

/* panel_rows for one row over P consecutive panels from `panel` (each of PANEL columns, `out` bounding the last):
 * 2P independent sums where one panel has 2, which wait on the FMA's latency. Each output's sum is panel_rows' (the
 * same terms in the same order), so a row's result does not depend on how many rows its call had. */
INLINE void row_panels(const float *x, float *y, const mux_weights *w, int64_t panel, int64_t in, int64_t out,
                       const float *bias, const int P, const int fmt)
{
    const int64_t row = PANEL * BYTES_X2[fmt] / 2, group = fmt == INT4 ? w->group : in;
    const char *p = (const char *)w->data + panel * in * row;
    vf s[P][2], sc[P][4];
    for (int q = 0; q < P; q++) s[q][0] = s[q][1] = (vf){0};
    for (int64_t k0 = 0; k0 < in; k0 += group) {
        for (int q = 0; q < P; q++) group_scales(w, panel + q, in, k0, fmt, sc[q]);
        for (int64_t k = k0; k < k0 + group; k++) {
            const float xv = x[k];
#pragma GCC unroll 4
            for (int q = 0; q < P; q++) {
                __builtin_prefetch(p + q * in * row + k * row + PF_BYTES, 0, 0);
                vf w0, w1;
                weights(p + q * in * row, k, fmt, sc[q], &w0, &w1);
                s[q][0] += xv * w0;
                s[q][1] += xv * w1;
            }
        }
    }
    for (int q = 0; q < P; q++) {
        const int64_t j = (panel + q) * PANEL, cols = out - j < PANEL ? out - j : PANEL;
        float o[PANEL];
        store(o, s[q][0]);
        store(o + W, s[q][1]);
        if (bias)
            for (int64_t c = 0; c < cols; c++) o[c] += bias[j + c];
        memcpy(y + j, o, (size_t)cols * sizeof(float));
    }
}

#define ROW_PANELS 4 /* panels a one-row pass covers */

static void row_panels_any(const float *x, float *y, const mux_weights *w, int64_t panel, int64_t in, int64_t out,
                           const float *bias)
{
    switch (w->format) {
    case BF16: row_panels(x, y, w, panel, in, out, bias, ROW_PANELS, BF16); break;
    case INT8: row_panels(x, y, w, panel, in, out, bias, ROW_PANELS, INT8); break;
    case INT4: row_panels(x, y, w, panel, in, out, bias, ROW_PANELS, INT4); break;
    default: row_panels(x, y, w, panel, in, out, bias, ROW_PANELS, FP32);
    }
}

/* Rows r0..r1 of y over panels i0..i1 (output features 16 i0 .. min(16 i1, out)). One row goes ROW_PANELS panels
 * a pass: one panel's 2 sums would wait on the FMA's latency. (Not yet timed side by side with one panel a pass:
 * `python -m bench.small_linear` times the kernels, not the two layouts of the loop.) */
static void panels(const float *x, int64_t xs, float *y, int64_t ys, const mux_weights *w, const float *bias,
                   int64_t r0, int64_t r1, int64_t in, int64_t out, int64_t i0, int64_t i1)
{
    const int64_t passes = (r1 - r0 + RB - 1) / RB, row = PANEL * BYTES_X2[w->format] / 2; /* bytes per feature */
    if (r1 - r0 == 1)
        for (; i0 + ROW_PANELS <= i1; i0 += ROW_PANELS) row_panels_any(x + r0 * xs, y + r0 * ys, w, i0, in, out, bias);
    for (int64_t i = i0; i < i1; i++) {
        const int64_t j = i * PANEL, cols = out - j < PANEL ? out - j : PANEL;
        const char *panel = (const char *)w->data + i * in * row;
        for (int64_t q = 0; q < passes; q++) { /* pass q prefetches ahead, or the q-th share of the next panel */
            const int64_t r = r0 + q * RB;
            const char *pf = passes == 1 ? panel + PF_BYTES : panel + in * row + q * in * row / passes;
            panel_any(x + r * xs, xs, y + r * ys + j, ys, w, i, in, cols, bias ? bias + j : NULL, pf, row / passes,
                      r1 - r < RB ? r1 - r : RB);
        }
    }
}

/* x [m, in] rows of stride xs, y [m, out] rows of stride ys (unit column strides), w the packed weights, bias [out]
 * or NULL. Work items (RC rows, one panel; one row: ROW_PANELS panels where there are enough to share) are shared
 * out over the thread team. */
void mux_linear(const float *x, int64_t xs, float *y, int64_t ys, const mux_weights *w, const float *bias, int64_t m,
                int64_t in, int64_t out)
{
    const int64_t chunks = (m + RC - 1) / RC, np = (out + PANEL - 1) / PANEL;
    const int64_t span = m == 1 && np >= 4 * ROW_PANELS * omp_get_max_threads() ? ROW_PANELS : 1;
    const int64_t items = (np + span - 1) / span;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t c = 0; c < chunks; c++)
        for (int64_t i = 0; i < items; i++)
            panels(x, xs, y, ys, w, bias, c * RC, (c + 1) * RC < m ? (c + 1) * RC : m, in, out, i * span,
                   (i + 1) * span < np ? (i + 1) * span : np);
}

/* mux_linear followed by mux_lora_add in one call, for a decode step of m <= MAX_ROWS sequences with adapters: y =
 * x Wᵀ (+ bias), then each row q with an adapter (row_slot[q] >= 0) adds (x_q A_slotᵀ) B_slot at rank row_rank[q];
 * the pools a [P, in] and b [P, out] and their table [S, R] as in mux_lora_add. One parallel region instead of two
 * calls: the team shares out each row's shrink by groups of four ranks, each thread writes its range of panels,
 * then (after a barrier, the shrink done) adds the rows' deltas to that range while it is still in cache. The linear
 * is mux_linear's sums; the shrink and the expand are lora.c's, on the same groups of ranks and vector lanes. */
void mux_linear_lora(const float *x, int64_t xs, float *y, int64_t ys, const mux_weights *w, const float *bias,
                     int64_t m, int64_t in, int64_t out, const float *a, const float *b, const int64_t *table,
                     int64_t R, const int64_t *row_slot, const int64_t *row_rank)
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
        panels(x, xs, y, ys, w, bias, 0, m, in, out, i0, i1);
#pragma omp barrier
        for (int q = 0; q < m; q++)
            if (row_slot[q] >= 0 && j0 < j1) {
                float *yq = y + q * ys + j0;
                expand(&yq, B[q], j0, j1 - j0, row_rank[q], h + q * R, 1);
            }
    }
}
