//! The floor for exit handling: a bare kvm-ioctls loop with nothing of minivmm in it.
//!
//! It builds the smallest VM KVM accepts (one memory slot, one vCPU in 32-bit
//! protected mode, paging off), runs the very loop of bench/guests/exits.S —
//! `out %al,%dx; dec %ecx; jnz` to port 0x80, COUNT times, then a write to 0xf4 — and
//! answers every exit with nothing but `KVM_RUN` again. What minivmm adds on top of
//! this (its port bus, exit statistics, threads) is the difference between the two.
//!
//! ```text
//! cargo run --release --example exit_floor -- [--count N] [--repeat R] [--irqchip] [--pit]
//!                                              [--memory-last] [--delete-slots] [--split-irqchip]
//! ```
//!
//! `--irqchip` also creates the in-kernel irqchip (`--pit`: and the PIT), as minivmm
//! does, so VM create and destroy times compare like with like. `--memory-last`
//! registers guest memory after them instead of before (tried in minivmm, then
//! replaced): the memory slot's expedited SRCU grace period then also finishes the one
//! the irqchip started, which otherwise `close()` waits for — but every VM then waits
//! for it at creation. `--delete-slots` deletes the memory slot after the run instead, just
//! before the fds are closed (what minivmm does without a PIT): only a VM that ends
//! before the grace period does waits, and only for what is left. `--split-irqchip` asks for
//! KVM_CAP_SPLIT_IRQCHIP instead: LAPICs in the kernel, no PIC, IOAPIC or PIT there (a
//! VMM then emulates those itself, as Cloud Hypervisor does); it shows what the full
//! irqchip's set-up and teardown cost. Prints one JSON line per repeat:
//! create_ms (KVM_CREATE_VM to a ready vCPU), run_ms, exits, exits_per_s, ns_per_exit,
//! destroy_ms (closing the vCPU and VM fds).

use std::time::Instant;

use kvm_bindings::{
    KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit};

/// Guest RAM: one 2 MiB slot at guest physical 0.
const MEM_SIZE: usize = 2 << 20;
/// Where the code goes, in guest physical (= linear, paging is off) memory.
const CODE_ADDR: u64 = 0x1000;
/// The port the loop writes, which nothing handles.
const LOOP_PORT: u16 = 0x80;
/// isa-debug-exit, the loop's last write.
const EXIT_PORT: u16 = 0xf4;

/// The machine code of bench/guests/exits.S, 32-bit.
fn guest_code(count: u32) -> Vec<u8> {
    let mut c = vec![0xba, 0x80, 0x00, 0x00, 0x00]; // mov $0x80, %edx
    c.push(0xb9); // mov $count, %ecx
    c.extend_from_slice(&count.to_le_bytes());
    c.extend_from_slice(&[
        0xee, // 1: out %al, (%dx)
        0x49, //    dec %ecx
        0x75, 0xfc, // jnz 1b
        0xba, 0xf4, 0x00, 0x00, 0x00, // mov $0xf4, %edx
        0x31, 0xc0, // xor %eax, %eax
        0xef, // out %eax, (%dx)
        0xf4, // hlt
    ]);
    c
}

/// A flat 4 GiB segment: code (type 11, execute/read, accessed) or data (type 3).
fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    }
}

