//! The three installers: RAUC over D-Bus, and the U-Boot and GRUB
//! environments driven directly (we write the image ourselves).
//!
//! Slots are named by their boot names (`A`, `B`) everywhere, whatever the
//! backend: RAUC's slot names (`rootfs.0`) are mapped through its
//! `bootname`. Every bootloader write is verified by reading the state
//! back (`fw_printenv`, `grub-editenv list`, RAUC's `GetSlotStatus` and
//! `GetPrimary`): a write that silently did not stick is an error here,
//! never a "committed" later.
//!
//! Environment variables follow RAUC's conventions, so a boot script made
//! for RAUC works unchanged:
//! - U-Boot: `BOOT_ORDER` ("A B"), `BOOT_<slot>_LEFT` (tries left; the boot
//!   script decrements it per boot), plus `upgrade_available` (1 while a
//!   new slot is not yet committed);
//! - GRUB: `ORDER`, `<slot>_OK` (bootable), `<slot>_TRY` (GRUB sets it to 1
//!   when it boots the slot; a slot with TRY=1 is skipped next time).
//!
//! Before an image is written to the inactive slot, that slot is made
//! unbootable (LEFT=0 / OK=0) and moved last in the order: a power cut in
//! the middle of the write can never boot half an image.
//!
//! Every external command and file access runs on the blocking pool as a
//! counted job (`writer`), never on the executor: the coordinator waits for
//! a timed-out step's jobs before it moves on, so two writers of a slot or
//! of the environment never overlap.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use smol::stream::StreamExt;
use zbus::zvariant::OwnedValue;

use super::bundle::{self, Manifest};
use super::writer::{self, Jobs};
use super::OtaError;
use crate::config::{Ota as OtaConfig, OtaBackend};

/// Progress callback: percent 0-100 and a short phase text.
pub type Progress = Arc<dyn Fn(u8, &str) + Send + Sync>;

