//! The subscriber population: N provisioned numbers, a share of them subscribed with a
//! realistic mix of settings. Everything is derived from the number's index, so the
//! load tester knows each number's settings without keeping them in memory, and can
//! say exactly which mails a CDR must cause.

use std::io::Write;

use engine::address::DestinationAddress;
use engine::phone::PhoneNumber;
use engine::resolve::Subscription;

/// Settings mixes (weights in per mille): what subscribers typically choose.
const TEMPLATES: [(Template, u32); 6] = [
    (Template::AllCalls, 400),
    (Template::MissedOnly, 250),
    (Template::DesignatedOnly, 100),
    (Template::DesignatedMissed, 50),
    (Template::TwoAddresses, 150),
    (Template::Stopped, 50),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// Every call, one address.
    AllCalls,
    /// 応答できなかった着信のみ.
    MissedOnly,
    /// 指定した電話番号からの着信のみ, two of three designated numbers checked.
    DesignatedOnly,
    /// Both conditions.
    DesignatedMissed,
    /// Every call, two checked addresses and one unchecked.
    TwoAddresses,
    /// 停止.
    Stopped,
}

/// The population's shape.
#[derive(Debug, Clone, Copy)]
pub struct Population {
    pub numbers: u64,
    /// Share of numbers with call notification, 0.0..=1.0.
    pub subscribed: f64,
    /// Whether the subscribed numbers also have fax notification (R-F1), to the same
    /// addresses and started or stopped alike (`run --fax`). The other numbers always
    /// have the fax service without settings: their faxes are kept, not mailed.
    pub fax: bool,
}

/// A stable 64-bit mix of the index (splitmix64), so choices look random but repeat.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Population {
    /// The i-th number: `03` + 8 digits (R-L2).
    pub fn number(&self, i: u64) -> String {
        format!("03{i:08}")
    }

    /// A designated caller of number i (k = 0, 1, 2): `090` + 8 digits.
    pub fn designated(&self, i: u64, k: u64) -> String {
        format!("090{:08}", (i * 3 + k) % 100_000_000)
    }

    pub fn template(&self, i: u64) -> Option<Template> {
        let h = mix(i);
        if (h % 1_000_000) as f64 >= self.subscribed * 1_000_000.0 {
            return None;
        }
        let mut pick = ((h >> 32) % 1000) as u32;
        for (template, weight) in TEMPLATES {
            if pick < weight {
                return Some(template);
            }
            pick -= weight;
        }
        Some(Template::AllCalls)
    }

    fn addresses(&self, i: u64, template: Template) -> Vec<(String, bool)> {
        let mut a = vec![(format!("u{i}@load.example.jp"), true)];
        if template == Template::TwoAddresses {
            a.push((format!("u{i}.m@mobile.example.ne.jp"), true));
            a.push((format!("old{i}@load.example.jp"), false));
        }
        a
    }

    /// The provisioning line of number i, in `callnotify provision import` format.
    pub fn line(&self, i: u64) -> String {
        let n = self.number(i);
        let Some(template) = self.template(i) else {
            return format!(r#"{{"contract":"{n}","numbers":[{{"number":"{n}","services":["fax"]}}]}}"#);
        };
        let destinations: Vec<String> = self
            .addresses(i, template)
            .iter()
            .map(|(a, send)| format!(r#"{{"address":"{a}","send":{send}}}"#))
            .collect();
        let designated_only = matches!(template, Template::DesignatedOnly | Template::DesignatedMissed);
        let missed_only = matches!(template, Template::MissedOnly | Template::DesignatedMissed);
        let designated: Vec<String> =
            (0..3).map(|k| format!(r#"{{"number":"{}","designate":{}}}"#, self.designated(i, k), k < 2)).collect();
        let enabled = template != Template::Stopped;
        let destinations = destinations.join(",");
        let (services, fax) = match self.fax {
            true => (
                r#"["call","fax"]"#,
                format!(r#","fax_settings":{{"enabled":{enabled},"destinations":[{destinations}]}}"#),
            ),
            false => (r#"["call"]"#, String::new()),
        };
        format!(
            r#"{{"contract":"{n}","numbers":[{{"number":"{n}","services":{services},"settings":{{"enabled":{enabled},"destinations":[{destinations}],"designated_only":{designated_only},"missed_only":{missed_only},"designated":[{}]}}{fax}}}]}}"#,
            designated.join(",")
        )
    }

    /// What the engine should resolve number i to, for computing expected mails.
    pub fn subscription(&self, i: u64) -> Option<Subscription> {
        let template = self.template(i)?;
        Some(Subscription {
            number: PhoneNumber::parse(&self.number(i)).expect("generated numbers are valid"),
            enabled: template != Template::Stopped,
            recipients: self
                .addresses(i, template)
                .into_iter()
                .filter(|(_, send)| *send)
                .map(|(a, _)| DestinationAddress::parse(&a).expect("generated addresses are valid"))
                .collect(),
            designated_only: matches!(template, Template::DesignatedOnly | Template::DesignatedMissed),
            missed_only: matches!(template, Template::MissedOnly | Template::DesignatedMissed),
            designated: (0..2).map(|k| PhoneNumber::parse(&self.designated(i, k)).expect("valid")).collect(),
            // The population is provisioned once: no number moves.
            moved_in_at: None,
        })
    }

    /// The addresses a fax to number i is mailed to (`run --fax`): the checked ones of a
    /// started subscriber when the population has fax settings.
    pub fn fax_recipients(&self, i: u64) -> Vec<DestinationAddress> {
        match self.subscription(i) {
            Some(s) if self.fax && s.enabled => s.recipients,
            _ => Vec::new(),
        }
    }

    /// Writes the whole population as JSON Lines.
    pub fn write_jsonl(&self, out: impl Write) -> std::io::Result<()> {
        self.write_jsonl_range(out, 0..self.numbers)
    }

    /// Writes the lines of numbers `range` of the population as JSON Lines.
    pub fn write_jsonl_range(&self, out: impl Write, range: std::ops::Range<u64>) -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(out);
        for i in range {
            if crate::stopping() {
                return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "stopped"));
            }
            writeln!(out, "{}", self.line(i))?;
        }
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_generated_line_imports_and_resolves_as_predicted() {
        let population = Population { numbers: 2_000, subscribed: 0.3, fax: true };
        let mut jsonl = Vec::new();
        population.write_jsonl(&mut jsonl).unwrap();
        let store = engine::store::Store::temporary().unwrap();
        let report = engine::provision::import(&store, jsonl.as_slice()).unwrap();
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        let resolver = engine::resolve::Resolver::new(store, 10).unwrap();
        let mut subscribed = 0;
        for i in 0..population.numbers {
            let number = PhoneNumber::parse(&population.number(i)).unwrap();
            let resolved = resolver.resolve(&number).unwrap().map(|s| (*s).clone());
            assert_eq!(resolved, population.subscription(i), "number {i}");
            // R-F1: every number has the fax service; the subscribed ones mail faxes
            // where their calls go, started or stopped alike.
            let record = resolver.store().number(&number).unwrap().unwrap();
            assert!(record.services.fax, "number {i}");
            let fax_to: Vec<_> = record
                .fax
                .destinations
                .iter()
                .filter(|d| d.send && record.fax.enabled)
                .map(|d| d.address.clone())
                .collect();
            assert_eq!(fax_to, population.fax_recipients(i), "number {i}");
            subscribed += usize::from(resolved.is_some());
        }
        assert!((500..700).contains(&subscribed), "about 30 % subscribed: {subscribed}");
    }
}
