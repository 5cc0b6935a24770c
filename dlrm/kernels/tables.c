/* Batched embedding tables on CPU (table_native.py): the pooled lookup, and the sparse optimizer
 * fused into backward (row-wise Adagrad, Adagrad, SGD), rows in fp32 or fp16.
 *
 * Layout (table_kernel.BatchedTables): a group's tables share one [rows, dim] weight tensor (and
 * state: [rows] row-wise Adagrad, [rows, dim] Adagrad). A batch's ids are key-major: bag
 * k = f * B + b (feature f, sample b) holds ids offsets[k] .. offsets[k + 1] - 1. Pooled rows and
 * their gradient are [B, F, dim] fp32, sample-major.
 *
 * Training: `tb_rows` makes each id a row of the group's tensor (checking it against its table)
 * and records where its bag's output is; `tb_forward` pools the bags; `tb_sort` groups the ids by
 * row (LSD radix sort); `tb_backward` sums each touched row's gradient over its ids and steps the
 * row in place, once, the way fbgemm's "exact" optimizers do. Each row is one thread's, so results
 * do not depend on the thread count.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef _Float16 half;

enum { SGD = 0, ROWWISE_ADAGRAD = 1, ADAGRAD = 2 };

/* The group's ids, from the batch's: for slot s (feature f = feats[s]) and sample b, bag
 * f * B + b of `offsets` becomes bag s * B + b of `goffsets` [nf * B + 1]; each of its ids i
 * becomes row indices[i] + base[s] of the group's tensor (rows [n]), with gpos (if not NULL) =
 * b * nf + s, its bag's slot in the pooled [B, nf], and wt (if not NULL) = its weight in the bag:
 * psw[i] (or 1), divided by the bag's length under mean pooling. Slots split over `threads`.
 * Returns 0, or -(i + 1) for the first id i (a position in `indices`) outside [0, limit[s]). */
int64_t tb_rows(const int64_t *indices, const int64_t *offsets, int64_t B, int64_t nf, const int64_t *feats,
                const int64_t *base, const int64_t *limit, const float *psw, int mean, int64_t *rows,
                int64_t *goffsets, int64_t *gpos, float *wt, int threads) {
    int64_t first_bad = INT64_MAX;
    goffsets[0] = 0;
    for (int64_t s = 0; s < nf; s++)  // where each slot's ids start: its feature's run of ids
        goffsets[(s + 1) * B] = goffsets[s * B] + offsets[(feats[s] + 1) * B] - offsets[feats[s] * B];
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(min : first_bad)
    for (int64_t s = 0; s < nf; s++) {
        const int64_t f = feats[s], add = base[s], lim = limit[s], shift = goffsets[s * B] - offsets[f * B];
        for (int64_t b = 0; b < B; b++) {
            const int64_t k = f * B + b, lo = offsets[k], hi = offsets[k + 1];
            for (int64_t i = lo; i < hi; i++) {
                const int64_t id = indices[i], n = i + shift;
                if (id < 0 || id >= lim) {
                    if (i < first_bad) first_bad = i;
                    break;
                }
                rows[n] = id + add;
                if (gpos) gpos[n] = b * nf + s;
                if (wt) wt[n] = (psw ? psw[i] : 1.0f) / (mean ? (float)(hi - lo) : 1.0f);
            }
            goffsets[s * B + b + 1] = hi + shift;
        }
    }
    return first_bad == INT64_MAX ? 0 : -(first_bad + 1);
}

static inline __attribute__((always_inline)) float load(const void *w, int fp16, int64_t i) {
    return fp16 ? (float)((const half *)w)[i] : ((const float *)w)[i];
}

/* One sample's F bags: out[f * dim + c] = sum of its ids' rows (times wt). Inlined with constant
 * fp16 and dim (16, the Criteo width) so the row loop unrolls into vector registers. */
static inline __attribute__((always_inline)) void pool_sample(const void *w, int fp16, int64_t dim,
                                                              const int64_t *rows, const int64_t *offsets,
                                                              const float *wt, int64_t F, int64_t B, int64_t b,
                                                              float *out) {
    for (int64_t f = 0; f < F; f++) {
        const int64_t k = f * B + b, lo = offsets[k], hi = offsets[k + 1];
        float *o = out + f * dim;
        for (int64_t c = 0; c < dim; c++) o[c] = 0.0f;
        for (int64_t i = lo; i < hi; i++) {
            const int64_t at = rows[i] * dim;
            const float s = wt ? wt[i] : 1.0f;
            for (int64_t c = 0; c < dim; c++) o[c] += load(w, fp16, at + c) * s;
        }
    }
}

