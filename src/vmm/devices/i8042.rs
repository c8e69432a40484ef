//! The i8042 keyboard controller (the "8042" of the IBM PC/AT, in its PS/2 form with a
//! second, auxiliary port for a mouse) and a PS/2 keyboard behind it, on ports 0x60
//! and 0x64, raising IRQ 1 for keyboard bytes and IRQ 12 for aux bytes.
//!
//! Sources, in our own words: IBM *Personal Computer AT Technical Reference* (1984),
//! "Keyboard Controller"; IBM *PS/2 Hardware Interface Technical Reference*,
//! "Keyboard and Auxiliary Device Controller"; the OSDev wiki pages "8042 PS/2
//! Controller" and "PS/2 Keyboard"; and what Linux 6.1 expects
//! (`drivers/input/serio/i8042.c`, `libps2.c`, `keyboard/atkbd.c`,
//! `mouse/psmouse-base.c`).
//!
//! # The two ports
//!
//! | port | read                     | write                                       |
//! |------|--------------------------|---------------------------------------------|
//! | 0x60 | the output buffer        | a command's parameter, else a byte to the keyboard |
//! | 0x64 | the status register      | a controller command                        |
//!
//! The controller has a one-byte **output buffer**: whatever the guest should read next
//! from 0x60 — a reply of the controller itself, or a byte from the keyboard or the aux
//! port. Status bit 0 (OBF) says it is full; reading 0x60 empties it (an empty buffer
//! reads its last byte again, as the real latch does). A controller reply replaces
//! whatever is in the buffer, so a guest that issues a command reads that command's
//! answer. Writes are handled at once, so the input buffer is never full (status bit 1,
//! IBF, stays 0) and a guest polling for it never waits.
//!
//! # Commands (written to 0x64)
//!
//! | command   | what it does here                                               |
//! |-----------|-----------------------------------------------------------------|
//! | 0x20-0x3f | read controller RAM byte `cmd & 0x1f`; 0x20 reads byte 0, the command byte (CTR) |
//! | 0x60-0x7f | the next byte on 0x60 is written to RAM byte `cmd & 0x1f`; 0x60 writes the CTR |
//! | 0xa7/0xa8 | disable/enable the aux port: set/clear CTR bit 5                |
//! | 0xa9      | aux port interface test: 0x00, "no error"                       |
//! | 0xaa      | controller self-test: 0x55, "passed"; sets the system flag      |
//! | 0xab      | keyboard port interface test: 0x00, "no error"                  |
//! | 0xad/0xae | disable/enable the keyboard port: set/clear CTR bit 4           |
//! | 0xd0      | read the output port                                            |
//! | 0xd1      | the next byte on 0x60 is the output port; bit 0 clear resets the machine |
//! | 0xd2/0xd3 | the next byte on 0x60 comes back as if sent by the keyboard/aux device |
//! | 0xd4      | the next byte on 0x60 goes to the aux device: none is attached, so it times out |
//! | 0xf0-0xff | pulse the output port bits whose mask bit (bits 0-3) is 0; bit 0 is reset, so 0xfe resets |
//! | others    | ignored (logged at debug level)                                 |
//!
//! A reset (0xfe, which Linux's `reboot=k` sends, or 0xd1 with bit 0 clear) ends the VM
//! as [`DeviceEvent::Reset`]. The A20 gate (output port bit 1) cannot be modelled under
//! KVM: A20 stays enabled whatever the guest writes.
//!
//! # The keyboard
//!
//! A byte written to 0x60 with no command waiting goes to the keyboard, which answers
//! as a PS/2 keyboard does (IBM's "Keyboard Commands"): 0xff reset → 0xfa (ACK) then
//! 0xaa (self-test passed); 0xf2 identify → 0xfa 0xab 0x83; 0xee echo → 0xee; 0xed set
//! LEDs, 0xf3 set typematic rate and 0xf0 scan code set take a parameter and ACK both
//! bytes (0xf0 0x00 also returns the current set); 0xf4-0xfd → 0xfa; 0xfe → its last
//! byte again; anything else → 0xfe ("resend"). No key is ever pressed. The keyboard
//! holds at most [`KBD_QUEUE_MAX`] unsent bytes; more are dropped.
//!
//! With CTR bit 6 set the controller translates the keyboard's scan code set 2 into
//! the PC/XT's set 1 (the "translate" table every 8042 has); of the bytes this keyboard
//! sends only 0x83 (second ID byte, so Linux sees 0xab41) and the scan set numbers
//! 0x01-0x03 change.
//!
//! # The aux port
//!
//! The aux port exists but nothing is plugged in, like a PC with an empty mouse socket.
//! The controller's own aux commands work (enable, disable, test, 0xd3 loopback), so
//! Linux registers the port ("serio: i8042 AUX port at 0x60,0x64 irq 12"); a byte sent
//! to the device (0xd4) gets no answer, which the controller reports by putting 0xfe in
//! the output buffer with the aux (bit 5) and time-out (bit 6) status bits. Linux's
//! mouse driver takes that as "no device" at once, without waiting for its own timeout.
//!
//! # Interrupts
//!
//! A full output buffer raises IRQ 1 if its byte is not from the aux port and CTR bit 0
//! is set, IRQ 12 if it is from the aux port and CTR bit 1 is set. The interrupt lines
//! are edge-triggered ISA lines, so each rising edge — a byte arriving while its
//! interrupt is enabled, or the interrupt being enabled while the byte waits — becomes
//! one write to an eventfd that KVM_IRQFD turns into an interrupt, as for COM1. Linux
//! needs both: its controller probe polls, but the keyboard and mouse drivers only hear
//! their device's replies (ACK, ID) through the interrupt handler, and the aux probe
//! checks that IRQ 12 arrives after a 0xd3 loopback (250 ms wait, then no aux port).

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use super::DeviceEvent;

