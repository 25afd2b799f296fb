//! A real SMTP relay on loopback (Python's aiosmtpd) that saves every
//! message it accepts as a file.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const SMTP_SINK: &str = r#"
import os, sys, itertools
from aiosmtpd.controller import Controller
port, out = int(sys.argv[1]), sys.argv[2]
seq = itertools.count()
class Sink:
    async def handle_DATA(self, server, session, envelope):
        name = os.path.join(out, "%d-%d.eml" % (os.getpid(), next(seq)))
        with open(name + ".tmp", "wb") as f:
            f.write(envelope.original_content or envelope.content)
        os.rename(name + ".tmp", name)
        return "250 OK"
c = Controller(Sink(), hostname="127.0.0.1", port=port)
c.start()
print("ready", flush=True)
sys.stdin.read()
c.stop()
"#;

pub struct Relay {
    pub child: Child,
    pub out: PathBuf,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    /// A real SMTP server (aiosmtpd) on 127.0.0.1:`port`, saving each
    /// message it accepts as a file under `out`.
    pub fn start(port: u16, out: &Path) -> Self {
        let has = Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            has,
            "these tests need a real SMTP server: `pip install aiosmtpd` (python3 -m aiosmtpd)"
        );
        std::fs::create_dir_all(out).unwrap();
        let mut child = Command::new("python3")
            .args(["-c", SMTP_SINK, &port.to_string(), out.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "aiosmtpd did not start");
        Self {
            child,
            out: out.into(),
        }
    }

    pub fn messages(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.out)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect();
        v.sort();
        v
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
