//! Checking an ELF kernel's program headers before linux-loader reads a byte of its
//! segments.
//!
//! linux-loader copies each PT_LOAD segment's file bytes (`p_filesz`) to its physical
//! address (`p_paddr`) and walks each PT_NOTE segment for the PVH entry note, trusting
//! every number the file gives. Everything a kernel file says is hostile input, so
//! each segment is first checked against the file and the VM:
//!
//! - its file bytes (`p_offset` + `p_filesz`) lie inside the file;
//! - a PT_LOAD lies at or above 1 MiB, clear of the boot structures minivmm writes
//!   below it after loading (memory.rs [`layout`]), and ends inside the RAM below the
//!   32-bit MMIO gap, with `p_filesz <= p_memsz` (ELF spec: "the file size may not be
//!   larger than the memory size") and no two PT_LOADs sharing memory;
//! - the PT_NOTE segments together hold at most [`NOTES_MAX`] bytes.
//!
//! One segment below 1 MiB is let through, and left out of loading: one that holds
//! nothing but the file's own ELF header and program header table. GNU ld makes it
//! for `ld -Ttext=0x100000` (with `-z separate-code`, the default on x86-64 since
//! binutils 2.31, the headers get a read-only segment of their own, the page below
//! the text); a kernel never reads it, and copying it would only put bytes where the
//! MP table goes.
//!
//! So linux-loader reads at most the VM's RAM in segment data and [`NOTES_MAX`] in
//! notes, whatever the file claims. It then reads the ELF header and program header
//! table through a [`Pinned`] file, which serves them from the copy checked here (with
//! a headers-only segment turned into PT_NULL): a file rewritten in between cannot
//! slip other headers past the checks.
//!
//! Field offsets are ELF-64's (System V ABI, "ELF Header" and "Program Header").

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::vmm::memory::{MMIO_GAP_START, layout, low_ram_end};

/// Size of the ELF-64 file header (`e_ehsize`).
const EHDR_SIZE: usize = 64;
/// Size of one ELF-64 program header (`e_phentsize`).
const PHDR_SIZE: usize = 56;
/// `e_ident[EI_DATA]`: 1 is ELFDATA2LSB, little-endian, as x86-64 is.
const EI_DATA: usize = 5;
const ELFDATA2LSB: u8 = 1;
/// `p_type` of a loadable segment: copied to memory at `p_paddr`.
const PT_LOAD: u32 = 1;
/// `p_type` of a note segment: read for the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY).
const PT_NOTE: u32 = 4;
/// `p_type` of an unused entry, which loaders skip.
const PT_NULL: u32 = 0;
/// Most bytes the PT_NOTE segments of one kernel may hold together. linux-loader reads
/// notes 12 bytes at a time; a Linux vmlinux has well under 4 KiB of them (build ID,
/// Xen and Linux notes), so 64 KiB is generous and takes milliseconds to read.
pub const NOTES_MAX: u64 = 64 << 10;
/// Lowest address a segment may use: 1 MiB. Below it minivmm writes its boot
/// structures after loading the kernel, and the PC keeps the EBDA and BIOS areas.
pub const LOAD_MIN: u64 = layout::HIMEM;

/// What minivmm and the PC keep below 1 MiB (start, end, name), to say what a low
/// segment would collide with. From memory.rs [`layout`] and the code that writes each.
const LOW_MEMORY: [(u64, u64, &str); 11] = [
    // boot/x86.rs: five 8-byte descriptors.
    (layout::GDT, layout::GDT + 5 * 8, "the GDT"),
    (layout::IDT, layout::IDT + 8, "the IDT"),
    (
        layout::PVH_INFO,
        layout::PVH_INFO + 0x1000,
        "the PVH start_info",
    ),
    (
        layout::ZERO_PAGE,
        layout::ZERO_PAGE + 0x1000,
        "the zero page",
    ),
    (layout::ZERO_PAGE + 0x1000, layout::PML4, "the boot stack"),
    // boot/x86.rs: PML4, PDPT and four page directories.
    (layout::PML4, layout::PML4 + 6 * 0x1000, "the page tables"),
    (
        layout::CMDLINE,
        layout::CMDLINE + layout::CMDLINE_MAX as u64,
        "the command line",
    ),
    (
        layout::EBDA,
        layout::EBDA_END,
        "the EBDA (reserved in the memory map)",
    ),
    (
        layout::EBDA_END,
        layout::ACPI,
        "the VGA and ROM hole (not RAM in the memory map)",
    ),
    (layout::ACPI, layout::MPTABLE, "the ACPI tables"),
    (layout::MPTABLE, layout::HIMEM, "the MP table"),
];

