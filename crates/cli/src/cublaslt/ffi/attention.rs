//! Multi-head attention of a `bf16-mixed` training step as two kernels of our own
//! (`attention.cu`, compiled by NVRTC), installed through
//! [`palm_model::attention::set_heads_attention`].
//!
//! Composed from burn's operations and cuBLASLt's strided batches, a training step's attention
//! splits the heads of the projections' `[b, t, h·dh]` rows into `[b, h, t, dh]` copies (the
//! keys, values and the merged output forward, three gradients and the output's backward), two
//! batched products forward and four backward, and the masked softmax with dropout over
//! `[b, h, tq, tk]` scores in f32 and probabilities in bf16 that are stored for the backward
//! pass. At batch 256 that is about 45 ms of a 155 ms step on the H200 (the copies 20 ms, the
//! probabilities' passes 20 ms; `docs/benchmarks.md`). Here the forward pass is one launch
//! that reads each head where the projection wrote it and writes the heads' outputs side by
//! side; the backward pass is one launch that recomputes the probabilities (nothing of size
//! `tq × tk` is stored) and writes the three gradients in their operands' rows. The products run
//! on tensor cores in bf16 with f32 sums, as autocast's; dropout keeps what the composed
//! kernels' hash keeps.
//!
//! Taken: bf16 queries, keys and values (`Narrow::Heads` under `bf16-mixed`), heads of a
//! multiple of 16 up to 128 wide, at most 128 queries and keys, a device of compute capability
//! 8.0 or more. Anything else is handed back to the composed path; `PALM_ATTENTION=composed`
//! does not install them.

use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use burn::prelude::*;
use burn::tensor::{DType, Shape, TensorPrimitive};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::FusionTensor;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cudarc::driver::CudaFunction;
use cudarc::driver::sys::CUfunction_attribute;
use palm_model::attention::HeadsOperands;

use super::step::{Arg, architecture, compile, launch_grid, packed, run};
use super::{Cube, Device, FusionR, Gpu, Handle, with_device};

/// The device code.
const SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("attention.cu"));
/// Query rows per block of the forward kernel (`QTILE` in the source).
const QUERY_TILE: usize = 64;
/// The most queries and keys a kernel holds.
const MAX_LEN: usize = 128;
/// The padding of a tile's rows in shared memory (`PAD`), in elements.
const PAD: usize = 8;

/// The shape class a pair of kernels is compiled for: head width, keys held, query rows held
/// by the backward kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Class {
    dh: usize,
    keys: usize,
    queries: usize,
}

impl Class {
    /// The class of `tq` queries and `tk` keys of width `dh`: lengths rounded up to 64 or 128
    /// (few classes, each compiled once), `None` where the kernels do not apply.
    fn of(dh: usize, tq: usize, tk: usize) -> Option<Self> {
        let held = |n: usize| match n {
            1..=64 => Some(64),
            65..=MAX_LEN => Some(MAX_LEN),
            _ => None,
        };
        (dh.is_multiple_of(16) && (16..=128).contains(&dh)).then_some(())?;
        Some(Self {
            dh,
            keys: held(tk)?,
            queries: held(tq)?,
        })
    }

    /// Dynamic shared memory of the forward kernel, in bytes, with the mask's rows held: one
    /// when every query shares it, else a block's.
    fn forward_shared(self, per_query_mask: bool) -> usize {
        let tiles = (QUERY_TILE + 2 * self.keys) * (self.dh + PAD) * 2;
        tiles + if per_query_mask { QUERY_TILE } else { 1 } * self.keys
    }

    /// Dynamic shared memory of the backward kernel, in bytes (the mask's rows as forward).
    fn backward_shared(self, per_query_mask: bool) -> usize {
        let ldh = self.dh + PAD;
        let overlaid = (2 * self.keys * ldh).max(2 * self.queries * (self.keys + PAD));
        let tiles = (2 * self.queries * ldh + overlaid) * 2;
        tiles + if per_query_mask { self.queries } else { 1 } * self.keys
    }
}

