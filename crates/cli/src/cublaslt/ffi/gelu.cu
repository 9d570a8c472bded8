// GELU, x/2 (1 + erf(x/√2)), and its tanh approximation, x/2 (1 + tanh(√(2/π) (x + 0.044715
// x³))), with their gradients over bf16 tensors, for `gelu.rs`: computed in f32, rounded once. Eight elements per thread and iteration (16-byte loads) when every
// pointer allows it, one at a time otherwise.

__device__ __forceinline__ float gelu(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

// d gelu / dx = (1 + erf(x/√2)) / 2 + x φ(x), φ the standard normal density.
__device__ __forceinline__ float gelu_slope(float x) {
    return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) +
           x * 0.39894228040143268f * expf(-0.5f * x * x);
}

__device__ __forceinline__ float gelu_tanh(float x) {
    const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

// d/dx = (1 + t) / 2 + x/2 (1 − t²) √(2/π) (1 + 3 · 0.044715 x²), t = tanh(u).
__device__ __forceinline__ float gelu_tanh_slope(float x) {
    const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    const float t = tanhf(u);
    return 0.5f * (1.0f + t) +
           0.5f * x * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 0.134145f * x * x);
}

// NAME_forward: y = F(x); NAME_backward: dx = g · SLOPE(x); n elements each.
#define GELU_KERNELS(NAME, F, SLOPE)                                                           \
    extern "C" __global__ void NAME##_forward(const bf16* __restrict__ x,                     \
                                              bf16* __restrict__ y, long long n) {            \
        const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;            \
        const long long stride = (long long)gridDim.x * blockDim.x;                          \
        long long done = 0;                                                                   \
        if (aligned16(x, y, y)) {                                                               \
            const uint4* xv = reinterpret_cast<const uint4*>(x);                             \
            uint4* yv = reinterpret_cast<uint4*>(y);                                          \
            for (long long i = first; i < n / 8; i += stride) {                               \
                const uint4 a = xv[i];                                                        \
                u32 w[4] = {a.x, a.y, a.z, a.w};                                              \
                _Pragma("unroll") for (int k = 0; k < 4; k++) {                               \
                    w[k] = pack(F(from_bf16(w[k] & 0xffffu)), F(from_bf16(w[k] >> 16)));       \
                }                                                                             \
                yv[i] = make_uint4(w[0], w[1], w[2], w[3]);                                   \
            }                                                                                 \
            done = n / 8 * 8;                                                                 \
        }                                                                                     \
        for (long long i = done + first; i < n; i += stride) {                                \
            y[i] = to_bf16(F(from_bf16(x[i])));                                               \
        }                                                                                     \
    }                                                                                         \
    extern "C" __global__ void NAME##_backward(const bf16* __restrict__ x,                    \
                                               const bf16* __restrict__ g,                    \
                                               bf16* __restrict__ dx, long long n) {          \
        const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;            \
        const long long stride = (long long)gridDim.x * blockDim.x;                          \
        long long done = 0;                                                                   \
        if (aligned16(x, g, dx)) {                                                              \
            const uint4* xv = reinterpret_cast<const uint4*>(x);                             \
            const uint4* gv = reinterpret_cast<const uint4*>(g);                             \
            uint4* dv = reinterpret_cast<uint4*>(dx);                                         \
            for (long long i = first; i < n / 8; i += stride) {                               \
                const uint4 a = xv[i], b = gv[i];                                             \
                const u32 w[4] = {a.x, a.y, a.z, a.w};                                        \
                const u32 v[4] = {b.x, b.y, b.z, b.w};                                        \
                u32 o[4];                                                                     \
                _Pragma("unroll") for (int k = 0; k < 4; k++) {                               \
                    const float lo = from_bf16(v[k] & 0xffffu) * SLOPE(from_bf16(w[k] & 0xffffu)); \
                    const float hi = from_bf16(v[k] >> 16) * SLOPE(from_bf16(w[k] >> 16));    \
                    o[k] = pack(lo, hi);                                                      \
                }                                                                             \
                dv[i] = make_uint4(o[0], o[1], o[2], o[3]);                                   \
            }                                                                                 \
            done = n / 8 * 8;                                                                 \
        }                                                                                     \
        for (long long i = done + first; i < n; i += stride) {                                \
            dx[i] = to_bf16(from_bf16(g[i]) * SLOPE(from_bf16(x[i])));                        \
        }                                                                                     \
    }

GELU_KERNELS(gelu, gelu, gelu_slope)
GELU_KERNELS(gelu_tanh, gelu_tanh, gelu_tanh_slope)
