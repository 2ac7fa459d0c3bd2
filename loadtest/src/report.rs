//! The end-of-run report: JSON for machines, Markdown for people, and an SVG plot of
//! latency and throughput over time.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// What one engine node of several did in a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeShare {
    pub cdrs_consumed: u64,
    pub mails_sent: u64,
    pub cpu_seconds: f64,
    /// CPU time per consumed CDR, microseconds.
    pub cpu_us_per_cdr: f64,
    pub max_rss_mb: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// Each engine node's share, when several ran in one group (`--nodes`).
    pub nodes: Vec<NodeShare>,
    pub command: String,
    pub machine: Machine,
    pub format: String,
    pub numbers: u64,
    pub subscribed_share: f64,
    pub mix: crate::traffic::Mix,
    /// Target CDR/s; `None` means flat out.
    pub offered_rate: Option<f64>,
    /// Flat out: the most CDRs the producer ran ahead of the engine.
    pub max_lead: u64,
    pub duration_s: f64,
    /// CDRs the broker acknowledged.
    pub cdrs_produced: u64,
    /// CDRs the broker refused or that timed out (not counted as produced).
    pub produce_failed: u64,
    pub produce_error: Option<String>,
    pub produced_per_s: f64,
    pub cdrs_consumed: u64,
    /// CDRs the engine consumed per second, first to last.
    pub consumed_per_s: f64,
    pub mails_expected: u64,
    pub mails_received: u64,
    pub mails_per_s: f64,
    /// From each CDR's sending to its mail's arrival.
    pub latency_ms: Percentiles,
    /// A paced run's CDRs sent more than 10 ms after their due time (the producer behind
    /// its schedule): their latency does not count that wait (coordinated omission).
    pub sent_late: u64,
    /// The most a CDR was sent after its due time, ms.
    pub sent_late_max_ms: f64,
    /// Expected mails not received; `None` with a backlog, when the mails of CDRs the
    /// engine never read cannot be told from lost ones.
    pub lost: Option<u64>,
    /// CDRs produced but not consumed when the run ended (the engine fell behind).
    pub backlog: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    /// Mails the sink saw but the collector could not follow (broadcast lag); not losses.
    pub unobserved: u64,
    pub engine_max_rss_mb: f64,
    pub engine_cpu_percent: f64,
    /// SMTP sessions the engine opened: about `smtp.pool_size` when its connections are
    /// reused; more when the server closes them.
    pub smtp_sessions: u64,
    /// Fax records among the messages produced (`--fax`).
    pub faxes_produced: u64,
    /// What the run added to the largest node store (the faxes kept, with `--fax`).
    pub store_growth_mb: f64,
    pub seed: String,
    pub timeline: Vec<Second>,
}

#[derive(Debug, serde::Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
}

impl Machine {
    pub fn this() -> Self {
        let memory_kb: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: (memory_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        }
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub count: u64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            count: h.len(),
        }
    }
}

/// One second of the run.
#[derive(Debug, serde::Serialize)]
pub struct Second {
    pub t: u64,
    pub produced: u64,
    pub consumed: u64,
    pub mails: u64,
    /// `None` in a second without mails.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub rss_mb: f64,
}

impl Report {
    /// Whether the run shows the engine right; if not, why. Mails the engine must not
    /// have sent fail a run as lost ones do, and so does a collector that fell behind:
    /// the mails it did not read may have been duplicates or unexpected ones, each
    /// hiding a loss.
    pub fn verdict(&self) -> Result<(), String> {
        if self.produce_failed > 0 {
            // Their mails are still expected, so they would count as the engine's losses.
            return Err(format!(
                "the broker refused {} CDRs (last error: {}): the mails they would have made are not the engine's \
                 losses, so the lost count ({}) does not say what the engine lost; see the broker",
                self.produce_failed,
                self.produce_error.as_deref().unwrap_or("none given"),
                self.lost.map_or("not counted".into(), |n| n.to_string())
            ));
        }
        let lost = self.lost.unwrap_or(0);
        if lost > 0 || self.duplicates > 0 {
            return Err(format!("{lost} mails lost and {} duplicated", self.duplicates));
        }
        if self.unexpected > 0 {
            return Err(format!(
                "{} mails the engine must not have sent (to a number without the service or stopped, for a \
                 caller its settings filter out, to an address not checked)",
                self.unexpected
            ));
        }
        if self.unobserved > 0 {
            return Err(format!(
                "{} mails went by unread (the run's mail collector fell behind): its lost and duplicate counts \
                 are not exact; run at a lower --rate",
                self.unobserved
            ));
        }
        if self.backlog > 0 {
            return Err(format!("the engine had not consumed {} CDRs when the drain time ran out", self.backlog));
        }
        if self.cdrs_produced == 0 {
            return Err("no CDR reached the broker: the run measured nothing".into());
        }
        Ok(())
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        self.plot(&dir.join("latency.svg"))?;
        Ok(())
    }

