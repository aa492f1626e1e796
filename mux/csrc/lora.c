/* The CPU multi-LoRA kernel: y[row] += (x[row] . A_slot^T) . B_slot for the rows of every work item.
 *
 * Built by mux/native.py, called from mux/lora/ops.py. Rows read their slot's A [r, in] and B [r, out] in place (rank
 * k's rows in the pool where the slot's page table row puts them), four
 * rows per pass (from cache after the item's first pass) at the slot's own rank, so a decode step reads every adapter
 * it uses once, with no gather, padding or scatter: torch's batched matmuls on the same rows run far from the memory
 * bandwidth that reading the weights needs (`python -m bench.lora_kernel`). OpenMP is the libgomp torch already
 * loaded: one thread team for both.
 */
#include "lora.h"

INLINE void serve(const float *const *x, float *const *y, const float *const *A, const float *const *B, int64_t in,
                  int64_t out, int64_t r, float *h, int n)
{
    shrink(x, A, in, r, h, n);
    expand(y, B, 0, out, r, h, n);
}

/* x [T, in] and y [T, out]: rows of stride xs, ys (unit column stride); the pools a [P, in], b [P, out] contiguous;
 * table [S, R]: the pool row of each slot's rank k. Item i: slot[i], rank[i] <= R, rows[off[i] .. off[i+1]). Items
 * never share a row, so they run in parallel.
 * An item's rows go ROWS at a time: a decode step's few rows of one adapter read its weights once from cache,
 * not once per row (`python -m bench.lora_kernel`, the rank rows). */
void mux_lora_add(const float *restrict x, int64_t xs, float *restrict y, int64_t ys, const float *restrict a,
                  const float *restrict b, const int64_t *table, int64_t R, int64_t in, int64_t out, const int64_t *slot,
                  const int64_t *rank, const int64_t *off, const int64_t *rows, int64_t items)
{
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; i++) {
        const int64_t r = rank[i];
        const int64_t *at = table + slot[i] * R;
        const float *A[R], *B[R];
        for (int64_t k = 0; k < r; k++) A[k] = a + at[k] * in, B[k] = b + at[k] * out;
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
