//! The callnotify engine: 着信お知らせメール (incoming-call notification mail).
//!
//! A telephone exchange writes one CDR per finished call to Kafka. The engine reads
//! them, finds the called number's subscription, applies the subscriber's rules and
//! sends a Japanese notification mail over SMTP to each checked destination. The rules
//! are those of `shared/spec/SERVICE.md`; rule ids (R-xx) are cited where they apply.
//!
//! A CDR passes the stages in this order, each taking the previous one's value; the
//! consumer thread runs [`pipeline`], deliver runs on the tokio runtime:
//!
//! ```text
//! source ─bytes→ ┌ pipeline ───────────────────────────────────────────────────────┐ ─Mails→ deliver
//!                │ decode ─CallEvent→ resolve ─Subscription→ filter ─Notify→ render │
//!                └──────────────────────────── dedup: store::sent ──────────────────┘
//! ```
//!
//! # Layout
//!
//! - [`source`]: Kafka consumer threads: offsets, backpressure, revocations, shutdown.
//! - [`decode`]: message bytes → [`decode::CallEvent`], one module per CDR format; fax
//!   records → [`decode::FaxEvent`].
//! - [`fax`]: FAXお知らせメール (R-F1): fax documents (TIFF Class F, PDF) as page images
//!   and PDFs. A fax record takes the CDR's path through
//!   [`pipeline`] and is kept in the shared state ([`store::faxes`]) before its mails go.
//! - [`resolve`]: called number → [`resolve::Subscription`], a moka cache over the store.
//! - [`filter`]: the subscriber's send conditions (R-N1, R-N4..R-N7), a pure function.
//! - [`pipeline`]: one CDR through decode → resolve → filter → dedup → render: the mails to send.
//! - [`render`]: the notification mail (R-M1, R-M2) with a replay-stable Message-ID.
//! - [`deliver`]: SMTP (or an outbox directory), rate limits, retries.
//! - [`dead_letter`]: records of undecodable CDRs and refused mails (R-M4); [`dead_letter::review`]
//!   lists them; [`replay`] puts CDRs back into their topics and mails into the retry queue.
//! - [`store`]: sled trees: lines, numbers and their settings ([`store::records`],
//!   [`store::subscribers`]), and the sent records that make each mail go out once
//!   ([`store::sent`]: key, claim, record, prune, journal).
//! - [`state`]: subscriber state shared by every node through Kafka: the state topic, its
//!   owner and each node's applier.
//! - [`partition_log`]: each CDR partition's sent records and retry entries in Kafka,
//!   restored by the partition's next reader.
//! - [`disk`]: free space on the store's file system; consumers pause when it is low.
//! - [`provision`]: bulk import of lines and numbers from JSON Lines (R-L3).
//! - [`phone`], [`address`]: the parsed domain values every stage passes around.
//! - [`strict_json`]: JSON an operator or another node sends, refused with a field this
//!   version does not know (stored records are read leniently).
//! - [`embedded`]: librdkafka's mock cluster, when no brokers are configured.
//! - [`cluster`]: client settings for the Kafka cluster and the start-up check of its topics.
//! - [`unread`]: assigned partitions librdkafka never starts reading, assigned again.
//! - [`demo`]: the `callnotify demo` command.
//! - [`config`]: layered TOML + environment configuration.
//! - [`telemetry`]: metric names and handles.
//! - [`error_event`]: every ERROR logged and counted in one step.
//! - [`http`]: connection limits and timeouts every HTTP listener keeps.
//! - [`ops`]: the operator's endpoint: `/metrics`, `/healthz`, `POST /provision`.
//! - [`startup`]: wires the stages into a running [`startup::Application`].

pub mod address;
pub mod cluster;
pub mod config;
pub mod dead_letter;
pub mod decode;
pub mod deliver;
pub mod demo;
pub mod disk;
pub mod embedded;
pub mod error_event;
pub mod fax;
pub mod filter;
pub mod http;
pub mod ops;
pub mod partition_log;
pub mod phone;
pub mod pipeline;
pub mod provision;
pub mod render;
pub mod replay;
pub mod resolve;
pub mod source;
pub mod startup;
pub mod state;
pub mod store;
pub mod strict_json;
pub mod telemetry;
pub mod unread;
