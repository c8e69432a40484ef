//! Kernel loading: put the kernel, initrd and command line into guest memory and
//! describe the machine to the kernel in the format its boot protocol expects.
//!
//! Three kinds of kernel are understood:
//! - a **bzImage**: entered through the Linux 64-bit boot protocol
//!   (Documentation/arch/x86/boot.rst) at `code32_start + 0x200`, with RSI pointing
//!   at a `boot_params` "zero page" holding the e820 map, cmdline and initrd;
//! - an **ELF vmlinux with a PVH note** (XEN_ELFNOTE_PHYS32_ENTRY): entered in 32-bit
//!   protected mode with EBX pointing at `hvm_start_info` (Xen's docs/misc/pvh.pandoc);
//! - an **ELF without that note**: entered in 64-bit long mode at `e_entry`, with
//!   identity page tables and RSI = boot_params, as Firecracker does.

pub mod acpi;
pub mod elf;
pub mod linux;
pub mod mptable;
pub mod pvh;
pub mod x86;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::vmm::memory::GuestRam;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use super::config::VmConfig;
use super::devices::mmio::MmioSlot;
use super::hostfile;
use super::memory::{layout, low_ram_end};

/// Where and how the boot vCPU starts executing the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh {
        /// Physical address of the 32-bit entry.
        addr: u64,
    },
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = `boot_params`.
    Linux64 {
        /// Physical address of the 64-bit entry.
        addr: u64,
    },
}

/// The kernel formats minivmm boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelFormat {
    /// Linux bzImage.
    BzImage,
    /// ELF with a PVH entry note.
    ElfPvh,
    /// ELF entered in 64-bit mode.
    Elf64,
}

/// What loading produced: how to start the kernel and where things went.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Format detected from the file's magic numbers.
    pub format: KernelFormat,
    /// Entry state for the boot vCPU.
    pub entry: EntryPoint,
    /// First byte after the loaded kernel.
    pub kernel_end: u64,
    /// Initrd (address, size) if one was loaded.
    pub initrd: Option<(u64, u64)>,
}

/// Errors loading a kernel or describing the machine to it.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd file could not be opened or read, or is not a regular
    /// file (see [`hostfile::open_regular`]).
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not in a format minivmm boots.
    #[error(
        "{path} is not a kernel minivmm can boot: {why}. Give a Linux bzImage or an x86-64 ELF (vmlinux, or a guest from guest/)"
    )]
    NotAKernel {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        why: String,
    },
    /// The file is shorter than its own header says.
    #[error(
        "{path} is truncated: its header announces {need} bytes but the file has {have}. Copy or download it again"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes present.
        have: u64,
        /// Bytes the header announces.
        need: u64,
    },
    /// The kernel does not fit in guest memory.
    #[error("kernel {path} does not fit in guest memory ({detail}): give the VM more --memory")]
    KernelTooBig {
        /// The file.
        path: PathBuf,
        /// What linux-loader reported.
        detail: String,
    },
    /// The kernel (an ELF's segments with their zero-filled parts, p_memsz; a
    /// bzImage's protected-mode code) reaches past the RAM the boot protocols can use.
    #[error(
        "kernel {path} ends at {end:#x} (where it loads plus its size, zero-filled parts included), beyond the VM's RAM, which ends at {ram_end:#x} below the 32-bit MMIO gap: give the VM more --memory, or check the file (a kernel usually ends a few MiB above 1 MiB)"
    )]
    KernelBeyondRam {
        /// The file.
        path: PathBuf,
        /// First byte after the kernel, as its headers say.
        end: u64,
        /// End of the RAM the kernel may use.
        ram_end: u64,
    },
    /// A boot structure field is 32 bits wide and the value does not fit.
    #[error(
        "the {what} ({value:#x}) does not fit the boot protocol's 32-bit field (a minivmm bug: please report it)"
    )]
    Field32 {
        /// Which field.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// The initrd does not fit in guest memory next to the kernel.
    #[error(
        "initrd {path} ({size_mib} MiB) does not fit in guest memory: at most {room_mib} MiB are free below {limit:#x}. Give the VM more --memory"
    )]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size in MiB (rounded up).
        size_mib: u64,
        /// Room available in MiB.
        room_mib: u64,
        /// Highest address the initrd may reach.
        limit: u64,
    },
    /// The command line exceeds the boot protocol's limit.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing a boot structure into guest memory failed (a layout bug or tiny memory).
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str),
    /// The MP table could not be built.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// The ACPI tables could not be built.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// An ELF kernel's program headers describe segments this VM cannot load.
    #[error(transparent)]
    Elf(#[from] Box<elf::ElfError>),
}