struct Run {
    create_ms: f64,
    run_ms: f64,
    exits: u64,
    destroy_ms: f64,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What `once` builds around the vCPU.
#[derive(Clone, Copy)]
struct Shape {
    irqchip: bool,
    pit: bool,
    memory_last: bool,
    delete_slots: bool,
    split: bool,
}

fn once(kvm: &Kvm, count: u32, shape: &Shape) -> Result<Run, String> {
    let Shape {
        irqchip,
        pit,
        memory_last,
        delete_slots,
        split,
    } = *shape;
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let code = guest_code(count);
    // SAFETY: CODE_ADDR + code.len() is far inside the MEM_SIZE mapping.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            (mem as *mut u8).add(CODE_ADDR as usize),
            code.len(),
        )
    };

    let t0 = Instant::now();
    let vm = kvm.create_vm().map_err(e("KVM_CREATE_VM"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the mapping outlives the VM: it is unmapped after the VM fd is closed.
    let register = || unsafe { vm.set_user_memory_region(region) };
    if !memory_last {
        register().map_err(e("KVM_SET_USER_MEMORY_REGION"))?;
    }
    if split {
        // args[0]: how many IOAPIC pins the userspace IOAPIC routes (Documentation/virt/kvm/
        // api.rst, KVM_CAP_SPLIT_IRQCHIP).
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = 24;
        vm.enable_cap(&cap)
            .map_err(e("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;
    }
    if irqchip {
        vm.set_tss_address(0xfffb_d000)
            .map_err(e("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(e("KVM_CREATE_IRQCHIP"))?;
    }
    if pit {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(e("KVM_CREATE_PIT2"))?;
    }
    if memory_last {
        register().map_err(e("KVM_SET_USER_MEMORY_REGION"))?;
    }
    let mut vcpu = vm.create_vcpu(0).map_err(e("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    sregs.cs = flat(0x08, 11);
    let data = flat(0x10, 3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 |= 1; // PE: protected mode, paging off
    vcpu.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
    regs.rip = CODE_ADDR;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).map_err(e("KVM_SET_REGS"))?;
    let create = t0.elapsed();

    let t1 = Instant::now();
    let mut exits = 0u64;
    loop {
        let exit = vcpu.run().map_err(e("KVM_RUN"))?;
        exits += 1;
        match exit {
            VcpuExit::IoOut(LOOP_PORT, _) => {}
            VcpuExit::IoOut(EXIT_PORT, _) => break,
            other => return Err(format!("unexpected exit after {exits}: {other:?}")),
        }
    }
    let run = t1.elapsed();

    let t2 = Instant::now();
    if delete_slots {
        let gone = kvm_userspace_memory_region {
            memory_size: 0,
            ..region
        };
        // SAFETY: size 0 deletes the slot; the mapping is unmapped only after this.
        unsafe { vm.set_user_memory_region(gone) }.map_err(e("KVM_SET_USER_MEMORY_REGION"))?;
    }
    drop(vcpu);
    drop(vm);
    let destroy = t2.elapsed();
    // SAFETY: the mapping made above; no VM refers to it any more.
    unsafe { libc::munmap(mem, MEM_SIZE) };
    Ok(Run {
        create_ms: ms(create),
        run_ms: ms(run),
        exits,
        destroy_ms: ms(destroy),
    })
}

fn main() {
    let mut count: u32 = 1_000_000;
    let mut repeat: u32 = 1;
    let mut irqchip = false;
    let mut pit = false;
    let mut memory_last = false;
    let mut split = false;
    let mut delete_slots = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u32 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| fail(&format!("{name} needs a non-negative integer")))
        };
        match a.as_str() {
            "--count" => count = num("--count"),
            "--repeat" => repeat = num("--repeat").max(1),
            "--irqchip" => irqchip = true,
            "--pit" => (irqchip, pit) = (true, true),
            "--memory-last" => memory_last = true,
            "--split-irqchip" => split = true,
            "--delete-slots" => delete_slots = true,
            "-h" | "--help" => {
                println!(
                    "usage: exit_floor [--count N] [--repeat R] [--irqchip] [--pit] [--memory-last] [--delete-slots] [--split-irqchip]"
                );
                return;
            }
            other => fail(&format!("unknown argument '{other}' (try --help)")),
        }
    }
    if split && irqchip {
        fail("--split-irqchip replaces --irqchip/--pit (KVM has one or the other)");
    }
    let shape = Shape {
        irqchip,
        pit,
        memory_last,
        delete_slots,
        split,
    };
    if count == 0 {
        fail("--count must be at least 1 (dec/jnz would wrap to 2^32)");
    }
    let kvm = Kvm::new().unwrap_or_else(|e| fail(&format!("cannot open /dev/kvm: {e}")));
    for _ in 0..repeat {
        let r = once(&kvm, count, &shape).unwrap_or_else(|e| fail(&e));
        let per_s = r.exits as f64 / (r.run_ms / 1e3);
        println!(
            "{{\"count\":{count},\"irqchip\":{irqchip},\"pit\":{pit},\"memory_last\":{memory_last},\"split_irqchip\":{split},\"delete_slots\":{delete_slots},\"create_ms\":{:.3},\"run_ms\":{:.3},\"exits\":{},\"exits_per_s\":{:.0},\"ns_per_exit\":{:.0},\"destroy_ms\":{:.3}}}",
            r.create_ms,
            r.run_ms,
            r.exits,
            per_s,
            1e9 / per_s,
            r.destroy_ms
        );
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("exit_floor: error: {msg}");
    std::process::exit(1);
}
