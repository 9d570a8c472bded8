//! `cargo xtask download NAME [--dir DIR]`: fetch a manifest entry into `DIR/NAME/`.
//!
//! Idempotent (files already present are verified, not fetched again), resumable (a transfer
//! continues from its `.part` file) and checked (sha256 from the manifest, or pinned in
//! `DIR/NAME/SHA256SUMS` by the first download). Transfers go through `curl`; when a host
//! cannot be reached it fails within seconds and says where to put the files by hand.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::manifest::{self, Entry, FileSpec, Manifest};

pub const USAGE: &str =
    "usage: cargo xtask download NAME [--dir DIR]   (NAME from datasets/manifest.toml; DIR: data)";

/// Name of the pin file in each entry's directory.
pub const PINS: &str = "SHA256SUMS";

pub fn run(args: &[String]) -> Result<()> {
    let Some(name) = args.first().filter(|a| !a.starts_with("--")) else {
        bail!("{USAGE}");
    };
    let dir = PathBuf::from(crate::flag(args, "--dir").unwrap_or("data"));
    let manifest = manifest::load(&crate::root().join("datasets/manifest.toml"))?;
    let dest = fetch(&manifest, name, &dir)?;
    println!("{name}: ready in {}", dest.display());
    Ok(())
}

/// Makes `dir/name/` hold every file of the entry, verified; returns that directory.
pub fn fetch(manifest: &Manifest, name: &str, dir: &Path) -> Result<PathBuf> {
    let Some(entry) = manifest.get(name) else {
        let known: Vec<&str> = manifest.keys().map(String::as_str).collect();
        bail!(
            "no entry {name:?} in the manifest (known: {})",
            known.join(", ")
        );
    };
    eprintln!(
        "{name}: {} ({}; {}; {})",
        entry.title, entry.license, entry.size, entry.homepage
    );
    let dest = dir.join(name);
    std::fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
    let files = files_of(entry, name, &dest)?;
    let pin_path = dest.join(PINS);
    let mut pins = read_pins(&pin_path)?;
    let pinned_before = pins.clone();
    let mut missing = Vec::new();
    let mut result = Ok(());
    for file in &files {
        match fetch_file(entry, name, file, dir, &mut pins) {
            Ok(true) => {}
            Ok(false) => missing.push(file.name.clone()),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // Pins of files that did arrive are kept even when a later one failed.
    if pins != pinned_before {
        write_pins(&pin_path, &pins)?;
    }
    result?;
    if !missing.is_empty() {
        bail!(
            "{name}: {} not in {} and not downloadable.\n{}\n(then run this again to verify them)",
            missing.join(", "),
            dest.display(),
            manual(entry, dir)
        );
    }
    Ok(dest)
}

/// The entry's instructions for placing the files by hand, with the real directory.
fn manual(entry: &Entry, dir: &Path) -> String {
    entry
        .manual
        .trim()
        .replace("DIR/", &format!("{}/", dir.display()))
}

/// The entry's files: the manifest's list, or the hub's listing (falling back to the manifest's
/// list when the hub cannot be reached and those files were placed by hand).
fn files_of(entry: &Entry, name: &str, dest: &Path) -> Result<Vec<FileSpec>> {
    if entry.listing.is_none() {
        return Ok(entry.files.clone());
    }
    let repo = entry.repo.as_deref().expect("checked by manifest::parse");
    let revision = entry.revision.as_deref().unwrap_or("master");
    match modelscope_listing(repo, revision) {
        Ok(files) => Ok(files),
        Err(e) if entry.files.iter().all(|f| dest.join(&f.name).is_file()) => {
            eprintln!(
                "{name}: no listing from ModelScope ({e:#}); verifying the files placed by hand"
            );
            Ok(entry.files.clone())
        }
        Err(e) => Err(e.context(format!(
            "{name}: cannot list the files of ModelScope {repo}. Without network access, place \
             the files by hand:\n{}",
            manual(entry, dest.parent().unwrap_or(dest))
        ))),
    }
}

/// Every file of a ModelScope model repository, with the hub's sizes and hashes.
fn modelscope_listing(repo: &str, revision: &str) -> Result<Vec<FileSpec>> {
    let url = format!(
        "https://www.modelscope.cn/api/v1/models/{repo}/repo/files?Revision={revision}&Recursive=true"
    );
    let out = Command::new("curl")
        .args(["--fail", "--silent", "--show-error", "--location"])
        .args(["--connect-timeout", "15", "--max-time", "60", &url])
        .output()
        .context("cannot run curl")?;
    if !out.status.success() {
        bail!("{url}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("{url}: not JSON"))?;
    let listed = v["Data"]["Files"]
        .as_array()
        .with_context(|| format!("{url}: no Data.Files in the answer"))?;
    let files: Vec<FileSpec> = listed
        .iter()
        .filter(|f| f["Type"] == "blob")
        .filter_map(|f| f["Path"].as_str().map(|p| (p, f)))
        .filter(|(p, _)| !p.starts_with(".git"))
        .map(|(p, f)| FileSpec {
            name: p.to_owned(),
            url: Some(format!(
                "https://www.modelscope.cn/api/v1/models/{repo}/repo?Revision={revision}&FilePath={p}"
            )),
            sha256: f["Sha256"]
                .as_str()
                .filter(|h| manifest::is_sha256(h))
                .map(str::to_owned),
            size: f["Size"].as_u64(),
        })
        .collect();
    if files.is_empty() {
        bail!("{url}: the listing has no files");
    }
    Ok(files)
}

/// Verifies or downloads one file; `Ok(false)` when it is absent and has no URL.
fn fetch_file(
    entry: &Entry,
    name: &str,
    file: &FileSpec,
    dir: &Path,
    pins: &mut BTreeMap<String, String>,
) -> Result<bool> {
    let path = dir.join(name).join(&file.name);
    let (expected, source) = match (&file.sha256, pins.get(&file.name)) {
        (Some(h), _) => (Some(h.to_ascii_lowercase()), "the manifest"),
        (None, Some(h)) => (Some(h.clone()), PINS),
        (None, None) => (None, ""),
    };
    if path.is_file() {
        let actual = sha256_file(&path)?;
        match &expected {
            Some(h) if *h != actual => bail!(
                "{}: sha256 {actual} but {source} says {h}; the file is left as it is: move it \
                 away to download it again",
                path.display()
            ),
            Some(_) => {}
            None => {
                pins.insert(file.name.clone(), actual);
            }
        }
        return Ok(true);
    }
    let Some(url) = &file.url else {
        return Ok(false);
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("{}", parent.display()))?;
    }
    let part = PathBuf::from(format!("{}.part", path.display()));
    let resumed = part.metadata().map(|m| m.len()).unwrap_or(0);
    match resumed {
        0 => eprintln!("{name}: {} ← {url}", file.name),
        n => eprintln!("{name}: {} ← {url} (resuming after {n} bytes)", file.name),
    }
    curl(url, &part, &manual(entry, dir), name)?;
    let actual = sha256_file(&part)?;
    if let Some(h) = &expected
        && *h != actual
    {
        std::fs::remove_file(&part).ok();
        bail!(
            "{url}: the download has sha256 {actual} but {source} says {h}; it was removed \
             (run again to retry)"
        );
    }
    if let Some(size) = file.size {
        let got = part.metadata().map(|m| m.len()).unwrap_or(0);
        if got != size {
            std::fs::remove_file(&part).ok();
            bail!("{url}: the download has {got} bytes, the manifest says {size}; it was removed");
        }
    }
    std::fs::rename(&part, &path).with_context(|| format!("{}", path.display()))?;
    if expected.is_none() {
        eprintln!("{name}: pinned {}  {}", actual, file.name);
        pins.insert(file.name.clone(), actual);
    }
    Ok(true)
}

/// curl exit codes that mean the host could not be reached at all.
const UNREACHABLE: &[i32] = &[5, 6, 7, 28, 35, 60];

/// Downloads `url` into `part`, continuing what is already there.
fn curl(url: &str, part: &Path, manual: &str, name: &str) -> Result<()> {
    let attempt = |resume: bool| -> Result<std::process::Output> {
        let mut cmd = Command::new("curl");
        cmd.args(["--fail", "--location", "--show-error"])
            .args(["--connect-timeout", "15", "--retry", "2"])
            .args(["--speed-limit", "1024", "--speed-time", "60"]);
        match std::io::stderr().is_terminal() {
            true => cmd.arg("--progress-bar"),
            false => cmd.arg("--silent"),
        };
        if resume {
            cmd.args(["--continue-at", "-"]);
        }
        cmd.arg("--output").arg(part).arg(url);
        cmd.stderr(std::process::Stdio::piped());
        cmd.output().context("cannot run curl (is it installed?)")
    };
    let mut out = attempt(part.exists())?;
    // 33: the server cannot resume; start over.
    if out.status.code() == Some(33) {
        std::fs::remove_file(part).ok();
        out = attempt(false)?;
    }
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let why = stderr
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    match out.status.code() {
        Some(c) if UNREACHABLE.contains(&c) => bail!(
            "{name}: cannot reach {url} ({why}). Without network access, place the files by hand:\n{manual}\n(then run this again to verify them)"
        ),
        _ => bail!(
            "{name}: downloading {url} failed ({why}); what arrived is kept in {} and the next \
             run continues from it",
            part.display()
        ),
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn read_pins(path: &Path) -> Result<BTreeMap<String, String>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(BTreeMap::new());
    };
    let mut pins = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match line.split_once("  ") {
            Some((h, f)) if manifest::is_sha256(h) => {
                pins.insert(f.to_owned(), h.to_ascii_lowercase());
            }
            _ => bail!(
                "{}:{}: not a `sha256sum` line (HASH, two spaces, FILE)",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(pins)
}

fn write_pins(path: &Path, pins: &BTreeMap<String, String>) -> Result<()> {
    let text: String = pins.iter().map(|(f, h)| format!("{h}  {f}\n")).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("{}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO_SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn manifest(files: &str) -> Manifest {
        manifest::parse(&format!(
            "[d]\ntitle = \"t\"\nhomepage = \"h\"\nlicense = \"l\"\nsize = \"s\"\n\
             manual = \"Copy the files into DIR/d/ by hand.\"\nfiles = [{files}]\n"
        ))
        .unwrap()
    }

    fn file_url(p: &Path) -> String {
        format!("file://{}", p.display())
    }

    fn err(r: Result<PathBuf>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn downloads_verify_pin_and_are_idempotent_and_resumable() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.txt"), "hello").unwrap();
        let big: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
        std::fs::write(src.join("b.bin"), &big).unwrap();
        let m = manifest(&format!(
            "{{ name = \"a.txt\", url = \"{}\", sha256 = \"{HELLO_SHA}\" }}, \
             {{ name = \"sub/b.bin\", url = \"{}\" }}",
            file_url(&src.join("a.txt")),
            file_url(&src.join("b.bin"))
        ));
        let data = t.path().join("data");
        // An interrupted transfer left the first 150,000 bytes of b.bin behind (zeros here, so
        // the test can tell a continued transfer from a restarted one).
        std::fs::create_dir_all(data.join("d/sub")).unwrap();
        std::fs::write(data.join("d/sub/b.bin.part"), vec![0u8; 150_000]).unwrap();
        let dest = fetch(&m, "d", &data).unwrap();
        assert_eq!(std::fs::read(dest.join("a.txt")).unwrap(), b"hello");
        let b = std::fs::read(dest.join("sub/b.bin")).unwrap();
        assert_eq!(b.len(), big.len());
        assert!(
            b[..150_000].iter().all(|&x| x == 0),
            "restarted, not continued"
        );
        assert_eq!(b[150_000..], big[150_000..]);
        assert!(!dest.join("sub/b.bin.part").exists());
        let pins = std::fs::read_to_string(dest.join(PINS)).unwrap();
        let b_sha = sha256_file(&dest.join("sub/b.bin")).unwrap();
        assert_eq!(pins, format!("{b_sha}  sub/b.bin\n"));
        // Second run: nothing is fetched (the sources are gone), everything is verified.
        std::fs::remove_dir_all(&src).unwrap();
        fetch(&m, "d", &data).unwrap();
        // A file changed after pinning is reported and left in place.
        std::fs::write(dest.join("sub/b.bin"), b"tampered").unwrap();
        let e = err(fetch(&m, "d", &data));
        assert!(
            e.contains("sub/b.bin") && e.contains("SHA256SUMS says"),
            "{e}"
        );
        assert_eq!(std::fs::read(dest.join("sub/b.bin")).unwrap(), b"tampered");
    }

    #[test]
    fn a_download_with_the_wrong_hash_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("a.txt");
        std::fs::write(&src, "hello, world").unwrap();
        let m = manifest(&format!(
            "{{ name = \"a.txt\", url = \"{}\", sha256 = \"{HELLO_SHA}\" }}",
            file_url(&src)
        ));
        let e = err(fetch(&m, "d", t.path()));
        assert!(
            e.contains("the manifest says") && e.contains("removed"),
            "{e}"
        );
        assert!(!t.path().join("d/a.txt").exists());
        assert!(!t.path().join("d/a.txt.part").exists());
    }

    #[test]
    fn without_network_it_fails_fast_and_says_where_to_put_the_files() {
        let t = tempfile::tempdir().unwrap();
        // Nothing listens on the loopback's port 9: refused at once, as an offline host is.
        let m = manifest("{ name = \"a.txt\", url = \"http://127.0.0.1:9/a.txt\" }");
        let start = std::time::Instant::now();
        let e = err(fetch(&m, "d", t.path()));
        assert!(
            e.contains("cannot reach")
                && e.contains(&format!("into {}/d/ by hand", t.path().display())),
            "{e}"
        );
        assert!(start.elapsed().as_secs() < 30);
        // Placed by hand, the same entry verifies and pins without any transfer.
        std::fs::write(t.path().join("d/a.txt"), "hello").unwrap();
        fetch(&m, "d", t.path()).unwrap();
        let pins = std::fs::read_to_string(t.path().join("d").join(PINS)).unwrap();
        assert_eq!(pins, format!("{HELLO_SHA}  a.txt\n"));
    }

    #[test]
    fn files_without_a_url_must_be_placed_by_hand() {
        let t = tempfile::tempdir().unwrap();
        let m = manifest("{ name = \"PART_I.txt\" }, { name = \"PART_II.txt\" }");
        let e = err(fetch(&m, "d", t.path()));
        assert!(
            e.contains("PART_I.txt, PART_II.txt not in")
                && e.contains(&format!("{}/d/ by hand", t.path().display())),
            "{e}"
        );
        std::fs::write(t.path().join("d/PART_I.txt"), "x").unwrap();
        std::fs::write(t.path().join("d/PART_II.txt"), "y").unwrap();
        fetch(&m, "d", t.path()).unwrap();
        let e = err(fetch(&m, "nope", t.path()));
        assert!(
            e.contains("no entry \"nope\"") && e.contains("known: d"),
            "{e}"
        );
    }
}