pub enum Backend {
    Env(EnvBackend),
    Rauc(Rauc),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Flavor {
    Uboot,
    Grub,
}

pub struct EnvBackend {
    flavor: Flavor,
    /// fw_env.config or the grubenv file.
    env: PathBuf,
    slots: BTreeMap<String, PathBuf>,
    cmdline: PathBuf,
    attempts: u32,
    keys: Vec<Vec<u8>>,
    jobs: Arc<Jobs>,
}

pub struct Rauc {
    bus: String,
    conn: smol::lock::Mutex<Option<zbus::Connection>>,
}

impl Backend {
    /// Blocking (reads the public keys): call it on the blocking pool.
    pub(crate) fn from_config(
        c: &OtaConfig,
        jobs: &Arc<Jobs>,
    ) -> Result<Option<Backend>, OtaError> {
        let env = |flavor, env: &Option<PathBuf>| -> Result<Backend, OtaError> {
            Ok(Backend::Env(EnvBackend {
                flavor,
                env: env.clone().unwrap_or_default(),
                slots: c.slots.clone(),
                cmdline: c.cmdline.clone(),
                attempts: c.boot_attempts,
                keys: bundle::load_keys(&c.public_keys)?,
                jobs: jobs.clone(),
            }))
        };
        Ok(match c.backend {
            OtaBackend::None => None,
            OtaBackend::Uboot => Some(env(Flavor::Uboot, &c.fw_env_config)?),
            OtaBackend::Grub => Some(env(Flavor::Grub, &c.grub_env)?),
            OtaBackend::Rauc => Some(Backend::Rauc(Rauc {
                bus: c.rauc_bus.clone(),
                conn: smol::lock::Mutex::new(None),
            })),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Env(e) if e.flavor == Flavor::Uboot => "uboot",
            Backend::Env(_) => "grub",
            Backend::Rauc(_) => "rauc",
        }
    }

    /// A manifest's signature against the configured keys (image
    /// backends; RAUC bundles carry their own signature).
    pub fn check_signature(&self, m: &Manifest) -> Result<(), OtaError> {
        match self {
            Backend::Env(e) => Ok(m.verify(&e.keys)?),
            Backend::Rauc(_) => Ok(()),
        }
    }

    /// The slot (boot name) running now.
    pub async fn booted(&self) -> Result<String, OtaError> {
        match self {
            Backend::Env(e) => {
                let text = smol::fs::read_to_string(&e.cmdline)
                    .await
                    .map_err(|source| OtaError::Io {
                        what: format!("reading {}", e.cmdline.display()),
                        source,
                    })?;
                let slot = booted_from_cmdline(&text).ok_or_else(|| {
                    OtaError::Backend(format!(
                        "{} names no slot (rauc.slot= or konsul.slot=)",
                        e.cmdline.display()
                    ))
                })?;
                if !e.slots.contains_key(&slot) {
                    return Err(OtaError::Backend(format!(
                        "booted slot `{slot}` is not in ota.slots"
                    )));
                }
                Ok(slot)
            }
            Backend::Rauc(r) => {
                let slots = r.slots().await?;
                slots
                    .iter()
                    .find(|s| s.state == "booted")
                    .map(|s| s.bootname.clone())
                    .ok_or_else(|| OtaError::Backend("RAUC reports no booted slot".into()))
            }
        }
    }

    /// Checks a staged bundle before anything is written.
    pub async fn verify(&self, staged: &Path, m: Option<&Manifest>) -> Result<(), OtaError> {
        match (self, m) {
            (Backend::Env(e), Some(m)) => {
                m.verify(&e.keys)?;
                let (p, m) = (staged.to_path_buf(), m.clone());
                smol::unblock(move || bundle::check_image(&p, &m)).await?;
                Ok(())
            }
            (Backend::Env(_), None) => Err(OtaError::Backend("no manifest for the image".into())),
            (Backend::Rauc(r), m) => {
                // A hub rollout names the bundle's size and digest: checked
                // here too, since `Info` would accept any validly signed
                // bundle in its place.
                if let Some(m) = m {
                    let (p, m) = (staged.to_path_buf(), m.clone());
                    smol::unblock(move || bundle::check_image(&p, &m)).await?;
                }
                // RAUC checks the signature against its keyring (and the
                // compatible) without installing.
                let (compatible, version): (String, String) = r
                    .call("Info", &(staged.display().to_string(),))
                    .await
                    .map_err(|e| OtaError::Rejected(format!("RAUC refused the bundle: {e}")))?;
                log::info!("ota: RAUC bundle {version} for {compatible} verified");
                Ok(())
            }
        }
    }

    /// Writes the bundle to the inactive slot and makes it the one booted
    /// next (once, until committed). Returns the target slot.
    pub async fn install(
        &self,
        staged: &Path,
        m: Option<&Manifest>,
        booted: &str,
        progress: Progress,
    ) -> Result<String, OtaError> {
        match self {
            Backend::Env(e) => {
                let m = m
                    .cloned()
                    .ok_or_else(|| OtaError::Backend("no manifest for the image".into()))?;
                let target = e.other(booted)?;
                let dev = e.slots.get(&target).cloned().unwrap_or_default();
                e.apply(e.prepare_vars(booted, &target)).await?;
                let image = staged.to_path_buf();
                let p = progress.clone();
                writer::run(&e.jobs, move |cancel| {
                    bundle::write_slot(&image, &dev, &m, cancel, |done, total| {
                        p((done * 100 / total.max(1)).min(99) as u8, "writing");
                    })
                })
                .await?;
                e.apply(e.activate_vars(booted, &target)).await?;
                Ok(target)
            }
            Backend::Rauc(r) => r.install(staged, progress).await,
        }
    }

    /// The daemon runs on `slot` during its health gate: the boot got this
    /// far, so the bootloader's pre-userspace try counter is refilled (see
    /// the module note in `ota`).
    pub async fn refill(&self, slot: &str) -> Result<(), OtaError> {
        match self {
            Backend::Env(e) => e.apply(e.refill_vars(slot)).await,
            // RAUC exposes no counter short of mark-good; its bootloader
            // backend keeps counting until we commit.
            Backend::Rauc(_) => Ok(()),
        }
    }

    /// Commits `slot`; verified by reading back.
    pub async fn mark_good(&self, slot: &str) -> Result<(), OtaError> {
        match self {
            Backend::Env(e) => e.apply(e.good_vars(slot)).await,
            Backend::Rauc(r) => {
                let (name, msg): (String, String) = r.call("Mark", &("good", "booted")).await?;
                log::info!("ota: RAUC mark good {name}: {msg}");
                let slots = r.slots().await?;
                let primary = r.primary_bootname(&slots).await?;
                let s = slots.iter().find(|s| s.bootname == slot);
                if s.is_none_or(|s| s.boot_status != "good") || primary != slot {
                    return Err(OtaError::Unconfirmed(format!(
                        "after Mark good, RAUC reports slot {slot} as {:?} with primary {primary}",
                        s.map(|s| s.boot_status.as_str())
                    )));
                }
                Ok(())
            }
        }
    }

    /// Marks `bad` bad and makes `good` the one booted next; verified.
    pub async fn rollback(&self, bad: &str, good: &str) -> Result<(), OtaError> {
        match self {
            Backend::Env(e) => e.apply(e.rollback_vars(bad, good)).await,
            Backend::Rauc(r) => {
                let slots = r.slots().await?;
                let name_of = |b: &str| {
                    slots
                        .iter()
                        .find(|s| s.bootname == b)
                        .map(|s| s.name.clone())
                        .ok_or_else(|| OtaError::Backend(format!("RAUC has no slot {b}")))
                };
                let (bad_name, good_name) = (name_of(bad)?, name_of(good)?);
                let _: (String, String) = r.call("Mark", &("bad", bad_name.as_str())).await?;
                let _: (String, String) = r.call("Mark", &("active", good_name.as_str())).await?;
                let slots = r.slots().await?;
                let primary = r.primary_bootname(&slots).await?;
                if primary != good {
                    return Err(OtaError::Unconfirmed(format!(
                        "after rollback, RAUC's primary is {primary}, not {good}"
                    )));
                }
                Ok(())
            }
        }
    }

    /// After an install failed or timed out: the booted slot is the one
    /// booted next, whatever the install got to; verified.
    pub async fn restore_booted(&self, booted: &str) -> Result<(), OtaError> {
        match self {
            Backend::Env(e) => e.apply(e.rollback_vars(&e.other(booted)?, booted)).await,
            Backend::Rauc(r) => {
                let _: (String, String) = r.call("Mark", &("active", "booted")).await?;
                let slots = r.slots().await?;
                let primary = r.primary_bootname(&slots).await?;
                if primary != booted {
                    return Err(OtaError::Unconfirmed(format!(
                        "after Mark active booted, RAUC's primary is {primary}, not {booted}"
                    )));
                }
                Ok(())
            }
        }
    }

    /// After a fallback to `good` (the bootloader's or a rollback a power
    /// cut interrupted): as `rollback`, but writes nothing when the
    /// environment already says so, since this runs at every start.
    pub async fn settle_rollback(&self, bad: &str, good: &str) -> Result<(), OtaError> {
        match self {
            Backend::Env(e) => {
                let vars = e.read().await?;
                let wanted = e.rollback_vars(bad, good);
                if wanted.iter().all(|(k, v)| vars.get(*k) == Some(v)) {
                    return Ok(());
                }
                e.apply(wanted).await
            }
            Backend::Rauc(r) => {
                let slots = r.slots().await?;
                let primary = r.primary_bootname(&slots).await?;
                let marked = slots
                    .iter()
                    .any(|s| s.bootname == bad && s.boot_status == "bad");
                if primary == good && marked {
                    return Ok(());
                }
                self.rollback(bad, good).await
            }
        }
    }

    /// On an ordinary boot (no deployment in flight): the booted, committed
    /// slot gets its try counter back, as `rauc-mark-good.service` does.
    pub async fn keep_good(&self, booted: &str) -> Result<(), OtaError> {
        match self {
            Backend::Env(e) => {
                let vars = e.read().await?;
                let wanted = e.refill_vars(booted);
                if wanted.iter().all(|(k, v)| vars.get(*k) == Some(v)) {
                    return Ok(());
                }
                e.apply(wanted).await
            }
            Backend::Rauc(_) => Ok(()),
        }
    }

    /// Bootloader view for status output: variables or RAUC slot states.
    pub async fn describe(&self) -> Result<serde_json::Value, OtaError> {
        match self {
            Backend::Env(e) => Ok(serde_json::json!(e.read().await?)),
            Backend::Rauc(r) => {
                let slots = r.slots().await?;
                let primary = r.primary_bootname(&slots).await.unwrap_or_default();
                // What bundles must name (update servers match it to boards).
                let compatible: String = match r.proxy().await {
                    Ok(p) => p.get_property("Compatible").await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                Ok(serde_json::json!({
                    "primary": primary,
                    "compatible": compatible,
                    "slots": slots.iter().map(|s| serde_json::json!({
                        "name": s.name, "bootname": s.bootname, "state": s.state,
                        "boot_status": s.boot_status,
                    })).collect::<Vec<_>>(),
                }))
            }
        }
    }
}

/// `rauc.slot=X` or `konsul.slot=X` on a kernel command line.
pub fn booted_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|w| {
        w.strip_prefix("rauc.slot=")
            .or_else(|| w.strip_prefix("konsul.slot="))
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    })
}

type Vars = Vec<(&'static str, String)>;

impl EnvBackend {
    fn other(&self, booted: &str) -> Result<String, OtaError> {
        self.slots
            .keys()
            .find(|k| k.as_str() != booted)
            .cloned()
            .ok_or_else(|| OtaError::Backend("no inactive slot".into()))
    }

    fn var(&self, slot: &str, suffix: &str) -> &'static str {
        // Leaked once per distinct name: there are only a handful (slot
        // names come from the config), and `Vars` stays simple.
        let name = match self.flavor {
            Flavor::Uboot => format!("BOOT_{slot}_{suffix}"),
            Flavor::Grub => format!("{slot}_{suffix}"),
        };
        intern(name)
    }

    fn order_var(&self) -> &'static str {
        match self.flavor {
            Flavor::Uboot => "BOOT_ORDER",
            Flavor::Grub => "ORDER",
        }
    }