/// ELF machine number for x86-64 (System V ABI, e_machine).
const EM_X86_64: u16 = 62;
/// bzImage header magic "HdrS" at offset 0x202 (boot.rst, "The real-mode kernel header").
const HDRS_MAGIC: u32 = 0x5372_6448;
/// xloadflags bit: the kernel has a 64-bit entry point at code32_start + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// The oldest boot protocol with the 64-bit entry (2.12).
const MIN_BOOT_PROTOCOL: u16 = 0x020c;

/// Loads the kernel, initrd and cmdline from `config` into `mem` and writes every
/// boot structure (GDT, page tables, zero page or start_info, MP table, ACPI
/// tables). The MMIO `devices` are described to the guest twice: on the command
/// line (`virtio_mmio.device=`, appended to the user's) and in the DSDT.
pub fn load(
    mem: &GuestRam,
    config: &VmConfig,
    devices: &[MmioSlot],
) -> Result<BootInfo, BootError> {
    let mut kernel = hostfile::open_regular(&config.kernel).map_err(|source| BootError::Read {
        what: "kernel",
        path: config.kernel.clone(),
        source,
    })?;
    let format = detect_format(&mut kernel, &config.kernel)?;
    let (entry, kernel_end, header) = match format {
        KernelFormat::BzImage => load_bzimage(mem, &mut kernel, &config.kernel, config.memory_mib)?,
        _ => load_elf(mem, &mut kernel, &config.kernel, config.memory_mib)?,
    };
    check_kernel_end(&config.kernel, kernel_end, config.memory_mib)?;
    let format = match entry {
        EntryPoint::Pvh { .. } => KernelFormat::ElfPvh,
        EntryPoint::Linux64 { .. } if format == KernelFormat::BzImage => format,
        EntryPoint::Linux64 { .. } => KernelFormat::Elf64,
    };
    log::info!(
        "kernel {}: {format:?}, entry {entry:x?}",
        config.kernel.display()
    );

    let cmdline_max = header
        .filter(|h| h.version >= 0x0206)
        .map(|h| h.cmdline_size as usize)
        .unwrap_or(layout::CMDLINE_MAX)
        .min(layout::CMDLINE_MAX - 1);
    let mut cmdline = config.cmdline.clone();
    for d in devices {
        cmdline.push(' ');
        cmdline.push_str(&d.cmdline_arg());
    }
    if cmdline.len() > cmdline_max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: cmdline_max,
        });
    }
    let mut cmdline = cmdline.into_bytes();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(layout::CMDLINE))
        .map_err(|_| BootError::Write("command line"))?;

    let initrd_max = header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(0x37ff_ffff);
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(
            mem,
            path,
            kernel_end,
            config.memory_mib,
            initrd_max,
        )?),
        None => None,
    };

    x86::write_gdt(mem)?;
    x86::write_page_tables(mem)?;
    let pic = config.irqchip == crate::vmm::config::IrqChip::Kernel;
    mptable::write(mem, config.vcpus, pic)?;
    acpi::write(mem, config.vcpus, devices, pic)?;
    let info = BootInfo {
        format,
        entry,
        kernel_end,
        initrd,
    };
    match entry {
        EntryPoint::Pvh { .. } => pvh::write_start_info(mem, config, &info)?,
        EntryPoint::Linux64 { .. } => linux::write_zero_page(mem, config, &info, header)?,
    }
    Ok(info)
}