/// Data port: the output buffer (read) and command parameters or keyboard bytes (write).
pub const DATA_PORT: u16 = 0x60;
/// Status register (read) and command register (write).
pub const COMMAND_PORT: u16 = 0x64;
/// The keyboard's interrupt line on the ISA bus (and IOAPIC pin).
pub const KBD_IRQ: u32 = 1;
/// The aux (mouse) port's interrupt line on the ISA bus (and IOAPIC pin).
pub const AUX_IRQ: u32 = 12;

// Status register bits (read from 0x64), PS/2 layout.
/// Bit 0: the output buffer holds a byte for the guest.
const STATUS_OBF: u8 = 1 << 0;
/// Bit 2: the system flag, a copy of CTR bit 2 (set by a passed self-test).
const STATUS_SYS: u8 = 1 << 2;
/// Bit 3: the last write went to 0x64 (a command), not 0x60 (data).
const STATUS_CMD: u8 = 1 << 3;
/// Bit 4: the keyboard is not inhibited by the key lock (Linux warns "Keylock active"
/// if this is 0).
const STATUS_UNLOCKED: u8 = 1 << 4;
/// Bit 5: the byte in the output buffer came from the aux port.
const STATUS_AUX: u8 = 1 << 5;
/// Bit 6: the last transmission to a device timed out.
const STATUS_TIMEOUT: u8 = 1 << 6;

// Controller command byte (CTR) bits: controller RAM byte 0.
/// Bit 0: raise IRQ 1 when a keyboard byte is in the output buffer.
const CTR_KBD_INT: u8 = 1 << 0;
/// Bit 1: raise IRQ 12 when an aux byte is in the output buffer.
const CTR_AUX_INT: u8 = 1 << 1;
/// Bit 2: the system flag, shown in status bit 2.
const CTR_SYS: u8 = 1 << 2;
/// Bit 4: keyboard port disabled (its clock held low: the keyboard cannot send).
const CTR_KBD_DISABLED: u8 = 1 << 4;
/// Bit 5: aux port disabled.
const CTR_AUX_DISABLED: u8 = 1 << 5;
/// Bit 6: translate keyboard scan code set 2 into set 1.
const CTR_TRANSLATE: u8 = 1 << 6;
/// The CTR as a BIOS leaves it after setting up the keyboard (interrupt on,
/// translation on, self-test passed) and leaving the mouse port off. No BIOS runs in
/// a minivmm VM, so the controller starts that way.
const CTR_AT_BOOT: u8 = CTR_KBD_INT | CTR_SYS | CTR_AUX_DISABLED | CTR_TRANSLATE;

// Output port bits (commands 0xd0/0xd1): pins of the 8042 wired to the board.
/// Bit 0: the CPU reset line, active low: 0 resets the machine.
const OUT_RESET: u8 = 1 << 0;
/// Bit 1: the A20 gate (1 = address line 20 enabled).
const OUT_A20: u8 = 1 << 1;
/// Bit 4: output buffer full with a keyboard byte (the IRQ 1 pin).
const OUT_KBD_FULL: u8 = 1 << 4;
/// Bit 5: output buffer full with an aux byte (the IRQ 12 pin).
const OUT_AUX_FULL: u8 = 1 << 5;
/// Reset line high, A20 on, the clock and data lines of both ports (bits 2-3, 6-7)
/// idle high.
const OUT_AT_BOOT: u8 = 0xcf;

// Controller commands (written to 0x64).
const CMD_READ_RAM: u8 = 0x20;
const CMD_READ_RAM_LAST: u8 = 0x3f;
const CMD_WRITE_RAM: u8 = 0x60;
const CMD_WRITE_RAM_LAST: u8 = 0x7f;
/// Which RAM byte a read/write RAM command addresses.
const RAM_INDEX_MASK: u8 = 0x1f;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
/// 0xf0-0xff: pulse output port bits 0-3 low where the command's bit is 0.
const CMD_PULSE_FIRST: u8 = 0xf0;
/// Self-test answer: passed.
const SELF_TEST_PASSED: u8 = 0x55;
/// Port test answer: no error.
const PORT_TEST_OK: u8 = 0x00;
/// What the controller reports, with the time-out bit, when a device does not answer.
const NO_ANSWER: u8 = 0xfe;

// Keyboard commands (written to 0x60) and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCAN_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_LAST_SIMPLE: u8 = 0xfd;
const KBD_RESEND: u8 = 0xfe;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
/// Sent after a reset: the keyboard's basic assurance test passed.
const KBD_BAT_PASSED: u8 = 0xaa;
/// Sent for a byte the keyboard did not understand.
const KBD_NAK: u8 = 0xfe;
/// A PS/2 MF2 keyboard's identity.
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// Scan code set after reset.
const KBD_DEFAULT_SET: u8 = 2;
/// The most bytes the keyboard holds before the controller takes them: a real
/// keyboard's buffer is 16 bytes.
pub const KBD_QUEUE_MAX: usize = 16;

