//! `palm vocab`: train a WordPiece vocabulary from text files.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow, bail};
use palm_tokenizer::{TrainOptions, train_vocab};

#[derive(clap::Args)]
pub struct Args {
    /// Text files, one text a line (jsonl rows are read as text too).
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// Size of the vocabulary, the 104 reserved entries included (bert-base-chinese: 21128).
    #[arg(long)]
    size: usize,
    /// Where to write vocab.txt.
    #[arg(long)]
    output: PathBuf,
    /// Pieces seen fewer times are not merged.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    /// Keep at most this many distinct characters (the most frequent).
    #[arg(long)]
    limit_alphabet: Option<usize>,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
}

/// Lines of several files; the first read error is kept and ends the stream.
struct Lines {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<(PathBuf, BufReader<std::fs::File>, u64)>,
    error: Arc<Mutex<Option<anyhow::Error>>>,
    buf: Vec<u8>,
}

impl Iterator for Lines {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if self.current.is_none() {
                let path = self.files.next()?;
                match std::fs::File::open(&path) {
                    Ok(f) => self.current = Some((path, BufReader::new(f), 0)),
                    Err(e) => return self.fail(anyhow!("{}: {e}", path.display())),
                }
            }
            let (path, reader, line) = self.current.as_mut().expect("opened above");
            self.buf.clear();
            *line += 1;
            match reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => self.current = None,
                Ok(_) => match std::str::from_utf8(&self.buf) {
                    Ok(s) => return Some(s.trim_end_matches(['\n', '\r']).to_owned()),
                    Err(_) => {
                        let msg = anyhow!("{}:{line}: invalid UTF-8", path.display());
                        return self.fail(msg);
                    }
                },
                Err(e) => {
                    let msg = anyhow!("{}: {e}", path.display());
                    return self.fail(msg);
                }
            }
        }
    }
}

impl Lines {
    fn fail(&mut self, e: anyhow::Error) -> Option<String> {
        *self.error.lock().expect("not poisoned") = Some(e);
        self.files = Vec::new().into_iter();
        self.current = None;
        None
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.size <= palm_tokenizer::vocab::RESERVED {
        bail!(
            "--size {} leaves no room for pieces after the {} reserved entries",
            args.size,
            palm_tokenizer::vocab::RESERVED
        );
    }
    if args.output.exists() && !args.force {
        bail!(
            "{}: already exists; pass --force to replace it",
            args.output.display()
        );
    }
    for p in &args.input {
        check_readable(p)?;
    }
    let error = Arc::new(Mutex::new(None));
    let lines = Lines {
        files: args.input.clone().into_iter(),
        current: None,
        error: error.clone(),
        buf: Vec::new(),
    };
    let options = TrainOptions {
        size: args.size,
        min_frequency: args.min_frequency,
        limit_alphabet: args.limit_alphabet,
        show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let vocab = train_vocab(lines, &options)?;
    if let Some(e) = error.lock().expect("not poisoned").take() {
        return Err(e);
    }
    let mut text = String::with_capacity(vocab.len() * 4);
    for t in &vocab {
        text.push_str(t);
        text.push('\n');
    }
    crate::write_atomic(&args.output, text.as_bytes())?;
    println!(
        "wrote {} tokens ({} learned) to {}",
        vocab.len(),
        vocab.len() - palm_tokenizer::vocab::RESERVED,
        args.output.display()
    );
    if vocab.len() < args.size {
        println!(
            "the corpus supports only {} of the {} requested tokens",
            vocab.len(),
            args.size
        );
    }
    Ok(())
}

fn check_readable(p: &Path) -> Result<()> {
    std::fs::File::open(p).map_err(|e| anyhow!("{}: {e}", p.display()))?;
    Ok(())
}
