//! callnotify admin: the subscriber settings site's authentication and the
//! temporary-password phone line (仮パスワード設定ダイヤル, IVR).
//!
//! A subscriber first calls the IVR from a number of their line, chooses the line's
//! authentication unit (認証単位, R-A1..R-A3) and keys an 8-digit temporary password
//! (R-I1..R-I8). With it they log in to the settings site, which makes them choose a
//! password of their own (R-S1..R-S6). Both sides share the credential rules of
//! [`credentials`], stored beside the engine's lines and numbers in its sled store, and
//! read time from an injected [`clock`] so the 24-hour and 60-day rules are testable.
//!
//! # Layout
//!
//! - [`clock`]: the `Clock` trait, the system clock and a manual clock for tests.
//! - [`credentials`]: argon2id credentials per login number and the login rules
//!   (R-I7, R-I8, R-S2, R-S3, R-S6).
//! - [`ivr`]: the phone line: the call state machine ([`ivr::call`]), its verbatim
//!   prompts ([`ivr::prompt`]), the HTTP API for an IVR platform ([`ivr::api`]) and a
//!   terminal player for operators ([`ivr::terminal`]).
//! - [`site`]: the settings site's login, forced password change and logout, with
//!   server-side sessions (R-S1..R-S7), and the 着信お知らせメール settings pages
//!   (R-C1, R-C2, R-N1..R-N5).
//! - [`server`]: the HTTP servers `callnotify serve` runs beside the engine.
//! - [`tls`]: HTTPS for the site when it is not behind a TLS-terminating proxy (R-S8).

pub mod clock;
pub mod credentials;
mod failure;
pub mod ivr;
pub mod server;
pub mod site;
pub mod tls;

#[cfg(test)]
mod testing;