/// The byte in the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Output {
    value: u8,
    /// From the aux port (status bit 5, IRQ 12), else from the keyboard or the
    /// controller itself (IRQ 1).
    aux: bool,
    /// A transmission to a device timed out (status bit 6).
    timeout: bool,
}

/// The PS/2 keyboard behind the keyboard port: only its command protocol, no keys.
#[derive(Debug)]
struct Keyboard {
    /// Bytes the keyboard still has to send, oldest first.
    queue: VecDeque<u8>,
    /// A command that waits for its parameter byte.
    awaiting: Option<u8>,
    /// The scan code set, 1 to 3.
    scan_set: u8,
    /// The last byte sent, for the resend command.
    last_sent: u8,
}

impl Keyboard {
    fn new() -> Keyboard {
        Keyboard {
            queue: VecDeque::with_capacity(KBD_QUEUE_MAX),
            awaiting: None,
            scan_set: KBD_DEFAULT_SET,
            last_sent: KBD_ACK,
        }
    }

    /// Queues `bytes` to send; what does not fit in the keyboard's buffer is dropped.
    fn send(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.queue.len() < KBD_QUEUE_MAX {
                self.queue.push_back(b);
            } else {
                log::debug!("i8042: keyboard buffer full, dropping {b:#04x}");
            }
        }
    }

    /// Takes the next byte to send, if any.
    fn take_next(&mut self) -> Option<u8> {
        let b = self.queue.pop_front()?;
        self.last_sent = b;
        Some(b)
    }

    /// The keyboard receives `byte` from the host and queues its answer.
    fn receive(&mut self, byte: u8) {
        if let Some(command) = self.awaiting.take() {
            match (command, byte) {
                (KBD_SCAN_SET, 0) => self.send(&[KBD_ACK, self.scan_set]),
                (KBD_SCAN_SET, 1..=3) => {
                    self.scan_set = byte;
                    self.send(&[KBD_ACK]);
                }
                (KBD_SCAN_SET, _) => self.send(&[KBD_NAK]),
                // LED state or typematic rate: nothing to show or repeat.
                _ => self.send(&[KBD_ACK]),
            }
            return;
        }
        match byte {
            KBD_SET_LEDS | KBD_SCAN_SET | KBD_TYPEMATIC => {
                self.awaiting = Some(byte);
                self.send(&[KBD_ACK]);
            }
            KBD_ECHO => self.send(&[KBD_ECHO]),
            KBD_IDENTIFY => self.send(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            // Enable/disable scanning, defaults, set-3 key modes: no keys, so only ACK.
            KBD_ENABLE..=KBD_LAST_SIMPLE => self.send(&[KBD_ACK]),
            KBD_RESEND => self.send(&[self.last_sent]),
            KBD_RESET => {
                self.queue.clear();
                self.scan_set = KBD_DEFAULT_SET;
                self.send(&[KBD_ACK, KBD_BAT_PASSED]);
            }
            _ => {
                log::debug!("i8042: unknown keyboard command {byte:#04x}, answering resend");
                self.send(&[KBD_NAK]);
            }
        }
    }
}

/// The 8042's set-2 to set-1 translation, for the bytes our keyboard sends (all others
/// it sends, 0xfa 0xaa 0xab 0xee 0xfe, translate to themselves).
fn translate(byte: u8) -> u8 {
    match byte {
        0x01 => 0x43,
        0x02 => 0x41,
        0x03 => 0x3f,
        0x83 => 0x41,
        other => other,
    }
}

/// The controller, its keyboard and its interrupt lines.
pub struct I8042 {
    /// The controller's internal RAM: byte 0 is the command byte (CTR); the others are
    /// scratch the guest may read and write.
    ram: [u8; 32],
    /// The output buffer (None = empty, status bit 0 clear).
    output: Option<Output>,
    /// The byte last read from 0x60, which an empty buffer reads again.
    last_read: u8,
    /// Status bit 3: the last write was to 0x64.
    last_write_command: bool,
    /// A command waiting for its parameter on 0x60.
    pending: Option<u8>,
    /// The output port's stored bits (bits 4-5 are live, from the output buffer).
    output_port: u8,
    keyboard: Keyboard,
    kbd_irq: EventFd,
    aux_irq: EventFd,
    /// The current level of the IRQ 1 and IRQ 12 pins, to find rising edges.
    kbd_line: bool,
    aux_line: bool,
}

impl I8042 {
    /// A controller as a BIOS leaves it, raising IRQ 1 and IRQ 12 by writing to
    /// `kbd_irq` and `aux_irq` (eventfds registered with KVM_IRQFD).
    pub fn new(kbd_irq: EventFd, aux_irq: EventFd) -> I8042 {
        let mut ram = [0; 32];
        ram[0] = CTR_AT_BOOT;
        I8042 {
            ram,
            output: None,
            last_read: 0,
            last_write_command: false,
            pending: None,
            output_port: OUT_AT_BOOT,
            keyboard: Keyboard::new(),
            kbd_irq,
            aux_irq,
            kbd_line: false,
            aux_line: false,
        }
    }

