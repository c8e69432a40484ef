//! QEMU's `isa-debug-exit` device (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`):
//! a write of value v ends the VM, and the VMM exits with status (v << 1) | 1. Test
//! kernels written for QEMU report pass/fail this way, and work here unchanged.

use super::DeviceEvent;

/// First port.
pub const PORT: u16 = 0xf4;
/// Last port (iosize 4).
pub const PORT_END: u16 = 0xf7;

/// Any write ends the VM with the value written (1, 2 or 4 bytes, little-endian).
pub fn write(data: &[u8]) -> Option<DeviceEvent> {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    Some(DeviceEvent::DebugExit(u32::from_le_bytes(v)))
}

/// The process exit status QEMU gives for debug-exit value `v`. QEMU's status is an
/// int truncated to 8 bits by the OS, so we do the same.
pub fn exit_status(v: u32) -> i32 {
    (((v << 1) | 1) & 0xff) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_qemu() {
        assert_eq!(exit_status(0), 1);
        assert_eq!(exit_status(3), 7);
        assert_eq!(exit_status(0x10), 33);
        assert_eq!(write(&[0x10, 0, 0, 0]), Some(DeviceEvent::DebugExit(0x10)));
        assert_eq!(write(&[5]), Some(DeviceEvent::DebugExit(5)));
    }
}
