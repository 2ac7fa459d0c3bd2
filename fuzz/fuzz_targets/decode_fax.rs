//! The fax record decoder (R-F1): arbitrary bytes from Kafka must never panic, and an
//! accepted record must satisfy [`callnotify_fuzz::decode_fax_and_check`].
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| callnotify_fuzz::decode_fax_and_check(data));
