//! The cuBLASLt calls and burn's three backend levels (see the parent module).

// The cuBLASLt calls are FFI through cudarc's result API.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result, anyhow, bail};
use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, Shape, TensorPrimitive};

use super::{MIN_MACS, Operand, operand, routed};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn_autodiff::{Autodiff, NodeId};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::Runtime;
use burn_cubecl::cubecl::client::ComputeClient;
use burn_cubecl::cubecl::cuda::{CudaDevice, CudaRuntime};
use burn_cubecl::cubecl::device_handle::DeviceHandle;
use burn_cubecl::cubecl::server::ComputeServer;
use burn_cubecl::cubecl::stream_id::StreamId;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaContext, CudaStream};

/// burn's CubeCL backend on CUDA ([`crate::device::GpuUnfused`]), and under fusion
/// ([`crate::device::Gpu`]).
type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;
type Gpu = Fusion<Cube>;
type FusionR = <Cube as FusionBackend>::FusionRuntime;
type Handle = <FusionR as FusionRuntime>::FusionHandle;

/// cuBLASLt's workspace: 32 MiB, what NVIDIA recommends for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Routes the CUDA backend's linear layers and output projections (inference and training)
/// through cuBLASLt on device `index`, unless `PALM_GEMM=burn`. Fails, leaving burn's matmul in
/// place, when cuBLASLt cannot be loaded or initialised.
pub fn install(index: usize) -> Result<()> {
    if std::env::var("PALM_GEMM").is_ok_and(|v| v == "burn") {
        return Ok(());
    }
    // Loads libcublasLt and creates the handle now, so a missing library is an error here and
    // not a panic in the middle of a step.
    std::panic::catch_unwind(|| with_device(index, |_| Ok(())))
        .map_err(|_| anyhow!("cuBLASLt could not be loaded (libcublasLt.so)"))??;
    // Finds CubeCL's stream for this thread now (a missing libcupti is reported once, here).
    let client = CudaRuntime::client(&CudaDevice::new(index));
    let found = client
        .exclusive(|| stream::backend_stream(&client).is_some())
        .unwrap_or(false);
    let _ = IN_STREAM.set(found);
    palm_model::dense::set_gemm::<Cube>(Some(|a, b| wrap(routed_cube_gemm(unwrap(a), unwrap(b)))));
    palm_model::dense::set_gemm::<Gpu>(Some(|a, b| wrap(fusion_gemm(unwrap(a), unwrap(b)))));
    palm_model::dense::set_gemm::<Autodiff<Gpu>>(Some(|a, b| {
        wrap(autodiff_gemm(unwrap(a), unwrap(b)))
    }));
    if !std::env::var("PALM_AFFINE").is_ok_and(|v| v == "composed") {
        palm_model::dense::set_affine::<Cube>(Some(affine::cube));
        palm_model::dense::set_affine::<Gpu>(Some(affine::fusion));
        palm_model::dense::set_affine::<Autodiff<Gpu>>(Some(affine::autodiff));
        // The optimizer's bf16 copies of the parameters, read by the training affine map:
        // opt-in (`PALM_SHADOW=on`), they remove 300 launches a step but cost the host more
        // than that (docs/benchmarks.md, item 35).
        if std::env::var("PALM_SHADOW").is_ok_and(|v| v == "on") {
            palm_model::dense::set_shadow::<Gpu>(Some(shadow::store));
        }
    }
    step::install();
    if !std::env::var("PALM_ADAMW").is_ok_and(|v| v == "burn") {
        palm_train::optim::set_adamw_step::<Gpu>(Some(adamw::step));
    }
    if !std::env::var("PALM_GELU").is_ok_and(|v| v == "burn") {
        palm_model::grad::set_gelu::<Autodiff<Gpu>>(Some(gelu::autodiff));
        palm_model::grad::set_gelu_tanh::<Autodiff<Gpu>>(Some(gelu::autodiff_tanh));
    }
    if !std::env::var("PALM_DROPOUT").is_ok_and(|v| v == "burn") {
        palm_model::grad::set_dropout::<Autodiff<Gpu>>(Some(dropout::autodiff));
    }
    if !std::env::var("PALM_ATTENTION").is_ok_and(|v| v == "composed") {
        palm_model::attention::set_heads_attention::<Autodiff<Gpu>>(Some(attention::autodiff));
    }
    match std::env::var("PALM_ATTENTION_GEMM").as_deref() {
        Ok("burn") => {}
        Ok("recopy") => palm_model::dense::set_batched::<Autodiff<Gpu>>(Some(batched::autodiff)),
        _ => palm_model::dense::set_batched::<Autodiff<Gpu>>(Some(batched::autodiff_kept)),
    }
    Ok(())
}

fn unwrap<B: Backend>(t: Tensor<B, 2>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn wrap<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// A custom operation of the fusion backend over float tensors: `f` computes its outputs from
/// its inputs' CubeCL tensors when the stream executes it.
struct FloatOp<F> {
    desc: CustomOpIr,
    f: F,
}

impl<F> std::fmt::Debug for FloatOp<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FloatOp").field("desc", &self.desc).finish()
    }
}

impl<F> Operation<FusionR> for FloatOp<F>
where
    F: Fn(Vec<CubeTensor<CudaRuntime>>) -> Vec<CubeTensor<CudaRuntime>> + Send + Sync,
{
    fn execute(&self, handles: &mut HandleContainer<Handle>) {
        let inputs = self
            .desc
            .inputs
            .iter()
            .map(|t| handles.get_float_tensor::<Cube>(t))
            .collect();
        for (ir, t) in self.desc.outputs.iter().zip((self.f)(inputs)) {
            handles.register_float_tensor::<Cube>(&ir.id, t);
        }
    }
}

/// Registers `f` as the custom operation `name` of the fusion backend on the float `inputs`,
/// with outputs of `outputs`' shapes and types.
fn float_op(
    name: &'static str,
    inputs: Vec<FusionTensor<FusionR>>,
    outputs: Vec<(Shape, DType)>,
    f: impl Fn(Vec<CubeTensor<CudaRuntime>>) -> Vec<CubeTensor<CudaRuntime>> + Send + Sync + 'static,
) -> Vec<FusionTensor<FusionR>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outputs: Vec<TensorIr> = outputs
        .into_iter()
        .map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype))
        .collect();
    let irs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new(name, &irs, &outputs);
    client.register(
        streams,
        OperationIr::Custom(desc.clone()),
        FloatOp { desc, f },
    )
}

/// Whether [`install`] found CubeCL's stream for its thread (products then do not drain).
static IN_STREAM: OnceLock<bool> = OnceLock::new();

/// Where products run, for reports: `Some(true)` on CubeCL's stream, `Some(false)` on this
/// module's with a drain each, `None` when cuBLASLt is not installed.
pub fn on_backend_stream() -> Option<bool> {
    IN_STREAM.get().copied()
}

/// [`MIN_MACS`], or `PALM_GEMM_MIN_MACS`.
fn min_macs() -> usize {
    static MIN: OnceLock<usize> = OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("PALM_GEMM_MIN_MACS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MIN_MACS)
    })
}

fn dims2(dims: &[usize]) -> [usize; 2] {
    [dims[0], dims[1]]
}

/// `a · b` on the autodiff backend: cuBLASLt forward, and its backward pass through
/// [`fusion_gemm`] too.
fn autodiff_gemm(
    a: FloatTensor<Autodiff<Gpu>>,
    b: FloatTensor<Autodiff<Gpu>>,
) -> FloatTensor<Autodiff<Gpu>> {
    #[derive(Debug)]
    struct GemmBackward;

    impl Backward<Gpu, 2> for GemmBackward {
        type State = (Option<NodeId>, Option<NodeId>);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            checkpointer: &mut Checkpointer,
        ) {
            let (a, b) = ops.state;
            let a = a.map(|id| checkpointer.retrieve_node_output::<FloatTensor<Gpu>>(id));
            let b = b.map(|id| checkpointer.retrieve_node_output::<FloatTensor<Gpu>>(id));
            binary::<Gpu, _, _>(
                ops.parents,
                ops.node,
                grads,
                |grad| fusion_gemm(grad, Gpu::float_transpose(b.expect("b kept for dA"))),
                |grad| fusion_gemm(Gpu::float_transpose(a.expect("a kept for dB")), grad),
            );
        }
    }

    let (a_tracked, b_tracked) = (a.is_tracked(), b.is_tracked());
    match GemmBackward
        .prepare::<NoCheckpointing>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            // dA needs b, dB needs a.
            let a_state = b_tracked.then(|| prep.checkpoint(&a));
            let b_state = a_tracked.then(|| prep.checkpoint(&b));
            prep.finish((a_state, b_state), fusion_gemm(a.primitive, b.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(fusion_gemm(a.primitive, b.primitive)),
    }
}

