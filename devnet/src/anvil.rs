//! A local anvil node for tests and `x402d dev`.
//!
//! The binary comes from the npm package `@foundry-rs/anvil` pinned in the
//! workspace's `package.json` (its platform package carries the binary);
//! when it is missing, `npm ci` installs it. `ANVIL_BIN` overrides the path.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::{Error, Result};

/// The workspace root, where `package.json` pins anvil.
const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// Where npm puts the binary on this platform.
const NPM_BINARY: &str = "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil";

/// A running anvil; killed on drop, and by a watchdog when this process
/// dies without dropping it (SIGKILL).
#[derive(Debug)]
pub struct Anvil {
    child: Child,
    endpoint: String,
    watchdog: Option<Child>,
}

/// The watchdog, `sh -c WATCHDOG <our pid> <anvil's pid>`: once a second,
/// while both live; when this process is gone first, it kills anvil (if
/// that pid still runs an anvil). Drop code cannot run after a SIGKILL, and
/// a parent-death signal would follow the thread that spawned anvil, not
/// the process.
const WATCHDOG: &str = r#"while kill -0 "$0" 2>/dev/null && kill -0 "$1" 2>/dev/null; do sleep 1; done
if ! kill -0 "$0" 2>/dev/null && grep -q anvil "/proc/$1/cmdline" 2>/dev/null; then kill -9 "$1"; fi"#;

impl Anvil {
    /// The anvil binary, installing it with `npm ci` when it is missing.
    pub fn binary() -> Result<PathBuf> {
        if let Some(path) = std::env::var_os("ANVIL_BIN") {
            return Ok(PathBuf::from(path));
        }
        let path = Path::new(WORKSPACE).join(NPM_BINARY);
        if !path.exists() {
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(WORKSPACE)
                .status()
                .map_err(|e| Error::Anvil(format!("anvil is not installed and `npm ci` could not run: {e}")))?;
            if !status.success() || !path.exists() {
                return Err(Error::Anvil(format!("`npm ci` in {WORKSPACE} did not install {NPM_BINARY}")));
            }
        }
        Ok(path)
    }

    /// Starts anvil on a free loopback port with `args` added
    /// (e.g. `["--block-time", "1"]`) and waits until it listens.
    pub fn spawn(args: &[&str]) -> Result<Self> {
        let mut child = Command::new(Self::binary()?)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Anvil(format!("cannot start anvil: {e}")))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(addr) = line.strip_prefix("Listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => {
                let watchdog = Command::new("sh")
                    .args(["-c", WATCHDOG, &std::process::id().to_string(), &child.id().to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .inspect_err(|e| tracing::warn!(error = %e, "no watchdog for anvil: it outlives a SIGKILL"))
                    .ok();
                Ok(Self { child, endpoint: format!("http://{addr}"), watchdog })
            }
            Err(_) => {
                let _ = child.kill();
                Err(Error::Anvil("anvil did not report its address within 30 s".into()))
            }
        }
    }

    /// The JSON-RPC endpoint, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The process id, for fault tests that stop and resume the node.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(watchdog) = &mut self.watchdog {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}
