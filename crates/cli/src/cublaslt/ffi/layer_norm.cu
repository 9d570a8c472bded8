// The training layer norm over f32 rows of D columns (a compile-time macro: a multiple of 4,
// at most 1,024), for `layer_norm.rs`. One warp per row; lane `l` holds the row's columns
// 4 (l + 32 j) .. +3 for j < V in registers (16-byte loads), so each pass reads a row once.
//
// Forward: y = (x − μ) / σ · γ + β with σ = √(var + ε), and μ and 1/σ per row kept for the
// backward pass. Backward, in one pass over g and x: dx = (ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)) / σ
// with ĝ = g γ and x̂ = (x − μ) / σ, and each block's sums of g x̂ and g over its rows (γ's and
// β's gradients) in registers, added across the block's warps in shared memory in a fixed
// order and written as one row of partial sums; `column_sums` adds those rows up.

#define V ((D + 127) / 128)
#define WARPS 8
#define ROWS_PER_WARP 8

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

__device__ __forceinline__ float sum4(float4 v) {
    return v.x + v.y + v.z + v.w;
}

// Whether lane `lane`'s j-th vector lies in the row.
__device__ __forceinline__ bool inside(int lane, int j) {
    return (lane + 32 * j) * 4 < D;
}

// `rows` rows of x; y like x, mean and rstd one value per row.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    layer_norm_forward(const float* __restrict__ x, const float* __restrict__ gamma,
                       const float* __restrict__ beta, float* __restrict__ y,
                       float* __restrict__ mean_out, float* __restrict__ rstd_out, int rows,
                       float eps) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (row >= rows) {
        return;
    }
    const float4* xr = reinterpret_cast<const float4*>(x + row * D);
    float4 v[V];
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < V; j++) {
        v[j] = inside(lane, j) ? xr[lane + 32 * j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        sum += sum4(v[j]);
    }
    const float mean = warp_sum(sum) / (float)D;
    float squares = 0.0f;
#pragma unroll
    for (int j = 0; j < V; j++) {
        if (inside(lane, j)) {
            const float4 c = make_float4(v[j].x - mean, v[j].y - mean, v[j].z - mean,
                                         v[j].w - mean);
            squares += c.x * c.x + c.y * c.y + c.z * c.z + c.w * c.w;
        }
    }
    const float std = sqrtf(warp_sum(squares) / (float)D + eps);
    const float4* g4 = reinterpret_cast<const float4*>(gamma);
    const float4* b4 = reinterpret_cast<const float4*>(beta);
    float4* yr = reinterpret_cast<float4*>(y + row * D);
#pragma unroll
    for (int j = 0; j < V; j++) {
        if (inside(lane, j)) {
            const int c = lane + 32 * j;
            const float4 g = g4[c], b = b4[c];
            yr[c] = make_float4((v[j].x - mean) / std * g.x + b.x,
                                (v[j].y - mean) / std * g.y + b.y,
                                (v[j].z - mean) / std * g.z + b.z,
                                (v[j].w - mean) / std * g.w + b.w);
        }
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = 1.0f / std;
    }
}

