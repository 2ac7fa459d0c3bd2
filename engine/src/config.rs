//! Configuration in layers: built-in defaults (`config/default.toml`), an optional file,
//! then `CALLNOTIFY__SECTION__KEY` environment variables. Unknown keys are an error.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::decode::CdrFormat;

mod ip_range;
pub use ip_range::IpRange;

/// The defaults, documented key by key.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of environment overrides; `__` separates the path.
const ENV_PREFIX: &str = "CALLNOTIFY__";

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub store: StoreSettings,
    pub smtp: SmtpSettings,
    pub engine: EngineSettings,
    pub metrics: MetricsSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
}

/// How log lines are written to standard error.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields), for log shippers.
    Json,
}

/// `Debug` masks the values of secret librdkafka properties ([`is_secret_property`]).
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers; empty starts the embedded mock cluster.
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<TopicSettings>,
    /// Undecodable CDRs and permanently failed mails.
    pub dead_letter_topic: String,
    /// The compacted topic holding subscriber state, one partition ([`crate::state`]).
    pub state_topic: String,
    /// Writes of subscriber state on their way to the state owner, one partition.
    pub state_requests_topic: String,
    /// Sent records of each CDR partition ([`crate::partition_log`]).
    pub sent_topic: String,
    /// Retry-queue entries of each CDR partition, compacted.
    pub retry_topic: String,
    /// Partitions per topic of the embedded mock cluster.
    pub embedded_partitions: i32,
    /// librdkafka properties, passed unchanged.
    pub properties: BTreeMap<String, String>,
}

/// Whether librdkafka property `key` holds a secret (`sasl.password`,
/// `sasl.jaas.config`, `ssl.key.password`, `ssl.key.pem`,
/// `sasl.oauthbearer.assertion.private.key.passphrase`, ...), masked wherever settings
/// are shown.
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "passphrase", "secret", "jaas", "key.pem", "oauthbearer.config"].iter().any(|word| key.contains(word))
}

/// Refuses a `kafka.properties` entry librdkafka does not take (an unknown key, a
/// value it does not read, Java's `sasl.jaas.config`) when the settings are read: refused
/// by the first Kafka client instead, its error carried the value (the password in a
/// JAAS line) into the log at every restart, after `config check` had said OK. The
/// error names the key and librdkafka's reason; the value only where it is no secret
/// and the key is one librdkafka knows (a mistyped key may be a secret's).
fn check_kafka_properties(properties: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaConfRes;
    // A plugin's own properties exist only once it is loaded, which the check does not do.
    let plugins = properties.contains_key("plugin.library.paths");
    for (key, value) in properties.iter().filter(|(key, _)| *key != "plugin.library.paths") {
        let mut one = rdkafka::ClientConfig::new();
        one.set(key, value);
        let Err(e) = one.create_native_config() else { continue };
        let KafkaError::ClientConfig(code, why, _, _) = e else { continue };
        if plugins && code == RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN {
            continue;
        }
        let hidden = is_secret_property(key) || code == RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN;
        let why = if hidden { quoted_but(&why, key) } else { why };
        return Err(ConfigError::Invalid(format!(
            "kafka.properties \"{key}\": librdkafka does not take it: {why} (docs/kafka.md)"
        )));
    }
    Ok(())
}

/// `text` with every quoted part but `key` masked: librdkafka quotes a value it does not
/// take, or the part of it it stopped at.
fn quoted_but(text: &str, key: &str) -> String {
    let mut masked = String::with_capacity(text.len());
    for (i, part) in text.split('"').enumerate() {
        match i % 2 {
            0 => masked.push_str(part),
            _ if part == key => masked.push_str(&format!("\"{part}\"")),
            _ => masked.push_str("\"***\""),
        }
    }
    masked
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret_property(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("state_topic", &self.state_topic)
            .field("state_requests_topic", &self.state_requests_topic)
            .field("sent_topic", &self.sent_topic)
            .field("retry_topic", &self.retry_topic)
            .field("embedded_partitions", &self.embedded_partitions)
            .field("properties", &properties)
            .finish()
    }
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    pub name: String,
    /// How this topic's messages are decoded.
    pub format: CdrFormat,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    pub path: PathBuf,
    /// Entries of the subscription cache (positive and negative).
    pub cache_capacity: u64,
    /// MiB of sled's own page cache.
    pub sled_cache_mb: u64,
    /// Days a sent-mail record is kept: replays within it send nothing again.
    pub sent_retention_days: u64,
    /// Days a received fax is kept for the site (R-F1), counted from its reception.
    pub fax_retention_days: u64,
    /// Above 0, sent records are flushed together at most this often under load (ms):
    /// a crash can then resend the mails of that long; see docs/delivery.md.
    pub group_commit_ms: u64,
    /// Below this much free space (MiB) on the store's file system no CDR is read, so the
    /// mails on their way have room for their records ([`crate::disk`]); 0: no check.
    pub min_free_mb: u64,
    /// A line of its contract number alone (no unit set) written as its number's record
    /// only: half the writes of an import and the records of a catch-up. Off by default:
    /// a node of an older version does not see such a line (docs/cluster.md, upgrading).
    #[serde(default)]
    pub one_record_lines: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    /// Empty: write .eml files to `outbox_dir`.
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// PEM file of the CA certificates that sign the mail server's certificate, in place
    /// of the public roots (a relay with a private CA).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    pub username: String,
    pub password: Secret,
    pub pool_size: u32,
    /// The no-reply sender (R-M1), `Name <addr>` or `addr`.
    pub from: String,
    pub outbox_dir: PathBuf,
    /// Global mails per second.
    pub rate_per_second: u32,
    /// Flood control per recipient address.
    pub per_recipient_per_minute: u32,
    pub timeout_secs: u64,
    pub retry_first_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    /// A mail still failing temporarily this long after its first attempt is given up
    /// and dead-lettered.
    pub retry_give_up_secs: u64,
}

/// The most consumer threads `engine.consumers` may ask for.
pub const MAX_CONSUMERS: usize = 64;

/// What `store.cache_capacity` may be (entries).
pub const CACHE_CAPACITIES: std::ops::RangeInclusive<u64> = 0..=100_000_000;

