/* Decode attention over the paged KV cache: one query token per sequence, each sequence's own blocks read in place.
 *
 * Built by mux/native.py, called from mux/engine/kv_cache.py's decode path. One work item per sequence (per KV head
 * when there are only a few sequences, so both cores work): its cached K and V rows are read straight from their
 * blocks, all KV heads of a row at once (contiguous); no gathered copy of the context, no per-(sequence, head)
 * library call. `python -m bench.attention`: 2.0x the SDPA path for 64 SmolLM2 sequences.
 */
#include <math.h>
#include <stdlib.h>

#include "simd.h"

/* K rows are requested this many positions ahead, V rows as their K is scored (both prefetched, all lines of the
 * item's KV heads): the rows of a sequence are scattered over its blocks and each is read once, between dot
 * products, so the hardware prefetcher alone left the kernel waiting on DRAM. 64 SmolLM2 sequences of 40-100
 * cached tokens, 30 layers' caches, 2026-12-04: the kernel alone 558 -> 389 us per layer (205 with one layer's
 * cache in L3); 2, 8 and 16 rows ahead read 404, 464, 469 (ad hoc, one run each). `python -m bench.attention`,
 * old and new one after the other: 628 -> 538 us per layer with the step's K/V writes. Scoring the query heads
 * of a KV head together (K loaded once for them) was slower: 235-272 us in L3. */
#define AHEAD 4

static inline void prefetch(const float *row, int64_t lo, int64_t hi)
{
    for (int64_t l = lo; l < hi; l += 64 / sizeof(float)) __builtin_prefetch(row + l);
}

/* s[p] = e^(s[p] - max) / sum over p < n */
static void softmax(float *s, int64_t n)
{
    float m = -INFINITY, sum = 0.f;
    for (int64_t p = 0; p < n; p++) m = s[p] > m ? s[p] : m;
    const int64_t nv = n / W * W;
    vf acc = {0};
    for (int64_t p = 0; p < nv; p += W) {
        const vf e = vexp(load(s + p) - m);
        store(s + p, e);
        acc += e;
    }
    sum = hsum(acc);
    for (int64_t p = nv; p < n; p++) sum += (s[p] = expf(s[p] - m));
    const float inv = 1.f / sum;
    for (int64_t p = 0; p < n; p++) s[p] *= inv;
}

/* o[0, D) = sum_p w[p] V_p, where V_p = v + rows[p] * D; eight vectors of o stay in registers per pass */
static void weighted_sum(float *restrict o, const float *restrict w, const float *restrict v, const int64_t *rows,
                         int64_t n, int64_t D)
{
    int64_t j0 = 0;
    for (; j0 + 8 * W <= D; j0 += 8 * W) {
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
        for (int64_t p = 0; p < n; p++) {
            const float *vp = v + rows[p] * D + j0;
            const float wp = w[p];
            a0 += wp * load(vp), a1 += wp * load(vp + W), a2 += wp * load(vp + 2 * W), a3 += wp * load(vp + 3 * W);
            a4 += wp * load(vp + 4 * W), a5 += wp * load(vp + 5 * W), a6 += wp * load(vp + 6 * W);
            a7 += wp * load(vp + 7 * W);
        }
        store(o + j0, a0), store(o + j0 + W, a1), store(o + j0 + 2 * W, a2), store(o + j0 + 3 * W, a3);
        store(o + j0 + 4 * W, a4), store(o + j0 + 5 * W, a5), store(o + j0 + 6 * W, a6), store(o + j0 + 7 * W, a7);
    }
    for (int64_t j = j0; j < D; j++) {
        float a = 0.f;
        for (int64_t p = 0; p < n; p++) a += w[p] * v[rows[p] * D + j];
        o[j] = a;
    }
}

/* q: row b, head h at q + b*qs_b + h*qs_h (unit stride in D). k, v: this layer's cache [rows, Hkv, D] contiguous.
 * tables [B, nb]: block ids; lens[b]: cached positions of sequence b (its new token included).
 * out [B, H, D] contiguous. Query head h reads KV head h / (H / Hkv). Returns 0, or -1 if out of memory. */
int mux_decode_attention(const float *restrict q, int64_t qs_b, int64_t qs_h, const float *restrict k,
                         const float *restrict v, const int64_t *tables, int64_t nb, const int64_t *lens,
                         int64_t bs, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale, float *restrict out)
{
    const int64_t G = H / Hkv, split = B < 4 ? Hkv : 1; /* few sequences: one item per KV head, for both cores */
    int failed = 0;
#pragma omp parallel
    {
        float *scores = NULL; /* the item's [heads, n] scores, then its [n] cache rows; grown as needed */
        int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * split; item++) {
            const int64_t b = item / split, c = item % split, n = lens[b];
            const int64_t h0 = c * Hkv / split * G, h1 = (c + 1) * Hkv / split * G, nh = h1 - h0;
            if ((nh + 2) * n > cap) {
                float *grown = realloc(scores, (size_t)((nh + 2) * n) * sizeof(float));
                if (grown == NULL) {
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
                scores = grown, cap = (nh + 2) * n;
            }
            int64_t *rows = (int64_t *)(scores + nh * n); /* 2n floats hold n int64 */
            const int64_t *table = tables + b * nb;
            for (int64_t p = 0; p < n; p++) rows[p] = (table[p / bs] * bs + p % bs) * Hkv;
            const int64_t lo = h0 / G * D, hi = (h1 - 1) / G * D + D; /* the floats of a row this item reads */
            for (int64_t p = 0; p < AHEAD && p < n; p++) prefetch(k + rows[p] * D, lo, hi);
            const float *qb = q + b * qs_b;
            for (int64_t p = 0; p < n; p++) {
                const float *kp = k + rows[p] * D; /* the row's KV heads, contiguous */
                if (p + AHEAD < n) prefetch(k + rows[p + AHEAD] * D, lo, hi);
                prefetch(v + rows[p] * D, lo, hi);
                for (int64_t h = h0; h < h1; h++)
                    scores[(h - h0) * n + p] = dot(qb + h * qs_h, kp + h / G * D, D) * scale;
            }
            for (int64_t h = h0; h < h1; h++) {
                float *s = scores + (h - h0) * n;
                softmax(s, n);
                weighted_sum(out + (b * H + h) * D, s, v + h / G * D, rows, n, D);
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
