//! Config files as an attacker (or a bad image build) would write them:
//! huge, endless, deeply nested, empty, full of control characters. Each
//! case runs the real binary's `check-config` under an address-space limit
//! and a deadline, so a regression fails the test instead of eating the
//! machine's memory or hanging CI.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::BIN;

/// Far above what `check-config` needs for a real config (a few MB), far
/// below what reading 50 MB of YAML costs (hundreds of MB).
const ADDRESS_SPACE_KIB: u64 = 256 * 1024;

/// Runs `check-config FILE` with at most [`ADDRESS_SPACE_KIB`] of address
/// space; kills it after `limit`. Returns the output (None on timeout)
/// and how long it ran.
fn check_bounded(path: &Path, limit: Duration) -> (Option<Output>, Duration) {
    let script = format!("ulimit -v {ADDRESS_SPACE_KIB} && exec \"$0\" check-config \"$1\"");
    let child = Command::new("sh")
        .args(["-c", &script, BIN])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => (Some(out.unwrap()), started.elapsed()),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let _ = rx.recv_timeout(Duration::from_secs(5));
            (None, started.elapsed())
        }
    }
}

/// Asserts a clean refusal (exit 78) within `limit`, and returns stderr.
fn refused(path: &Path, limit: Duration) -> String {
    let (out, took) = check_bounded(path, limit);
    let out = out.unwrap_or_else(|| panic!("{}: still running after {took:?}", path.display()));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}: wanted EX_CONFIG within {limit:?}, got {:?} after {took:?}: {stderr}",
        path.display(),
        out.status
    );
    stderr
}

#[test]
fn a_50_mb_config_is_refused_quickly_within_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.yaml");
    let mut text = String::from("mode: edge\nmqtt:\n  topics:\n");
    let line = "    - devices/+/telemetry-with-a-long-name\n";
    text.reserve(50 << 20);
    while text.len() < 50 << 20 {
        text.push_str(line);
    }
    std::fs::write(&path, text).unwrap();
    let err = refused(&path, Duration::from_secs(5));
    assert!(err.contains("larger than"), "{err}");

    // The same cap holds for a drop-in.
    let main = dir.path().join("main.yaml");
    std::fs::write(&main, "mode: edge\n").unwrap();
    std::fs::create_dir(dir.path().join("config.d")).unwrap();
    std::fs::rename(&path, dir.path().join("config.d/10-big.yaml")).unwrap();
    let err = refused(&main, Duration::from_secs(5));
    assert!(
        err.contains("10-big.yaml") && err.contains("larger than"),
        "{err}"
    );
}

#[test]
fn device_files_and_fifos_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(Path::new("/dev/zero"), Duration::from_secs(5));
    assert!(err.contains("not a regular file"), "{err}");

    // A FIFO would block a reader until someone writes to it.
    let fifo = dir.path().join("fifo.yaml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let err = refused(&fifo, Duration::from_secs(5));
    assert!(err.contains("not a regular file"), "{err}");

    // A drop-in symlinked to a device is no better.
    let main = dir.path().join("edge.yaml");
    std::fs::write(&main, "mode: edge\n").unwrap();
    std::fs::create_dir(dir.path().join("config.d")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("config.d/50-zero.yaml")).unwrap();
    let err = refused(&main, Duration::from_secs(5));
    assert!(
        err.contains("50-zero.yaml") && err.contains("not a regular file"),
        "{err}"
    );
}

#[test]
fn deep_nesting_is_refused_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "flow.yaml",
            format!("mode: edge\nmqtt:\n  topics: {}", "[".repeat(200_000)),
        ),
        ("maps.yaml", format!("x: {}", "{a: ".repeat(50_000))),
        (
            "dashes.yaml",
            format!("mqtt:\n  topics:\n    {}x\n", "- ".repeat(100_000)),
        ),
        (
            "indent.yaml",
            (0..1_000)
                .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
                .collect(),
        ),
    ];
    for (name, text) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let err = refused(&path, Duration::from_secs(1));
        assert!(err.contains("nested deeper than"), "{name}: {err}");
        assert!(err.contains(name), "{name}: the file is named: {err}");
    }
}

#[test]
fn an_empty_config_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("empty.yaml", ""),
        ("blank.yaml", "\n  \n\n"),
        (
            "comments.yaml",
            "# everything commented out\n# mode: edge\n",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let err = refused(&path, Duration::from_secs(5));
        assert!(err.contains("no settings"), "{name}: {err}");
    }
}

#[test]
fn control_characters_are_escaped_in_messages() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, shown) in [
        // A NUL written as an escape in a quoted string.
        ("nul.yaml", "mode: \"ed\\0ge\"\n", "ed\\0ge"),
        // A terminal escape sequence in an unknown key.
        ("esc.yaml", "mqtt:\n  \"q\\e[2Jos\": 1\n", "q\\u{1b}[2Jos"),
        // A raw NUL and a raw carriage return in a value a check echoes.
        ("node.yaml", "node_id: \"a\\0b\\rc\"\n", "a\\0b\\rc"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (out, _) = check_bounded(&path, Duration::from_secs(5));
        let out = out.expect("check-config finished");
        assert_eq!(out.status.code(), Some(78), "{name}");
        let raw = &out.stderr;
        assert!(
            !raw.iter().any(|&b| b < 0x20 && b != b'\n' || b == 0x7f),
            "{name}: a raw control character reached the terminal: {:?}",
            String::from_utf8_lossy(raw)
        );
        let err = String::from_utf8_lossy(raw);
        assert!(err.contains(shown), "{name}: wanted {shown:?} in {err}");
    }
}

#[test]
fn node_ids_that_do_not_survive_a_url_path_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for id in [".", ".."] {
        let path = dir.path().join("edge.yaml");
        std::fs::write(&path, format!("node_id: \"{id}\"\n")).unwrap();
        let err = refused(&path, Duration::from_secs(5));
        assert!(err.contains("node_id"), "{id}: {err}");
    }
    // Dots inside an id are fine.
    let path = dir.path().join("edge.yaml");
    std::fs::write(&path, "node_id: edge.1..b\n").unwrap();
    let (out, _) = check_bounded(&path, Duration::from_secs(5));
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
