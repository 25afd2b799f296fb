//! Networking helpers shared by the broker and the market: rustls over
//! compio, listeners, the descriptor limit, per-source limits.

pub mod cores;
pub mod fds;
pub mod listen;
pub mod proxy;
pub mod sources;
pub mod tls_io;

use compio::net::{TcpListener, TcpStream};
use futures_util::StreamExt;
use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

/// The first pause after an accept that failed for want of resources; it
/// doubles on each failure in a row, up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Failed accepts: one line a second for the whole process, with a count.
static ACCEPT_FAILED: crate::logs::Throttle = crate::logs::Throttle::new(Duration::from_secs(1));

/// Whether an accept error means the process or the kernel is out of
/// descriptors or memory: retrying at once would fail the same way.
fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts connections (multishot accept) and serves each in its own task,
/// holding at most `max` at once on this core; over the limit a connection
/// is closed before any work is spent on it. `serve` is called at accept
/// and may refuse there (`None`: the connection is closed, no task made),
/// so a burst of connections from a refused source neither spawns tasks
/// nor fills `live` before they could run.
///
/// When accept fails for want of descriptors (EMFILE, ENFILE) or memory,
/// the loop pauses, 5 ms at first and doubling to 100 ms, as Go's net/http
/// does: the pending connections wait in the kernel's backlog instead of
/// the loop spinning on the same error (103% CPU and 4.9 million log lines
/// in 15 s before). Failures are logged once a second with a count.
pub async fn accept_loop<F, Fut>(listener: TcpListener, live: Rc<Cell<usize>>, max: usize, serve: F)
where
    F: Fn(TcpStream) -> Option<Fut>,
    Fut: Future<Output = ()> + 'static,
{
    let mut incoming = listener.incoming();
    let mut backoff = BACKOFF_MIN;
    while let Some(accepted) = incoming.next().await {
        let stream = match accepted {
            Ok(s) => {
                backoff = BACKOFF_MIN;
                s
            }
            Err(e) => {
                let pause = out_of_resources(&e);
                if let Some(suppressed) = ACCEPT_FAILED.pass() {
                    tracing::warn!(error = %e, suppressed, pause_ms = if pause { backoff.as_millis() as u64 } else { 0 }, "accept failed");
                }
                crate::metrics::accept_failed();
                if pause {
                    compio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                continue;
            }
        };
        if live.get() >= max {
            drop(stream);
            crate::metrics::refused_connection();
            continue;
        }
        let Some(fut) = serve(stream) else {
            continue;
        };
        live.set(live.get() + 1);
        let live = live.clone();
        // Boxed where it is made: a connection's future is several KiB,
        // and spawning moved it by value through four frames (perf under
        // `resume`: 40% of the core threads' memcpy). Now a pointer moves.
        let fut = Box::pin(fut);
        compio::runtime::spawn(async move {
            fut.await;
            live.set(live.get() - 1);
        })
        .detach();
    }
}

/// A compio runtime tuned for one core: single issuer, deferred and
/// cooperative task running (docs/DECISIONS.md, "runtime").
/// `cpus`: where to pin the thread (`net::cores`); empty: anywhere.
pub fn core_runtime(
    cpus: std::collections::HashSet<usize>,
) -> std::io::Result<compio::runtime::Runtime> {
    let mut proactor = compio::driver::ProactorBuilder::new();
    proactor
        .capacity(4096)
        .single_issuer(true)
        .defer_taskrun(true)
        .coop_taskrun(true)
        .taskrun_flag(true);
    compio::runtime::RuntimeBuilder::new()
        .with_proactor(proactor)
        .thread_affinity(cpus)
        .build()
}

#[cfg(test)]
mod tests {
    use compio::BufResult;
    use compio::io::{AsyncRead, AsyncWriteExt};
    use std::cell::Cell;
    use std::io::{BufRead, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::rc::Rc;
    use std::time::{Duration, Instant};

    const CHILD: &str = "KEYBROKER_TEST_EMFILE_CHILD";
    const NAME: &str = "net::tests::accept_out_of_descriptors_pauses_and_logs_once_a_second";

    /// The child process: an accept loop with 64 descriptors, each
    /// connection echoing one byte and held until its peer closes.
    fn child() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let hard = getrlimit(Resource::Nofile).maximum;
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(64),
                maximum: hard,
            },
        )
        .unwrap();
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        println!("port {}", l.local_addr().unwrap().port());
        std::io::stdout().flush().unwrap();
        let rt = compio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let l = compio::net::TcpListener::from_std(l).unwrap();
            super::accept_loop(l, Rc::new(Cell::new(0)), 100_000, |mut s| {
                Some(async move {
                    let BufResult(r, b) = s.read(Vec::with_capacity(1)).await;
                    if matches!(r, Ok(n) if n > 0) {
                        let _ = s.write_all(b).await;
                    }
                    let _ = s.read(Vec::with_capacity(1)).await;
                })
            })
            .await;
        });
    }

    struct Kill(Child);

    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn cpu_s(pid: u32) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
    }

    #[test]
    fn accept_out_of_descriptors_pauses_and_logs_once_a_second() {
        if std::env::var_os(CHILD).is_some() {
            return child();
        }
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut c = Kill(
            Command::new(std::env::current_exe().unwrap())
                .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .stdout(Stdio::piped())
                .stderr(log.reopen().unwrap())
                .spawn()
                .unwrap(),
        );
        let pid = c.0.id();
        let port = std::io::BufReader::new(c.0.stdout.take().unwrap())
            .lines()
            // After libtest's "test NAME ... " on the same line.
            .find_map(|l| l.ok()?.split("port ").nth(1)?.trim().parse::<u16>().ok())
            .expect("the child's port");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Four times its descriptors, held: accept fails with EMFILE.
        let flood: Vec<TcpStream> = (0..256)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(20)).ok())
            .collect();
        let logged = || std::fs::read_to_string(log.path()).unwrap();
        let (cpu0, t0, before) = (cpu_s(pid), Instant::now(), logged().len());
        std::thread::sleep(Duration::from_secs(2));
        let cpu = (cpu_s(pid) - cpu0) / t0.elapsed().as_secs_f64();
        let text = logged()[before..].to_owned();
        drop(flood);
        // Once they let go (and the backlog of their closed connections,
        // which dropped new SYNs while full, is drained), a connection is
        // served at once.
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"x").unwrap();
        let mut echo = [0u8; 1];
        s.read_exact(&mut echo).unwrap();
        let served = started.elapsed();
        drop(c);
        let failed: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("accept failed"))
            .collect();
        let suppressed: u64 = failed
            .iter()
            .filter_map(|l| {
                l.split("suppressed=")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        eprintln!(
            "EMFILE: {:.1}% of a core, {} lines ({suppressed} held back), served in {served:?}",
            cpu * 100.0,
            failed.len()
        );
        assert!(
            cpu < 0.2,
            "the accept loop used {:.0}% of a core",
            cpu * 100.0
        );
        assert!(
            !failed.is_empty() && failed[0].contains("Too many open files"),
            "{text}"
        );
        assert!(
            failed.len() <= 4,
            "{} accept-failed lines in 2 s",
            failed.len()
        );
        assert!(suppressed > 0, "nothing was held back: did it pause?");
        assert!(served < Duration::from_secs(1), "served in {served:?}");
    }
}
