//! `minivmm check`: can this host run VMs, and what kind of KVM is it?

use kvm_ioctls::Cap;
use serde::Serialize;

use crate::vmm::kvm::{self, KvmFlavor, REQUIRED_CAPS};

/// One line of the check.
#[derive(Debug, Serialize)]
pub struct Item {
    /// What was checked.
    pub name: String,
    /// Whether it passed (a warning passes: the host can run VMs).
    pub ok: bool,
    /// True for a warning: something only one use needs (exec's default kernel).
    pub warn: bool,
    /// The value found or what is wrong, and how to fix it.
    pub detail: String,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// True when every item passed.
    pub ok: bool,
    /// Which KVM implementation this is.
    pub flavor: KvmFlavor,
    /// What that means for guests.
    pub flavor_explained: &'static str,
    /// The items, in order.
    pub items: Vec<Item>,
}

/// Runs every check. Never fails: failures are items.
pub fn run() -> Report {
    let flavor = KvmFlavor::detect();
    let mut items = Vec::new();
    let mut item = |name: &str, ok: bool, detail: String| {
        items.push(Item {
            name: name.to_string(),
            ok,
            warn: false,
            detail,
        })
    };
    let dev = std::path::Path::new("/dev/kvm");
    item(
        "/dev/kvm present",
        dev.exists(),
        if dev.exists() {
            "yes".into()
        } else {
            kvm::KvmError::Missing.to_string()
        },
    );
    match kvm_ioctls::Kvm::new() {
        Err(e) => {
            let err = match e.errno() {
                libc::EACCES | libc::EPERM => kvm::KvmError::Permission,
                libc::ENOENT => kvm::KvmError::Missing,
                _ => kvm::KvmError::Open(e),
            };
            item("/dev/kvm usable", false, err.to_string());
        }
        Ok(k) => {
            item("/dev/kvm usable", true, "opened read-write".into());
            let v = k.get_api_version();
            item(
                "KVM API version",
                v == kvm::KVM_API_VERSION,
                format!("{v} (need {})", kvm::KVM_API_VERSION),
            );
            item(
                "max vCPUs per VM",
                true,
                format!(
                    "{} (KVM_CAP_MAX_VCPUS; recommended {})",
                    k.get_max_vcpus(),
                    k.get_nr_vcpus()
                ),
            );
            for (cap, name, why) in REQUIRED_CAPS {
                let ok = k.check_extension(cap);
                item(
                    name,
                    ok,
                    if ok {
                        format!("yes ({why})")
                    } else {
                        format!("missing: needed for {why}; a newer host kernel is required")
                    },
                );
            }
            let ie = k.check_extension(Cap::ImmediateExit);
            item(
                "KVM_CAP_IMMEDIATE_EXIT",
                true,
                if ie {
                    "yes".into()
                } else {
                    "no (optional)".into()
                },
            );
            match k.create_vm() {
                Ok(_) => item("create a VM", true, "KVM_CREATE_VM works".into()),
                Err(e) => item("create a VM", false, format!("KVM_CREATE_VM failed: {e}")),
            }
        }
    }
    item(
        "KVM implementation",
        true,
        format!("{flavor:?}: {}", flavor.explain()),
    );
    // Only a warning: `run`, and `exec --kernel`, do not need it.
    let (kernel, readable) = exec_kernel();
    items.push(Item {
        name: "kernel for exec".into(),
        ok: true,
        warn: readable.is_err(),
        detail: readable.map_or_else(
            |e| format!("{kernel}: {e} (only `minivmm exec` without --kernel needs it; on Ubuntu: `sudo chmod 0644 /boot/vmlinuz-*`)"),
            |()| format!("{kernel} is readable"),
        ),
    });
    let ok = items.iter().all(|i| i.ok);
    Report {
        ok,
        flavor,
        flavor_explained: flavor.explain(),
        items,
    }
}

/// This machine's own kernel image, which `minivmm exec` boots by default, and
/// whether this user can read it (Ubuntu keeps /boot/vmlinuz-* root-only).
fn exec_kernel() -> (String, Result<(), String>) {
    match crate::exec::kernel_release() {
        Ok(r) => {
            let path = format!("/boot/vmlinuz-{r}");
            let res = std::fs::File::open(&path)
                .map(|_| ())
                .map_err(|e| e.to_string());
            (path, res)
        }
        Err(e) => ("/boot/vmlinuz-?".into(), Err(e.to_string())),
    }
}