/// A class's compiled kernels.
pub(super) struct Kernels {
    forward: CudaFunction,
    backward: CudaFunction,
}

impl Kernels {
    /// Compiles `attention.cu` for `class` on the device whose context is current.
    fn compile(device: &Device, class: Class) -> Result<Self> {
        let options = vec![
            architecture(device)?,
            format!("-DDH={}", class.dh),
            format!("-DKMAX={}", class.keys),
            format!("-DQMAX={}", class.queries),
        ];
        let what = format!("the attention kernels for {class:?}");
        let names = ["attention_forward", "attention_backward"];
        let [forward, backward] = compile(device, SOURCE, options, &what, names)?;
        let shared = |f: CudaFunction, bytes: usize| -> Result<CudaFunction> {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(|e| anyhow!("{what}: shared memory of {bytes} bytes: {e:?}"))?;
            Ok(f)
        };
        Ok(Self {
            forward: shared(forward, class.forward_shared(true))?,
            backward: shared(backward, class.backward_shared(true))?,
        })
    }
}

/// Runs `f` with `class`'s kernels on `device` (compiled on first use).
fn with_kernels(
    device: &mut Device,
    class: Class,
    f: impl FnOnce(&Kernels) -> Result<()>,
) -> Result<()> {
    if !device.attention.contains_key(&class) {
        let kernels = Kernels::compile(device, class)?;
        device.attention.insert(class, kernels);
    }
    f(&device.attention[&class])
}

/// What both kernels are told besides their tensors.
#[derive(Clone, Copy, Debug)]
struct Params {
    batch: usize,
    heads: usize,
    tq: usize,
    tk: usize,
    class: Class,
    seed: u32,
    keep: f32,
}

/// How a kernel reads a `[b, t, h·dh]` tensor: its rows' strides (the last axis contiguous,
/// both strides multiples of 8 elements for the kernels' 16-byte copies).
fn rows_of(t: CubeTensor<CudaRuntime>) -> (CubeTensor<CudaRuntime>, [i64; 2]) {
    let readable = |t: &CubeTensor<CudaRuntime>| {
        let s = t.meta.strides();
        s[2] == 1 && s[0].is_multiple_of(8) && s[1].is_multiple_of(8)
    };
    let t = if readable(&t) {
        t
    } else {
        crate::kernels::contiguous(t)
    };
    let s = [t.meta.strides()[0] as i64, t.meta.strides()[1] as i64];
    (t, s)
}

/// The mask's strides over `[b, h, tq, tk]`, 0 where it broadcasts, as the kernels take them.
fn mask_strides(mask: &CubeTensor<CudaRuntime>) -> [i64; 4] {
    crate::kernels::mask_strides(mask).map(|s| s as i64)
}

/// An uninitialised packed `[b, t, d]` bf16 tensor on `like`'s device.
fn rows_like(
    like: &CubeTensor<CudaRuntime>,
    b: usize,
    t: usize,
    d: usize,
) -> CubeTensor<CudaRuntime> {
    packed(&like.device, &[b, t, d], DType::BF16)
}

/// Checks that the tensors at `pointers` other than the mask (index 3) start on 16 bytes, as the
/// kernels' copies need (CubeCL's allocations do).
fn check_aligned(pointers: &[u64]) -> Result<()> {
    for (i, p) in pointers.iter().enumerate() {
        if i != 3 && p % 16 != 0 {
            anyhow::bail!("tensor {i} of an attention kernel starts at {p:#x}, not on 16 bytes");
        }
    }
    Ok(())
}

/// The arguments of a `[b, t, h·dh]` tensor at `pointer`: the pointer and its rows' strides.
fn rows_args(pointer: u64, strides: [i64; 2]) -> [Arg; 3] {
    [
        Arg::Ptr(pointer),
        Arg::I64(strides[0]),
        Arg::I64(strides[1]),
    ]
}

