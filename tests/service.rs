//! What systemd hears from the broker (issue 23): READY once it listens,
//! WATCHDOG pings while its cores turn, RELOADING then READY around a
//! SIGHUP, STOPPING at SIGTERM; read from a real notification socket, the
//! one systemd would pass in NOTIFY_SOCKET. And with `--json-logs`, a
//! fatal error is a JSON line too.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;

/// The next notification that contains `what`, skipping others (STATUS
/// lines, pings); at most `n` datagrams, each within TIMEOUT.
fn expect(sock: &UnixDatagram, what: &str, n: usize) -> String {
    let mut buf = [0u8; 4096];
    for _ in 0..n {
        let len = sock
            .recv(&mut buf)
            .expect("a notification within the timeout");
        let msg = String::from_utf8_lossy(&buf[..len]).into_owned();
        if msg.lines().any(|l| l == what) {
            return msg;
        }
    }
    panic!("no {what} in {n} notifications");
}

#[test]
fn systemd_is_told_ready_reloading_stopping_and_pinged_while_cores_turn() {
    let env = Env::new("");
    let path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    // systemd sets WATCHDOG_PID to the service's pid: `exec` keeps the
    // shell's.
    let inner = env.cmd(&["serve"]);
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
        .arg(inner.get_program())
        .args(inner.get_args())
        .env_remove("SOFTHSM2_CONF")
        .env_remove("KEYBROKER_HSM_PIN")
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "2000000")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening "), "{line:?}");
    let ready = expect(&sock, "READY=1", 10);
    assert!(ready.contains("STATUS=listening 127.0.0.1:"), "{ready:?}");
    // WatchdogSec=2s: a ping every second while both cores beat.
    expect(&sock, "WATCHDOG=1", 10);
    expect(&sock, "WATCHDOG=1", 10);

    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    let reloading = expect(&sock, "RELOADING=1", 10);
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    expect(&sock, "READY=1", 10);

    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    expect(&sock, "STOPPING=1", 10);
    let _ = child.wait();
}

#[test]
fn with_json_logs_a_fatal_error_is_a_json_line() {
    let env = Env::new("");
    std::fs::write(&env.config, "no_such_setting = 1\n").unwrap();
    let o = env
        .cmd(&["--json-logs", "wallet", "balance", "alice"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    let line = stderr.lines().last().expect("a line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "ERROR", "{line}");
    assert!(
        v["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("no_such_setting"),
        "{line}"
    );
}
