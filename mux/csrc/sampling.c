/* The greedy token and the log-normaliser of every row of a step's logits (mux/engine/sampler.py).
 *
 * Built by mux/native.py. One row per work item: a vector max, a scan for its first index (torch.argmax's
 * tie rule), and a vector sum of e^(x - max); torch's argmax + logsumexp read and write the [B, V] logits
 * four times instead. A row holding a NaN gets lse = NaN, and the caller then uses torch's result.
 */
#include <math.h>

#include "simd.h"

/* x [rows, V] with row stride xs. argmax[i]: first index of row i's largest value; lse[i] = log sum_j e^x_ij */
void mux_argmax_logsumexp(const float *restrict x, int64_t rows, int64_t V, int64_t xs, int64_t *restrict argmax,
                          float *restrict lse)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *r = x + i * xs;
        const int64_t nv = V / W * W;
        vf mv = (vf){0} - INFINITY;
        vi nan = {0};
        for (int64_t j = 0; j < nv; j += W) {
            const vf v = load(r + j);
            mv = vselect(v > mv, v, mv);
            nan |= v != v;
        }
        float m = -INFINITY;
        int bad = 0;
        for (int k = 0; k < W; k++) {
            m = mv[k] > m ? mv[k] : m;
            bad |= nan[k];
        }
        for (int64_t j = nv; j < V; j++) {
            m = r[j] > m ? r[j] : m;
            bad |= r[j] != r[j];
        }
        if (bad || V == 0) {
            argmax[i] = -1, lse[i] = NAN;
            continue;
        }
        int64_t first = 0;
        while (r[first] != m) first++;
        vf acc = {0};
        for (int64_t j = 0; j < nv; j += W) acc += vexp(load(r + j) - m);
        float sum = hsum(acc);
        for (int64_t j = nv; j < V; j++) sum += expf(r[j] - m);
        argmax[i] = first, lse[i] = m + logf(sum);
    }
}
