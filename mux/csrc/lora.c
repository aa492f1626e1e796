/* The CPU multi-LoRA kernel: y[row] += (x[row] . A_slot^T) . B_slot for the rows of every work item.
 *
 * Built by mux/native.py, called from mux/lora/ops.py. Rows read their slot's A [r, in] and B [r, out] in place, four
 * rows per pass (from cache after the item's first pass) at the slot's own rank, so a decode step reads every adapter
 * it uses once, with no gather, padding or scatter: torch's batched matmuls on the same rows run far from the memory
 * bandwidth that reading the weights needs (`python -m bench.lora_kernel`). OpenMP is the libgomp torch already
 * loaded: one thread team for both.
 */
#include "simd.h"

#define ROWS 4 /* rows of an item served per pass over its slot's weights */
#define INLINE static inline __attribute__((always_inline))

/* h[i * r + k] = x_i . A_k for the n rows x_i and every rank k < r, four ranks at a time: each vector of A is
 * loaded once for the n rows, each vector of x once for four ranks. (n is a constant once inlined, so the
 * n x 4 sums live in registers.) Each sum runs in the same order whatever n is. */
INLINE void shrink(const float *const *x, const float *restrict A, int64_t in, int64_t r, float *restrict h, int n)
{
    const int64_t nv = in / W * W;
    int64_t k = 0;
    for (; k + 4 <= r; k += 4) {
        vf s[ROWS][4] = {{{0}}};
        for (int64_t j = 0; j < nv; j += W) {
            vf a[4];
            for (int q = 0; q < 4; q++) a[q] = load(A + (k + q) * in + j);
            for (int i = 0; i < n; i++) {
                const vf xv = load(x[i] + j);
                for (int q = 0; q < 4; q++) s[i][q] += xv * a[q];
            }
        }
        for (int i = 0; i < n; i++)
            for (int q = 0; q < 4; q++) {
                float t = hsum(s[i][q]);
                for (int64_t j = nv; j < in; j++) t += x[i][j] * A[(k + q) * in + j];
                h[i * r + k + q] = t;
            }
    }
    for (; k < r; k++)
        for (int i = 0; i < n; i++) h[i * r + k] = dot(x[i], A + k * in, in);
}

#define PASS 4 /* ranks per pass of the expand over y */
/* y_i += sum_k h[i * r + k] B_k for the n rows, PASS ranks per pass over y: PASS streams of B read at a time (all r
 * at once ran 1.2x slower at rank 32: more streams than the prefetchers follow), each vector of B loaded once for
 * the n rows. Each sum runs in the order of k, as one row at a time. */
INLINE void expand(float *const *y, const float *restrict B, int64_t out, int64_t r, const float *restrict h, int n)
{
    const int64_t nv = out / W * W;
    for (int64_t k = 0; k < r; k += PASS) {
        const int64_t m = r - k < PASS ? r - k : PASS; /* ranks this pass */
        if (m == PASS) {
            for (int64_t j = 0; j < nv; j += W) {
                vf v[PASS];
                for (int q = 0; q < PASS; q++) v[q] = load(B + (k + q) * out + j);
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
                    for (int64_t q = 0; q < m; q++) acc += h[i * r + k + q] * load(B + (k + q) * out + j);
                    store(y[i] + j, acc);
                }
        }
        for (int64_t j = nv; j < out; j++)
            for (int i = 0; i < n; i++) {
                float acc = y[i][j];
                for (int64_t q = 0; q < m; q++) acc += h[i * r + k + q] * B[(k + q) * out + j];
                y[i][j] = acc;
            }
    }
}

INLINE void serve(const float *const *x, float *const *y, const float *A, const float *B, int64_t in, int64_t out,
                  int64_t r, float *h, int n)
{
    shrink(x, A, in, r, h, n);
    expand(y, B, out, r, h, n);
}

/* x [T, in] and y [T, out]: rows of stride xs, ys (unit column stride); a [S, R, in], b [S, R, out] contiguous.
 * Item i: slot[i], rank[i] <= R, rows[off[i] .. off[i+1]). Items never share a row, so they run in parallel.
 * An item's rows go ROWS at a time: a decode step's few rows of one adapter read its weights once from cache,
 * not once per row (`python -m bench.lora_kernel`, the rank rows). */
void mux_lora_add(const float *restrict x, int64_t xs, float *restrict y, int64_t ys, const float *restrict a,
                  const float *restrict b, int64_t R, int64_t in, int64_t out, const int64_t *slot,
                  const int64_t *rank, const int64_t *off, const int64_t *rows, int64_t items)
{
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; i++) {
        const int64_t r = rank[i];
        const float *A = a + slot[i] * R * in, *B = b + slot[i] * R * out;
        float h[ROWS * R];
        for (int64_t t = off[i]; t < off[i + 1]; t += ROWS) {
            const int n = off[i + 1] - t < ROWS ? (int)(off[i + 1] - t) : ROWS;
            const float *xr[ROWS];
            float *yr[ROWS];
            for (int q = 0; q < n; q++) xr[q] = x + rows[t + q] * xs, yr[q] = y + rows[t + q] * ys;
            switch (n) { /* a constant n for each copy, so the compiler unrolls the rows */
            case 4: serve(xr, yr, A, B, in, out, r, h, 4); break;
            case 3: serve(xr, yr, A, B, in, out, r, h, 3); break;
            case 2: serve(xr, yr, A, B, in, out, r, h, 2); break;
            default: serve(xr, yr, A, B, in, out, r, h, 1);
            }
        }
    }
}

/* A slot load: copy piece i, nbytes[i] long, from src + src_off[i] to dst[i], the pieces shared out over the thread
 * team (one small memcpy a module on one thread ran at a third of one large copy's speed). */
void mux_copy_pieces(char *const *dst, const char *src, const int64_t *src_off, const int64_t *nbytes, int64_t n)
{
#pragma omp parallel for schedule(dynamic, 8)
    for (int64_t i = 0; i < n; i++) memcpy(dst[i], src + src_off[i], (size_t)nbytes[i]);
}
