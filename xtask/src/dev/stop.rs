//! Stopping `cargo xtask dev` at any moment, and keeping a second one from starting beside it.
//!
//! The signal handler (Ctrl-C, SIGTERM, SIGHUP) is installed before anything starts. Once
//! everything runs, the main loop stops the processes in order. During start-up the main thread
//! may be waiting on a build or a region's health check, so the handler also ends every process
//! descending from this one, again every 200 ms (a region's start is retried, so a new one may
//! appear), until the main thread has cleaned up; the regions run in their own process groups,
//! which are ended whole, so a worker whose parent died first is not left behind. A second
//! signal ends everything at once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STARTING: u8 = 0;
const RUNNING: u8 = 1;
const FINISHED: u8 = 2;

/// How long the handler keeps ending processes while the main thread has not cleaned up.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Stop {
    asked: Arc<AtomicBool>,
    phase: Arc<AtomicU8>,
    groups: Arc<Mutex<BTreeSet<u32>>>,
}

impl Stop {
    /// Installs the handler; from now on a signal stops this process and what it started.
    pub fn install() -> anyhow::Result<Stop> {
        let stop = Stop { asked: Arc::default(), phase: Arc::new(AtomicU8::new(STARTING)), groups: Arc::default() };
        let handler = stop.clone();
        ctrlc::set_handler(move || {
            if handler.asked.swap(true, Ordering::SeqCst) {
                eprintln!("stopping at once");
                handler.sweep("KILL");
                std::process::exit(130);
            }
            if handler.phase.load(Ordering::SeqCst) == STARTING {
                let sweeper = handler.clone();
                std::thread::spawn(move || sweeper.end_start_up());
            }
        })?;
        Ok(stop)
    }

    /// Whether a stop was asked for.
    pub fn asked(&self) -> bool {
        self.asked.load(Ordering::SeqCst)
    }

    /// Fails if a stop was asked for (between start-up steps).
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.asked(), "stopped");
        Ok(())
    }

    /// Start-up is over: from now on the main loop stops the processes itself.
    pub fn running(&self) {
        let _ = self.phase.compare_exchange(STARTING, RUNNING, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The main thread has stopped what it started: ends whatever is left (a region started in
    /// the moment the handler ran), and the handler's work with it.
    pub fn finish(&self) {
        self.phase.store(FINISHED, Ordering::SeqCst);
        self.sweep("KILL");
    }

    /// The handler's work during start-up: end every descendant until the main thread finishes,
    /// or exit after [`GRACE`] should it not.
    fn end_start_up(&self) {
        let deadline = Instant::now() + GRACE;
        while self.phase.load(Ordering::SeqCst) == STARTING {
            if Instant::now() > deadline {
                eprintln!("start-up did not stop within {GRACE:?}; ending everything");
                self.sweep("KILL");
                std::process::exit(130);
            }
            self.sweep("TERM");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends `signal` to every process descending from this one: to its process group when it
    /// has its own (remembered, so members whose parent died are reached later too), else to it.
    fn sweep(&self, signal: &str) {
        let table = processes();
        let own_group = table.iter().find(|p| p.0 == std::process::id()).map_or(0, |p| p.2);
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        for (pid, _, group) in descendants(&table, std::process::id()) {
            if group == own_group {
                kill(signal, &pid.to_string());
            } else {
                groups.insert(group);
            }
        }
        for group in groups.iter() {
            kill(signal, &format!("-{group}"));
        }
    }
}

fn kill(signal: &str, target: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{signal}"), "--", target])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Every process this user can see: (pid, parent pid, process group), from `/proc/<pid>/stat`.
fn processes() -> Vec<(u32, u32, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(1);
            Some((pid, fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
        })
        .collect()
}

/// The processes descending from `root` in `table`.
fn descendants(table: &[(u32, u32, u32)], root: u32) -> Vec<(u32, u32, u32)> {
    let mut found: Vec<(u32, u32, u32)> = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for process in table.iter().filter(|p| p.1 == parent) {
            found.push(*process);
            parents.push(process.0);
        }
    }
    found
}

/// `.keyward/dev.pid` while a `cargo xtask dev` runs; removed when it ends.
pub struct Lock(PathBuf);

impl Lock {
    /// Takes the lock, or fails naming the `cargo xtask dev` that holds it. A lock whose
    /// process is gone (killed before it could remove it) is taken over.
    pub fn take(state: &Path) -> anyhow::Result<Lock> {
        let path = state.join("dev.pid");
        // Written aside, then linked into place: the link fails if the lock exists, and a
        // reader never sees it empty.
        let mine = state.join(format!("dev.pid.{}", std::process::id()));
        std::fs::write(&mine, format!("{}\n", std::process::id()))?;
        let taken = loop {
            match std::fs::hard_link(&mine, &path) {
                Ok(()) => break Ok(Lock(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    match holder.trim().parse::<u32>() {
                        Ok(pid) if is_dev(pid) => {
                            break Err(anyhow::anyhow!(
                                "another `cargo xtask dev` is running (pid {pid}) and holds {}: use it, or stop it \
                             first (Ctrl-C in its terminal, or `kill {pid}`)",
                                state.display()
                            ));
                        }
                        _ => std::fs::remove_file(&path)?,
                    }
                }
                Err(e) => break Err(e.into()),
            }
        };
        let _ = std::fs::remove_file(&mine);
        taken
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether `pid` is a running xtask other than this one (not a process that reused its pid).
fn is_dev(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    pid != std::process::id() && String::from_utf8_lossy(&cmdline).contains("xtask")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_follow_parents() {
        let table = [(10, 1, 10), (11, 10, 11), (12, 11, 11), (13, 1, 13), (14, 12, 11)];
        let mut found: Vec<u32> = descendants(&table, 10).iter().map(|p| p.0).collect();
        found.sort_unstable();
        assert_eq!(found, [11, 12, 14]);
    }

    #[test]
    fn a_lock_of_a_gone_process_is_taken_over_and_a_live_ones_refused() {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(dir.path().join("dev.pid"), "999999999\n").expect("write");
        let lock = Lock::take(dir.path()).expect("a stale lock is taken over");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("dev.pid")).expect("read").trim(),
            std::process::id().to_string()
        );
        drop(lock);
        assert!(!dir.path().join("dev.pid").exists());

        // A live process that looks like an xtask: its lock is refused, naming it.
        let mut other = std::process::Command::new("sleep");
        std::os::unix::process::CommandExt::arg0(&mut other, "xtask-dev-test");
        let mut other = other.arg("30").spawn().expect("sleep");
        // Other tests' processes fork from this one too: wait until this one shows its name.
        let cmdline = format!("/proc/{}/cmdline", other.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !String::from_utf8_lossy(&std::fs::read(&cmdline).unwrap_or_default()).contains("xtask-dev-test") {
            assert!(Instant::now() < deadline, "sleep never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::write(dir.path().join("dev.pid"), format!("{}\n", other.id())).expect("write");
        let refused = Lock::take(dir.path()).map(|_| ()).expect_err("a live lock is refused").to_string();
        let _ = other.kill();
        let _ = other.wait();
        assert!(refused.contains(&format!("another `cargo xtask dev` is running (pid {})", other.id())), "{refused}");
    }
}
