//! The RAUC backend against Debian's real `rauc service` on a private
//! dbus-daemon: a system.conf whose slots are image files and whose
//! bootloader is a custom backend script keeping its state in a file; the
//! booted slot is given with `rauc service --override-boot-slot` (RAUC 1.8;
//! the same answer RAUC would derive from `rauc.slot=` on /proc/cmdline).
//! Bundles are built with `rauc bundle` (plain format: verity needs
//! device-mapper, which containers rarely have) and signed with CAs made
//! here with openssl. The operator path is the real CLI over D-Bus.
//!
//! A simulated reboot restarts both `rauc service` (with the other boot
//! slot) and the daemon. Installing mounts the bundle (a loop device), so
//! the test needs root; it skips loudly otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn skip(why: &str) -> bool {
    eprintln!("\n*** SKIPPED (RAUC test): {why} ***\n");
    true
}

fn cannot_run() -> bool {
    for tool in ["rauc", "mksquashfs", "openssl", "dbus-daemon", "gdbus"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return skip(&format!("`{tool}` missing (apt-get install rauc rauc-service squashfs-tools openssl dbus libglib2.0-bin)"));
        }
    }
    if !nix_is_root() {
        return skip("installing a bundle mounts it (loop device): needs root");
    }
    if !Path::new("/dev/loop-control").exists() {
        return skip("no /dev/loop-control: RAUC cannot mount bundles here");
    }
    false
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Rig {
    dir: tempfile::TempDir,
    bus: Killed,
    address: String,
    rauc: Option<Killed>,
}

const SLOT_SIZE: usize = 256 * 1024;

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let (child, address) = private_bus(p);
        let bus = Killed(child);

        // Two CAs: the keyring's, and one RAUC must refuse.
        for ca in ["ca", "evil"] {
            run(Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .arg("-keyout")
                .arg(p.join(format!("{ca}.key")))
                .arg("-out")
                .arg(p.join(format!("{ca}.pem")))
                .args(["-subj", &format!("/O=konsul test/CN={ca}")]));
        }
        std::fs::write(p.join("A.img"), vec![b'a'; SLOT_SIZE]).unwrap();
        std::fs::write(p.join("B.img"), vec![b'b'; SLOT_SIZE]).unwrap();
        // RAUC's custom bootloader backend: state in a file. set-primary
        // also makes the slot bootable, like BOOT_x_LEFT=3 in U-Boot.
        let script = p.join("bootloader.sh");
        std::fs::write(
            &script,
            format!(
                r#"#!/bin/sh
S={state}
[ -f "$S" ] || printf 'primary=A\nA=good\nB=good\n' > "$S"
get() {{ sed -n "s/^$1=//p" "$S"; }}
put() {{ grep -v "^$1=" "$S" > "$S.tmp"; echo "$1=$2" >> "$S.tmp"; mv "$S.tmp" "$S"; }}
case "$1" in
  get-primary) get primary ;;
  set-primary) put primary "$2"; put "$2" good ;;
  get-state) get "$2" ;;
  set-state) put "$2" "$3" ;;
  *) exit 1 ;;
