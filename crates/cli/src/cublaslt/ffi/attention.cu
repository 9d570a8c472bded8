// Multi-head attention of a bf16-mixed training step, forward and backward, for
// `attention.rs`. Compiled by NVRTC once per shape class with three macros:
//
//   DH    the width of a head (a multiple of 16, at most 128);
//   KMAX  the keys held (a multiple of 16, at most 128; a call's keys `tk` <= KMAX);
//   QMAX  the query rows the backward kernel holds (a multiple of 16, at most 128).
//
// The queries, keys and values are read where the projections wrote them, `[b, t, heads * DH]`
// rows (a head is a column block), and the output and the gradients are written the same way:
// no copy between the projections' layout and the heads' ever exists. Each block holds a
// head's whole key rows in shared memory, copied in with `cp.async` (every copy in flight at
// once): forward one block per 64 query rows, head and batch entry; backward one block per
// head and batch entry with every query row. The products run on tensor cores (`mma.sync`
// m16n8k16: bf16 operands, f32 sums; transposed operands through `ldmatrix.trans`), the
// softmax in f32, as autocast computes attention: the scores in f32, the probabilities
// rounded to bf16 for their product with the values.
//
// Masked keys score -1e18 (a fully masked row is the uniform average, as in the reference);
// keys past `tk` do not exist. Dropout on the probabilities keeps element `index` of the
// `[b, heads, tq, tk]` probabilities when `kept(index, seed, keep)`, the hash of
// `kernels/attention.rs`; the backward kernel draws the same decisions again.

#define PAD 8
// Row strides (in bf16 elements) of the tiles in shared memory: [rows][DH], [DH][KMAX] and
// [KMAX][QMAX]; the padding staggers rows over the banks.
#define LDH (DH + PAD)
#define LDK (KMAX + PAD)
#define LDQ (QMAX + PAD)
// Query rows per forward block: four warps of 16.
#define QTILE 64
// Minus infinity: the score of a key that does not exist.
#define NONE __int_as_float(0xff800000)

__device__ __forceinline__ u32 pack_halves(bf16 lo, bf16 hi) {
    return (u32)lo | ((u32)hi << 16);
}

// Two consecutive bf16 (4-byte aligned).
__device__ __forceinline__ u32 word(const bf16* p) {
    return *reinterpret_cast<const u32*>(p);
}

__device__ __forceinline__ void put_word(bf16* p, u32 w) {
    *reinterpret_cast<u32*>(p) = w;
}

// c += a · b for a 16×16 A, a 16×8 B and a 16×8 f32 C in the fragment layout of `mma.sync`.
__device__ __forceinline__ void mma(float c[4], const u32 a[4], const u32 b[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The address of `p` in the shared state space.
__device__ __forceinline__ u32 shared_address(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// Queues the copy of 16 bytes from global `src` to shared `dst`, or 16 zero bytes when
// `!valid` (`src` is then not read).
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst)),
                 "l"(src), "r"(valid ? 16 : 0));
}

// Waits for this thread's queued copies.
__device__ __forceinline__ void copies_done() {
    asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
}

// The A fragment of the 16×16 block at `p` of a row-major tile (row stride `ld`).
__device__ __forceinline__ void load_a(u32 a[4], const bf16* p, int ld, int lane) {
    const bf16* r = p + (lane >> 2) * ld + 2 * (lane & 3);
    a[0] = word(r);
    a[1] = word(r + 8 * ld);
    a[2] = word(r + 8);
    a[3] = word(r + 8 * ld + 8);
}

// The A fragment (16×16, m × k) whose element (m, k) is p[k * ld + m] (rows of 16 bytes
// aligned).
__device__ __forceinline__ void load_a_columns(u32 a[4], const bf16* p, int ld, int lane) {
    const int q = lane >> 3;
    const bf16* row = p + ((lane & 7) + (q >> 1) * 8) * ld + (q & 1) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                 : "r"(shared_address(row)));
}

// The B fragment (16 deep, 8 wide) whose element (k, n) is p[n * ld + k].
__device__ __forceinline__ void load_b(u32 b[2], const bf16* p, int ld, int lane) {
    const bf16* c = p + (lane >> 2) * ld + 2 * (lane & 3);
    b[0] = word(c);
    b[1] = word(c + 8);
}

