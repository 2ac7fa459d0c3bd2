//! CSRF tokens. Before login there is no session to hold one, so the login form uses
//! the double-submit pattern: a random token in a cookie and the same token in a hidden
//! field (a cross-site page can make the browser send the cookie but cannot read it to
//! fill the field). After login the token lives in the server-side session.
//! `SameSite` is a second line of defence, not the only one: `Strict` on the session
//! cookie, `Lax` on the token's (a cross-site form post goes without it, a link
//! followed from a mail carries it: see `SiteState::set_cookie`).

/// A fresh random token: 128 bits, hex.
pub fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Whether the submitted token matches the expected one. Empty never matches, and the
/// comparison takes the same time wherever the first difference is, so the token
/// cannot be guessed byte by byte from response times.
pub fn matches(expected: Option<&str>, submitted: &str) -> bool {
    let Some(expected) = expected else { return false };
    if expected.is_empty() || expected.len() != submitted.len() {
        return false;
    }
    expected.bytes().zip(submitted.bytes()).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

/// Whether a cookie value looks like one of our tokens; anything else (a value planted
/// by a sibling subdomain, garbage) is replaced rather than echoed into the page.
pub fn well_formed(token: &str) -> bool {
    token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_exactly() {
        let token = new_token();
        assert!(well_formed(&token));
        assert!(matches(Some(&token), &token));
        assert!(!matches(Some(&token), ""));
        assert!(!matches(None, &token));
        assert!(!matches(Some(""), ""));
        assert!(!matches(Some(&token), &token[..31]));
        assert!(!matches(Some(&token), &new_token()));
    }
}
