//! Starting moto's EC2 server (`moto_server`, from `pip install 'moto[server]'`) on loopback
//! for cross-checks and smoke runs: the simulator's tests compare against it, and ipamd's
//! moto smoke test runs the daemon on it.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `moto_server`, killed when dropped.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    url: String,
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether moto answers on `port` (its `/moto-api/` dashboard names it).
fn is_moto(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req =
        format!("GET /moto-api/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut body = Vec::new();
    let _ = s.take(1 << 20).read_to_end(&mut body);
    let text = String::from_utf8_lossy(&body);
    text.starts_with("HTTP/1.1 200") && text.contains("Moto")
}

/// The command that starts moto's server: `moto_server` on PATH, else `python3 -m moto.server`
/// when the module is importable (a fresh pip install whose script directory is not on PATH).
pub fn command() -> Option<Command> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("moto_server").is_file()))
        .unwrap_or(false);
    if on_path {
        return Some(Command::new("moto_server"));
    }
    let importable = Command::new("python3")
        .args(["-c", "import moto.server"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    importable.then(|| {
        let mut c = Command::new("python3");
        c.args(["-m", "moto.server"]);
        c
    })
}

impl MotoServer {
    /// Starts moto on a free loopback port and waits (up to 30 s) until it answers as moto
    /// (`GET /moto-api/`). The port is picked by binding and releasing it, so another process
    /// may take it first: then moto exits or someone else answers, and a new port is tried
    /// (three attempts). `Ok(None)`: moto is not installed.
    pub fn start() -> Result<Option<MotoServer>, String> {
        let mut last = String::new();
        for _ in 0..3 {
            let Some(mut cmd) = command() else {
                return Ok(None);
            };
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("no free port: {e}"))?
                .port();
            let child = cmd
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting moto_server: {e}"))?;
            let mut moto = MotoServer {
                child,
                url: format!("http://127.0.0.1:{port}"),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = moto.child.try_wait() {
                    last = format!("moto_server exited ({status}) on port {port}");
                    break;
                }
                if is_moto(port) {
                    return Ok(Some(moto));
                }
                if Instant::now() >= deadline {
                    last = format!("moto_server did not answer on port {port}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Err(last)
    }

    /// Starts moto for a test: `None` (with a SKIPPED message) when moto is not installed,
    /// a panic when it is not installed but `CI` is set, or when it does not start.
    #[allow(clippy::panic)]
    pub fn for_test(what: &str) -> Option<MotoServer> {
        match MotoServer::start() {
            Ok(Some(m)) => Some(m),
            Ok(None) if std::env::var_os("CI").is_some() => {
                panic!("moto_server is not installed but CI is set: run scripts/setup-machine.sh")
            }
            Ok(None) => {
                eprintln!("SKIPPED: moto_server not installed (pip install 'moto[server]'); {what} not run");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// The EC2 endpoint URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}
