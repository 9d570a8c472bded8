// One AdamW update of a parameter, element-wise in f32, for `adamw.rs`: burn's arithmetic
// (`burn_optim::AdamW`), one kernel where burn's operations are about a dozen.
//
// m' = m * beta_1 + g * (1 - beta_1), v' = v * beta_2 + g * g * (1 - beta_2) (m and v taken as 0
// when `fresh`), delta = (m' / correction_1) / (sqrt(v' / correction_2) + epsilon),
// p' = p * keep - delta * lr (keep = 1 - lr * weight_decay).
extern "C" __global__ void adamw(const float* __restrict__ param, const float* __restrict__ grad,
                                 const float* __restrict__ m, const float* __restrict__ v,
                                 float* __restrict__ param_out, float* __restrict__ m_out,
                                 float* __restrict__ v_out, long long n, int fresh,
                                 float beta_1, float beta_2, float factor_1, float factor_2,
                                 float correction_1, float correction_2, float epsilon,
                                 float lr, float keep) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = grad[i];
        const float m1 = fresh ? g * factor_1 : m[i] * beta_1 + g * factor_1;
        const float m2 = fresh ? (g * g) * factor_2 : v[i] * beta_2 + (g * g) * factor_2;
        const float delta = (m1 / correction_1) / (sqrtf(m2 / correction_2) + epsilon);
        const float p = param[i];
        param_out[i] = (keep == 1.0f ? p : p * keep) - delta * lr;
        m_out[i] = m1;
        v_out[i] = m2;
    }
}
