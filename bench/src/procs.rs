//! Child processes (broker, market) with kill-on-drop guards, and their CPU
//! and memory read from /proc.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// A running child that is killed when dropped (also on panic).
pub struct Guard {
    pub child: Child,
}

impl Guard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd`, reads its first stdout line `listening A <word> B`, and
/// returns the guard and the two addresses.
pub fn spawn_listening(
    name: &str,
    mut cmd: Command,
    log: &std::path::Path,
) -> Result<(Guard, SocketAddr, SocketAddr)> {
    cmd.stdout(Stdio::piped())
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?);
    let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
    let mut g = Guard { child };
    let mut line = String::new();
    BufReader::new(g.child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let parts: Vec<&str> = line.split_whitespace().collect();
    if parts.len() != 4 || parts[0] != "listening" {
        bail!(
            "{name} did not start (first line {line:?}); see {}",
            log.display()
        );
    }
    Ok((g, parts[1].parse()?, parts[3].parse()?))
}

/// CPU time of every thread of a process, from /proc/<pid>/task/*/schedstat
/// (nanoseconds), plus the process total from /proc/<pid>/stat (ticks).
#[derive(Clone, Debug, Default)]
pub struct CpuSnap {
    /// tid -> (thread name, ns on CPU)
    threads: BTreeMap<u32, (String, u64)>,
    /// utime + stime of the whole process, in clock ticks (1/100 s).
    stat_ticks: u64,
}

/// CPU used between two snapshots.
#[derive(Clone, Debug, Default)]
pub struct CpuDelta {
    /// Sum over threads (schedstat), seconds.
    pub total_s: f64,
    /// utime + stime delta of the process, seconds (10 ms resolution).
    pub stat_s: f64,
    /// Per thread group (name without its `-N` suffix), seconds.
    pub groups: BTreeMap<String, f64>,
}

impl CpuDelta {
    pub fn group(&self, g: &str) -> f64 {
        self.groups.get(g).copied().unwrap_or(0.0)
    }
}

/// Seconds between two readings of a clock-tick counter (1/100 s, as
/// /proc/<pid>/stat and /proc/stat count).
pub fn ticks_s(before: u64, after: u64) -> f64 {
    after.saturating_sub(before) as f64 / 100.0
}

/// utime + stime of a whole process, clock ticks (1/100 s), from
/// /proc/<pid>/stat; threads that have ended are included.
pub fn stat_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    // After ")": state(3) ppid(4) ... utime(14) stime(15): indexes 11, 12.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

pub fn cpu_snap(pid: u32) -> CpuSnap {
    let mut s = CpuSnap {
        stat_ticks: stat_ticks(pid),
        ..Default::default()
    };
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let p = e.path();
            let comm = std::fs::read_to_string(p.join("comm"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            let ns = std::fs::read_to_string(p.join("schedstat"))
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            s.threads.insert(tid, (comm, ns));
        }
    }
    s
}

fn group_of(comm: &str) -> String {
    match comm.rsplit_once('-') {
        Some((g, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => g.to_owned(),
        _ => comm.to_owned(),
    }
}

pub fn cpu_delta(a: &CpuSnap, b: &CpuSnap) -> CpuDelta {
    let mut d = CpuDelta {
        stat_s: ticks_s(a.stat_ticks, b.stat_ticks),
        ..Default::default()
    };
    for (tid, (comm, ns)) in &b.threads {
        let before = a.threads.get(tid).map_or(0, |(_, n)| *n);
        let s = ns.saturating_sub(before) as f64 / 1e9;
        d.total_s += s;
        *d.groups.entry(group_of(comm)).or_default() += s;
    }
    d
}

/// CPU of a process and its direct children (PostgreSQL: the postmaster
/// and its backends), pid -> ns on CPU from /proc/<pid>/schedstat (the
/// backends are single-threaded).
pub fn tree_snap(root: u32) -> BTreeMap<u32, u64> {
    let ns = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
    };
    let mut m = BTreeMap::new();
    if let Some(n) = ns(root) {
        m.insert(root, n);
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let ppid = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|t| {
                t.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u32>()
                    .ok()
            });
        if ppid == Some(root)
            && let Some(n) = ns(pid)
        {
            m.insert(pid, n);
        }
    }
    m
}

/// Seconds of CPU between two [`tree_snap`]s (a process that exited in
/// between is not counted).
pub fn tree_delta_s(a: &BTreeMap<u32, u64>, b: &BTreeMap<u32, u64>) -> f64 {
    b.iter()
        .map(|(pid, n)| n.saturating_sub(a.get(pid).copied().unwrap_or(0)))
        .sum::<u64>() as f64
        / 1e9
}

/// The whole machine's CPU clock ticks from the `cpu` line of /proc/stat.
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineSnap {
    /// user, nice, system, irq, softirq and steal.
    busy: u64,
    /// busy plus idle and iowait.
    total: u64,
}

pub fn machine_snap() -> MachineSnap {
    let line = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = line
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    MachineSnap {
        busy,
        total: busy + get(3) + get(4),
    }
}

/// Busy CPU-seconds of the machine between two snapshots, and the busy
/// share of all its CPUs (0..1).
pub fn machine_delta(a: &MachineSnap, b: &MachineSnap) -> (f64, f64) {
    let busy = b.busy.saturating_sub(a.busy);
    let total = b.total.saturating_sub(a.total).max(1);
    (ticks_s(a.busy, b.busy), busy as f64 / total as f64)
}

/// VmRSS of a process, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_groups_strip_the_index() {
        assert_eq!(group_of("core-0"), "core");
        assert_eq!(group_of("auth-12"), "auth");
        assert_eq!(group_of("hsm-monitor"), "hsm-monitor");
        assert_eq!(group_of("admin"), "admin");
    }

    #[test]
    fn the_machine_counts_a_busy_loop() {
        let a = machine_snap();
        let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
        let mut x = 0u64;
        while std::time::Instant::now() < until {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let (busy_s, share) = machine_delta(&a, &machine_snap());
        assert!(x > 0);
        assert!(busy_s >= 0.2, "busy {busy_s} s");
        assert!(share > 0.0 && share <= 1.0, "share {share}");
    }

    #[test]
    fn own_process_has_cpu_and_rss() {
        let pid = std::process::id();
        let a = cpu_snap(pid);
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = cpu_snap(pid);
        assert!(cpu_delta(&a, &b).total_s > 0.0);
        assert!(rss_bytes(pid) > 0);
    }
}