/* out [B, F, dim] = the pooled bags. Samples split over `threads` OpenMP threads; the rows of a
 * sample a few ahead are prefetched (each id is a random row of a large table). */
void tb_forward(const void *w, int fp16, int64_t dim, const int64_t *rows, const int64_t *offsets, int64_t F,
                int64_t B, const float *wt, float *out, int threads) {
    const int64_t ahead = 4, line = fp16 ? dim * 2 : dim * 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        if (b + ahead < B)
            for (int64_t f = 0; f < F; f++) {
                const int64_t k = f * B + b + ahead;
                if (offsets[k] < offsets[k + 1]) {
                    const char *row = (const char *)w + rows[offsets[k]] * line;
                    for (int64_t byte = 0; byte < line; byte += 64) __builtin_prefetch(row + byte);
                }
            }
        float *o = out + b * F * dim;
        if (dim == 16 && !fp16) pool_sample(w, 0, 16, rows, offsets, wt, F, B, b, o);
        else if (dim == 16) pool_sample(w, 1, 16, rows, offsets, wt, F, B, b, o);
        else if (!fp16) pool_sample(w, 0, dim, rows, offsets, wt, F, B, b, o);
        else pool_sample(w, 1, dim, rows, offsets, wt, F, B, b, o);
    }
}

/* The ids grouped by row: order [n] the ids by ascending row (stable), unique [u] the distinct
 * rows, starts [u + 1] where each one's ids begin in `order`. rows are in [0, top]. Returns u;
 * -1 without memory, -2 when a row and a position do not fit one 64-bit word together.
 *
 * An LSD radix sort of (row << pbits | position) words, one array of 8 bytes per id (a Kaggle
 * batch's 53k ids: 426 KB, in L2), by the row's bits only, in as few passes of at most 13 bits as
 * they need (26 bits of Kaggle's 33.8M rows: 2 passes, 32 KB histograms). Each of `threads`
 * threads counts and moves its own contiguous part; the histograms' prefix sums run in
 * (bucket, thread) order, which keeps the sort stable. */
int64_t tb_sort(const int64_t *rows, int64_t n, int64_t top, int64_t *order, int64_t *unique, int64_t *starts,
                int threads) {
    int pbits = 1, kbits = 1;
    while (pbits < 63 && ((int64_t)1 << pbits) < n) pbits++;
    while (kbits < 63 && (top >> kbits) > 0) kbits++;
    if (pbits + kbits > 64) return -2;
    const int passes = (kbits + 12) / 13, bits = (kbits + passes - 1) / passes;
    const int64_t buckets = (int64_t)1 << bits;
    const uint64_t mask = (uint64_t)buckets - 1;
    if (threads < 1 || n < 4096) threads = 1;  // small batches: not worth a team
    uint64_t *buf = malloc((size_t)(2 * n + 1) * sizeof(uint64_t));
    uint32_t *count = malloc((size_t)(threads * buckets) * sizeof(uint32_t));
    if (!buf || !count) {
        free(buf);
        free(count);
        return -1;
    }
    uint64_t *sorted = buf;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t lo = n * t / T, hi = n * (t + 1) / T;
        uint64_t *v = buf, *v2 = buf + n;
        uint32_t *c = count + t * buckets;
        for (int64_t i = lo; i < hi; i++) v[i] = (uint64_t)rows[i] << pbits | (uint64_t)i;
        for (int pass = 0; pass < passes; pass++) {
            const int shift = pbits + pass * bits;
            memset(c, 0, (size_t)buckets * sizeof(uint32_t));
            for (int64_t j = lo; j < hi; j++) c[(v[j] >> shift) & mask]++;
#pragma omp barrier
#pragma omp single
            {
                uint32_t sum = 0;
                for (int64_t b = 0; b < buckets; b++)
                    for (int u = 0; u < T; u++) {
                        const uint32_t k = count[u * buckets + b];
                        count[u * buckets + b] = sum;
                        sum += k;
                    }
            }  // (a barrier)
            for (int64_t j = lo; j < hi; j++) v2[c[(v[j] >> shift) & mask]++] = v[j];
#pragma omp barrier
            uint64_t *swap = v; v = v2; v2 = swap;
        }
        if (t == 0) sorted = v;
    }
    const uint64_t pmask = ((uint64_t)1 << pbits) - 1;
    int64_t u = 0;
    for (int64_t j = 0; j < n; j++) {
        const int64_t row = (int64_t)(sorted[j] >> pbits);
        if (u == 0 || row != unique[u - 1]) {
            unique[u] = row;
            starts[u++] = j;
        }
        order[j] = (int64_t)(sorted[j] & pmask);
    }
    starts[u] = n;
    free(buf);
    free(count);
    return u;
}

