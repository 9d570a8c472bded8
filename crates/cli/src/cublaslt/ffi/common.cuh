// Shared by the CUDA sources of this module (prepended to those that use it before NVRTC
// compiles them): bf16 as its bits, round-to-nearest-even conversion, and dropout's hash.

typedef unsigned short bf16;
typedef unsigned int u32;

// The float whose upper half is the bf16 `x` (the low 16 bits of the argument).
__device__ __forceinline__ float from_bf16(u32 x) {
    return __uint_as_float(x << 16);
}

// `f` rounded to the nearest bf16, ties to even; NaN stays NaN.
__device__ __forceinline__ bf16 to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// Two floats rounded to bf16 in one word, `lo` first in memory.
__device__ __forceinline__ u32 pack(float lo, float hi) {
    return (u32)to_bf16(lo) | ((u32)to_bf16(hi) << 16);
}

// Dropout's decision for element `index` under `seed`: kept with probability `keep`. The
// same hash as `kernels/attention.rs`'s CubeCL kernels.
__device__ __forceinline__ bool kept(u32 index, u32 seed, float keep) {
    u32 h = (index * 0x9E3779B9u) ^ seed;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return (float)(h >> 8) * (1.0f / 16777216.0f) < keep;
}

// Whether three pointers allow 16-byte accesses.
__device__ __forceinline__ bool aligned16(const void* a, const void* b, const void* c) {
    return (((unsigned long long)a | (unsigned long long)b | (unsigned long long)c) & 15) == 0;
}