    /// The per-node table, when several nodes ran.
    fn nodes_markdown(&self) -> String {
        if self.nodes.len() < 2 {
            return String::new();
        }
        let mut table = String::from(
            "| node | CDRs consumed | mails sent | CPU s | CPU µs per CDR | max RSS MB |\n|---|---|---|---|---|---|\n",
        );
        for (i, n) in self.nodes.iter().enumerate() {
            table.push_str(&format!(
                "| {i} | {} | {} | {:.1} | {:.1} | {:.0} |\n",
                n.cdrs_consumed, n.mails_sent, n.cpu_seconds, n.cpu_us_per_cdr, n.max_rss_mb
            ));
        }
        table.push('\n');
        table
    }

    pub fn markdown(&self) -> String {
        let offered = self.offered_rate.map_or(
            format!("flat out (at most {} CDRs ahead of the engine)", self.max_lead),
            // As given: 0.25 is not "0".
            |r| format!("{r} CDR/s"),
        );
        let l = &self.latency_ms;
        let latency = match l.count {
            0 => "– (no mail matched)".to_owned(),
            _ => format!("{:.1} / {:.1} / {:.1} / {:.1} / {:.1} ms", l.p50, l.p90, l.p99, l.p99_9, l.max),
        };
        let late = match self.offered_rate {
            Some(_) => format!(
                "| CDRs sent > 10 ms past their due time (their wait not in the latency) | {} (at most {:.1} ms late) |\n",
                self.sent_late, self.sent_late_max_ms
            ),
            None => String::new(),
        };
        let lost = self.lost.map_or_else(|| "not counted (backlog)".to_owned(), |n| n.to_string());
        format!(
            "# callnotify load test\n\n\
             `{cmd}`\n\n\
             Machine: {cores} cores, {mem} GiB. Format: {format}. Population: {numbers} numbers, {sub:.1} % subscribed.\n\
             Calls: {missed:.0} % missed, {withheld:.0} % withheld, {designated:.0} % from a designated number.\n\n\
             | measure | value |\n|---|---|\n\
             | offered | {offered} |\n\
             | duration | {dur:.1} s |\n\
             | CDRs produced (acknowledged by the broker) | {produced} ({pps:.0} CDR/s); {failed} failed |\n\
             | CDRs consumed by the engine | {consumed} ({cps:.0} CDR/s) |\n\
             | mails expected / received | {exp} / {rec} ({mps:.0} mails/s) |\n\
             | latency p50 / p90 / p99 / p99.9 / max | {latency} |\n\
             {late}\
             | lost / duplicates / unexpected / unread by the collector | {lost} / {dup} / {unexp} / {unread} |\n\
             | backlog at the end | {backlog} CDRs |\n\
             | engine max RSS | {rss:.0} MB |\n\
             | engine CPU | {cpu:.0} % of one core |\n\
             | SMTP sessions the engine opened | {sessions} |\n\
             {faxes}\n\
             {nodes}\
             ![latency over time](latency.svg)\n",
            nodes = self.nodes_markdown(),
            faxes = match self.faxes_produced {
                0 => String::new(),
                n => format!(
                    "| fax records among them (R-F1) | {n} ({:.1} faxes/s); the store grew {:.1} MB ({:.1} KB a fax) |\n",
                    // Over the time CDRs were produced, not the drain after it.
                    n as f64 * self.produced_per_s / self.cdrs_produced.max(1) as f64,
                    self.store_growth_mb,
                    self.store_growth_mb * 1e3 / n as f64,
                ),
            },
            cmd = self.command,
            cores = self.machine.cores,
            mem = self.machine.memory_gib,
            format = self.format,
            numbers = self.numbers,
            sub = self.subscribed_share * 100.0,
            missed = self.mix.missed * 100.0,
            withheld = self.mix.withheld * 100.0,
            designated = self.mix.designated * 100.0,
            dur = self.duration_s,
            produced = self.cdrs_produced,
            failed = self.produce_failed,
            pps = self.produced_per_s,
            consumed = self.cdrs_consumed,
            cps = self.consumed_per_s,
            exp = self.mails_expected,
            rec = self.mails_received,
            mps = self.mails_per_s,
            dup = self.duplicates,
            unexp = self.unexpected,
            unread = self.unobserved,
            backlog = self.backlog,
            rss = self.engine_max_rss_mb,
            cpu = self.engine_cpu_percent,
            sessions = self.smtp_sessions,
        )
    }