/// `a · b` on the fusion backend: a custom operation in `a`'s stream, or burn's matmul for
/// products cuBLASLt does not take.
fn fusion_gemm(a: FusionTensor<FusionR>, b: FusionTensor<FusionR>) -> FusionTensor<FusionR> {
    let ([m, k], [_, n]) = (dims2(&a.shape), dims2(&b.shape));
    if a.dtype != b.dtype || !routed(a.dtype, m, k, n, min_macs()) {
        return Gpu::float_matmul(a, b);
    }
    let dtype = a.dtype;
    fusion_product(a, b, dtype, Extra::None).0
}

/// `t` in `dtype` (itself when it is already).
fn cast(t: FusionTensor<FusionR>, dtype: DType) -> FusionTensor<FusionR> {
    if t.dtype == dtype {
        t
    } else {
        Gpu::float_cast(t, dtype.into())
    }
}

/// [`cube_product`] on the fusion backend: a custom operation in the operands' streams.
fn fusion_product(
    a: FusionTensor<FusionR>,
    b: FusionTensor<FusionR>,
    out_dtype: DType,
    extra: Extra<FusionTensor<FusionR>>,
) -> (FusionTensor<FusionR>, Option<FusionTensor<FusionR>>) {
    /// Inputs `[a, b]` or `[a, b, bias]`; outputs `[product]` or `[product, sums]`.
    #[derive(Debug)]
    struct ProductOp {
        desc: CustomOpIr,
        out: DType,
    }

    impl Operation<FusionR> for ProductOp {
        fn execute(&self, handles: &mut HandleContainer<Handle>) {
            let (inputs, outputs) = (&self.desc.inputs, &self.desc.outputs);
            let a = handles.get_float_tensor::<Cube>(&inputs[0]);
            let b = handles.get_float_tensor::<Cube>(&inputs[1]);
            let extra = match (inputs.get(2), outputs.len()) {
                (Some(bias), _) => Extra::Bias(handles.get_float_tensor::<Cube>(bias)),
                (None, 2) => Extra::BiasGrad,
                _ => Extra::None,
            };
            let (out, sums) = cube_product(a, b, self.out, extra);
            handles.register_float_tensor::<Cube>(&outputs[0].id, out);
            if let (Some(sums), Some(ir)) = (sums, outputs.get(1)) {
                handles.register_float_tensor::<Cube>(&ir.id, sums);
            }
        }
    }

    let ([m, _], [_, n]) = (dims2(&a.shape), dims2(&b.shape));
    let client = a.client.clone();
    let uninit = |shape: Shape| TensorIr::uninit(client.create_empty_handle(), shape, out_dtype);
    let mut outputs = vec![uninit(Shape::new([m, n]))];
    let streams = match &extra {
        Extra::Bias(bias) => OperationStreams::with_inputs([&a, &b, bias]),
        _ => OperationStreams::with_inputs([&a, &b]),
    };
    let mut inputs = vec![a.into_ir(), b.into_ir()];
    match extra {
        Extra::Bias(bias) => inputs.push(bias.into_ir()),
        Extra::BiasGrad => outputs.push(uninit(Shape::new([n]))),
        Extra::None => {}
    }
    let desc = CustomOpIr::new("palm_cublaslt_product", &inputs, &outputs);
    let mut results = client
        .register(
            streams,
            OperationIr::Custom(desc.clone()),
            ProductOp {
                desc,
                out: out_dtype,
            },
        )
        .into_iter();
    let out = results.next().expect("the product");
    (out, results.next())
}

/// `a · b` on the backend without fusion (inference, [`crate::device::GpuUnfused`]): cuBLASLt,
/// or burn's matmul for products cuBLASLt does not take.
fn routed_cube_gemm(
    a: CubeTensor<CudaRuntime>,
    b: CubeTensor<CudaRuntime>,
) -> CubeTensor<CudaRuntime> {
    let ([m, k], [_, n]) = (dims2(a.meta.shape()), dims2(b.meta.shape()));
    if a.dtype != b.dtype || !routed(a.dtype, m, k, n, min_macs()) {
        return Cube::float_matmul(a, b);
    }
    cube_gemm(a, b)
}

/// `a · b` for CubeCL tensors, through cuBLASLt on the tensors' device.
fn cube_gemm(a: CubeTensor<CudaRuntime>, b: CubeTensor<CudaRuntime>) -> CubeTensor<CudaRuntime> {
    let dtype = a.dtype;
    cube_product(a, b, dtype, Extra::None).0
}

/// What a [`cube_product`] does besides the product.
enum Extra<T> {
    None,
    /// Adds this bias `[n]` (in the result's type) to every row.
    Bias(T),
    /// Also returns the column sums of `b` (`[n]`, in the result's type): the bias gradient
    /// when `b` is the output's gradient.
    BiasGrad,
}

/// Whether a product has fallen back from an epilogue cuBLASLt has no algorithm for (reported
/// once).
static EPILOGUE_FELL_BACK: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// `a · b` (`[m, k] · [k, n]`, operands of one type) for CubeCL tensors through cuBLASLt on
/// the tensors' device, written in `out_dtype`, with the bias added or its gradient taken in
/// the product's epilogue (`extra`; the bias in its own type, the gradient in `out_dtype`):
/// one launch where burn needs a product, casts and a reduction.
fn cube_product(
    a: CubeTensor<CudaRuntime>,
    b: CubeTensor<CudaRuntime>,
    out_dtype: DType,
    extra: Extra<CubeTensor<CudaRuntime>>,
) -> (CubeTensor<CudaRuntime>, Option<CubeTensor<CudaRuntime>>) {
    let layout =
        |t: &CubeTensor<CudaRuntime>| operand(dims2(t.meta.shape()), dims2(t.meta.strides()));
    // A matrix whose rows and columns are both strided is copied first.
    let readable = |t: CubeTensor<CudaRuntime>| match layout(&t) {
        Some(l) => (t, l),
        None => {
            let t = burn_cubecl::kernel::into_contiguous(t);
            let l = layout(&t).expect("a contiguous matrix is row-major");
            (t, l)
        }
    };
    let empty = |like: &CubeTensor<CudaRuntime>, shape: Shape| {
        burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
            like.client.clone(),
            like.device.clone(),
            shape,
            out_dtype,
        )
    };
    let ([m, _], [_, n]) = (dims2(a.meta.shape()), dims2(b.meta.shape()));
    let (a, a_layout) = readable(a);
    let (b, b_layout) = readable(b);
    let out = empty(&a, Shape::new([m, n]));
    assert_eq!(dims2(out.meta.strides()), [n, 1], "a contiguous output");
    let (epilogue, vector) = match &extra {
        Extra::None => (Epilogue::None, None),
        Extra::Bias(bias) => (
            Epilogue::Bias,
            Some(burn_cubecl::kernel::into_contiguous(bias.clone())),
        ),
        Extra::BiasGrad => (Epilogue::BiasGrad, Some(empty(&a, Shape::new([n])))),
    };

    // Row-major C = A · B is column-major Cᵀ = Bᵀ · Aᵀ: cuBLASLt's first operand is B, and a
    // row-major result's columns are its rows (the bias's and the sums' axis).
    let problem = Problem {
        dtype: a.dtype,
        out: out_dtype,
        vector: vector.as_ref().map_or(out_dtype, |v| v.dtype),
        epilogue,
        first: b_layout,
        second: a_layout,
        batch: 1,
        batch_strides: [0; 3],
        m: n as u64,
        n: m as u64,
        align: [0; 3],
    };
    let result = enqueue(problem, [&b, &a, &out], vector.as_ref());
    match result {
        Ok(()) => (out, vector.filter(|_| epilogue == Epilogue::BiasGrad)),
        Err(e) if e.is::<EpilogueUnsupported>() => {
            if !EPILOGUE_FELL_BACK.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("{e} ([{m}, ?] x [?, {n}]): CubeCL's kernels do its work");
            }
            product_then_extra(a, b, out_dtype, extra)
        }
        Err(e) => panic!("cuBLASLt [{m}, ?] x [?, {n}] in {:?}: {e:#}", a.dtype),
    }
}

