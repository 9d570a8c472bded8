//! A cached decoder step of beam search as launches of our own: the kernels of `step.cu`
//! (compiled by NVRTC on first use) and cuBLASLt's products, queued by one task on CubeCL's
//! device thread onto CubeCL's stream.
//!
//! Through burn's operations a step of PALM-base's decoder is about 640 launches at batch 64,
//! and each costs CubeCL's device thread 15 to 19 µs of host time: the step (about 10 ms) is
//! bound by that thread, not by the device (`docs/benchmarks.md`, items 13 and 38). Here a
//! layer is eleven launches: a layer norm fused with the residual addition before it (three),
//! the self-attention's query, key and value as one product, a self-attention kernel that also
//! writes this position's key and value into a cache laid out for it (no concatenation), the
//! cross-attention's query product and kernel, three more products with their biases in
//! cuBLASLt's epilogue and the GELU. The embedding, the final norm, the generator's product
//! and a log-softmax close the step. Reordering the beams' rows rewrites a slot table (which
//! cache row holds each row's positions; one launch) instead of copying the cache, and the
//! search's top-k is two launches ([`top_k`]). Everything stays f32 (the products in TF32, as
//! burn's path); what burn's step computes, up to the order of the sums (GPU unit tests
//! `step_kernels_match_burns_step`, `top_k_kernel_picks_what_rounds_of_arg_max_pick`).
//!
//! Used for `f32` inference on CubeCL's stream ([`accepts`]); `PALM_STEP=burn` keeps burn's
//! operations.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};

use anyhow::{Context, Result, anyhow};
use burn::prelude::*;
use burn::tensor::{DType, IntDType, Shape, TensorPrimitive};
use burn_cubecl::cubecl::Runtime;
use burn_cubecl::cubecl::cuda::{CudaDevice, CudaRuntime};
use burn_cubecl::cubecl::device_handle::DeviceHandle;
use burn_cubecl::cubecl::server::ComputeServer;
use burn_cubecl::cubecl::stream_id::StreamId;
use burn_cubecl::tensor::CubeTensor;
use cudarc::driver::CudaFunction;
use cudarc::driver::sys::CUstream;
use palm_model::decoder::{
    DECODER_LN_EPS, DecoderCache, FastCache, StepKernels, TopK, TransformerDecoder,
    set_step_kernels,
};

use super::{Cube, Device, Epilogue, Problem, stream, with_device};
use crate::cublaslt::{Operand, operand};

/// The device code.
const SOURCE: &str = include_str!("step.cu");
/// Threads per block of the attention kernels (one block per row and head).
const ATTENTION_THREADS: u32 = 128;
/// Warps per block of the cross-attention kernel that takes a source's beams together.
const CROSS_WARPS: usize = 16;
/// Threads per block of the row kernels (embedding, layer norm, gather) and the GELU.
const ROW_THREADS: u32 = 256;
/// Threads per block of the log-softmax over the vocabulary.
const VOCAB_THREADS: u32 = 1024;

/// Decodes with these kernels on the inference backend, unless `PALM_STEP=burn`.
pub fn install() {
    let on = !std::env::var("PALM_STEP").is_ok_and(|v| v == "burn");
    set_step_kernels::<Cube>(on.then_some(StepKernels {
        accepts,
        step,
        select_rows,
        top_k: Some(top_k),
    }));
}

/// f32 weights and products, and CubeCL's stream known for this thread.
fn accepts(decoder: &TransformerDecoder<Cube>) -> bool {
    palm_model::dense::product_dtype().is_none()
        && decoder.embeddings.weight.val().dtype() == DType::F32
        && stream::known_stream().is_some()
}

/// The compiled kernels of one device, a field per kernel of `step.cu` named as its function,
/// and `Kernels::compile`, which compiles the source for the device whose context is current.
macro_rules! step_kernels {
    ($($name:ident),* $(,)?) => {
        pub(super) struct Kernels {
            $($name: CudaFunction,)*
        }

        impl Kernels {
            fn compile(device: &Device) -> Result<Self> {
                let what = "the decoder step's kernels";
                let names = [$(stringify!($name)),*];
                let [$($name),*] = compile(device, SOURCE, vec![], what, names)?;
                Ok(Self { $($name),* })
            }
        }
    };
}