    fn plot(&self, path: &Path) -> anyhow::Result<()> {
        let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let seconds = self.timeline.len().max(1) as u64;
        let top = self.timeline.iter().filter_map(|s| s.p99_ms).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption("end-to-end latency (CDR produced → mail received)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0..seconds, 0.0..top)?;
        chart.configure_mesh().x_desc("seconds into the run").y_desc("ms").draw()?;
        for (name, color, pick) in [("p50", BLUE, 0usize), ("p99", RED, 1)] {
            // Seconds without mails have no point (the line joins its neighbours).
            let points =
                self.timeline.iter().filter_map(|s| Some((s.t, if pick == 0 { s.p50_ms? } else { s.p99_ms? })));
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of 1 000 CDRs with every expected mail received once.
    fn clean() -> Report {
        Report {
            nodes: Vec::new(),
            command: "callnotify-loadtest run".into(),
            machine: Machine { cores: 2, memory_gib: 24.0 },
            format: "canonical".into(),
            numbers: 1000,
            subscribed_share: 0.05,
            mix: crate::traffic::Mix { missed: 0.6, withheld: 0.1, designated: 0.2, fax: 0.0 },
            offered_rate: Some(100.0),
            max_lead: 20_000,
            duration_s: 10.0,
            cdrs_produced: 1000,
            produce_failed: 0,
            produce_error: None,
            produced_per_s: 100.0,
            cdrs_consumed: 1000,
            consumed_per_s: 100.0,
            mails_expected: 40,
            mails_received: 40,
            mails_per_s: 4.0,
            latency_ms: Percentiles::default(),
            sent_late: 0,
            sent_late_max_ms: 0.0,
            lost: Some(0),
            backlog: 0,
            duplicates: 0,
            unexpected: 0,
            unobserved: 0,
            engine_max_rss_mb: 100.0,
            engine_cpu_percent: 10.0,
            smtp_sessions: 16,
            faxes_produced: 0,
            store_growth_mb: 0.0,
            seed: "1".into(),
            timeline: Vec::new(),
        }
    }

    /// A run passes only when its mails are exactly the expected ones, all read: a mail
    /// the engine must not have sent, or mails the collector did not read, used to pass.
    #[test]
    fn a_run_passes_only_with_every_mail_expected_and_read() {
        assert_eq!(clean().verdict(), Ok(()));
        let failed = |report: Report| report.verdict().expect_err("fails");
        assert!(failed(Report { lost: Some(1), ..clean() }).contains("1 mails lost"));
        // Mails of CDRs the broker refused are not the engine's to lose.
        let refused = failed(Report { lost: Some(4), produce_failed: 2, ..clean() });
        assert!(refused.contains("the broker refused 2 CDRs") && !refused.contains("4 mails lost"), "{refused}");
        assert!(failed(Report { duplicates: 2, ..clean() }).contains("2 duplicated"));
        assert!(failed(Report { unexpected: 1, ..clean() }).contains("must not have sent"));
        let unread = failed(Report { unobserved: 3, ..clean() });
        assert!(unread.contains("3 mails went by unread"), "{unread}");
        assert!(failed(Report { backlog: 5, ..clean() }).contains("5 CDRs"));
        let nothing = Report { cdrs_produced: 0, cdrs_consumed: 0, mails_expected: 0, mails_received: 0, ..clean() };
        assert!(failed(nothing).contains("measured nothing"));
        assert!(Report { unobserved: 3, ..clean() }.markdown().contains("| 0 / 0 / 0 / 3 |"));
    }

    /// What the report says is what was measured. With a backlog the lost count read 0
    /// whatever the engine lost; a run without mails read "p99 0.0 ms"; a second without
    /// mails was a 0 ms point of the plot; --rate 0.25 read "offered 0 CDR/s" (as if flat
    /// out); a producer behind its schedule was not said.
    #[test]
    fn the_report_says_what_it_did_not_measure() {
        let behind = Report { lost: None, backlog: 7, cdrs_consumed: 993, ..clean() };
        assert!(behind.markdown().contains("| not counted (backlog) / 0 / 0 / 0 |"), "{}", behind.markdown());
        assert!(behind.verdict().unwrap_err().contains("7 CDRs"));
        assert!(clean().markdown().contains("| latency p50 / p90 / p99 / p99.9 / max | – (no mail matched) |"));
        let slow = Report { offered_rate: Some(0.25), sent_late: 3, sent_late_max_ms: 41.5, ..clean() };
        let markdown = slow.markdown();
        assert!(markdown.contains("| offered | 0.25 CDR/s |"), "{markdown}");
        assert!(markdown.contains("| 3 (at most 41.5 ms late) |"), "{markdown}");
        let flat_out = Report { offered_rate: None, ..clean() }.markdown();
        assert!(!flat_out.contains("due time"), "a flat-out run has no schedule");
        let quiet = Second { t: 4, produced: 10, consumed: 10, mails: 2, p50_ms: None, p99_ms: None, rss_mb: 90.0 };
        let json = serde_json::to_value(&quiet).unwrap();
        assert!(json["p50_ms"].is_null() && json["p99_ms"].is_null(), "{json}");
    }
}