/// One program header, as the file gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Its index in the program header table.
    pub index: u16,
    /// `p_type`.
    pub kind: u32,
    /// `p_offset`: where its bytes start in the file.
    pub offset: u64,
    /// `p_paddr`: where they go in guest physical memory.
    pub paddr: u64,
    /// `p_filesz`: bytes in the file.
    pub filesz: u64,
    /// `p_memsz`: bytes in memory; the part past `p_filesz` is zero-filled (bss).
    pub memsz: u64,
}

impl Segment {
    /// Parses program header `index` from its 56 bytes.
    fn parse(index: u16, b: &[u8]) -> Segment {
        Segment {
            index,
            kind: le32(b, 0),
            offset: le64(b, 8),
            paddr: le64(b, 24),
            filesz: le64(b, 32),
            memsz: le64(b, 40),
        }
    }

    /// First byte after its memory image; past 2^64 - 1 for a hostile file, hence u128.
    fn mem_end(&self) -> u128 {
        u128::from(self.paddr) + u128::from(self.memsz)
    }

    /// First byte after its bytes in the file.
    fn file_end(&self) -> u128 {
        u128::from(self.offset) + u128::from(self.filesz)
    }
}

impl std::fmt::Display for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            PT_LOAD => "PT_LOAD".to_string(),
            PT_NOTE => "PT_NOTE".to_string(),
            other => format!("type {other:#x}"),
        };
        write!(
            f,
            "segment {} ({kind}: p_paddr {:#x}, p_memsz {:#x} ({}), p_offset {:#x}, p_filesz {:#x})",
            self.index,
            self.paddr,
            self.memsz,
            human(self.memsz),
            self.offset,
            self.filesz
        )
    }
}

/// A byte count in the largest binary unit that keeps it at least 1: "1 TiB", "1.5 MiB".
fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >> (10 * (unit + 1)) != 0 {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} bytes");
    }
    let v = bytes as f64 / (1u64 << (10 * unit)) as f64;
    let s = format!("{v:.1}");
    format!("{} {}", s.strip_suffix(".0").unwrap_or(&s), UNITS[unit])
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