step_kernels!(
    embed,
    add_layer_norm,
    self_attention,
    cross_attention,
    cross_attention_rows,
    gelu_tanh,
    log_softmax,
    gather_rows,
    gather_slots,
    top_k_segments,
);

/// Compiles `source` with NVRTC and `options` for the device whose context is current and
/// loads its kernels `names`, in order (`what` names them in errors).
pub(super) fn compile<const N: usize>(
    device: &Device,
    source: &str,
    options: Vec<String>,
    what: &str,
    names: [&str; N],
) -> Result<[CudaFunction; N]> {
    let options = cudarc::nvrtc::CompileOptions {
        options,
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, options)
        .map_err(|e| anyhow!("NVRTC compiling {what}: {e:?}"))?;
    let module = device
        .ctx
        .load_module(ptx)
        .with_context(|| format!("loading {what}"))?;
    let functions = names
        .iter()
        .map(|name| {
            module
                .load_function(name)
                .with_context(|| format!("the kernel {name}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(functions
        .try_into()
        .unwrap_or_else(|_| unreachable!("one function per name")))
}

/// NVRTC's option naming the architecture of the device whose context is current (the
/// kernels that use its instructions, tensor-core products or asynchronous copies, need it).
pub(super) fn architecture(device: &Device) -> Result<String> {
    let (major, minor) = device
        .ctx
        .compute_capability()
        .context("the device's compute capability")?;
    Ok(format!("--gpu-architecture=compute_{major}{minor}"))
}

/// A kernel argument.
pub(super) enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Queues `f` on `stream` with `args`, in the order of its parameters.
fn launch(
    f: &CudaFunction,
    grid: (u32, u32),
    block: u32,
    shared_floats: usize,
    stream: CUstream,
    args: Vec<Arg>,
) -> Result<()> {
    let shared = u32::try_from(shared_floats * 4).context("shared memory size")?;
    launch_grid(f, (grid.0, grid.1, 1), block, shared, stream, args)
}

/// [`launch`] on a three-dimensional grid, with `shared` bytes of dynamic shared memory.
pub(super) fn launch_grid(
    f: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    shared: u32,
    stream: CUstream,
    mut args: Vec<Arg>,
) -> Result<()> {
    let mut params: Vec<*mut c_void> = args
        .iter_mut()
        .map(|a| match a {
            Arg::Ptr(v) => (v as *mut u64).cast(),
            Arg::I32(v) => (v as *mut i32).cast(),
            Arg::I64(v) => (v as *mut i64).cast(),
            Arg::F32(v) => (v as *mut f32).cast(),
        })
        .collect();
    // SAFETY: `params` points at values of the types the kernel's parameters declare, in
    // order, alive until the launch returns (the driver copies them); the pointers among them
    // are live allocations of the sizes the kernel reads and writes.
    unsafe {
        cudarc::driver::result::launch_kernel(
            f.cu_function(),
            grid,
            (block, 1, 1),
            shared,
            stream,
            &mut params,
        )
    }
    .map_err(|e| anyhow!("launching a CUDA kernel of our own: {e:?}"))
}

/// `out [m, n] = x [m, k] · w + bias`: `w` at `w.0`, laid out as `w.1`; f32, TF32 products.
#[allow(clippy::too_many_arguments)]
fn affine(
    device: &mut Device,
    stream: CUstream,
    [m, k, n]: [usize; 3],
    x: u64,
    w: (u64, Operand),
    bias: u64,
    out: u64,
) -> Result<()> {
    let pointers = [w.0, x, out];
    let problem = Problem {
        dtype: DType::F32,
        out: DType::F32,
        vector: DType::F32,
        epilogue: Epilogue::Bias,
        first: w.1,
        second: operand([m, k], [k, 1]).expect("a contiguous matrix"),
        batch: 1,
        batch_strides: [0; 3],
        m: n as u64,
        n: m as u64,
        align: pointers.map(|p| (p & p.wrapping_neg()).min(256) as u32),
    };
    device.matmul(&problem, pointers, Some(bias), Some(stream.cast()))
}

/// An error of a task not waited for, for the next step to report.
static QUEUED_ERROR: Mutex<Option<anyhow::Error>> = Mutex::new(None);
/// Whether a task has run: the first of the process is waited for (it compiles the kernels).
static STARTED: AtomicBool = AtomicBool::new(false);

/// Runs `task` on CubeCL's device thread after everything queued before it, with the device
/// pointers of `held` (kept alive until it has queued its launches) and CubeCL's stream;
/// waits for the first task of the process, not for later ones.
pub(super) fn submit(
    held: Vec<CubeTensor<CudaRuntime>>,
    task: impl FnOnce(&mut Device, &[u64], CUstream) -> Result<()> + Send + 'static,
) {
    if let Some(e) = QUEUED_ERROR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        panic!("an earlier task of our CUDA kernels failed: {e:#}");
    }
    let stream = stream::known_stream().expect("accepted with CubeCL's stream known") as usize;
    let index = held[0].device.index;
    let wait = !STARTED.swap(true, Ordering::Relaxed);
    let (sender, receiver) = mpsc::channel();
    let handle = DeviceHandle::<<CudaRuntime as Runtime>::Server>::new(held[0].device.to_id());
    handle.submit(move |server| {
        let id = StreamId::current();
        let result = (|| -> Result<()> {
            let resources = held
                .iter()
                .map(|t| {
                    server
                        .get_resource(t.handle.clone().binding(), id)
                        .map_err(|e| anyhow!("a CUDA tensor's memory: {e:?}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let pointers: Vec<u64> = resources.iter().map(|r| r.resource().ptr).collect();
            with_device(index, |device| task(device, &pointers, stream as CUstream))
        })();
        if wait {
            let _ = sender.send(result);
        } else if let Err(e) = result {
            *QUEUED_ERROR.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
        }
    });
    if wait {
        // CubeCL's channel hands tasks to the device thread in batches: a task waited for has
        // to be flushed to it.
        handle.flush_queue();
        match receiver.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("a task of our CUDA kernels: {e:#}"),
            Err(_) => panic!("a task of our CUDA kernels did not run"),
        }
    }
}

/// Runs `task` with the device pointers of `held` on CubeCL's stream, after everything queued
/// there: queued on CubeCL's device thread when its stream is known ([`submit`]); else on
/// that thread after the backend's queue has drained, on cuBLASLt's own stream, waited for.
pub(super) fn run(
    held: Vec<CubeTensor<CudaRuntime>>,
    task: impl FnOnce(&mut Device, &[u64], CUstream) -> Result<()> + Send + 'static,
) {
    if stream::known_stream().is_some() {
        return submit(held, task);
    }
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "our CUDA kernels wait for CubeCL's device thread: its stream is not known here"
        );
    }
    let client = held[0].client.clone();
    let index = held[0].device.index;
    let result = client
        .exclusive(|| -> Result<()> {
            let resources = held
                .iter()
                .map(|t| {
                    client
                        .get_resource(t.handle.clone())
                        .map_err(|e| anyhow!("a CUDA tensor's memory: {e:?}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let pointers: Vec<u64> = resources.iter().map(|r| r.resource().ptr).collect();
            if let Some(found) = stream::backend_stream(&client) {
                return with_device(index, |d| task(d, &pointers, found.cast()));
            }
            burn_cubecl::cubecl::future::block_on(client.sync())
                .map_err(|e| anyhow!("the CUDA stream synchronises: {e:?}"))?;
            with_device(index, |d| {
                let own = d.stream.clone();
                task(d, &pointers, own.cu_stream())?;
                own.synchronize().context("our CUDA kernels' stream")
            })
        })
        .map_err(|e| anyhow!("CubeCL's device thread: {e:?}"))
        .and_then(|r| r);
    if let Err(e) = result {
        panic!("a task of our CUDA kernels: {e:#}");
    }
}

/// An uninitialised row-major tensor without padded rows (CubeCL's default allocation may
/// pad a matrix's rows; the kernels write packed rows).
pub(super) fn packed(
    device: &CudaDevice,
    shape: &[usize],
    dtype: DType,
) -> CubeTensor<CudaRuntime> {
    burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
        CudaRuntime::client(device),
        device.clone(),
        Shape::from(shape.to_vec()),
        dtype,
    )
}

fn float2(t: CubeTensor<CudaRuntime>) -> Tensor<Cube, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn cube(t: Tensor<Cube, 1>) -> CubeTensor<CudaRuntime> {
    t.into_primitive().tensor()
}

fn cube2(t: Tensor<Cube, 2>) -> CubeTensor<CudaRuntime> {
    t.into_primitive().tensor()
}

/// `t` as i32, the kernels' index type.
fn int32(t: Tensor<Cube, 1, Int>) -> CubeTensor<CudaRuntime> {
    let t = if t.dtype() == DType::I32 {
        t
    } else {
        t.cast(IntDType::I32)
    };
    burn_cubecl::kernel::into_contiguous(t.into_primitive())
}

/// A weight `[k, n]` as cuBLASLt reads it (copied first when neither axis is contiguous).
fn weight(t: Tensor<Cube, 2>) -> (CubeTensor<CudaRuntime>, Operand) {
    let t = cube2(t);
    let layout = |t: &CubeTensor<CudaRuntime>| {
        let (s, st) = (t.meta.shape(), t.meta.strides());
        operand([s[0], s[1]], [st[0], st[1]])
    };
    match layout(&t) {
        Some(l) => (t, l),
        None => {
            let t = burn_cubecl::kernel::into_contiguous(t);
            let l = layout(&t).expect("a contiguous matrix");
            (t, l)
        }
    }
}

/// The tensors one step reads and writes, in the order their pointers arrive.
#[derive(Default)]
struct Held {
    tensors: Vec<CubeTensor<CudaRuntime>>,
    layouts: Vec<Option<Operand>>,
}

impl Held {
    /// A tensor the kernels read with its own strides (or one known to be contiguous).
    fn push(&mut self, t: CubeTensor<CudaRuntime>) -> usize {
        self.tensors.push(t);
        self.layouts.push(None);
        self.tensors.len() - 1
    }

    /// A tensor read as contiguous memory.
    fn vector(&mut self, t: Tensor<Cube, 1>) -> usize {
        self.push(burn_cubecl::kernel::into_contiguous(cube(t)))
    }

    fn weight(&mut self, t: Tensor<Cube, 2>) -> usize {
        let (t, l) = weight(t);
        self.tensors.push(t);
        self.layouts.push(Some(l));
        self.tensors.len() - 1
    }

    /// A linear layer's weight and bias (zeros when it has none).
    fn linear(&mut self, l: &burn::nn::Linear<Cube>) -> (usize, usize) {
        let w = l.weight.val();
        let n = w.dims()[1];
        let bias = match &l.bias {
            Some(b) => b.val(),
            None => Tensor::zeros([n], &w.device()),
        };
        (self.weight(w), self.vector(bias))
    }

    /// A layer norm's scale and shift (zeros when it has none).
    fn norm(&mut self, l: &burn::nn::LayerNorm<Cube>) -> (usize, usize) {
        let g = l.gamma.val();
        let beta = match &l.beta {
            Some(b) => b.val(),
            None => g.zeros_like(),
        };
        (self.vector(g), self.vector(beta))
    }
}

/// Where one layer's tensors are in [`Held`].
struct Layer {
    ln1: (usize, usize),
    qkv: (usize, usize),
    out: (usize, usize),
    ln2: (usize, usize),
    query: (usize, usize),
    memory: (usize, usize),
    /// The memory keys' and values' element strides: source, head, position.
    memory_strides: [i64; 3],
    context: (usize, usize),
    ln3: (usize, usize),
    w1: (usize, usize),
    w2: (usize, usize),
}

/// The memory keys and values `[sources, h, s, dh]` of a layer, with unit stride along `dh`
/// and the same strides (copied otherwise).
fn memory(
    keys: Tensor<Cube, 4>,
    values: Tensor<Cube, 4>,
) -> (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>, [i64; 3]) {
    let (mut k, mut v): (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>) = (
        keys.into_primitive().tensor(),
        values.into_primitive().tensor(),
    );
    if k.meta.strides()[3] != 1 || k.meta.strides() != v.meta.strides() {
        k = burn_cubecl::kernel::into_contiguous(k);
        v = burn_cubecl::kernel::into_contiguous(v);
    }
    let s = k.meta.strides();
    let strides = [s[0] as i64, s[1] as i64, s[2] as i64];
    (k, v, strides)
}

/// One step: see the module's documentation.
fn step(
    decoder: &TransformerDecoder<Cube>,
    generator_bias: Tensor<Cube, 1>,
    tokens: Tensor<Cube, 1, Int>,
    cache: &mut DecoderCache<Cube>,
    pad_id: i64,
) -> Tensor<Cube, 2> {
    let t = cache.step;
    let beams = cache.beams;
    let fast = cache.fast.as_mut().expect("a fast cache");
    if t >= fast.capacity {
        grow(fast, t);
    }
    let device = tokens.device();
    let [rows] = tokens.dims();
    assert_eq!(rows, fast.rows, "one token per cached row");
    let (heads, dh, cap) = (fast.heads, fast.dh, fast.capacity);
    let d = decoder.d_model();
    let vocab = generator_bias.dims()[0];
    let [sources, s] = fast.src_pad.dims();
    assert_eq!(sources * beams, rows, "beams per source");
    let ff = decoder
        .transformer_layers
        .first()
        .map_or(d, |l| l.feed_forward.w_1.weight.dims()[1]);

    let mut held = Held::default();
    let tokens = held.push(int32(tokens));
    let table = held.weight(decoder.embeddings.weight.val());
    // The table's row pitch (a parameter's rows are not padded, but it costs nothing to ask).
    let table_pitch = held.tensors[table].meta.strides()[0];
    let positions = held.push(burn_cubecl::kernel::into_contiguous(cube2(
        decoder.positions(),
    )));
    let final_norm = held.norm(&decoder.layer_norm);
    let bias = held.vector(generator_bias);
    let src_pad = held.push(burn_cubecl::kernel::into_contiguous(cube2(
        fast.src_pad.clone(),
    )));
    let keys_values = held.vector(fast.keys_values.clone());
    let physical_rows = fast.keys_values.dims()[0] / (fast.layers * 2 * heads * cap * dh);
    let slots = fast.slots.clone().map(|s| held.push(s.into_primitive()));
    let work_floats = rows * (7 * d + ff + 1);
    let work = held.vector(Tensor::empty([work_floats], &device));
    let out = packed(&device, &[rows, vocab], DType::F32);
    let out_index = held.push(out.clone());
    let out = float2(out);
    let layer_indices: Vec<Layer> = decoder
        .transformer_layers
        .iter()
        .zip(&cache.layers)
        .zip(&fast.qkv)
        .map(|((layer, lc), (w_qkv, b_qkv))| {
            let ln1 = held.norm(&layer.layer_norm_1);
            let qkv = (held.weight(w_qkv.clone()), held.vector(b_qkv.clone()));
            let out = held.linear(&layer.self_attn.final_linear);
            let ln2 = held.norm(&layer.layer_norm_2);
            let query = held.linear(&layer.context_attn.linear_query);
            let (k, v, memory_strides) = memory(lc.memory_keys.clone(), lc.memory_values.clone());
            let memory = (held.push(k), held.push(v));
            let context = held.linear(&layer.context_attn.final_linear);
            let ln3 = held.norm(&layer.feed_forward.layer_norm);
            let w1 = held.linear(&layer.feed_forward.w_1);
            let w2 = held.linear(&layer.feed_forward.w_2);
            Layer {
                ln1,
                qkv,
                out,
                ln2,
                query,
                memory,
                memory_strides,
                context,
                ln3,
                w1,
                w2,
            }
        })
        .collect();
    let Held { tensors, layouts } = held;
    // A source's beams in one block read its keys and values once (up to 8 beams, heads of
    // up to 128 and 48 KiB of shared memory); otherwise a block per row.
    let source_shared = beams * (dh + s) + CROSS_WARPS * beams * dh + 32;
    let per_source = beams <= 8 && dh <= 128 && source_shared * 4 <= 48 << 10;

    submit(tensors, move |dev, ptr, stream| {
        with_kernels(dev, |dev, k| {
            let w = |i: usize| (ptr[i], layouts[i].expect("a weight's layout"));
            // `out [rows, n] = x [rows, k] · W + b` for a layer's `(W, b)` at `(w, b)`.
            let linear = |dev: &mut Device,
                          [inner, n]: [usize; 2],
                          x: u64,
                          (wi, bi): (usize, usize),
                          out: u64| {
                affine(dev, stream, [rows, inner, n], x, w(wi), ptr[bi], out)
            };
            let f32s = |n: usize| (n * 4) as u64;
            // The work buffer: x, its norm, a scratch row block, attention's context, the
            // query/key/value projections, the feed-forward's inner activation, the padding.
            let x = ptr[work];
            let xn = x + f32s(rows * d);
            let a = xn + f32s(rows * d);
            let ctx = a + f32s(rows * d);
            let qkv = ctx + f32s(rows * d);
            let h = qkv + f32s(rows * 3 * d);
            let pad = h + f32s(rows * ff);
            let plane = f32s(physical_rows * heads * cap * dh);
            let slots = slots.map_or(0, |i| ptr[i]);
            let eps = DECODER_LN_EPS as f32;
            let scale = (dh as f32).sqrt();
            let (d32, dh32, heads32) = (d as i32, dh as i32, heads as i32);
            let norm = |a: u64, (g, b): (usize, usize)| {
                launch(
                    &k.add_layer_norm,
                    (rows as u32, 1),
                    ROW_THREADS,
                    0,
                    stream,
                    vec![
                        Arg::Ptr(a),
                        Arg::Ptr(x),
                        Arg::Ptr(ptr[g]),
                        Arg::Ptr(ptr[b]),
                        Arg::Ptr(xn),
                        Arg::I32(d32),
                        Arg::F32(eps),
                    ],
                )
            };
            launch(
                &k.embed,
                (rows as u32, 1),
                ROW_THREADS,
                0,
                stream,
                vec![
                    Arg::Ptr(ptr[tokens]),
                    Arg::Ptr(ptr[table]),
                    Arg::I64(table_pitch as i64),
                    Arg::Ptr(ptr[positions] + f32s(t * d)),
                    Arg::Ptr(x),
                    Arg::Ptr(pad),
                    Arg::I32(d32),
                    Arg::F32((d as f32).sqrt()),
                    Arg::I32(pad_id as i32),
                    Arg::Ptr(slots),
                    Arg::I32(cap as i32),
                    Arg::I32(t as i32),
                ],
            )?;
            for (l, layer) in layer_indices.iter().enumerate() {
                if l == 0 {
                    norm(0, layer.ln1)?;
                }
                let keys = ptr[keys_values] + 2 * l as u64 * plane;
                let values = keys + plane;
                linear(dev, [d, 3 * d], xn, layer.qkv, qkv)?;
                launch(
                    &k.self_attention,
                    (rows as u32, heads as u32),
                    ATTENTION_THREADS,
                    dh + t + 1 + 32,
                    stream,
                    vec![
                        Arg::Ptr(qkv),
                        Arg::Ptr(keys),
                        Arg::Ptr(values),
                        Arg::Ptr(slots),
                        Arg::Ptr(pad),
                        Arg::Ptr(ctx),
                        Arg::I32(heads32),
                        Arg::I32(dh32),
                        Arg::I32(cap as i32),
                        Arg::I32(t as i32),
                        Arg::F32(scale),
                    ],
                )?;
                linear(dev, [d, d], ctx, layer.out, a)?;
                norm(a, layer.ln2)?;
                linear(dev, [d, d], xn, layer.query, a)?;
                let [ss, hs, ps] = layer.memory_strides;
                let (kernel, blocks, threads, shared) = if per_source {
                    (
                        &k.cross_attention,
                        sources,
                        CROSS_WARPS as u32 * 32,
                        source_shared,
                    )
                } else {
                    (
                        &k.cross_attention_rows,
                        rows,
                        ATTENTION_THREADS,
                        dh + s + 32,
                    )
                };
                launch(
                    kernel,
                    (blocks as u32, heads as u32),
                    threads,
                    shared,
                    stream,
                    vec![
                        Arg::Ptr(a),
                        Arg::Ptr(ptr[layer.memory.0]),
                        Arg::Ptr(ptr[layer.memory.1]),
                        Arg::I64(ss),
                        Arg::I64(hs),
                        Arg::I64(ps),
                        Arg::Ptr(ptr[src_pad]),
                        Arg::Ptr(ctx),
                        Arg::I32(heads32),
                        Arg::I32(dh32),
                        Arg::I32(s as i32),
                        Arg::I32(beams as i32),
                        Arg::F32(scale),
                    ],
                )?;
                linear(dev, [d, d], ctx, layer.context, a)?;
                norm(a, layer.ln3)?;
                linear(dev, [d, ff], xn, layer.w1, h)?;
                let inner = rows * ff;
                launch(
                    &k.gelu_tanh,
                    (inner.div_ceil(ROW_THREADS as usize) as u32, 1),
                    ROW_THREADS,
                    0,
                    stream,
                    vec![Arg::Ptr(h), Arg::I64(inner as i64)],
                )?;
                linear(dev, [ff, d], h, layer.w2, a)?;
                // The residual addition, then the next layer's first norm or the final one.
                let next = layer_indices.get(l + 1).map_or(final_norm, |n| n.ln1);
                norm(a, next)?;
            }
            if layer_indices.is_empty() {
                norm(0, final_norm)?;
            }
            // The generator: x · Eᵀ + b over the tied embedding table `[vocab, d]`.
            let (table_ptr, _) = w(table);
            let transposed = operand([d, vocab], [1, table_pitch]).expect("the table's transpose");
            affine(
                dev,
                stream,
                [rows, d, vocab],
                xn,
                (table_ptr, transposed),
                ptr[bias],
                ptr[out_index],
            )?;
            launch(
                &k.log_softmax,
                (rows as u32, 1),
                VOCAB_THREADS,
                0,
                stream,
                vec![Arg::Ptr(ptr[out_index]), Arg::I32(vocab as i32)],
            )
        })
    });
    cache.step += 1;
    out
}

/// Doubles the cache's capacity before position `len` is written: every row and its slot
/// table copied.
fn grow(fast: &mut FastCache<Cube>, len: usize) {
    let capacity = (fast.capacity * 2).max(len + 1);
    let device = fast.keys_values.device();
    let (planes, heads, dh) = (fast.layers * 2, fast.heads, fast.dh);
    let physical = fast.keys_values.dims()[0] / (planes * heads * fast.capacity * dh);
    let dst = Tensor::<Cube, 1>::empty([planes * physical * heads * capacity * dh], &device);
    let old_cap = fast.capacity;
    if len > 0 && physical > 0 && planes > 0 {
        let held = vec![cube(fast.keys_values.clone()), cube(dst.clone())];
        submit(held, move |dev, ptr, stream| {
            with_kernels(dev, |_, k| {
                launch(
                    &k.gather_rows,
                    ((physical * heads) as u32, planes as u32),
                    ROW_THREADS,
                    0,
                    stream,
                    vec![
                        Arg::Ptr(ptr[0]),
                        Arg::Ptr(ptr[1]),
                        Arg::Ptr(0),
                        Arg::I32(physical as i32),
                        Arg::I32(physical as i32),
                        Arg::I32(heads as i32),
                        Arg::I32(old_cap as i32),
                        Arg::I32(capacity as i32),
                        Arg::I32(len as i32),
                        Arg::I32(dh as i32),
                    ],
                )
            })
        });
    }
    fast.keys_values = dst;
    fast.capacity = capacity;
    if let Some(old) = fast.slots.take() {
        fast.slots = Some(gather_slots(
            Some(old),
            old_cap,
            None,
            fast.rows,
            capacity,
            len,
        ));
    }
}

/// New row `r` continues from row `origins[r]`: the slot table rewritten (made on the first
/// reordering), the cache left in place.
fn select_rows(fast: &mut FastCache<Cube>, origins: Tensor<Cube, 1, Int>, len: usize) {
    let [rows] = origins.dims();
    let (planes, heads, dh) = (fast.layers * 2, fast.heads, fast.dh);
    let physical = fast.keys_values.dims()[0] / (planes * heads * fast.capacity * dh);
    // Each row writes its new positions in its own physical row: never more rows than those.
    assert!(rows <= physical, "{rows} rows for a cache of {physical}");
    if len > 0 {
        let old = fast.slots.take();
        let cap = fast.capacity;
        fast.slots = Some(gather_slots(old, cap, Some(origins), rows, cap, len));
    }
    fast.rows = rows;
}

/// A slot table `[rows, capacity]` whose row `r` holds the first `len` entries of row
/// `origins[r]` (`r` without origins) of `old` (pitch `old_cap`; without a table, every
/// position of a row held by the row itself).
fn gather_slots(
    old: Option<Tensor<Cube, 1, Int>>,
    old_cap: usize,
    origins: Option<Tensor<Cube, 1, Int>>,
    rows: usize,
    capacity: usize,
    len: usize,
) -> Tensor<Cube, 1, Int> {
    let device = old
        .as_ref()
        .map(Tensor::device)
        .or_else(|| origins.as_ref().map(Tensor::device))
        .expect("a table or origins");
    let fresh = packed(&device, &[rows * capacity], DType::I32);
    let mut held = vec![fresh.clone()];
    let old = old.map(|o| {
        held.push(int32(o));
        held.len() - 1
    });
    let origins = origins.map(|o| {
        held.push(int32(o));
        held.len() - 1
    });
    if rows > 0 && len > 0 {
        submit(held, move |dev, ptr, stream| {
            with_kernels(dev, |_, k| {
                launch(
                    &k.gather_slots,
                    (rows as u32, 1),
                    ATTENTION_THREADS,
                    0,
                    stream,
                    vec![
                        Arg::Ptr(old.map_or(0, |i| ptr[i])),
                        Arg::I32(old_cap as i32),
                        Arg::Ptr(origins.map_or(0, |i| ptr[i])),
                        Arg::Ptr(ptr[0]),
                        Arg::I32(capacity as i32),
                        Arg::I32(len as i32),
                    ],
                )
            })
        });
    }
    Tensor::from_primitive(fresh)
}

/// Runs `f` with the device and its compiled kernels (compiled on first use).
fn with_kernels(
    device: &mut Device,
    f: impl FnOnce(&mut Device, &Kernels) -> Result<()>,
) -> Result<()> {
    let kernels = match device.step.take() {
        Some(k) => k,
        None => Kernels::compile(device)?,
    };
    let result = f(device, &kernels);
    device.step = Some(kernels);
    result
}

/// The largest `k` a [`top_k`] takes (the kernel's per-thread lists).
const TOP_K_MAX: usize = 16;
/// Columns per block of [`top_k`]'s first pass.
const TOP_K_SEGMENT: usize = 4096;

/// The `k` best entries of each row of `x [rows, cols]`, best first and the lowest index first
/// among equal values (what rounds of arg-max pick): two launches where burn's rounds are
/// about seventeen. Each block of the first pass keeps the best `k` of a segment of a row
/// (each thread its own sorted list, then `k` rounds of a block-wide arg-max over the lists'
/// heads); the second pass picks the best `k` of a row's segments' candidates the same way.
pub(super) fn top_k(x: Tensor<Cube, 2>, k: usize) -> Result<TopK<Cube>, Box<Tensor<Cube, 2>>> {
    let [rows, cols] = x.dims();
    if k == 0
        || k > TOP_K_MAX
        || k > cols
        || rows == 0
        || x.dtype() != DType::F32
        || stream::known_stream().is_none()
    {
        return Err(Box::new(x));
    }
    let device = x.device();
    let segments = cols.div_ceil(TOP_K_SEGMENT);
    let values = packed(&device, &[rows, k], DType::F32);
    let indices = packed(&device, &[rows, k], DType::I32);
    let mut held = vec![
        burn_cubecl::kernel::into_contiguous(cube2(x)),
        values.clone(),
        indices.clone(),
    ];
    let (values, indices) = (
        float2(values),
        Tensor::<Cube, 2, Int>::from_primitive(indices),
    );
    if segments > 1 {
        held.push(cube(Tensor::empty([rows * segments * k], &device)));
        held.push(Tensor::<Cube, 1, Int>::empty([rows * segments * k], &device).into_primitive());
    }
    submit(held, move |dev, ptr, stream| {
        with_kernels(dev, |_, kernels| {
            let pass = |x: u64, source: u64, cols: usize, segment: usize, out: [u64; 2]| {
                launch(
                    &kernels.top_k_segments,
                    (rows as u32, cols.div_ceil(segment) as u32),
                    if segment >= 1024 { ROW_THREADS } else { 128 },
                    0,
                    stream,
                    vec![
                        Arg::Ptr(x),
                        Arg::Ptr(source),
                        Arg::I32(cols as i32),
                        Arg::I32(segment as i32),
                        Arg::I32(k as i32),
                        Arg::Ptr(out[0]),
                        Arg::Ptr(out[1]),
                    ],
                )
            };
            if segments > 1 {
                let candidates = segments * k;
                pass(ptr[0], 0, cols, TOP_K_SEGMENT, [ptr[3], ptr[4]])
                    .and_then(|()| pass(ptr[3], ptr[4], candidates, candidates, [ptr[1], ptr[2]]))
            } else {
                pass(ptr[0], 0, cols, cols, [ptr[1], ptr[2]])
            }
        })
    });
    Ok((values, indices))
}
