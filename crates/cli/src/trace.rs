//! Device time per kernel for `palm bench --trace`: every kernel's start and end as the device
//! recorded them (CUPTI's activity API, CUDA builds), summed by kernel and by launch shape.
//!
//! Unlike CubeCL's own profiling, which synchronises and times each launch on its own, the
//! activity records come from the device without stopping the pipeline, so a traced step runs
//! at about its normal speed, cuBLASLt's products are included, and the gaps between kernels
//! (the device waiting for the host) show up as `idle`.

use std::collections::HashMap;

use serde_json::json;

/// One kernel launch as the device ran it.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub name: String,
    /// Device timestamps, nanoseconds.
    pub start: u64,
    pub end: u64,
    pub grid: [i32; 3],
    pub block: [i32; 3],
}

impl Launch {
    fn ns(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// Time during which at least one kernel ran: the union of the launches' intervals.
fn busy_ns(launches: &[Launch]) -> u64 {
    let mut spans: Vec<(u64, u64)> = launches.iter().map(|l| (l.start, l.end)).collect();
    spans.sort_unstable();
    let mut busy = 0;
    let mut current: Option<(u64, u64)> = None;
    for (s, e) in spans {
        current = match current {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                busy += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    busy + current.map_or(0, |(s, e)| e - s)
}

/// Long (C++-mangled) names cut to something a table can show.
fn short(name: &str) -> String {
    const MAX: usize = 90;
    if name.chars().count() <= MAX {
        name.to_string()
    } else {
        name.chars().take(MAX).chain("…".chars()).collect()
    }
}

#[derive(Default)]
struct Group {
    launches: u64,
    ns: u64,
}

fn ranked<K: Clone + Eq + std::hash::Hash>(
    launches: &[Launch],
    key: impl Fn(&Launch) -> K,
) -> Vec<(K, Group)> {
    let mut groups: HashMap<K, Group> = HashMap::new();
    for l in launches {
        let g = groups.entry(key(l)).or_default();
        g.launches += 1;
        g.ns += l.ns();
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.ns.cmp(&a.1.ns).then(b.1.launches.cmp(&a.1.launches)));
    groups
}

/// The summary of `steps` traced steps: the span from the first launch's start to the last
/// one's end, the time the device was busy, and the kernels ranked by device time, by name
/// and by name and launch shape (the `top` largest of each), all per step.
pub fn summarize(launches: &[Launch], steps: usize, top: usize) -> serde_json::Value {
    let per_step = |ns: u64| ns as f64 / 1e6 / steps.max(1) as f64;
    let first = launches.iter().map(|l| l.start).min().unwrap_or(0);
    let last = launches.iter().map(|l| l.end).max().unwrap_or(0);
    let span = last.saturating_sub(first);
    let busy = busy_ns(launches);
    let kernel: u64 = launches.iter().map(Launch::ns).sum();
    let by_name: Vec<_> = ranked(launches, |l| l.name.clone())
        .into_iter()
        .take(top)
        .map(|(name, g)| {
            json!({
                "kernel": short(&name),
                "ms_per_step": per_step(g.ns),
                "share": g.ns as f64 / kernel.max(1) as f64,
                "launches_per_step": g.launches as f64 / steps.max(1) as f64,
            })
        })
        .collect();
    let by_shape: Vec<_> = ranked(launches, |l| (l.name.clone(), l.grid, l.block))
        .into_iter()
        .take(top)
        .map(|((name, grid, block), g)| {
            json!({
                "kernel": short(&name),
                "grid": grid,
                "block": block,
                "ms_per_step": per_step(g.ns),
                "us_per_launch": g.ns as f64 / 1e3 / g.launches.max(1) as f64,
                "launches_per_step": g.launches as f64 / steps.max(1) as f64,
            })
        })
        .collect();
    json!({
        "steps": steps,
        "launches_per_step": launches.len() as f64 / steps.max(1) as f64,
        "span_ms_per_step": per_step(span),
        "busy_ms_per_step": per_step(busy),
        "idle_ms_per_step": per_step(span - busy),
        "kernel_ms_per_step": per_step(kernel),
        "by_kernel": by_name,
        "by_shape": by_shape,
    })
}

/// The summary as a table for the terminal: the totals, then the kernels by name.
pub fn table(summary: &serde_json::Value) -> String {
    let f = |k: &str| summary[k].as_f64().unwrap_or(0.0);
    let mut out = format!(
        "per step: span {:.2} ms, device busy {:.2} ms, idle {:.2} ms, {:.0} launches\n",
        f("span_ms_per_step"),
        f("busy_ms_per_step"),
        f("idle_ms_per_step"),
        f("launches_per_step")
    );
    out.push_str("   ms/step  share  launches  kernel\n");
    for k in summary["by_kernel"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:10.3} {:5.1}% {:9.0}  {}\n",
            k["ms_per_step"].as_f64().unwrap_or(0.0),
            100.0 * k["share"].as_f64().unwrap_or(0.0),
            k["launches_per_step"].as_f64().unwrap_or(0.0),
            k["kernel"].as_str().unwrap_or("")
        ));
    }
    out
}

/// Starts recording every kernel launched from now on (CUDA builds).
pub fn start() -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    return cupti::start();
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("--trace needs a CUDA build of palm (--features cuda)")
}