/// Queues `problem` for `[first, second, result]` (and the bias or its gradient), its
/// alignments read from their pointers: on CubeCL's device thread, after every operation
/// queued before it (the tensors' memory), then on CubeCL's own stream (no wait for the
/// device) or, where that stream is unknown, on this module's after draining CubeCL's.
///
/// The first product of each problem waits for the device thread to run it (an epilogue
/// cuBLASLt has no algorithm for comes back as an error, and the caller does its work with
/// CubeCL's kernels); a problem that has run once is then handed to the device thread without
/// waiting, as CubeCL queues its own kernels, so the calling thread goes on issuing the step
/// while the device thread launches (`PALM_GEMM_SUBMIT=wait` waits for every product). An
/// error there (none is expected of a problem that ran) is reported by the next product.
fn enqueue(
    problem: Problem,
    tensors: [&CubeTensor<CudaRuntime>; 3],
    vector: Option<&CubeTensor<CudaRuntime>>,
) -> Result<()> {
    if let Some(e) = QUEUED_ERROR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        bail!("an earlier cuBLASLt product failed on the device thread: {e:#}");
    }
    let client = tensors[0].client.clone();
    let index = tensors[0].device.index;
    // Queued only onto CubeCL's own stream, found earlier for this stream id (the task cannot
    // drain the device or search for the stream: the device thread's state is borrowed to it).
    let queued = submit_without_waiting() && ran(&problem);
    if let Some(cuda_stream) = queued.then(stream::known_stream).flatten() {
        let tensors = tensors.map(Clone::clone);
        let vector = vector.cloned();
        // A raw stream is not `Send`: it crosses to the device thread as a number.
        let cuda_stream = cuda_stream as usize;
        let handle =
            DeviceHandle::<<CudaRuntime as Runtime>::Server>::new(tensors[0].device.to_id());
        handle.submit(move |server| {
            // The caller's stream id, which the device thread runs this task under.
            let id = StreamId::current();
            let mut resource = |t: &CubeTensor<CudaRuntime>| {
                server
                    .get_resource(t.handle.clone().binding(), id)
                    .map_err(|e| anyhow!("a CUDA tensor's memory: {e:?}"))
            };
            let mut run = || -> Result<()> {
                let held = [
                    resource(&tensors[0])?,
                    resource(&tensors[1])?,
                    resource(&tensors[2])?,
                ];
                let vector = vector.as_ref().map(&mut resource).transpose()?;
                let pointers = held.each_ref().map(|r| r.resource().ptr);
                let vector_ptr = vector.as_ref().map(|r| r.resource().ptr);
                matmul_at(problem, index, pointers, vector_ptr, Some(cuda_stream as _))
            };
            if let Err(e) = run() {
                *QUEUED_ERROR.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        });
        return Ok(());
    }
    let result = client
        .exclusive(|| run_product(problem, &client, index, tensors, vector))
        .map_err(|e| anyhow!("CubeCL's device thread: {e:?}"))
        .and_then(|r| r);
    if result.is_ok() {
        RAN.lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Default::default)
            .insert(problem);
    }
    result
}

/// Problems (alignments aside) that have run: [`enqueue`] does not wait for them again.
static RAN: Mutex<Option<std::collections::HashSet<Problem>>> = Mutex::new(None);
/// An error of a product [`enqueue`] did not wait for, for the next product to report.
static QUEUED_ERROR: Mutex<Option<anyhow::Error>> = Mutex::new(None);

fn ran(problem: &Problem) -> bool {
    RAN.lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|ran| ran.contains(problem))
}

/// Whether products that have run once are queued without waiting (`PALM_GEMM_SUBMIT=wait`
/// says no), read once.
fn submit_without_waiting() -> bool {
    static QUEUE: OnceLock<bool> = OnceLock::new();
    *QUEUE.get_or_init(|| std::env::var("PALM_GEMM_SUBMIT").map_or(true, |v| v != "wait"))
}

/// Runs `problem` on device `index` for the operands and the result at `pointers` (their
/// alignments read from them, at most 256 bytes) and the bias or its gradient at `vector`, on
/// `stream` (`None`: this module's own, after the caller has drained CubeCL's).
fn matmul_at(
    mut problem: Problem,
    index: usize,
    pointers: [u64; 3],
    vector: Option<u64>,
    stream: Option<sys::cudaStream_t>,
) -> Result<()> {
    problem.align = pointers.map(|p| (p & p.wrapping_neg()).min(256) as u32);
    with_device(index, |d| d.matmul(&problem, pointers, vector, stream))
}

/// [`enqueue`]'s product, on CubeCL's device thread.
fn run_product(
    problem: Problem,
    client: &ComputeClient<CudaRuntime>,
    index: usize,
    tensors: [&CubeTensor<CudaRuntime>; 3],
    vector: Option<&CubeTensor<CudaRuntime>>,
) -> Result<()> {
    // Errors, not panics: this runs on CubeCL's device thread.
    let resource = |t: &CubeTensor<CudaRuntime>| {
        client
            .get_resource(t.handle.clone())
            .map_err(|e| anyhow!("a CUDA tensor's memory: {e:?}"))
    };
    let held = tensors.map(resource);
    let [first, second, out] = held;
    let (first, second, out) = (first?, second?, out?);
    let rvector = vector.map(resource).transpose()?;
    let pointers = [
        first.resource().ptr,
        second.resource().ptr,
        out.resource().ptr,
    ];
    let vector_ptr = rvector.as_ref().map(|r| r.resource().ptr);
    let stream = stream::backend_stream(client);
    if stream.is_none() {
        burn_cubecl::cubecl::future::block_on(client.sync())
            .map_err(|e| anyhow!("the CUDA stream synchronises: {e:?}"))?;
    }
    let result = matmul_at(problem, index, pointers, vector_ptr, stream);
    drop((first, second, out, rvector));
    result
}

/// [`cube_product`]'s result without an epilogue: the product, then the bias added or the
/// column sums taken by CubeCL's kernels.
fn product_then_extra(
    a: CubeTensor<CudaRuntime>,
    b: CubeTensor<CudaRuntime>,
    out_dtype: DType,
    extra: Extra<CubeTensor<CudaRuntime>>,
) -> (CubeTensor<CudaRuntime>, Option<CubeTensor<CudaRuntime>>) {
    let n = dims2(b.meta.shape())[1];
    let sums = matches!(extra, Extra::BiasGrad).then(|| {
        let b = Cube::float_cast(b.clone(), out_dtype.into());
        Cube::float_reshape(Cube::float_sum_dim(b, 0), Shape::new([n]))
    });
    let out = cube_product(a, b, out_dtype, Extra::None).0;
    let out = match extra {
        Extra::Bias(bias) => {
            let bias = Cube::float_reshape(bias, Shape::new([1, n]));
            let out = Cube::float_cast(out, bias.dtype.into());
            Cube::float_cast(Cube::float_add(out, bias), out_dtype.into())
        }
        _ => out,
    };
    (out, sums)
}

/// One product as cuBLASLt sees it (column-major): `D [m, n] = op(first) · op(second)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Problem {
    /// The operands' type.
    dtype: DType,
    /// The result's: f32 for bf16 operands under `bf16-mixed` (bf16 for an inner activation).
    out: DType,
    /// The bias's or the bias gradient's (the tensors' own type).
    vector: DType,
    epilogue: Epilogue,
    first: Operand,
    second: Operand,
    /// Products in the batch (1: one product), and the element offsets between consecutive
    /// ones of the first operand, the second and the result.
    batch: u64,
    batch_strides: [i64; 3],
    m: u64,
    n: u64,
    /// Alignment in bytes (at most 256) of A, B and D: the heuristic picks kernels for it.
    align: [u32; 3],
}

/// What cuBLASLt does after the product (column-major `D [m, n]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Epilogue {
    /// Nothing.
    None,
    /// Adds a bias `[m]` to every column (a row-major result's rows).
    Bias,
    /// Also writes the sums of the first operand over the product's inner dimension, `[m]`:
    /// the bias gradient, when the first operand is the output's gradient.
    BiasGrad,
}

impl Epilogue {
    fn code(self) -> sys::cublasLtEpilogue_t {
        use sys::cublasLtEpilogue_t::{
            CUBLASLT_EPILOGUE_BGRADA, CUBLASLT_EPILOGUE_BIAS, CUBLASLT_EPILOGUE_DEFAULT,
        };
        match self {
            Self::None => CUBLASLT_EPILOGUE_DEFAULT,
            Self::Bias => CUBLASLT_EPILOGUE_BIAS,
            Self::BiasGrad => CUBLASLT_EPILOGUE_BGRADA,
        }
    }
}