/// What is wrong with an ELF kernel's headers.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The ELF header or the program header table could not be read.
    #[error("cannot read kernel {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file ends inside its headers (the ELF header, or the program header table
    /// `e_phnum` entries long at `e_phoff`).
    #[error(
        "{path} is truncated or corrupt: its {what} would end at byte {end} but the file has {file_len} bytes. Copy or download it again"
    )]
    HeadersTruncated {
        /// The file.
        path: PathBuf,
        /// Which header.
        what: String,
        /// Where it would end.
        end: u128,
        /// The file's size.
        file_len: u64,
    },
    /// Not a little-endian ELF, or program headers of a size ELF-64 does not have.
    #[error("{path} is not a kernel minivmm can boot: {why}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A segment's bytes lie (partly) past the end of the file.
    #[error(
        "kernel {path} is truncated or corrupt: {segment} ends at byte {end} of the file, which has {file_len} bytes. Copy or download it again",
        end = .segment.file_end()
    )]
    SegmentPastFile {
        /// The file.
        path: PathBuf,
        /// The segment.
        segment: Segment,
        /// The file's size.
        file_len: u64,
    },
    /// p_filesz > p_memsz, which the ELF specification forbids.
    #[error(
        "kernel {path} is corrupt: {segment} has more bytes in the file than in memory (the ELF specification requires p_filesz <= p_memsz)"
    )]
    FileszOverMemsz {
        /// The file.
        path: PathBuf,
        /// The segment.
        segment: Segment,
    },
    /// A PT_LOAD below 1 MiB, where the boot structures go.
    #[error(
        "kernel {path}: {segment} lies below 1 MiB, where minivmm writes this {ram_mib} MiB VM's boot structures after loading the kernel and the PC reserves its BIOS areas: {collides}. Link the kernel at or above 1 MiB (Linux is at 16 MiB; for a small kernel, ld -Ttext-segment=0x100000, or a linker script that starts at 1 MiB)"
    )]
    BelowOneMib {
        /// The file.
        path: PathBuf,
        /// The segment.
        segment: Segment,
        /// The VM's RAM in MiB.
        ram_mib: u64,
        /// What it collides with, in words.
        collides: String,
    },
    /// A PT_LOAD that ends past the RAM below the 32-bit MMIO gap.
    #[error(
        "kernel {path} ends at {end:#x}, beyond the VM's RAM: {segment} ends there, and this {ram_mib} MiB VM's RAM below the 32-bit MMIO gap ends at {ram_end:#x}. {fix}",
        end = .segment.mem_end(),
        fix = memory_fix(.segment.mem_end())
    )]
    BeyondRam {
        /// The file.
        path: PathBuf,
        /// The segment.
        segment: Segment,
        /// The VM's RAM in MiB.
        ram_mib: u64,
        /// End of the RAM a kernel may use.
        ram_end: u64,
    },
    /// Two PT_LOAD segments share memory: one would overwrite the other.
    #[error(
        "kernel {path} is corrupt: segments {} and {} overlap in memory, so loading one would overwrite the other: {first}; {second}", .first.index, .second.index
    )]
    Overlap {
        /// The file.
        path: PathBuf,
        /// The one with the lower index.
        first: Segment,
        /// The other.
        second: Segment,
    },
    /// The note segments hold more than [`NOTES_MAX`] bytes.
    #[error(
        "kernel {path} is corrupt: its note segments hold {total} bytes, {segment} among them; minivmm reads at most {max} bytes of notes (a Linux kernel has under 4 KiB)", max = NOTES_MAX
    )]
    NotesTooBig {
        /// The file.
        path: PathBuf,
        /// The segment that went over the limit.
        segment: Segment,
        /// Note bytes up to and including it.
        total: u128,
    },
    /// No PT_LOAD has file bytes: nothing would be loaded.
    #[error(
        "{path} is not a kernel minivmm can boot: it has no loadable segment with data (PT_LOAD with p_filesz > 0)"
    )]
    NothingToLoad {
        /// The file.
        path: PathBuf,
    },
}

/// An ELF kernel whose headers passed the checks: what they say, and the bytes they
/// were read from (for [`Checked::pinned`]).
#[derive(Debug)]
pub struct Checked {
    /// First byte after the highest PT_LOAD's memory image, bss (p_memsz) included.
    pub kernel_end: u64,
    /// Every program header, in file order.
    pub segments: Vec<Segment>,
    /// The ELF header as checked.
    ehdr: Vec<u8>,
    /// The program header table as checked, and its offset in the file.
    phdrs: (u64, Vec<u8>),
}

