//! File descriptors: at start the soft `RLIMIT_NOFILE` is raised to the
//! hard limit, and the connection caps are fitted under it.
//!
//! ```text
//! start ─► soft limit := hard limit ─► need = cores × Σ caps + own files
//!       ─► need ≤ limit: caps as configured
//!       ─► else caps lowered by one factor, with a warning naming both numbers
//!       ─► under MIN_PER_CORE connections a core: refuse to start
//! ```
//!
//! Why lower rather than refuse: a cap the descriptors cannot back is not a
//! cap. With Debian's soft limit of 1,024 and 2 × 20,000 configured, the
//! 1,025th descriptor failed with EMFILE inside `accept`, and the broker's
//! own files (the HSM's token objects, SQLite, the log) could fail the same
//! way. Lowered, a core at its cap closes the next connection at accept,
//! which the accept loop and the tests already handle; the warning tells
//! the operator what to raise. Only a limit too small to serve at all stops
//! the start. EMFILE can still come from outside (another process sharing a
//! limit, a limit lowered at run time): `accept_loop` backs off then.

use anyhow::{Result, bail};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors kept for the process's own files: listeners, io_uring and
/// event fds, the admin port, SQLite files (three per connection, one
/// connection per pool worker), the HSM's token files, the log.
pub const OWN_FILES: u64 = 256;
/// Fewer connections than this a core cannot usefully serve.
pub const MIN_PER_CORE: usize = 16;

/// Raises the soft descriptor limit to the hard one; returns the limit now
/// in force (`u64::MAX` for unlimited).
pub fn raise_nofile() -> u64 {
    let lim = getrlimit(Resource::Nofile);
    let soft = lim.current.unwrap_or(u64::MAX);
    let Some(hard) = lim.maximum else {
        return soft;
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    ) {
        Ok(()) => hard,
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise RLIMIT_NOFILE");
            soft
        }
    }
}

/// The per-core `caps`, lowered by one factor if `cores × Σ caps + own`
/// descriptors exceed `limit`.
pub fn fit(limit: u64, own: u64, cores: usize, caps: &[usize]) -> Result<Vec<usize>> {
    let per_core: u64 = caps.iter().map(|&c| c as u64).sum();
    let need = own.saturating_add(per_core.saturating_mul(cores as u64));
    if need <= limit {
        return Ok(caps.to_vec());
    }
    let room = limit.saturating_sub(own) / cores.max(1) as u64;
    if room < (MIN_PER_CORE * caps.len()) as u64 {
        bail!(
            "RLIMIT_NOFILE is {limit} (after raising the soft limit to the hard one); \
             at least {} are needed ({own} for the process's own files and {} connections \
             on each of {cores} cores): raise LimitNOFILE (systemd) or `ulimit -n`",
            own + (MIN_PER_CORE * caps.len() * cores) as u64,
            MIN_PER_CORE * caps.len()
        );
    }
    Ok(caps
        .iter()
        .map(|&c| ((c as u64 * room / per_core) as usize).max(MIN_PER_CORE))
        .collect())
}

/// Raises the limit, fits the named per-core caps under it, and says so
/// when one is lowered. `own_extra`: descriptors needed beyond
/// [`OWN_FILES`] (the broker's market links).
pub fn fit_caps(cores: usize, own_extra: u64, caps: &[(&str, usize)]) -> Result<Vec<usize>> {
    let limit = raise_nofile();
    let own = OWN_FILES + own_extra;
    let wanted: Vec<usize> = caps.iter().map(|&(_, c)| c).collect();
    let got = fit(limit, own, cores, &wanted)?;
    for ((name, want), have) in caps.iter().zip(&got) {
        if have < want {
            tracing::warn!(
                rlimit_nofile = limit,
                needed = own + wanted.iter().sum::<usize>() as u64 * cores as u64,
                "lowered {name} from {want} to {have} to fit the descriptor limit; \
                 raise LimitNOFILE to keep {want}"
            );
        }
    }
    tracing::info!(rlimit_nofile = limit, "descriptor limit");
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_that_fit_are_kept() {
        assert_eq!(fit(100_000, 256, 2, &[20_000]).unwrap(), vec![20_000]);
    }

    #[test]
    fn caps_over_the_limit_are_lowered_by_one_factor() {
        // Debian's default soft limit and the default caps of the market.
        let got = fit(1024, 256, 2, &[1024, 10_000]).unwrap();
        assert!(got[0] < 1024 && got[1] < 10_000);
        assert!(256 + 2 * (got[0] + got[1]) as u64 <= 1024, "{got:?}");
        assert!(got[1] > got[0], "the larger cap stays the larger");
    }

    #[test]
    fn a_limit_too_small_to_serve_is_refused_with_the_numbers() {
        let e = fit(280, 256, 2, &[20_000]).unwrap_err().to_string();
        assert!(e.contains("RLIMIT_NOFILE is 280"), "{e}");
        assert!(e.contains("at least 288"), "{e}");
    }

    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_one() {
        let now = raise_nofile();
        let lim = getrlimit(Resource::Nofile);
        assert_eq!(lim.current.unwrap_or(u64::MAX), now);
        assert_eq!(lim.current, lim.maximum);
    }
}
