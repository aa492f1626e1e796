/* The LoRA shrink and expand, shared by the multi-LoRA kernel (lora.c) and the fused few-row linear (linear.c), so both
 * compute the same sums in the same order. */
#pragma once
#include "simd.h"

#define ROWS 4 /* rows of an item served per pass over its slot's weights */
#define INLINE static inline __attribute__((always_inline))

/* Rank k's rows of A and B are wherever the pool's page table puts them: A[k] and B[k] point at them. */

/* h[i * r + k] = x_i . A[k] for the n rows x_i and every rank k < r, four ranks at a time: each vector of A is
 * loaded once for the n rows, each vector of x once for four ranks. (n is a constant once inlined, so the
 * n x 4 sums live in registers.) Each sum runs in the same order whatever n is. */
INLINE void shrink(const float *const *x, const float *const *A, int64_t in, int64_t r, float *restrict h, int n)
{
    const int64_t nv = in / W * W;
    int64_t k = 0;
    for (; k + 4 <= r; k += 4) {
        vf s[ROWS][4] = {{{0}}};
        for (int64_t j = 0; j < nv; j += W) {
            vf a[4];
            for (int q = 0; q < 4; q++) a[q] = load(A[k + q] + j);
            for (int i = 0; i < n; i++) {
                const vf xv = load(x[i] + j);
                for (int q = 0; q < 4; q++) s[i][q] += xv * a[q];
            }
        }
        for (int i = 0; i < n; i++)
            for (int q = 0; q < 4; q++) {
                float t = hsum(s[i][q]);
                for (int64_t j = nv; j < in; j++) t += x[i][j] * A[k + q][j];
                h[i * r + k + q] = t;
            }
    }
    for (; k < r; k++)
        for (int i = 0; i < n; i++) h[i * r + k] = dot(x[i], A[k], in);
}

#define PASS 4 /* ranks per pass of the expand over y */
/* y_i += sum_k h[i * r + k] B[k][c0 ..] for the n rows (`out` columns of B's rows from c0), PASS ranks per pass over y:
 * PASS streams of B read at a time (all r
 * at once ran 1.2x slower at rank 32: more streams than the prefetchers follow), each vector of B loaded once for
 * the n rows. Each sum runs in the order of k, as one row at a time. */
INLINE void expand(float *const *y, const float *const *B, int64_t c0, int64_t out, int64_t r, const float *restrict h,
                   int n)
{
    const int64_t nv = out / W * W;
    for (int64_t k = 0; k < r; k += PASS) {
        const int64_t m = r - k < PASS ? r - k : PASS; /* ranks this pass */
        if (m == PASS) {
            for (int64_t j = 0; j < nv; j += W) {
                vf v[PASS];
                for (int q = 0; q < PASS; q++) v[q] = load(B[k + q] + c0 + j);
                for (int i = 0; i < n; i++) {
                    vf acc = load(y[i] + j);
                    for (int q = 0; q < PASS; q++) acc += h[i * r + k + q] * v[q];
                    store(y[i] + j, acc);
                }
            }
        } else {
            for (int64_t j = 0; j < nv; j += W)
                for (int i = 0; i < n; i++) {
                    vf acc = load(y[i] + j);
                    for (int64_t q = 0; q < m; q++) acc += h[i * r + k + q] * load(B[k + q] + c0 + j);
                    store(y[i] + j, acc);
                }
        }
        for (int64_t j = nv; j < out; j++)
            for (int i = 0; i < n; i++) {
                float acc = y[i][j];
                for (int64_t q = 0; q < m; q++) acc += h[i * r + k + q] * B[k + q][c0 + j];
                y[i][j] = acc;
            }
    }
}
