//! `events::decode` on arbitrary bytes: a ring-buffer record from the kernel side must never
//! crash the agent, whatever its length or contents.
#![no_main]

use emars_agent::kernel::events::{decode, DecodeError};
use emars_common::Event;
use libfuzzer_sys::fuzz_target;

const EVENT_LEN: usize = size_of::<Event>();

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Err(DecodeError::Short(n)) => assert!(n == data.len() && n < EVENT_LEN),
        Err(DecodeError::Kind(_)) => assert!(data.len() >= EVENT_LEN),
        Ok(timed) => {
            // The ring buffer may pad a record: bytes after the event are ignored.
            assert_eq!(decode(&data[..EVENT_LEN]), Ok(timed));
        }
    }
});