    /// Handles an IN from `port` (0x60 or 0x64). The registers are one byte wide: a
    /// longer access (`rep insb`) is that many byte reads.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        for b in data.iter_mut() {
            *b = if port == DATA_PORT {
                self.read_data()
            } else {
                self.status()
            };
        }
    }

    /// Handles an OUT to `port` (0x60 or 0x64), each byte a separate write; returns
    /// [`DeviceEvent::Reset`] if the guest reset the machine.
    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<DeviceEvent> {
        let mut event = None;
        for &b in data {
            let e = if port == DATA_PORT {
                self.write_data(b)
            } else {
                self.write_command(b)
            };
            event = event.or(e);
        }
        event
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    /// The status register (port 0x64).
    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if let Some(o) = self.output {
            s |= STATUS_OBF;
            if o.aux {
                s |= STATUS_AUX;
            }
            if o.timeout {
                s |= STATUS_TIMEOUT;
            }
        }
        if self.ctr() & CTR_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.last_write_command {
            s |= STATUS_CMD;
        }
        s
    }

    /// Reads port 0x60: empties the output buffer, then lets the keyboard send its
    /// next byte.
    fn read_data(&mut self) -> u8 {
        if let Some(o) = self.output.take() {
            self.last_read = o.value;
        }
        // The interrupt pin falls with OBF; a next byte raises it again.
        self.update_irqs();
        self.refill();
        self.last_read
    }

    /// Puts a controller-made byte in the output buffer, replacing what was there.
    fn reply(&mut self, value: u8, aux: bool, timeout: bool) {
        self.output = Some(Output {
            value,
            aux,
            timeout,
        });
        self.update_irqs();
    }

    /// If the output buffer is empty and the keyboard port is enabled, moves the
    /// keyboard's next byte into it (translated if CTR bit 6 says so).
    fn refill(&mut self) {
        if self.output.is_none()
            && self.ctr() & CTR_KBD_DISABLED == 0
            && let Some(b) = self.keyboard.take_next()
        {
            let value = if self.ctr() & CTR_TRANSLATE != 0 {
                translate(b)
            } else {
                b
            };
            self.output = Some(Output {
                value,
                aux: false,
                timeout: false,
            });
        }
        self.update_irqs();
    }

    /// Sets the CTR; enabling a port or its interrupt may deliver a waiting byte.
    fn set_ctr(&mut self, ctr: u8) {
        self.ram[0] = ctr;
        self.refill();
    }

    /// Recomputes the IRQ 1 and IRQ 12 pins and raises an interrupt on a rising edge.
    fn update_irqs(&mut self) {
        let ctr = self.ctr();
        let (kbd, aux) = match self.output {
            Some(o) => (
                !o.aux && ctr & CTR_KBD_INT != 0,
                o.aux && ctr & CTR_AUX_INT != 0,
            ),
            None => (false, false),
        };
        if kbd && !self.kbd_line {
            raise(&self.kbd_irq, KBD_IRQ);
        }
        if aux && !self.aux_line {
            raise(&self.aux_irq, AUX_IRQ);
        }
        self.kbd_line = kbd;
        self.aux_line = aux;
    }

    /// The output port as command 0xd0 reads it.
    fn output_port(&self) -> u8 {
        let mut v = self.output_port & !(OUT_KBD_FULL | OUT_AUX_FULL);
        match self.output {
            Some(o) if o.aux => v |= OUT_AUX_FULL,
            Some(_) => v |= OUT_KBD_FULL,
            None => {}
        }
        v
    }

    /// A write to port 0x64.
    fn write_command(&mut self, cmd: u8) -> Option<DeviceEvent> {
        self.last_write_command = true;
        // A new command replaces one still waiting for its parameter.
        self.pending = None;
        match cmd {
            CMD_READ_RAM..=CMD_READ_RAM_LAST => {
                let v = self.ram[usize::from(cmd & RAM_INDEX_MASK)];
                self.reply(v, false, false);
            }
            CMD_WRITE_RAM..=CMD_WRITE_RAM_LAST
            | CMD_WRITE_OUTPUT
            | CMD_WRITE_KBD_BUFFER
            | CMD_WRITE_AUX_BUFFER
            | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_AUX_DISABLE => self.set_ctr(self.ctr() | CTR_AUX_DISABLED),
            CMD_AUX_ENABLE => self.set_ctr(self.ctr() & !CTR_AUX_DISABLED),
            CMD_AUX_TEST | CMD_KBD_TEST => self.reply(PORT_TEST_OK, false, false),
            CMD_SELF_TEST => {
                self.ram[0] |= CTR_SYS;
                self.reply(SELF_TEST_PASSED, false, false);
            }
            CMD_KBD_DISABLE => self.set_ctr(self.ctr() | CTR_KBD_DISABLED),
            CMD_KBD_ENABLE => self.set_ctr(self.ctr() & !CTR_KBD_DISABLED),
            CMD_READ_OUTPUT => {
                let v = self.output_port();
                self.reply(v, false, false);
            }
            CMD_PULSE_FIRST..=u8::MAX => {
                // 0xff pulses nothing: Linux sends it as a "null command".
                if cmd & OUT_RESET == 0 {
                    log::debug!("i8042: command {cmd:#04x} pulses the reset line");
                    return Some(DeviceEvent::Reset);
                }
            }
            _ => log::debug!("i8042: unknown command {cmd:#04x} ignored"),
        }
        None
    }

    /// A write to port 0x60: the parameter of a waiting command, else a keyboard byte.
    fn write_data(&mut self, byte: u8) -> Option<DeviceEvent> {
        self.last_write_command = false;
        match self.pending.take() {
            Some(CMD_WRITE_RAM) => self.set_ctr(byte),
            Some(cmd @ CMD_WRITE_RAM..=CMD_WRITE_RAM_LAST) => {
                self.ram[usize::from(cmd & RAM_INDEX_MASK)] = byte;
            }
            Some(CMD_WRITE_OUTPUT) => {
                self.output_port = byte;
                if byte & OUT_A20 == 0 {
                    log::debug!("i8042: guest disables A20; it stays enabled under KVM");
                }
                if byte & OUT_RESET == 0 {
                    log::debug!("i8042: output port {byte:#04x} asserts the reset line");
                    return Some(DeviceEvent::Reset);
                }
            }
            Some(CMD_WRITE_KBD_BUFFER) => self.reply(byte, false, false),
            Some(CMD_WRITE_AUX_BUFFER) => self.reply(byte, true, false),
            // No aux device: the transmission times out.
            Some(CMD_WRITE_AUX) => self.reply(NO_ANSWER, true, true),
            Some(other) => log::debug!("i8042: no parameter expected by {other:#04x}"),
            None => {
                self.keyboard.receive(byte);
                self.refill();
            }
        }
        None
    }
}

