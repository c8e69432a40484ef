//! The frames `minivmm exec` reads from the guest's virtio-console: whatever a
//! guest sends (the init's frames, or a hostile guest's bytes), in whatever pieces
//! they arrive, the demultiplexer must not panic, and a corrupt stream stops it.
//!
//! Input: byte 0 is the size of the pieces the stream is cut into.
#![no_main]

use std::io::Write;

use minivmm::exec::channel::Demux;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let (mut demux, end) = Demux::new(Box::new(std::io::sink()), Box::new(std::io::sink()));
    for chunk in stream.chunks(usize::from(piece).max(1)) {
        demux.write_all(chunk).expect("Demux never fails a write");
    }
    drop(demux);
    let _ = end.lock().map(|e| e.is_some());
});