// Block `b` takes rows b · WARPS · ROWS_PER_WARP onwards, warp `w` every WARPS-th of them.
// partial[b, 0..D] = Σ g x̂ and partial[b, D..2D] = Σ g over the block's rows.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    layer_norm_backward(const float* __restrict__ g, const float* __restrict__ x,
                        const float* __restrict__ mean, const float* __restrict__ rstd,
                        const float* __restrict__ gamma, float* __restrict__ dx,
                        float* __restrict__ partial, int rows) {
    __shared__ float across[WARPS][D];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float4* g4 = reinterpret_cast<const float4*>(gamma);
    float4 sum_gx[V], sum_g[V];
#pragma unroll
    for (int j = 0; j < V; j++) {
        sum_gx[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        sum_g[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    const long long first = (long long)blockIdx.x * WARPS * ROWS_PER_WARP;
    for (int k = 0; k < ROWS_PER_WARP; k++) {
        const long long row = first + k * WARPS + warp;
        if (row >= rows) {
            break;
        }
        const float m = mean[row], s = rstd[row];
        const float4* gr = reinterpret_cast<const float4*>(g + row * D);
        const float4* xr = reinterpret_cast<const float4*>(x + row * D);
        float4 gv[V], xh[V];
        float row_g = 0.0f, row_gx = 0.0f;
#pragma unroll
        for (int j = 0; j < V; j++) {
            const int c = lane + 32 * j;
            if (inside(lane, j)) {
                gv[j] = gr[c];
                const float4 xv = xr[c];
                xh[j] = make_float4((xv.x - m) * s, (xv.y - m) * s, (xv.z - m) * s,
                                    (xv.w - m) * s);
                const float4 gm = g4[c];
                const float4 gh = make_float4(gv[j].x * gm.x, gv[j].y * gm.y, gv[j].z * gm.z,
                                              gv[j].w * gm.w);
                row_g += sum4(gh);
                row_gx += gh.x * xh[j].x + gh.y * xh[j].y + gh.z * xh[j].z + gh.w * xh[j].w;
            }
        }
        const float mean_g = warp_sum(row_g) / (float)D;
        const float mean_gx = warp_sum(row_gx) / (float)D;
        float4* dr = reinterpret_cast<float4*>(dx + row * D);
#pragma unroll
        for (int j = 0; j < V; j++) {
            const int c = lane + 32 * j;
            if (inside(lane, j)) {
                const float4 gm = g4[c];
                dr[c] = make_float4((gv[j].x * gm.x - mean_g - xh[j].x * mean_gx) * s,
                                    (gv[j].y * gm.y - mean_g - xh[j].y * mean_gx) * s,
                                    (gv[j].z * gm.z - mean_g - xh[j].z * mean_gx) * s,
                                    (gv[j].w * gm.w - mean_g - xh[j].w * mean_gx) * s);
                sum_gx[j].x += gv[j].x * xh[j].x;
                sum_gx[j].y += gv[j].y * xh[j].y;
                sum_gx[j].z += gv[j].z * xh[j].z;
                sum_gx[j].w += gv[j].w * xh[j].w;
                sum_g[j].x += gv[j].x;
                sum_g[j].y += gv[j].y;
                sum_g[j].z += gv[j].z;
                sum_g[j].w += gv[j].w;
            }
        }
    }
    float* out = partial + (long long)blockIdx.x * 2 * D;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        float4* mine = reinterpret_cast<float4*>(across[warp]);
#pragma unroll
        for (int j = 0; j < V; j++) {
            if (inside(lane, j)) {
                mine[lane + 32 * j] = half == 0 ? sum_gx[j] : sum_g[j];
            }
        }
        __syncthreads();
        for (int c = threadIdx.x; c < D; c += WARPS * 32) {
            float total = 0.0f;
#pragma unroll
            for (int w = 0; w < WARPS; w++) {
                total += across[w][c];
            }
            out[half * D + c] = total;
        }
        __syncthreads();
    }
}

// Σ_p partial[p, c] for c < 2D, into dgamma[c] (c < D) and dbeta[c − D]: blocks of 32
// columns, 8 warps over the rows.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    column_sums(const float* __restrict__ partial, float* __restrict__ dgamma,
                float* __restrict__ dbeta, int parts) {
    __shared__ float t[WARPS][33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + lane;
    float s = 0.0f;
    if (c < 2 * D) {
        for (int p = warp; p < parts; p += WARPS) {
            s += partial[(long long)p * 2 * D + c];
        }
    }
    t[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && c < 2 * D) {
        float total = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            total += t[w][lane];
        }
        if (c < D) {
            dgamma[c] = total;
        } else {
            dbeta[c - D] = total;
        }
    }
}
