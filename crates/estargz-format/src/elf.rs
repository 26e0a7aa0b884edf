//! What an ELF executable or shared object needs before it runs: its program interpreter
//! (`PT_INTERP`) and the libraries it names (`DT_NEEDED`, with `DT_RUNPATH`/`DT_RPATH`),
//! read from its program headers and dynamic section.
//!
//! The writer records them in each ELF object's TOC entry (`elfNeeds`, an extension the
//! reference's readers ignore), so that a lazily mounted layer can fetch an executable's
//! whole library tree at its first miss; a layer whose TOC lacks them reads them from the
//! object itself as it arrives.
//!
//! The bytes come from the image, so they are hostile input: every offset and size is
//! checked, every count bounded, and anything unexpected ends the parse with what was
//! found so far. A TOC's `elfNeeds` is held to the same bounds ([`Needs::bounded`]).
//! Nothing here is trusted beyond choosing what to fetch.

use std::io;

use serde::{Deserialize, Serialize};

/// Most `DT_NEEDED` entries taken from one object.
pub const MAX_NEEDED: usize = 64;
/// Most program headers read (real objects have about a dozen).
const MAX_PHNUM: usize = 256;
/// Most bytes of a dynamic section read (a few hundred in real objects).
const MAX_DYNAMIC: usize = 32 << 10;
/// Longest interpreter path or library name taken.
pub const MAX_NAME: usize = 255;
/// Longest `DT_RUNPATH`/`DT_RPATH` string taken (the directories joined by `:`).
pub const MAX_RUNPATH: usize = 4096;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// `e_machine` values whose Debian/Ubuntu multiarch library directory is known.
const EM_386: u16 = 3;
const EM_ARM: u16 = 40;
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const EM_RISCV: u16 = 243;

/// Reads up to `len` bytes at `offset` of the object (fewer at its end).
pub type ReadAt<'a> = dyn FnMut(u64, usize) -> io::Result<Vec<u8>> + 'a;

/// What an object names, in the order the loader needs it: the interpreter first. Its
/// JSON form is a TOC entry's `elfNeeds`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Needs {
    /// `PT_INTERP`: an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interp: Option<String>,
    /// `DT_NEEDED` names without a `/` (those with one are relative to the process's
    /// working directory, which the layer does not know).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needed: Vec<String>,
    /// `DT_RUNPATH` (or `DT_RPATH`) directories, `$ORIGIN` not yet substituted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runpath: Vec<String>,
    /// `e_machine`.
    #[serde(default)]
    pub machine: u16,
}

impl Needs {
    /// Directories the loader searches for a needed library after the run path: the
    /// multiarch directories of the object's machine, then the traditional ones.
    pub fn default_dirs(&self) -> Vec<String> {
        let triplet = match self.machine {
            EM_X86_64 => Some("x86_64-linux-gnu"),
            EM_AARCH64 => Some("aarch64-linux-gnu"),
            EM_386 => Some("i386-linux-gnu"),
            EM_ARM => Some("arm-linux-gnueabihf"),
            EM_RISCV => Some("riscv64-linux-gnu"),
            _ => None,
        };
        let mut dirs = Vec::new();
        if let Some(t) = triplet {
            dirs.push(format!("/lib/{t}"));
            dirs.push(format!("/usr/lib/{t}"));
        }
        for d in ["/lib64", "/usr/lib64", "/lib", "/usr/lib", "/usr/local/lib"] {
            dirs.push(d.to_string());
        }
        dirs
    }

    /// These needs held to what [`needs`] could have read from an object: an absolute
    /// interpreter, at most [`MAX_NEEDED`] distinct names without `/`, each at most
    /// [`MAX_NAME`] bytes, a run path of at most [`MAX_RUNPATH`] bytes, no NUL anywhere;
    /// what breaks a bound is dropped. `None` if nothing is left to load.
    pub fn bounded(self) -> Option<Needs> {
        let fits = |s: &str, max: usize| !s.is_empty() && s.len() <= max && !s.contains('\0');
        let interp = self
            .interp
            .filter(|i| i.starts_with('/') && fits(i, MAX_NAME));
        let mut needed: Vec<String> = Vec::new();
        for name in self.needed {
            if needed.len() == MAX_NEEDED {
                break;
            }
            if fits(&name, MAX_NAME) && !name.contains('/') && !needed.contains(&name) {
                needed.push(name);
            }
        }
        let mut runpath = Vec::new();
        let mut joined = 0;
        for dir in self.runpath {
            joined += dir.len() + usize::from(!runpath.is_empty());
            if joined > MAX_RUNPATH {
                break;
            }
            if fits(&dir, MAX_RUNPATH) {
                runpath.push(dir);
            }
        }
        (interp.is_some() || !needed.is_empty()).then_some(Needs {
            interp,
            needed,
            runpath,
            machine: self.machine,
        })
    }
}