// The B fragment whose element (k, n) is p[k * ld + n] (rows of 16 bytes aligned).
__device__ __forceinline__ void load_b_rows(u32 b[2], const bf16* p, int ld, int lane) {
    const bf16* row = p + (lane & 15) * ld;
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(shared_address(row)));
}

// Queues the copy of `limit` rows of DH bf16 (row stride `stride`) into a [limit][LDH] tile,
// zeros past `rows`.
__device__ __forceinline__ void load_rows(bf16* tile, const bf16* src, long long stride,
                                          int rows, int limit) {
    for (int e = threadIdx.x; e < limit * (DH / 8); e += blockDim.x) {
        const int r = e / (DH / 8), c = (e % (DH / 8)) * 8;
        copy16(tile + r * LDH + c, src + (r < rows ? r * stride + c : 0), r < rows);
    }
}

// Copies the mask of a block's rows into `[rows][KMAX]` bytes of shared memory (`rows` 1
// when every query row shares it, `m_q` 0), from row `first` of `mask` (the batch entry's and
// head's), zeros past `tq` and `tk`.
__device__ __forceinline__ void load_mask(unsigned char* tile, const unsigned char* mask,
                                          long long m_q, long long m_k, int first, int rows,
                                          int tq, int tk) {
    for (int e = threadIdx.x; e < rows * KMAX; e += blockDim.x) {
        const int r = e / KMAX, j = e % KMAX, row = first + r;
        tile[e] = (j < tk && row < tq) ? mask[row * m_q + j * m_k] : (unsigned char)0;
    }
}

// The scores of a warp's 16 query rows (`q`, a [16][LDH] block) against KMAX keys (`k`, a
// [KMAX][LDH] tile), as KMAX / 8 C fragments.
__device__ __forceinline__ void scores(float s[KMAX / 8][4], const bf16* q, const bf16* k,
                                       int lane) {
#pragma unroll
    for (int n = 0; n < KMAX / 8; n++) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < DH; kk += 16) {
        u32 a[4];
        load_a(a, q + kk, LDH, lane);
#pragma unroll
        for (int n = 0; n < KMAX / 8; n++) {
            u32 b[2];
            load_b(b, k + n * 8 * LDH + kk, LDH, lane);
            mma(s[n], a, b);
        }
    }
}

// The masked softmax of a warp's scores in place: this lane's rows `local` and `local + 8` of
// the mask tile `ms` (row 0 for every row when `shared_row`), keys past `tk` excluded, masked
// keys at -1e18.
__device__ __forceinline__ void softmax(float s[KMAX / 8][4], const unsigned char* ms,
                                        bool shared_row, int local, int tk, int lane) {
    const int t = lane & 3;
    const unsigned char* rows[2] = {ms + (shared_row ? 0 : local * KMAX),
                                    ms + (shared_row ? 0 : (local + 8) * KMAX)};
    float mx[2] = {NONE, NONE};
#pragma unroll
    for (int n = 0; n < KMAX / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int j = n * 8 + 2 * t + (e & 1);
            float x = s[n][e];
            if (j >= tk) {
                x = NONE;
            } else if (rows[e >> 1][j] != 0) {
                x = -1e18f;
            }
            s[n][e] = x;
            mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
    }
    float sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
#pragma unroll
    for (int n = 0; n < KMAX / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float x = expf(s[n][e] - mx[e >> 1]);
            s[n][e] = x;
            sum[e >> 1] += x;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
        sum[r] = 1.0f / sum[r];
    }
#pragma unroll
    for (int n = 0; n < KMAX / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            s[n][e] *= sum[e >> 1];
        }
    }
}