/// Refuses a kernel that does not end inside the RAM below the 32-bit MMIO gap.
///
/// linux-loader checks only the bytes it copies (p_filesz); the end it reports counts
/// each segment's zero-filled tail too (p_memsz, the kernel's bss), straight from the
/// file. Every later address (the initrd's lower bound, for one) is computed from it,
/// so a file claiming to end at 2^64 - 1 made that arithmetic wrap. Kernels are loaded
/// low (1 MiB and up; PVH enters in 32-bit mode, and the 64-bit entry's page tables map
/// the first 4 GiB), so the bound is the end of low RAM.
fn check_kernel_end(path: &Path, kernel_end: u64, memory_mib: u64) -> Result<(), BootError> {
    let ram_end = low_ram_end(memory_mib);
    if kernel_end == 0 {
        return Err(BootError::NotAKernel {
            path: path.to_path_buf(),
            why: "it has no loadable segment with data (PT_LOAD with p_filesz > 0)".into(),
        });
    }
    if kernel_end > ram_end {
        return Err(BootError::KernelBeyondRam {
            path: path.to_path_buf(),
            end: kernel_end,
            ram_end,
        });
    }
    Ok(())
}

fn read_err(path: &Path) -> impl Fn(std::io::Error) -> BootError + '_ {
    move |source| BootError::Read {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    }
}

/// Tells a bzImage from an ELF by their magic numbers, and rejects anything else
/// (including ELF files for other machines, which linux-loader would load blindly).
fn detect_format(f: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; 0x206];
    let n = read_up_to(f, &mut head).map_err(read_err(path))?;
    let not = |why: String| BootError::NotAKernel {
        path: path.to_path_buf(),
        why,
    };
    if n >= 20 && head[..4] == *b"\x7fELF" {
        if head[4] != 2 {
            return Err(not("a 32-bit ELF (minivmm loads ELF64 only)".into()));
        }
        let machine = u16::from_le_bytes([head[18], head[19]]);
        if machine != EM_X86_64 {
            return Err(not(format!(
                "an ELF for another architecture (e_machine {machine}, not x86-64's {EM_X86_64})"
            )));
        }
        return Ok(KernelFormat::Elf64);
    }
    if n >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]) == HDRS_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    if n == 0 {
        return Err(not("the file is empty".into()));
    }
    Err(not(
        "neither an ELF header nor a bzImage 'HdrS' signature at offset 0x202".into(),
    ))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    f.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads an ELF kernel with linux-loader, once [`elf::check`] has bounded every
/// segment by the file and the VM's RAM, through a reader that pins the headers it
/// checked. The end returned counts zero-filled segments (p_filesz 0) too, which
/// linux-loader leaves out, so that nothing is placed over the kernel's bss.
fn load_elf(
    mem: &GuestRam,
    f: &mut File,
    path: &Path,
    memory_mib: u64,
) -> Result<(EntryPoint, u64, Option<setup_header>), BootError> {
    let file_len = f.metadata().map_err(read_err(path))?.len();
    let checked = elf::check(f, path, file_len, memory_mib).map_err(Box::new)?;
    let res = Elf::load(
        mem,
        None,
        &mut checked.pinned(f),
        Some(GuestAddress(layout::HIMEM)),
    )
    .map_err(|e| elf_error(e, path, file_len))?;
    let entry = match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => EntryPoint::Pvh { addr: a.0 },
        _ => EntryPoint::Linux64 {
            addr: res.kernel_load.0,
        },
    };
    Ok((entry, checked.kernel_end.max(res.kernel_end), None))
}

/// Turns linux-loader's terse errors into ones that say what is wrong with the file.
fn elf_error(e: linux_loader::loader::Error, path: &Path, file_len: u64) -> BootError {
    use linux_loader::loader::Error as L;
    use linux_loader::loader::elf::Error as E;
    let path = path.to_path_buf();
    match e {
        L::Elf(
            E::ReadKernelImage | E::ReadProgramHeader | E::ReadElfHeader | E::ReadNoteHeader,
        ) => BootError::Truncated {
            path,
            have: file_len,
            need: file_len.saturating_add(1),
        },
        L::Elf(E::InvalidEntryAddress) => BootError::NotAKernel {
            path,
            why: "its entry point is below 1 MiB, where the VMM keeps its boot structures".into(),
        },
        L::MemoryOverflow => BootError::KernelTooBig {
            path,
            detail: e.to_string(),
        },
        other => BootError::NotAKernel {
            path,
            why: other.to_string(),
        },
    }
}

