/* DLRM's pairwise dot interaction on CPU (model.py's DotInteraction, Naumov et al. 2019), fp32.
 *
 * Per sample b the N = F + 1 vectors t_0 = dense[b], t_k = sparse[b, k - 1] (each D wide):
 *   forward   out[b] = [t_0, z] with z[p(i, j)] = <t_i, t_j> for i < j, p row-major over the
 *             strict upper triangle (DotInteraction's output, the dense vector included)
 *   backward  grad t_i = sum over j != i of gz[p(min(i, j), max(i, j))] * t_j (+ the dense
 *             columns' gradient for t_0)
 * One sample at a time in L1 (27 x 16 floats for Criteo: 1.7 KB) instead of a [B, N, N] batched
 * GEMM whose triangle is then gathered (and, in backward, scattered back): those gathers cost more
 * than the products (docs/benchmarks.md, "Our interaction kernel in C"). Samples split over
 * OpenMP threads; each sample's arithmetic is fixed, so results do not depend on the thread count.
 */
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // an unaligned load or store
enum { NMAX = 32 };  // the vector path's most vectors per sample (two 16-lane halves of a row)

static inline const float *vec(const float *dense, const float *sparse, int64_t b, int64_t F, int64_t D,
                               int64_t j) {
    return j == 0 ? dense + b * D : sparse + (b * F + j - 1) * D;
}

/* The vector path (D a multiple of 16, N <= 32): forward into zl (the sample's pairs, with 32
 * floats of slack). For each i, the dots with every j at once: sum over c of t_i[c] * (t_0[c] ..
 * t_31[c]), from the sample transposed into 32-wide rows, two 16-lane FMAs a column; the pairs
 * j > i are shifted to the front (one two-source permute per 16) and stored as whole vectors:
 * what spills past the row is overwritten by the next one. */
typedef int32_t v16i __attribute__((vector_size(64)));

static void forward_sample_v(const float *dense, const float *sparse, int64_t b, int64_t F, int64_t D, float *zl) {
    const int64_t N = F + 1;
    float tt[D][NMAX] __attribute__((aligned(64)));
    for (int64_t c = 0; c < D; c++)
        for (int64_t j = N; j < NMAX; j++) tt[c][j] = 0.0f;
    for (int64_t j = 0; j < N; j++) {
        const float *t = vec(dense, sparse, b, F, D, j);
        for (int64_t c = 0; c < D; c++) tt[c][j] = t[c];
    }
    const v16i iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    float *zi = zl;
    for (int64_t i = 0; i < N - 1; zi += N - 1 - i, i++) {
        const float *t = vec(dense, sparse, b, F, D, i);
        v16 lo = {0}, hi = {0};
        for (int64_t c = 0; c < D; c++) {
            lo += t[c] * *(const v16 *)&tt[c][0];
            hi += t[c] * *(const v16 *)&tt[c][16];
        }
        const v16i first = (iota + (int32_t)(i + 1)) & 31;  // lanes i+1 .. i+16 of (lo, hi)
        *(v16u *)zi = __builtin_shuffle(lo, hi, first);
        if (N - 1 - i > 16) *(v16u *)(zi + 16) = __builtin_shuffle(lo, hi, (first + 16) & 31);
    }
}

/* The vector path: backward, grad t_i = sum_j S[i][j] t_j, four rows i at a time (each t_j
 * loaded once for four FMAs), 16 lanes of t at a time. */
static void backward_sample_v(const float *S, const float *const *t, int64_t N, int64_t D, float *const *out) {
    int64_t i = 0;
    for (; i + 4 <= N; i += 4)
        for (int64_t c = 0; c < D; c += 16) {
            v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t j = 0; j < N; j++) {
                const v16 tj = *(const v16u *)(t[j] + c);
                a0 += S[i * N + j] * tj;
                a1 += S[(i + 1) * N + j] * tj;
                a2 += S[(i + 2) * N + j] * tj;
                a3 += S[(i + 3) * N + j] * tj;
            }
            *(v16u *)(out[i] + c) += a0;
            *(v16u *)(out[i + 1] + c) += a1;
            *(v16u *)(out[i + 2] + c) += a2;
            *(v16u *)(out[i + 3] + c) += a3;
        }
    for (; i < N; i++)
        for (int64_t c = 0; c < D; c += 16) {
            v16 acc = {0};
            for (int64_t j = 0; j < N; j++) acc += S[i * N + j] * *(const v16u *)(t[j] + c);
            *(v16u *)(out[i] + c) += acc;
        }
}