/// The closing arguments of both kernels.
fn tail(p: Params) -> [Arg; 5] {
    [
        Arg::I32(p.heads as i32),
        Arg::I32(p.tq as i32),
        Arg::I32(p.tk as i32),
        Arg::I32(p.seed as i32),
        Arg::F32(p.keep),
    ]
}

/// The forward kernel on CubeCL tensors: the heads' outputs `[b, tq, h·dh]` in bf16.
fn forward_kernel(
    [q, k, v]: [CubeTensor<CudaRuntime>; 3],
    mask: CubeTensor<CudaRuntime>,
    p: Params,
) -> CubeTensor<CudaRuntime> {
    let ((q, qs), (k, ks), (v, vs)) = (rows_of(q), rows_of(k), rows_of(v));
    let ms = mask_strides(&mask);
    let d = p.heads * p.class.dh;
    let out = rows_like(&q, p.batch, p.tq, d);
    let os = [(p.tq * d) as i64, d as i64];
    let held = vec![q, k, v, mask, out.clone()];
    run(held, move |device, ptr, stream| {
        check_aligned(ptr)?;
        with_kernels(device, p.class, |kernels| {
            let mut args = Vec::with_capacity(22);
            args.extend(rows_args(ptr[0], qs));
            args.extend(rows_args(ptr[1], ks));
            args.extend(rows_args(ptr[2], vs));
            args.push(Arg::Ptr(ptr[3]));
            args.extend(ms.map(Arg::I64));
            args.extend(rows_args(ptr[4], os));
            args.extend(tail(p));
            let grid = (
                p.tq.div_ceil(QUERY_TILE) as u32,
                p.heads as u32,
                p.batch as u32,
            );
            let shared = p.class.forward_shared(ms[2] != 0) as u32;
            launch_grid(
                &kernels.forward,
                grid,
                2 * QUERY_TILE as u32,
                shared,
                stream,
                args,
            )
        })
    });
    out
}

/// The backward kernel on CubeCL tensors: the gradients of the queries, keys and values, in
/// their rows' shapes, bf16.
fn backward_kernel(
    [q, k, v, g]: [CubeTensor<CudaRuntime>; 4],
    mask: CubeTensor<CudaRuntime>,
    p: Params,
) -> [CubeTensor<CudaRuntime>; 3] {
    let ((q, qs), (k, ks), (v, vs), (g, gs)) = (rows_of(q), rows_of(k), rows_of(v), rows_of(g));
    let ms = mask_strides(&mask);
    let d = p.heads * p.class.dh;
    let dq = rows_like(&q, p.batch, p.tq, d);
    let dk = rows_like(&q, p.batch, p.tk, d);
    let dv = rows_like(&q, p.batch, p.tk, d);
    let (qo, ko) = ([(p.tq * d) as i64, d as i64], [(p.tk * d) as i64, d as i64]);
    let held = vec![q, k, v, mask, g, dq.clone(), dk.clone(), dv.clone()];
    run(held, move |device, ptr, stream| {
        check_aligned(ptr)?;
        with_kernels(device, p.class, |kernels| {
            let mut args = Vec::with_capacity(31);
            args.extend(rows_args(ptr[0], qs));
            args.extend(rows_args(ptr[1], ks));
            args.extend(rows_args(ptr[2], vs));
            args.push(Arg::Ptr(ptr[3]));
            args.extend(ms.map(Arg::I64));
            args.extend(rows_args(ptr[4], gs));
            args.extend(rows_args(ptr[5], qo));
            args.extend(rows_args(ptr[6], ko));
            args.extend(rows_args(ptr[7], ko));
            args.extend(tail(p));
            let shared = p.class.backward_shared(ms[2] != 0) as u32;
            launch_grid(
                &kernels.backward,
                (p.heads as u32, p.batch as u32, 1),
                2 * p.class.queries as u32,
                shared,
                stream,
                args,
            )
        })
    });
    [dq, dk, dv]
}

