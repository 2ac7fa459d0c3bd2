//! Test fixtures shared by the modules' tests: a provisioned store and a manual clock.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use engine::phone::PhoneNumber;
use engine::store::Store;

use crate::clock::ManualClock;
use crate::credentials::Credentials;
use crate::ivr::Ivr;

/// 契約番号 of the test line; call notification contracted.
pub const CONTRACT: &str = "0312345678";
/// 追加番号 of the test line with call notification.
pub const ADDITIONAL: &str = "0312345679";
/// 追加番号 of the test line with fax notification only.
pub const FAX_ONLY: &str = "0312345670";
/// Contract number of another line.
pub const OTHER_LINE: &str = "0398765432";

const LINES: &str = concat!(
    r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["call"]},"#,
    r#"{"number":"0312345679","services":["call"]},{"number":"0312345670","services":["fax"]}]}"#,
    "\n",
    r#"{"contract":"0398765432","numbers":[{"number":"0398765432","services":["call"]}]}"#,
);

pub fn n(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).unwrap()
}

pub fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_764_000_000, 0).unwrap()
}

/// Everything a test needs: the IVR handles over a store holding two lines, and the
/// clock they read.
pub struct Fixture {
    pub store: Store,
    pub credentials: Credentials,
    pub clock: Arc<ManualClock>,
    pub ivr: Ivr,
}

pub fn fixture() -> Fixture {
    let store = Store::temporary().unwrap();
    let report = engine::provision::import(&store, LINES.as_bytes()).unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    let credentials = Credentials::open(&store).unwrap();
    let clock = ManualClock::new(t0());
    let ivr = Ivr::new(store.clone(), credentials.clone(), clock.clone());
    Fixture { store, credentials, clock, ivr }
}

/// Provisioning moves [`ADDITIONAL`] from the test line to [`OTHER_LINE`]'s (R-M3).
pub fn move_additional_to_other_line(f: &Fixture) {
    let moved = format!(
        r#"{{"contract":"{OTHER_LINE}","numbers":[{{"number":"{OTHER_LINE}","services":["call"]}},{{"number":"{ADDITIONAL}","services":["call"]}}]}}"#
    );
    let report = engine::provision::import(&f.store, moved.as_bytes()).unwrap();
    assert_eq!(report.moved.len(), 1, "{report:?}");
}