/* One touched row: g = the sum of its ids' gradients (grad [B * F, dim] at gpos, times wt), then
 * the optimizer step, as fbgemm's exact optimizers (and table_kernel._update):
 *   sgd:             w -= lr * g
 *   rowwise_adagrad: s += mean(g^2); w -= lr * g / (sqrt(s) + eps)   (fp16 rows: fp16(w + delta))
 *   adagrad:         s += g^2;      w -= lr * g / (sqrt(s) + eps)   per column
 * fp16 rows under sgd and adagrad add the rounded delta: fp16(w + fp16(delta)). */
static inline __attribute__((always_inline)) void step_row(void *w, int fp16, int64_t dim, float *state,
                                                           int optim, float lr, float eps, const float *grad,
                                                           const int64_t *ids, int64_t count, const int64_t *gpos,
                                                           const float *wt, int64_t row) {
    float g[dim];
    for (int64_t c = 0; c < dim; c++) g[c] = 0.0f;
    for (int64_t p = 0; p < count; p++) {
        const int64_t i = ids[p];
        const float *src = grad + gpos[i] * dim;
        const float s = wt ? wt[i] : 1.0f;
        for (int64_t c = 0; c < dim; c++) g[c] += src[c] * s;
    }
    float delta[dim];
    if (optim == ROWWISE_ADAGRAD) {
        float sq = 0.0f;
        for (int64_t c = 0; c < dim; c++) sq += g[c] * g[c];
        const float s = state[row] + sq / (float)dim;
        state[row] = s;
        const float scale = -lr / (sqrtf(s) + eps);
        for (int64_t c = 0; c < dim; c++) delta[c] = g[c] * scale;
    } else if (optim == ADAGRAD) {
        float *s = state + row * dim;
        for (int64_t c = 0; c < dim; c++) {
            s[c] += g[c] * g[c];
            delta[c] = g[c] * (-lr / (sqrtf(s[c]) + eps));
        }
    } else {
        for (int64_t c = 0; c < dim; c++) delta[c] = g[c] * -lr;
    }
    if (!fp16) {
        float *r = (float *)w + row * dim;
        for (int64_t c = 0; c < dim; c++) r[c] += delta[c];
    } else {
        half *r = (half *)w + row * dim;
        if (optim == ROWWISE_ADAGRAD)
            for (int64_t c = 0; c < dim; c++) r[c] = (half)((float)r[c] + delta[c]);
        else
            for (int64_t c = 0; c < dim; c++) r[c] = (half)((float)r[c] + (float)(half)delta[c]);
    }
}

/* Backward with the update: every row of `unique` [u] (from tb_sort) stepped once with the sum of
 * its ids' gradients from grad [B, F, dim]. Rows split over `threads` OpenMP threads. */
void tb_backward(void *w, int fp16, int64_t dim, float *state, int optim, float lr, float eps, const float *grad,
                 const int64_t *order, const int64_t *unique, const int64_t *starts, int64_t u, const int64_t *gpos,
                 const float *wt, int threads) {
    const int64_t ahead = 8, line = fp16 ? dim * 2 : dim * 4, width = optim == ADAGRAD ? dim : 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 64)
    for (int64_t j = 0; j < u; j++) {
        if (j + ahead < u) {  // the row and its state a few rows ahead: random reads of large tables
            const int64_t next = unique[j + ahead];
            for (int64_t byte = 0; byte < line; byte += 64) __builtin_prefetch((const char *)w + next * line + byte, 1);
            if (state) __builtin_prefetch(state + next * width, 1);
        }
        if (j + 4 < u)  // the gradients of a row's ids are random rows of grad: up to 8 of them
            for (int64_t p = starts[j + 4]; p < starts[j + 5] && p < starts[j + 4] + 8; p++)
                __builtin_prefetch(grad + gpos[order[p]] * dim);
        const int64_t *ids = order + starts[j], count = starts[j + 1] - starts[j], row = unique[j];
        if (dim == 16 && !fp16) step_row(w, 0, 16, state, optim, lr, eps, grad, ids, count, gpos, wt, row);
        else if (dim == 16) step_row(w, 1, 16, state, optim, lr, eps, grad, ids, count, gpos, wt, row);
        else if (!fp16) step_row(w, 0, dim, state, optim, lr, eps, grad, ids, count, gpos, wt, row);
        else step_row(w, 1, dim, state, optim, lr, eps, grad, ids, count, gpos, wt, row);
    }
}
