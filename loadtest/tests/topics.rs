//! A run on the user's brokers (`--brokers`) creates topics of its own there: they go
//! when it ends. A broker outlives the run, and each run left six topics behind (a
//! `state` run 10 000 000 records in a compacted one, which retention never removes).

use std::process::Stdio;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

mod common;

/// The topic names on `brokers`.
fn topics(brokers: &str) -> Vec<String> {
    let client: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let metadata = client.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    metadata.topics().iter().map(|t| t.name().to_owned()).collect()
}

#[test]
#[ignore = "needs Apache Kafka: run by scripts/integration.sh"]
fn a_run_on_given_brokers_removes_the_topics_it_created() {
    let brokers = std::env::var("CALLNOTIFY_IT_BROKERS").expect("CALLNOTIFY_IT_BROKERS (scripts/integration.sh)");
    let dir = tempfile::tempdir().unwrap();
    let args = ["run", "--brokers", &brokers, "--numbers", "200", "--rate", "50", "--duration", "2s", "--quiet"];
    let child = common::loadtest(dir.path(), &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Its topics are named STEM-PID-RANDOM.
    let run = format!("-{}-", child.id());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/report.json")).unwrap()).unwrap();
    assert!(report["cdrs_produced"].as_u64() > Some(0), "the run used the broker's topics: {report}");
    // The broker's metadata may trail a deletion it has confirmed by a moment.
    let left = || topics(&brokers).into_iter().filter(|t| t.contains(&run)).collect::<Vec<_>>();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !left().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(left().is_empty(), "topics of the run left on the broker: {:?}\n{stderr}", left());
}
