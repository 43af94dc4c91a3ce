//! `check-config`, `init` and config layering, through the real binary.
//! Each `tests/fixtures/bad_*.yaml` names the error text it must produce in
//! `# expect:` lines; each `good_*.yaml` must pass.

mod common;

use std::process::{Command, Output};

use common::BIN;

fn check(path: &std::path::Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("check-config").arg(path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn fixtures(prefix: &str) -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn good_fixtures_pass() {
    let good = fixtures("good_");
    assert!(good.len() >= 3);
    for f in good {
        let out = check(&f, &[]);
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
    }
}

#[test]
fn bad_fixtures_fail_with_the_expected_message() {
    let bad = fixtures("bad_");
    assert!(bad.len() >= 10);
    for f in bad {
        let text = std::fs::read_to_string(&f).unwrap();
        let expects: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expects.is_empty(),
            "{} has no `# expect:` line",
            f.display()
        );
        let out = check(&f, &[]);
        assert_eq!(out.status.code(), Some(78), "{}: EX_CONFIG", f.display());
        let err = String::from_utf8_lossy(&out.stderr);
        for e in expects {
            assert!(err.contains(e), "{}: wanted {e:?} in {err}", f.display());
        }
    }
}

#[test]
fn the_seeds_environment_variables_override_the_file() {
    let seed =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/good_seed.yaml");
    let out = check(
        &seed,
        &[
            ("KONSUL_MODE", "edge"),
            ("KONSUL_CLOUD_ADDRESS", "http://hub.local:8500"),
            ("KONSUL_MQTT_ENABLED", "false"),
            ("KONSUL_HTTP_LISTEN", "127.0.0.1:9999"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sync http://hub.local:8500"), "{stdout}");
    assert!(stdout.contains("mqtt disabled"), "{stdout}");
    assert!(stdout.contains("API 127.0.0.1:9999"), "{stdout}");

    let out = check(&seed, &[("KONSUL_MQTT_QOS", "5")]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("KONSUL_MQTT_QOS") && err.contains("mqtt.qos"),
        "{err}"
    );

    // A typo inside a known section is an error, like in a file ...
    let out = check(&seed, &[("KONSUL_SERVICES_MAX_LOCAL_SERVISES", "5")]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("KONSUL_SERVICES_MAX_LOCAL_SERVISES") && err.contains("unknown field"),
        "{err}"
    );
    // ... while a name outside every section is only warned about: the
    // environment is shared with other programs.
    let out = check(&seed, &[("KONSUL_WHATEVER", "5")]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("KONSUL_WHATEVER names no configuration key")
    );
}

#[test]
fn drop_ins_merge_in_name_order_and_are_checked_on_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("edge.yaml");
    std::fs::write(
        &main,
        "mqtt:\n  enabled: true\n  qos: 0\nhttp:\n  listen: 127.0.0.1:8500\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("config.d")).unwrap();
    std::fs::write(
        dir.path().join("config.d/10-broker.yaml"),
        "mqtt:\n  broker: tcp://10.0.0.1:1883\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.d/20-listen.yaml"),
        "http:\n  listen: 0.0.0.0:8500\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("config.d/README"), "not yaml, ignored").unwrap();
    let out = check(&main, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("mqtt tcp://10.0.0.1:1883"), "{stdout}");
    assert!(stdout.contains("API 0.0.0.0:8500"), "{stdout}");
    assert!(stdout.contains("10-broker.yaml") && stdout.contains("20-listen.yaml"));

    std::fs::write(
        dir.path().join("config.d/30-typo.yaml"),
        "\n\nhttp:\n  lisen: 1\n",
    )
    .unwrap();
    let out = check(&main, &[]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("30-typo.yaml") && err.contains("line 4") && err.contains("lisen"),
        "{err}"
    );
}

#[test]
fn init_writes_a_config_that_passes_and_never_clobbers() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("etc/edge.yaml");
    let init = |extra: &[&str]| {
        Command::new(BIN)
            .args([
                "init",
                "--cloud-address",
                "https://konsul-cloud.example.com:8500",
            ])
            .args([
                "--mqtt-broker",
                "tcp://localhost:1883",
                "--node-id",
                "pi-1",
                "--output",
            ])
            .arg(&out_path)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = init(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&out_path).unwrap();
    assert!(text.starts_with("# konsul-edge configuration"), "commented");
    let out = check(&out_path, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("node pi-1") && stdout.contains("mqtt tcp://localhost:1883"),
        "{stdout}"
    );

    std::fs::write(&out_path, "# operator's edits\n").unwrap();
    let out = init(&[]);
    assert_eq!(out.status.code(), Some(73));
    assert_eq!(
        std::fs::read_to_string(&out_path).unwrap(),
        "# operator's edits\n"
    );
    assert!(init(&["--force"]).status.success());

    let bad = Command::new(BIN)
        .args([
            "init",
            "--cloud-address",
            "ftp://x",
            "--mqtt-broker",
            "tcp://b:1",
            "-o",
            "-",
        ])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(78),
        "a bad URL is refused before writing"
    );
}

#[test]
fn usage_errors_exit_64() {
    for args in [
        &["run"][..],
        &["frobnicate"],
        &["run", "--config"],
        &["check-config"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("USAGE"));
    }
    let v = Command::new(BIN).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("konsul-edge "));
}

/// `konsul-edge init` and every `board-configs/*/edge.yaml` give a device
/// the same local access: the Unix-socket listener, D-Bus on, ACLs on with
/// the shipped policies written out, and a (commented) token example.
#[test]
fn init_and_every_board_config_ship_the_same_local_access() {
    use serde_norway::Value;
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["init", "--cloud-address", "https://hub.example:8500"])
        .args(["--mqtt-broker", "tcp://localhost:1883", "--node-id", "n1"])
        .args(["-o", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init_path = dir.path().join("init.yaml");
    std::fs::write(&init_path, &out.stdout).unwrap();

    let sections = |path: &std::path::Path| {
        let text = std::fs::read_to_string(path).unwrap();
        let out = check(path, &[]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_norway::from_str(&text).unwrap();
        assert!(
            text.contains("#     file: /etc/konsul-edge/tokens/app.token")
                && text.contains("install -m 0640 -o app -g konsul /dev/null"),
            "{}: a commented token example with the command that creates its file",
            path.display()
        );
        (
            v["dbus"].clone(),
            v["acl"].clone(),
            v["http"]["unix_socket"].clone(),
        )
    };
    let (dbus, acl, socket) = sections(&init_path);
    assert_eq!(dbus["enabled"], Value::Bool(true));
    assert_eq!(acl["enabled"], Value::Bool(true));
    assert_eq!(acl["anonymous_policy"].as_str(), Some("builtin:anonymous"));
    assert_eq!(acl["local_policy"].as_str(), Some("builtin:anonymous"));
    assert_eq!(socket.as_str(), Some("/run/konsul-edge/api.sock"));

    let boards = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("board-configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(boards).unwrap() {
        let path = entry.unwrap().path().join("edge.yaml");
        if !path.exists() {
            continue;
        }
        let (b_dbus, b_acl, b_socket) = sections(&path);
        assert_eq!(b_dbus, dbus, "{}: dbus as init writes it", path.display());
        assert_eq!(b_acl, acl, "{}: acl as init writes it", path.display());
        assert_eq!(b_socket, socket, "{}: http.unix_socket", path.display());
        seen += 1;
    }
    assert!(seen >= 4, "every board directory has an edge.yaml");

    // The README's development config: the socket next to its database.
    let dev = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/dev.yaml");
    let out = check(&dev, &[]);
    assert!(out.status.success());
    let v: Value = serde_norway::from_str(&std::fs::read_to_string(&dev).unwrap()).unwrap();
    assert_eq!(v["http"]["unix_socket"].as_str(), Some("./data/api.sock"));
}

/// `check-config` refuses the token files `run` refuses (readable by other
/// users, too short), with the same message and exit code: a config it
/// passes must start.
#[test]
fn check_config_refuses_the_token_files_run_refuses() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = d.join("ops.token");
    for (secret, mode, expect) in [
        ("a-long-enough-secret-0123", 0o644, "lets other users read"),
        ("short", 0o600, "at least 16 characters"),
    ] {
        std::fs::write(&token, secret).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        let config = common::write_config(
            d,
            &format!(
                "acl:\n  enabled: true\n  tokens:\n    - name: ops\n      file: {}\n      policies: [\"builtin:admin\"]\n",
                token.display()
            ),
        );
        let checked = check(&config, &[]);
        let started = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        for (what, out) in [("check-config", &checked), ("run", &started)] {
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{what} ({expect}): {err}");
            assert!(
                err.contains(expect) && err.contains("ops.token"),
                "{what}: {err}"
            );
        }
    }
}