/// Raises interrupt `irq` through its eventfd. A failure (the counter cannot
/// overflow in practice) loses one interrupt: logged, never fatal.
fn raise(fd: &EventFd, irq: u32) {
    if let Err(e) = fd.write(1) {
        crate::vmm::ratelimit::warn_limited!("i8042: cannot raise IRQ {irq}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller and the two eventfds behind its interrupt lines.
    fn dev() -> (I8042, EventFd, EventFd) {
        let kbd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let aux = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = I8042::new(kbd.try_clone().unwrap(), aux.try_clone().unwrap());
        (d, kbd, aux)
    }

    /// How many interrupts were raised through `fd` since the last call.
    fn fired(fd: &EventFd) -> u64 {
        fd.read().unwrap_or(0)
    }

    fn status(d: &mut I8042) -> u8 {
        let mut b = [0];
        d.read(COMMAND_PORT, &mut b);
        b[0]
    }

    fn data(d: &mut I8042) -> u8 {
        let mut b = [0];
        d.read(DATA_PORT, &mut b);
        b[0]
    }

    fn command(d: &mut I8042, cmd: u8) -> Option<DeviceEvent> {
        d.write(COMMAND_PORT, &[cmd])
    }

    fn send(d: &mut I8042, byte: u8) -> Option<DeviceEvent> {
        d.write(DATA_PORT, &[byte])
    }

    /// Reads the output buffer as a polling driver does: it must be full.
    fn expect(d: &mut I8042, want: u8) {
        assert_ne!(
            status(d) & STATUS_OBF,
            0,
            "expected {want:#04x}, buffer empty"
        );
        assert_eq!(data(d), want);
    }

    /// Linux's `__i8042_command`: the command, its parameters, then `replies` bytes
    /// each waited for by polling OBF; `None` where Linux would time out.
    fn linux_command(d: &mut I8042, cmd: u8, params: &[u8], replies: usize) -> Option<Vec<u8>> {
        assert_eq!(status(d) & 0x02, 0, "IBF set");
        assert_eq!(command(d, cmd), None);
        for &p in params {
            assert_eq!(send(d, p), None);
        }
        let mut out = Vec::new();
        for _ in 0..replies {
            let s = status(d);
            if s & STATUS_OBF == 0 || (cmd == CMD_WRITE_AUX_BUFFER && s & STATUS_AUX == 0) {
                return None;
            }
            out.push(data(d));
        }
        Some(out)
    }

    /// Linux's `i8042_flush`: bytes read until OBF clears, at most 16.
    fn linux_flush(d: &mut I8042) -> usize {
        let mut n = 0;
        while status(d) & STATUS_OBF != 0 {
            n += 1;
            assert!(n <= 16, "flush never ends");
            data(d);
        }
        n
    }

    #[test]
    fn self_test_answers_0x55_then_buffer_empties() {
        let (mut d, _, _) = dev();
        assert_eq!(status(&mut d) & STATUS_OBF, 0);
        assert_eq!(command(&mut d, CMD_SELF_TEST), None);
        let s = status(&mut d);
        assert_ne!(s & STATUS_OBF, 0);
        assert_ne!(s & STATUS_SYS, 0);
        assert_ne!(s & STATUS_CMD, 0);
        assert_eq!(s & 0x02, 0, "IBF is never set");
        assert_eq!(data(&mut d), SELF_TEST_PASSED);
        assert_eq!(status(&mut d) & STATUS_OBF, 0);
        // An empty buffer reads its last byte again.
        assert_eq!(data(&mut d), SELF_TEST_PASSED);
        assert_eq!(status(&mut d) & STATUS_OBF, 0);
    }

    #[test]
    fn ctr_round_trip_and_controller_ram() {
        let (mut d, _, _) = dev();
        assert_eq!(linux_command(&mut d, 0x20, &[], 1), Some(vec![CTR_AT_BOOT]));
        assert_eq!(linux_command(&mut d, 0x60, &[0x47], 0), Some(vec![]));
        assert_eq!(status(&mut d) & STATUS_CMD, 0, "last write was data");
        assert_eq!(linux_command(&mut d, 0x20, &[], 1), Some(vec![0x47]));
        // The system flag in status follows CTR bit 2.
        linux_command(&mut d, 0x60, &[0x00], 0);
        assert_eq!(status(&mut d) & STATUS_SYS, 0);
        // Other RAM bytes are scratch.
        linux_command(&mut d, 0x7f, &[0x5a], 0);
        assert_eq!(linux_command(&mut d, 0x3f, &[], 1), Some(vec![0x5a]));
        assert_eq!(linux_command(&mut d, 0x20, &[], 1), Some(vec![0x00]));
    }

    #[test]
    fn port_tests_and_enable_bits() {
        let (mut d, _, _) = dev();
        assert_eq!(linux_command(&mut d, CMD_KBD_TEST, &[], 1), Some(vec![0]));
        assert_eq!(linux_command(&mut d, CMD_AUX_TEST, &[], 1), Some(vec![0]));
        for (cmd, bit, set) in [
            (CMD_KBD_DISABLE, CTR_KBD_DISABLED, true),
            (CMD_KBD_ENABLE, CTR_KBD_DISABLED, false),
            (CMD_AUX_ENABLE, CTR_AUX_DISABLED, false),
            (CMD_AUX_DISABLE, CTR_AUX_DISABLED, true),
        ] {
            linux_command(&mut d, cmd, &[], 0);
            let ctr = linux_command(&mut d, 0x20, &[], 1).unwrap()[0];
            assert_eq!(ctr & bit != 0, set, "command {cmd:#x}");
        }
    }

    #[test]
    fn resets_through_0xfe_pulses_and_output_port() {
        let (mut d, _, _) = dev();
        assert_eq!(command(&mut d, 0xfe), Some(DeviceEvent::Reset));
        assert_eq!(command(&mut d, 0xf0), Some(DeviceEvent::Reset));
        // 0xff pulses nothing, 0xfd only bit 1.
        assert_eq!(command(&mut d, 0xff), None);
        assert_eq!(command(&mut d, 0xfd), None);
        // Linux enables A20 this way at boot: bit 0 stays high, no reset.
        assert_eq!(command(&mut d, CMD_WRITE_OUTPUT), None);
        assert_eq!(send(&mut d, 0xdf), None);
        assert_eq!(
            linux_command(&mut d, CMD_READ_OUTPUT, &[], 1),
            Some(vec![0xcf])
        );
        assert_eq!(command(&mut d, CMD_WRITE_OUTPUT), None);
        assert_eq!(send(&mut d, 0xfe), Some(DeviceEvent::Reset));
        // Several bytes in one OUT: the reset is still reported.
        assert_eq!(
            d.write(COMMAND_PORT, &[0x20, 0xfe]),
            Some(DeviceEvent::Reset)
        );
    }

    #[test]
    fn output_port_shows_which_buffer_is_full() {
        let (mut d, _, _) = dev();
        linux_command(&mut d, CMD_WRITE_AUX_BUFFER, &[0x11], 0);
        // The 0xd0 answer replaces the aux byte, but reports it.
        assert_eq!(
            linux_command(&mut d, CMD_READ_OUTPUT, &[], 1),
            Some(vec![0xef])
        );
        linux_command(&mut d, CMD_WRITE_KBD_BUFFER, &[0x22], 0);
        assert_eq!(
            linux_command(&mut d, CMD_READ_OUTPUT, &[], 1),
            Some(vec![0xdf])
        );
    }

    #[test]
    fn keyboard_reset_identify_and_parameters() {
        let (mut d, _, _) = dev();
        // Translation off first: the keyboard's own bytes.
        linux_command(&mut d, 0x60, &[CTR_SYS], 0);
        send(&mut d, KBD_RESET);
        expect(&mut d, KBD_ACK);
        expect(&mut d, KBD_BAT_PASSED);
        assert_eq!(status(&mut d) & STATUS_OBF, 0);
        send(&mut d, KBD_IDENTIFY);
        for b in [KBD_ACK, 0xab, 0x83] {
            expect(&mut d, b);
        }
        send(&mut d, KBD_ECHO);
        expect(&mut d, KBD_ECHO);
        for b in [KBD_SET_LEDS, 0x07, KBD_TYPEMATIC, 0x00, 0xf5, 0xf4, 0xf6] {
            send(&mut d, b);
            expect(&mut d, KBD_ACK);
        }
        send(&mut d, KBD_SCAN_SET);
        expect(&mut d, KBD_ACK);
        send(&mut d, 0);
        expect(&mut d, KBD_ACK);
        expect(&mut d, 2);
        send(&mut d, KBD_RESEND);
        expect(&mut d, 2);
        send(&mut d, 0x12);
        expect(&mut d, KBD_NAK);
        // Translation on: the ID's second byte becomes 0x41, as Linux expects.
        linux_command(&mut d, 0x60, &[CTR_SYS | CTR_TRANSLATE], 0);
        send(&mut d, KBD_IDENTIFY);
        for b in [KBD_ACK, 0xab, 0x41] {
            expect(&mut d, b);
        }
    }

    #[test]
    fn keyboard_waits_while_its_port_is_disabled() {
        let (mut d, _, _) = dev();
        linux_command(&mut d, CMD_KBD_DISABLE, &[], 0);
        send(&mut d, KBD_RESET);
        assert_eq!(status(&mut d) & STATUS_OBF, 0);
        // The controller still answers its own commands meanwhile.
        assert_eq!(
            linux_command(&mut d, CMD_SELF_TEST, &[], 1),
            Some(vec![0x55])
        );
        linux_command(&mut d, CMD_KBD_ENABLE, &[], 0);
        expect(&mut d, KBD_ACK);
        expect(&mut d, KBD_BAT_PASSED);
    }

    #[test]
    fn keyboard_buffer_is_bounded() {
        let (mut d, _, _) = dev();
        linux_command(&mut d, CMD_KBD_DISABLE, &[], 0);
        for _ in 0..1000 {
            send(&mut d, KBD_IDENTIFY);
        }
        linux_command(&mut d, CMD_KBD_ENABLE, &[], 0);
        assert_eq!(linux_flush_all(&mut d), KBD_QUEUE_MAX);
    }

    /// Reads until the buffer is empty, with no bound: how many bytes there were.
    fn linux_flush_all(d: &mut I8042) -> usize {
        let mut n = 0;
        while status(d) & STATUS_OBF != 0 {
            data(d);
            n += 1;
            assert!(n < 10_000);
        }
        n
    }

    #[test]
    fn empty_reads_and_odd_accesses_do_not_panic() {
        let (mut d, _, _) = dev();
        assert_eq!(data(&mut d), 0);
        let mut wide = [0xaa; 4];
        d.read(DATA_PORT, &mut wide);
        assert_eq!(wide, [0; 4]);
        d.read(COMMAND_PORT, &mut []);
        assert_eq!(d.write(DATA_PORT, &[]), None);
        // Every command with every parameter (or keyboard byte) is harmless.
        for c in 0..=u8::MAX {
            for b in 0..=u8::MAX {
                let _ = command(&mut d, c);
                let _ = send(&mut d, b);
                let _ = send(&mut d, b);
                linux_flush_all(&mut d);
            }
        }
    }

    #[test]
    fn interrupts_follow_obf_and_ctr_enable_bits() {
        let (mut d, kbd, aux) = dev();
        // Boot CTR: keyboard interrupt on, aux off.
        send(&mut d, KBD_IDENTIFY);
        assert_eq!(fired(&kbd), 1, "ACK in the buffer");
        data(&mut d);
        assert_eq!(fired(&kbd), 1, "0xab moved in after the read");
        data(&mut d);
        assert_eq!(fired(&kbd), 1);
        data(&mut d);
        assert_eq!(fired(&kbd), 0, "nothing left");
        // Interrupts off: a byte waits silently, and enabling raises it.
        linux_command(&mut d, 0x60, &[CTR_SYS], 0);
        send(&mut d, KBD_ECHO);
        assert_eq!(fired(&kbd), 0);
        linux_command(&mut d, 0x60, &[CTR_SYS | CTR_KBD_INT], 0);
        assert_eq!(
            fired(&kbd),
            1,
            "enabling the interrupt raises the waiting byte"
        );
        expect(&mut d, KBD_ECHO);
        // Aux bytes raise IRQ 12 only.
        linux_command(&mut d, 0x60, &[CTR_SYS | CTR_KBD_INT | CTR_AUX_INT], 0);
        linux_command(&mut d, CMD_WRITE_AUX_BUFFER, &[0xa5], 0);
        assert_eq!((fired(&kbd), fired(&aux)), (0, 1));
        assert_eq!(
            status(&mut d) & (STATUS_AUX | STATUS_OBF),
            STATUS_AUX | STATUS_OBF
        );
        assert_eq!(data(&mut d), 0xa5);
        assert_eq!(status(&mut d) & STATUS_AUX, 0);
    }

    #[test]
    fn enabling_an_interrupt_raises_a_waiting_byte() {
        let (mut d, kbd, _) = dev();
        linux_command(&mut d, 0x60, &[CTR_SYS | CTR_KBD_DISABLED], 0);
        send(&mut d, KBD_ECHO);
        assert_eq!(fired(&kbd), 0);
        // Enabling the port with its interrupt on delivers the byte and IRQ 1.
        linux_command(&mut d, 0x60, &[CTR_SYS | CTR_KBD_INT], 0);
        assert_eq!(fired(&kbd), 1);
        expect(&mut d, KBD_ECHO);
    }

    /// The conversation Linux 6.1 has with the controller at boot (i8042.c:
    /// platform init, probe, aux and mux checks, port enabling; atkbd and psmouse
    /// probing through interrupts) and at `reboot` with `reboot=k`: every step gets
    /// the answer that makes Linux register both ports without an error.
    #[test]
    fn linux_probe_and_reboot() {
        let (mut d, kbd, aux) = dev();
        // i8042_platform_init: A20 on through the output port, then a null command.
        assert_eq!(
            linux_command(&mut d, CMD_WRITE_OUTPUT, &[0xdf], 0),
            Some(vec![])
        );
        assert_eq!(command(&mut d, 0xff), None);
        // i8042_controller_check, i8042_controller_selftest.
        assert_eq!(linux_flush(&mut d), 0);
        assert_eq!(
            linux_command(&mut d, CMD_SELF_TEST, &[], 1),
            Some(vec![0x55])
        );
        // i8042_controller_init: a stable CTR, no key lock, keyboard port off.
        let ctr = linux_command(&mut d, 0x20, &[], 1).unwrap()[0];
        assert_eq!(linux_command(&mut d, 0x20, &[], 1), Some(vec![ctr]));
        assert_ne!(status(&mut d) & STATUS_UNLOCKED, 0, "Keylock active");
        assert_ne!(ctr & CTR_TRANSLATE, 0);
        let mut ctr = (ctr | CTR_KBD_DISABLED) & !CTR_KBD_INT;
        linux_command(&mut d, 0x60, &[ctr], 0).unwrap();
        assert_eq!(linux_flush(&mut d), 0);
        // Until now the BIOS's CTR had IRQ 1 on, so the replies raised it, as on a
        // PC; Linux has no handler yet and the line is masked. From here on it is off.
        assert_eq!(fired(&kbd), 3, "self-test and two CTR reads");
        // i8042_check_aux: loopback, aux disable/enable as CTR bit 5 shows.
        assert_eq!(linux_command(&mut d, 0xd3, &[0x5a], 1), Some(vec![0x5a]));
        linux_command(&mut d, CMD_AUX_DISABLE, &[], 0).unwrap();
        let c = linux_command(&mut d, 0x20, &[], 1).unwrap()[0];
        assert_ne!(c & CTR_AUX_DISABLED, 0);
        linux_command(&mut d, CMD_AUX_ENABLE, &[], 0).unwrap();
        let c = linux_command(&mut d, 0x20, &[], 1).unwrap()[0];
        assert_eq!(c & CTR_AUX_DISABLED, 0);
        // ... then IRQ 12 must follow a loopback byte once the aux interrupt is on.
        ctr = (ctr & !CTR_AUX_DISABLED) | CTR_AUX_INT;
        linux_command(&mut d, 0x60, &[ctr], 0).unwrap();
        assert_eq!(fired(&aux), 0);
        linux_command(&mut d, 0xd3, &[0xa5], 0).unwrap();
        assert_eq!(fired(&aux), 1, "aux IRQ test");
        assert_eq!(status(&mut d) & STATUS_AUX, STATUS_AUX);
        assert_eq!(data(&mut d), 0xa5);
        ctr = (ctr | CTR_AUX_DISABLED) & !CTR_AUX_INT;
        linux_command(&mut d, 0x60, &[ctr], 0).unwrap();
        // i8042_check_mux: the third loopback byte comes back unchanged: no MUX.
        assert_eq!(linux_flush(&mut d), 0);
        for b in [0xf0, 0x56, 0xa4] {
            assert_eq!(linux_command(&mut d, 0xd3, &[b], 1), Some(vec![b]));
        }
        // i8042_enable_aux_port, i8042_enable_kbd_port.
        ctr = (ctr & !CTR_AUX_DISABLED) | CTR_AUX_INT;
        linux_command(&mut d, 0x60, &[ctr], 0).unwrap();
        ctr = (ctr & !CTR_KBD_DISABLED) | CTR_KBD_INT;
        linux_command(&mut d, 0x60, &[ctr], 0).unwrap();
        assert_eq!((fired(&kbd), fired(&aux)), (0, 0));

        // atkbd_probe, atkbd_reset_state, atkbd_activate: each reply byte is
        // announced by IRQ 1 and read by the interrupt handler.
        let mut conversation = |out: &[u8], replies: &[u8]| {
            for &b in out {
                send(&mut d, b);
            }
            for &r in replies {
                assert_eq!(fired(&kbd), 1, "IRQ 1 for {r:#04x}");
                assert_eq!(status(&mut d) & (STATUS_OBF | STATUS_AUX), STATUS_OBF);
                assert_eq!(data(&mut d), r);
            }
            assert_eq!(fired(&kbd), 0);
        };
        conversation(&[0xf2], &[0xfa, 0xab, 0x41]);
        conversation(&[0xf5], &[0xfa]);
        conversation(&[0xed], &[0xfa]);
        conversation(&[0x00], &[0xfa]);
        conversation(&[0xf3], &[0xfa]);
        conversation(&[0x00], &[0xfa]);
        conversation(&[0xf4], &[0xfa]);

        // psmouse_probe: GET ID to the (absent) mouse times out at once.
        linux_command(&mut d, CMD_WRITE_AUX, &[0xf2], 0).unwrap();
        assert_eq!((fired(&kbd), fired(&aux)), (0, 1));
        let s = status(&mut d);
        assert_eq!(s & (STATUS_OBF | STATUS_AUX | STATUS_TIMEOUT), 0x61);
        assert_eq!(data(&mut d), NO_ANSWER);

        // reboot: i8042_controller_reset, then native_machine_emergency_restart.
        assert_eq!(linux_flush(&mut d), 0);
        ctr = (ctr | CTR_KBD_DISABLED | CTR_AUX_DISABLED) & !(CTR_KBD_INT | CTR_AUX_INT);
        linux_command(&mut d, 0x60, &[ctr], 0).unwrap();
        linux_command(&mut d, 0x60, &[CTR_AT_BOOT], 0).unwrap();
        assert_eq!(status(&mut d) & 0x02, 0, "kb_wait");
        assert_eq!(command(&mut d, 0xfe), Some(DeviceEvent::Reset));
    }
}
