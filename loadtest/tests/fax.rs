//! `run --fax` (docs/load-testing.md): the load tester predicts each fax mail by the
//! Message-ID the engine gives it, so every fax mail is matched, none lost or unexpected.

mod common;

#[test]
fn a_run_with_faxes_matches_every_fax_mail_it_expects() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["run", "--numbers", "2000", "--rate", "200", "--fax", "0.2", "--duration", "3s", "--quiet"];
    let out = common::loadtest(dir.path(), &args).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/report.json")).unwrap()).unwrap();
    assert!(report["faxes_produced"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["mails_received"], report["mails_expected"], "{report}");
    assert_eq!(report["unexpected"], 0, "{report}");
}

/// Flat out with faxes (14 KB a record) and a lead the mock cluster cannot hold (5 MB a
/// partition): the broker drops the oldest before the engine reads them, and the run
/// blamed the engine ("the engine had not consumed N CDRs"). It names the broker's
/// drop, with what to change.
#[test]
fn a_run_whose_cdrs_the_mock_cluster_dropped_says_so_not_that_the_engine_fell_behind() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "run",
        "--numbers",
        "200",
        "--fax",
        "1",
        "--count",
        "1500",
        "--max-lead",
        "5000",
        "--partitions",
        "1",
        "--drain",
        "5s",
        "--quiet",
    ];
    let out = common::loadtest(dir.path(), &args).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("the mock cluster dropped"), "{said}");
    assert!(!said.contains("the engine had not consumed"), "{said}");
}