    // Each builder lists variables in an order where every prefix is a safe
    // environment: the boot order changes before a slot becomes bootable,
    // and a slot stops being bootable only after it is no longer first.

    fn prepare_vars(&self, booted: &str, target: &str) -> Vars {
        let mut v = vec![(self.order_var(), format!("{booted} {target}"))];
        match self.flavor {
            Flavor::Uboot => v.push((self.var(target, "LEFT"), "0".into())),
            Flavor::Grub => v.push((self.var(target, "OK"), "0".into())),
        }
        v
    }

    fn activate_vars(&self, booted: &str, target: &str) -> Vars {
        let mut v = vec![(self.order_var(), format!("{target} {booted}"))];
        match self.flavor {
            Flavor::Uboot => {
                v.push((self.var(target, "LEFT"), self.attempts.to_string()));
                v.push(("upgrade_available", "1".into()));
            }
            Flavor::Grub => {
                v.push((self.var(target, "OK"), "1".into()));
                v.push((self.var(target, "TRY"), "0".into()));
            }
        }
        v
    }

    fn refill_vars(&self, slot: &str) -> Vars {
        match self.flavor {
            Flavor::Uboot => vec![(self.var(slot, "LEFT"), self.attempts.to_string())],
            Flavor::Grub => vec![(self.var(slot, "TRY"), "0".into())],
        }
    }

