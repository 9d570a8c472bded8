// The kernels of one cached decoder step (f32), compiled by NVRTC when a process first
// decodes on CUDA (see step.rs). Rows are `sources × beams`, one block per row (and head);
// blocks are a multiple of 32 threads, at most 1024.

#define FULL_MASK 0xffffffffu

typedef unsigned long long u64;

__device__ __forceinline__ float neg_infinity() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// The sum of `v` over the block, returned to every thread; `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? scratch[lane] : 0.0f);
}

// The maximum of `v` over the block, returned to every thread.
__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_max(lane < warps ? scratch[lane] : neg_infinity());
}

// x[r] = table[tokens[r]] · scale + position (one row of the sinusoidal table; the table's
// rows `pitch` floats apart), and pad[r] = 1 where the token is the padding id; with a slot
// table (see `self_attention`), position t of row r is its own. Grid: rows.
extern "C" __global__ void embed(const int* tokens, const float* table, long long pitch,
                                 const float* position, float* x, float* pad, int d,
                                 float scale, int pad_id, int* slots, int cap, int t) {
    u64 row = blockIdx.x;
    int token = tokens[row];
    if (slots && threadIdx.x == 0) slots[row * cap + t] = (int)row;
    const float* e = table + token * pitch;
    for (int i = threadIdx.x; i < d; i += blockDim.x) x[row * d + i] = e[i] * scale + position[i];
    if (threadIdx.x == 0) pad[row] = token == pad_id ? 1.0f : 0.0f;
}

// x[r] += a[r] (when `a` is given), then out[r] = LayerNorm(x[r]) · gamma + beta (biased
// variance, as torch). Grid: rows.
extern "C" __global__ void add_layer_norm(const float* a, float* x, const float* gamma,
                                          const float* beta, float* out, int d, float eps) {
    __shared__ float scratch[32];
    u64 row = blockIdx.x;
    float* xr = x + row * d;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = xr[i];
        if (a) {
            v += a[row * d + i];
            xr[i] = v;
        }
        sum += v;
    }
    float mean = block_sum(sum, scratch) / d;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float c = xr[i] - mean;
        squares += c * c;
    }
    float var = block_sum(squares, scratch) / d;
    float inv = 1.0f / sqrtf(var + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        out[row * d + i] = (xr[i] - mean) * inv * gamma[i] + beta[i];
}

// Masked self-attention of one decoding position. `qkv [rows, 3d]` holds the query, key and
// value projections side by side; the layer's cache `keys`, `values` are `[physical rows,
// heads, cap, dh]`, and position p < t of row r is held by row slots[r · cap + p] (without a
// slot table, by row r: beams are reordered by rewriting the table, not the cache). Writes
// this position's key and value at `t` of the row's own slots, then ctx[r, head] = softmax(q/√dh ·
// Kᵀ) · V over positions 0..=t; a row whose input is padding gets the uniform average (the
// reference fills every score with −1e18). Grid: (rows, heads); shared: dh + t + 1 + 32 floats.
extern "C" __global__ void self_attention(const float* qkv, float* keys, float* values,
                                          const int* slots, const float* pad, float* ctx,
                                          int heads, int dh, int cap, int t, float scale) {
    extern __shared__ float shared[];
    float* q = shared;
    float* scores = q + dh;
    float* scratch = scores + t + 1;
    int row = blockIdx.x, head = blockIdx.y, d = heads * dh, n = t + 1;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const float* in = qkv + (u64)row * 3 * d + head * dh;
    u64 slot = ((u64)row * heads + head) * cap * dh;
    float* k = keys + slot;
    float* v = values + slot;
    for (int j = threadIdx.x; j < dh; j += blockDim.x) {
        q[j] = in[j] / scale;
        k[(u64)t * dh + j] = in[d + j];
        v[(u64)t * dh + j] = in[2 * d + j];
    }
    __syncthreads();
    for (int p = warp; p < n; p += warps) {
        const float* kp = k + (u64)p * dh;
        if (slots && p < t) kp = keys + (((u64)slots[row * cap + p] * heads + head) * cap + p) * dh;
        float s = 0.0f;
        for (int j = lane; j < dh; j += 32) s += q[j] * kp[j];
        s = warp_sum(s);
        if (lane == 0) scores[p] = s;
    }
    __syncthreads();
    if (pad[row] != 0.0f) {
        for (int p = threadIdx.x; p < n; p += blockDim.x) scores[p] = 1.0f / n;
    } else {
        float m = neg_infinity();
        for (int p = threadIdx.x; p < n; p += blockDim.x) m = fmaxf(m, scores[p]);
        m = block_max(m, scratch);
        float sum = 0.0f;
        for (int p = threadIdx.x; p < n; p += blockDim.x) {
            float e = expf(scores[p] - m);
            scores[p] = e;
            sum += e;
        }
        sum = block_sum(sum, scratch);
        for (int p = threadIdx.x; p < n; p += blockDim.x) scores[p] /= sum;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < dh; j += blockDim.x) {
        float acc = 0.0f;
        for (int p = 0; p < n; ++p) {
            const float* vp = v + (u64)p * dh;
            if (slots && p < t)
                vp = values + (((u64)slots[row * cap + p] * heads + head) * cap + p) * dh;
            acc += scores[p] * vp[j];
        }
        ctx[(u64)row * d + head * dh + j] = acc;
    }
}

