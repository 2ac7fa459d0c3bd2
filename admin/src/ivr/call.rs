//! One phone call to the temporary-password line: a synchronous state machine fed the
//! digits the caller keys at each step (R-I1..R-I7).
//!
//! ```text
//! SELECT_UNIT ─1───────────────────────────────▶ ENTER_PASSWORD(contract)      R-I2
//!             ─2, or 3 from the contract number ─▶ ENTER_NUMBER ─number#─▶ ENTER_PASSWORD(number)   R-I3, R-I4
//!             ─3 from an additional number ────▶ ENTER_PASSWORD(caller)        R-I4
//! ENTER_PASSWORD ─8 digits─▶ CONFIRM ─the same 8 digits─▶ DONE (stored, unit set; call ends)   R-I5, R-I7
//! ```
//!
//! An invalid entry plays INVALID and waits for the entry of the same step again
//! ([`Step::awaiting`]), except a confirmation that does not match the first entry: as
//! either entry may be the mistyped one, password entry starts over at ENTER_PASSWORD.
//! Invalid entries are counted per call, across steps ("three invalid entries at any
//! step", R-I6); the third ends the call at once with ENDED (「…もう一度おかけ直し
//! ください。」), not INVALID, whose 「もう一度押してください」 would invite keys that are
//! no longer listened to.
//!
//! Keys are taken as sent: only ENTER_NUMBER takes (and needs) a closing `#`; anywhere
//! else a `#` makes the entry invalid. ENTER_NUMBER accepts a number of the caller's
//! line with a service contracted, call or fax notification (whose subscribers log in
//! alike, R-F1).

use std::fmt;

use engine::phone::PhoneNumber;
use engine::store::{AuthUnit, Store, StoreError};

use super::prompt::{Prompt, PromptId};
use super::Ivr;
use crate::credentials::CredentialError;

/// Invalid entries that end a call (R-I6).
pub const MAX_INVALID_ENTRIES: u32 = 3;

/// What the line does after an entry (or at the start of a call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What to play now; `None` when the call ends without a word (R-I6).
    pub prompt: Option<Prompt>,
    /// The step the next digits answer; `None` once the call ends.
    pub awaiting: Option<PromptId>,
    /// Hang up after playing `prompt`.
    pub ends: bool,
}

impl Step {
    fn ask(prompt: Prompt) -> Self {
        let awaiting = Some(prompt.id);
        Self { prompt: Some(prompt), awaiting, ends: false }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IvrError {
    #[error("the caller withheld their number or sent none; only lines' own numbers are served (R-I1)")]
    NoCallerId,
    #[error("caller {0} is not a number of a provisioned line (R-I1)")]
    NotProvisioned(PhoneNumber),
    #[error("the call has ended; dial again")]
    Ended,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

impl IvrError {
    /// Whether the call was refused under R-I1, as opposed to the system failing.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::NoCallerId | Self::NotProvisioned(_))
    }
}

/// 仮パスワード as keyed: exactly 8 digits (R-I5). Its `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
struct TemporaryPassword(String);

impl TemporaryPassword {
    fn parse(keys: &str) -> Option<Self> {
        (keys.len() == 8 && keys.bytes().all(|b| b.is_ascii_digit())).then(|| Self(keys.to_owned()))
    }
}

impl fmt::Debug for TemporaryPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TemporaryPassword(********)")
    }
}

#[derive(Debug, Clone)]
enum State {
    SelectUnit,
    EnterNumber { unit: AuthUnit },
    EnterPassword { unit: AuthUnit, target: PhoneNumber },
    Confirm { unit: AuthUnit, target: PhoneNumber, first: TemporaryPassword },
    Ended,
}

impl State {
    /// The prompt that asks for this state's entry.
    fn prompt(&self) -> Option<Prompt> {
        match self {
            Self::SelectUnit => Some(Prompt::new(PromptId::SelectUnit)),
            Self::EnterNumber { .. } => Some(Prompt::new(PromptId::EnterNumber)),
            Self::EnterPassword { target, .. } => Some(Prompt::for_number(PromptId::EnterPassword, target)),
            Self::Confirm { .. } => Some(Prompt::new(PromptId::Confirm)),
            Self::Ended => None,
        }
    }
}

/// What an entry leads to.
enum Transition {
    To(State),
    /// INVALID; `restart` replaces the state (a confirmation mismatch), else it stays.
    Invalid {
        restart: Option<State>,
    },
    Done {
        unit: AuthUnit,
        target: PhoneNumber,
        password: TemporaryPassword,
    },
}

