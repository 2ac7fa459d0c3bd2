//! 仮パスワード設定ダイヤル: the phone line (IVR) on which a subscriber, calling from a
//! number of their line, chooses the line's authentication unit and sets a temporary
//! password for the settings site (SERVICE.md §3, R-I1..R-I8).
//!
//! The flow is [`call::Call`], a synchronous state machine that knows nothing of
//! telephony; two front ends drive it:
//!
//! - [`api`]: JSON over HTTP for an IVR platform (Asterisk, FreeSWITCH) that plays the
//!   prompts and collects the DTMF keys;
//! - [`terminal`]: the same flow on a terminal, for operators to try by hand.
//!
//! # Layout
//!
//! - [`prompt`]: the prompt ids and their verbatim texts.
//! - [`call`]: one call's state machine, its rules and its [`call::Step`]s.
//! - [`api`]: the axum router and its live-call map with idle expiry.
//! - [`terminal`]: the interactive terminal player.

pub mod api;
pub mod call;
pub mod prompt;
pub mod terminal;

use std::fmt;

use engine::store::Store;

use crate::clock::SharedClock;
use crate::credentials::Credentials;

pub use call::{Call, IvrError, Step};
pub use prompt::{Prompt, PromptId};

/// What a call needs from the rest of the system; cheap to clone, one per call.
#[derive(Clone)]
pub struct Ivr {
    /// Lines and numbers: who may call (R-I1), which numbers may be keyed (R-I3), and
    /// where the unit is set (R-I7).
    pub(crate) store: Store,
    /// Where the temporary password goes (R-I7).
    pub(crate) credentials: Credentials,
    /// Starts the 24 hours of the temporary password (R-I8) and ages idle calls.
    pub(crate) clock: SharedClock,
}

impl Ivr {
    pub fn new(store: Store, credentials: Credentials, clock: SharedClock) -> Self {
        Self { store, credentials, clock }
    }
}

impl fmt::Debug for Ivr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ivr").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