/// Reads `f`'s ELF header and program header table and checks every segment against
/// the file (`file_len` bytes) and a VM of `memory_mib` MiB. Reads at most 64 bytes
/// plus 65535 × 56 (`e_phnum` is 16 bits), whatever the file says.
pub fn check(f: &File, path: &Path, file_len: u64, memory_mib: u64) -> Result<Checked, ElfError> {
    let p = || path.to_path_buf();
    let read = |buf: &mut [u8], at: u64| {
        f.read_exact_at(buf, at)
            .map_err(|source| ElfError::Read { path: p(), source })
    };
    let truncated = |what: String, end: u128| ElfError::HeadersTruncated {
        path: p(),
        what,
        end,
        file_len,
    };
    if file_len < EHDR_SIZE as u64 {
        return Err(truncated("ELF header".into(), EHDR_SIZE as u128));
    }
    let mut ehdr = vec![0u8; EHDR_SIZE];
    read(&mut ehdr, 0)?;
    let bad = |why: String| ElfError::BadHeader { path: p(), why };
    if ehdr[EI_DATA] != ELFDATA2LSB {
        return Err(bad(format!(
            "a big-endian or invalid ELF (e_ident[EI_DATA] {}; x86-64 is little-endian, 1)",
            ehdr[EI_DATA]
        )));
    }
    let phoff = le64(&ehdr, 32);
    let phentsize = usize::from(u16::from_le_bytes([ehdr[54], ehdr[55]]));
    let phnum = usize::from(u16::from_le_bytes([ehdr[56], ehdr[57]]));
    if phentsize != PHDR_SIZE {
        return Err(bad(format!(
            "its program headers are {phentsize} bytes each (e_phentsize); ELF-64's are {PHDR_SIZE}"
        )));
    }
    if phoff < EHDR_SIZE as u64 {
        return Err(bad(format!(
            "its program header table starts at byte {phoff} (e_phoff), inside the 64-byte ELF header"
        )));
    }
    // At most 65535 × 56 bytes: no overflow in usize, and a u128 end cannot wrap.
    let table_len = phnum * PHDR_SIZE;
    let table_end = u128::from(phoff) + table_len as u128;
    if table_end > u128::from(file_len) {
        return Err(truncated(
            format!("program header table ({phnum} entries at byte {phoff})"),
            table_end,
        ));
    }
    let mut table = vec![0u8; table_len];
    read(&mut table, phoff)?;
    let segments: Vec<Segment> = table
        .chunks_exact(PHDR_SIZE)
        .zip(0..=u16::MAX)
        .map(|(b, i)| Segment::parse(i, b))
        .collect();

    let ram_end = low_ram_end(memory_mib);
    let mut notes: u128 = 0;
    let mut loads: Vec<Segment> = Vec::new();
    for &s in &segments {
        let is_load = s.kind == PT_LOAD && (s.memsz != 0 || s.filesz != 0);
        if !is_load && s.kind != PT_NOTE {
            continue; // linux-loader reads nothing else
        }
        if is_load && s.filesz > s.memsz {
            return Err(ElfError::FileszOverMemsz {
                path: p(),
                segment: s,
            });
        }
        if s.file_end() > u128::from(file_len) {
            return Err(ElfError::SegmentPastFile {
                path: p(),
                segment: s,
                file_len,
            });
        }
        if s.kind == PT_NOTE {
            notes += u128::from(s.filesz);
            if notes > u128::from(NOTES_MAX) {
                return Err(ElfError::NotesTooBig {
                    path: p(),
                    segment: s,
                    total: notes,
                });
            }
            continue;
        }
        if s.paddr < LOAD_MIN && headers_only(&s, phoff, table_end) {
            log::debug!(
                "{}: {s} holds only the ELF headers: not loaded",
                path.display()
            );
            let at = usize::from(s.index) * PHDR_SIZE;
            table[at..at + 4].copy_from_slice(&PT_NULL.to_le_bytes());
            continue;
        }
        if s.paddr < LOAD_MIN {
            return Err(ElfError::BelowOneMib {
                path: p(),
                segment: s,
                ram_mib: memory_mib,
                collides: collisions(&s),
            });
        }
        if s.mem_end() > u128::from(ram_end) {
            return Err(ElfError::BeyondRam {
                path: p(),
                segment: s,
                ram_mib: memory_mib,
                ram_end,
            });
        }
        loads.push(s);
    }
    if !loads.iter().any(|s| s.filesz > 0) {
        return Err(ElfError::NothingToLoad { path: p() });
    }
    // Sorted by address, some two neighbours overlap if any two segments do (each
    // has p_memsz >= 1 here).
    loads.sort_by_key(|s| s.paddr);
    for w in loads.windows(2) {
        if let [a, b] = w
            && a.mem_end() > u128::from(b.paddr)
        {
            let (first, second) = if a.index < b.index {
                (*a, *b)
            } else {
                (*b, *a)
            };
            return Err(ElfError::Overlap {
                path: p(),
                first,
                second,
            });
        }
    }
    // Every end was checked against ram_end, a u64.
    let kernel_end = loads
        .iter()
        .map(|s| s.paddr.saturating_add(s.memsz))
        .max()
        .unwrap_or(0);
    Ok(Checked {
        kernel_end,
        segments,
        ehdr,
        phdrs: (phoff, table),
    })
}

