//! The whole path: Kafka (librdkafka's mock cluster) → engine → a real SMTP server.
//! One test binary; `helpers` gives each test its own cluster, sink and store.

mod age;
mod cluster;
mod consumers;
mod dead_letters;
mod delivery;
mod fax;
mod formats;
mod helpers;
mod metrics;
mod provision;
mod restart;
mod rules;