/// What `smtp.pool_size` may be (connections).
pub const POOL_SIZES: std::ops::RangeInclusive<u64> = 1..=1_000;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    /// Consumer threads, each a member of the consumer group (1..=[`MAX_CONSUMERS`]).
    pub consumers: usize,
    /// CDRs with mails in flight, over all consumer threads, before they pause.
    pub max_in_flight: usize,
    /// Time allowed to finish in-flight mails at shutdown.
    pub shutdown_grace_secs: u64,
    /// A call that ended longer ago than this when its CDR is read is not notified
    /// (`filtered{reason="stale"}`): a mail about a day-old call helps nobody, and the
    /// dedup window must reach past the oldest call notified (see [`Settings::validate`]).
    pub max_call_age_hours: u64,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    pub listen: SocketAddr,
    /// When set, `POST /provision` wants it as a bearer token (`provision import --url`
    /// sends it).
    #[serde(default)]
    pub provision_token: Secret,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// The subscriber settings site.
    pub listen: SocketAddr,
    /// The site's address as subscribers reach it (`https://…`, no trailing `/`): the
    /// fax mail links to the fax there (R-F1).
    pub public_url: String,
    /// The IVR platform's API. It trusts the caller ID it is sent, so only the IVR
    /// platform may reach it: never the address subscribers reach.
    pub ivr_listen: SocketAddr,
    /// The IVR platform's addresses or subnets: besides loopback, the only peers the IVR
    /// API answers. Whoever reaches it can set a temporary password for any number.
    #[serde(default)]
    pub ivr_addresses: Vec<IpRange>,
    /// Which rule a new password on the settings site follows.
    #[serde(default)]
    pub password_policy: PasswordPolicy,
    /// PEM certificate chain and private key: with both, the site serves HTTPS itself
    /// (R-S8), with `Secure` `__Host-` cookies and HSTS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The site is reached only through a TLS-terminating proxy (the other way to meet
    /// R-S8): it speaks plain HTTP to the proxy but sets `Secure` cookies and HSTS.
    #[serde(default)]
    pub behind_tls_proxy: bool,
    /// The proxies' addresses or subnets, whose `X-Forwarded-For` names the client
    /// (besides the loopback addresses, always trusted): a client reaching the site
    /// directly cannot name itself a fresh address per login and so slip the login brake.
    #[serde(default)]
    pub proxy_addresses: Vec<IpRange>,
    /// Connections each listener (site, IVR API) holds open at once.
    pub max_connections: usize,
    /// Of those, from one IP address: one client cannot take them all.
    pub max_connections_per_client: usize,
    /// A connection silent both ways this long is closed (half-sent requests).
    pub idle_timeout_secs: u64,
    /// A connection is closed this long after it opened (clients that trickle).
    pub connection_lifetime_secs: u64,
}

impl AdminSettings {
    /// Whether browsers reach the site over TLS, directly or through a proxy.
    pub fn secure(&self) -> bool {
        self.tls_cert.is_some() || self.behind_tls_proxy
    }

    /// What each of the site's and the IVR API's listeners allows.
    pub fn limits(&self) -> crate::http::Limits {
        crate::http::Limits {
            max_connections: self.max_connections,
            per_client: self.max_connections_per_client,
            idle: std::time::Duration::from_secs(self.idle_timeout_secs),
            lifetime: Some(std::time::Duration::from_secs(self.connection_lifetime_secs)),
            head_within: crate::http::HEAD_WITHIN,
        }
    }
}

/// The rule for new passwords on the settings site.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PasswordPolicy {
    /// SERVICE.md R-S5 and R-S6 as written: 8 to 12 half-width alphanumerics, not digits
    /// only, not the current password; a password expires 60 days after it was set.
    #[default]
    Seed,
    /// OWASP ASVS 5.0: 8 to 64 characters of any kind (spaces and non-ASCII included), no
    /// composition rule, not the current password; no forced periodic change.
    Asvs,
}

