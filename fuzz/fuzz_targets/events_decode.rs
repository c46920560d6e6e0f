//! `events::decode` on arbitrary bytes: a ring-buffer record from the kernel side must never
//! crash the agent, whatever its length or contents.
#![no_main]

use emars_agent::kernel::events::{decode, DecodeError};
use emars_common::{EventHeader, EVENT_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Err(DecodeError::Short(n)) => assert!(n == data.len() && n < EVENT_HEADER_LEN),
        Err(DecodeError::Kind(_)) => assert!(data.len() >= EVENT_HEADER_LEN),
        Ok(timed) => {
            // A name is read from the record alone, up to its stated length: bytes after it
            // (padding, a NUL) are ignored, and a length past the record is cut to it.
            let off = std::mem::offset_of!(EventHeader, name_len);
            let mut len = [0u8; 4];
            len.copy_from_slice(&data[off..off + 4]);
            let name_len = (u32::from_ne_bytes(len) as usize).min(data.len() - EVENT_HEADER_LEN);
            assert_eq!(decode(&data[..EVENT_HEADER_LEN + name_len]), Ok(timed));
        }
    }
});
