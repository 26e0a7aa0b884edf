//! `estargz layer convert`, `estargz inspect`, `estargz verify`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use estargz_format::{
    convert as convert_layer, ConvertOptions, ConvertOutput, EntryKind, EstargzReader, OpenOptions,
    Sha256Digest,
};
use serde_json::json;

use crate::progress::{bytes_bar, ConvertBar};

/// Options shared by every conversion.
#[derive(Args, Clone, Debug)]
pub struct ConvertFlags {
    /// Largest chunk of a file in one gzip member, in bytes (suffixes K, M accepted).
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Compression level, 0 (none) to 12 (smallest); levels above 9 compress better than
    /// gzip -9 can.
    #[arg(long, default_value_t = estargz_format::DEFAULT_LEVEL,
          value_parser = clap::value_parser!(u32).range(0..=estargz_format::MAX_LEVEL as i64))]
    pub level: u32,
    /// Compression threads (0: one per core). The output is the same for any value.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// File listing paths (one per line, '#' comments) to put first, before
    /// .prefetch.landmark: the files a container reads at start-up.
    #[arg(long, value_name = "FILE")]
    pub prioritize: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

impl ConvertFlags {
    /// The format crate's options for these flags.
    pub fn options(&self) -> Result<ConvertOptions> {
        let prioritized_files = match &self.prioritize {
            Some(p) => read_prioritized(p)?,
            None => Vec::new(),
        };
        Ok(ConvertOptions {
            chunk_size: self.chunk_size,
            compression_level: self.level,
            prioritized_files,
            threads: self.threads,
            ..Default::default()
        })
    }
}

