//! `--device cpu|cuda[:N]` and `--precision f32|bf16|bf16-mixed`: which burn backend a command
//! runs on, and in which float types.
//! Commands write their work once, generic over `burn::prelude::Backend`, and [`dispatch!`]
//! instantiates it for the backend chosen at run time.

use anyhow::{Result, bail};

/// The CPU backend of every build.
pub type Cpu = burn_ndarray::NdArray<f32>;

/// The CUDA backend (`--features cuda`): burn's CubeCL backend with fusion and autotuning.
#[cfg(feature = "cuda")]
pub type Gpu = burn_cuda::Cuda<f32, i32>;

/// The CUDA backend without burn's fusion layer: inference commands run on it unless
/// `PALM_FUSION=1` ([`inference_fusion`]).
#[cfg(feature = "cuda")]
pub type GpuUnfused =
    burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// `--device` and `--precision`, shared by every command that computes.
#[derive(clap::Args)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N (cuda needs a CUDA build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32; bf16 (CUDA only): weights, activations, gradients and optimizer state in bf16;
    /// bf16-mixed (CUDA only): matrix products in bf16, everything else in f32 (as PyTorch's
    /// bf16 autocast).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "bf16-mixed"])]
    pub precision: String,
}

impl DeviceArgs {
    /// The parsed target.
    pub fn target(&self) -> Result<Target> {
        Target::parse(&self.device, &self.precision)
    }
}

/// Where and in which float type a command computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// ndarray on the CPU, f32.
    Cpu,
    /// CUDA device `index`.
    Cuda {
        /// Device ordinal.
        index: usize,
        /// Float types.
        precision: Precision,
    },
}

/// Which float types a CUDA command computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32 (tensor cores may round products' inputs to tf32).
    F32,
    /// bf16 as the device's default float type: weights, activations, gradients and optimizer
    /// state (burn's pure bf16).
    Bf16,
    /// Matrix products in bf16, the rest in f32: f32 master weights and optimizer state
    /// (`palm_model::dense::set_product_dtype`).
    Bf16Mixed,
}

impl Target {
    /// Parses `--device` and `--precision`.
    pub fn parse(device: &str, precision: &str) -> Result<Self> {
        let precision = match precision {
            "f32" => Precision::F32,
            "bf16" => Precision::Bf16,
            "bf16-mixed" => Precision::Bf16Mixed,
            other => bail!("--precision {other}: expected f32, bf16 or bf16-mixed"),
        };
        let target = match device {
            "cpu" => Target::Cpu,
            "cuda" => Target::Cuda {
                index: 0,
                precision,
            },
            d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Target::Cuda { index, precision },
                _ => bail!("--device {d}: expected cpu, cuda or cuda:N"),
            },
        };
        if precision != Precision::F32 && target == Target::Cpu {
            bail!(
                "--precision {}: needs --device cuda (the CPU backend has no bf16)",
                match precision {
                    Precision::Bf16 => "bf16",
                    _ => "bf16-mixed",
                }
            );
        }
        if matches!(target, Target::Cuda { .. }) && !cfg!(feature = "cuda") {
            bail!(
                "--device {device}: this palm was built without CUDA (build with --features cuda)"
            );
        }
        Ok(target)
    }
}

/// Puts the written-out backward passes of layer norm, softmax, tanh-GELU, dropout and the
/// loss (`palm_model::grad`) on backend `B`'s autodiff, unless `PALM_BACKWARD=burn` (burn's
/// decompositions, for comparison).
pub fn install_backward<B: burn::prelude::Backend>() {
    let burn = std::env::var("PALM_BACKWARD").is_ok_and(|v| v == "burn");
    palm_model::grad::install::<B>(!burn);
}

/// Model switches from the environment, for measuring one way against the other:
/// `PALM_CROSS_ATTENTION=decomposed` runs the cached decoder step's cross-attention through
/// the decomposed attention instead of burn's fused op; under `bf16-mixed` training the
/// feed-forward blocks' inner activations and attention's queries, keys and values stay in
/// bf16 (`palm_model::dense::Narrow`), unless `PALM_FFN=wide` or `PALM_ATTENTION=wide` keeps
/// them in f32.
pub fn model_switches() {
    use palm_model::dense::{Narrow, set_narrow};
    let var = |name: &str, value: &str| std::env::var(name).is_ok_and(|v| v == value);
    palm_model::attention::set_fused_cross_attention(!var("PALM_CROSS_ATTENTION", "decomposed"));
    set_narrow(Narrow::Inner, !var("PALM_FFN", "wide"));
    set_narrow(Narrow::Heads, !var("PALM_ATTENTION", "wide"));
}

/// Where compiled CUDA kernels and autotune results are kept: `PALM_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/palm/cubecl`, else `$HOME/.cache/palm/cubecl`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn kernel_cache_dir(
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<std::path::PathBuf> {
    let var = |name: &str| {
        var(name)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    var("PALM_KERNEL_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("palm/cubecl")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/palm/cubecl")))
}

/// CubeCL compiles every CUDA kernel at run time and autotunes matmuls and reductions per
/// shape: minutes for a whole model (260 s before the first PALM-base training step on an
/// H200). Its caches for both are off or tied to a Cargo project by default; this keeps them
/// in [`kernel_cache_dir`], so only the first run on a machine pays (the second started
/// training in 2 s). A `cubecl.toml` in the working directory or above still decides where its
/// own settings say; `CUBECL_*` variables apply as usual. Call before the first CUDA device.
#[cfg(feature = "cuda")]
pub fn keep_kernels() {
    use burn_cubecl::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig, cache::CacheConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Some(dir) = kernel_cache_dir(|k| std::env::var_os(k)) else {
            return;
        };
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if config.compilation.cache.is_none() {
            config.compilation.cache = Some(CacheConfig::File(dir.clone()));
        }
        if matches!(config.autotune.cache, CacheConfig::Target) {
            config.autotune.cache = CacheConfig::File(dir);
        }
        CubeClRuntimeConfig::set(config);
    });
}

