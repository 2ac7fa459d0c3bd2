//! CDR traffic: called numbers drawn from a Zipf distribution over the population,
//! configurable shares of missed, withheld and designated-caller calls, in any of the
//! three CDR formats. For each CDR the generator also says which mails it must cause
//! (their Message-IDs), by the engine's own decode and filter rules.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use engine::decode::CdrFormat;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use crate::population::Population;

/// Shares of kinds of calls, each 0.0..=1.0.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Mix {
    /// Calls not answered (R-N4).
    pub missed: f64,
    /// Callers who withheld their number (R-N6, R-N7).
    pub withheld: f64,
    /// Calls from one of the called number's designated numbers (R-N5).
    pub designated: f64,
    /// Messages that are received faxes, not CDRs (R-F1; `run --fax`).
    pub fax: f64,
}

/// The fax every fax record carries: three A4 pages, G4 (T.6), as `tiffcp -c g4`
/// writes them (the engine's decoder fixture).
const FAX_DOCUMENT: &[u8] = include_bytes!("../../engine/tests/fixtures/fax/fine-g4.tif");
const FAX_PAGES: u32 = 3;

/// One CDR ready to produce.
pub struct Cdr {
    /// The called number: the message key, so one number's calls stay in order.
    pub key: String,
    pub payload: Vec<u8>,
    /// Message-IDs (the hex part as a number) of the mails this CDR must cause.
    pub expected: Vec<u128>,
    /// A fax record, for the fax topic.
    pub fax: bool,
}

pub struct Generator {
    population: Population,
    zipf: Zipf<f64>,
    rng: SmallRng,
    format: CdrFormat,
    mix: Mix,
    /// Makes call ids unique across runs against the same store.
    run_id: String,
    seq: u64,
    /// Right-hand side of the engine's Message-IDs (its `smtp.from` domain).
    domain: String,
    /// [`FAX_DOCUMENT`] in base64, encoded once.
    fax_document: String,
}

impl Generator {
    pub fn new(
        population: Population,
        zipf_exponent: f64,
        format: CdrFormat,
        mix: Mix,
        run_id: &str,
        domain: &str,
    ) -> Self {
        Self {
            zipf: Zipf::new(population.numbers as f64, zipf_exponent).expect("zipf parameters"),
            population,
            rng: SmallRng::seed_from_u64(0x5eed),
            format,
            mix,
            run_id: run_id.to_owned(),
            seq: 0,
            domain: domain.to_owned(),
            fax_document: base64::engine::general_purpose::STANDARD.encode(FAX_DOCUMENT),
        }
    }

    pub fn population(&self) -> &Population {
        &self.population
    }

    /// The next CDR, for a call that ends `now`.
    pub fn next(&mut self, now: DateTime<Utc>) -> Cdr {
        // Zipf ranks, spread over the population so the busiest numbers are not simply
        // the first ones (whose settings would then dominate).
        let rank = self.zipf.sample(&mut self.rng) as u64;
        let index = spread(rank) % self.population.numbers;
        if self.mix.fax > 0.0 && self.rng.random_bool(self.mix.fax) {
            return self.fax_to(index, now);
        }
        self.call_to(index, now)
    }

    /// A fax record of a fax to the number with this index, received `now`.
    fn fax_to(&mut self, index: u64, now: DateTime<Utc>) -> Cdr {
        let called = self.population.number(index);
        self.seq += 1;
        let fax_id = format!("lt-{}-{}", self.run_id, self.seq);
        let payload = format!(
            r#"{{"fax_id":"{fax_id}","called":"{called}","caller":"0612345678","presentation":"allowed","received_at":"{}","pages":{FAX_PAGES},"document_base64":"{}"}}"#,
            now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            self.fax_document,
        )
        .into_bytes();
        let number = engine::phone::PhoneNumber::parse(&called).expect("the population's numbers are numbers");
        let expected = self
            .population
            .fax_recipients(index)
            .iter()
            .map(|r| {
                let id = engine::render::fax_message_id(&number, now, &fax_id, r, &self.domain);
                message_id_key(id.as_bytes()).expect("engine Message-IDs are hex")
            })
            .collect();
        Cdr { key: called, payload, expected, fax: true }
    }

    /// A CDR of a call to the number with this index (one past the population is a
    /// number nobody provisioned).
    pub fn call_to(&mut self, index: u64, now: DateTime<Utc>) -> Cdr {
        let called = self.population.number(index);
        let missed = self.rng.random_bool(self.mix.missed);
        let withheld = self.rng.random_bool(self.mix.withheld);
        let caller = if self.rng.random_bool(self.mix.designated) {
            self.population.designated(index, self.rng.random_range(0..3))
        } else {
            format!("080{:08}", self.rng.random_range(0..100_000_000u64))
        };
        self.seq += 1;
        let call_id = format!("lt-{}-{}", self.run_id, self.seq);
        let payload = render(self.format, &call_id, &called, &caller, withheld, missed, now).into_bytes();
        let expected = self.expected(index, &payload);
        Cdr { key: called, payload, expected, fax: false }
    }