/// cuBLASLt found no algorithm for an epilogue: the caller does its work with CubeCL's
/// kernels instead.
#[derive(Debug)]
struct EpilogueUnsupported(Epilogue);

impl std::fmt::Display for EpilogueUnsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuBLASLt has no algorithm with the {:?} epilogue",
            self.0
        )
    }
}

impl std::error::Error for EpilogueUnsupported {}

/// The descriptors and algorithm for one [`Problem`], made once.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

/// cuBLASLt's state for one device: its handle, a stream of its own (for when CubeCL's is
/// unknown), a workspace per stream it runs on, and plans.
struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    handle: sys::cublasLtHandle_t,
    /// Keyed by stream: products in one stream run in order and may share one workspace.
    workspaces: HashMap<usize, u64>,
    plans: HashMap<Problem, Plan>,
    /// Problems whose epilogue cuBLASLt has no algorithm for: asked once each.
    no_epilogue: std::collections::HashSet<Problem>,
    /// The decoder step's kernels, compiled on first use.
    step: Option<step::Kernels>,
    /// The training attention's kernels per shape class, compiled on first use.
    attention: HashMap<attention::Class, attention::Kernels>,
    /// The optimizer's kernel, compiled on first use.
    adamw: Option<cudarc::driver::CudaFunction>,
    /// The training GELU's kernels, compiled on first use.
    gelu: Option<gelu::Kernels>,
    /// The training dropout's kernels, compiled on first use.
    dropout: Option<dropout::Kernels>,
    /// The training layer norm's kernels per row width, compiled on first use.
    layer_norm: HashMap<usize, layer_norm::Kernels>,
}

// The raw cuBLASLt handles are used under the `DEVICES` mutex only.
unsafe impl Send for Device {}

static DEVICES: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();

/// Runs `f` with device `index`'s cuBLASLt state (made on first use), its context current.
fn with_device<T>(index: usize, f: impl FnOnce(&mut Device) -> Result<T>) -> Result<T> {
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let device = match devices.entry(index) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(Device::new(index)?),
    };
    device.ctx.bind_to_thread()?;
    f(device)
}

/// cuBLASLt's name for a float type.
fn cuda_type(dtype: DType) -> sys::cudaDataType {
    data_type(dtype).0
}

fn data_type(dtype: DType) -> (sys::cudaDataType, sys::cublasComputeType_t) {
    use sys::cublasComputeType_t::{CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32};
    use sys::cudaDataType::{CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F};
    match dtype {
        DType::F32 => (CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32),
        DType::BF16 => (CUDA_R_16BF, CUBLAS_COMPUTE_32F),
        DType::F16 => (CUDA_R_16F, CUBLAS_COMPUTE_32F),
        other => unreachable!("not routed to cuBLASLt: {other:?}"),
    }
}

impl Device {
    fn new(index: usize) -> Result<Self> {
        let ctx = CudaContext::new(index).context("the CUDA context")?;
        ctx.bind_to_thread()?;
        let stream = ctx.new_stream()?;
        let handle = lt::create_handle().map_err(|e| anyhow!("cublasLtCreate: {e}"))?;
        Ok(Self {
            ctx,
            stream,
            handle,
            workspaces: HashMap::new(),
            plans: HashMap::new(),
            no_epilogue: Default::default(),
            step: None,
            attention: HashMap::new(),
            adamw: None,
            gelu: None,
            dropout: None,
            layer_norm: HashMap::new(),
        })
    }

    /// The workspace of `stream`, allocated on its first product.
    fn workspace(&mut self, stream: sys::cudaStream_t) -> Result<u64> {
        let key = stream as usize;
        if let Some(&w) = self.workspaces.get(&key) {
            return Ok(w);
        }
        // SAFETY: a plain device allocation, kept for the life of the process.
        let w = unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) }?;
        self.workspaces.insert(key, w);
        Ok(w)
    }

    fn plan(&mut self, p: &Problem) -> Result<&Plan> {
        if self.no_epilogue.contains(p) {
            return Err(EpilogueUnsupported(p.epilogue).into());
        }
        if !self.plans.contains_key(p) {
            let plan = self.make_plan(p).inspect_err(|e| {
                if e.is::<EpilogueUnsupported>() {
                    self.no_epilogue.insert(*p);
                }
            })?;
            self.plans.insert(*p, plan);
        }
        Ok(&self.plans[p])
    }

    fn make_plan(&self, p: &Problem) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t::{
            CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, CUBLASLT_MATMUL_DESC_EPILOGUE,
            CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB,
        };
        use sys::cublasLtMatmulPreferenceAttributes_t::{
            CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        };
        let err = |what: &'static str| move |e: lt::CublasError| anyhow!("{what}: {e}");
        let (data, compute) = data_type(p.dtype);
        let desc = lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F)
            .map_err(err("cublasLtMatmulDescCreate"))?;
        // cublasOperation_t: 0 is CUBLAS_OP_N, 1 is CUBLAS_OP_T.
        let op = |o: &Operand| i32::from(o.transposed);
        let layout = |o: &Operand| lt::create_matrix_layout(data, o.rows, o.cols, o.ld);
        let out_layout =
            |o: &Operand| lt::create_matrix_layout(cuda_type(p.out), o.rows, o.cols, o.ld);
        let out = Operand {
            rows: p.m,
            cols: p.n,
            ld: p.m as i64,
            transposed: false,
        };
        let layouts = [
            layout(&p.first).map_err(err("cublasLtMatrixLayoutCreate"))?,
            layout(&p.second).map_err(err("cublasLtMatrixLayoutCreate"))?,
            out_layout(&out).map_err(err("cublasLtMatrixLayoutCreate"))?,
        ];
        if p.batch > 1 {
            use sys::cublasLtMatrixLayoutAttribute_t::{
                CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
            };
            let count = i32::try_from(p.batch).context("a batch of at most 2³¹ products")?;
            for (layout, stride) in layouts.iter().zip(p.batch_strides) {
                // SAFETY: plain values of the documented types and sizes on a layout created
                // above.
                unsafe {
                    lt::set_matrix_layout_attribute(
                        *layout,
                        CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&count as *const i32).cast(),
                        size_of::<i32>(),
                    )
                    .map_err(err("cublasLtMatrixLayoutSetAttribute (batch count)"))?;
                    lt::set_matrix_layout_attribute(
                        *layout,
                        CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&stride as *const i64).cast(),
                        size_of::<i64>(),
                    )
                    .map_err(err("cublasLtMatrixLayoutSetAttribute (batch offset)"))?;
                }
            }
        }
        let pref = lt::create_matmul_pref().map_err(err("cublasLtMatmulPreferenceCreate"))?;
        let workspace = WORKSPACE_BYTES as u64;
        // SAFETY: the attributes' buffers are plain values of the documented types and sizes;
        // every descriptor was created above.
        let heuristic = unsafe {
            for (attr, value) in [
                (CUBLASLT_MATMUL_DESC_TRANSA, op(&p.first)),
                (CUBLASLT_MATMUL_DESC_TRANSB, op(&p.second)),
            ] {
                lt::set_matmul_desc_attribute(
                    desc,
                    attr,
                    (&value as *const i32).cast(),
                    size_of::<i32>(),
                )
                .map_err(err("cublasLtMatmulDescSetAttribute"))?;
            }
            if p.epilogue != Epilogue::None {
                let epilogue = p.epilogue.code();
                let bias_type = cuda_type(p.vector);
                lt::set_matmul_desc_attribute(
                    desc,
                    CUBLASLT_MATMUL_DESC_EPILOGUE,
                    (&epilogue as *const sys::cublasLtEpilogue_t).cast(),
                    size_of::<sys::cublasLtEpilogue_t>(),
                )
                .map_err(err("cublasLtMatmulDescSetAttribute (epilogue)"))?;
                lt::set_matmul_desc_attribute(
                    desc,
                    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    (&bias_type as *const sys::cudaDataType).cast(),
                    size_of::<sys::cudaDataType>(),
                )
                .map_err(err("cublasLtMatmulDescSetAttribute (bias type)"))?;
            }
            lt::set_matmul_pref_attribute(
                pref,
                CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace as *const u64).cast(),
                size_of::<u64>(),
            )
            .map_err(err("cublasLtMatmulPreferenceSetAttribute"))?;
            let [a, b, d] = p.align;
            for (attr, value) in [
                (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a),
                (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b),
                (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, d),
                (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, d),
            ] {
                lt::set_matmul_pref_attribute(
                    pref,
                    attr,
                    (&value as *const u32).cast(),
                    size_of::<u32>(),
                )
                .map_err(err("cublasLtMatmulPreferenceSetAttribute"))?;
            }
            let heuristic = lt::get_matmul_algo_heuristic(
                self.handle,
                desc,
                layouts[0],
                layouts[1],
                layouts[2],
                layouts[2],
                pref,
            );
            lt::destroy_matmul_pref(pref).map_err(err("cublasLtMatmulPreferenceDestroy"))?;
            use sys::cublasStatus_t::{CUBLAS_STATUS_INVALID_VALUE, CUBLAS_STATUS_NOT_SUPPORTED};
            // A bf16 result with an f32 bias was an invalid value (2026-12-01), not an
            // unsupported one: either way CubeCL's kernels can do the epilogue's work.
            match heuristic {
                Err(e)
                    if p.epilogue != Epilogue::None
                        && matches!(
                            e.0,
                            CUBLAS_STATUS_NOT_SUPPORTED | CUBLAS_STATUS_INVALID_VALUE
                        ) =>
                {
                    return Err(EpilogueUnsupported(p.epilogue).into());
                }
                h => h.map_err(err("cublasLtMatmulAlgoGetHeuristic"))?,
            }
        };
        Ok(Plan {
            desc,
            layouts,
            algo: heuristic.algo,
        })
    }

    /// `D = op(first) · op(second)` for device pointers `[first, second, D]` laid out as `p`
    /// says: queued on `stream` (CubeCL's), or run on this module's stream and waited for.
    fn matmul(
        &mut self,
        p: &Problem,
        [first, second, out]: [u64; 3],
        bias: Option<u64>,
        stream: Option<sys::cudaStream_t>,
    ) -> Result<()> {
        let own = stream.is_none();
        let stream = stream.unwrap_or_else(|| self.stream.cu_stream().cast());
        let workspace = self.workspace(stream)?;
        let handle = self.handle;
        let plan = self.plan(p)?;
        if let Some(bias) = bias {
            let bias = bias as *const c_void;
            // SAFETY: a device pointer, the documented value of this attribute; the plan's
            // descriptor is used under the `DEVICES` mutex only, and cuBLASLt reads it when the
            // product is queued.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&bias as *const *const c_void).cast(),
                    size_of::<*const c_void>(),
                )
                .map_err(|e| anyhow!("cublasLtMatmulDescSetAttribute (bias): {e}"))?;
            }
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let ptr = |p: u64| p as *const c_void;
        // SAFETY: the pointers are live CubeCL allocations of the layouts' sizes, and the plan
        // was made for these layouts. On CubeCL's stream the product is ordered before any
        // later use or reuse of that memory, as CubeCL's own kernels are; on this module's
        // stream the caller holds the memory until this returns, after the product.
        unsafe {
            lt::matmul(
                handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                ptr(first),
                plan.layouts[0],
                ptr(second),
                plan.layouts[1],
                ptr(out),
                plan.layouts[2],
                out as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
            .map_err(|e| anyhow!("cublasLtMatmul: {e}"))?;
        }
        if own {
            self.stream.synchronize()?;
        }
        Ok(())
    }
}

