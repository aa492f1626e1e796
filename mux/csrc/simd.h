/* Vector helpers shared by the CPU kernels: GCC vector extensions, W floats per vector (AVX2 with -march=native,
 * emulated where the CPU has no such vectors). Unaligned loads and stores go through memcpy. */
#pragma once
#include <stdint.h>
#include <string.h>

#define W 8
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* lanes of a where m is set, of b elsewhere (m from a vector comparison: all ones or zero) */
static inline vf vselect(vi m, vf a, vf b)
{
    vi ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    ai = (ai & m) | (bi & ~m);
    memcpy(&a, &ai, sizeof a);
    return a;
}

typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

/* ((t0 + t4) + (t1 + t5)) + ((t2 + t6) + (t3 + t7)): the halves added as vectors, then four lanes */
static inline float hsum(vf v)
{
    vf4 lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    lo += hi;
    return (lo[0] + lo[1]) + (lo[2] + lo[3]);
}

/* a . b over n floats */
static inline float dot(const float *restrict a, const float *restrict b, int64_t n)
{
    const int64_t nv = n / W * W;
    vf s0 = {0}, s1 = {0};
    int64_t j = 0;
    for (; j + 2 * W <= nv; j += 2 * W) {
        s0 += load(a + j) * load(b + j);
        s1 += load(a + j + W) * load(b + j + W);
    }
    for (; j < nv; j += W) s0 += load(a + j) * load(b + j);
    float t = hsum(s0 + s1);
    for (; j < n; j++) t += a[j] * b[j];
    return t;
}

/* e^x for x <= 0 (softmax after subtracting the max), W lanes at once: 2^k * p(r) with x = k ln2 + r,
 * |r| <= ln2/2, p the Cephes expf polynomial (relative error < 2e-7). x is clamped at -87 (e^-87 ~ 1.6e-38). */
static inline vf vexp(vf x)
{
    x = vselect(x < -87.f, (vf){0} - 87.f, x);
    const vi ki = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi); /* round to nearest, x <= 0 */
    const vf k = __builtin_convertvector(ki, vf);
    const vf r = x - k * 0.693359375f + k * 2.12194440e-4f;
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const vi bits = (ki + 127) << 23;
    vf scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

