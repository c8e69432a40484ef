//! The ELF loader's validation of a kernel's program headers (issue 16, items 6 and 7):
//! every segment a file announces is checked against the file and the VM's RAM before
//! a byte is read, and a refusal names the segment, the RAM and the fix.
//!
//! The kernels are crafted byte by byte here, so each test says exactly what the file
//! claims. Refusals happen before /dev/kvm is opened: those tests run everywhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// ELF program header types (System V ABI, "Program Header").
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// Where the crafted kernels put their code: 1 MiB, the lowest address a kernel may use.
const LOAD: u64 = 0x10_0000;
/// The code's offset in the file: one page in, after the headers.
const CODE_OFF: u64 = 0x1000;
/// mov $0xf4, %dx; mov $0x10, %eax; out %eax, %dx; hlt: isa-debug-exit 0x10, status 33.
const CODE: [u8; 11] = [0x66, 0xba, 0xf4, 0x00, 0xb8, 0x10, 0, 0, 0, 0xef, 0xf4];
/// minivmm's status for a VM it refused to build.
const VMM_ERROR: i32 = 125;

/// One program header as a test writes it.
#[derive(Clone, Copy)]
struct Seg {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// A PT_LOAD of `size` bytes at `paddr`, its data right after the code in the file.
fn load_at(paddr: u64, size: u64) -> Seg {
    Seg {
        kind: PT_LOAD,
        offset: CODE_OFF + 0x100,
        paddr,
        filesz: size,
        memsz: size,
    }
}

/// The segment that holds [`CODE`] at [`LOAD`]: always segment 0.
fn code_segment() -> Seg {
    Seg {
        kind: PT_LOAD,
        offset: CODE_OFF,
        paddr: LOAD,
        filesz: CODE.len() as u64,
        memsz: 0x100,
    }
}

/// An x86-64 ELF executable entered at [`LOAD`] with segment 0 = [`code_segment`] and
/// then `extra`, zero-padded to at least `len` bytes and to the end of every segment's
/// file data that ends within 16 MiB (larger ones are the tests' business).
fn elf(extra: &[Seg], len: u64) -> Vec<u8> {
    let mut segs = vec![code_segment()];
    segs.extend_from_slice(extra);
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // e_machine: x86-64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    let phnum = segs.len() as u16;
    for half in [64u16, 56, phnum, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        f.extend_from_slice(&half.to_le_bytes());
    }
    for s in &segs {
        f.extend_from_slice(&s.kind.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R+X
        for word in [s.offset, s.paddr, s.paddr, s.filesz, s.memsz, 0x1000] {
            // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
            f.extend_from_slice(&word.to_le_bytes());
        }
    }
    assert!(
        f.len() as u64 <= CODE_OFF,
        "too many segments for the layout"
    );
    f.resize(CODE_OFF as usize, 0);
    f.extend_from_slice(&CODE);
    let data_end = segs
        .iter()
        .map(|s| s.offset.saturating_add(s.filesz))
        .filter(|&end| end <= 16 << 20)
        .max()
        .unwrap_or(0);
    let len = len.max(data_end);
    if (f.len() as u64) < len {
        f.resize(len as usize, 0);
    }
    f
}

/// A fresh directory for one test, removed when the test passes.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("minivmm-loader-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Dir(d)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write the kernel");
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs `minivmm run --no-ledger --no-pit --serial none --memory MEM --kernel K`,
/// killed after `limit` (the limit only turns a hang into a failure: a passing run
/// ends long before it). Returns the status (None: killed) and stderr.
fn run_limited(dir: &Path, kernel: &Path, memory: &str, limit: Duration) -> (Option<i32>, String) {
    let err_path = dir.join("stderr");
    let errors = std::fs::File::create(&err_path).expect("stderr file");
    let mut child = common::minivmm()
        .args(["run", "--no-ledger", "--no-pit", "--serial", "none"])
        .args(["--memory", memory, "--kernel"])
        .arg(kernel)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(errors)
        .spawn()
        .expect("spawn minivmm");
    let code = common::wait_or_kill(&mut child, limit);
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(!err.contains("panicked"), "minivmm panicked: {err}");
    (code, err)
}

fn run(dir: &Path, kernel: &Path, memory: &str) -> (Option<i32>, String) {
    run_limited(dir, kernel, memory, Duration::from_secs(60))
}

/// Expects `kernel` refused with status 125 and every one of `needles` in the message
/// (in any case: a sentence may start with one).
fn refused(dir: &Path, kernel: &Path, memory: &str, needles: &[&str]) -> String {
    let (code, err) = run(dir, kernel, memory);
    assert_eq!(
        code,
        Some(VMM_ERROR),
        "{} was not refused: {err}",
        kernel.display()
    );
    let lower = err.to_lowercase();
    for n in needles {
        assert!(
            lower.contains(&n.to_lowercase()),
            "expected {n:?} in: {err}"
        );
    }
    err
}

/// Segments below 1 MiB land where minivmm writes its boot structures after loading
/// them (GDT, start_info, zero page, page tables, EBDA, ACPI tables, MP table): each
/// is refused, naming the segment, the structure it collides with, the VM's RAM and
/// the fix. These used to load, be overwritten, and run.
#[test]
fn segments_below_1_mib_are_refused() {
    let d = Dir::new("low");
    let cases = [
        (0, "GDT"),
        (0x500, "GDT"),
        (0x7000, "zero page"),
        (0x9000, "page tables"),
        (0x9fc00, "EBDA"),
        (0xe0000, "ACPI tables"),
        (0xf0000, "MP table"),
        // Starts below 1 MiB and reaches above it.
        (0xff000, "MP table"),
    ];
    for (paddr, structure) in cases {
        let k = d.write(
            &format!("low-{paddr:x}.elf"),
            &elf(&[load_at(paddr, 0x2000)], 0),
        );
        let at = format!("p_paddr {paddr:#x}");
        let needles = [
            "segment 1 (PT_LOAD",
            &at,
            "p_memsz 0x2000",
            "below 1 MiB",
            "64 MiB VM",
            "link the kernel at or above 1 MiB",
            structure,
        ];
        refused(&d.0, &k, "64M", &needles);
    }
}

/// A segment whose zero-filled size (p_memsz) is 1 TiB cannot fit a 64 MiB VM, nor
/// any VM (kernels end below the 32-bit MMIO gap at 3 GiB); one of 100 MiB fits a
/// VM given enough --memory, and the message says how much.
#[test]
fn segments_larger_than_ram_are_refused_with_the_fix() {
    let d = Dir::new("large");
    let huge = Seg {
        kind: PT_LOAD,
        offset: CODE_OFF + 0x100,
        paddr: 0x20_0000,
        filesz: 0x100,
        memsz: 1 << 40,
    };
    let k = d.write("tib.elf", &elf(&[huge], 0));
    let err = refused(
        &d.0,
        &k,
        "64M",
        &[
            "segment 1 (PT_LOAD",
            "p_paddr 0x200000",
            "p_memsz 0x10000000000 (1 TiB)",
            "64 MiB VM",
            "beyond the VM's RAM",
            "no --memory can hold it",
        ],
    );
    assert!(!err.contains("truncated"), "{err}");

    let big = Seg {
        memsz: 100 << 20,
        ..huge
    };
    let k = d.write("100m.elf", &elf(&[big], 0));
    refused(
        &d.0,
        &k,
        "64M",
        &[
            "segment 1 (PT_LOAD",
            "(100 MiB)",
            "64 MiB VM",
            "give it --memory 102M or more",
        ],
    );
}

/// A segment placed outside RAM used to be reported as a truncated file: it is the
/// address that is wrong, and the message says so (and how much RAM would hold it).
#[test]
fn a_segment_outside_ram_is_not_called_truncated() {
    let d = Dir::new("outside");
    let k = d.write("outside.elf", &elf(&[load_at(0x800_0000, 0x1000)], 0));
    let err = refused(
        &d.0,
        &k,
        "64M",
        &[
            "segment 1 (PT_LOAD",
            "p_paddr 0x8000000",
            "64 MiB VM",
            "beyond the VM's RAM",
            "give it --memory 129M or more",
        ],
    );
    assert!(!err.contains("truncated"), "{err}");
}

/// A file that really is cut short says so, and which segment is missing its data.
#[test]
fn a_truncated_segment_is_named() {
    let d = Dir::new("truncated");
    let mut bytes = elf(&[load_at(0x20_0000, 0x10_0000)], 0);
    bytes.truncate(CODE_OFF as usize + 0x200);
    let k = d.write("cut.elf", &bytes);
    refused(
        &d.0,
        &k,
        "64M",
        &["truncated", "segment 1 (PT_LOAD", "p_filesz 0x100000"],
    );
}

/// What the ELF specification forbids: a segment with more file bytes than memory
/// (p_filesz > p_memsz), and segments sharing memory (one would overwrite the other).
#[test]
fn malformed_segment_tables_are_refused() {
    let d = Dir::new("malformed");
    let more_file_than_memory = Seg {
        memsz: 0x10,
        ..load_at(0x20_0000, 0x100)
    };
    let k = d.write("filesz.elf", &elf(&[more_file_than_memory], 0));
    refused(
        &d.0,
        &k,
        "64M",
        &["segment 1 (PT_LOAD", "p_filesz 0x100", "p_memsz 0x10"],
    );
    let k = d.write("overlap.elf", &elf(&[load_at(LOAD + 0x80, 0x100)], 0));
    refused(&d.0, &k, "64M", &["segments 0 and 1", "overlap"]);
}

/// A 200 MiB sparse file whose note segment claims 1 TiB took 17 s to refuse (the
/// notes were read 12 bytes at a time to the end of the file), with --timeout and
/// SIGTERM ignored meanwhile. A note segment larger than the file, or than any real
/// kernel's notes, is refused before anything is read.
#[test]
fn a_huge_note_segment_is_refused_at_once() {
    let d = Dir::new("notes");
    let file_len = 200u64 << 20;
    let write_sparse = |name: &str, note: Seg| {
        let k = d.write(name, &elf(&[note], 0));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&k)
            .expect("open the kernel");
        f.set_len(file_len).expect("make it 200 MiB, sparse");
        k
    };
    let tib = Seg {
        kind: PT_NOTE,
        offset: CODE_OFF + 0x100,
        paddr: 0,
        filesz: 1 << 40,
        memsz: 0,
    };
    // The same notes, but inside the file: as slow before, and no real kernel's notes
    // come near that size.
    let in_file = Seg {
        filesz: file_len - 2 * CODE_OFF,
        ..tib
    };
    for (name, note) in [("tib-note.elf", tib), ("big-note.elf", in_file)] {
        let k = write_sparse(name, note);
        let (code, err) = run_limited(&d.0, &k, "64M", Duration::from_secs(10));
        assert_eq!(
            code,
            Some(VMM_ERROR),
            "{name}: not refused within 10 s (None: killed): {err}"
        );
        let size = format!("p_filesz {:#x}", note.filesz);
        for n in ["segment 1 (PT_NOTE", &size] {
            assert!(err.contains(n), "{name}: expected {n:?} in: {err}");
        }
    }
}

/// The checks refuse only what is wrong: a kernel whose segments sit at 1 MiB and
/// above, inside RAM, with a zero-filled (bss-only) segment and a small note segment,
/// loads and runs (status 33 from its isa-debug-exit write); so does one whose first
/// segment holds its own headers, and the tiny guests gcc and ld build (where ld
/// gives the headers a segment below 1 MiB of their own).
#[test]
fn a_well_formed_kernel_still_runs() {
    if !common::kvm_or_skip("a_well_formed_kernel_still_runs") {
        return;
    }
    let d = Dir::new("good");
    let bss = Seg {
        kind: PT_LOAD,
        offset: 0,
        paddr: 0x20_0000,
        filesz: 0,
        memsz: 0x10_0000,
    };
    let note = Seg {
        kind: PT_NOTE,
        offset: CODE_OFF + 0x100,
        paddr: 0,
        filesz: 0x20,
        memsz: 0,
    };
    let k = d.write("good.elf", &elf(&[bss, note], CODE_OFF + 0x200));
    let (code, err) = run(&d.0, &k, "64M");
    assert_eq!(code, Some(33), "{err}");
    // Segment 0 from file offset 0, headers included, as linkers often lay it out:
    // the loader's reads cross from the checked headers into the file's bytes.
    let mut headed = elf(&[], 0);
    let put = |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut headed, 24, LOAD + CODE_OFF); // e_entry
    for (field, v) in [
        (8, 0),
        (16, LOAD),
        (24, LOAD),
        (32, CODE_OFF + CODE.len() as u64),
    ] {
        put(&mut headed, 64 + field, v); // p_offset, p_vaddr, p_paddr, p_filesz
    }
    put(&mut headed, 64 + 40, 0x2000); // p_memsz
    let k = d.write("headed.elf", &headed);
    let (code, err) = run(&d.0, &k, "64M");
    assert_eq!(code, Some(33), "{err}");
    // GNU ld's `-Ttext=0x100000` layout, as tests/common builds guests: the headers
    // get a read-only segment of their own at 0xff000, which is left out, not refused.
    for pvh in [false, true] {
        let k = common::tiny_guest(
            &d.0,
            &format!("ld-{pvh}"),
            &common::hello_body("hi", 0x10, pvh),
            pvh,
        );
        let (code, err) = run(&d.0, &k, "64M");
        assert_eq!(code, Some(33), "ld -Ttext=0x100000 (pvh {pvh}): {err}");
    }
    // And the guests in guest/, linked with their own script.
    let hello = Path::new(env!("MINIVMM_GUEST_DIR")).join("hello.elf");
    let (code, err) = run(&d.0, &hello, "64M");
    assert_eq!(
        code,
        Some(1),
        "hello without exit= ends with 0 << 1 | 1: {err}"
    );
}