/// True when PT_LOAD `s` holds the ELF header and the program header table right
/// after it, and nothing else: file bytes from 0 to at most the table's end, no bss.
fn headers_only(s: &Segment, phoff: u64, table_end: u128) -> bool {
    phoff == EHDR_SIZE as u64 && s.offset == 0 && s.filesz == s.memsz && s.file_end() <= table_end
}

/// What a segment below 1 MiB collides with, in words, or where it falls among them.
fn collisions(s: &Segment) -> String {
    let hit: Vec<&str> = LOW_MEMORY
        .iter()
        .filter(|(start, end, _)| {
            s.mem_end() > u128::from(*start) && u128::from(s.paddr) < u128::from(*end)
        })
        .map(|(_, _, name)| *name)
        .collect();
    match hit.as_slice() {
        [] => "it falls between them (GDT at 0x500, start_info at 0x6000, zero page at 0x7000, page tables at 0x9000, command line at 0x20000, EBDA at 0x9fc00, ACPI tables at 0xe0000, MP table at 0xf0000), in memory the guest is told is free".into(),
        [one] => format!("it collides with {one}"),
        [most @ .., last] => format!("it collides with {} and {last}", most.join(", ")),
    }
}

/// What --memory would hold a kernel ending at `end`, or why none can.
fn memory_fix(end: u128) -> String {
    if end <= u128::from(MMIO_GAP_START) {
        // end <= 3 GiB: the MiB count fits a u64 easily.
        let mib = end.div_ceil(1 << 20) as u64;
        format!("Give it --memory {mib}M or more, or check the file")
    } else {
        format!(
            "No --memory can hold it: a kernel must end below {MMIO_GAP_START:#x} (3 GiB), where the 32-bit MMIO gap begins, since the PVH and 64-bit entries start it in low memory. Check the file: a kernel usually ends a few MiB above where it starts"
        )
    }
}

impl Checked {
    /// `f` as linux-loader should read it: the ELF header and program header table
    /// come from the copy [`check`] checked, everything else from the file.
    pub fn pinned<'a>(&'a self, f: &'a mut File) -> Pinned<'a> {
        Pinned {
            file: f,
            pos: 0,
            pieces: [
                (0, self.ehdr.as_slice()),
                (self.phdrs.0, self.phdrs.1.as_slice()),
            ],
        }
    }
}

