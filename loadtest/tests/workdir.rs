//! A run not given `--workdir` works in a directory of its own under the temporary
//! directory: removed when the run succeeds, kept and named when it fails (for the
//! engine's log). Named by the process id alone, a run after a failed one of the same id
//! (a load tester in a container is often process 1) measured on the store the failed
//! run left.

use std::path::Path;
use std::process::Command;

/// `callnotify-loadtest` with `args` and no `--workdir`, its temporary directory `tmp`.
fn loadtest(tmp: &Path, out: &Path, args: &[&str]) -> Command {
    let loadtest = env!("CARGO_BIN_EXE_callnotify-loadtest");
    let mut command = Command::new(loadtest);
    command.args(args).arg("--out").arg(out).env("TMPDIR", tmp);
    command
}

/// The work directories the load tester left in `tmp`.
fn left(tmp: &Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("callnotify-loadtest-"))
        .collect()
}

#[test]
fn a_run_without_workdir_keeps_its_directory_only_when_it_fails() {
    let (tmp, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let engine = Path::new(env!("CARGO_BIN_EXE_callnotify-loadtest")).with_file_name("callnotify");
    let engine = engine.to_str().unwrap();

    // An engine that cannot start: the run fails and names the directory it keeps.
    let failed =
        loadtest(tmp.path(), out.path(), &["run", "--numbers", "200", "--engine", "/bin/false"]).output().unwrap();
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{said}");
    let kept = left(tmp.path());
    assert_eq!(kept.len(), 1, "{said}");
    assert!(said.contains(&kept[0]), "the directory kept is named: {said}");

    // The next run has a directory of its own, and leaves nothing once it succeeds.
    let args = ["run", "--numbers", "200", "--rate", "50", "--duration", "1s", "--quiet", "--engine", engine];
    let run = loadtest(tmp.path(), out.path(), &args).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(left(tmp.path()), kept, "only the failed run's directory is left");
}

/// A `--workdir` and an `--engine` given relative to where the load tester runs: the
/// engine runs in the work directory, and was handed both paths as typed (its store and
/// the import file under `lt/lt/…`, itself not found there): every mode failed.
#[test]
fn a_relative_workdir_and_engine_are_read_from_where_the_run_started() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Path::new(env!("CARGO_BIN_EXE_callnotify-loadtest")).with_file_name("callnotify");
    std::fs::create_dir(dir.path().join("bin")).unwrap();
    std::os::unix::fs::symlink(&engine, dir.path().join("bin/callnotify")).unwrap();
    let args = ["run", "--numbers", "200", "--rate", "50", "--duration", "1s", "--quiet"];
    let run = Command::new(env!("CARGO_BIN_EXE_callnotify-loadtest"))
        .args(args)
        .args(["--workdir", "lt", "--engine", "bin/callnotify", "--out", "out"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(dir.path().join("lt/seeded").exists(), "the store is in the work directory given");
    assert!(dir.path().join("out").exists(), "the report is where it was asked for");
}
