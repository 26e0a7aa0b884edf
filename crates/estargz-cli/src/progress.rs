//! Progress bars for long work; hidden when stderr is not a terminal or with `--quiet`.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-count progress bar (or a hidden one).
pub fn bytes_bar(
    multi: Option<&MultiProgress>,
    len: Option<u64>,
    msg: String,
    quiet: bool,
) -> ProgressBar {
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let style = match len {
        Some(_) => ProgressStyle::with_template(
            "{msg:40!} [{bar:30}] {bytes}/{total_bytes} read {binary_bytes_per_sec} {eta}",
        ),
        None => ProgressStyle::with_template("{msg:30!} {spinner} {bytes} {binary_bytes_per_sec}"),
    };
    if let Ok(style) = style {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg);
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
        return bar;
    }
    match multi {
        Some(m) => m.add(bar),
        None => {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar
        }
    }
}

/// Adapts a bar to the format crate's conversion progress (input bytes consumed).
pub struct ConvertBar(pub ProgressBar);

impl estargz_format::Progress for ConvertBar {
    fn input(&self, bytes: u64) {
        self.0.set_position(bytes);
    }
    // The input is read (spooled) first, then compressed: show the second phase too.
    fn output(&self, bytes: u64) {
        self.0.set_message(format!(
            "compressing: {} written",
            indicatif::HumanBytes(bytes)
        ));
    }
}
