//! The Asterisk CDR decoder: arbitrary bytes from Kafka must never panic, and a decoded
//! event must satisfy [`callnotify_fuzz::decode_and_check`]'s invariants.
#![no_main]

use engine::decode::CdrFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| callnotify_fuzz::decode_and_check(CdrFormat::Asterisk, data));