/// A call in progress. Owns a clone of the [`Ivr`] handles, so it can be parked in a
/// map between requests.
#[derive(Debug)]
pub struct Call {
    ivr: Ivr,
    /// 発信者番号: a number of the line (R-I1).
    caller: PhoneNumber,
    /// The caller's line's 契約番号: the line whose unit is set (R-I7).
    contract: PhoneNumber,
    state: State,
    /// Invalid entries so far, over all steps (R-I6).
    invalid_entries: u32,
    /// The call ended because the number to set left the caller's line meanwhile.
    number_left: bool,
}

/// The contract number of the provisioned line `caller` is a number of, as `store` shows
/// it (R-I1).
fn line_of(store: &Store, caller: &PhoneNumber) -> Result<Option<PhoneNumber>, IvrError> {
    let Some(record) = store.number(caller)? else { return Ok(None) };
    let line = store.line(&record.contract)?;
    Ok(line.is_some_and(|line| line.numbers.contains(caller)).then_some(record.contract))
}

impl Call {
    /// Answers a call from `caller` (the caller ID as the platform sends it; `+81…` and
    /// hyphens are normalised) with SELECT_UNIT, or refuses it when the number is not
    /// one of a provisioned line's (R-I1).
    ///
    /// A caller this node's view does not show is looked up again once the view shows
    /// every write made before the call, through any node ([`Store::sync_view`]): a line
    /// provisioned through another node a moment ago is answered, not refused. So the
    /// refusal may wait for one exchange with the state owner: call it where blocking is
    /// allowed.
    pub fn start(ivr: &Ivr, caller: &str) -> Result<(Self, Step), IvrError> {
        let caller = PhoneNumber::from_caller(caller).ok_or(IvrError::NoCallerId)?;
        let contract = match line_of(&ivr.store, &caller)? {
            Some(contract) => contract,
            None => {
                // Without an answer (no state owner, or an older one during an upgrade)
                // the view as it stands decides: most callers it lacks are on no line.
                if let Err(e) = ivr.store.sync_view() {
                    tracing::warn!(%caller, error = %e, "the state owner did not answer before a refusal; refusing by this node's view");
                }
                line_of(&ivr.store, &caller)?.ok_or(IvrError::NotProvisioned(caller))?
            }
        };
        let call = Self {
            ivr: ivr.clone(),
            caller,
            contract,
            state: State::SelectUnit,
            invalid_entries: 0,
            number_left: false,
        };
        tracing::info!(%caller, contract = %call.contract, "temporary-password call answered");
        Ok((call, Step::ask(Prompt::new(PromptId::SelectUnit))))
    }

    /// The caller's number.
    pub fn caller(&self) -> PhoneNumber {
        self.caller
    }

    /// Whether the call ended because the number to set left the caller's line while
    /// the caller keyed (R-M3), not after invalid entries.
    pub fn number_left(&self) -> bool {
        self.number_left
    }

    /// Feeds the keys of one entry: `"1"` at SELECT_UNIT, `"0312345679#"` at
    /// ENTER_NUMBER (the `#` is required), 8 digits at ENTER_PASSWORD and CONFIRM.
    /// On an error the call stays where it was, so the same entry can be retried.
    pub fn input(&mut self, keys: &str) -> Result<Step, IvrError> {
        let transition = match &self.state {
            State::Ended => return Err(IvrError::Ended),
            // On an admin_user line a user (any number but the contract's) sets only their
            // own password: keying 1 or 2 would set the administrator's and take the whole
            // line (R-A3).
            State::SelectUnit if matches!(keys, "1" | "2") && self.user_on_admin_line()? => {
                Transition::Invalid { restart: None }
            }
            State::SelectUnit => match keys {
                "1" => Transition::To(State::EnterPassword { unit: AuthUnit::Line, target: self.contract }),
                "2" => Transition::To(State::EnterNumber { unit: AuthUnit::Number }),
                "3" if self.caller == self.contract => Transition::To(State::EnterNumber { unit: AuthUnit::AdminUser }),
                "3" => Transition::To(State::EnterPassword { unit: AuthUnit::AdminUser, target: self.caller }),
                _ => Transition::Invalid { restart: None },
            },
            State::EnterNumber { unit } => match self.keyed_number(keys)? {
                Some(target) => Transition::To(State::EnterPassword { unit: *unit, target }),
                None => Transition::Invalid { restart: None },
            },
            State::EnterPassword { unit, target } => match TemporaryPassword::parse(keys) {
                Some(first) => Transition::To(State::Confirm { unit: *unit, target: *target, first }),
                None => Transition::Invalid { restart: None },
            },
            State::Confirm { unit, target, first } => match TemporaryPassword::parse(keys) {
                Some(second) if second == *first => Transition::Done { unit: *unit, target: *target, password: second },
                Some(_) => Transition::Invalid { restart: Some(State::EnterPassword { unit: *unit, target: *target }) },
                None => Transition::Invalid { restart: None },
            },
        };
        match transition {
            Transition::To(state) => {
                let step = Step::ask(state.prompt().expect("a state that asks"));
                self.state = state;
                Ok(step)
            }
            Transition::Invalid { restart } => Ok(self.invalid(restart)),
            Transition::Done { unit, target, password } => {
                let done = self.complete(unit, target, &password)?;
                self.number_left = !done;
                self.state = State::Ended;
                let prompt =
                    if done { Prompt::for_number(PromptId::Done, &target) } else { Prompt::new(PromptId::Ended) };
                Ok(Step { prompt: Some(prompt), awaiting: None, ends: true })
            }
        }
    }