// Attention of every row's query `q [rows, d]` over its source's encoder keys and values, a
// block per row and head (for more beams or positions than `cross_attention` takes):
// element (source, head, position, j) at source·ss + head·hs + position·ps + j, the source of
// row r being r / beams; `mask [sources, s]` is 1 at source padding (excluded). Grid: (rows,
// heads); shared: dh + s + 32 floats.
extern "C" __global__ void cross_attention_rows(const float* qm, const float* keys,
                                           const float* values, long long ss, long long hs,
                                           long long ps, const float* mask, float* ctx,
                                           int heads, int dh, int s, int beams, float scale) {
    extern __shared__ float shared[];
    float* q = shared;
    float* scores = q + dh;
    float* scratch = scores + s;
    int row = blockIdx.x, head = blockIdx.y, d = heads * dh, source = row / beams;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int j = threadIdx.x; j < dh; j += blockDim.x) q[j] = qm[(u64)row * d + head * dh + j] / scale;
    const float* k = keys + source * ss + head * hs;
    const float* v = values + source * ss + head * hs;
    const float* masked = mask + (u64)source * s;
    __syncthreads();
    for (int p = warp; p < s; p += warps) {
        if (masked[p] != 0.0f) {
            if (lane == 0) scores[p] = neg_infinity();
            continue;
        }
        float sum = 0.0f;
        for (int j = lane; j < dh; j += 32) sum += q[j] * k[p * ps + j];
        sum = warp_sum(sum);
        if (lane == 0) scores[p] = sum;
    }
    __syncthreads();
    float m = neg_infinity();
    for (int p = threadIdx.x; p < s; p += blockDim.x) m = fmaxf(m, scores[p]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int p = threadIdx.x; p < s; p += blockDim.x) {
        float e = expf(scores[p] - m);
        scores[p] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    __syncthreads();
    for (int j = threadIdx.x; j < dh; j += blockDim.x) {
        float acc = 0.0f;
        for (int p = 0; p < s; ++p) acc += scores[p] * v[p * ps + j];
        ctx[(u64)row * d + head * dh + j] = acc / sum;
    }
}

// The reference's tanh-approximated GELU of `n` elements, in place. Grid: ⌈n / block⌉.
extern "C" __global__ void gelu_tanh(float* x, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}

// Each row of `x [rows, n]` becomes its log-softmax, in place. Grid: rows.
extern "C" __global__ void log_softmax(float* x, int n) {
    __shared__ float scratch[32];
    float* xr = x + (u64)blockIdx.x * n;
    float m = neg_infinity();
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += expf(xr[i] - m);
    float log_sum = logf(block_sum(sum, scratch));
    for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] = (xr[i] - m) - log_sum;
}