/// A kernel file whose headers are pinned to the bytes that were checked (see
/// [`Checked::pinned`]). Reads, seeks and volatile reads behave as the file's own.
pub struct Pinned<'a> {
    file: &'a mut File,
    pos: u64,
    /// (offset in the file, bytes): the ELF header and the program header table,
    /// which do not overlap (`e_phoff` >= 64 was checked).
    pieces: [(u64, &'a [u8]); 2],
}

/// Where the next read at a position comes from.
enum Source<'b> {
    /// Pinned bytes, up to the end of their piece.
    Pinned(&'b [u8]),
    /// The file, at most this many bytes (up to the next pinned piece).
    File(u64),
}

impl Pinned<'_> {
    fn source(&self) -> Source<'_> {
        let mut limit = u64::MAX;
        for (start, bytes) in &self.pieces {
            let end = start.saturating_add(bytes.len() as u64);
            if (*start..end).contains(&self.pos) {
                // pos - start < bytes.len(), a usize.
                return Source::Pinned(&bytes[(self.pos - start) as usize..]);
            }
            if *start > self.pos {
                limit = limit.min(start - self.pos);
            }
        }
        Source::File(limit)
    }

    fn advance(&mut self, n: usize) -> usize {
        self.pos = self.pos.saturating_add(n as u64);
        n
    }

    /// One read from one source: pinned bytes, or the file up to the next piece.
    fn read_volatile_once<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let n = match self.source() {
            Source::Pinned(mut b) => b.read_volatile(buf)?,
            Source::File(limit) => {
                let n = usize::try_from(limit).unwrap_or(usize::MAX).min(buf.len());
                let mut part = buf.subslice(0, n)?;
                self.file
                    .seek(SeekFrom::Start(self.pos))
                    .map_err(VolatileMemoryError::IOError)?;
                self.file.read_volatile(&mut part)?
            }
        };
        Ok(self.advance(n))
    }
}

impl Read for Pinned<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.source() {
            Source::Pinned(b) => {
                let n = b.len().min(buf.len());
                buf[..n].copy_from_slice(&b[..n]);
                n
            }
            Source::File(limit) => {
                let n = usize::try_from(limit).unwrap_or(usize::MAX).min(buf.len());
                self.file.read_at(&mut buf[..n], self.pos)?
            }
        };
        Ok(self.advance(n))
    }
}

impl ReadVolatile for Pinned<'_> {
    /// Fills `buf` as far as the file goes, across pinned pieces and the file: vm-memory
    /// reads each guest memory region with one call and takes a short count for an
    /// error (a regular file's read(2) is short only at the end, or past 2 GiB).
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let mut rest = buf.offset(done)?;
            match self.read_volatile_once(&mut rest) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if done == 0 => return Err(e),
                // What was read stays read, as Read::read reports it.
                Err(_) => break,
            }
        }
        Ok(done)
    }
}