    /// Whether the caller is a user (not the administrator) of an admin_user line.
    fn user_on_admin_line(&self) -> Result<bool, IvrError> {
        let unit = self.ivr.store.line(&self.contract)?.and_then(|line| line.unit);
        Ok(unit == Some(AuthUnit::AdminUser) && self.caller != self.contract)
    }

    /// The number keyed at ENTER_NUMBER, if it ends with `#` and is a number of the
    /// caller's line with a service contracted (R-I3): call or fax notification, whose
    /// subscribers log in alike (R-F1).
    fn keyed_number(&self, keys: &str) -> Result<Option<PhoneNumber>, IvrError> {
        let Some(number) = keys.strip_suffix('#').and_then(|digits| PhoneNumber::parse(digits).ok()) else {
            return Ok(None);
        };
        let record = self.ivr.store.number(&number)?;
        Ok(record.filter(|r| r.contract == self.contract && (r.services.call || r.services.fax)).map(|r| r.number))
    }

    fn invalid(&mut self, restart: Option<State>) -> Step {
        self.invalid_entries += 1;
        if self.invalid_entries >= MAX_INVALID_ENTRIES {
            let caller = self.caller;
            tracing::info!(%caller, "temporary-password call ended: {MAX_INVALID_ENTRIES} invalid entries (R-I6)");
            self.state = State::Ended;
            return Step { prompt: Some(Prompt::new(PromptId::Ended)), awaiting: None, ends: true };
        }
        if let Some(state) = restart {
            self.state = state;
        }
        let awaiting = self.state.prompt().map(|p| p.id);
        Step { prompt: Some(Prompt::new(PromptId::Invalid)), awaiting, ends: false }
    }

    /// DONE: the temporary password replaces the target's credential state and the
    /// line takes the chosen unit (R-I7); its 24 hours start now (R-I8). A change of
    /// unit removes the credentials the new unit does not use, as the site's change does
    /// (R-O2, R-O3): to `line`, every number's but the contract's; to `number`, every
    /// additional number's but the target's. Every session of the line ends, as at a unit
    /// change on the site: one that went on would keep the old unit's reach and idle
    /// timeout (R-S7; to `admin_user` no credential is removed).
    ///
    /// A target no longer on the caller's line (moved to another line, or its line
    /// removed, while the caller keyed) gets nothing: `false`, and the call ends as after
    /// a wrong number (ENDED, R-I3, R-M3).
    fn complete(&self, unit: AuthUnit, target: PhoneNumber, password: &TemporaryPassword) -> Result<bool, IvrError> {
        let now = self.ivr.clock.now();
        let line = self.ivr.store.line(&self.contract)?;
        if !self.ivr.credentials.set_temporary_on_line(&target, &self.contract, &password.0, now)? {
            tracing::info!(caller = %self.caller, %target, "temporary password not set: the number left the caller's line during the call");
            return Ok(false);
        }
        match line.filter(|line| line.unit != Some(unit)) {
            Some(line) => {
                let keep = |number: &PhoneNumber| match unit {
                    AuthUnit::Line => *number == line.contract,
                    AuthUnit::Number => *number == line.contract || *number == target,
                    AuthUnit::AdminUser => true,
                };
                let removed: Vec<PhoneNumber> = line.numbers.iter().filter(|n| !keep(n)).copied().collect();
                // The credentials first: see `Store::change_line_unit`.
                self.ivr.store.change_line_unit(&self.contract, unit, &removed)?;
                self.ivr.store.end_line_sessions(&line.numbers)?;
            }
            None => self.ivr.store.set_line_unit(&self.contract, unit)?,
        }
        tracing::info!(caller = %self.caller, %target, ?unit, "temporary password set by phone");
        Ok(true)
    }
}