    fn good_vars(&self, slot: &str) -> Vars {
        let mut v = self.refill_vars(slot);
        match self.flavor {
            Flavor::Uboot => v.push(("upgrade_available", "0".into())),
            Flavor::Grub => v.push((self.var(slot, "OK"), "1".into())),
        }
        v
    }

    fn rollback_vars(&self, bad: &str, good: &str) -> Vars {
        let mut v = vec![(self.order_var(), format!("{good} {bad}"))];
        match self.flavor {
            Flavor::Uboot => {
                v.push((self.var(bad, "LEFT"), "0".into()));
                v.push((self.var(good, "LEFT"), self.attempts.to_string()));
                v.push(("upgrade_available", "0".into()));
            }
            Flavor::Grub => {
                v.push((self.var(bad, "OK"), "0".into()));
                v.push((self.var(good, "OK"), "1".into()));
                v.push((self.var(good, "TRY"), "0".into()));
            }
        }
        v
    }

    fn tool(&self) -> &'static str {
        match self.flavor {
            Flavor::Uboot => "fw_setenv",
            Flavor::Grub => "grub-editenv",
        }
    }

    /// Every variable of the environment.
    async fn read(&self) -> Result<BTreeMap<String, String>, OtaError> {
        let mut cmd = match self.flavor {
            Flavor::Uboot => Command::new("fw_printenv"),
            Flavor::Grub => Command::new("grub-editenv"),
        };
        match self.flavor {
            Flavor::Uboot => cmd.arg("-c").arg(&self.env),
            Flavor::Grub => cmd.arg(&self.env).arg("list"),
        };
        let out = writer::run(&self.jobs, move |_| run_tools(vec![cmd]))
            .await
            .map_err(|source| OtaError::Io {
                what: "running the environment reader".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(OtaError::Backend(format!(
                "reading the boot environment failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// Sets `vars` (in order), then reads back and compares.
    async fn apply(&self, vars: Vars) -> Result<(), OtaError> {
        let job = match self.flavor {
            // One fw_setenv per variable, in the listed order, which keeps
            // every intermediate environment safe to boot (see the *_vars
            // builders). Not a script: u-boot-tools wants "name value"
            // lines, libubootenv "name=value", and libubootenv silently
            // ignores the other form.
            Flavor::Uboot => vars
                .iter()
                .map(|(k, v)| {
                    let mut c = Command::new("fw_setenv");
                    c.arg("-c").arg(&self.env).args([k, v.as_str()]);
                    c
                })
                .collect::<Vec<_>>()
                .into(),
            Flavor::Grub => EnvJob::Grub {
                env: self.env.clone(),
                set: vars.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            },
        };
        // Not cancelled once begun: every prefix of the list is a safe
        // environment, but a half-run list is not what was verified.
        let out = writer::run(&self.jobs, move |_| match job {
            EnvJob::Tools(cmds) => run_tools(cmds),
            EnvJob::Grub { env, set } => grub_set(&env, &set),
        })
        .await
        .map_err(|source| OtaError::Io {
            what: format!("running {}", self.tool()),
            source,
        })?;
        if !out.status.success() {
            return Err(OtaError::Backend(format!(
                "{} failed ({}): {}",
                self.tool(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let now = self.read().await?;
        for (k, v) in &vars {
            if now.get(*k) != Some(v) {
                return Err(OtaError::Unconfirmed(format!(
                    "{k} reads back as {:?} after setting it to {v:?}",
                    now.get(*k)
                )));
            }
        }
        Ok(())
    }
}

/// An environment write, as run on the blocking pool.
enum EnvJob {
    Tools(Vec<Command>),
    Grub { env: PathBuf, set: Vec<String> },
}

impl From<Vec<Command>> for EnvJob {
    fn from(cmds: Vec<Command>) -> EnvJob {
        EnvJob::Tools(cmds)
    }
}

/// `grub-editenv set` made atomic. grub-editenv rewrites the file in place
/// (open with O_TRUNC, then write): a power cut between the two leaves an
/// empty, invalid block, and GRUB then boots with no variables at all. So
/// a copy is edited (grub-editenv fsyncs it) and renamed over the original,
/// and the directory is synced: after a power cut the file is the old
/// environment or the new one.
// Runs on the blocking pool as a counted job (`EnvBackend::apply`).
#[allow(clippy::disallowed_methods)]
fn grub_set(env: &Path, set: &[String]) -> std::io::Result<Output> {
    let mut name = env.file_name().unwrap_or_default().to_owned();
    name.push(".konsul-new");
    let tmp = env.with_file_name(name);
    std::fs::copy(env, &tmp)?;
    let out = Command::new("grub-editenv")
        .arg(&tmp)
        .arg("set")
        .args(set)
        .output()?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Ok(out);
    }
    std::fs::rename(&tmp, env)?;
    let dir = env
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()?;
    Ok(out)
}

/// Runs `cmds` in order, stopping at the first that fails; the last
/// output.
// Runs on the blocking pool as a counted job (`EnvBackend::read`/`apply`
// through `writer::run`), never on the executor.
#[allow(clippy::disallowed_methods)]
fn run_tools(cmds: Vec<Command>) -> std::io::Result<Output> {
    let mut last = None;
    for mut c in cmds {
        let out = c.output()?;
        let failed = !out.status.success();
        last = Some(out);
        if failed {
            break;
        }
    }
    last.ok_or_else(|| std::io::Error::other("no variables to set"))
}

fn intern(s: String) -> &'static str {
    use std::sync::Mutex;
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.iter().find(|n| **n == s) {
        return n;
    }
    let leaked: &'static str = Box::leak(s.into_boxed_str());
    names.push(leaked);
    leaked
}

/// One RAUC slot as `GetSlotStatus` reports it.
#[derive(Debug, Clone, Default)]
pub struct RaucSlot {
    pub name: String,
    pub bootname: String,
    pub state: String,
    pub boot_status: String,
}

const RAUC_NAME: &str = "de.pengutronix.rauc";
const RAUC_IFACE: &str = "de.pengutronix.rauc.Installer";

impl Rauc {
    async fn conn(&self) -> Result<zbus::Connection, OtaError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = crate::support::bus::builder(&self.bus)
            .map_err(OtaError::Rauc)?
            .build()
            .await
            .map_err(OtaError::Rauc)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn proxy(&self) -> Result<zbus::Proxy<'static>, OtaError> {
        let conn = self.conn().await?;
        zbus::Proxy::new(&conn, RAUC_NAME, "/", RAUC_IFACE)
            .await
            .map_err(OtaError::Rauc)
    }

    async fn call<B, R>(&self, method: &str, body: &B) -> Result<R, OtaError>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
        R: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
    {
        let p = self.proxy().await?;
        p.call(method, body).await.map_err(|e| match e {
            zbus::Error::MethodError(name, msg, _) => OtaError::Rejected(format!(
                "RAUC {method}: {}{}",
                name.as_str(),
                msg.map(|m| format!(": {m}")).unwrap_or_default()
            )),
            e => OtaError::Rauc(e),
        })
    }

    pub async fn slots(&self) -> Result<Vec<RaucSlot>, OtaError> {
        let raw: Vec<(String, std::collections::HashMap<String, OwnedValue>)> =
            self.call("GetSlotStatus", &()).await?;
        let s = |m: &std::collections::HashMap<String, OwnedValue>, k: &str| {
            m.get(k)
                .and_then(|v| String::try_from(v.clone()).ok())
                .unwrap_or_default()
        };
        Ok(raw
            .into_iter()
            .map(|(name, m)| RaucSlot {
                bootname: s(&m, "bootname"),
                state: s(&m, "state"),
                boot_status: s(&m, "boot-status"),
                name,
            })
            .filter(|s| !s.bootname.is_empty())
            .collect())
    }

    async fn primary_bootname(&self, slots: &[RaucSlot]) -> Result<String, OtaError> {
        let primary: String = self.call("GetPrimary", &()).await?;
        Ok(slots
            .iter()
            .find(|s| s.name == primary)
            .map(|s| s.bootname.clone())
            .unwrap_or(primary))
    }

    async fn install(&self, bundle: &Path, progress: Progress) -> Result<String, OtaError> {
        let p = self.proxy().await?;
        // Subscribed before the call: a fast install cannot complete unseen.
        let completed = p
            .receive_signal("Completed")
            .await
            .map_err(OtaError::Rauc)?;
        let progress_stream = p
            .receive_property_changed::<(i32, String, i32)>("Progress")
            .await;
        let operation: String = p.get_property("Operation").await.unwrap_or_default();
        if operation == "installing" {
            // We crashed (or restarted) while RAUC kept going: wait for it
            // instead of starting a second install.
            log::info!("ota: RAUC is still installing; waiting for it to complete");
        } else {
            let args: std::collections::HashMap<&str, zbus::zvariant::Value<'_>> =
                std::collections::HashMap::new();
            let _: () = self
                .call("InstallBundle", &(bundle.display().to_string(), args))
                .await?;
        }
        enum Ev {
            Done(i32),
            Progress(i32, String),
        }
        let done = completed.map(|m| Ev::Done(m.body().deserialize::<i32>().unwrap_or(-1)));
        let prog = progress_stream.then(|c| async move {
            match c.get().await {
                Ok((pct, msg, _)) => Ev::Progress(pct, msg),
                Err(_) => Ev::Progress(-1, String::new()),
            }
        });
        let events = done.or(prog);
        let mut events = std::pin::pin!(events);
        let result = loop {
            match events.next().await {
                Some(Ev::Done(r)) => break r,
                Some(Ev::Progress(pct, msg)) if pct >= 0 => {
                    progress(pct.clamp(0, 99) as u8, &msg);
                }
                Some(Ev::Progress(..)) => {}
                None => return Err(OtaError::Backend("lost RAUC's Completed signal".into())),
            }
        };
        if result != 0 {
            let err: String = p.get_property("LastError").await.unwrap_or_default();
            return Err(OtaError::Rejected(format!(
                "RAUC install failed ({result}): {err}"
            )));
        }
        let slots = self.slots().await?;
        self.primary_bootname(&slots).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_names_the_slot() {
        assert_eq!(
            booted_from_cmdline("console=ttyS0 root=/dev/mmcblk0p3 rauc.slot=B quiet\n"),
            Some("B".into())
        );
        assert_eq!(booted_from_cmdline("konsul.slot=A"), Some("A".into()));
        assert_eq!(booted_from_cmdline("root=/dev/sda1 rauc.slot="), None);
    }

    #[test]
    fn rollback_and_activate_variables() {
        let e = EnvBackend {
            flavor: Flavor::Uboot,
            env: PathBuf::new(),
            slots: [("A".into(), PathBuf::new()), ("B".into(), PathBuf::new())].into(),
            cmdline: PathBuf::new(),
            attempts: 3,
            keys: Vec::new(),
            jobs: Arc::default(),
        };
        assert_eq!(
            e.activate_vars("A", "B"),
            vec![
                ("BOOT_ORDER", "B A".to_string()),
                ("BOOT_B_LEFT", "3".into()),
                ("upgrade_available", "1".into())
            ]
        );
        assert_eq!(e.rollback_vars("B", "A")[0], ("BOOT_ORDER", "A B".into()));
        assert_eq!(e.other("A").unwrap(), "B");
    }
}