esac
"#,
                state = p.join("bootstate").display()
            ),
        )
        .unwrap();
        run(Command::new("chmod").arg("+x").arg(&script));
        std::fs::create_dir_all(p.join("mnt")).unwrap();
        std::fs::create_dir_all(p.join("rauc-data")).unwrap();
        std::fs::write(
            p.join("system.conf"),
            format!(
                "[system]\ncompatible=konsul-test-board\nbootloader=custom\nmountprefix={mnt}\ndata-directory={data}\n\n\
                 [handlers]\nbootloader-custom-backend={script}\n\n[keyring]\npath={ca}\n\n\
                 [slot.rootfs.0]\ndevice={a}\ntype=raw\nbootname=A\n\n[slot.rootfs.1]\ndevice={b}\ntype=raw\nbootname=B\n",
                mnt = p.join("mnt").display(),
                data = p.join("rauc-data").display(),
                script = script.display(),
                ca = p.join("ca.pem").display(),
                a = p.join("A.img").display(),
                b = p.join("B.img").display(),
            ),
        )
        .unwrap();
        write_config(
            p,
            &format!(
                "dbus:\n  enabled: true\n  bus: \"{address}\"\nota:\n  backend: rauc\n  rauc_bus: \"{address}\"\n  commit_deadline: 20s\n  reboot_command: echo reboot >> {dir}/reboots\n  health_commands: [\"test -e {dir}/healthy\"]\n",
                dir = p.display()
            ),
        );
        Rig {
            dir,
            bus,
            address,
            rauc: None,
        }
    }

    fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    /// `rauc service`, booted from `slot`; returns once it owns its name.
    fn start_rauc(&mut self, slot: &str) {
        self.rauc = None;
        let child = Command::new("rauc")
            .arg("service")
            .arg(format!("--conf={}", self.path("system.conf").display()))
            .arg(format!("--override-boot-slot={slot}"))
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn rauc service");
        self.rauc = Some(Killed(child));
        run(Command::new("gdbus")
            .args(["wait", "--address", &self.address, "--timeout", "20"])
            .arg("de.pengutronix.rauc"));
    }

    /// A bundle of `payload`, signed by `ca`.
    fn bundle(&self, name: &str, payload: &[u8], version: &str, ca: &str) -> PathBuf {
        let content = self.path(&format!("{name}-content"));
        std::fs::create_dir_all(&content).unwrap();
        std::fs::write(content.join("rootfs.img"), payload).unwrap();
        std::fs::write(
            content.join("manifest.raucm"),
            format!("[update]\ncompatible=konsul-test-board\nversion={version}\n\n[bundle]\nformat=plain\n\n[image.rootfs]\nfilename=rootfs.img\n"),
        )
        .unwrap();
        let out = self.path(&format!("{name}.raucb"));
        run(Command::new("rauc")
            .arg("bundle")
            .arg(format!(
                "--cert={}",
                self.path(&format!("{ca}.pem")).display()
            ))
            .arg(format!(
                "--key={}",
                self.path(&format!("{ca}.key")).display()
            ))
            .arg(&content)
            .arg(&out));
        out
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .args(["--bus", &self.address])
            .output()
            .expect("run the CLI")
    }

    fn status(&self) -> serde_json::Value {
        let out = self.cli(&["ota", "status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn bootstate(&self) -> String {
        std::fs::read_to_string(self.path("bootstate")).unwrap_or_default()
    }

    fn reboots(&self) -> usize {
        std::fs::read_to_string(self.path("reboots"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.rauc = None;
        let _ = &self.bus;
    }
}

fn wait(d: &Daemon, what: &str) -> String {
    d.wait_log(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no log line containing `{what}` in time"))
}

/// The daemon, once its coordinator has asked RAUC for the booted slot.
fn start(rig: &Rig) -> Daemon {
    let d = Daemon::start(rig.dir.path());
    wait(&d, "ota: backend ");
    d
}

fn has(state: &str, line: &str) -> bool {
    state.lines().any(|l| l.trim() == line)
}

#[test]
fn rauc_refuses_a_foreign_bundle_then_installs_commits_and_rolls_back() {
    if cannot_run() {
        return;
    }
    let mut rig = Rig::new();
    std::fs::write(rig.path("healthy"), "").unwrap();
    rig.start_rauc("A");
    let mut d = start(&rig);
    let st = rig.status();
    assert_eq!(st["backend"], "rauc");
    assert_eq!(st["booted_slot"], "A");
    assert_eq!(st["state"], "idle");

    // Signed by a CA outside RAUC's keyring: refused in verifying, before
    // RAUC writes anything.
    let evil = rig.bundle("evil", &[0xee; 50_000], "6.6.6", "evil");
    let out = rig.cli(&["ota", "install", evil.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = wait(&d, "-> failed");
    assert!(line.contains("RAUC refused the bundle"), "{line}");
    assert_eq!(
        std::fs::read(rig.path("B.img")).unwrap(),
        vec![b'b'; SLOT_SIZE]
    );
    assert!(
        !rig.bootstate().contains("primary=B"),
        "{}",
        rig.bootstate()
    );

    // A good bundle: RAUC writes B and makes it primary; we wait for the
    // reboot (no window configured: at once).
    let payload: Vec<u8> = (0..120_000u32).map(|i| (i % 253) as u8).collect();
    let good = rig.bundle("v2", &payload, "2.0.0", "ca");
    let out = rig.cli(&["ota", "install", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait(&d, "-> pending-reboot");
    wait(&d, "running the reboot command");
    eventually("the reboot command ran", || rig.reboots() == 1);
    assert_eq!(
        &std::fs::read(rig.path("B.img")).unwrap()[..payload.len()],
        &payload[..]
    );
    assert!(has(&rig.bootstate(), "primary=B"), "{}", rig.bootstate());
    let st = rig.status();
    assert_eq!(st["state"], "pending-reboot");
    assert_eq!(st["target_slot"], "B");
    assert_eq!(st["bootloader"]["primary"], "B");
    d.kill9();

    // Reboot into B: the gate passes, Mark good, verified via RAUC.
    rig.start_rauc("B");
    let mut d = start(&rig);
    wait(&d, "-> committed");
    let st = rig.status();
    assert_eq!(st["state"], "committed");
    assert_eq!(st["booted_slot"], "B");
    let slots = st["bootloader"]["slots"].as_array().unwrap();
    let b = slots.iter().find(|s| s["bootname"] == "B").unwrap();
    assert_eq!(b["state"], "booted");
    assert_eq!(b["boot_status"], "good");
    assert!(has(&rig.bootstate(), "B=good") && has(&rig.bootstate(), "primary=B"));

    // The next update fails its gate: marked bad via RAUC, A primary,
    // reboot at once.
    std::fs::remove_file(rig.path("healthy")).unwrap();
    std::fs::write(
        rig.path("edge.yaml"),
        std::fs::read_to_string(rig.path("edge.yaml"))
            .unwrap()
            .replace("commit_deadline: 20s", "commit_deadline: 1s"),
    )
    .unwrap();
    let v3: Vec<u8> = vec![0x33; 90_000];
    let b3 = rig.bundle("v3", &v3, "3.0.0", "ca");
    d.kill9();
    let mut d = start(&rig);
    let out = rig.cli(&["ota", "install", b3.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait(&d, "running the reboot command");
    assert_eq!(
        &std::fs::read(rig.path("A.img")).unwrap()[..v3.len()],
        &v3[..]
    );
    assert!(has(&rig.bootstate(), "primary=A"), "{}", rig.bootstate());
    d.kill9();
    rig.start_rauc("A");
    let mut d = start(&rig);
    let line = wait(&d, "-> rolled-back");
    assert!(line.contains("health gate failed"), "{line}");
    assert!(has(&rig.bootstate(), "primary=B"), "{}", rig.bootstate());
    assert!(has(&rig.bootstate(), "A=bad"), "{}", rig.bootstate());
    d.kill9();
}
