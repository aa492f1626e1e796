/* The CPU multi-LoRA kernel: y[row] += (x[row] . A_slot^T) . B_slot for the rows of every work item.
 *
 * Built by mux/native.py, called from mux/lora/ops.py. Each row reads its slot's A [r, in] and B [r, out] in place
 * (from cache after the item's first row) at the slot's own rank, so a decode step reads every adapter it uses
 * once, with no gather, padding or scatter: torch's batched matmuls on the same rows run far from the memory
 * bandwidth that reading the weights needs (`python -m bench.lora_kernel`). OpenMP is the libgomp torch already
 * loaded: one thread team for both.
 */
#include "simd.h"

/* h[k] = x . A_k for k < r, four ranks at a time (x is read once per four ranks) */
static void shrink(const float *restrict x, const float *restrict A, int64_t in, int64_t r, float *restrict h)
{
    const int64_t nv = in / W * W;
    int64_t k = 0;
    for (; k + 4 <= r; k += 4) {
        const float *a0 = A + k * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
        vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int64_t j = 0; j < nv; j += W) {
            const vf xv = load(x + j);
            s0 += xv * load(a0 + j);
            s1 += xv * load(a1 + j);
            s2 += xv * load(a2 + j);
            s3 += xv * load(a3 + j);
        }
        float t0 = hsum(s0), t1 = hsum(s1), t2 = hsum(s2), t3 = hsum(s3);
        for (int64_t j = nv; j < in; j++) {
            t0 += x[j] * a0[j];
            t1 += x[j] * a1[j];
            t2 += x[j] * a2[j];
            t3 += x[j] * a3[j];
        }
        h[k] = t0, h[k + 1] = t1, h[k + 2] = t2, h[k + 3] = t3;
    }
    for (; k < r; k++) h[k] = dot(x, A + k * in, in);
}

/* y += sum_k h[k] B_k (each y vector loaded and stored once) */
static void expand(float *restrict y, const float *restrict B, int64_t out, int64_t r, const float *restrict h)
{
    const int64_t nv = out / W * W;
    for (int64_t j = 0; j < nv; j += W) {
        vf acc = load(y + j);
        for (int64_t k = 0; k < r; k++) acc += h[k] * load(B + k * out + j);
        store(y + j, acc);
    }
    for (int64_t j = nv; j < out; j++) {
        float acc = y[j];
        for (int64_t k = 0; k < r; k++) acc += h[k] * B[k * out + j];
        y[j] = acc;
    }
}

/* x [T, in] and y [T, out]: rows of stride xs, ys (unit column stride); a [S, R, in], b [S, R, out] contiguous.
 * Item i: slot[i], rank[i] <= R, rows[off[i] .. off[i+1]). Items never share a row, so they run in parallel. */
void mux_lora_add(const float *restrict x, int64_t xs, float *restrict y, int64_t ys, const float *restrict a,
                  const float *restrict b, int64_t R, int64_t in, int64_t out, const int64_t *slot,
                  const int64_t *rank, const int64_t *off, const int64_t *rows, int64_t items)
{
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; i++) {
        const int64_t r = rank[i];
        const float *A = a + slot[i] * R * in, *B = b + slot[i] * R * out;
        float h[R];
        for (int64_t t = off[i]; t < off[i + 1]; t++) {
            shrink(x + rows[t] * xs, A, in, r, h);
            expand(y + rows[t] * ys, B, out, r, h);
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
