//! 送信先メールアドレス (destination address): `DestinationAddress::parse` must accept
//! exactly the addresses that R-N3 (SERVICE.md) allows, restated here independently.
#![no_main]

use engine::address::{AddressError, DestinationAddress};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let parsed = DestinationAddress::parse(input);
    assert_eq!(parsed.is_ok(), r_n3(input), "parse({input:?}) = {parsed:?}");
    match parsed {
        Ok(address) => {
            // The address is stored and mailed to exactly as the subscriber typed it.
            assert_eq!(address.as_str(), input);
            assert_eq!(address.to_string(), input);
        }
        Err(e) => {
            if let Some(wide) = input.chars().find(|c| !c.is_ascii()) {
                // Told first: a full-width `＠` is no `@`, and the lengths count bytes.
                assert_eq!(e, AddressError::NotHalfWidth(wide), "{input:?}");
            } else if input.bytes().filter(|&b| b == b'@').count() != 1 {
                assert_eq!(e, AddressError::AtCount, "{input:?}");
            }
            assert!(!e.to_string().is_empty());
        }
    }
});

/// R-N3, byte by byte: exactly one `@`, neither first nor last; left of it
/// `0-9 A-Z a-z _ . - ! $ % ' * + / ? ^ #`; right of it `0-9 A-Z a-z - .`, not ending
/// with `.`. Every allowed character is ASCII, so any other byte (including the bytes of
/// a multi-byte character) fails the check. And RFC 5321's lengths: at most 254 bytes
/// in all, 64 left of the `@`.
fn r_n3(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() > 254 || b.iter().position(|&c| c == b'@').is_some_and(|at| at > 64) {
        return false;
    }
    let ats: Vec<usize> = (0..b.len()).filter(|&i| b[i] == b'@').collect();
    let [at] = ats[..] else { return false };
    if at == 0 || at == b.len() - 1 {
        return false;
    }
    let (local, domain) = (&b[..at], &b[at + 1..]);
    let local_ok = |c: u8| c.is_ascii_alphanumeric() || b"_.-!$%'*+/?^#".contains(&c);
    let domain_ok = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'.';
    local.iter().all(|&c| local_ok(c)) && domain.iter().all(|&c| domain_ok(c)) && domain.last() != Some(&b'.')
}