impl Seek for Pinned<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let invalid = || io::Error::new(io::ErrorKind::InvalidInput, "seek out of range");
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or_else(invalid)?,
            SeekFrom::End(d) => {
                let len = self.file.metadata()?.len();
                len.checked_add_signed(d).ok_or_else(invalid)?
            }
        };
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// An ELF-64 header and program headers for `segs` (type, offset, paddr, filesz,
    /// memsz), padded with zeroes to `len` bytes.
    fn image(segs: &[(u32, u64, u64, u64, u64)], len: usize) -> Vec<u8> {
        let mut f = vec![0u8; EHDR_SIZE];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[EI_DATA] = ELFDATA2LSB;
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&LOAD_MIN.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        f[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for &(kind, offset, paddr, filesz, memsz) in segs {
            let mut ph = vec![0u8; PHDR_SIZE];
            ph[0..4].copy_from_slice(&kind.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[16..24].copy_from_slice(&paddr.to_le_bytes());
            ph[24..32].copy_from_slice(&paddr.to_le_bytes());
            ph[32..40].copy_from_slice(&filesz.to_le_bytes());
            ph[40..48].copy_from_slice(&memsz.to_le_bytes());
            f.extend_from_slice(&ph);
        }
        f.resize(len.max(f.len()), 0);
        f
    }

    fn file(name: &str, bytes: &[u8]) -> (File, PathBuf) {
        let dir = std::env::temp_dir().join(format!("minivmm-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (f, path)
    }

    fn checked(name: &str, bytes: &[u8], mib: u64) -> Result<Checked, ElfError> {
        let (f, path) = file(name, bytes);
        let r = check(&f, &path, bytes.len() as u64, mib);
        let _ = std::fs::remove_file(&path);
        r
    }

    const CODE: (u32, u64, u64, u64, u64) = (PT_LOAD, 0x1000, LOAD_MIN, 0x100, 0x2000);

    #[test]
    fn a_sane_kernel_passes_and_its_end_counts_the_bss() {
        let bss = (PT_LOAD, 0, 0x20_0000, 0, 0x5000);
        let note = (PT_NOTE, 0x1100, 0, 0x20, 0);
        let c = checked("sane", &image(&[CODE, bss, note], 0x2000), 64).unwrap();
        assert_eq!(c.kernel_end, 0x20_5000);
        assert_eq!(c.segments.len(), 3);
    }

    /// `ld -Ttext=0x100000` output: the headers in a segment of their own at 0xff000.
    #[test]
    fn a_headers_only_segment_below_1_mib_is_left_out() {
        let table_end = (EHDR_SIZE + 2 * PHDR_SIZE) as u64;
        let headers = (PT_LOAD, 0, 0xff000, table_end, table_end);
        let bytes = image(&[headers, CODE], 0x2000);
        let (mut f, path) = file("headers", &bytes);
        let c = check(&f, &path, bytes.len() as u64, 64).unwrap();
        assert_eq!(c.kernel_end, LOAD_MIN + 0x2000);
        assert_eq!(c.segments[0].kind, PT_LOAD, "the file's own view is kept");
        // linux-loader sees PT_NULL in its place, and the code segment unchanged.
        let mut seen = vec![0u8; table_end as usize];
        c.pinned(&mut f).read_exact(&mut seen).unwrap();
        assert_eq!(le32(&seen, EHDR_SIZE), PT_NULL);
        assert_eq!(
            seen[EHDR_SIZE + PHDR_SIZE..],
            bytes[EHDR_SIZE + PHDR_SIZE..table_end as usize]
        );
        let _ = std::fs::remove_file(&path);

        // One byte more than the headers, or a bss, and it is a real segment down there.
        for more in [
            (PT_LOAD, 0, 0xff000, table_end + 1, table_end + 1),
            (PT_LOAD, 0, 0xff000, table_end, table_end + 1),
        ] {
            let e = checked("more", &image(&[more, CODE], 0x2000), 64).unwrap_err();
            assert!(matches!(e, ElfError::BelowOneMib { .. }), "{e}");
        }
    }

    #[test]
    fn every_bad_segment_is_refused_by_name() {
        let low = checked(
            "low",
            &image(&[CODE, (PT_LOAD, 0x1000, 0x7000, 0x10, 0x10)], 0x2000),
            64,
        );
        let msg = low.unwrap_err().to_string();
        assert!(msg.contains("segment 1 (PT_LOAD: p_paddr 0x7000"), "{msg}");
        assert!(
            msg.contains("it collides with the zero page") && msg.contains("64 MiB"),
            "{msg}"
        );

        let huge = (PT_LOAD, 0x1000, 0x20_0000, 0x10, u64::MAX);
        let e = checked("huge", &image(&[CODE, huge], 0x2000), 64).unwrap_err();
        assert!(matches!(e, ElfError::BeyondRam { segment, .. } if segment.index == 1));
        assert!(e.to_string().contains("ends at 0x100000000001fffff"), "{e}");
        assert!(e.to_string().contains("No --memory can hold it"), "{e}");

        let past = (PT_LOAD, 0x1000, 0x20_0000, 0x10_0000, 0x10_0000);
        let e = checked("past", &image(&[CODE, past], 0x2000), 64).unwrap_err();
        assert!(
            matches!(
                e,
                ElfError::SegmentPastFile {
                    file_len: 0x2000,
                    ..
                }
            ),
            "{e}"
        );

        let wrap = (PT_NOTE, u64::MAX, 0, u64::MAX, 0);
        let e = checked("wrap", &image(&[CODE, wrap], 0x2000), 64).unwrap_err();
        assert!(matches!(e, ElfError::SegmentPastFile { .. }), "{e}");

        let notes = (PT_NOTE, 0x1000, 0, NOTES_MAX / 2 + 1, 0);
        let e = checked("notes", &image(&[CODE, notes, notes], 0x20_0000), 64).unwrap_err();
        assert!(
            matches!(e, ElfError::NotesTooBig { segment, .. } if segment.index == 2),
            "{e}"
        );

        let e = checked(
            "bss-only",
            &image(&[(PT_LOAD, 0, LOAD_MIN, 0, 0x1000)], 0x2000),
            64,
        )
        .unwrap_err();
        assert!(matches!(e, ElfError::NothingToLoad { .. }), "{e}");

        let later = (PT_LOAD, 0x1000, LOAD_MIN + 0x1fff, 0, 1);
        let e = checked("overlap", &image(&[later, CODE], 0x2000), 64).unwrap_err();
        assert!(
            matches!(e, ElfError::Overlap { first, second, .. } if first.index == 0 && second.index == 1),
            "{e}"
        );
    }

    #[test]
    fn headers_are_bounded_by_the_file() {
        let e = checked("short", b"\x7fELF\x02\x01", 64).unwrap_err();
        assert!(matches!(e, ElfError::HeadersTruncated { .. }), "{e}");
        let mut img = image(&[CODE], 0x2000);
        img[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
        let e = checked("phnum", &img, 64).unwrap_err();
        assert!(e.to_string().contains("65535 entries at byte 64"), "{e}");
        img[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = checked("phoff", &img, 64).unwrap_err();
        assert!(matches!(e, ElfError::HeadersTruncated { .. }), "{e}");
        let mut img = image(&[CODE], 0x2000);
        img[54] = 32;
        let e = checked("phentsize", &img, 64).unwrap_err();
        assert!(matches!(e, ElfError::BadHeader { .. }), "{e}");
    }

    #[test]
    fn sizes_read_as_people_say_them() {
        assert_eq!(human(12), "12 bytes");
        assert_eq!(human(4096), "4 KiB");
        assert_eq!(human(3 << 19), "1.5 MiB");
        assert_eq!(human(1 << 40), "1 TiB");
        assert_eq!(human(u64::MAX), "16 EiB");
    }

    /// Headers rewritten after the check are not what linux-loader reads: the pinned
    /// reader serves the checked copy, and the file for everything else.
    #[test]
    fn the_pinned_reader_serves_the_checked_headers() {
        let bytes = image(&[CODE], 0x2000);
        let (mut f, path) = file("pinned", &bytes);
        let c = check(&f, &path, bytes.len() as u64, 64).unwrap();
        let phdr_end = EHDR_SIZE + PHDR_SIZE;
        f.write_all_at(&[0xaa; 0x2000], 0).unwrap();
        let mut r = c.pinned(&mut f);
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 0x2000);
        assert_eq!(&all[..phdr_end], &bytes[..phdr_end]);
        assert!(all[phdr_end..].iter().all(|&b| b == 0xaa));

        // Volatile reads, as into guest memory, across the pinned/file boundary.
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x4000)])
                .unwrap();
        r.seek(SeekFrom::Start(8)).unwrap();
        mem.read_exact_volatile_from(vm_memory::GuestAddress(0), &mut r, 0x1000)
            .unwrap();
        let mut got = vec![0u8; 0x1000];
        mem.read_slice(&mut got, vm_memory::GuestAddress(0))
            .unwrap();
        assert_eq!(&got[..phdr_end - 8], &bytes[8..phdr_end]);
        assert!(got[phdr_end - 8..].iter().all(|&b| b == 0xaa));
        assert_eq!(r.seek(SeekFrom::Current(-8)).unwrap(), 0x1000);
        assert!(r.seek(SeekFrom::Current(-0x2000)).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