/// CubeCL's CUDA stream, found through CUPTI.
///
/// CubeCL 0.10 keeps its streams (one per host thread that launches work) to itself. A
/// product on another stream must wait for CubeCL's queue on the host and then for itself: a
/// pipeline drain per product. CUPTI's callback API reports the arguments of driver calls, so
/// one `cuEventRecord` that CubeCL makes on its stream (a `sync`, issued on CubeCL's device
/// thread) names the stream; products are then queued on it like CubeCL's own kernels.
/// Without libcupti, or when another CUPTI client holds the callbacks (a profiler such as
/// `ncu`), or with `PALM_GEMM_STREAM=own`, products drain as before.
mod stream {
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{Mutex, OnceLock};
    use std::thread::ThreadId;

    use anyhow::{Result, anyhow, bail};
    use burn_cubecl::cubecl::client::ComputeClient;
    use burn_cubecl::cubecl::cuda::CudaRuntime;
    use burn_cubecl::cubecl::stream_id::StreamId;
    use cudarc::cublaslt::sys::cudaStream_t;
    use cudarc::cupti::sys as cupti;

    /// The stream found per CubeCL stream id (`None`: not found, drain instead).
    static STREAMS: Mutex<Option<HashMap<u64, Option<usize>>>> = Mutex::new(None);
    /// While a search runs: its thread and the streams of the events recorded on it.
    static SEEN: Mutex<Option<(ThreadId, Vec<usize>)>> = Mutex::new(None);

    /// The driver call whose stream argument names CubeCL's stream.
    const EVENT_RECORD: u32 =
        cupti::CUpti_driver_api_trace_cbid_enum::CUPTI_DRIVER_TRACE_CBID_cuEventRecord as u32;

    /// Whether products may go to CubeCL's stream (`PALM_GEMM_STREAM=own` says no), read once:
    /// it is asked on every product.
    fn wanted() -> bool {
        static WANTED: OnceLock<bool> = OnceLock::new();
        *WANTED.get_or_init(|| std::env::var("PALM_GEMM_STREAM").map_or(true, |v| v != "own"))
    }

    /// CubeCL's stream for the calling stream id, searched for on first use. Runs on CubeCL's
    /// device thread (inside `ComputeClient::exclusive`), where the client's calls run inline.
    pub fn backend_stream(client: &ComputeClient<CudaRuntime>) -> Option<cudaStream_t> {
        if !wanted() {
            return None;
        }
        let key = StreamId::current().value;
        let mut streams = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
        let streams = streams.get_or_insert_with(HashMap::new);
        let found = *streams.entry(key).or_insert_with(|| match search(client) {
            Ok(s) => {
                tracing::debug!("cuBLASLt products run on CubeCL's stream {s:#x}");
                Some(s)
            }
            Err(e) => {
                tracing::warn!("{e:#}: each cuBLASLt product waits for the device");
                None
            }
        });
        found.map(|s| s as cudaStream_t)
    }

    /// CubeCL's stream for the calling stream id if [`backend_stream`] has found it (no
    /// search: callable off the device thread and from its tasks).
    pub fn known_stream() -> Option<cudaStream_t> {
        if !wanted() {
            return None;
        }
        let key = StreamId::current().value;
        let streams = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
        let found = streams.as_ref()?.get(&key).copied().flatten();
        found.map(|s| s as cudaStream_t)
    }

    /// Records the stream of each `cuEventRecord` made on the searching thread.
    unsafe extern "C" fn on_driver_call(
        _: *mut c_void,
        domain: cupti::CUpti_CallbackDomain,
        cbid: cupti::CUpti_CallbackId,
        data: *const c_void,
    ) {
        if domain != cupti::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API
            || cbid != EVENT_RECORD
            || data.is_null()
        {
            return;
        }
        // SAFETY: for the driver domain CUPTI passes a `CUpti_CallbackData` whose parameters
        // are those of the call `cbid` names, `cuEventRecord`'s.
        let stream = unsafe {
            let data = &*data.cast::<cupti::CUpti_CallbackData>();
            if data.callbackSite != cupti::CUpti_ApiCallbackSite::CUPTI_API_ENTER
                || data.functionParams.is_null()
            {
                return;
            }
            (*data.functionParams.cast::<cupti::cuEventRecord_params>()).hStream as usize
        };
        if let Ok(mut seen) = SEEN.lock()
            && let Some((thread, streams)) = seen.as_mut()
            && *thread == std::thread::current().id()
        {
            streams.push(stream);
        }
    }

