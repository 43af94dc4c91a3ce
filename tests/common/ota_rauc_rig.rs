//! The RAUC test rig shared by tests/ota_rauc.rs and the power-cut harness:
//! Debian's real `rauc service` on a private dbus-daemon, slots as image
//! files, a custom bootloader backend keeping its state in a file (see
//! tests/ota_rauc.rs for the whole story).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::*;

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn skip(why: &str) -> bool {
    eprintln!("\n*** SKIPPED (RAUC test): {why} ***\n");
    true
}

pub fn cannot_run() -> bool {
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

pub fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub bus: Killed,
    pub address: String,
    pub rauc: Option<Killed>,
}

pub const SLOT_SIZE: usize = 256 * 1024;

impl Rig {
    pub fn new() -> Rig {
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

    pub fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    /// `rauc service`, booted from `slot`; returns once it owns its name.
    pub fn start_rauc(&mut self, slot: &str) {
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
    pub fn bundle(&self, name: &str, payload: &[u8], version: &str, ca: &str) -> PathBuf {
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

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .args(["--bus", &self.address])
            .output()
            .expect("run the CLI")
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["ota", "status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn bootstate(&self) -> String {
        std::fs::read_to_string(self.path("bootstate")).unwrap_or_default()
    }

    pub fn reboots(&self) -> usize {
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

pub fn wait(d: &Daemon, what: &str) -> String {
    d.wait_log(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no log line containing `{what}` in time"))
}

/// The daemon, once its coordinator has asked RAUC for the booted slot.
pub fn start(rig: &Rig) -> Daemon {
    let d = Daemon::start(rig.dir.path());
    wait(&d, "ota: backend ");
    d
}

pub fn has(state: &str, line: &str) -> bool {
    state.lines().any(|l| l.trim() == line)
}