/// A string that never appears in logs or `Debug` output.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Without the line itself: it may hold a secret.
    #[error("config file {path} is not valid TOML: line {line}, column {column}: {message}")]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },
    #[error("environment variable {name}: {reason}")]
    Env { name: String, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Settings {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Ok(Self::effective(file, env)?.0)
    }

    /// The settings and the effective configuration they came from, as TOML with every
    /// secret masked (`callnotify config check`).
    pub fn effective(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, String), ConfigError> {
        let mut table: toml::Table = DEFAULT_TOML.parse().expect("built-in defaults are valid TOML");
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
            let layer: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                let at = e.span().map_or(0, |span| span.start).min(text.len());
                let before = &text[..at];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                ConfigError::Syntax { path: path.into(), line, column, message: e.message().to_owned() }
            })?;
            merge(&mut table, layer);
        }
        for (name, value) in env {
            if let Some(path) = name.strip_prefix(ENV_PREFIX) {
                apply_env(&mut table, &name, path, &value)?;
            }
        }
        // The error names the key: `smtp.port: invalid type: string "abc", expected u16`.
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
            let key = e.path().to_string();
            if is_secret_key(&key) {
                // serde's message quotes the value.
                return ConfigError::Invalid(format!(
                    "{key}: not a valid value (not shown: a secret; a quoted string)"
                ));
            }
            ConfigError::Invalid(format!("{key}: {}", e.into_inner().message()))
        })?;
        settings.check()?;
        Ok((settings, masked(table)))
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.kafka.topics.is_empty() {
            return invalid("kafka.topics: at least one topic is needed");
        }
        if !(1..=MAX_CONSUMERS).contains(&self.engine.consumers) {
            return Err(ConfigError::Invalid(format!(
                "engine.consumers must be between 1 and {MAX_CONSUMERS} (one per core given to the engine; \
                 threads beyond the topics' partitions get none)"
            )));
        }
        for (key, value, range, unit) in self.ranges() {
            if !range.contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "{key} must be between {} and {} {unit} (it is {value})",
                    range.start(),
                    range.end()
                )));
            }
        }
        check_kafka_properties(&self.kafka.properties)?;
        if self.smtp.retry_max_delay_ms < self.smtp.retry_first_delay_ms {
            return invalid("smtp.retry_max_delay_ms must be at least smtp.retry_first_delay_ms (the backoff starts at the first and doubles up to the max)");
        }
        let names = [
            ("kafka.group_id", &self.kafka.group_id),
            ("kafka.dead_letter_topic", &self.kafka.dead_letter_topic),
            ("kafka.state_topic", &self.kafka.state_topic),
            ("kafka.state_requests_topic", &self.kafka.state_requests_topic),
            ("kafka.sent_topic", &self.kafka.sent_topic),
            ("kafka.retry_topic", &self.kafka.retry_topic),
        ];
        for (key, value) in names.into_iter().chain(self.kafka.topics.iter().map(|t| ("kafka.topics: a name", &t.name)))
        {
            if value.trim().is_empty() {
                return Err(ConfigError::Invalid(format!("{key} must not be empty")));
            }
        }
        // Each topic has one role: a CDR topic that is also the dead-letter topic reads
        // its own refusals for ever; one listed twice takes its first format silently.
        let mut roles: Vec<(&str, &String)> = names[1..].to_vec();
        roles.extend(self.kafka.topics.iter().map(|t| ("kafka.topics", &t.name)));
        for (i, (key, name)) in roles.iter().enumerate() {
            if let Some((other, _)) = roles[..i].iter().find(|(_, earlier)| earlier == name) {
                let (first, second) = if *other == *key { (*key, "again") } else { (*other, *key) };
                return Err(ConfigError::Invalid(format!(
                    "topic {name:?} is named in {first} and {second}: each topic has one role (and a CDR topic is listed once)"
                )));
            }
        }
        let (max_age, give_up) = (self.engine.max_call_age_hours * 3_600, self.smtp.retry_give_up_secs);
        let (slack, retention) =
            (crate::decode::FUTURE_SLACK.num_seconds() as u64, self.store.sent_retention_days * 86_400);
        if max_age + slack + give_up >= retention {
            // A sent record must outlive every reading of its CDR that could still
            // notify: a call is notified up to max_call_age after its end, which may be
            // dated up to a day after the record was made; a queued mail is retried up
            // to give_up. Read after its record is pruned, the call is stale and sends
            // nothing, so a CDR read twice sends once.
            return Err(ConfigError::Invalid(format!(
                "store.sent_retention_days ({retention} s) must be longer than engine.max_call_age_hours \
                 ({max_age} s) plus a day (how far ahead of this clock a call may be dated) plus \
                 smtp.retry_give_up_secs ({give_up} s): a CDR read again after its sent record is pruned \
                 would send its mail again"
            )));
        }
        let fax_retention = self.store.fax_retention_days * 86_400;
        if max_age + slack >= fax_retention {
            // A deleted fax is remembered as deleted until its retention ends: a record
            // read again after that must be stale, or the fax comes back on the site.
            return Err(ConfigError::Invalid(format!(
                "store.fax_retention_days ({fax_retention} s) must be longer than engine.max_call_age_hours \
                 ({max_age} s) plus a day (how far ahead of this clock a fax may be dated): a fax record read \
                 again after its fax was deleted and forgotten would keep it again"
            )));
        }
        let url = self.admin.public_url.as_str();
        // Only a name and a port after the scheme: the site's pages link to absolute
        // paths (`/login?fax=…`), so a path of a proxy's lost its prefix at the first
        // link, and a query broke the fax link itself (R-F1).
        let name = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
        if name.is_none_or(|name| name.is_empty() || name.contains(['/', '?', '#', '@']))
            || url.contains(char::is_whitespace)
        {
            return invalid("admin.public_url must be the site's address as subscribers reach it, https://name[:port] and nothing after it (no path, query or trailing /)");
        }
        if self.smtp.tls_ca_file.is_some() && self.smtp.tls == TlsMode::None {
            return invalid(
                "smtp.tls_ca_file is set but smtp.tls is \"none\": set smtp.tls to \"starttls\" or \"tls\"",
            );
        }
        let on_this_machine = |host: &str| {
            let host = host.trim_end_matches('.');
            host.eq_ignore_ascii_case("localhost")
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.to_canonical().is_loopback())
        };
        // No smtp.host: mails go to the outbox, and nothing is sent anywhere.
        let over_the_network = !self.smtp.host.is_empty() && !on_this_machine(&self.smtp.host);
        if !self.smtp.username.is_empty() && self.smtp.tls == TlsMode::None && over_the_network {
            // AUTH PLAIN and LOGIN send the password as it is.
            return invalid(
                "smtp.username is set but smtp.tls is \"none\": the password would cross the network in clear; set smtp.tls to \"starttls\" or \"tls\" (a relay on this machine, smtp.host = \"127.0.0.1\", needs neither)",
            );
        }
        if self.admin.tls_cert.is_some() != self.admin.tls_key.is_some() {
            return invalid("admin.tls_cert and admin.tls_key go together: set both to serve HTTPS, or neither");
        }
        // Each listener on an address of its own: two on one port, its addresses equal or
        // either all of them (0.0.0.0, ::), could not both listen, and the second would
        // find so only once the engine consumes (the site listens after the catch-up).
        let listeners = [
            ("metrics.listen", self.metrics.listen),
            ("admin.listen", self.admin.listen),
            ("admin.ivr_listen", self.admin.ivr_listen),
        ];
        let clash = |a: SocketAddr, b: SocketAddr| {
            let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
            a.port() != 0 && a.port() == b.port() && (x == y || x.is_unspecified() || y.is_unspecified())
        };
        for (i, (key, addr)) in listeners.iter().enumerate() {
            if let Some((other, _)) = listeners[i + 1..].iter().find(|(_, other)| clash(*addr, *other)) {
                return invalid(&format!(
                    "{key} and {other} share an address ({addr}): give each listener its own port"
                ));
            }
        }
        if self.admin.behind_tls_proxy
            && !self.admin.listen.ip().to_canonical().is_loopback()
            && self.admin.proxy_addresses.is_empty()
        {
            // X-Forwarded-For is read from loopback and these only: every login would be
            // braked under the proxy's one address, one subscriber's typos braking all.
            return invalid(
                "admin.behind_tls_proxy with admin.listen beyond loopback needs admin.proxy_addresses: the proxy's addresses, whose X-Forwarded-For names each client",
            );
        }
        if !self.admin.ivr_listen.ip().to_canonical().is_loopback() && self.admin.ivr_addresses.is_empty() {
            // The API takes the caller ID it is sent: anyone reaching it could set a
            // temporary password for any number and log in as its subscriber.
            return invalid(
                "admin.ivr_listen beyond loopback needs admin.ivr_addresses: the IVR platform's addresses, the only \
                 ones the API answers (it trusts the caller ID it is sent)",
            );
        }
        if !self.admin.behind_tls_proxy && !self.admin.proxy_addresses.is_empty() {
            // Read only behind a proxy: every login was braked under the proxy's address.
            return invalid(
                "admin.proxy_addresses is set but admin.behind_tls_proxy is false: set admin.behind_tls_proxy = true \
                 for a site behind that proxy, or leave admin.proxy_addresses out",
            );
        }
        if !self.admin.secure() && self.admin.public_url.starts_with("https://") {
            // Subscribers reach an https:// site, which this one is not told it is: its
            // cookies would go without `Secure` and it would send no HSTS (R-S8).
            return invalid(
                "admin.public_url is https:// but the site is served over plain HTTP: set admin.tls_cert and \
                 admin.tls_key, or admin.behind_tls_proxy = true for a site behind a TLS proxy (R-S8)",
            );
        }
        if self.admin.secure() && !self.admin.public_url.starts_with("https://") {
            // The site is served over TLS (R-S8): the fax mails' links would lead
            // nowhere (the default is the loopback address of a demo).
            return invalid(
                "admin.public_url must be the site's https:// address as subscribers reach it: the site is served over TLS (admin.tls_cert or admin.behind_tls_proxy)",
            );
        }
        if self.smtp.from.parse::<lettre::message::Mailbox>().is_err() {
            return invalid("smtp.from must be an address, optionally with a name: `Name <no-reply@example.jp>`");
        }
        Ok(())
    }
}