/// Field reader for one object's class and byte order.
#[derive(Clone, Copy)]
struct Layout {
    wide: bool,
    big_endian: bool,
}

impl Layout {
    fn uint(&self, b: &[u8], at: usize, width: usize) -> Option<u64> {
        let bytes = b.get(at..at.checked_add(width)?)?;
        let mut v = 0u64;
        for i in 0..width {
            let byte = if self.big_endian {
                bytes[i]
            } else {
                bytes[width - 1 - i]
            };
            v = (v << 8) | byte as u64;
        }
        Some(v)
    }
    fn u16(&self, b: &[u8], at: usize) -> Option<u16> {
        self.uint(b, at, 2).map(|v| v as u16)
    }
    fn u32(&self, b: &[u8], at: usize) -> Option<u32> {
        self.uint(b, at, 4).map(|v| v as u32)
    }
    /// An address-sized field (`Elf64_Addr`/`Elf32_Addr`, offsets, sizes).
    fn word(&self, b: &[u8], at: usize) -> Option<u64> {
        self.uint(b, at, if self.wide { 8 } else { 4 })
    }
}

#[derive(Clone, Copy)]
struct Phdr {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// The interpreter and libraries the object read through `read` names. `Ok(None)`: not
/// an ELF executable or shared object. `found` is told each name as soon as it is known
/// (the interpreter before the dynamic section is read, which may mean another fetch).
pub fn needs(read: &mut ReadAt<'_>, found: &mut dyn FnMut(&Needs)) -> io::Result<Option<Needs>> {
    let head = read(0, 64)?;
    if head.len() < 52 || !head.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    let l = Layout {
        wide: match head[4] {
            1 => false,
            2 => true,
            _ => return Ok(None),
        },
        big_endian: match head[5] {
            1 => false,
            2 => true,
            _ => return Ok(None),
        },
    };
    let field = |wide64: usize, wide32: usize| if l.wide { wide64 } else { wide32 };
    let (Some(kind), Some(machine)) = (l.u16(&head, 16), l.u16(&head, 18)) else {
        return Ok(None);
    };
    // ET_EXEC and ET_DYN only: a relocatable object or a core file loads nothing.
    if kind != 2 && kind != 3 {
        return Ok(None);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        l.word(&head, field(32, 28)),
        l.u16(&head, field(54, 42)),
        l.u16(&head, field(56, 44)),
    ) else {
        return Ok(None);
    };
    let mut out = Needs {
        machine,
        ..Default::default()
    };
    let (phentsize, phnum) = (phentsize as usize, (phnum as usize).min(MAX_PHNUM));
    if phentsize < field(56, 32) || phentsize > 256 || phnum == 0 {
        return Ok(Some(out));
    }
    let table = read(phoff, phentsize * phnum)?;
    let phdrs: Vec<Phdr> = table
        .chunks_exact(phentsize)
        .filter_map(|p| {
            Some(Phdr {
                kind: l.u32(p, 0)?,
                offset: l.word(p, field(8, 4))?,
                vaddr: l.word(p, field(16, 8))?,
                filesz: l.word(p, field(32, 16))?,
            })
        })
        .collect();
    if let Some(p) = phdrs.iter().find(|p| p.kind == PT_INTERP) {
        let bytes = read(p.offset, (p.filesz as usize).min(MAX_NAME + 1))?;
        out.interp = c_string(&bytes, MAX_NAME).filter(|s| s.starts_with('/'));
        if out.interp.is_some() {
            found(&out);
        }
    }
    let Some(dynamic) = phdrs.iter().find(|p| p.kind == PT_DYNAMIC) else {
        return Ok(Some(out));
    };
    let bytes = read(dynamic.offset, (dynamic.filesz as usize).min(MAX_DYNAMIC))?;
    let entry = field(16, 8);
    let (mut names, mut runpath, mut rpath) = (Vec::new(), None, None);
    let (mut strtab, mut strsz) = (None, None);
    for e in bytes.chunks_exact(entry) {
        let (Some(tag), Some(val)) = (l.word(e, 0), l.word(e, entry / 2)) else {
            break;
        };
        match tag {
            DT_NULL => break,
            DT_NEEDED if names.len() < MAX_NEEDED => names.push(val),
            DT_STRTAB => strtab = Some(val),
            DT_STRSZ => strsz = Some(val),
            DT_RUNPATH => runpath = Some(val),
            DT_RPATH => rpath = Some(val),
            _ => {}
        }
    }
    // DT_STRTAB is an address: the file offset is where a loadable segment maps it.
    let Some(strtab) = strtab.and_then(|va| {
        phdrs
            .iter()
            .filter(|p| p.kind == PT_LOAD)
            .find(|p| va >= p.vaddr && va - p.vaddr < p.filesz)
            .and_then(|p| p.offset.checked_add(va - p.vaddr))
    }) else {
        return Ok(Some(out));
    };
    let mut string = |at: u64, max: usize| -> io::Result<Option<String>> {
        if strsz.is_some_and(|size| at >= size) {
            return Ok(None);
        }
        let Some(pos) = strtab.checked_add(at) else {
            return Ok(None);
        };
        Ok(c_string(&read(pos, max + 1)?, max))
    };
    // RUNPATH wins over RPATH when both are there, as in the loader.
    if let Some(at) = runpath.or(rpath) {
        if let Some(s) = string(at, MAX_RUNPATH)? {
            out.runpath = s
                .split(':')
                .filter(|d| !d.is_empty())
                .map(String::from)
                .collect();
        }
    }
    for at in names {
        if let Some(name) = string(at, MAX_NAME)? {
            if !name.contains('/') && !out.needed.contains(&name) {
                out.needed.push(name);
            }
        }
    }
    found(&out);
    Ok(Some(out))
}

/// The NUL-terminated UTF-8 string at the start of `bytes`, if it is 1 to `max` bytes long.
fn c_string(bytes: &[u8], max: usize) -> Option<String> {
    let end = bytes.iter().take(max + 1).position(|&b| b == 0)?;
    if end == 0 {
        return None;
    }
    String::from_utf8(bytes[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use estargz_testutil::elf_object;

    fn parse(object: &[u8]) -> Option<Needs> {
        let mut read = |offset: u64, len: usize| -> io::Result<Vec<u8>> {
            let start = (offset as usize).min(object.len());
            let end = start.saturating_add(len).min(object.len());
            Ok(object[start..end].to_vec())
        };
        needs(&mut read, &mut |_| {}).unwrap()
    }

    #[test]
    fn an_executable_names_its_interpreter_libraries_and_run_path() {
        let object = elf_object(
            Some("/lib64/ld-linux-x86-64.so.2"),
            &["libfoo.so.1", "libbar.so.2", "sub/dir.so", "libfoo.so.1"],
            Some("$ORIGIN/../lib:/opt/lib"),
            100_000,
        );
        let n = parse(&object).unwrap();
        assert_eq!(n.interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert_eq!(n.needed, ["libfoo.so.1", "libbar.so.2"]);
        assert_eq!(n.runpath, ["$ORIGIN/../lib", "/opt/lib"]);
        assert_eq!(n.machine, EM_X86_64);
        assert_eq!(
            n.default_dirs()[..2],
            ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"]
        );
    }

    #[test]
    fn a_shared_object_without_interpreter() {
        let n = parse(&elf_object(None, &["libc.so.6"], None, 10)).unwrap();
        assert_eq!(n.interp, None);
        assert_eq!(n.needed, ["libc.so.6"]);
        assert!(n.runpath.is_empty());
    }

    #[test]
    fn a_real_executable_of_this_machine() {
        let object = std::fs::read("/bin/sh").unwrap();
        let n = parse(&object).unwrap();
        assert!(
            n.interp.as_deref().is_some_and(|i| i.contains("ld-")),
            "{n:?}"
        );
        assert!(n.needed.iter().any(|l| l.starts_with("libc.so")), "{n:?}");
    }

    #[test]
    fn not_elf_or_not_loadable() {
        assert_eq!(parse(b"#!/bin/sh\necho hello\n"), None);
        assert_eq!(parse(b""), None);
        let mut object = elf_object(None, &["libc.so.6"], None, 10);
        object[16] = 1; // ET_REL
        assert_eq!(parse(&object), None);
    }

    /// Every prefix of an object, and every single-byte change in its headers, parses to
    /// something or nothing without panicking, reading only within bounds.
    #[test]
    fn hostile_headers_never_panic() {
        let object = elf_object(Some("/lib/ld.so"), &["liba.so", "libb.so"], Some("/x"), 50);
        for len in 0..object.len() {
            parse(&object[..len]);
        }
        let header_end = object.len() - 50;
        for at in 0..header_end {
            for value in [0u8, 1, 2, 0x7f, 0x80, 0xff] {
                let mut o = object.clone();
                o[at] = value;
                parse(&o);
            }
        }
    }
}