    /// Subscribes to `cuEventRecord`, has CubeCL synchronise the calling stream id (it records
    /// an event on its stream, on this thread), unsubscribes and returns the one stream seen.
    fn search(client: &ComputeClient<CudaRuntime>) -> Result<usize> {
        let check = |r: cupti::CUptiResult, what: &str| {
            if r == cupti::CUptiResult::CUPTI_SUCCESS {
                Ok(())
            } else {
                Err(anyhow!("{what}: {r:?}"))
            }
        };
        // SAFETY: loading a library by its usual names.
        if !unsafe { cupti::is_culib_present() } {
            bail!("libcupti was not found");
        }
        *SEEN.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::thread::current().id(), vec![]));
        let mut subscriber: cupti::CUpti_SubscriberHandle = std::ptr::null_mut();
        // SAFETY: the callback only reads the documented callback data; the subscription ends
        // before this function returns.
        let synced = unsafe {
            check(
                cupti::cuptiSubscribe(&mut subscriber, Some(on_driver_call), std::ptr::null_mut()),
                "cuptiSubscribe",
            )?;
            let enabled = check(
                cupti::cuptiEnableCallback(
                    1,
                    subscriber,
                    cupti::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API,
                    EVENT_RECORD,
                ),
                "cuptiEnableCallback",
            );
            let synced = enabled.and_then(|()| {
                burn_cubecl::cubecl::future::block_on(client.sync())
                    .map_err(|e| anyhow!("CubeCL's sync: {e:?}"))
            });
            check(cupti::cuptiUnsubscribe(subscriber), "cuptiUnsubscribe")?;
            synced
        };
        let (_, mut seen) = SEEN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("set above");
        synced?;
        seen.dedup();
        match seen[..] {
            [stream] if stream != 0 => Ok(stream),
            _ => bail!("CubeCL's stream was not identified (events recorded on {seen:x?})"),
        }
    }
}

mod adamw;
mod affine;
mod attention;
mod batched;
mod dropout;
mod gelu;
mod layer_norm;
mod shadow;
mod step;

pub(crate) use layer_norm::autodiff as training_layer_norm;

#[cfg(test)]
mod tests {
    //! Needs a CUDA device: `cargo test -p palm --features cuda cublaslt` on the GPU machine.
    use super::*;
    use burn::tensor::{Distribution, FloatDType, Tolerance};
    use burn_cubecl::cubecl::cuda::CudaDevice;

    type B = Autodiff<Gpu>;

    /// Held by the tests that set the process-wide product type (libtest runs tests on
    /// parallel threads: one test's bf16 products in another's f32 comparison made the affine
    /// test fail on the GPU, 2026-12-01).
    static PRODUCT_TYPE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn cupti_finds_cubecls_stream_for_each_thread() {
        // Two threads launch on two CubeCL streams; each is found, and they differ.
        let found = || {
            let client = CudaRuntime::client(&CudaDevice::new(0));
            client
                .exclusive(|| stream::backend_stream(&client).map(|s| s as usize))
                .unwrap()
        };
        let here = found().expect("CubeCL's stream found through CUPTI (libcupti on the path?)");
        let there = std::thread::spawn(found).join().unwrap();
        assert_eq!(found(), Some(here), "the same stream the second time");
        assert!(there.is_some_and(|s| s != here), "{there:x?} vs {here:x}");
    }

    #[test]
    fn cublaslt_products_and_their_gradients_match_burns_matmul() {
        // Every product through cuBLASLt, however small (read once, before the first product).
        // SAFETY: set before any other thread of this test binary reads the environment.
        unsafe { std::env::set_var("PALM_GEMM_MIN_MACS", "0") };
        let device = CudaDevice::new(0);
        let normal = Distribution::Normal(0.0, 1.0);
        let (m, k, n) = (300, 200, 500);
        for (dtype, tolerance) in [
            (FloatDType::F32, Tolerance::rel_abs(1e-2, 1e-2)),
            (FloatDType::BF16, Tolerance::rel_abs(5e-2, 5e-2)),
        ] {
            let data =
                |shape: [usize; 2]| Tensor::<B, 2>::random(shape, normal, &device).cast(dtype);
            // Plain, transposed-view and mixed operands, as the linear layers, the tied
            // generator and the backward pass give them.
            let cases = [
                (data([m, k]), data([k, n]), false, false),
                (data([m, k]), data([n, k]), false, true),
                (data([k, m]), data([k, n]), true, false),
            ];
            for (a, b, a_t, b_t) in cases {
                let a = a.require_grad();
                let b = b.require_grad();
                let view = |x: Tensor<B, 2>, t: bool| if t { x.transpose() } else { x };
                let weights = Tensor::<B, 2>::random([m, n], normal, &device).cast(dtype);
                let run = |routed: bool| {
                    let (x, y) = (view(a.clone(), a_t), view(b.clone(), b_t));
                    // The reference multiplies the same (rounded) operands in f32: what
                    // cuBLASLt's f32 accumulation computes, and kernels the f32 half has
                    // already compiled (burn's bf16 matmul compiles and tunes for minutes).
                    let out = if routed {
                        wrap::<B>(autodiff_gemm(unwrap(x), unwrap(y)))
                    } else {
                        x.cast(FloatDType::F32).matmul(y.cast(FloatDType::F32))
                    };
                    let grads = (out.clone().cast(FloatDType::F32)
                        * weights.clone().cast(FloatDType::F32))
                    .sum()
                    .backward();
                    let grad = |t: &Tensor<B, 2>| t.grad(&grads).unwrap().cast(FloatDType::F32);
                    [
                        out.cast(FloatDType::F32).into_data(),
                        grad(&a).into_data(),
                        grad(&b).into_data(),
                    ]
                };
                let (lt, burn) = (run(true), run(false));
                for (what, (x, y)) in ["product", "dA", "dB"].iter().zip(lt.iter().zip(&burn)) {
                    eprintln!("{dtype:?} a_t={a_t} b_t={b_t} {what}");
                    x.assert_approx_eq::<f32>(y, tolerance);
                }
            }
        }
    }

    #[test]
    fn products_queued_without_waiting_match_burns_matmul() {
        // SAFETY: as above (every product routed, read once).
        unsafe { std::env::set_var("PALM_GEMM_MIN_MACS", "0") };
        let device = CudaDevice::new(0);
        let normal = Distribution::Normal(0.0, 1.0);
        // A shape no other test multiplies: its first product waits for the device thread,
        // the next ones are queued behind the kernels that make their operands, and kernels
        // reading their results are queued right behind them.
        let (m, k, n) = (96, 40, 136);
        let problems = |ran: &Option<std::collections::HashSet<Problem>>| {
            ran.as_ref()
                .map_or(0, |r| r.iter().filter(|p| p.m == n as u64).count())
        };
        let (mut ours, mut burns) = (vec![], vec![]);
        for i in 0..12 {
            let a = Tensor::<Gpu, 2>::random([m, k], normal, &device) * (i as f32 + 1.0);
            let b = Tensor::<Gpu, 2>::random([k, n], normal, &device);
            let y = wrap::<Gpu>(fusion_gemm(unwrap(a.clone()), unwrap(b.clone())));
            ours.push(y + 1.0);
            burns.push(a.matmul(b) + 1.0);
        }
        assert_eq!(
            problems(&RAN.lock().unwrap()),
            1,
            "one problem, run once waiting"
        );
        for (i, (y, r)) in ours.into_iter().zip(burns).enumerate() {
            eprintln!("product {i}");
            y.into_data()
                .assert_approx_eq::<f32>(&r.into_data(), Tolerance::rel_abs(1e-2, 1e-2));
        }
        assert!(QUEUED_ERROR.lock().unwrap().is_none());
    }

