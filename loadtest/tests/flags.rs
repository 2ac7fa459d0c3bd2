//! Flags a mode would not honour are refused before anything starts, naming the flag:
//! `--partitions 0` failed deep inside the topic creation (and -1 took the broker's
//! default on Apache Kafka), and `--metrics-listen` was silently replaced in `ingest`
//! and `smtp`, whose engines each take a port of their own. Values the engine refuses
//! (`--consumers 0`) are refused as flags.

mod common;

#[test]
fn flags_a_mode_would_not_honour_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    for (args, named) in [
        (&["run", "--partitions", "0"][..], "--partitions"),
        (&["ingest", "--metrics-listen", "127.0.0.1:9187"][..], "--metrics-listen"),
        (&["smtp", "--metrics-listen", "127.0.0.1:9187"][..], "--metrics-listen"),
        // Values the engine refuses: named by the flag, not by the engine's key after
        // the store was seeded (and `ingest --consumers 0` measured a baseline of none).
        (&["run", "--consumers", "0"][..], "--consumers"),
        (&["ingest", "--consumers", "65"][..], "--consumers"),
        (&["run", "--pool-size", "0"][..], "--pool-size"),
        (&["run", "--cache-capacity", "100000001"][..], "--cache-capacity"),
        (&["smtp", "--sessions", "1001"][..], "--sessions"),
    ] {
        let out = common::loadtest(dir.path(), args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(!dir.path().join("work").join("engine.log").exists(), "{args:?}: an engine was started");
    }
}
