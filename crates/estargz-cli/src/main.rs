//! `estargz`: convert, inspect and verify eStargz images and layers.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

mod container;
mod image;
mod layer;
mod mount;
mod optimize;
mod progress;
mod registry;

/// Convert container images to eStargz (lazily pullable) and inspect or verify eStargz layers.
///
/// eStargz layers are ordinary tar.gz with a table of contents at the end, so a node can
/// mount them and fetch only the files a container reads. Images stay runnable everywhere.
///
/// Examples:
///   estargz convert oci:./debian:latest oci:./debian-esgz:latest
///   estargz layer convert layer.tar layer.esgz --prioritize startup-files.txt
///   estargz inspect layer.esgz
///   estargz verify layer.esgz --toc-digest sha256:...
#[derive(Parser)]
#[command(name = "estargz", version, verbatim_doc_comment, max_term_width = 100)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Do not show progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image (every layer, every platform) to eStargz.
    ///
    /// SRC and DST are OCI image layouts written as oci:DIR or oci:DIR:TAG. Without a tag,
    /// SRC must hold exactly one image. The converted image gets the TOC digest and
    /// uncompressed-size annotations on each layer and a rewritten config (diff_ids).
    #[command(verbatim_doc_comment)]
    Convert(image::ConvertArgs),
    /// Work on single layer blobs.
    #[command(subcommand)]
    Layer(LayerCommand),
    /// Show an eStargz blob's footer, TOC digest, entries, chunking and prioritized files.
    Inspect(layer::InspectArgs),
    /// Check an eStargz blob: footer, TOC digest and every chunk. Exits 1 if anything fails.
    Verify(layer::VerifyArgs),
    /// Mount an image (or one eStargz layer) lazily at DIR until interrupted.
    ///
    /// Each eStargz layer is mounted through FUSE and read on demand from the registry
    /// (or a local blob) through the chunk cache; an image's layers are stacked with
    /// overlayfs at DIR, with a temporary upper directory. For debugging and demos; needs
    /// root and /dev/fuse. Progress is printed to stderr; Ctrl-C or SIGTERM unmounts everything.
    #[command(verbatim_doc_comment)]
    Mount(mount::MountArgs),
    /// Run an image's workload, record the files it reads, and convert with them first.
    ///
    /// The image (SRC: a registry reference or oci:DIR[:TAG]) runs as a container with
    /// runc, its entrypoint and command (or CMD after --) with its environment, working
    /// directory and user, on its layers mounted lazily through FUSE, which record the
    /// first touch of every file. It stops when the command exits, after --timeout, or
    /// when a line of its output matches --wait-for; then the image is converted to DST
    /// with each layer's recorded files prioritized (before .prefetch.landmark), so a
    /// lazy start fetches them first. Needs root, /dev/fuse and runc.
    ///
    /// Example:
    ///   estargz optimize registry:5000/app:1 registry:5000/app:1-esgz \
    ///       --wait-for 'listening on' --record-out app-startup.txt
    #[command(verbatim_doc_comment)]
    Optimize(Box<optimize::OptimizeArgs>),
}

#[derive(Subcommand)]
enum LayerCommand {
    /// Convert one layer (tar or tar.gz) into one eStargz blob.
    Convert(layer::LayerConvertArgs),
}

fn init_logging(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // fuser logs a reply to a request the kernel gave up on (its process was killed)
        // as an error; that is routine for `estargz optimize` and `mount`.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("{},fuser::reply=off", cli.log_level))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let result: Result<ExitCode> = match &cli.command {
        Command::Convert(args) => image::convert(args, cli.quiet),
        Command::Layer(LayerCommand::Convert(args)) => layer::convert(args, cli.quiet),
        Command::Inspect(args) => layer::inspect(args),
        Command::Verify(args) => layer::verify(args, cli.quiet),
        Command::Mount(args) => mount::mount(args, cli.quiet),
        Command::Optimize(args) => optimize::optimize(args, cli.quiet),
    };
    match result {
        Ok(code) => code,
        // `estargz inspect --json | head` is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
