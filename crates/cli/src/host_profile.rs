//! `palm bench --host-profile DIR`: where the host's time goes while it issues the timed steps,
//! sampled on the CPU (pprof's `SIGPROF` timer, every thread of the process). Built only with
//! the `host-profile` feature, which `cargo xtask bench gpu` turns on: the GPU machine has no
//! `perf`, and on the GPU the host is the bound (docs/benchmarks.md, "Where the remaining gap
//! is").
//!
//! Each profiled part writes `DIR/<part>.folded`: one line per distinct stack, root first,
//! frames joined by `;`, the thread's name as the first frame and the sample count last (the
//! "folded" format flame-graph tools read), with symbol hashes removed.

use std::path::{Path, PathBuf};

#[cfg(feature = "host-profile")]
use anyhow::Context;
use anyhow::Result;

/// Whether this binary can sample (built with the `host-profile` feature).
pub const AVAILABLE: bool = cfg!(feature = "host-profile");

/// Samples per second of CPU time. Prime, so that the timer does not beat with a periodic step.
#[cfg(feature = "host-profile")]
const HZ: i32 = 997;

/// A running sampler; [`Sampler::finish`] writes what it saw.
pub struct Sampler {
    #[cfg(feature = "host-profile")]
    guard: pprof::ProfilerGuard<'static>,
    path: PathBuf,
}

/// Starts sampling for the part written to `dir/<part>.folded`.
pub fn start(dir: &Path, part: &str) -> Result<Sampler> {
    let path = dir.join(format!("{part}.folded"));
    #[cfg(feature = "host-profile")]
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the host profile directory {}", dir.display()))?;
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(HZ)
            .build()
            .context("starting the host sampler")?;
        Ok(Sampler { guard, path })
    }
    #[cfg(not(feature = "host-profile"))]
    {
        let _ = path;
        anyhow::bail!("--host-profile needs a palm built with the `host-profile` feature")
    }
}

impl Sampler {
    /// Stops sampling and writes the folded stacks, the most frequent first; returns the number
    /// of samples.
    pub fn finish(self) -> Result<u64> {
        #[cfg(feature = "host-profile")]
        {
            let report = self
                .guard
                .report()
                .build()
                .context("building the host profile")?;
            let mut lines: Vec<(String, u64)> = report
                .data
                .iter()
                .map(|(frames, &count)| {
                    let mut stack = vec![frames.thread_name_or_id()];
                    // pprof keeps the leaf first; each frame may hold several inlined symbols,
                    // innermost first.
                    for frame in frames.frames.iter().rev() {
                        for symbol in frame.iter().rev() {
                            stack.push(unhashed(&symbol.name()).to_owned());
                        }
                    }
                    (stack.join(";"), count.max(0) as u64)
                })
                .collect();
            drop(report);
            drop(self.guard);
            lines.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let total = lines.iter().map(|(_, n)| n).sum();
            let text: String = lines
                .iter()
                .map(|(stack, n)| format!("{stack} {n}\n"))
                .collect();
            std::fs::write(&self.path, text)
                .with_context(|| format!("writing the host profile {}", self.path.display()))?;
            Ok(total)
        }
        #[cfg(not(feature = "host-profile"))]
        {
            unreachable!(
                "a Sampler exists only with the host-profile feature: {:?}",
                self.path
            )
        }
    }
}

/// A symbol without the `::h<16 hex digits>` hash that Rust's legacy mangling appends.
#[cfg_attr(not(feature = "host-profile"), allow(dead_code))]
fn unhashed(name: &str) -> &str {
    match name.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            head
        }
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbol_hashes_are_removed_and_other_names_kept() {
        assert_eq!(
            unhashed("burn_fusion::stream::Stream::register::h0123456789abcdef"),
            "burn_fusion::stream::Stream::register"
        );
        assert_eq!(
            unhashed("core::ops::function::FnOnce::call_once"),
            "core::ops::function::FnOnce::call_once"
        );
        assert_eq!(unhashed("a::hello"), "a::hello");
        assert_eq!(unhashed("a::h0123"), "a::h0123");
    }

    #[cfg(feature = "host-profile")]
    #[inline(never)]
    fn spin_for_the_sampler(seconds: f64) -> u64 {
        let start = std::time::Instant::now();
        let mut x = 1u64;
        while start.elapsed().as_secs_f64() < seconds {
            for _ in 0..1000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        x
    }

    #[cfg(feature = "host-profile")]
    #[test]
    fn a_busy_function_shows_in_the_folded_stacks() {
        let dir = tempfile::tempdir().unwrap();
        let sampler = start(dir.path(), "busy").unwrap();
        spin_for_the_sampler(0.5);
        let samples = sampler.finish().unwrap();
        // 0.5 s of CPU at 997 Hz: about 500 samples; a loaded machine gives fewer.
        assert!(samples > 50, "{samples} samples");
        let text = std::fs::read_to_string(dir.path().join("busy.folded")).unwrap();
        let busy: u64 = text
            .lines()
            .filter(|l| l.contains("spin_for_the_sampler"))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
            .sum();
        assert!(
            busy * 2 > samples,
            "{busy} of {samples} in the busy function:\n{text}"
        );
        assert!(!text.contains("::h0"), "hashes left in:\n{text}");
    }

    #[cfg(not(feature = "host-profile"))]
    #[test]
    fn without_the_feature_starting_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("profiles");
        let err = start(&out, "train_b8").err().expect("an error");
        assert!(err.to_string().contains("host-profile"), "{err}");
        assert!(!out.exists(), "nothing is written without the feature");
    }
}