/// Everything a CUDA command sets up before its first tensor, for backend `B` on device
/// `index`: the kernel cache, the cuBLASLt route, the model switches and the float types.
#[cfg(feature = "cuda")]
pub fn cuda_device<B: burn::prelude::Backend<Device = burn_cuda::CudaDevice>>(
    index: usize,
    precision: Precision,
) -> Result<burn_cuda::CudaDevice> {
    model_switches();
    keep_kernels();
    if let Err(e) = crate::cublaslt::install(index) {
        tracing::warn!("{e:#}: burn's own matmul kernels instead");
    }
    let device = burn_cuda::CudaDevice::new(index);
    match precision {
        Precision::F32 => {}
        Precision::Bf16Mixed => {
            palm_model::dense::set_product_dtype(Some(burn::tensor::FloatDType::BF16))
        }
        Precision::Bf16 => burn::tensor::set_default_dtypes::<B>(
            &device,
            burn::tensor::DType::BF16,
            burn::tensor::DType::I32,
        )
        .map_err(|e| anyhow::anyhow!("--precision bf16: {e:?}"))?,
    }
    Ok(device)
}

/// Whether inference commands run on CUDA under burn's fusion layer (`PALM_FUSION=1`) or,
/// by default, without it ([`GpuUnfused`]). A beam-search step is hundreds of small operations
/// and costs host time per operation, not device time (18 ms per step on an H200 at 5 rows
/// and at 320 alike): measured 2026-11-30, fusion's bookkeeping cost more than the launches
/// it saved (batch-64 beam search 3,549 tokens/s fused, 4,835 without; `docs/benchmarks.md`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn inference_fusion() -> bool {
    std::env::var("PALM_FUSION").is_ok_and(|v| v == "1")
}

/// Calls `$f::<B>(&device, args…)` with the backend `B` of `$target`: training and anything
/// else that differentiates.
macro_rules! dispatch {
    ($target:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $target {
            $crate::device::Target::Cpu => {
                $crate::device::model_switches();
                $crate::device::install_backward::<$crate::device::Cpu>();
                $f::<$crate::device::Cpu>(&burn_ndarray::NdArrayDevice::Cpu, $($arg),*)
            }
            #[cfg(feature = "cuda")]
            $crate::device::Target::Cuda { index, precision } => {
                let device = $crate::device::cuda_device::<$crate::device::Gpu>(index, precision)?;
                $crate::device::install_backward::<$crate::device::Gpu>();
                $crate::kernels::install_training(index);
                $f::<$crate::device::Gpu>(&device, $($arg),*)
            }
            #[cfg(not(feature = "cuda"))]
            $crate::device::Target::Cuda { .. } => unreachable!("rejected by Target::parse"),
        }
    };
}
pub(crate) use dispatch;

/// [`dispatch!`] for inference (no gradients): on CUDA, the backend without fusion unless
/// [`inference_fusion`].
macro_rules! dispatch_inference {
    ($target:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $target {
            #[cfg(feature = "cuda")]
            $crate::device::Target::Cuda { index, precision }
                if !$crate::device::inference_fusion() =>
            {
                let device =
                    $crate::device::cuda_device::<$crate::device::GpuUnfused>(index, precision)?;
                $crate::kernels::install();
                $f::<$crate::device::GpuUnfused>(&device, $($arg),*)
            }
            target => $crate::device::dispatch!(target, $f($($arg),*)),
        }
    };
}
pub(crate) use dispatch_inference;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cache_follows_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        let dir = |vars| kernel_cache_dir(env(vars)).map(|p| p.display().to_string());
        assert_eq!(
            dir(&[("PALM_KERNEL_CACHE", "/k"), ("HOME", "/h")]).as_deref(),
            Some("/k")
        );
        assert_eq!(
            dir(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]).as_deref(),
            Some("/x/palm/cubecl")
        );
        assert_eq!(
            dir(&[("PALM_KERNEL_CACHE", ""), ("HOME", "/h")]).as_deref(),
            Some("/h/.cache/palm/cubecl")
        );
        assert_eq!(dir(&[]), None);
    }

    #[test]
    fn parses_devices_and_precisions() {
        assert_eq!(Target::parse("cpu", "f32").unwrap(), Target::Cpu);
        assert!(Target::parse("cpu", "bf16").is_err());
        assert!(Target::parse("tpu", "f32").is_err());
        assert!(Target::parse("cpu", "f16").is_err());
        assert!(Target::parse("cpu", "bf16-mixed").is_err());
        let cuda = Target::parse("cuda:1", "bf16-mixed");
        if cfg!(feature = "cuda") {
            assert_eq!(
                cuda.unwrap(),
                Target::Cuda {
                    index: 1,
                    precision: Precision::Bf16Mixed
                }
            );
            assert_eq!(
                Target::parse("cuda", "bf16").unwrap(),
                Target::Cuda {
                    index: 0,
                    precision: Precision::Bf16
                }
            );
        } else {
            assert!(cuda.unwrap_err().to_string().contains("without CUDA"));
        }
    }
}