/// The forward pass as a custom operation of the fusion backend: inputs `[q, k, v, mask]`,
/// output the heads' outputs.
fn fusion_forward(
    q: FusionTensor<FusionR>,
    k: FusionTensor<FusionR>,
    v: FusionTensor<FusionR>,
    mask: FusionTensor<FusionR>,
    p: Params,
) -> FusionTensor<FusionR> {
    #[derive(Debug)]
    struct ForwardOp {
        desc: CustomOpIr,
        p: Params,
    }

    impl Operation<FusionR> for ForwardOp {
        fn execute(&self, handles: &mut HandleContainer<Handle>) {
            let ([q, k, v, mask], [out]) = self.desc.as_fixed();
            let y = forward_kernel(
                [q, k, v].map(|t| handles.get_float_tensor::<Cube>(t)),
                handles.get_bool_tensor::<Cube>(mask),
                self.p,
            );
            handles.register_float_tensor::<Cube>(&out.id, y);
        }
    }

    let client = q.client.clone();
    let streams = OperationStreams::with_inputs([&q, &k, &v, &mask]);
    let d = p.heads * p.class.dh;
    let out = TensorIr::uninit(
        client.create_empty_handle(),
        Shape::new([p.batch, p.tq, d]),
        DType::BF16,
    );
    let desc = CustomOpIr::new(
        "palm_attention_heads",
        &[q.into_ir(), k.into_ir(), v.into_ir(), mask.into_ir()],
        &[out],
    );
    client
        .register(
            streams,
            OperationIr::Custom(desc.clone()),
            ForwardOp { desc, p },
        )
        .into_iter()
        .next()
        .expect("the heads' outputs")
}

/// The backward pass as a custom operation: inputs `[q, k, v, mask, g]`, outputs the
/// gradients of `q`, `k` and `v`.
fn fusion_backward(
    [q, k, v, mask, g]: [FusionTensor<FusionR>; 5],
    p: Params,
) -> [FusionTensor<FusionR>; 3] {
    #[derive(Debug)]
    struct BackwardOp {
        desc: CustomOpIr,
        p: Params,
    }

    impl Operation<FusionR> for BackwardOp {
        fn execute(&self, handles: &mut HandleContainer<Handle>) {
            let ([q, k, v, mask, g], outputs) = self.desc.as_fixed::<5, 3>();
            let grads = backward_kernel(
                [q, k, v, g].map(|t| handles.get_float_tensor::<Cube>(t)),
                handles.get_bool_tensor::<Cube>(mask),
                self.p,
            );
            for (ir, t) in outputs.iter().zip(grads) {
                handles.register_float_tensor::<Cube>(&ir.id, t);
            }
        }
    }

    let client = q.client.clone();
    let streams = OperationStreams::with_inputs([&q, &k, &v, &mask, &g]);
    let d = p.heads * p.class.dh;
    let uninit = |t: usize| {
        TensorIr::uninit(
            client.create_empty_handle(),
            Shape::new([p.batch, t, d]),
            DType::BF16,
        )
    };
    let outputs = [uninit(p.tq), uninit(p.tk), uninit(p.tk)];
    let inputs = [q, k, v, mask, g].map(FusionTensor::into_ir);
    let desc = CustomOpIr::new("palm_attention_heads_backward", &inputs, &outputs);
    let mut out = client
        .register(
            streams,
            OperationIr::Custom(desc.clone()),
            BackwardOp { desc, p },
        )
        .into_iter();
    std::array::from_fn(|_| out.next().expect("a gradient"))
}

