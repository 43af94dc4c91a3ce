//! A private mosquitto for the MQTT tests: on an ephemeral port, in a temp
//! directory, ready when its own log says it listens.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::DEADLINE;

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// More mosquitto.conf lines (see [`Broker::start_with`]).
    extra: String,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("ephemeral port")
}

pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl Broker {
    /// A mosquitto with persistence in `dir`, on a free port (another
    /// port is tried if the one picked was taken in the meantime).
    pub fn start(dir: &Path) -> Broker {
        Self::start_with(dir, "")
    }

    /// [`Broker::start`] with more mosquitto.conf lines (newline-ended).
    pub fn start_with(dir: &Path, extra: &str) -> Broker {
        for _ in 0..5 {
            let mut b = Broker {
                child: None,
                port: free_port(),
                dir: dir.to_path_buf(),
                extra: extra.to_owned(),
            };
            if b.spawn() {
                return b;
            }
        }
        panic!("mosquitto did not start on any port; see {}", dir.display());
    }

    fn spawn(&mut self) -> bool {
        let conf = self.dir.join("mosquitto.conf");
        let mut text = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nlog_dest file {}\nlog_type all\n",
            self.port,
            self.dir.display(),
            self.dir.join("mosquitto.log").display()
        );
        if is_root() {
            // Otherwise it drops to user mosquitto and cannot write here.
            text.push_str("user root\n");
        }
        text.push_str(&self.extra);
        std::fs::write(&conf, text).unwrap();
        let _ = std::fs::remove_file(self.dir.join("mosquitto.log"));
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto (apt-get install mosquitto)");
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // EADDRINUSE or similar: caller retries
            }
            // Our own broker's log saying it listens, not just any
            // listener on the port: two tests can draw the same port.
            if self
                .log()
                .contains(&format!("listen socket on port {}", self.port))
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && matches!(child.try_wait(), Ok(None))
            {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// SIGTERM (mosquitto saves its persistence file) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Same port again (the daemon reconnects to it).
    pub fn restart(&mut self) {
        self.stop();
        let end = Instant::now() + DEADLINE;
        while !self.spawn() {
            assert!(Instant::now() < end, "mosquitto did not restart");
        }
    }

    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
