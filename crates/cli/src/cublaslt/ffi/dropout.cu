// Training dropout, optionally plus a residual, for `dropout.rs`: element `i` is kept when
// `kept(i, seed, keep)` (`common.cuh`, the attention kernels' hash), and a kept element is
// `x · (1 / keep)`. The backward pass draws the same decisions from the same seed, so no mask
// is stored; the backward pass is the same kernel without a residual. f32 four and bf16 eight elements per thread and iteration (16-byte loads) when
// every pointer allows it, one at a time otherwise; bf16 values are computed in f32 and
// rounded once.

// y = dropped(x) + residual (residual may be null), f32.
extern "C" __global__ void dropout_f32(const float* __restrict__ x,
                                       const float* __restrict__ residual,
                                       float* __restrict__ y, long long n, u32 seed, float keep) {
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const float scale = 1.0f / keep;
    const bool has_residual = residual != nullptr;
    long long done = 0;
    if (aligned16(x, has_residual ? residual : x, y)) {
        for (long long i = first; i < n / 4; i += stride) {
            float4 v = reinterpret_cast<const float4*>(x)[i];
            float4 r = has_residual ? reinterpret_cast<const float4*>(residual)[i]
                                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            const u32 e = (u32)(i * 4);
            v.x = (kept(e, seed, keep) ? v.x * scale : 0.0f) + r.x;
            v.y = (kept(e + 1, seed, keep) ? v.y * scale : 0.0f) + r.y;
            v.z = (kept(e + 2, seed, keep) ? v.z * scale : 0.0f) + r.z;
            v.w = (kept(e + 3, seed, keep) ? v.w * scale : 0.0f) + r.w;
            reinterpret_cast<float4*>(y)[i] = v;
        }
        done = n / 4 * 4;
    }
    for (long long i = done + first; i < n; i += stride) {
        const float r = has_residual ? residual[i] : 0.0f;
        y[i] = (kept((u32)i, seed, keep) ? x[i] * scale : 0.0f) + r;
    }
}

// Two bf16 elements of one word, `e` the first one's index.
__device__ __forceinline__ u32 drop_pair(u32 w, u32 r, u32 e, u32 seed, float keep,
                                         float scale) {
    const float lo = (kept(e, seed, keep) ? from_bf16(w & 0xffffu) * scale : 0.0f) +
                     from_bf16(r & 0xffffu);
    const float hi = (kept(e + 1, seed, keep) ? from_bf16(w >> 16) * scale : 0.0f) +
                     from_bf16(r >> 16);
    return pack(lo, hi);
}

// y = dropped(x) + residual (residual may be null), bf16.
extern "C" __global__ void dropout_bf16(const bf16* __restrict__ x,
                                        const bf16* __restrict__ residual,
                                        bf16* __restrict__ y, long long n, u32 seed, float keep) {
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const float scale = 1.0f / keep;
    const bool has_residual = residual != nullptr;
    long long done = 0;
    if (aligned16(x, has_residual ? residual : x, y)) {
        for (long long i = first; i < n / 8; i += stride) {
            const uint4 a = reinterpret_cast<const uint4*>(x)[i];
            const uint4 b = has_residual ? reinterpret_cast<const uint4*>(residual)[i]
                                         : make_uint4(0u, 0u, 0u, 0u);
            const u32 e = (u32)(i * 8);
            reinterpret_cast<uint4*>(y)[i] = make_uint4(
                drop_pair(a.x, b.x, e, seed, keep, scale),
                drop_pair(a.y, b.y, e + 2, seed, keep, scale),
                drop_pair(a.z, b.z, e + 4, seed, keep, scale),
                drop_pair(a.w, b.w, e + 6, seed, keep, scale));
        }
        done = n / 8 * 8;
    }
    for (long long i = done + first; i < n; i += stride) {
        const float r = has_residual ? from_bf16(residual[i]) : 0.0f;
        y[i] = to_bf16((kept((u32)i, seed, keep) ? from_bf16(x[i]) * scale : 0.0f) + r);
    }
}
