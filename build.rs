//! Builds the tiny guests in guest/ with the system toolchain (gcc, ld, make) into
//! `$OUT_DIR/guest`, and tells the crate where they are through the
//! `MINIVMM_GUEST_DIR` environment variable (`env!("MINIVMM_GUEST_DIR")` in tests).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=guest");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("guest");
    println!("cargo:rustc-env=MINIVMM_GUEST_DIR={}", out.display());

    for tool in ["make", "gcc", "ld"] {
        if Command::new(tool).arg("--version").output().is_err() {
            panic!(
                "\n\nminivmm's build needs `{tool}` to build the tiny test guests in guest/.\n\
                 Install it: apt-get install make gcc binutils (Debian/Ubuntu), \
                 dnf install make gcc binutils (Fedora).\n\n"
            );
        }
    }

    // Serial and quiet: the guests are small, and the build machine is shared.
    let status = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(
            PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
                .join("guest"),
        )
        .arg(format!("O={}", out.display()))
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .status()
        .unwrap_or_else(|e| panic!("cannot run make for guest/: {e}"));
    if !status.success() {
        panic!("\n\nbuilding the tiny guests failed: run `make -C guest` to see why\n\n");
    }
}
