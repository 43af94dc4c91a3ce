//! Operator-configured shell commands (health checks, the reboot
//! command): `sh -c` as an async child process (the executor also pings
//! the watchdog, so nothing here blocks it), in a process group of its
//! own. When the command ends or times out, the whole group is killed,
//! not only the `sh`: a check that forked (`sleep 300 & ...`) leaves
//! nothing behind, and its children cannot hold its stderr open.
//!
//! The group is killed before the `sh` is reaped whenever it is still
//! running, so its id cannot have been reused. After a normal exit the
//! leader is gone; process ids are handed out cyclically, so the group id
//! is not reused in the moment between the reap and the kill.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use smol::io::AsyncReadExt;

/// How much of a failing command's stderr goes into the error.
const STDERR_KEEP: usize = 2048;

/// `sh -c cmd`; Err unless it exits 0 within `timeout`.
pub(crate) async fn run_shell(cmd: &str, timeout: Duration) -> Result<(), String> {
    let mut std_cmd = std::process::Command::new("sh");
    std_cmd
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = smol::process::Command::from(std_cmd)
        .spawn()
        .map_err(|e| format!("cannot run: {e}"))?;
    let group = Pid::from_raw(child.id() as i32);
    let mut stderr = child.stderr.take();
    let mut err = Vec::new();
    // Stderr is read while the command runs (a full pipe would stall it),
    // but its end is not awaited: a leftover child may hold it open.
    let read_err = async {
        let mut buf = [0u8; 512];
        while let Some(s) = stderr.as_mut() {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = STDERR_KEEP.saturating_sub(err.len());
                    err.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        std::future::pending::<Option<std::io::Result<std::process::ExitStatus>>>().await
    };
    let waited = smol::future::or(async { Some(child.status().await) }, read_err);
    let out = smol::future::or(waited, async {
        async_io::Timer::after(timeout).await;
        None
    })
    .await;
    // The leader is still unreaped on a timeout, so the group is ours.
    let _ = killpg(group, Signal::SIGKILL);
    match out {
        Some(Ok(st)) if st.success() => Ok(()),
        Some(Ok(st)) => Err(format!("{st}: {}", String::from_utf8_lossy(&err).trim())),
        Some(Err(e)) => Err(e.to_string()),
        None => {
            // Reaped here, asynchronously; it died with its group.
            let _ = child.status().await;
            Err(format!(
                "no exit within {timeout:?} (its process group was killed)"
            ))
        }
    }
}
