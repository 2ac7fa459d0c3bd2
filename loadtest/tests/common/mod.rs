//! What the load tester's tests share: the binaries `cargo test --workspace` builds.

use std::path::Path;
use std::process::Command;

/// `callnotify-loadtest` with `args`, its work directory `dir/work`, its report in
/// `dir/out` and the workspace's `callnotify` as its engine.
pub fn loadtest(dir: &Path, args: &[&str]) -> Command {
    let loadtest = env!("CARGO_BIN_EXE_callnotify-loadtest");
    let engine = Path::new(loadtest).with_file_name("callnotify");
    assert!(engine.exists(), "{} is built by `cargo test --workspace` (or `cargo build`)", engine.display());
    let mut command = Command::new(loadtest);
    command
        .args(args)
        .arg("--workdir")
        .arg(dir.join("work"))
        .arg("--out")
        .arg(dir.join("out"))
        .arg("--engine")
        .arg(engine);
    command
}
