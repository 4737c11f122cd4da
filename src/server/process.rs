//! An `inferalign serve` child process, for tests and benchmarks.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

    /// Runs stock llama.cpp `llama-server --host 127.0.0.1 --port P ARGS` on a
    /// free port and waits until its `/health` answers 200 (it answers 503
    /// while the model loads).
    pub fn start_llama_server<S: AsRef<OsStr>>(exe: &Path, args: impl IntoIterator<Item = S>) -> Result<ServerProcess> {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("no free loopback port")?.port();
        let mut child = Command::new(exe)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}; pass the path of a built llama-server", exe.display()))?;
        let url = format!("http://127.0.0.1:{port}");
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                bail!("{} exited with {status} before serving; run it by hand with the same options to see why", exe.display());
            }
            if agent.get(&format!("{url}/health")).call().is_ok() {
                return Ok(ServerProcess { child, url });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        bail!("{} did not answer /health within 300 s", exe.display())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
