//! Provisioning lines (docs/provisioning.md: `provision import`) for tests.

/// A subscriber's provisioning line (R-N1..R-N5 settings).
pub struct Subscriber<'a> {
    pub number: &'a str,
    pub enabled: bool,
    pub destinations: &'a [(&'a str, bool)],
    pub designated_only: bool,
    pub missed_only: bool,
    pub designated: &'a [(&'a str, bool)],
}

impl<'a> Subscriber<'a> {
    /// Started, every call to `destinations`, no send conditions: tests change the
    /// fields their rule is about.
    pub fn new(number: &'a str, destinations: &'a [(&'a str, bool)]) -> Self {
        Self { number, enabled: true, destinations, designated_only: false, missed_only: false, designated: &[] }
    }

    pub fn line(&self) -> String {
        let destinations: Vec<_> =
            self.destinations.iter().map(|(a, send)| serde_json::json!({"address": a, "send": send})).collect();
        let designated: Vec<_> =
            self.designated.iter().map(|(n, on)| serde_json::json!({"number": n, "designate": on})).collect();
        serde_json::json!({
            "contract": self.number,
            "numbers": [{
                "number": self.number,
                "services": ["call"],
                "settings": {
                    "enabled": self.enabled,
                    "destinations": destinations,
                    "designated_only": self.designated_only,
                    "missed_only": self.missed_only,
                    "designated": designated,
                }
            }]
        })
        .to_string()
    }
}
