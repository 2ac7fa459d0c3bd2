//! Fax documents (TIFF Class F, PDF) straight into the codec, without the record's
//! base64 around them, so the fuzzer reaches the TIFF and CCITT decoding at full speed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| callnotify_fuzz::check_document(data));
