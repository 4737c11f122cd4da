//! An `inferalign serve` child process, for tests and benchmarks.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context as _, Result};

/// An `inferalign serve` process on a free loopback port, killed when
/// dropped: what load tests and integration tests talk to.
pub struct ServerProcess {
    pub child: Child,
    pub url: String,
}

impl ServerProcess {
    /// Runs `exe serve --port 0 ARGS` and waits for its "serving ... on http://ADDR" line.
    pub fn start<S: AsRef<OsStr>>(exe: &Path, args: impl IntoIterator<Item = S>) -> Result<ServerProcess> {
        let mut child = Command::new(exe)
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} serve", exe.display()))?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let mut log = Vec::new();
        for line in lines.by_ref() {
            let line = line?;
            if let Some((_, rest)) = line.split_once(" on http://") {
                let url = format!("http://{}", rest.split_whitespace().next().unwrap_or_default());
                // Keep draining stderr so the server never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                return Ok(ServerProcess { child, url });
            }
            log.push(line);
        }
        let _ = child.wait();
        bail!("inferalign serve did not start:\n{}", log.join("\n"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