/// The largest dynamic shared memory a block may opt into on device 0 (0: unknown), read once.
fn shared_limit(device: &burn_cubecl::cubecl::cuda::CudaDevice) -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        with_device(device.index, |d| {
            use cudarc::driver::sys::CUdevice_attribute;
            let (major, _) = d.ctx.compute_capability()?;
            if major < 8 {
                return Ok(0);
            }
            let optin = d.ctx.attribute(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )?;
            Ok(optin as usize)
        })
        .unwrap_or(0)
    })
}

/// Multi-head attention on the CUDA training backend
/// ([`palm_model::attention::set_heads_attention`]); see the module's header for what it takes.
pub(super) fn autodiff(
    (q, k, v, heads, mask, prob): HeadsOperands<Autodiff<Gpu>>,
) -> Result<Tensor<Autodiff<Gpu>, 3>, Box<HeadsOperands<Autodiff<Gpu>>>> {
    let ([b, tq, d], [bk, tk, dk], [bv, tv, dv]) = (q.dims(), k.dims(), v.dims());
    let [mb, mh, mq, mk] = mask.dims();
    let device = q.device();
    let class = (heads > 0 && d.is_multiple_of(heads))
        .then(|| Class::of(d / heads, tq, tk))
        .flatten();
    let fits =
        |c: Class| c.forward_shared(true).max(c.backward_shared(true)) <= shared_limit(&device);
    let taken = [q.dtype(), k.dtype(), v.dtype()] == [DType::BF16; 3]
        && [bk, bv, tv, dk, dv] == [b, b, tk, d, d]
        && (mb == b || mb == 1)
        && (mh == heads || mh == 1)
        && (mq == tq || mq == 1)
        && mk == tk
        && b > 0
        && class.is_some_and(fits);
    let Some(class) = class.filter(|_| taken) else {
        return Err(Box::new((q, k, v, heads, mask, prob)));
    };

    #[derive(Debug)]
    struct HeadsBackward;

    impl Backward<Gpu, 3> for HeadsBackward {
        /// The queries, keys, values and mask, and the parameters (the dropout's seed).
        type State = ([FusionTensor<FusionR>; 4], Params);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g = grads.consume::<Gpu>(&ops.node);
            let g = super::cast(g, DType::BF16);
            let ([q, k, v, mask], p) = ops.state;
            let gradients = fusion_backward([q, k, v, mask, g], p);
            for (parent, gradient) in ops.parents.into_iter().zip(gradients) {
                if let Some(node) = parent {
                    grads.register::<Gpu>(node.id, gradient);
                }
            }
        }
    }

    let keep = if prob > 0.0 && <Autodiff<Gpu> as Backend>::ad_enabled(&device) {
        (1.0 - prob) as f32
    } else {
        1.0
    };
    let p = Params {
        batch: b,
        heads,
        tq,
        tk,
        class,
        seed: palm_model::grad::next_dropout_seed(),
        keep,
    };
    let [qp, kp, vp] = [q, k, v].map(|t| t.into_primitive().tensor());
    let mask: FusionTensor<FusionR> = mask.into_primitive();
    let inputs = [&qp, &kp, &vp].map(|t| t.primitive.clone());
    let [qi, ki, vi] = inputs.clone();
    let out = fusion_forward(qi, ki, vi, mask.clone(), p);
    let nodes = [qp.node, kp.node, vp.node];
    let out = match HeadsBackward
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let [qi, ki, vi] = inputs;
            prep.finish(([qi, ki, vi, mask], p), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

#[cfg(test)]
mod tests {
    //! Needs a CUDA device: `cargo test -p palm --features cuda attention` on the GPU machine.
    use super::*;
    use burn::tensor::{Distribution, FloatDType};
    use burn_cubecl::cubecl::cuda::CudaDevice;
    use palm_model::attention::MASK_FILL;

    type B = Autodiff<Gpu>;

    /// The CPU backend, which computes the reference.
    type Cpu = Autodiff<burn_ndarray::NdArray<f32>>;

    /// `t` as f32 values.
    fn values(t: Tensor<B, 3>) -> Vec<f32> {
        t.cast(FloatDType::F32).into_data().to_vec::<f32>().unwrap()
    }

    /// The largest difference between `a` and `b` over the largest magnitude of `b`.
    fn relative_error(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            scale > 0.0 && worst.is_finite(),
            "scale {scale}, error {worst}"
        );
        worst / scale
    }

    /// Softmax attention in f32 from burn's operations on the CPU, as the composed path computes
    /// it, and the gradients of `Σ out · weights`: `[out, dq, dk, dv]`.
    fn reference(
        [q, k, v]: [&Tensor<B, 3>; 3],
        heads: usize,
        mask: &Tensor<B, 4, Bool>,
        weights: &Tensor<B, 3>,
    ) -> [Vec<f32>; 4] {
        let device = burn_ndarray::NdArrayDevice::Cpu;
        let cpu = |t: &Tensor<B, 3>| {
            let data = TensorData::new(values(t.clone()), t.dims());
            Tensor::<Cpu, 3>::from_data(data, &device)
        };
        let [q, k, v] = [q, k, v].map(|t| cpu(t).require_grad());
        let mask = Tensor::<Cpu, 4, Bool>::from_data(mask.to_data(), &device);
        let [b, tq, d] = q.dims();
        let tk = k.dims()[1];
        let split =
            |x: Tensor<Cpu, 3>, t: usize| x.reshape([b, t, heads, d / heads]).swap_dims(1, 2);
        let scores = split(q.clone(), tq).matmul(split(k.clone(), tk).swap_dims(2, 3));
        let scores = scores.mask_fill(mask.expand([b, heads, tq, tk]), MASK_FILL);
        let probs = burn::tensor::activation::softmax(scores, 3);
        let out = probs
            .matmul(split(v.clone(), tk))
            .swap_dims(1, 2)
            .reshape([b, tq, d]);
        let grads = (out.clone() * cpu(weights)).sum().backward();
        let flat =
            |t: Tensor<burn_ndarray::NdArray<f32>, 3>| t.into_data().to_vec::<f32>().unwrap();
        [
            flat(out.inner()),
            flat(q.grad(&grads).expect("dq")),
            flat(k.grad(&grads).expect("dk")),
            flat(v.grad(&grads).expect("dv")),
        ]
    }

    /// Random bf16 operands `[b, t, d]`, untracked (the queries scaled as the model scales them).
    fn operand(shape: [usize; 3], scale: f64, device: &CudaDevice) -> Tensor<B, 3> {
        Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), device)
            .mul_scalar(scale)
            .cast(FloatDType::BF16)
            .detach()
    }

    /// A mask `[b, 1, rows, tk]` hiding key `j` of row `i` of entry `e` where `hidden(e, i, j)`.
    fn mask(
        [b, rows, tk]: [usize; 3],
        hidden: impl Fn(usize, usize, usize) -> bool,
        device: &CudaDevice,
    ) -> Tensor<B, 4, Bool> {
        let values: Vec<bool> = (0..b * rows * tk)
            .map(|n| hidden(n / (rows * tk), n / tk % rows, n % tk))
            .collect();
        Tensor::from_data(TensorData::new(values, [b, 1, rows, tk]), device)
    }

    #[test]
    fn the_kernels_match_softmax_attention_and_its_gradients() {
        let device = CudaDevice::new(0);
        // (b, heads, tq, tk, dh): tiles cut short, the encoder's, the decoder's self- and
        // cross-attention, and lengths past one 64-row class.
        let shapes = [
            (2, 3, 5, 7, 16),
            (2, 12, 128, 128, 64),
            (2, 8, 64, 64, 96),
            (2, 8, 64, 128, 96),
            (3, 2, 70, 100, 32),
        ];
        for (b, heads, tq, tk, dh) in shapes {
            let d = heads * dh;
            let scale = 1.0 / (dh as f64).sqrt();
            let q = operand([b, tq, d], scale, &device);
            let k = operand([b, tk, d], 1.0, &device);
            let v = operand([b, tk, d], 1.0, &device);
            let weights =
                Tensor::<B, 3>::random([b, tq, d], Distribution::Normal(0.0, 1.0), &device);
            // Source padding, and a causal mask whose entry 1 hides every key of its row 1
            // (the reference's uniform average).
            let masks = [
                mask([b, 1, tk], |e, _, j| j + e >= tk && j > 0, &device),
                mask([b, tq, tk], |e, i, j| j > i || (e == 1 && i == 1), &device),
            ];
            for mask in masks {
                let what = format!("[{b}, {heads}, {tq}, {tk}, {dh}], mask {:?}", mask.dims());
                let [ql, kl, vl] = [&q, &k, &v].map(|t| t.clone().require_grad());
                let y = autodiff((ql.clone(), kl.clone(), vl.clone(), heads, mask.clone(), 0.0))
                    .unwrap_or_else(|_| panic!("{what}: taken"));
                assert_eq!(y.dtype(), DType::BF16, "{what}: output in bf16");
                let grads = (y.clone().cast(FloatDType::F32) * weights.clone())
                    .sum()
                    .backward();
                let gradient = |t: &Tensor<B, 3>| {
                    values(Tensor::from_inner(t.grad(&grads).expect("a gradient")))
                };
                let ours = [values(y), gradient(&ql), gradient(&kl), gradient(&vl)];
                let expected = reference([&q, &k, &v], heads, &mask, &weights);
                for (name, (a, e)) in ["out", "dq", "dk", "dv"]
                    .iter()
                    .zip(ours.iter().zip(&expected))
                {
                    let error = relative_error(a, e);
                    eprintln!("{what} {name}: {error:.2e}");
                    assert!(error < 2e-2, "{what} {name}: relative error {error}");
                }
            }
        }
    }

    #[test]
    fn dropout_drops_and_the_backward_pass_draws_the_forward_passes_mask() {
        let device = CudaDevice::new(0);
        let (b, heads, t, dh) = (2, 12, 128, 64);
        let d = heads * dh;
        let q = operand([b, t, d], 0.125, &device);
        let k = operand([b, t, d], 1.0, &device);
        let v = operand([b, t, d], 1.0, &device);
        let pad = mask([b, 1, t], |e, _, j| j + 3 * e >= t && j > 0, &device);
        let call = |prob: f64, v: Tensor<B, 3>| {
            autodiff((q.clone(), k.clone(), v, heads, pad.clone(), prob))
                .unwrap_or_else(|_| panic!("taken"))
        };
        let v_leaf = v.clone().require_grad();
        let y = call(0.3, v_leaf.clone()).cast(FloatDType::F32);
        let plain = call(0.0, v.clone()).cast(FloatDType::F32);
        // Dropout changes the output.
        let changed = relative_error(&values(y.clone()), &values(plain));
        assert!(changed > 0.1, "dropout changed the output by {changed}");
        // The output is linear in v through the dropped probabilities M: with the loss
        // Σ y·ȳ (ȳ held fixed), dv = Mᵀ ȳ and Σ dv·v = Σ ȳ·(M v) = Σ y·ȳ, if and only if the
        // backward pass drops what the forward pass dropped.
        let fixed = y.clone().detach();
        let loss = (y * fixed.clone()).sum();
        let total: f32 = loss.clone().into_scalar().elem();
        let grads = loss.backward();
        let dv = Tensor::<B, 3>::from_inner(v_leaf.grad(&grads).expect("the values' gradient"));
        let by_gradient: f32 = (dv.cast(FloatDType::F32) * v.cast(FloatDType::F32))
            .sum()
            .into_scalar()
            .elem();
        let gap = (by_gradient - total).abs() / total;
        assert!(gap < 2e-2, "Σ dv·v {by_gradient} against Σ y·ȳ {total}");
    }
}