impl Settings {
    /// What is wrong with the SMTP credentials for sending: a username without a
    /// password (its environment file missing: AUTH went with an empty one, and every
    /// mail waited in the retry queue for a day) or a password without a username (no
    /// AUTH sent at all). Refused by an engine's start, not by every command: a shell's
    /// `config check` or `provision export` runs without the secrets the service has.
    pub fn smtp_credentials_problem(&self) -> Option<&'static str> {
        (self.smtp.username.is_empty() != self.smtp.password.expose().is_empty()).then_some(
            "smtp.username and smtp.password go together: set both for a relay that wants AUTH (the password in \
             the environment, CALLNOTIFY__SMTP__PASSWORD), or neither",
        )
    }

    /// Every numeric setting with the values it may take and their unit.
    fn ranges(&self) -> [(&'static str, u64, std::ops::RangeInclusive<u64>, &'static str); 22] {
        let (k, st, sm, e, a) = (&self.kafka, &self.store, &self.smtp, &self.engine, &self.admin);
        [
            ("kafka.embedded_partitions", k.embedded_partitions.max(0) as u64, 1..=1_000, "partitions"),
            ("store.cache_capacity", st.cache_capacity, CACHE_CAPACITIES, "entries"),
            ("store.sled_cache_mb", st.sled_cache_mb, 1..=65_536, "MiB"),
            ("store.sent_retention_days", st.sent_retention_days, 1..=3_650, "days"),
            ("store.fax_retention_days", st.fax_retention_days, 1..=3_650, "days"),
            ("store.group_commit_ms", st.group_commit_ms, 0..=1_000, "ms"),
            ("store.min_free_mb", st.min_free_mb, 0..=1_048_576, "MiB"),
            ("smtp.port", u64::from(sm.port), 1..=65_535, ""),
            ("smtp.pool_size", u64::from(sm.pool_size), POOL_SIZES, "connections"),
            ("smtp.rate_per_second", u64::from(sm.rate_per_second), 1..=10_000_000, "mails a second"),
            ("smtp.per_recipient_per_minute", u64::from(sm.per_recipient_per_minute), 1..=10_000_000, "mails a minute"),
            ("smtp.timeout_secs", sm.timeout_secs, 1..=3_600, "s"),
            ("smtp.retry_first_delay_ms", sm.retry_first_delay_ms, 10..=3_600_000, "ms"),
            ("smtp.retry_max_delay_ms", sm.retry_max_delay_ms, 10..=86_400_000, "ms"),
            ("smtp.retry_give_up_secs", sm.retry_give_up_secs, 1..=315_360_000, "s"),
            ("engine.max_in_flight", e.max_in_flight as u64, 1..=10_000_000, "CDRs"),
            ("engine.shutdown_grace_secs", e.shutdown_grace_secs, 1..=3_600, "s"),
            ("engine.max_call_age_hours", e.max_call_age_hours, 1..=87_600, "hours"),
            ("admin.max_connections", a.max_connections as u64, 1..=1_000_000, "connections"),
            ("admin.max_connections_per_client", a.max_connections_per_client as u64, 1..=1_000_000, "connections"),
            ("admin.idle_timeout_secs", a.idle_timeout_secs, 1..=3_600, "s"),
            ("admin.connection_lifetime_secs", a.connection_lifetime_secs, 1..=86_400, "s"),
        ]
    }
}

/// Environment variables that look like settings of ours but are not read: the wrong
/// case or a single underscore after the prefix (`callnotify__smtp__host`,
/// `CALLNOTIFY_SMTP__HOST`). Each comes with what it should be called.
pub fn unread_env_vars(env: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    env.into_iter()
        .filter_map(|(name, _)| {
            let upper = name.to_ascii_uppercase();
            let looks_ours = upper.starts_with("CALLNOTIFY") && name.contains("__") && !name.starts_with(ENV_PREFIX);
            looks_ours.then(|| {
                let path = upper.trim_start_matches("CALLNOTIFY").trim_start_matches('_');
                let meant = format!("{ENV_PREFIX}{path}");
                (name, meant)
            })
        })
        .collect()
}

/// The settings that hold a secret (section, key), beside the secret librdkafka
/// properties ([`is_secret_property`]).
const SECRET_SETTINGS: [(&str, &str); 2] = [("smtp", "password"), ("metrics", "provision_token")];

/// Whether the setting at `key` (`section.key`, as serde names it) holds a secret.
fn is_secret_key(key: &str) -> bool {
    SECRET_SETTINGS
        .iter()
        .any(|(section, name)| key.strip_prefix(section).and_then(|k| k.strip_prefix('.')) == Some(name))
        || key.strip_prefix("kafka.properties.").is_some_and(is_secret_property)
}

/// `table` as TOML with every secret value masked: `smtp.password` and the secret
/// librdkafka properties ([`is_secret_property`]).
fn masked(mut table: toml::Table) -> String {
    let mask = |v: &mut toml::Value| {
        if v.as_str().is_some_and(|s| !s.is_empty()) {
            *v = toml::Value::String("***".into());
        }
    };
    for (section, key) in SECRET_SETTINGS {
        if let Some(secret) = table.get_mut(section).and_then(|t| t.get_mut(key)) {
            mask(secret);
        }
    }
    if let Some(toml::Value::Table(properties)) = table.get_mut("kafka").and_then(|t| t.get_mut("properties")) {
        properties.iter_mut().filter(|(k, _)| is_secret_property(k)).for_each(|(_, v)| mask(v));
    }
    toml::to_string_pretty(&table).expect("a TOML table prints")
}

/// Deep-merges `layer` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, layer: toml::Table) {
    for (key, value) in layer {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(l)) => merge(b, l),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// Sets `SECTION__KEY` (lower-cased) from an environment variable. The value is read as
