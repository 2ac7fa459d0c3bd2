//! A load test stopped from outside (Ctrl-C, SIGTERM from a script's timeout) stops the
//! engine it started: the engine is its child, and an orphan would keep running, holding
//! its store and ports, until someone finds it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

/// The pids of the running `callnotify serve` processes whose parent is `parent`.
fn engines_of(parent: u32) -> Vec<u32> {
    children_running(parent, b"serve")
}

/// The pids of `parent`'s children with `arg` among their arguments.
fn children_running(parent: u32, arg: &[u8]) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: the comm may hold spaces, so read after its ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let named = cmdline.split(|b| *b == 0).any(|given| given == arg);
        if ppid == Some(parent) && named {
            found.push(pid);
        }
    }
    found
}

/// Sends `run` SIGTERM and waits up to 20 s for it to end (killed if it has not):
/// whether it ended by itself.
fn terminate(run: &mut std::process::Child) -> bool {
    assert!(Command::new("kill").args(["-TERM", &run.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while run.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ended = run.try_wait().unwrap().is_some();
    if !ended {
        let _ = run.kill();
    }
    ended
}

/// Whether `pid` still runs (a zombie has ended).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// `callnotify-loadtest run` of 2 000 numbers at 100 CDR/s for `timing` (`--duration`,
/// `--drain`), its work directory `dir/work`, its standard error piped.
fn start_run(dir: &std::path::Path, timing: &[&str]) -> std::process::Child {
    start_run_of(dir, 2000, timing)
}

/// [`start_run`] of `numbers` numbers.
fn start_run_of(dir: &std::path::Path, numbers: u32, timing: &[&str]) -> std::process::Child {
    common::loadtest(dir, &["run", "--numbers", &numbers.to_string(), "--rate", "100", "--quiet"])
        .args(timing)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_load_test_stopped_by_sigterm_stops_the_engine_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = start_run(dir.path(), &["--duration", "10m"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let engines = loop {
        let engines = engines_of(run.id());
        if !engines.is_empty() {
            break engines;
        }
        assert!(Instant::now() < deadline, "the load test never started its engine");
        assert!(run.try_wait().unwrap().is_none(), "the load test ended before its engine started");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(Command::new("kill").args(["-TERM", &run.id().to_string()]).status().unwrap().success());
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stopped run is no success: {stderr}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while engines.iter().any(|pid| running(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = engines.into_iter().filter(|pid| running(*pid)).collect();
    for pid in &left {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    assert!(left.is_empty(), "engines left running after the load test stopped: {left:?}; {stderr}");
    assert!(stderr.contains("stopped by SIGTERM"), "it says why it stopped: {stderr}");
    // The --workdir given, where the engine's log is: named, and kept.
    let work = dir.path().join("work");
    assert!(stderr.contains(&format!("kept in {}", work.display())), "it names the work directory: {stderr}");
    assert!(work.join("engine.log").exists());
}

/// docs/load-testing.md: every run stops by itself. An engine that hangs (here stopped
/// with SIGSTOP once it served) held the load test for ever: its `/metrics` accepted the
/// connection and never answered, and its stop was waited for without end. Now the run
/// ends with an error that says so, and the engine is killed.
#[test]
fn a_load_test_whose_engine_hangs_ends_by_itself_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let mut run = start_run(dir.path(), &["--duration", "5s", "--drain", "3s"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    // Serving: the engine's log names its metrics endpoint, and it answers there.
    let serving = || {
        let log = std::fs::read_to_string(work.join("engine.log")).unwrap_or_default();
        let line = log.lines().find(|l| l.contains("metrics endpoint listening"))?;
        let at = line.find("http://")? + "http://".len();
        let addr: std::net::SocketAddr = line[at..].split('/').next()?.parse().ok()?;
        let mut stream = std::net::TcpStream::connect(addr).ok()?;
        std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").ok()?;
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).ok()?;
        answer.starts_with("HTTP/1.1 200").then_some(())
    };
    while serving().is_none() {
        assert!(Instant::now() < deadline, "the engine never served");
        assert!(run.try_wait().unwrap().is_none(), "the load test ended before its engine served");
        std::thread::sleep(Duration::from_millis(100));
    }
    let engines = engines_of(run.id());
    assert_eq!(engines.len(), 1);
    assert!(Command::new("kill").args(["-STOP", &engines[0].to_string()]).status().unwrap().success());

    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            let _ = Command::new("kill").args(["-KILL", &engines[0].to_string()]).status();
            panic!("the load test did not end by itself with its engine hung");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "a run whose engine hung is no success: {stderr}");
    assert!(stderr.contains("did not"), "it says what did not answer or stop: {stderr}");
    assert!(!running(engines[0]), "the hung engine is killed: {stderr}");
}

/// A stop during an import (seeding here; `state`'s imports through a node take
/// minutes at carrier scale) stops the load tester at once and the import with it: the
/// signal was seen only once the import had ended, so a script's `timeout` killed the
/// load tester and left what it had started running.
#[test]
fn a_load_test_stopped_during_an_import_stops_it_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // Large enough that the seeding import (a debug build) is still under way when
    // the signal comes.
    let mut run = start_run_of(dir.path(), 400_000, &["--duration", "10s"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let import = loop {
        if let Some(&pid) = children_running(run.id(), b"provision").first() {
            break pid;
        }
        assert!(Instant::now() < deadline, "the load test never started its import");
        assert!(run.try_wait().unwrap().is_none(), "the load test ended before its import started");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(Command::new("kill").args(["-TERM", &run.id().to_string()]).status().unwrap().success());
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    let seeded = dir.path().join("work").join("seeded");
    assert!(!seeded.exists(), "the load tester waited for the import to end before it stopped: {stderr}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(import) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = running(import);
    if left {
        let _ = Command::new("kill").args(["-KILL", &import.to_string()]).status();
    }
    assert!(!left, "the import was left running: {stderr}");
}

/// `smtp`: smtp-source was waited for on the runtime's thread, so a SIGTERM during it
/// was not acted on until it ended, and one that hung kept the load test (and its
/// smtp-sink and engine) running for good. Here postfix's tools are stand-ins: a sink
/// that only accepts connections, and a source that never ends.
#[test]
fn a_load_test_stopped_while_smtp_source_runs_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("postfix");
    std::fs::create_dir_all(&bin).unwrap();
    let sink = "#!/usr/bin/env python3\n\
                import socket, sys\n\
                host, port = [a for a in sys.argv[1:] if ':' in a][0].rsplit(':', 1)\n\
                s = socket.socket()\n\
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                s.bind((host, int(port)))\n\
                s.listen(64)\n\
                held = []\n\
                while True:\n    held.append(s.accept()[0])\n";
    let source = "#!/bin/sh\nexec sleep 3600\n";
    for (name, script) in [("smtp-sink", sink), ("smtp-source", source)] {
        let path = bin.join(name);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let postfix = bin.to_str().unwrap();
    let args = ["smtp", "--numbers", "1000", "--mails", "100", "--rounds", "1", "--postfix-bin", postfix];
    let mut run = common::loadtest(dir.path(), &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let source = loop {
        if let Some(&pid) = children_running(run.id(), b"3600").first() {
            break pid;
        }
        assert!(Instant::now() < deadline, "the load test never started smtp-source");
        assert!(run.try_wait().unwrap().is_none(), "the load test ended before smtp-source started");
        std::thread::sleep(Duration::from_millis(20));
    };
    let ended = terminate(&mut run);
    let _ = Command::new("kill").args(["-KILL", &source.to_string()]).status();
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(ended, "the load test did not stop within 20 s of its SIGTERM: {stderr}");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
}

/// A stop while the load tester fills a topic before the engine starts (`ingest`'s
/// CDRs, on the mock cluster before its first wait) is acted on at once: the filling
/// blocked the thread that watches for the stop, and went on to its end (minutes for
/// a large `--count`) before the run stopped.
#[test]
fn a_load_test_stopped_while_it_fills_a_topic_stops_at_once() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let args = ["ingest", "--numbers", "1000", "--count", "20000000", "--partitions", "1", "--rounds", "1"];
    let mut run = common::loadtest(dir.path(), &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut said = BufReader::new(run.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("producing") {
        line.clear();
        assert!(said.read_line(&mut line).unwrap() > 0, "the load test ended before it filled its topic");
    }
    let ended = terminate(&mut run);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut said, &mut rest).unwrap();
    assert!(ended, "the load test did not stop within 20 s of its SIGTERM");
    assert!(rest.contains("stopped by SIGTERM"), "{rest}");
}
