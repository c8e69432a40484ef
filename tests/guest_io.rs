//! The irq guest (PIT and serial interrupts through the IOAPIC and LAPIC) and the
//! echo guest (polled serial input from minivmm's stdin).

mod common;
mod guest_support;

use guest_support::*;

#[test]
fn irq_pit_tick_and_serial_rx_interrupt_arrive() {
    if !common::kvm_or_skip("irq_pit_tick_and_serial_rx_interrupt_arrive") {
        return;
    }
    for kernel in both("irq") {
        let r = run(
            &kernel,
            "",
            1,
            "64M",
            "10s",
            Input::After("irq: waiting for serial input", b"x"),
        );
        r.assert_end("debug-exit", 33);
        // The pin is the one the MP table gives for ISA IRQ 0 (the guest checks).
        assert!(
            r.line("irq: pit ok (ioapic pin ").contains("mp table pin"),
            "{}",
            r.ctx()
        );
        r.assert_line("irq: serial ok (ioapic pin 4) byte 0x78");
        r.assert_line("irq: ok");
    }
}

/// --no-pit really leaves the timer out: the irq guest's PIT tick never comes (it waits
/// halted until the timeout), while a guest that needs no timer runs as before — also
/// with RAM on both sides of the MMIO gap, whose two memory slots minivmm deletes
/// before closing a PIT-less VM.
#[test]
fn no_pit_leaves_the_timer_out() {
    if !common::kvm_or_skip("no_pit_leaves_the_timer_out") {
        return;
    }
    let r = run_with("irq.elf", "", 1, "64M", "2s", Input::None, &["--no-pit"]);
    r.assert_end("timeout", 124);
    assert!(!r.console.contains("pit ok"), "{}", r.ctx());
    for kernel in both("hello") {
        let r = run_with(
            &kernel,
            "exit=5",
            2,
            "64M",
            "10s",
            Input::None,
            &["--no-pit"],
        );
        r.assert_end("debug-exit", 11);
    }
    let r = run_with(
        "memory.elf",
        "",
        1,
        "5G",
        "20s",
        Input::None,
        &["--no-pit", "--no-ledger"],
    );
    r.assert_end("debug-exit", 33);
}

#[test]
fn echo_returns_stdin_until_the_terminator() {
    if !common::kvm_or_skip("echo_returns_stdin_until_the_terminator") {
        return;
    }
    for kernel in both("echo") {
        let r = run(
            &kernel,
            "",
            1,
            "64M",
            "10s",
            Input::Now(b"hello world\nsecond line\n.\nnot echoed\n"),
        );
        r.assert_end("debug-exit", 33);
        assert_eq!(
            r.console,
            "echo: ready (end with '.' at the start of a line)\nhello world\nsecond line\necho: done 24 bytes\n",
            "{}",
            r.ctx()
        );
    }
}