/// Stops recording and returns what was recorded; the device must have finished the work.
pub fn finish() -> anyhow::Result<Vec<Launch>> {
    #[cfg(feature = "cuda")]
    return cupti::finish();
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("--trace needs a CUDA build of palm (--features cuda)")
}

/// Recording through CUPTI's activity API (kernels only, `CONCURRENT_KERNEL` records, which
/// do not serialise the device).
// CUPTI is a C library: its calls and the callbacks it makes are `unsafe`.
#[allow(unsafe_code)]
#[cfg(feature = "cuda")]
mod cupti {
    use std::alloc::{Layout, alloc, dealloc};
    use std::ffi::CStr;
    use std::sync::Mutex;

    use anyhow::{Result, anyhow, bail};
    use cudarc::cupti::sys;

    use super::Launch;

    /// Records delivered by CUPTI, appended from its buffer-completion callback.
    static RECORDS: Mutex<Vec<Launch>> = Mutex::new(Vec::new());
    const BUFFER: usize = 16 << 20;

    fn layout() -> Layout {
        Layout::from_size_align(BUFFER, 8).expect("a valid layout")
    }

    fn check(r: sys::CUptiResult, what: &str) -> Result<()> {
        if r == sys::CUptiResult::CUPTI_SUCCESS {
            Ok(())
        } else {
            Err(anyhow!("{what}: {r:?}"))
        }
    }

    unsafe extern "C" fn requested(buffer: *mut *mut u8, size: *mut usize, max: *mut usize) {
        // SAFETY: CUPTI passes valid out-pointers; a null buffer tells it to drop records.
        unsafe {
            *buffer = alloc(layout());
            *size = if (*buffer).is_null() { 0 } else { BUFFER };
            *max = 0;
        }
    }

    unsafe extern "C" fn completed(
        _: cudarc::driver::sys::CUcontext,
        _: u32,
        buffer: *mut u8,
        _: usize,
        valid: usize,
    ) {
        if buffer.is_null() {
            return;
        }
        let mut found = Vec::new();
        let mut record: *mut sys::CUpti_Activity = std::ptr::null_mut();
        // SAFETY: the buffer is one `requested` allocated, filled by CUPTI up to `valid`; a
        // kernel record starts with the fields of `CUpti_ActivityKernel4` in every version
        // CUPTI 13 writes (later versions only append fields).
        unsafe {
            while sys::cuptiActivityGetNextRecord(buffer, valid, &mut record)
                == sys::CUptiResult::CUPTI_SUCCESS
            {
                if (*record).kind != sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL
                {
                    continue;
                }
                let k = std::ptr::read_unaligned(record.cast::<sys::CUpti_ActivityKernel4>());
                let name = if k.name.is_null() {
                    String::from("?")
                } else {
                    CStr::from_ptr(k.name).to_string_lossy().into_owned()
                };
                found.push(Launch {
                    name,
                    start: k.start,
                    end: k.end,
                    grid: [k.gridX, k.gridY, k.gridZ],
                    block: [k.blockX, k.blockY, k.blockZ],
                });
            }
            dealloc(buffer, layout());
        }
        RECORDS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(found);
    }

