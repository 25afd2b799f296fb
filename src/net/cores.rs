//! Core threads pinned one to a CPU, and each new connection steered to the
//! core on the CPU whose kernel took its SYN.
//!
//! On this VM a thread waking a sleeping thread on the other CPU costs
//! about 17 µs of CPU (the floor's `thread_wakeup_process_cpu`): an IPI to
//! a halted vCPU. Left to the scheduler and to SO_REUSEPORT's hash, a
//! terminal, the broker core serving it and the market thread serving that
//! core sit on any CPU, and most hops between them pay that wake-up. Pinned
//! and steered, a connection lands on the core of the CPU its peer sent
//! from: the broker core's market link (dialled from a pinned core) on the
//! market thread of the same CPU, a terminal on the core of the CPU it ran
//! on when it connected. Hops between them then wake a thread on the same
//! CPU, which costs a few microseconds.
//!
//! The steering is a classic BPF program on the reuseport group: it
//! returns `cpu % n`, the index of the listener to use. It only holds when
//! listener i belongs to the core pinned to CPU i, so both are done only
//! when the process may run on exactly CPUs 0..n-1 and has n cores;
//! otherwise the scheduler and the hash decide, as before.

use std::collections::HashSet;

/// Where each core runs and whether connections are steered.
#[derive(Clone, Debug)]
pub struct Placement {
    pinned: bool,
}

impl Placement {
    /// The placement for `cores` core threads in this process; `wanted`:
    /// the config's `pin_cores`.
    pub fn for_cores(cores: usize, wanted: bool) -> Self {
        let pinned =
            wanted && allowed_cpus().is_some_and(|cpus| cpus == (0..cores).collect::<Vec<_>>());
        Self { pinned }
    }

    /// Whether the listeners steer by CPU (and the cores are pinned).
    pub fn steered(&self) -> bool {
        self.pinned
    }

    /// The CPU set core `i` is pinned to; empty: not pinned.
    pub fn cpus_of(&self, core: usize) -> HashSet<usize> {
        if self.pinned {
            HashSet::from([core])
        } else {
            HashSet::new()
        }
    }
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Option<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None).ok()?;
    Some(
        (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_only_when_cores_match_the_allowed_cpus() {
        let n = allowed_cpus().unwrap().len();
        let more = Placement::for_cores(n + 1, true);
        assert!(!more.steered());
        assert!(more.cpus_of(0).is_empty());
        let off = Placement::for_cores(n, false);
        assert!(!off.steered());
        // A test runner may restrict the CPUs (taskset): then nothing pins.
        let all = Placement::for_cores(n, true);
        let contiguous = allowed_cpus().unwrap() == (0..n).collect::<Vec<_>>();
        assert_eq!(all.steered(), contiguous);
        if contiguous {
            assert_eq!(all.cpus_of(n - 1), HashSet::from([n - 1]));
        }
    }
}