/// TOML when it parses (numbers, booleans, arrays), else as a plain string.
fn apply_env(table: &mut toml::Table, name: &str, path: &str, value: &str) -> Result<(), ConfigError> {
    let err = |reason: &str| ConfigError::Env { name: name.to_owned(), reason: reason.to_owned() };
    let mut parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    if parts.len() < 2 || parts.iter().any(String::is_empty) {
        return Err(err("expected CALLNOTIFY__SECTION__KEY"));
    }
    let is_property = parts.len() == 3 && parts[0] == "kafka" && parts[1] == "properties";
    if is_property {
        parts[2] = parts[2].replace('_', ".");
    }
    // Where the default is a string (or a librdkafka property), the value is taken as
    // typed, so a password of digits stays a string; elsewhere it is read as TOML.
    let (last, sections) = parts.split_last().expect("at least two parts");
    let parent = sections.iter().try_fold(&*table, |t, s| t.get(s)?.as_table());
    let default_is_string = parent.and_then(|t| t.get(last)).is_some_and(toml::Value::is_str);
    let parsed = if is_property || default_is_string {
        toml::Value::String(value.to_owned())
    } else {
        format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_owned()))
    };
    let mut cursor = table;
    for section in sections {
        let entry = cursor.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cursor = entry.as_table_mut().ok_or_else(|| err(&format!("{section} is not a section")))?;
    }
    cursor.insert(last.clone(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_load_and_describe_an_embedded_setup() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.kafka.brokers, "");
        assert_eq!(s.kafka.topics[0].name, "cdr");
        assert_eq!(s.kafka.topics[0].format, CdrFormat::Canonical);
        assert_eq!(s.smtp.host, "");
        // What an embedded cluster (and every test's) makes without being told.
        assert_eq!([s.kafka.state_topic.as_str(), &s.kafka.state_requests_topic], crate::embedded::STATE_TOPICS);
        assert_eq!([s.kafka.sent_topic.as_str(), &s.kafka.retry_topic], crate::embedded::CHANGELOG_TOPICS);
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[smtp]\nhost = \"mx.file\"\nport = 2525\n[kafka.properties]\n\"fetch.wait.max.ms\" = \"50\"\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&file),
            env(&[
                ("CALLNOTIFY__SMTP__HOST", "mx.env"),
                ("CALLNOTIFY__KAFKA__TOPICS", r#"[{name="a", format="asterisk"}]"#),
                ("CALLNOTIFY__KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", "6000"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.smtp.host, "mx.env");
        assert_eq!(s.smtp.port, 2525);
        assert_eq!(s.kafka.topics[0].format, CdrFormat::Asterisk);
        assert_eq!(s.kafka.properties["fetch.wait.max.ms"], "50");
        assert_eq!(s.kafka.properties["session.timeout.ms"], "6000");
    }

    #[test]
    fn unknown_keys_are_an_error_not_ignored() {
        let e = Settings::load_from(None, env(&[("CALLNOTIFY__SMTP__HOTS", "x")])).unwrap_err();
        assert!(e.to_string().contains("hots"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[kafak]\nbrokers = \"x\"\n").unwrap();
        assert!(Settings::load_from(Some(&file), env(&[])).unwrap_err().to_string().contains("kafak"));
    }

    /// Secrets never in logs: a configuration error about a secret setting does not
    /// print its value, nor does a syntax error print the line it is on (it echoed
    /// `password = "ab\qcd"` to stderr and the journal at every start).
    #[test]
    fn configuration_errors_do_not_print_secret_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let cases = [
            ("[smtp]\nhost = \"mx\"\npassword = \"ab\\qcd-hunter2\"\n", "hunter2", "line 3"),
            ("[smtp]\npassword = 86421357\n", "86421357", "smtp.password"),
            ("[metrics]\nprovision_token = 86421357\n", "86421357", "metrics.provision_token"),
            ("[kafka.properties]\n\"sasl.password\" = 86421357\n", "86421357", "sasl.password"),
        ];
        for (text, secret, named) in cases {
            std::fs::write(&file, text).unwrap();
            let e = Settings::load_from(Some(&file), env(&[])).unwrap_err().to_string();
            assert!(!e.contains(secret), "the secret is printed: {e}");
            assert!(e.contains(named), "where the error is is not said: {e}");
        }
        // A setting that is no secret still shows what was wrong with it.
        std::fs::write(&file, "[smtp]\nport = \"abc\"\n").unwrap();
        let e = Settings::load_from(Some(&file), env(&[])).unwrap_err().to_string();
        assert!(e.contains("smtp.port") && e.contains("abc"), "{e}");
    }

    /// Secrets never in logs: a `kafka.properties` entry librdkafka refuses (Java's
    /// `sasl.jaas.config`, a key in capitals) was taken by `config check` and refused by
    /// `serve`'s first Kafka client, whose error (printed at every restart) carried the
    /// value: the password in the JAAS line. Refused when the settings are read now,
    /// naming the key and why, never the value.
    #[test]
    fn a_kafka_property_librdkafka_refuses_is_refused_without_its_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let load = |key: &str, value: &str| {
            std::fs::write(&file, format!("[kafka.properties]\n\"{key}\" = '{value}'\n")).unwrap();
            Settings::load_from(Some(&file), env(&[]))
        };
        let jaas =
            r#"org.apache.kafka.common.security.scram.ScramLoginModule required username="cn" password="hunter2";"#;
        for (key, value) in [
            ("sasl.jaas.config", jaas),
            ("SASL.PASSWORD", "hunter2"),
            ("sasl.pasword", "hunter2"),
            ("ssl.truststore.password", "hunter2"),
        ] {
            let e = load(key, value).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "the secret is printed: {e}");
            assert!(e.contains(key), "the key is not named: {e}");
        }
        // What librdkafka quotes back of a value (all of it, or the part it stopped at).
        assert_eq!(
            quoted_but(r#"Invalid value "x1" for configuration property "sasl.password""#, "sasl.password"),
            r#"Invalid value "***" for configuration property "sasl.password""#
        );
        // A plugin's properties exist once it is loaded: not refused as unknown.
        std::fs::write(
            &file,
            "[kafka.properties]\n\"plugin.library.paths\" = \"monitoring-interceptor\"\n\"confluent.monitoring.interceptor.topic\" = \"m\"\n",
        )
        .unwrap();
        Settings::load_from(Some(&file), env(&[])).expect("a plugin's property is taken");
        // One that is no secret is named with its value; one librdkafka takes is taken.
        let e = load("security.protocol", "SASL-SSL").unwrap_err().to_string();
        assert!(e.contains("security.protocol") && e.contains("SASL-SSL"), "{e}");
        assert_eq!(load("security.protocol", "sasl_ssl").unwrap().kafka.properties["security.protocol"], "sasl_ssl");
    }

    #[test]
    fn the_password_policy_is_seed_unless_asvs_is_chosen() {
        assert_eq!(Settings::load_from(None, env(&[])).unwrap().admin.password_policy, PasswordPolicy::Seed);
        let asvs = Settings::load_from(None, env(&[("CALLNOTIFY__ADMIN__PASSWORD_POLICY", "asvs")])).unwrap();
        assert_eq!(asvs.admin.password_policy, PasswordPolicy::Asvs);
        assert!(Settings::load_from(None, env(&[("CALLNOTIFY__ADMIN__PASSWORD_POLICY", "strong")])).is_err());
    }

    #[test]
    fn a_tls_ca_file_without_tls_is_refused_with_the_fix() {
        let env = [("CALLNOTIFY__SMTP__TLS_CA_FILE", "/etc/callnotify/mail-ca.pem")];
        let err = Settings::load_from(None, env.map(|(k, v)| (k.to_owned(), v.to_owned()))).unwrap_err();
        assert!(err.to_string().contains("smtp.tls_ca_file"), "{err}");
        let env =
            [("CALLNOTIFY__SMTP__TLS_CA_FILE", "/etc/callnotify/mail-ca.pem"), ("CALLNOTIFY__SMTP__TLS", "starttls")];
        let s = Settings::load_from(None, env.map(|(k, v)| (k.to_owned(), v.to_owned()))).unwrap();
        assert_eq!(s.smtp.tls_ca_file.as_deref(), Some(Path::new("/etc/callnotify/mail-ca.pem")));
    }

    /// SMTP AUTH sends the password as it is (PLAIN, LOGIN): over a connection without
    /// TLS to another machine anyone on the way reads it. A relay on this machine is
    /// reached without crossing a network.
    #[test]
    fn smtp_credentials_without_tls_to_another_machine_are_refused_with_the_fix() {
        let auth = |host: &str, tls: &str| {
            Settings::load_from(
                None,
                env(&[
                    ("CALLNOTIFY__SMTP__HOST", host),
                    ("CALLNOTIFY__SMTP__TLS", tls),
                    ("CALLNOTIFY__SMTP__USERNAME", "callnotify"),
                    ("CALLNOTIFY__SMTP__PASSWORD", "smtp-secret"),
                ]),
            )
        };
        let err = auth("mx.example.jp", "none").unwrap_err().to_string();
        assert!(err.contains("smtp.username") && err.contains("smtp.tls"), "{err}");
        assert!(!err.contains("smtp-secret"), "{err}");
        // This machine, and no host at all (the outbox).
        for host in ["127.0.0.1", "localhost", "localhost.", "::1", "::ffff:127.0.0.1", ""] {
            assert!(auth(host, "none").is_ok(), "{host:?}");
        }
        for tls in ["starttls", "tls"] {
            assert!(auth("mx.example.jp", tls).is_ok(), "{tls}");
        }
        assert!(Settings::load_from(None, env(&[("CALLNOTIFY__SMTP__HOST", "mx.example.jp")])).is_ok(), "no AUTH");
    }

    /// The site, the IVR API and the operator endpoint each listen on an address of their
    /// own: two on one port were found only once the second listened, after the engine
    /// had joined its consumer groups.
    #[test]
    fn listeners_sharing_an_address_are_refused_naming_both() {
        let load = |vars: &[(&str, &str)]| Settings::load_from(None, env(vars));
        let err = load(&[
            ("CALLNOTIFY__ADMIN__LISTEN", "127.0.0.1:8080"),
            ("CALLNOTIFY__ADMIN__IVR_LISTEN", "127.0.0.1:8080"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("admin.listen and admin.ivr_listen share an address (127.0.0.1:8080)"), "{err}");
        let err =
            load(&[("CALLNOTIFY__METRICS__LISTEN", "0.0.0.0:8080"), ("CALLNOTIFY__ADMIN__LISTEN", "127.0.0.1:8080")])
                .unwrap_err()
                .to_string();
        assert!(err.contains("metrics.listen and admin.listen"), "{err}");
        // Other ports, other addresses of one port, and ports the kernel picks are fine.
        let fine = [
            ("CALLNOTIFY__METRICS__LISTEN", "127.0.0.1:0"),
            ("CALLNOTIFY__ADMIN__LISTEN", "127.0.0.1:0"),
            ("CALLNOTIFY__ADMIN__IVR_LISTEN", "10.0.0.10:8081"),
            ("CALLNOTIFY__ADMIN__IVR_ADDRESSES", r#"["10.0.0.20"]"#),
        ];
        assert!(load(&fine).is_ok());
        assert!(load(&[
            ("CALLNOTIFY__ADMIN__LISTEN", "127.0.0.1:8081"),
            ("CALLNOTIFY__ADMIN__IVR_LISTEN", "10.0.0.10:8081"),
            ("CALLNOTIFY__ADMIN__IVR_ADDRESSES", r#"["10.0.0.20"]"#),
        ])
        .is_ok());
    }

    /// The IVR API trusts the caller ID it is sent: listening beyond loopback, it answered
    /// anyone who reached it, who could set a temporary password for any number (R-I1)
    /// and log in as its subscriber. It now needs the platform's addresses.
    #[test]
    fn an_ivr_api_beyond_loopback_names_the_platform() {
        let load = |vars: &[(&str, &str)]| Settings::load_from(None, env(vars));
        let err = load(&[("CALLNOTIFY__ADMIN__IVR_LISTEN", "0.0.0.0:8081")]).unwrap_err().to_string();
        assert!(err.contains("admin.ivr_addresses"), "{err}");
        let named = load(&[
            ("CALLNOTIFY__ADMIN__IVR_LISTEN", "0.0.0.0:8081"),
            ("CALLNOTIFY__ADMIN__IVR_ADDRESSES", r#"["10.0.7.0/24"]"#),
        ])
        .unwrap();
        assert!(named.admin.ivr_addresses[0].contains("10.0.7.3".parse().unwrap()));
        assert!(load(&[("CALLNOTIFY__ADMIN__IVR_LISTEN", "[::1]:8081")]).is_ok(), "loopback needs none");
    }

    /// R-F1: the fax mail links to the fax at `admin.public_url`: an address a mail
    /// program can open, without a trailing `/` (the link adds `/fax/…`).
    #[test]
    fn r_f1_admin_public_url_must_be_an_http_address_without_a_trailing_slash() {
        let url = |u: &str| {
            Settings::load_from(
                None,
                env(&[("CALLNOTIFY__ADMIN__PUBLIC_URL", u), ("CALLNOTIFY__ADMIN__BEHIND_TLS_PROXY", "true")]),
            )
        };
        assert_eq!(url("https://notify.example.jp").unwrap().admin.public_url, "https://notify.example.jp");
        for bad in [
            "https://notify.example.jp/",
            "notify.example.jp",
            "ftp://notify.example.jp",
            "https://a b",
            "https://notify.example.jp/callnotify",
            "https://notify.example.jp?x",
            "https://notify.example.jp#top",
            "https://",
        ] {
            let err = url(bad).expect_err(bad);
            assert!(err.to_string().contains("admin.public_url"), "{bad}: {err}");
        }
    }

    /// R-F1, R-S8: a site behind a TLS proxy kept the default public_url (the demo's
    /// http://127.0.0.1:8080, as the example deployment did): every fax mail linked
    /// there, where no subscriber can open it.
    #[test]
    fn r_f1_a_site_served_over_tls_needs_its_https_public_url() {
        let proxied = |extra: &[(&str, &str)]| {
            let mut vars = vec![("CALLNOTIFY__ADMIN__BEHIND_TLS_PROXY", "true")];
            vars.extend_from_slice(extra);
            Settings::load_from(None, env(&vars))
        };
        let err = proxied(&[]).unwrap_err().to_string();
        assert!(err.contains("admin.public_url") && err.contains("https://"), "{err}");
        assert!(proxied(&[("CALLNOTIFY__ADMIN__PUBLIC_URL", "https://notify.example.jp")]).is_ok());
    }

    /// R-S8: a site whose subscribers reach it at an https:// address but that was not
    /// told it is served over TLS (no certificate, no `behind_tls_proxy`) started, and
    /// gave its session cookies without `Secure` and no HSTS. Refused at start, naming
    /// both ways to say so; and proxy addresses without a proxy (ignored, every login
    /// braked under the proxy's address) too.
    #[test]
    fn r_s8_an_https_site_not_told_it_is_served_over_tls_is_refused() {
        let load = |pairs: &[(&str, &str)]| Settings::load_from(None, env(pairs)).map(|s| s.admin.secure());
        let https = ("CALLNOTIFY__ADMIN__PUBLIC_URL", "https://notify.example.jp");
        let err = load(&[https]).unwrap_err().to_string();
        assert!(err.contains("admin.tls_cert") && err.contains("admin.behind_tls_proxy"), "{err}");
        assert!(load(&[https, ("CALLNOTIFY__ADMIN__BEHIND_TLS_PROXY", "true")]).unwrap());
        assert!(!load(&[("CALLNOTIFY__ADMIN__PUBLIC_URL", "http://notify.example.jp")]).unwrap());
        let err = load(&[("CALLNOTIFY__ADMIN__PROXY_ADDRESSES", r#"["10.0.0.5"]"#)]).unwrap_err().to_string();
        assert!(err.contains("admin.proxy_addresses") && err.contains("admin.behind_tls_proxy"), "{err}");
    }

    /// An SMTP username without its password (the environment file that holds it
    /// missing) passed: every mail was sent with an empty password, refused, and waited
    /// in the retry queue for a day before its dead letter. Refused at start, as is a
    /// password without a username (no AUTH sent at all).
    #[test]
    fn smtp_username_and_password_go_together() {
        let load = |pairs: &[(&str, &str)]| Settings::load_from(None, env(pairs));
        let host = ("CALLNOTIFY__SMTP__HOST", "127.0.0.1");
        for half in [("CALLNOTIFY__SMTP__USERNAME", "callnotify"), ("CALLNOTIFY__SMTP__PASSWORD", "s3cret-pw")] {
            let problem = load(&[host, half]).unwrap().smtp_credentials_problem().expect("a problem");
            assert!(problem.contains("smtp.username and smtp.password"), "{problem}");
            assert!(!problem.contains("s3cret-pw"), "the password is not printed: {problem}");
        }
        let both = load(&[host, ("CALLNOTIFY__SMTP__USERNAME", "callnotify"), ("CALLNOTIFY__SMTP__PASSWORD", "pw")]);
        assert_eq!(both.unwrap().smtp_credentials_problem(), None);
        assert_eq!(load(&[host]).unwrap().smtp_credentials_problem(), None, "no AUTH");
    }

    /// With the proxy on another machine and no admin.proxy_addresses, every login was
    /// braked under the proxy's one address (the header is read from loopback and those
    /// only): one subscriber's wrong logins braked every other. Refused at start.
    #[test]
    fn a_site_behind_a_proxy_beyond_loopback_names_the_proxy() {
        let vars = |extra: &[(&str, &str)]| {
            let mut vars = vec![
                ("CALLNOTIFY__ADMIN__BEHIND_TLS_PROXY", "true"),
                ("CALLNOTIFY__ADMIN__PUBLIC_URL", "https://notify.example.jp"),
                ("CALLNOTIFY__ADMIN__LISTEN", "0.0.0.0:8080"),
            ];
            vars.extend_from_slice(extra);
            Settings::load_from(None, env(&vars))
        };
        let err = vars(&[]).unwrap_err().to_string();
        assert!(err.contains("admin.proxy_addresses"), "{err}");
        let named = vars(&[("CALLNOTIFY__ADMIN__PROXY_ADDRESSES", r#"["10.0.0.5"]"#)]).unwrap();
        assert_eq!(named.admin.proxy_addresses, ["10.0.0.5".parse::<IpRange>().unwrap()]);
        let subnet = vars(&[("CALLNOTIFY__ADMIN__PROXY_ADDRESSES", r#"["10.0.4.0/24", "fd00:1::/64"]"#)]).unwrap();
        assert_eq!(subnet.admin.proxy_addresses.len(), 2);
        assert!(subnet.admin.proxy_addresses[0].contains("10.0.4.77".parse().unwrap()));
        let typo = vars(&[("CALLNOTIFY__ADMIN__PROXY_ADDRESSES", r#"["10.0.4.1/24"]"#)]).unwrap_err().to_string();
        assert!(typo.contains("10.0.4.0/24"), "{typo}");
    }

    #[test]
    fn r_s8_the_site_is_secure_with_a_certificate_or_behind_a_tls_proxy() {
        assert!(!Settings::load_from(None, env(&[])).unwrap().admin.secure());
        let direct = Settings::load_from(
            None,
            env(&[
                ("CALLNOTIFY__ADMIN__TLS_CERT", "/etc/c.pem"),
                ("CALLNOTIFY__ADMIN__TLS_KEY", "/etc/k.pem"),
                ("CALLNOTIFY__ADMIN__PUBLIC_URL", "https://notify.example.jp"),
            ]),
        )
        .unwrap();
        assert!(direct.admin.secure());
        let proxied = Settings::load_from(
            None,
            env(&[
                ("CALLNOTIFY__ADMIN__BEHIND_TLS_PROXY", "true"),
                ("CALLNOTIFY__ADMIN__PUBLIC_URL", "https://notify.example.jp"),
            ]),
        )
        .unwrap();
        assert!(proxied.admin.secure());
        let half = Settings::load_from(None, env(&[("CALLNOTIFY__ADMIN__TLS_CERT", "/etc/c.pem")])).unwrap_err();
        assert!(half.to_string().contains("admin.tls_key"), "{half}");
    }

    #[test]
    fn engine_consumers_outside_its_range_is_refused_with_the_range() {
        assert_eq!(Settings::load_from(None, env(&[])).unwrap().engine.consumers, 1);
        for n in ["0", "65"] {
            let err = Settings::load_from(None, env(&[("CALLNOTIFY__ENGINE__CONSUMERS", n)])).unwrap_err();
            assert!(err.to_string().contains("engine.consumers must be between 1 and 64"), "{n}: {err}");
        }
        let two = Settings::load_from(None, env(&[("CALLNOTIFY__ENGINE__CONSUMERS", "2")])).unwrap();
        assert_eq!(two.engine.consumers, 2);
    }

    /// Settings that were accepted and then misbehaved (a busy retry loop, a panic, a
    /// silent no-op) are refused, each naming its key and range.
    #[test]
    fn settings_out_of_range_are_refused_naming_the_key_and_its_range() {
        for (name, value, expected) in [
            (
                "CALLNOTIFY__SMTP__RETRY_FIRST_DELAY_MS",
                "0",
                "smtp.retry_first_delay_ms must be between 10 and 3600000 ms",
            ),
            ("CALLNOTIFY__STORE__SLED_CACHE_MB", "0", "store.sled_cache_mb must be between 1 and 65536 MiB"),
            ("CALLNOTIFY__SMTP__TIMEOUT_SECS", "0", "smtp.timeout_secs must be between 1 and 3600 s"),
            ("CALLNOTIFY__KAFKA__EMBEDDED_PARTITIONS", "0", "kafka.embedded_partitions must be between 1 and 1000"),
            (
                "CALLNOTIFY__SMTP__RETRY_MAX_DELAY_MS",
                "500",
                "smtp.retry_max_delay_ms must be at least smtp.retry_first_delay_ms",
            ),
            ("CALLNOTIFY__KAFKA__DEAD_LETTER_TOPIC", "", "kafka.dead_letter_topic must not be empty"),
            ("CALLNOTIFY__KAFKA__GROUP_ID", "", "kafka.group_id must not be empty"),
            (
                "CALLNOTIFY__ENGINE__MAX_CALL_AGE_HOURS",
                "0",
                "engine.max_call_age_hours must be between 1 and 87600 hours",
            ),
            (
                "CALLNOTIFY__ENGINE__MAX_CALL_AGE_HOURS",
                "121",
                "store.sent_retention_days (604800 s) must be longer than engine.max_call_age_hours (435600 s) \
                 plus a day (how far ahead of this clock a call may be dated) plus smtp.retry_give_up_secs (86400 s)",
            ),
            (
                "CALLNOTIFY__STORE__FAX_RETENTION_DAYS",
                "1",
                "store.fax_retention_days (86400 s) must be longer than engine.max_call_age_hours (86400 s) plus a day",
            ),
            ("CALLNOTIFY__SMTP__PORT", "abc", "smtp.port: invalid type: string \"abc\", expected u16"),
            ("CALLNOTIFY__METRICS__LISTEN", "nowhere", "metrics.listen: invalid socket address syntax"),
        ] {
            let err = Settings::load_from(None, env(&[(name, value)])).expect_err(name).to_string();
            assert!(err.contains(expected), "{name}={value}: {err}");
        }
    }

    /// A CDR topic that is also the dead-letter topic reads its own refusals for ever, and
    /// a topic listed twice took its first format without a word: both are refused.
    #[test]
    fn a_topic_named_in_two_roles_or_listed_twice_is_refused_naming_both() {
        let topics = |list: &str| Settings::load_from(None, env(&[("CALLNOTIFY__KAFKA__TOPICS", list)]));
        let err = topics(r#"[{name="cdr-dead-letter",format="canonical"}]"#).unwrap_err().to_string();
        assert!(
            err.contains(r#"topic "cdr-dead-letter" is named in kafka.dead_letter_topic and kafka.topics"#),
            "{err}"
        );
        let err =
            topics(r#"[{name="cdr",format="canonical"},{name="cdr",format="asterisk"}]"#).unwrap_err().to_string();
        assert!(err.contains(r#"topic "cdr" is named in kafka.topics and again"#), "{err}");
        let err = Settings::load_from(None, env(&[("CALLNOTIFY__KAFKA__RETRY_TOPIC", "callnotify-state")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka.state_topic and kafka.retry_topic"), "{err}");
        assert!(topics(r#"[{name="cdr",format="canonical"},{name="fax",format="fax"}]"#).is_ok());
    }

    #[test]
    fn environment_variables_in_the_wrong_form_are_named_with_the_right_one() {
        let unread = unread_env_vars(env(&[
            ("callnotify__smtp__host", "mx"),
            ("CALLNOTIFY_SMTP__HOST", "mx"),
            ("CALLNOTIFY__SMTP__HOST", "mx"),
            ("CALLNOTIFY_IT_BROKERS", "127.0.0.1:9092"),
            ("PATH", "/bin"),
        ]));
        assert_eq!(
            unread,
            [
                ("callnotify__smtp__host".to_owned(), "CALLNOTIFY__SMTP__HOST".to_owned()),
                ("CALLNOTIFY_SMTP__HOST".to_owned(), "CALLNOTIFY__SMTP__HOST".to_owned()),
            ]
        );
    }

    #[test]
    fn the_effective_configuration_shows_overrides_and_masks_every_secret() {
        let (_, text) = Settings::effective(
            None,
            env(&[
                ("CALLNOTIFY__SMTP__HOST", "mx.example.jp"),
                ("CALLNOTIFY__SMTP__TLS", "starttls"),
                ("CALLNOTIFY__SMTP__USERNAME", "callnotify"),
                ("CALLNOTIFY__SMTP__PASSWORD", "smtp-secret"),
                ("CALLNOTIFY__KAFKA__PROPERTIES__SASL_PASSWORD", "kafka-secret"),
                ("CALLNOTIFY__KAFKA__PROPERTIES__SSL_KEY_PASSWORD", "key-secret"),
            ]),
        )
        .unwrap();
        assert!(text.contains("host = \"mx.example.jp\""), "{text}");
        for secret in ["smtp-secret", "kafka-secret", "key-secret"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
        assert!(text.contains("\"sasl.password\" = \"***\""), "{text}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let s = Settings::load_from(
            None,
            env(&[
                ("CALLNOTIFY__SMTP__USERNAME", "callnotify"),
                ("CALLNOTIFY__SMTP__PASSWORD", "12345678"),
                ("CALLNOTIFY__KAFKA__PROPERTIES__SASL_PASSWORD", "kafka-secret-1"),
                ("CALLNOTIFY__KAFKA__PROPERTIES__SSL_KEY_PASSWORD", "kafka-secret-2"),
                ("CALLNOTIFY__KAFKA__PROPERTIES__SASL_USERNAME", "engine"),
            ]),
        )
        .unwrap();
        let shown = format!("{s:?}");
        for secret in ["12345678", "kafka-secret-1", "kafka-secret-2"] {
            assert!(!shown.contains(secret), "{secret} shown: {shown}");
        }
        assert!(shown.contains("\"engine\""), "other properties are shown: {shown}");
        assert_eq!(s.smtp.password.expose(), "12345678");
        assert_eq!(s.kafka.properties["sasl.password"], "kafka-secret-1");
    }
}