// out = dropout(softmax(q·kᵀ, mask)) · v for one block of QTILE query rows of one head.
//
// Grid (ceil(tq / QTILE), heads, b), QTILE * 2 threads, dynamic shared memory
// (QTILE + 2 * KMAX) * LDH * 2 bytes for the tiles and KMAX bytes per mask row (QTILE rows
// when the mask has a row per query, `m_q` != 0; else one). Tensors `x` of
// `[b, t, heads * DH]` rows are read at x + b * x_b + t * x_t + head * DH (x_b and x_t
// multiples of 8); the mask `[b, heads, tq, tk]` through its strides (0 where it broadcasts).
extern "C" __global__ void __launch_bounds__(QTILE * 2)
    attention_forward(const bf16* __restrict__ q, long long q_b, long long q_t,
                      const bf16* __restrict__ k, long long k_b, long long k_t,
                      const bf16* __restrict__ v, long long v_b, long long v_t,
                      const unsigned char* __restrict__ mask, long long m_b, long long m_h,
                      long long m_q, long long m_k, bf16* __restrict__ out, long long o_b,
                      long long o_t, int heads, int tq, int tk, u32 seed, float keep) {
    extern __shared__ __align__(16) unsigned char shared[];
    bf16* qs = reinterpret_cast<bf16*>(shared);
    bf16* ks = qs + QTILE * LDH;
    bf16* vs = ks + KMAX * LDH;
    unsigned char* ms = reinterpret_cast<unsigned char*>(vs + KMAX * LDH);
    const int i0 = blockIdx.x * QTILE, h = blockIdx.y, b = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool shared_row = m_q == 0;

    load_rows(qs, q + b * q_b + i0 * q_t + h * DH, q_t, min(QTILE, tq - i0), QTILE);
    load_rows(ks, k + b * k_b + h * DH, k_t, tk, KMAX);
    load_rows(vs, v + b * v_b + h * DH, v_t, tk, KMAX);
    load_mask(ms, mask + b * m_b + h * m_h, m_q, m_k, shared_row ? 0 : i0,
              shared_row ? 1 : QTILE, tq, tk);
    copies_done();
    __syncthreads();

    const int r0 = warp * 16;
    if (i0 + r0 >= tq) {
        return;
    }
    const int g = lane >> 2, t = lane & 3;
    const int ia = i0 + r0 + g;
    float s[KMAX / 8][4];
    scores(s, qs + r0 * LDH, ks, lane);
    softmax(s, ms, shared_row, r0 + g, tk, lane);

    // Dropout, then the probabilities (C fragments of 8 keys, two per A fragment of 16 keys)
    // times the values.
    const long long first = ((long long)(b * heads + h) * tq) * tk;
    const float rescale = 1.0f / keep;
    float o[DH / 8][4];
#pragma unroll
    for (int d = 0; d < DH / 8; d++) {
        o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    }
#pragma unroll
    for (int c16 = 0; c16 < KMAX / 16; c16++) {
        u32 a[4];
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int n = 2 * c16 + half;
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                p[e] = s[n][e];
                if (keep < 1.0f) {
                    const int row = ia + (e >> 1) * 8, j = n * 8 + 2 * t + (e & 1);
                    const u32 index = (u32)(first + (long long)row * tk + j);
                    p[e] = kept(index, seed, keep) ? p[e] * rescale : 0.0f;
                }
            }
            a[2 * half] = pack(p[0], p[1]);
            a[2 * half + 1] = pack(p[2], p[3]);
        }
#pragma unroll
        for (int d = 0; d < DH / 8; d++) {
            u32 bb[2];
            load_b_rows(bb, vs + c16 * 16 * LDH + d * 8, LDH, lane);
            mma(o[d], a, bb);
        }
    }
    bf16* ob = out + b * o_b + h * DH;
#pragma unroll
    for (int d = 0; d < DH / 8; d++) {
        const int col = d * 8 + 2 * t;
        if (ia < tq) {
            put_word(ob + ia * o_t + col, pack(o[d][0], o[d][1]));
        }
        if (ia + 8 < tq) {
            put_word(ob + (ia + 8) * o_t + col, pack(o[d][2], o[d][3]));
        }
    }
}

