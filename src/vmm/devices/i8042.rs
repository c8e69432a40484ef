//! The i8042 keyboard controller, reduced to what a PC guest uses to reboot: writing
//! command 0xfe ("pulse output port bit 0", the CPU reset line) to port 0x64. Linux
//! does this with `reboot=k`; we end the VM as a reset.

use super::DeviceEvent;

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Command (write) / status (read) port.
pub const COMMAND_PORT: u16 = 0x64;
/// Command: pulse the reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// Reads: status 0 (input and output buffers empty), so a guest waiting for the
/// controller to be ready goes on at once; data 0.
pub fn read(_port: u16, data: &mut [u8]) {
    data.fill(0);
}

/// Writes: only the reset command matters.
pub fn write(port: u16, data: &[u8]) -> Option<DeviceEvent> {
    (port == COMMAND_PORT && data.first() == Some(&CMD_RESET_CPU)).then_some(DeviceEvent::Reset)
}