    #[test]
    fn affine_layers_match_the_composed_product_and_bias_with_gradients() {
        let _held = PRODUCT_TYPE.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: as above (every product routed, read once).
        unsafe { std::env::set_var("PALM_GEMM_MIN_MACS", "0") };
        let device = CudaDevice::new(0);
        let normal = Distribution::Normal(0.0, 1.0);
        let (m, k, n) = (300, 200, 500);
        // f32 (tf32 products), then bf16 operands with f32 results (`bf16-mixed`).
        for (product, tolerance) in [
            (None, Tolerance::rel_abs(1e-2, 1e-2)),
            (Some(FloatDType::BF16), Tolerance::rel_abs(2e-2, 2e-2)),
        ] {
            palm_model::dense::set_product_dtype(product);
            let rounded = |t: Tensor<B, 2>| match product {
                Some(p) => t.cast(p).cast(FloatDType::F32),
                None => t,
            };
            let x = Tensor::<B, 2>::random([m, k], normal, &device).require_grad();
            let bias = Tensor::<B, 1>::random([n], normal, &device).require_grad();
            // A second layer `[n] → [k]`, for the feed-forward case below.
            let w2 = Tensor::<B, 2>::random([n, k], normal, &device);
            let bias2 = Tensor::<B, 1>::random([k], normal, &device);
            // The output's gradient, exact in the product type: the map rounds it to bf16
            // as autocast does, where the composed reference multiplies it in f32.
            let weights = rounded(Tensor::<B, 2>::random([m, n], normal, &device));
            // A weight as a linear layer holds it, and a tied table read transposed.
            for transposed in [false, true] {
                let table = if transposed {
                    Tensor::<B, 2>::random([n, k], normal, &device)
                } else {
                    Tensor::<B, 2>::random([k, n], normal, &device)
                }
                .require_grad();
                let w = || {
                    if transposed {
                        table.clone().transpose()
                    } else {
                        table.clone()
                    }
                };
                let run = |affine: bool| {
                    let y = if affine {
                        affine::autodiff((x.clone(), w(), Some(bias.clone())), FloatDType::F32)
                            .unwrap_or_else(|_| panic!("taken"))
                    } else {
                        rounded(x.clone()).matmul(rounded(w())) + bias.clone().unsqueeze::<2>()
                    };
                    assert_eq!(y.dtype(), DType::F32, "results in the tensors' type");
                    let grads = (y.clone() * weights.clone()).sum().backward();
                    let grad = |t: &Tensor<B, 2>| t.grad(&grads).unwrap().into_data();
                    [
                        y.into_data(),
                        grad(&x),
                        grad(&table),
                        bias.grad(&grads).unwrap().into_data(),
                    ]
                };
                let (ours, composed) = (run(true), run(false));
                for (what, (a, b)) in ["y", "dx", "dW", "db"]
                    .iter()
                    .zip(ours.iter().zip(&composed))
                {
                    eprintln!("{product:?} transposed={transposed} {what}");
                    a.assert_approx_eq::<f32>(b, tolerance);
                }
                // The fusion and inference backends' maps give the same forward values.
                let plain = |t: Tensor<B, 2>| t.inner();
                let fused = affine::fusion(
                    (plain(x.clone()), plain(w()), Some(bias.clone().inner())),
                    FloatDType::F32,
                )
                .unwrap_or_else(|_| panic!("taken"));
                fused
                    .into_data()
                    .assert_approx_eq::<f32>(&ours[0], tolerance);

                // A feed-forward block under bf16-mixed: the inner activation left in bf16
                // (`dense_narrow`), and the next layer reading it as it is.
                if let Some(p) = product {
                    let narrow = affine::autodiff((x.clone(), w(), Some(bias.clone())), p)
                        .unwrap_or_else(|_| panic!("taken"));
                    assert_eq!(narrow.dtype(), p.into(), "left in the product type");
                    let wide = affine::autodiff(
                        (
                            narrow.clone().cast(FloatDType::F32),
                            w2.clone(),
                            Some(bias2.clone()),
                        ),
                        FloatDType::F32,
                    )
                    .unwrap_or_else(|_| panic!("taken"));
                    let read = affine::autodiff(
                        (narrow.clone(), w2.clone(), Some(bias2.clone())),
                        FloatDType::F32,
                    )
                    .unwrap_or_else(|_| panic!("taken"));
                    assert_eq!(read.dtype(), DType::F32);
                    read.clone()
                        .into_data()
                        .assert_approx_eq::<f32>(&wide.into_data(), tolerance);
                    narrow
                        .clone()
                        .cast(FloatDType::F32)
                        .into_data()
                        .assert_approx_eq::<f32>(&ours[0], tolerance);
                    // The gradient reaches x through the bf16 activation.
                    let grads = read.sum().backward();
                    let dx = x.grad(&grads).expect("dx through the narrow layer");
                    assert_eq!(dx.dims(), [m, k]);
                    assert!(dx.abs().sum().into_scalar() > 0.0);
                }
            }
        }
        palm_model::dense::set_product_dtype(None);
        // Without a bias the map hands the operands back.
        let x = Tensor::<B, 2>::random([m, k], normal, &device);
        let w = Tensor::<B, 2>::random([k, n], normal, &device);
        assert!(affine::autodiff((x, w, None), FloatDType::F32).is_err());
    }

    #[test]
    fn the_optimizers_bf16_copies_serve_one_forward_use_with_the_same_results() {
        let _held = PRODUCT_TYPE.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: as above (every product routed, read once).
        unsafe { std::env::set_var("PALM_GEMM_MIN_MACS", "0") };
        palm_model::dense::set_product_dtype(Some(FloatDType::BF16));
        let device = CudaDevice::new(0);
        let normal = Distribution::Normal(0.0, 1.0);
        let (m, k, n) = (300, 200, 500);
        let x = Tensor::<B, 2>::random([m, k], normal, &device).require_grad();
        let w = Tensor::<B, 2>::random([k, n], normal, &device).require_grad();
        let bias = Tensor::<B, 1>::random([n], normal, &device).require_grad();
        let out_grad = Tensor::<B, 2>::random([m, n], normal, &device);
        // A layer whose result stays in bf16: both the weight and the bias are cast.
        let run = || {
            let y = affine::autodiff((x.clone(), w.clone(), Some(bias.clone())), FloatDType::BF16)
                .unwrap_or_else(|_| panic!("taken"));
            let grads = (y.clone().cast(FloatDType::F32) * out_grad.clone())
                .sum()
                .backward();
            [
                y.cast(FloatDType::F32).into_data(),
                x.grad(&grads).unwrap().into_data(),
                w.grad(&grads).unwrap().into_data(),
                bias.grad(&grads).unwrap().into_data(),
            ]
        };
        let cast_here = run();
        // As the optimizer's step leaves them: a copy of each parameter, taken by one use.
        shadow::store(w.clone().inner().into_primitive().tensor());
        shadow::store(bias.clone().inner().into_primitive().tensor());
        assert_eq!(shadow::kept(), 2);
        let copied = run();
        assert_eq!(shadow::kept(), 0, "both copies taken");
        for (what, (a, b)) in ["y", "dx", "dW", "db"]
            .iter()
            .zip(copied.iter().zip(&cast_here))
        {
            eprintln!("copies: {what}");
            a.assert_eq(b, true);
        }
        // A second use casts again, with the same results.
        for (a, b) in run().iter().zip(&cast_here) {
            a.assert_eq(b, true);
        }
        // A store after a use starts a new round: copies the last forward pass did not take
        // are dropped.
        let t = |shape: [usize; 2]| -> FusionTensor<FusionR> {
            unwrap(Tensor::<Gpu, 2>::random(shape, normal, &device))
        };
        let (a, b, c) = (t([4, 8]), t([8, 4]), t([2, 2]));
        shadow::store(a.clone());
        shadow::store(b);
        let a_copy = shadow::take_or_cast(a.clone(), DType::BF16);
        assert_eq!(a_copy.dtype, DType::BF16);
        assert_eq!(shadow::kept(), 1, "b's copy left");
        shadow::store(c);
        assert_eq!(shadow::kept(), 1, "b's dropped, c's kept");
        // Without a product type nothing is stored.
        palm_model::dense::set_product_dtype(None);
        shadow::store(a);
        assert_eq!(shadow::kept(), 1);
    }

