//! The cuBLASLt calls and burn's three backend levels (see the parent module).

// The cuBLASLt calls are FFI through cudarc's result API.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result, anyhow};
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
use burn_cubecl::cubecl::cuda::{CudaDevice, CudaRuntime};
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
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
    Ok(())
}

fn unwrap<B: Backend>(t: Tensor<B, 2>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn wrap<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
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
    #[derive(Debug)]
    struct GemmOp {
        desc: CustomOpIr,
    }

    impl Operation<FusionR> for GemmOp {
        fn execute(&self, handles: &mut HandleContainer<Handle>) {
            let ([a, b], [out]) = self.desc.as_fixed();
            let a = handles.get_float_tensor::<Cube>(a);
            let b = handles.get_float_tensor::<Cube>(b);
            handles.register_float_tensor::<Cube>(&out.id, cube_gemm(a, b));
        }
    }

    let ([m, k], [_, n]) = (dims2(&a.shape), dims2(&b.shape));
    if a.dtype != b.dtype || !routed(a.dtype, m, k, n, min_macs()) {
        return Gpu::float_matmul(a, b);
    }
    let streams = OperationStreams::with_inputs([&a, &b]);
    let client = a.client.clone();
    let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([m, n]), a.dtype);
    let desc = CustomOpIr::new("palm_cublaslt_gemm", &[a.into_ir(), b.into_ir()], &[out]);
    client
        .register(streams, OperationIr::Custom(desc.clone()), GemmOp { desc })
        .output()
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
    let ([m, _], [_, n]) = (dims2(a.meta.shape()), dims2(b.meta.shape()));
    let (a, a_layout) = readable(a);
    let (b, b_layout) = readable(b);
    let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
        a.client.clone(),
        a.device.clone(),
        Shape::new([m, n]),
        a.dtype,
    );
    let out_strides = dims2(out.meta.strides());
    assert_eq!(out_strides, [n, 1], "a contiguous output");

    let client = a.client.clone();
    let index = a.device.index;
    // On CubeCL's device thread, after every operation queued before this product: the
    // operands' memory, then the product on CubeCL's own stream (no wait for the device), or,
    // where that stream is unknown, on this module's after draining CubeCL's.
    let run = || -> Result<()> {
        // Errors, not panics: this runs on CubeCL's device thread.
        let resource = |t: &CubeTensor<CudaRuntime>| {
            client
                .get_resource(t.handle.clone())
                .map_err(|e| anyhow!("a CUDA tensor's memory: {e:?}"))
        };
        let (ra, rb, rout) = (resource(&a)?, resource(&b)?, resource(&out)?);
        // Row-major C = A · B is column-major Cᵀ = Bᵀ · Aᵀ: cuBLASLt's first operand is B.
        let problem = Problem {
            dtype: a.dtype,
            first: b_layout,
            second: a_layout,
            m: n as u64,
            n: m as u64,
            align: [ra.resource().ptr, rb.resource().ptr, rout.resource().ptr]
                .map(|p| (p & p.wrapping_neg()).min(256) as u32),
        };
        let pointers = [rb.resource().ptr, ra.resource().ptr, rout.resource().ptr];
        let result = match stream::backend_stream(&client) {
            Some(stream) => with_device(index, |d| d.matmul(&problem, pointers, Some(stream))),
            None => {
                burn_cubecl::cubecl::future::block_on(client.sync())
                    .map_err(|e| anyhow!("the CUDA stream synchronises: {e:?}"))?;
                with_device(index, |d| d.matmul(&problem, pointers, None))
            }
        };
        drop((ra, rb, rout));
        result
    };
    client
        .exclusive(run)
        .map_err(|e| anyhow!("CubeCL's device thread: {e:?}"))
        .and_then(|r| r)
        .unwrap_or_else(|e| panic!("cuBLASLt [{m}, ?] x [?, {n}] in {:?}: {e:#}", a.dtype));
    out
}

/// One product as cuBLASLt sees it (column-major): `D [m, n] = op(first) · op(second)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Problem {
    dtype: DType,
    first: Operand,
    second: Operand,
    m: u64,
    n: u64,
    /// Alignment in bytes (at most 256) of A, B and D: the heuristic picks kernels for it.
    align: [u32; 3],
}

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
        if !self.plans.contains_key(p) {
            let plan = self.make_plan(p)?;
            self.plans.insert(*p, plan);
        }
        Ok(&self.plans[p])
    }

    fn make_plan(&self, p: &Problem) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t::{
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
        let out = Operand {
            rows: p.m,
            cols: p.n,
            ld: p.m as i64,
            transposed: false,
        };
        let layouts = [
            layout(&p.first).map_err(err("cublasLtMatrixLayoutCreate"))?,
            layout(&p.second).map_err(err("cublasLtMatrixLayoutCreate"))?,
            layout(&out).map_err(err("cublasLtMatrixLayoutCreate"))?,
        ];
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
            heuristic.map_err(err("cublasLtMatmulAlgoGetHeuristic"))?
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
        stream: Option<sys::cudaStream_t>,
    ) -> Result<()> {
        let own = stream.is_none();
        let stream = stream.unwrap_or_else(|| self.stream.cu_stream().cast());
        let workspace = self.workspace(stream)?;
        let handle = self.handle;
        let plan = self.plan(p)?;
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

#[cfg(test)]
mod tests {
    //! Needs a CUDA device: `cargo test -p palm --features cuda cublaslt` on the GPU machine.
    use super::*;
    use burn::tensor::{Distribution, FloatDType, Tolerance};
    use burn_cubecl::cubecl::cuda::CudaDevice;

    type B = Autodiff<Gpu>;

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
}
