//! The gzip member at the end of every eStargz blob that says where the TOC starts.
//!
//! Current writers emit a 51-byte footer: an empty gzip member whose FEXTRA field holds one
//! `SG` subfield with `%016x` of the TOC offset followed by `STARGZ`. The original stargz
//! (CRFS) footer is 47 bytes: the same 22 bytes of text as the whole extra field, with no
//! subfield header. Readers try both, newest first.

use crate::error::{Error, Result};

/// Size of the current eStargz footer.
pub const FOOTER_SIZE: usize = 51;
/// Size of the legacy stargz footer.
pub const LEGACY_FOOTER_SIZE: usize = 47;

const SUFFIX: &[u8; 6] = b"STARGZ";
/// Empty final stored deflate block, then CRC32 = 0 and ISIZE = 0.
const EMPTY_DEFLATE_TRAILER: [u8; 13] = [1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];

/// Which footer a blob ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FooterKind {
    /// The 51-byte eStargz footer.
    Estargz,
    /// The 47-byte footer of the original stargz format.
    LegacyStargz,
}

impl FooterKind {
    /// Size of this footer in bytes.
    pub fn size(self) -> usize {
        match self {
            FooterKind::Estargz => FOOTER_SIZE,
            FooterKind::LegacyStargz => LEGACY_FOOTER_SIZE,
        }
    }
}

/// A parsed footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// Compressed offset of the gzip member holding the TOC's tar entry.
    pub toc_offset: u64,
    /// Which footer variant was found.
    pub kind: FooterKind,
}

/// The 51-byte footer pointing at `toc_offset`.
pub fn footer_bytes(toc_offset: u64) -> [u8; FOOTER_SIZE] {
    let mut out = [0u8; FOOTER_SIZE];
    out[..10].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
    out[10..12].copy_from_slice(&26u16.to_le_bytes());
    out[12..14].copy_from_slice(b"SG");
    out[14..16].copy_from_slice(&22u16.to_le_bytes());
    out[16..32].copy_from_slice(format!("{toc_offset:016x}").as_bytes());
    out[32..38].copy_from_slice(SUFFIX);
    out[38..].copy_from_slice(&EMPTY_DEFLATE_TRAILER);
    out
}

/// Parses the footer from the last bytes of a blob.
///
/// `tail` must be the last `min(blob_size, 51)` bytes; `blob_size` is the whole blob's size,
/// used to check that the TOC offset points before the footer.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Footer> {
    if blob_size < LEGACY_FOOTER_SIZE as u64 || tail.len() < LEGACY_FOOTER_SIZE {
        return Err(Error::BlobTooSmall { size: blob_size });
    }
    let mut reasons = Vec::new();
    let candidates = [FooterKind::Estargz, FooterKind::LegacyStargz];
    for kind in candidates {
        let size = kind.size();
        if tail.len() < size || blob_size < size as u64 {
            reasons.push(format!("{size}-byte footer: blob too small"));
            continue;
        }
        let footer = &tail[tail.len() - size..];
        match parse_one(footer, kind) {
            Ok(toc_offset) => {
                let limit = blob_size - size as u64;
                if toc_offset >= limit {
                    return Err(Error::TocOffsetOutOfRange { toc_offset, limit });
                }
                return Ok(Footer { toc_offset, kind });
            }
            Err(why) => reasons.push(format!("{size}-byte footer: {why}")),
        }
    }
    Err(Error::BadFooter {
        detail: reasons.join("; "),
    })
}

fn parse_one(f: &[u8], kind: FooterKind) -> std::result::Result<u64, String> {
    if f[0] != 0x1f || f[1] != 0x8b || f[2] != 8 {
        return Err("no gzip magic".into());
    }
    if f[3] & 0x04 == 0 {
        return Err("gzip header has no extra field".into());
    }
    let xlen = u16::from_le_bytes([f[10], f[11]]) as usize;
    let text = match kind {
        FooterKind::Estargz => {
            if xlen != 26 {
                return Err(format!("extra field is {xlen} bytes, expected 26"));
            }
            if &f[12..14] != b"SG" || u16::from_le_bytes([f[14], f[15]]) != 22 {
                return Err("extra field has no SG subfield of 22 bytes".into());
            }
            &f[16..38]
        }
        FooterKind::LegacyStargz => {
            if xlen != 22 {
                return Err(format!("extra field is {xlen} bytes, expected 22"));
            }
            &f[12..34]
        }
    };
    if &text[16..] != SUFFIX {
        return Err("extra field does not end in STARGZ".into());
    }
    let hex = std::str::from_utf8(&text[..16]).map_err(|_| "TOC offset is not ASCII")?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("TOC offset {hex:?} is not hexadecimal"));
    }
    u64::from_str_radix(hex, 16).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn footer_is_an_empty_gzip_member() {
        let f = footer_bytes(0x1234);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&f[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.is_empty());
        let parsed = parse_footer(&f, 0x1234 + 100).unwrap();
        assert_eq!(parsed.toc_offset, 0x1234);
        assert_eq!(parsed.kind, FooterKind::Estargz);
    }

    #[test]
    fn legacy_footer() {
        let mut f = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 22, 0];
        f.extend_from_slice(b"00000000000000ffSTARGZ");
        f.extend_from_slice(&EMPTY_DEFLATE_TRAILER);
        assert_eq!(f.len(), LEGACY_FOOTER_SIZE);
        let mut blob = vec![0u8; 300];
        blob.extend_from_slice(&f);
        let tail = &blob[blob.len() - FOOTER_SIZE..];
        let parsed = parse_footer(tail, blob.len() as u64).unwrap();
        assert_eq!(parsed.toc_offset, 0xff);
        assert_eq!(parsed.kind, FooterKind::LegacyStargz);
    }

    #[test]
    fn rejects_garbage_and_out_of_range() {
        assert!(matches!(
            parse_footer(&[0u8; 51], 51),
            Err(Error::BadFooter { .. })
        ));
        assert!(matches!(
            parse_footer(&[0u8; 10], 10),
            Err(Error::BlobTooSmall { .. })
        ));
        let f = footer_bytes(1000);
        assert!(matches!(
            parse_footer(&f, 1000),
            Err(Error::TocOffsetOutOfRange { .. })
        ));
        let mut g = footer_bytes(5);
        g[20] = b'z';
        assert!(matches!(
            parse_footer(&g, 100),
            Err(Error::BadFooter { .. })
        ));
    }
}