    #[test]
    fn batched_cublaslt_products_match_burns_matmul_with_gradients() {
        let _held = PRODUCT_TYPE.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: as above (every product routed, read once).
        unsafe { std::env::set_var("PALM_GEMM_MIN_MACS", "0") };
        let device = CudaDevice::new(0);
        let normal = Distribution::Normal(0.0, 1.0);
        let (b, h, t, s, dh) = (2, 3, 17, 9, 8);
        for (product, tolerance) in [
            (None, Tolerance::rel_abs(1e-2, 1e-2)),
            (Some(FloatDType::BF16), Tolerance::rel_abs(2e-2, 2e-2)),
        ] {
            palm_model::dense::set_product_dtype(product);
            let rounded = |t: Tensor<B, 4>| match product {
                Some(p) => t.cast(p).cast(FloatDType::F32),
                None => t,
            };
            // Heads split from `[b, t, h, dh]` (strided views, as attention gets them) and the
            // keys read transposed; then a contiguous left operand, as the probabilities are.
            let q = Tensor::<B, 4>::random([b, t, h, dh], normal, &device).require_grad();
            let k = Tensor::<B, 4>::random([b, s, h, dh], normal, &device).require_grad();
            let p = Tensor::<B, 4>::random([b, h, t, s], normal, &device).require_grad();
            let operands = |case: usize| match case {
                0 => (
                    q.clone().swap_dims(1, 2),
                    k.clone().swap_dims(1, 2).swap_dims(2, 3),
                ),
                _ => (p.clone(), k.clone().swap_dims(1, 2)),
            };
            for (i, left) in [&q, &p].into_iter().enumerate() {
                let (x, y) = operands(i);
                let [m, n] = [x.dims()[2], y.dims()[3]];
                // The product's heads merged as attention's weighted sum's are, so that its
                // gradient arrives as a `[b, m, h, n]` tensor viewed as `[b, h, m, n]`.
                let weights = rounded(Tensor::<B, 4>::random([b, m, h, n], normal, &device))
                    .reshape([b, m, h * n]);
                // `None`: burn's matmul; `Some(keep)`: cuBLASLt, its operands as read kept for
                // the backward pass or not.
                let run = |routed: Option<bool>| {
                    let (x, y) = operands(i);
                    let out = match routed {
                        Some(keep) => batched::autodiff_keeping((x, y), FloatDType::F32, keep)
                            .unwrap_or_else(|_| panic!("taken")),
                        None => rounded(x).matmul(rounded(y)),
                    };
                    assert_eq!(out.dtype(), DType::F32);
                    let merged = out.clone().swap_dims(1, 2).reshape([b, m, h * n]);
                    let grads = (merged * weights.clone()).sum().backward();
                    [
                        out.into_data(),
                        left.grad(&grads).unwrap().into_data(),
                        k.grad(&grads).unwrap().into_data(),
                    ]
                };
                let burns = run(None);
                for keep in [false, true] {
                    let ours = run(Some(keep));
                    for (what, (a, c)) in ["product", "d left", "dk"]
                        .iter()
                        .zip(ours.iter().zip(&burns))
                    {
                        eprintln!("{product:?} case {i} keep {keep} {what}");
                        a.assert_approx_eq::<f32>(c, tolerance);
                    }
                }
            }
        }
        palm_model::dense::set_product_dtype(None);
    }

    /// Adds normal noise to every parameter (biases and norms start at 0 and 1).
    struct Jitter;

    impl<B2: Backend> burn::module::ModuleMapper<B2> for Jitter {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<B2, D>>,
        ) -> burn::module::Param<Tensor<B2, D>> {
            let t = param.val();
            let noise = Tensor::random_like(&t, Distribution::Normal(0.0, 0.1));
            burn::module::Param::from_tensor(t + noise)
        }
    }

    #[test]
    fn step_kernels_match_burns_step() {
        use burn::module::Module;
        use palm_model::{ModelConfig, Palm};
        // Needs f32 products throughout.
        let _f32 = PRODUCT_TYPE.lock().unwrap_or_else(|e| e.into_inner());
        let device = CudaDevice::new(0);
        let client = CudaRuntime::client(&device);
        let found = client.exclusive(|| stream::backend_stream(&client).is_some());
        assert_eq!(found.ok(), Some(true), "CubeCL's stream for this thread");
        step::install();
        // burn's step with its products through cuBLASLt, as inference runs it (and no
        // minutes of burn's matmul autotuning for the new shapes).
        palm_model::dense::set_gemm::<Cube>(Some(|a, b| wrap(cube_gemm(unwrap(a), unwrap(b)))));
        palm_model::dense::set_affine::<Cube>(Some(affine::cube));
        Cube::seed(&device, 11);
        // The tiny fixture's shapes, and PALM-base's decoder layers (768 wide, 8 heads of 96,
        // an inner width of 3,072) with two of them and a small vocabulary.
        let tiny = ModelConfig::tiny(300);
        let mut base = ModelConfig::tiny(1000);
        base.encoder.hidden_size = 768;
        base.encoder.num_attention_heads = 12;
        base.encoder.intermediate_size = 3072;
        base.encoder.num_hidden_layers = 1;
        base.palm.dec_heads = 8;
        base.palm.dec_ff_size = 3072;
        let tolerance = Tolerance::<f32>::rel_abs(1e-2, 1e-2);
        for config in [tiny, base] {
            let model = Palm::<Cube>::new(&config, &device).map(&mut Jitter);
            let vocab = model.vocab_size();
            // Two sources, one padded (PAD = 0).
            let src = Tensor::<Cube, 2, Int>::from_data(
                TensorData::new(vec![2i64, 7, 9, 3, 0, 0, 2, 5, 11, 4, 8, 3], [2, 6]),
                &device,
            );
            let memory = model.encode(src);
            let beams = 3;
            let mut ours = model.init_cache(&memory, beams);
            assert!(ours.fast.is_some(), "the step kernels take an f32 model");
            let mut burns = ours.clone();
            burns.fast = None;
            let mut rows = 2 * beams;
            // Past the first capacity (32 positions), reordering rows on the way, a padding
            // input, and a source dropped.
            for step in 0..40usize {
                let ids: Vec<i64> = (0..rows)
                    .map(|r| {
                        if step == 5 && r == 1 {
                            0
                        } else {
                            ((r * 31 + step * 17) % (vocab - 1) + 1) as i64
                        }
                    })
                    .collect();
                let tokens =
                    Tensor::<Cube, 1, Int>::from_data(TensorData::new(ids, [rows]), &device);
                let a = model.step(tokens.clone(), &mut ours);
                let b = model.step(tokens, &mut burns);
                eprintln!("d {} step {step}", config.encoder.hidden_size);
                a.into_data()
                    .assert_approx_eq::<f32>(&b.into_data(), tolerance);
                if step == 20 {
                    // The first source finishes: its rows go, the second's keep their order.
                    let origins: Vec<usize> = (0..beams).map(|b| beams + (b + 1) % beams).collect();
                    ours.select(&[1], &origins);
                    burns.select(&[1], &origins);
                    rows = beams;
                } else if step % 3 == 0 {
                    let origins: Vec<i64> = (0..rows)
                        .map(|r| (r / beams * beams + (r + step) % beams) as i64)
                        .collect();
                    let origins = Tensor::<Cube, 1, Int>::from_data(
                        TensorData::new(origins, [rows]),
                        &device,
                    );
                    ours.select_rows(origins.clone());
                    burns.select_rows(origins);
                }
            }
        }
        palm_model::decoder::set_step_kernels::<Cube>(None);
        palm_model::dense::set_gemm::<Cube>(None);
        palm_model::dense::set_affine::<Cube>(None);
    }

    #[test]
    fn top_k_kernel_picks_what_rounds_of_arg_max_pick() {
        // burn's rounds as the reference: no step kernels set meanwhile (the step test sets
        // them while it holds this lock).
        let _unset = PRODUCT_TYPE.lock().unwrap_or_else(|e| e.into_inner());
        palm_model::decoder::set_step_kernels::<Cube>(None);
        let device = CudaDevice::new(0);
        let client = CudaRuntime::client(&device);
        let found = client.exclusive(|| stream::backend_stream(&client).is_some());
        assert_eq!(found.ok(), Some(true), "CubeCL's stream for this thread");
        let normal = Distribution::Normal(0.0, 1.0);
        // A beam-search step's scores at batch 64 (5 × 21,128 per source), one segment, k = 1.
        for (rows, cols, k) in [(64, 5 * 21128, 5), (3, 1000, 4), (2, 50, 1), (1, 9000, 16)] {
            let x = Tensor::<Cube, 2>::random([rows, cols], normal, &device);
            let (values, indices) = step::top_k(x.clone(), k).unwrap_or_else(|_| panic!("taken"));
            let (v, i) = palm_decode::top_k(x, k);
            eprintln!("[{rows}, {cols}] k {k}");
            assert_eq!(values.into_data().to_vec::<f32>().unwrap(), v);
            let ours: Vec<i64> = indices.into_data().iter::<i64>().collect();
            assert_eq!(ours, i);
        }
        // Ties: the lowest index first, across segments too.
        let mut row = vec![0.0f32; 9000];
        for c in [8999, 4100, 17, 5000] {
            row[c] = 2.0;
        }
        row[3] = 3.0;
        let x = Tensor::<Cube, 2>::from_data(TensorData::new(row, [1, 9000]), &device);
        let (values, indices) = step::top_k(x, 4).unwrap_or_else(|_| panic!("taken"));
        assert_eq!(
            values.into_data().to_vec::<f32>().unwrap(),
            [3.0, 2.0, 2.0, 2.0]
        );
        let ours: Vec<i64> = indices.into_data().iter::<i64>().collect();
        assert_eq!(ours, [3, 17, 4100, 5000]);
    }
}
