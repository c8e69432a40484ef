//! The library API on real KVM, alone in its test binary so that no other test's
//! threads or file descriptors blur the leak check.

mod common;
use common::*;
use minivmm::{End, SerialOut, StopReason, Vm, VmConfig};
use std::time::Duration;

/// The library API: build, stop from another thread, and run many VMs in one process
/// without leaking threads or file descriptors.
#[test]
fn library_runs_many_vms_without_leaks() {
    if !kvm_or_skip("library_runs_many_vms_without_leaks") {
        return;
    }
    let d = scratch("library");
    let hello = tiny_guest(&d, "hello", &hello_body("x", 2, true), true);
    let spin = tiny_guest(&d, "spin", "1: jmp 1b", true);
    let count = |dir: &str| std::fs::read_dir(dir).unwrap().count();
    // Warm up once so lazily created process-wide state is not counted as a leak.
    let mut c = VmConfig::new(&hello);
    c.vcpus = 2;
    Vm::new(c).unwrap().run().unwrap();
    let (fds, tasks) = (count("/proc/self/fd"), count("/proc/self/task"));
    for i in 0..100 {
        let mut c = VmConfig::new(&hello);
        c.vcpus = 1 + i % 4;
        c.memory_mib = 64;
        let o = Vm::new(c).unwrap().run().unwrap();
        assert!(matches!(o.end, End::DebugExit(2)), "{:?}", o.end);
    }
    let mut c = VmConfig::new(&spin);
    c.serial_out = SerialOut::None;
    let vm = Vm::new(c).unwrap();
    let stop = vm.stop_handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        stop.stop(StopReason::Requested);
    });
    let o = vm.run().unwrap();
    assert!(
        matches!(o.end, End::Stopped(StopReason::Requested)),
        "{:?}",
        o.end
    );
    assert_eq!(count("/proc/self/fd"), fds, "file descriptors leaked");
    assert!(count("/proc/self/task") <= tasks + 1, "threads leaked");
}
