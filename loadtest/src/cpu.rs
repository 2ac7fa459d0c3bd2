//! How busy the machine was while one side of a round ran: `/proc/stat` and this
//! process's `/proc/self/stat`, read every 10 ms by a thread of their own. A round that
//! says the machine's cores were all busy while the engine read tells a load tester the
//! machine, not waiting, was the limit; one that says they were half idle points at
//! waiting (on the broker, on a lock, on the mail server).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Kernel clock ticks per second in `/proc` (USER_HZ), 100 on Linux.
pub const TICKS_PER_S: f64 = 100.0;
const EVERY: Duration = Duration::from_millis(10);

/// Cores in use on average over a span, as in `top`: 1.5 is one and a half cores.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Busy {
    /// The whole machine: every process, the kernel's interrupts included.
    pub machine: f64,
    /// The load tester's own process: its bare consumers or SMTP sink, and the mock
    /// cluster when it runs embedded.
    pub load_tester: f64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    machine_ticks: u64,
    own_ticks: u64,
}

pub struct CpuSampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CpuSampler {
    pub fn start() -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("cpu-sampler".into())
            .spawn({
                let (samples, stop) = (Arc::clone(&samples), Arc::clone(&stop));
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(sample) = read() {
                            samples.lock().expect("cpu samples").push(sample);
                        }
                        std::thread::sleep(EVERY);
                    }
                }
            })
            .expect("starting the cpu sampler");
        Self { samples, stop, thread: Some(thread) }
    }

    /// Cores busy over `from..to`, widened to the samples around it; `None` when the
    /// span has no sample on both sides yet (or `/proc` cannot be read).
    pub async fn busy(&self, from: Instant, to: Instant) -> Option<Busy> {
        // The span's end may be newer than the newest sample: wait for the next one.
        let deadline = Instant::now() + 5 * EVERY;
        loop {
            {
                let samples = self.samples.lock().expect("cpu samples");
                if samples.last().is_some_and(|s| s.at >= to) || Instant::now() > deadline {
                    return busy_over(&samples, from, to);
                }
            }
            tokio::time::sleep(EVERY).await;
        }
    }
}

impl Drop for CpuSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn read() -> Option<Sample> {
    let at = Instant::now();
    let machine_ticks = machine_busy_ticks(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let own_ticks = process_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    Some(Sample { at, machine_ticks, own_ticks })
}

/// Busy ticks of all cores together from `/proc/stat`'s `cpu` line: user, nice, system,
/// irq and softirq; not idle, iowait, or steal (time the hypervisor gave elsewhere).
fn machine_busy_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat.lines().next()?.strip_prefix("cpu ")?.split_whitespace().map(str::parse::<u64>);
    let mut field = || fields.next()?.ok();
    let (user, nice, system, _idle, _iowait, irq, softirq) =
        (field()?, field()?, field()?, field()?, field()?, field()?, field()?);
    Some(user + nice + system + irq + softirq)
}

/// utime + stime of a `/proc/PID/stat` line.
pub fn process_ticks(stat: &str) -> Option<u64> {
    // The command in parentheses may hold spaces; utime and stime are the 12th and 13th
    // fields after it.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
}

/// The kernel counts CPU time in 10 ms ticks, each to one thread and one core: over a
/// shorter window than this the figures say little (a process could show more than the
/// whole machine).
const SHORTEST: Duration = Duration::from_millis(200);

/// Cores busy from the last sample at or before `from` to the first at or after `to`;
/// `None` for a window shorter than [`SHORTEST`].
fn busy_over(samples: &[Sample], from: Instant, to: Instant) -> Option<Busy> {
    let start = samples.iter().rev().find(|s| s.at <= from)?;
    let end = samples.iter().find(|s| s.at >= to)?;
    if end.at - start.at < SHORTEST {
        return None;
    }
    let seconds = (end.at - start.at).as_secs_f64();
    let cores = |ticks: u64| ticks as f64 / TICKS_PER_S / seconds;
    Some(Busy {
        machine: cores(end.machine_ticks - start.machine_ticks),
        load_tester: cores(end.own_ticks - start.own_ticks),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_s_busy_ticks_leave_out_idle_iowait_and_steal() {
        let stat = "cpu  100 2 30 5000 40 6 7 800 0 0\ncpu0 50 1 15 2500 20 3 3 400 0 0\nintr 1\n";
        assert_eq!(machine_busy_ticks(stat), Some(100 + 2 + 30 + 6 + 7));
        assert_eq!(machine_busy_ticks("intr 1\n"), None);
    }

    #[test]
    fn a_process_s_ticks_are_read_past_a_command_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (x) y) S 1 4242 4242 0 -1 4194304 500 0 0 0 1234 567 0 0 20 0 9 0 100 0 0";
        assert_eq!(process_ticks(stat), Some(1234 + 567));
    }

    #[test]
    fn busy_cores_are_ticks_over_the_samples_around_the_span() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Two cores flat out (200 ticks a second) from 0 to 1 s, this process at one.
        let samples: Vec<Sample> = [0, 500, 1000, 1500]
            .into_iter()
            .map(|ms| Sample { at: at(ms), machine_ticks: ms / 5, own_ticks: ms / 10 })
            .collect();
        let busy = busy_over(&samples, at(100), at(900)).unwrap();
        assert!((busy.machine - 2.0).abs() < 1e-9, "{busy:?}");
        assert!((busy.load_tester - 1.0).abs() < 1e-9, "{busy:?}");
        // Not yet sampled after the span's end.
        assert_eq!(busy_over(&samples, at(100), at(1600)), None);
        // Samples 10 ms apart: a 30 ms span says nothing, a 300 ms one does.
        let close: Vec<Sample> =
            (0..=40).map(|i| Sample { at: at(i * 10), machine_ticks: i * 2, own_ticks: i }).collect();
        assert_eq!(busy_over(&close, at(15), at(45)), None);
        let busy = busy_over(&close, at(15), at(315)).unwrap();
        assert!((busy.machine - 2.0).abs() < 1e-9, "{busy:?}");
    }
}