// The gradients of q, k and v from the output's gradient `go`, for one head of one batch
// entry, every query row (tq <= QMAX) in the block.
//
// Grid (heads, b), QMAX * 2 threads, dynamic shared memory
// (2 * QMAX * LDH + max(2 * KMAX * LDH, 2 * QMAX * LDK)) * 2 bytes for the tiles and KMAX
// bytes per mask row (QMAX rows or one, as forward). Layouts as for the forward kernel; the
// gradients are written in the rows of their operands.
extern "C" __global__ void __launch_bounds__(QMAX * 2)
    attention_backward(const bf16* __restrict__ q, long long q_b, long long q_t,
                       const bf16* __restrict__ k, long long k_b, long long k_t,
                       const bf16* __restrict__ v, long long v_b, long long v_t,
                       const unsigned char* __restrict__ mask, long long m_b, long long m_h,
                       long long m_q, long long m_k, const bf16* __restrict__ go,
                       long long go_b, long long go_t, bf16* __restrict__ dq, long long dq_b,
                       long long dq_t, bf16* __restrict__ dk, long long dk_b, long long dk_t,
                       bf16* __restrict__ dv, long long dv_b, long long dv_t, int heads, int tq,
                       int tk, u32 seed, float keep) {
    extern __shared__ __align__(16) unsigned char shared[];
    bf16* qs = reinterpret_cast<bf16*>(shared);
    bf16* gs = qs + QMAX * LDH;
    bf16* ks = gs + QMAX * LDH;
    bf16* vs = ks + KMAX * LDH;
    // Once the keys and values are no longer read: the dropped probabilities and the scores'
    // gradient, [QMAX][LDK] each, over them.
    bf16* pt = ks;
    bf16* st = pt + QMAX * LDK;
    const int tiles = 2 * KMAX * LDH > 2 * QMAX * LDK ? 2 * KMAX * LDH : 2 * QMAX * LDK;
    unsigned char* ms = reinterpret_cast<unsigned char*>(ks + tiles);
    const int h = blockIdx.x, b = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const bool shared_row = m_q == 0;

    load_rows(qs, q + b * q_b + h * DH, q_t, tq, QMAX);
    load_rows(gs, go + b * go_b + h * DH, go_t, tq, QMAX);
    load_rows(ks, k + b * k_b + h * DH, k_t, tk, KMAX);
    load_rows(vs, v + b * v_b + h * DH, v_t, tk, KMAX);
    load_mask(ms, mask + b * m_b + h * m_h, m_q, m_k, 0, shared_row ? 1 : QMAX, tq, tk);
    copies_done();
    __syncthreads();

    const int r0 = warp * 16;
    const bool active = r0 < tq;
    const int ia = r0 + g;
    // This lane's dropped probabilities (bf16 pairs) and the scores' gradient.
    u32 pd[KMAX / 8][2];
    float s[KMAX / 8][4];
    if (active) {
        scores(s, qs + r0 * LDH, ks, lane);
        softmax(s, ms, shared_row, ia, tk, lane);

        // The dropped probabilities' gradient, go · vᵀ.
        float dp[KMAX / 8][4];
#pragma unroll
        for (int n = 0; n < KMAX / 8; n++) {
            dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < DH; kk += 16) {
            u32 a[4];
            load_a(a, gs + r0 * LDH + kk, LDH, lane);
#pragma unroll
            for (int n = 0; n < KMAX / 8; n++) {
                u32 bb[2];
                load_b(bb, vs + n * 8 * LDH + kk, LDH, lane);
                mma(dp[n], a, bb);
            }
        }
        // Through dropout: dp = dp_dropped · kept / keep, and the dropped probabilities for
        // the values' gradient; then Σ_j p dp per row.
        const long long first = ((long long)(b * heads + h) * tq) * tk;
        const float rescale = 1.0f / keep;
        float dot[2] = {0.0f, 0.0f};
#pragma unroll
        for (int n = 0; n < KMAX / 8; n++) {
            float dropped[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int row = ia + (e >> 1) * 8, j = n * 8 + 2 * t + (e & 1);
                float p = s[n][e], d = dp[n][e], x = p;
                if (row >= tq || j >= tk) {
                    p = d = x = 0.0f;
                } else if (keep < 1.0f) {
                    const u32 index = (u32)(first + (long long)row * tk + j);
                    const bool kp = kept(index, seed, keep);
                    d = kp ? d * rescale : 0.0f;
                    x = kp ? p * rescale : 0.0f;
                }
                s[n][e] = p;
                dp[n][e] = d;
                dropped[e] = x;
                dot[e >> 1] += p * d;
            }
            pd[n][0] = pack(dropped[0], dropped[1]);
            pd[n][1] = pack(dropped[2], dropped[3]);
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 1);
            dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 2);
        }
        // The scores' gradient p (dp - dot), 0 where masked (the mask fill passes none).