    /// Starts recording every kernel the process launches from now on.
    pub fn start() -> Result<()> {
        // SAFETY: loading a library by its usual names.
        if !unsafe { sys::is_culib_present() } {
            bail!("--trace needs libcupti (CUDA's extras/CUPTI/lib64 on LD_LIBRARY_PATH)");
        }
        RECORDS.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // SAFETY: the callbacks allocate and free the buffers with one layout and only read
        // records CUPTI wrote.
        unsafe {
            check(
                sys::cuptiActivityRegisterCallbacks(Some(requested), Some(completed)),
                "cuptiActivityRegisterCallbacks",
            )?;
            check(
                sys::cuptiActivityEnable(
                    sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                ),
                "cuptiActivityEnable",
            )
        }
    }

    /// Stops recording and returns the launches recorded since `start`. The device must have
    /// finished the work (synchronise first).
    pub fn finish() -> Result<Vec<super::Launch>> {
        // SAFETY: plain CUPTI calls; the flush delivers the last buffers to `completed`.
        unsafe {
            check(
                sys::cuptiActivityDisable(
                    sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                ),
                "cuptiActivityDisable",
            )?;
            check(sys::cuptiActivityFlushAll(1), "cuptiActivityFlushAll")?;
        }
        Ok(std::mem::take(
            &mut *RECORDS.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(name: &str, start: u64, end: u64, grid: i32) -> Launch {
        Launch {
            name: name.into(),
            start,
            end,
            grid: [grid, 1, 1],
            block: [256, 1, 1],
        }
    }

    #[test]
    fn busy_time_is_the_union_of_overlapping_launches() {
        let l = [
            launch("a", 10, 20, 1),
            launch("b", 15, 30, 1),
            launch("c", 40, 45, 1),
            launch("d", 41, 42, 1),
        ];
        assert_eq!(busy_ns(&l), 20 + 5);
        assert_eq!(busy_ns(&[]), 0);
    }

    #[test]
    fn summary_ranks_kernels_per_step_and_by_shape() {
        let l = [
            launch("gemm", 0, 4_000_000, 132),
            launch("fuse", 5_000_000, 6_000_000, 8),
            launch("fuse", 6_000_000, 9_000_000, 4096),
            launch("gemm", 10_000_000, 14_000_000, 132),
        ];
        let s = summarize(&l, 2, 10);
        assert_eq!(s["span_ms_per_step"], 7.0);
        assert_eq!(s["busy_ms_per_step"], 6.0);
        assert_eq!(s["idle_ms_per_step"], 1.0);
        assert_eq!(s["launches_per_step"], 2.0);
        assert_eq!(s["by_kernel"][0]["kernel"], "gemm");
        assert_eq!(s["by_kernel"][0]["ms_per_step"], 4.0);
        assert_eq!(s["by_kernel"][1]["launches_per_step"], 1.0);
        // By shape the 4096-block element-wise launch outranks the 8-block one.
        assert_eq!(s["by_shape"][1]["grid"][0], 4096);
        assert_eq!(s["by_shape"][1]["us_per_launch"], 3000.0);
        assert!(table(&s).contains("gemm"));
    }

    #[test]
    fn long_names_are_cut() {
        let name = "x".repeat(200);
        assert_eq!(short(&name).chars().count(), 91);
        assert_eq!(short("ElemwiseFuse"), "ElemwiseFuse");
    }
}
