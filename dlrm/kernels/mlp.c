/* The backward of the MLP layers' ReLU and bias on CPU (linear_relu.py): torchrec's Perceptron
 * (Linear, then ReLU) differentiated in one pass over [B, N] where autograd made two.
 *
 * For y = relu(x W^T + b): g = gy * (y > 0), the gradient of the GEMM's output, and the bias
 * gradient, the sum of g over rows, in one read of gy and y (threshold_backward wrote g, then a
 * second pass summed it). y, gy and g are [B, N] fp32, or bf16 under bf16 autocast. NaN in y
 * passes its gradient as threshold_backward does (it masks only y <= 0). Rows split over OpenMP
 * threads in fixed 256-row blocks whose partial sums are then added in block order: the same
 * bits on any thread count.
 */
#include <stdint.h>
#include <string.h>

enum { BLOCK = 256 };  // rows per partial sum of the bias gradient

static inline float from_bf16(uint16_t h) {  // widening is exact
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* g = gy where y > 0, else 0 (g, gy, y [B, N], all fp32 or all bf16); gbias [N] = the sum of g
 * over rows, in fp32. partial: [ceil(B / BLOCK), N] floats of scratch. */
void relu_backward(const void *gy, const void *y, void *g, float *gbias, float *partial, int64_t B, int64_t N,
                   int bf16, int threads) {
    const int64_t blocks = (B + BLOCK - 1) / BLOCK;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < blocks; k++) {
            float *acc = partial + k * N;
            for (int64_t j = 0; j < N; j++) acc[j] = 0.0f;
            const int64_t end = (k + 1) * BLOCK < B ? (k + 1) * BLOCK : B;
            for (int64_t i = k * BLOCK; i < end; i++) {
                if (bf16) {
                    const uint16_t *gr = (const uint16_t *)gy + i * N, *yr = (const uint16_t *)y + i * N;
                    uint16_t *out = (uint16_t *)g + i * N;
                    for (int64_t j = 0; j < N; j++) {
                        const uint16_t v = from_bf16(yr[j]) <= 0.0f ? 0 : gr[j];
                        out[j] = v;
                        acc[j] += from_bf16(v);
                    }
                } else {
                    const float *gr = (const float *)gy + i * N, *yr = (const float *)y + i * N;
                    float *out = (float *)g + i * N;
                    for (int64_t j = 0; j < N; j++) {
                        const float v = yr[j] <= 0.0f ? 0.0f : gr[j];
                        out[j] = v;
                        acc[j] += v;
                    }
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < N; j++) {
            float s = 0.0f;
            for (int64_t k = 0; k < blocks; k++) s += partial[k * N + j];
            gbias[j] = s;
        }
    }
}