// dst[plane, r, head, 0..len] = src[plane, origins[r], head, 0..len] (origins absent: r) for
// caches `[planes, rows, heads, cap, dh]` of different row counts and capacities. Grid:
// (dst_rows × heads, planes).
extern "C" __global__ void gather_rows(const float* src, float* dst, const int* origins,
                                       int src_rows, int dst_rows, int heads, int src_cap,
                                       int dst_cap, int len, int dh) {
    int r = blockIdx.x / heads, head = blockIdx.x % heads, plane = blockIdx.y;
    int origin = origins ? origins[r] : r;
    const float* from = src + (((u64)plane * src_rows + origin) * heads + head) * src_cap * dh;
    float* to = dst + (((u64)plane * dst_rows + r) * heads + head) * dst_cap * dh;
    u64 n = (u64)len * dh;
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) to[i] = from[i];
}

// Whether candidate (va, ia) ranks before (vb, ib): the larger value, the lower index among
// equal values (as rounds of a row-wise arg-max pick them).
__device__ __forceinline__ bool before(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

#define TOP_K_MAX 16

// The `k` best entries of each segment of `segment` columns (the last one may be shorter) of
// each row of `x [rows, cols]`, best first: values and column indices (in the row, or
// `source [rows, cols]`'s entries when given) to `values`, `indices` `[rows, segments, k]`. Each thread keeps its own sorted k best, then k
// rounds of a block-wide arg-max over the threads' heads. Grid: (rows, segments); k ≤ 16.
extern "C" __global__ void top_k_segments(const float* x, const int* source, int cols,
                                          int segment, int k, float* values, int* indices) {
    __shared__ float best_value[32];
    __shared__ int best_index[32];
    float v[TOP_K_MAX];
    int ix[TOP_K_MAX];
    for (int j = 0; j < k; ++j) {
        v[j] = neg_infinity();
        ix[j] = 0x7fffffff;
    }
    int row = blockIdx.x, seg = blockIdx.y;
    const float* xr = x + (u64)row * cols;
    int start = seg * segment, end = min(start + segment, cols);
    for (int c = start + threadIdx.x; c < end; c += blockDim.x) {
        float value = xr[c];
        int id = source ? source[(u64)row * cols + c] : c;
        if (!before(value, id, v[k - 1], ix[k - 1])) continue;
        int j = k - 1;
        while (j > 0 && before(value, id, v[j - 1], ix[j - 1])) {
            v[j] = v[j - 1];
            ix[j] = ix[j - 1];
            --j;
        }
        v[j] = value;
        ix[j] = id;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int head = 0;
    u64 out = ((u64)row * gridDim.y + seg) * k;
    for (int round = 0; round < k; ++round) {
        float bv = head < k ? v[head] : neg_infinity();
        int bi = head < k ? ix[head] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(FULL_MASK, bv, o);
            int oi = __shfl_xor_sync(FULL_MASK, bi, o);
            if (before(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            best_value[warp] = bv;
            best_index[warp] = bi;
        }
        __syncthreads();
        bv = lane < warps ? best_value[lane] : neg_infinity();
        bi = lane < warps ? best_index[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(FULL_MASK, bv, o);
            int oi = __shfl_xor_sync(FULL_MASK, bi, o);
            if (before(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
            }
        }
        // Every thread has the winner; its owner moves past it.
        if (head < k && ix[head] == bi) ++head;
        if (threadIdx.x == 0) {
            values[out + round] = bv;
            indices[out + round] = bi;
        }
        __syncthreads();
    }
}

#define CROSS_BEAMS_MAX 8

// cross_attention_rows for all beams of a source in one block, so that the source's keys and
// values are read once: the same arguments, grid (sources, heads), beams ≤ 8 and dh ≤ 128. A
// warp per position for the scores, a warp per beam for the softmax, then each warp sums the
// values of every `warps`-th position for all beams in registers, and the warps' partial sums
// are added. Shared: beams · (dh + s) + warps · beams · dh + 32 floats.
extern "C" __global__ void cross_attention(const float* qm, const float* keys,
                                           const float* values, long long ss, long long hs,
                                           long long ps, const float* mask, float* ctx,
                                           int heads, int dh, int s, int beams, float scale) {
    extern __shared__ float shared[];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float* q = shared;
    float* scores = q + beams * dh;
    float* partial = scores + beams * s;
    float* norm = partial + warps * beams * dh;
    int source = blockIdx.x, head = blockIdx.y, d = heads * dh;
    for (int i = threadIdx.x; i < beams * dh; i += blockDim.x) {
        int b = i / dh, j = i % dh;
        q[i] = qm[(u64)(source * beams + b) * d + head * dh + j] / scale;
    }
    const float* k = keys + source * ss + head * hs;
    const float* v = values + source * ss + head * hs;
    const float* masked = mask + (u64)source * s;
    __syncthreads();
    for (int p = warp; p < s; p += warps) {
        if (masked[p] != 0.0f) {
            if (lane == 0)
                for (int b = 0; b < beams; ++b) scores[b * s + p] = neg_infinity();
            continue;
        }
        float kp[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) kp[c] = c * 32 + lane < dh ? k[p * ps + c * 32 + lane] : 0.0f;
        for (int b = 0; b < beams; ++b) {
            float sum = 0.0f;
#pragma unroll
            for (int c = 0; c < 4; ++c)
                if (c * 32 + lane < dh) sum += q[b * dh + c * 32 + lane] * kp[c];
            sum = warp_sum(sum);
            if (lane == 0) scores[b * s + p] = sum;
        }
    }
    __syncthreads();
    for (int b = warp; b < beams; b += warps) {
        float* row = scores + b * s;
        float m = neg_infinity();
        for (int p = lane; p < s; p += 32) m = fmaxf(m, row[p]);
        m = warp_max(m);
        float sum = 0.0f;
        for (int p = lane; p < s; p += 32) {
            float e = expf(row[p] - m);
            row[p] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) norm[b] = sum;
    }
    __syncthreads();
    float acc[CROSS_BEAMS_MAX][4];
#pragma unroll
    for (int b = 0; b < CROSS_BEAMS_MAX; ++b)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[b][c] = 0.0f;
    for (int p = warp; p < s; p += warps) {
        if (masked[p] != 0.0f) continue;
        float vp[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) vp[c] = c * 32 + lane < dh ? v[p * ps + c * 32 + lane] : 0.0f;
#pragma unroll
        for (int b = 0; b < CROSS_BEAMS_MAX; ++b) {
            if (b < beams) {
                float w = scores[b * s + p];
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[b][c] += w * vp[c];
            }
        }
    }
#pragma unroll
    for (int b = 0; b < CROSS_BEAMS_MAX; ++b)
#pragma unroll
        for (int c = 0; c < 4; ++c)
            if (b < beams && c * 32 + lane < dh)
                partial[(warp * beams + b) * dh + c * 32 + lane] = acc[b][c];
    __syncthreads();
    for (int i = threadIdx.x; i < beams * dh; i += blockDim.x) {
        int b = i / dh, j = i % dh;
        float sum = 0.0f;
        for (int w = 0; w < warps; ++w) sum += partial[(w * beams + b) * dh + j];
        ctx[(u64)(source * beams + b) * d + head * dh + j] = sum / norm[b];
    }
}

// new[r · new_cap + p] = old[o · old_cap + p] for p < len, o = origins[r] (r without
// origins); without an old table (every position in its own row), o itself. Grid: rows.
extern "C" __global__ void gather_slots(const int* old, int old_cap, const int* origins,
                                        int* fresh, int new_cap, int len) {
    int r = blockIdx.x;
    int o = origins ? origins[r] : r;
    for (int p = threadIdx.x; p < len; p += blockDim.x)
        fresh[(u64)r * new_cap + p] = old ? old[(u64)o * old_cap + p] : o;
}