fn read_prioritized(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the prioritized-files list {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

/// Parses sizes such as `4M`, `512K`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1024),
        Some((i, 'M' | 'm')) => (&s[..i], 1024 * 1024),
        Some((i, 'G' | 'g')) => (&s[..i], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4M, 512K, 65536)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Arguments of `estargz layer convert`.
#[derive(Args)]
pub struct LayerConvertArgs {
    /// Input layer: a tar or tar.gz file, or - for standard input.
    pub input: PathBuf,
    /// Output eStargz blob.
    pub output: PathBuf,
    #[command(flatten)]
    pub flags: ConvertFlags,
}

/// The JSON (and human) summary of one converted layer.
pub fn output_json(out: &ConvertOutput) -> serde_json::Value {
    json!({
        "digest": out.blob_digest.to_string(),
        "size": out.blob_size,
        "tocDigest": out.toc_digest.to_string(),
        "diffID": out.diff_id.to_string(),
        "uncompressedSize": out.uncompressed_size,
        "tocOffset": out.toc_offset,
        "entries": out.entries,
        "chunks": out.chunks,
        "prioritized": out.prioritized,
        "missingPrioritized": out.missing_prioritized,
    })
}

/// `estargz layer convert`.
pub fn convert(args: &LayerConvertArgs, quiet: bool) -> Result<ExitCode> {
    let opts = args.flags.options()?;
    let start = Instant::now();
    let (input, len): (Box<dyn std::io::Read>, Option<u64>) = if args.input == Path::new("-") {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let f = File::open(&args.input)
            .with_context(|| format!("opening input layer {}", args.input.display()))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(f), len)
    };
    let dir = args
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let bar = bytes_bar(None, len, "converting".into(), quiet || args.flags.json);
    let mut writer = BufWriter::with_capacity(1 << 20, tmp.as_file());
    let out = convert_layer(input, &mut writer, &opts, &ConvertBar(bar.clone()))
        .with_context(|| format!("converting {}", args.input.display()))?;
    writer.flush().context("writing the output")?;
    drop(writer);
    tmp.as_file().sync_all().context("syncing the output")?;
    tmp.persist(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    bar.finish_and_clear();
    for p in &out.missing_prioritized {
        tracing::warn!(path = %p, "prioritized file is not in the layer");
    }
    if args.flags.json {
        println!("{}", serde_json::to_string_pretty(&output_json(&out))?);
    } else {
        println!("wrote {}", args.output.display());
        println!("  digest             {}", out.blob_digest);
        println!("  size               {} bytes", out.blob_size);
        println!("  TOC digest         {}", out.toc_digest);
        println!("  DiffID             {}", out.diff_id);
        println!("  uncompressed size  {} bytes", out.uncompressed_size);
        println!(
            "  entries            {} ({} chunks, {} prioritized)",
            out.entries, out.chunks, out.prioritized
        );
        println!("  time               {:.2?}", start.elapsed());
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `estargz inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// eStargz blob.
    pub blob: PathBuf,
    /// Print the TOC (stargz.index.json) as stored.
    #[arg(long)]
    pub json: bool,
}

fn open(path: &Path, opts: &OpenOptions) -> Result<EstargzReader<File>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    EstargzReader::open(f, opts).with_context(|| format!("reading {}", path.display()))
}

/// `estargz inspect`.
pub fn inspect(args: &InspectArgs) -> Result<ExitCode> {
    let r = open(&args.blob, &OpenOptions::default())?;
    if args.json {
        use estargz_format::ReadAt;
        let footer = r.footer();
        let end = r.blob_size() - footer.kind.size() as u64;
        let mut member = vec![0u8; (end - footer.toc_offset) as usize];
        r.blob()
            .read_exact_at(&mut member, footer.toc_offset)
            .context("reading the TOC")?;
        let json =
            estargz_format::decode_toc_member(&member, footer.toc_offset, &Default::default())?;
        let mut out = std::io::stdout().lock();
        out.write_all(&json)?;
        out.write_all(b"\n")?;
        return Ok(ExitCode::SUCCESS);
    }
    let toc = r.toc();
    let footer = r.footer();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut file_bytes = 0u64;
    let mut chunk_sizes = Vec::new();
    let mut chunked_files = 0;
    for e in toc.entries().iter().filter(|e| e.toc_index.is_some()) {
        *kinds.entry(e.kind.as_str()).or_default() += 1;
        if e.kind == EntryKind::Reg {
            file_bytes += e.size;
            if e.chunks.len() > 1 {
                chunked_files += 1;
            }
            chunk_sizes.extend(e.chunks.iter().map(|c| c.size));
        }
    }
    chunk_sizes.sort_unstable();
    println!("blob               {}", args.blob.display());
    println!("size               {} bytes", r.blob_size());
    println!(
        "footer             {:?} ({} bytes)",
        footer.kind,
        footer.kind.size()
    );
    println!("TOC offset         {}", footer.toc_offset);
    println!("TOC digest         {}", r.toc_digest());
    println!("TOC size           {} bytes", r.toc_json_size());
    let kinds_line: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    println!(
        "entries            {} ({})",
        toc.toc_order().len(),
        kinds_line.join(", ")
    );
    println!("file content       {file_bytes} bytes");
    println!(
        "chunks             {} ({} files span several; largest {} bytes, median {} bytes)",
        chunk_sizes.len(),
        chunked_files,
        chunk_sizes.last().copied().unwrap_or(0),
        chunk_sizes.get(chunk_sizes.len() / 2).copied().unwrap_or(0)
    );
    match (toc.prefetch_landmark(), toc.no_prefetch_landmark()) {
        (Some(_), _) => {
            let list = toc.prioritized();
            println!(
                "prioritized        {} entries, prefetch range {} bytes",
                list.len(),
                toc.prefetch_size().unwrap_or(0)
            );
            for i in list {
                let e = toc.entry(i);
                match e.read_at_start.len() {
                    0 => println!("  {}", e.name),
                    n => println!(
                        "  {} ({n} of {} chunks read at start)",
                        e.name,
                        e.chunks.len()
                    ),
                }
            }
        }
        (None, Some(_)) => println!("prioritized        none (.no.prefetch.landmark)"),
        (None, None) => println!("prioritized        no landmark"),
    }
    let profiled: Vec<&estargz_format::TocEntry> = toc
        .entries()
        .iter()
        .filter(|e| !e.read_at_start.is_empty())
        .collect();
    if !profiled.is_empty() {
        let chunks = profiled.iter().flat_map(|e| {
            e.read_at_start
                .iter()
                .filter_map(|&i| e.chunks.get(i as usize))
        });
        let (n, bytes) = chunks.fold((0, 0), |(n, b), c| (n + 1, b + c.compressed_end - c.offset));
        println!(
            "read at start      {n} chunks of {} files, {bytes} compressed bytes (prefetched first by a lazy mount)",
            profiled.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `estargz verify`.
#[derive(Args)]
pub struct VerifyArgs {
    /// eStargz blob.
    pub blob: PathBuf,
    /// Expected TOC digest (e.g. from the layer's containerd.io/snapshot/stargz/toc.digest
    /// annotation).
    #[arg(long, value_name = "DIGEST")]
    pub toc_digest: Option<String>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `estargz verify`.
pub fn verify(args: &VerifyArgs, quiet: bool) -> Result<ExitCode> {
    let expected = match &args.toc_digest {
        Some(d) => Some(d.parse::<Sha256Digest>().context("--toc-digest")?),
        None => None,
    };
    let result = verify_blob(&args.blob, expected, quiet || args.json);
    match (&result, args.json) {
        (Ok((digest, report)), true) => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "ok": true, "tocDigest": digest.to_string(), "files": report.files,
                "chunks": report.chunks, "bytes": report.bytes,
            }))?
        ),
        (Err(e), true) => println!(
            "{}",
            serde_json::to_string_pretty(&json!({"ok": false, "error": format!("{e:#}")}))?
        ),
        (Ok((digest, report)), false) => println!(
            "OK {}: TOC digest {digest}, {} files, {} chunks, {} bytes verified",
            args.blob.display(),
            report.files,
            report.chunks,
            report.bytes
        ),
        (Err(e), false) => eprintln!("FAILED {}: {e:#}", args.blob.display()),
    }
    Ok(if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Opens and fully verifies a blob; returns its TOC digest and what was checked.
pub fn verify_blob(
    path: &Path,
    expected: Option<Sha256Digest>,
    quiet: bool,
) -> Result<(Sha256Digest, estargz_format::VerifyReport)> {
    let opts = OpenOptions {
        expected_toc_digest: expected,
        ..Default::default()
    };
    let r = open(path, &opts)?;
    let total: u64 = r
        .toc()
        .entries()
        .iter()
        .filter(|e| e.kind == EntryKind::Reg)
        .map(|e| e.size)
        .sum();
    let bar = bytes_bar(None, Some(total), "verifying".into(), quiet);
    let report = r
        .verify(|n| bar.set_position(n))
        .with_context(|| format!("verifying {}", path.display()))?;
    bar.finish_and_clear();
    if report.files == 0 && r.toc().is_empty() {
        bail!("{} has an empty TOC", path.display());
    }
    Ok((r.toc_digest(), report))
}