fn load_bzimage(
    mem: &GuestRam,
    f: &mut File,
    path: &Path,
    memory_mib: u64,
) -> Result<(EntryPoint, u64, Option<setup_header>), BootError> {
    let file_len = f.metadata().map_err(read_err(path))?.len();
    let mut raw = [0u8; std::mem::size_of::<setup_header>()];
    f.seek(SeekFrom::Start(0x1f1)).map_err(read_err(path))?;
    f.read_exact(&mut raw).map_err(|_| BootError::Truncated {
        path: path.to_path_buf(),
        have: file_len,
        need: 0x1f1 + raw.len() as u64,
    })?;
    // SAFETY: setup_header is plain old data (ByteValued) and `raw` has its exact size.
    let hdr: setup_header = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::NotAKernel {
            path: path.to_path_buf(),
            why: format!(
                "a bzImage without a 64-bit entry point (boot protocol {}.{:02}, xloadflags {:#x}; minivmm needs 2.12+ with XLF_KERNEL_64)",
                version >> 8,
                version & 0xff,
                xloadflags
            ),
        });
    }
    // setup_sects 0 means 4 (boot.rst); the protected-mode code follows the setup
    // sectors and is syssize 16-byte paragraphs long. (A u8 and a u32 widened to u64:
    // at most 2^37, no overflow.)
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        hdr.setup_sects
    };
    let need = (u64::from(setup_sects) + 1) * 512 + u64::from(hdr.syssize) * 16;
    if file_len < need {
        return Err(BootError::Truncated {
            path: path.to_path_buf(),
            have: file_len,
            need,
        });
    }
    // linux-loader copies everything after the setup sectors to 1 MiB: refuse a file
    // that cannot fit before reading it, rather than after reading RAM-full of it.
    let payload = file_len.saturating_sub((u64::from(setup_sects) + 1) * 512);
    check_kernel_end(path, layout::HIMEM.saturating_add(payload), memory_mib)?;
    let load_addr = GuestAddress(layout::HIMEM);
    let res =
        BzImage::load(mem, Some(load_addr), f, None).map_err(|e| BootError::KernelTooBig {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    let mut hdr = res.setup_header.unwrap_or(hdr);
    hdr.code32_start = load_addr.0 as u32;
    let entry = EntryPoint::Linux64 {
        addr: load_addr.0 + 0x200,
    };
    Ok((entry, res.kernel_end, Some(hdr)))
}

/// Places the initrd as high as possible below both the end of low RAM and the
/// kernel's `initrd_addr_max`, page aligned, as boot loaders do; the kernel then has
/// the most contiguous room below it for decompression.
fn load_initrd(
    mem: &GuestRam,
    path: &Path,
    kernel_end: u64,
    memory_mib: u64,
    initrd_max: u64,
) -> Result<(u64, u64), BootError> {
    let rerr = |source| BootError::Read {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    };
    let mut f = hostfile::open_regular(path).map_err(rerr)?;
    let size = f.metadata().map_err(rerr)?.len();
    let limit = low_ram_end(memory_mib).min(initrd_max.saturating_add(1));
    let too_big = |floor: u64| BootError::InitrdTooBig {
        path: path.to_path_buf(),
        size_mib: size.div_ceil(1 << 20),
        room_mib: limit.saturating_sub(floor) >> 20,
        limit,
    };
    // check_kernel_end keeps kernel_end below 3 GiB; checked all the same, as every
    // address derived from the kernel file is.
    let floor = kernel_end
        .checked_next_multiple_of(4096)
        .ok_or_else(|| too_big(kernel_end))?;
    let addr = limit.checked_sub(size).ok_or_else(|| too_big(floor))? & !0xfff;
    if addr < floor {
        return Err(too_big(floor));
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|_| rerr(std::io::Error::other("file shrank while reading")))?;
    log::info!("initrd {}: {size} bytes at {addr:#x}", path.display());
    Ok((addr, size))
}