    fn expected(&self, index: u64, payload: &[u8]) -> Vec<u128> {
        let call = engine::decode::decode(self.format, payload).expect("generated CDRs decode");
        let subscription = (index < self.population.numbers).then(|| self.population.subscription(index)).flatten();
        match engine::filter::decide(subscription.as_ref(), &call) {
            Ok(s) => s
                .recipients
                .iter()
                .map(|r| {
                    let id = engine::render::call_message_id(
                        call.called.as_str(),
                        &call.call_id,
                        call.ended_at,
                        r,
                        &self.domain,
                    );
                    message_id_key(id.as_bytes()).expect("engine Message-IDs are hex")
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn spread(rank: u64) -> u64 {
    rank.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
}

/// The 128-bit hex part of `<hex@domain>`, found in a Message-ID or a whole mail.
pub fn message_id_key(text: &[u8]) -> Option<u128> {
    let start = memfind(text, b"<")? + 1;
    let end = start + memfind(&text[start..], b"@")?;
    u128::from_str_radix(std::str::from_utf8(&text[start..end]).ok()?, 16).ok()
}

/// The Message-ID key of a received mail (its `Message-ID:` header).
pub fn mail_message_id(data: &[u8]) -> Option<u128> {
    let at = memfind(data, b"\nMessage-ID: ")?;
    message_id_key(&data[at..])
}

fn memfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn render(
    format: CdrFormat,
    call_id: &str,
    called: &str,
    caller: &str,
    withheld: bool,
    missed: bool,
    now: DateTime<Utc>,
) -> String {
    let started = now - chrono::Duration::seconds(30);
    let answered = now - chrono::Duration::seconds(20);
    match format {
        CdrFormat::Canonical => {
            let rfc = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            format!(
                r#"{{"call_id":"{call_id}","called":"{called}","caller":"{caller}","presentation":"{}","started_at":"{}","answered_at":{},"ended_at":"{}","outcome":"{}"}}"#,
                if withheld { "withheld" } else { "allowed" },
                rfc(started),
                if missed { "null".to_owned() } else { format!("\"{}\"", rfc(answered)) },
                rfc(now),
                if missed { "no_answer" } else { "answered" },
            )
        }
        CdrFormat::Asterisk => {
            let jst =
                |t: DateTime<Utc>| t.with_timezone(&engine::render::jst()).format("%Y-%m-%d %H:%M:%S").to_string();
            let src = if withheld { "anonymous" } else { caller };
            format!(
                r#"{{"accountcode":"","src":"{src}","dst":"{called}","dcontext":"from-trunk","clid":"\"\" <{src}>","channel":"PJSIP/trunk-0001","lastapp":"Dial","start":"{}","answer":"{}","end":"{}","duration":30,"billsec":{},"disposition":"{}","amaflags":"DOCUMENTATION","uniqueid":"{call_id}","linkedid":"{call_id}"}}"#,
                jst(started),
                if missed { String::new() } else { jst(answered) },
                jst(now),
                if missed { 0 } else { 20 },
                if missed { "NO ANSWER" } else { "ANSWERED" },
            )
        }
        CdrFormat::Freeswitch => format!(
            r#"{{"core-uuid":"loadtest","switchname":"fs-load","channel_data":{{"state":"CS_REPORTING","direction":"inbound"}},"variables":{{"uuid":"{call_id}","caller_id_number":"{}","destination_number":"{called}","start_epoch":"{}","answer_epoch":"{}","end_epoch":"{}","hangup_cause":"{}","privacy_hide_number":"{withheld}"}}}}"#,
            if withheld { "anonymous" } else { caller },
            started.timestamp(),
            if missed { 0 } else { answered.timestamp() },
            now.timestamp(),
            if missed { "NO_ANSWER" } else { "NORMAL_CLEARING" },
        ),
        CdrFormat::Fax => unreachable!("--format offers CDR formats only; faxes are Generator::fax_to's"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_decodes_and_expectations_follow_the_rules() {
        let population = Population { numbers: 1_000, subscribed: 1.0, fax: false };
        let mix = Mix { missed: 0.5, withheld: 0.1, designated: 0.3, fax: 0.0 };
        for format in [CdrFormat::Canonical, CdrFormat::Asterisk, CdrFormat::Freeswitch] {
            let mut generator = Generator::new(population, 1.0, format, mix, "t", "example.jp");
            let cdrs: Vec<Cdr> = (0..2_000).map(|_| generator.next(Utc::now())).collect();
            let notified = cdrs.iter().filter(|c| !c.expected.is_empty()).count();
            // With everyone subscribed, some calls notify and the send conditions stop others.
            assert!(notified > 200 && notified < 1_900, "{format:?}: {notified} of 2000 notify");
        }
    }

    /// R-F1: with `--fax`, a share of the messages are fax records the engine accepts,
    /// each expected to be mailed where the number's checked, started addresses are.
    #[test]
    fn r_f1_fax_records_decode_and_expect_the_mails_of_their_number() {
        let population = Population { numbers: 1_000, subscribed: 1.0, fax: true };
        let mix = Mix { missed: 0.5, withheld: 0.1, designated: 0.3, fax: 0.2 };
        let mut generator = Generator::new(population, 1.0, CdrFormat::Canonical, mix, "t", "example.jp");
        let faxes: Vec<Cdr> = (0..500).map(|_| generator.next(Utc::now())).filter(|c| c.fax).collect();
        assert!((50..150).contains(&faxes.len()), "about a fifth are faxes: {}", faxes.len());
        for fax in &faxes {
            let event = engine::decode::decode_fax(&fax.payload).expect("a valid fax record");
            let index: u64 = event.called.as_str()[2..].parse().unwrap();
            assert_eq!(fax.expected.len(), population.fax_recipients(index).len(), "{}", event.called);
        }
        assert!(faxes.iter().any(|f| !f.expected.is_empty()), "some faxes are mailed");
    }

    #[test]
    fn message_ids_are_found_in_received_mail() {
        let mail = b"From: x\r\nMessage-ID: <000000000000000000000000000000ff@example.jp>\r\n\r\nbody";
        assert_eq!(mail_message_id(mail), Some(255));
        assert_eq!(mail_message_id(b"no header"), None);
    }
}