/* The generic path (any D, N): forward into zl. */
static void forward_sample(const float *dense, const float *sparse, int64_t b, int64_t F, int64_t D, float *zl) {
    const int64_t N = F + 1;
    float *zi = zl;
    for (int64_t i = 0; i < N - 1; i++) {
        const float *ti = vec(dense, sparse, b, F, D, i);
        for (int64_t j = i + 1; j < N; j++, zi++) {
            const float *tj = vec(dense, sparse, b, F, D, j);
            float dot = 0.0f;
            for (int64_t c = 0; c < D; c++) dot += ti[c] * tj[c];
            *zi = dot;
        }
    }
}

/* bf16 <-> fp32: round to nearest even, as torch's casts (NaN kept quiet); widening is exact. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* out [B, D + N(N-1)/2]: each sample's dense vector, then its pairs, from dense [B, D] and
 * sparse [B, F, D] (N = F + 1): DotInteraction's output, fp32, or bf16 (out_bf16: what the top
 * MLP reads under bf16 autocast, written in one pass instead of cast after). */
void dot_forward(const float *dense, const float *sparse, int64_t B, int64_t F, int64_t D, void *out, int out_bf16,
                 int threads) {
    const int64_t N = F + 1, P = N * (N - 1) / 2, W = D + P;
    const int vector = D % 16 == 0 && N <= NMAX;
#pragma omp parallel num_threads(threads)
    {
        float zl[P + NMAX];  // a sample's pairs, with slack
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            if (vector) forward_sample_v(dense, sparse, b, F, D, zl);
            else forward_sample(dense, sparse, b, F, D, zl);
            if (out_bf16) {
                uint16_t *o = (uint16_t *)out + b * W;
                for (int64_t c = 0; c < D; c++) o[c] = to_bf16(dense[b * D + c]);
                for (int64_t p = 0; p < P; p++) o[D + p] = to_bf16(zl[p]);
            } else {
                float *o = (float *)out + b * W;
                memcpy(o, dense + b * D, (size_t)D * sizeof(float));
                for (int64_t p = 0; p < P; p++) o[D + p] = zl[p];
            }
        }
    }
}

/* grad_dense [B, D] and grad_sparse [B, F, D] from grad [B, D + N(N-1)/2] (dot_forward's output
 * layout; fp32, or bf16 with grad_bf16): grad t_i = sum over j != i of grad[pair(i, j)] t_j, plus
 * grad's dense columns for t_0. */
void dot_backward(const float *dense, const float *sparse, const void *grad, int grad_bf16, int64_t B, int64_t F,
                  int64_t D, float *grad_dense, float *grad_sparse, int threads) {
    const int64_t N = F + 1, W = D + N * (N - 1) / 2;
#pragma omp parallel num_threads(threads)
    {
        float S[N * N], row[W];  // the symmetric pair gradient, zero diagonal; a row of grad in fp32
        const float *t[N];
        float *out[N];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            const float *g = row;
            if (grad_bf16)
                for (int64_t k = 0; k < W; k++) row[k] = from_bf16(((const uint16_t *)grad)[b * W + k]);
            else
                memcpy(row, (const float *)grad + b * W, (size_t)W * sizeof(float));
            for (int64_t c = 0; c < D; c++) grad_dense[b * D + c] = g[c];
            memset(grad_sparse + b * F * D, 0, (size_t)(F * D) * sizeof(float));
            g += D;
            for (int64_t i = 0; i < N; i++) {
                S[i * N + i] = 0.0f;
                for (int64_t j = i + 1; j < N; j++, g++) S[i * N + j] = S[j * N + i] = *g;
                t[i] = vec(dense, sparse, b, F, D, i);
                out[i] = i == 0 ? grad_dense + b * D : grad_sparse + (b * F + i - 1) * D;
            }
            if (D % 16 == 0) {
                backward_sample_v(S, t, N, D, out);
            } else {
                for (int64_t i = 0; i < N; i++)
                    for (int64_t j = 0; j < N; j++)
                        for (int64_t c = 0; c < D; c++) out[i][c] += S[i * N + j] * t[j][c];
            }
        }
    }
}
