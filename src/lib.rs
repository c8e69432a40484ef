//! minivmm: a small, real virtual machine monitor on Linux KVM, with a resource ledger
//! and a scheduler for a pool of hosts.
//!
//! One VM's life: a [`VmConfig`] is validated, [`Vm::new`] maps guest memory, loads
//! the kernel, creates the KVM VM and its vCPUs, and [`Vm::run`] runs it to an
//! [`Outcome`]:
//!
//! ```
//! use minivmm::{End, SerialOut, Vm, VmConfig};
//!
//! # if std::fs::File::options().read(true).write(true).open("/dev/kvm").is_err() {
//! #     eprintln!("SKIP doctest: /dev/kvm is not usable");
//! #     return Ok(());
//! # }
//! // guest/hello prints a line and leaves through isa-debug-exit with `exit=N`.
//! let mut config = VmConfig::new(concat!(env!("MINIVMM_GUEST_DIR"), "/hello.elf"));
//! config.cmdline = "exit=3".into();
//! config.vcpus = 2;
//! config.serial_out = SerialOut::None;
//! let outcome = Vm::new(config)?.run()?;
//! assert!(matches!(outcome.end, End::DebugExit(3)));
//! // QEMU's convention for isa-debug-exit: status (3 << 1) | 1.
//! assert_eq!(outcome.exit_status(), 7);
//! # Ok::<(), minivmm::VmError>(())
//! ```
#![deny(missing_docs)]

pub mod api;
pub mod check;
pub mod exec;
pub mod launch;
pub mod output;
pub mod pool;
pub mod scheduler;
pub mod units;
pub mod vmm;

pub use vmm::{
    End, Outcome, SerialIn, SerialOut, StopHandle, StopReason, Vm, VmConfig, VmError, VmHandle,
    VmState,
};
