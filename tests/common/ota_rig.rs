//! The U-Boot / GRUB test rig shared by the OTA tests (`tests/ota*.rs`):
//! slots are image files, the environment is real (`mkenvimage` +
//! `fw_setenv`/`fw_printenv`, or `grub-editenv`), and a reboot is simulated
//! by `Rig::boot` (see tests/ota.rs).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use ring::signature::{Ed25519KeyPair, KeyPair};

#[derive(Clone, Copy, PartialEq)]
pub enum Flavor {
    Uboot,
    Grub,
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub flavor: Flavor,
    pub key: Ed25519KeyPair,
    pub boots: u32,
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn keypair() -> Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

pub fn sha256(b: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Skips (loudly) when a tool is missing; scripts/test.sh installs them.
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("\n*** SKIPPED: `{tool}` is not installed (apt-get install u-boot-tools libubootenv-tool grub-common) ***\n");
    }
    ok
}

pub const OLD_A: u8 = b'a';
pub const OLD_B: u8 = b'b';
pub const SLOT_SIZE: usize = 2 << 20;

impl Rig {
    pub fn new(flavor: Flavor, ota_extra: &str) -> Rig {
        Self::with(flavor, ota_extra, "")
    }

    /// `top_extra` goes before the `ota:` section (e.g. `dbus:`).
    pub fn with(flavor: Flavor, ota_extra: &str, top_extra: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("A.img"), vec![OLD_A; SLOT_SIZE]).unwrap();
        std::fs::write(p.join("B.img"), vec![OLD_B; SLOT_SIZE]).unwrap();
        let key = keypair();
        std::fs::write(p.join("ota.pub"), hex(key.public_key().as_ref())).unwrap();
        let env_line = match flavor {
            Flavor::Uboot => {
                std::fs::write(
                    p.join("vars.txt"),
                    "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\nbootcmd=run boot_ab\n",
                )
                .unwrap();
                run(Command::new("mkenvimage")
                    .args(["-s", "0x4000", "-o"])
                    .arg(p.join("uboot.env"))
                    .arg(p.join("vars.txt")));
                std::fs::write(
                    p.join("fw_env.config"),
                    format!("{} 0x0000 0x4000\n", p.join("uboot.env").display()),
                )
                .unwrap();
                format!(
                    "  backend: uboot\n  fw_env_config: {}\n",
                    p.join("fw_env.config").display()
                )
            }
            Flavor::Grub => {
                let env = p.join("grubenv");
                run(Command::new("grub-editenv").arg(&env).arg("create"));
                run(Command::new("grub-editenv").arg(&env).args([
                    "set",
                    "ORDER=A B",
                    "A_OK=1",
                    "B_OK=1",
                    "A_TRY=0",
                    "B_TRY=0",
                ]));
                format!("  backend: grub\n  grub_env: {}\n", env.display())
            }
        };
        let cfg = format!(
            "{top_extra}ota:\n{env_line}  slots: {{A: {a}, B: {b}}}\n  public_keys: [{pk}]\n  cmdline: {dir}/cmdline\n  boot_id_file: {dir}/boot_id\n  reboot_command: echo reboot >> {dir}/reboots\n  health_commands: [\"test -e {dir}/healthy\"]\n{ota_extra}",
            a = p.join("A.img").display(),
            b = p.join("B.img").display(),
            pk = p.join("ota.pub").display(),
            dir = p.display(),
        );
        write_config(p, &cfg);
        let mut rig = Rig {
            dir,
            flavor,
            key,
            boots: 0,
        };
        assert_eq!(rig.boot(), "A");
        rig
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An image with its manifest, signed with `key` (the rig's by default).
    pub fn image(
        &self,
        name: &str,
        data: &[u8],
        version: &str,
        key: Option<&Ed25519KeyPair>,
    ) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, data).unwrap();
        let sha = sha256(data);
        let text = format!("konsul-ota-v1\n{version}\n{}\n{sha}\n", data.len());
        let sig = key.unwrap_or(&self.key).sign(text.as_bytes());
        let manifest = serde_json::json!({
            "version": version, "size": data.len(), "sha256": sha,
            "signature": hex(sig.as_ref()),
        });
        std::fs::write(format!("{}.manifest", path.display()), manifest.to_string()).unwrap();
        path
    }

    pub fn env(&self) -> BTreeMap<String, String> {
        let out = match self.flavor {
            Flavor::Uboot => run(Command::new("fw_printenv")
                .arg("-c")
                .arg(self.path("fw_env.config"))),
            Flavor::Grub => run(Command::new("grub-editenv")
                .arg(self.path("grubenv"))
                .arg("list")),
        };
        out.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn set_env(&self, k: &str, v: &str) {
        match self.flavor {
            Flavor::Uboot => run(Command::new("fw_setenv")
                .arg("-c")
                .arg(self.path("fw_env.config"))
                .args([k, v])),
            Flavor::Grub => run(Command::new("grub-editenv")
                .arg(self.path("grubenv"))
                .arg("set")
                .arg(format!("{k}={v}"))),
        };
    }

    /// A power-on: the boot script's slot selection on the real
    /// environment (RAUC's U-Boot and GRUB conventions, as in
    /// board-configs/), then the command line and a new boot id.
    pub fn boot(&mut self) -> String {
        let env = self.env();
        let slot = match self.flavor {
            Flavor::Uboot => {
                let order = env.get("BOOT_ORDER").cloned().unwrap_or("A B".into());
                let pick = order.split_whitespace().find(|s| {
                    env.get(&format!("BOOT_{s}_LEFT"))
                        .and_then(|v| v.parse::<u32>().ok())
                        .unwrap_or(0)
                        > 0
                });
                match pick {
                    Some(s) => {
                        let k = format!("BOOT_{s}_LEFT");
                        let left: u32 = env[&k].parse().unwrap();
                        self.set_env(&k, &(left - 1).to_string());
                        s.to_string()
                    }
                    None => {
                        // The script resets the counters and boots the first.
                        self.set_env("BOOT_A_LEFT", "3");
                        self.set_env("BOOT_B_LEFT", "3");
                        order.split_whitespace().next().unwrap().to_string()
                    }
                }
            }
            Flavor::Grub => {
                let order = env.get("ORDER").cloned().unwrap_or("A B".into());
                let pick = order.split_whitespace().find(|s| {
                    env.get(&format!("{s}_OK")).map(String::as_str) == Some("1")
                        && env.get(&format!("{s}_TRY")).map(String::as_str) == Some("0")
                });
                match pick {
                    Some(s) => {
                        self.set_env(&format!("{s}_TRY"), "1");
                        s.to_string()
                    }
                    None => "A".to_string(),
                }
            }
        };
        self.boots += 1;
        std::fs::write(
            self.path("cmdline"),
            format!("console=ttyS0 root=/dev/mmcblk0p2 rauc.slot={slot} quiet\n"),
        )
        .unwrap();
        std::fs::write(self.path("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
        slot
    }

    /// Starts the daemon and waits until the coordinator has looked at
    /// the bootloader (it does so just after READY).
    pub fn start(&self) -> Daemon {
        let d = Daemon::start(self.dir.path());
        wait(&d, "ota: backend ");
        d
    }

    pub fn reboots(&self) -> usize {
        std::fs::read_to_string(self.path("reboots"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    pub fn slot(&self, s: &str) -> Vec<u8> {
        std::fs::read(self.path(&format!("{s}.img"))).unwrap()
    }

    pub fn healthy(&self, yes: bool) {
        if yes {
            std::fs::write(self.path("healthy"), "").unwrap();
        } else {
            let _ = std::fs::remove_file(self.path("healthy"));
        }
    }
}

pub fn ota(d: &Daemon) -> serde_json::Value {
    let r = d.get("/v1/edge/ota");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

pub fn install(d: &Daemon, path: &Path) -> Resp {
    d.req(
        "POST",
        "/v1/edge/ota/install",
        Some(&serde_json::json!({"path": path}).to_string()),
    )
}

pub fn wait(d: &Daemon, what: &str) -> String {
    d.wait_log(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no log line containing `{what}` in time"))
}

/// A maintenance window (UTC) that opens two hours from now and lasts one
/// hour: an installed update waits for its reboot for the whole test.
pub fn window_two_hours_ahead() -> String {
    let now_min = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60)
        % 1440;
    let hm = |m: u64| format!("{:02}:{:02}", (m % 1440) / 60, m % 60);
    format!("{}-{}", hm(now_min + 120), hm(now_min + 180))
}

pub fn new_image(fill: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| fill ^ (i % 7) as u8).collect()
}