#pragma unroll
        for (int n = 0; n < KMAX / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int local = ia + (e >> 1) * 8, j = n * 8 + 2 * t + (e & 1);
                const unsigned char hidden = ms[(shared_row ? 0 : local * KMAX) + j];
                s[n][e] = hidden != 0 ? 0.0f : s[n][e] * (dp[n][e] - dot[e >> 1]);
            }
        }
        // dq = ds · k.
        float acc[DH / 8][4];
#pragma unroll
        for (int d = 0; d < DH / 8; d++) {
            acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.0f;
        }
#pragma unroll
        for (int c16 = 0; c16 < KMAX / 16; c16++) {
            u32 a[4];
            a[0] = pack(s[2 * c16][0], s[2 * c16][1]);
            a[1] = pack(s[2 * c16][2], s[2 * c16][3]);
            a[2] = pack(s[2 * c16 + 1][0], s[2 * c16 + 1][1]);
            a[3] = pack(s[2 * c16 + 1][2], s[2 * c16 + 1][3]);
#pragma unroll
            for (int d = 0; d < DH / 8; d++) {
                u32 bb[2];
                load_b_rows(bb, ks + c16 * 16 * LDH + d * 8, LDH, lane);
                mma(acc[d], a, bb);
            }
        }
        bf16* qb = dq + b * dq_b + h * DH;
#pragma unroll
        for (int d = 0; d < DH / 8; d++) {
            const int col = d * 8 + 2 * t;
            if (ia < tq) {
                put_word(qb + ia * dq_t + col, pack(acc[d][0], acc[d][1]));
            }
            if (ia + 8 < tq) {
                put_word(qb + (ia + 8) * dq_t + col, pack(acc[d][2], acc[d][3]));
            }
        }
    }
    // Every warp is done with the keys and values: their space takes the dropped
    // probabilities and the scores' gradient, row-major (rows past tq are zeros).
    __syncthreads();
    if (active) {
#pragma unroll
        for (int n = 0; n < KMAX / 8; n++) {
            const int j = n * 8 + 2 * t;
            put_word(pt + ia * LDK + j, pd[n][0]);
            put_word(pt + (ia + 8) * LDK + j, pd[n][1]);
            put_word(st + ia * LDK + j, pack(s[n][0], s[n][1]));
            put_word(st + (ia + 8) * LDK + j, pack(s[n][2], s[n][3]));
        }
    }
    __syncthreads();

    // dv = p_droppedᵀ · go and dk = dsᵀ · q, the warps taking 16 keys at a time.
    for (int m = warp; m * 16 < tk; m += QMAX / 16) {
        float av[DH / 8][4], ak[DH / 8][4];
#pragma unroll
        for (int d = 0; d < DH / 8; d++) {
            av[d][0] = av[d][1] = av[d][2] = av[d][3] = 0.0f;
            ak[d][0] = ak[d][1] = ak[d][2] = ak[d][3] = 0.0f;
        }
        for (int kc = 0; kc < tq; kc += 16) {
            u32 ap[4], as[4];
            load_a_columns(ap, pt + kc * LDK + m * 16, LDK, lane);
            load_a_columns(as, st + kc * LDK + m * 16, LDK, lane);
#pragma unroll
            for (int d = 0; d < DH / 8; d++) {
                u32 bo[2], bq[2];
                load_b_rows(bo, gs + kc * LDH + d * 8, LDH, lane);
                load_b_rows(bq, qs + kc * LDH + d * 8, LDH, lane);
                mma(av[d], ap, bo);
                mma(ak[d], as, bq);
            }
        }
        const int ja = m * 16 + g;
        bf16* kb = dk + b * dk_b + h * DH;
        bf16* vb = dv + b * dv_b + h * DH;
#pragma unroll
        for (int d = 0; d < DH / 8; d++) {
            const int col = d * 8 + 2 * t;
            if (ja < tk) {
                put_word(kb + ja * dk_t + col, pack(ak[d][0], ak[d][1]));
                put_word(vb + ja * dv_t + col, pack(av[d][0], av[d][1]));
            }
            if (ja + 8 < tk) {
                put_word(kb + (ja + 8) * dk_t + col, pack(ak[d][2], ak[d][3]));
                put_word(vb + (ja + 8) * dv_t + col, pack(av[d][2], av[d][3]));
            }
        }
    }
}
