//! Power cuts during OTA, for each backend (issue 12): the U-Boot
//! environment through the real `fw_setenv`/`fw_printenv` (private
//! fw_env.config), GRUB through the real `grub-editenv`, and RAUC (the real
//! `rauc service`) on a private dbus-daemon bus. The rigs are the ones
//! tests/ota.rs and tests/ota_rauc.rs use.
//!
//! Each run installs an update and cuts the power (kill -9 of the daemon,
//! then a simulated boot: the bootloader's slot choice on the real boot
//! environment, a new boot id, the booted-slot source the daemon reads) at
//! one step boundary (the first runs take every boundary in turn) or at a
//! random point, and once more at a random point in some runs. Every reboot
//! the daemon asks for is carried out the same way. One run in four has a
//! health gate that fails. Invariants, counted per backend:
//! - `wrong_slot`: a boot into the new slot that the daemon does not put
//!   under its health gate; a run that ends committed on the old slot, or
//!   not committed on the new one; a bootloader that would not boot the
//!   outcome's slot next (once the daemon's start-up settled it); a failed
//!   gate that did not roll back, or a healthy update that did not commit
//!   (unless the bootloader gave up on its trial boot: a power cut before
//!   the daemon ran, which GRUB's single try allows);
//! - `stuck`: the coordinator did not reach committed, rolled back or
//!   failed within its step timeouts (no progress within `STUCK`);
//! - `lost`: the hub report (the replicated `status/{node}` record, queued
//!   in the outbox, committed with each transition) does not show the
//!   run's outcome;
//! - `duplicated`: a transition recorded (and so reported) twice in a run.
//!
//! Each backend prints `ota-powercut <backend>: runs=N lost=0 stuck=0
//! wrong_slot=0 duplicated=0`. 30 runs per backend by default;
//! `KONSUL_SOAK=N` runs N (`KONSUL_SOAK=1`: 300). `KONSUL_SEED` repeats a
//! run's random choices.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[path = "common/ota_rauc_rig.rs"]
mod ota_rauc_rig;
#[path = "common/ota_rig.rs"]
mod ota_rig;

/// No log line for this long, with no kill due: the coordinator is stuck.
/// Well above every step's own limit in the configs below.
const STUCK: Duration = Duration::from_secs(30);

/// More boots than this in one run (two power cuts, the update's reboot,
/// a rollback's reboot, slack) is a reboot loop: counted as stuck.
const MAX_BOOTS: usize = 12;

/// Where the first runs cut the power: right after each of these log
/// lines (step boundaries, persisted before they are logged).
const BOUNDARIES: [&str; 10] = [
    "-> downloading",
    "-> verifying",
    "-> installing",
    "install attempt",
    "-> pending-reboot",
    "running the reboot command",
    "-> booted-pending-commit",
    "health gate started",
    "-> rolled-back",
    "-> committed",
];

fn runs() -> usize {
    match std::env::var("KONSUL_SOAK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(1) => 300,
        Some(n) if n > 1 => n,
        _ => 30,
    }
}

/// A device under test: its bootloader, its slots, its daemon.
trait Device {
    fn name(&self) -> &'static str;
    fn dir(&self) -> &Path;
    /// Power on: the bootloader chooses a slot (and the booted-slot source
    /// says so); returns it.
    fn boot(&mut self) -> String;
    fn start(&self) -> Daemon;
    /// The update for run `i`.
    fn update(&self, i: usize) -> PathBuf;
    fn set_healthy(&self, yes: bool) {
        let p = self.dir().join("healthy");
        if yes {
            std::fs::write(p, "").unwrap();
        } else {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct Env {
    rig: ota_rig::Rig,
    images: Vec<PathBuf>,
}

impl Env {
    fn new(flavor: ota_rig::Flavor) -> Env {
        let rig = ota_rig::Rig::new(
            flavor,
            "  commit_deadline: 1s\n  step_timeout: 20s\n  max_unconfirmed_boots: 50\n",
        );
        let images = (0..2)
            .map(|i| {
                let data = ota_rig::new_image(0x40 + i as u8, 200_000 + i * 1000);
                rig.image(&format!("v{i}.img"), &data, &format!("{i}.0"), None)
            })
            .collect();
        Env { rig, images }
    }
}

impl Device for Env {
    fn name(&self) -> &'static str {
        match self.rig.flavor {
            ota_rig::Flavor::Uboot => "uboot",
            ota_rig::Flavor::Grub => "grub",
        }
    }
    fn dir(&self) -> &Path {
        self.rig.dir.path()
    }
    fn boot(&mut self) -> String {
        self.rig.boot()
    }
    fn start(&self) -> Daemon {
        self.rig.start()
    }
    fn update(&self, i: usize) -> PathBuf {
        self.images[i % self.images.len()].clone()
    }
}

struct Rauc {
    rig: ota_rauc_rig::Rig,
    bundles: Vec<PathBuf>,
}

impl Rauc {
    fn new() -> Rauc {
        let mut rig = ota_rauc_rig::Rig::new();
        let cfg = std::fs::read_to_string(rig.path("edge.yaml")).unwrap();
        std::fs::write(
            rig.path("edge.yaml"),
            cfg.replace(
                "commit_deadline: 20s\n",
                "commit_deadline: 1s\n  step_timeout: 20s\n  max_unconfirmed_boots: 50\n",
            ),
        )
        .unwrap();
        let bundles = (0..2u8)
            .map(|i| {
                let payload: Vec<u8> = (0..60_000u32).map(|j| (j % 251) as u8 ^ i).collect();
                rig.bundle(&format!("v{i}"), &payload, &format!("{i}.0"), "ca")
            })
            .collect();
        rig.start_rauc("A");
        Rauc { rig, bundles }
    }
}

impl Device for Rauc {
    fn name(&self) -> &'static str {
        "rauc"
    }
    fn dir(&self) -> &Path {
        self.rig.dir.path()
    }
    /// The custom bootloader's choice: the primary slot while it is good,
    /// else the other one. `rauc service` restarts with it (a power cut
    /// ends RAUC too, and any bundle it had mounted).
    fn boot(&mut self) -> String {
        self.rig.rauc = None;
        let mnt = self.rig.path("mnt");
        if let Ok(entries) = std::fs::read_dir(&mnt) {
            for e in entries.flatten() {
                let _ = Command::new("umount").arg("-l").arg(e.path()).output();
            }
        }
        let state = self.rig.bootstate();
        let get = |k: &str| {
            state
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_owned)
        };
        let primary = get("primary").unwrap_or_else(|| "A".into());
        let other = if primary == "A" { "B" } else { "A" };
        let slot = if get(&primary).is_none_or(|s| s == "good") {
            primary
        } else {
            other.to_owned()
        };
        self.rig.start_rauc(&slot);
        slot
    }
    fn start(&self) -> Daemon {
        ota_rauc_rig::start(&self.rig)
    }
    fn update(&self, i: usize) -> PathBuf {
        self.bundles[i % self.bundles.len()].clone()
    }
}

#[derive(Default, Debug)]
struct Counts {
    runs: usize,
    lost: usize,
    stuck: usize,
    wrong_slot: usize,
    duplicated: usize,
}

/// The parent pid of `pid`, from /proc.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces, so after the ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A power cut: the daemon and everything it started (a `fw_setenv` or
/// `grub-editenv` half way through its write, a health check) die at
/// once. The daemon is stopped first so it starts nothing new meanwhile.
fn power_cut(d: &mut Daemon) {
    let pid = d.pid() as u32;
    let _ = Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status();
    let mut tree = vec![pid];
    // Descendants, by repeated passes over /proc (a few processes at most).
    loop {
        let more: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| !tree.contains(p) && ppid(*p).is_some_and(|pp| tree.contains(&pp)))
            .collect();
        if more.is_empty() {
            break;
        }
        tree.extend(more);
    }
    let mut kill = Command::new("kill");
    kill.arg("-KILL");
    for p in &tree {
        kill.arg(p.to_string());
    }
    let _ = kill.output();
    d.wait_exit();
}

fn ota_status(d: &Daemon) -> serde_json::Value {
    d.get("/v1/edge/ota").json()
}

/// Where a power cut falls in a run.
#[derive(Clone, Debug)]
enum Cut {
    After(&'static str),
    At(Duration),
}

/// What a run left for the hub.
struct Reported {
    /// (log row, state) since the run began.
    rows: Vec<(i64, String)>,
    /// The hub report's (deployment, state).
    report: Option<(String, String)>,
    /// The outbox holds the report for the hub.
    queued: bool,
}

/// Transitions recorded since log row `after`, and the hub report.
fn report(dir: &Path, after: i64) -> Reported {
    let c = rusqlite::Connection::open(dir.join("konsul.db")).unwrap();
    let mut st = c
        .prepare("SELECT id, state FROM ota_log WHERE id > ?1 ORDER BY id")
        .unwrap();
    let rows = st
        .query_map([after], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<(i64, String)>, _>>()
        .unwrap();
    let body: Option<String> = c
        .query_row(
            "SELECT body FROM records WHERE key = 'status/test-node'",
            [],
            |r| r.get(0),
        )
        .ok();
    let rep = body.map(|b| {
        let j: serde_json::Value = serde_json::from_str(&b).unwrap();
        (
            j["deployment"].as_str().unwrap_or_default().to_owned(),
            j["state"].as_str().unwrap_or_default().to_owned(),
        )
    });
    let queued: i64 = c
        .query_row(
            "SELECT count(*) FROM outbox WHERE key = 'status/test-node'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    Reported {
        rows,
        report: rep,
        queued: queued == 1,
    }
}

fn last_log_id(dir: &Path) -> i64 {
    if !dir.join("konsul.db").exists() {
        return 0;
    }
    let c = rusqlite::Connection::open(dir.join("konsul.db")).unwrap();
    c.query_row("SELECT coalesce(max(id), 0) FROM ota_log", [], |r| r.get(0))
        .unwrap()
}

/// After a boot into a slot other than `from`: the daemon must hold the
/// new slot under its gate (or have decided), never run it unchecked.
fn gated(d: &Daemon) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let st = ota_status(d);
        if matches!(
            st["state"].as_str(),
            Some("booted-pending-commit" | "committed" | "rolled-back")
        ) {
            return true;
        }
        if Instant::now() > end {
            eprintln!("booted the new slot in state {}", st["state"]);
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One install with its power cuts; adds to `n`. Returns the slot booted
/// at the end.
fn one_run(
    dev: &mut dyn Device,
    i: usize,
    from: String,
    cuts: Vec<Cut>,
    healthy: bool,
    n: &mut Counts,
) -> String {
    let name = dev.name();
    let note = |what: &str| eprintln!("ota-powercut {name} run {i}: {what}");
    dev.set_healthy(healthy);
    let log_start = last_log_id(dev.dir());
    let mut d = dev.start();
    let r = d.req(
        "POST",
        "/v1/edge/ota/install",
        Some(&serde_json::json!({"path": dev.update(i)}).to_string()),
    );
    if r.status != 200 {
        note(&format!("install refused: {}", r.text()));
        n.stuck += 1;
        power_cut(&mut d);
        return dev.boot();
    }
    let id = r.json()["deployment"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let started = Instant::now();
    let mut cuts = cuts.into_iter().peekable();
    let mut booted = from.clone();
    // The first daemon's start-up was before the install.
    let mut restarted = false;
    let mut boots = 0;
    // One daemon lifetime per iteration.
    'life: loop {
        let mut last_line = Instant::now();
        loop {
            // A timed cut due before the next line?
            let due = match cuts.peek() {
                Some(Cut::At(t)) => Some((started + *t).saturating_duration_since(Instant::now())),
                _ => None,
            };
            let wait = due
                .unwrap_or(STUCK)
                .min(STUCK.saturating_sub(last_line.elapsed()));
            let line = match d.log.recv_timeout(wait) {
                Ok(l) => Some(l),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(_) => {
                    note("the daemon died");
                    n.stuck += 1;
                    break 'life;
                }
            };
            let cut_now = match (&line, cuts.peek()) {
                (Some(l), Some(Cut::After(p))) if l.contains(p) => true,
                (None, Some(Cut::At(t))) if started.elapsed() >= *t => true,
                (None, _) if last_line.elapsed() >= STUCK => {
                    let st = ota_status(&d);
                    note(&format!(
                        "no progress for {STUCK:?} in state {}",
                        st["state"]
                    ));
                    n.stuck += 1;
                    break 'life;
                }
                _ => false,
            };
            if cut_now {
                cuts.next();
            }
            let Some(l) = line.filter(|_| !cut_now) else {
                if cut_now {
                    power_cut(&mut d);
                    break;
                }
                continue;
            };
            last_line = Instant::now();
            if l.contains("running the reboot command") {
                power_cut(&mut d);
                break;
            }
            if l.contains("-> committed") || l.contains("-> failed") {
                // Decided, and no reboot follows: the run is over.
                power_cut(&mut d);
                break 'life;
            }
            if l.contains("ota: start-up checks done") && restarted {
                // Recovery after this boot is done: judge the boot.
                let st = ota_status(&d);
                if booted != from && st["id"] == id.as_str() && !gated(&d) {
                    n.wrong_slot += 1;
                    note(&format!("slot {booted} runs outside the gate"));
                }
                let st = ota_status(&d);
                let decided = matches!(st["state"].as_str(), Some("committed" | "failed"))
                    || (st["state"] == "rolled-back" && booted == from);
                if st["id"] == id.as_str()
                    && decided
                    && cuts.peek().is_none_or(|c| matches!(c, Cut::At(_)))
                {
                    // Nothing more will happen in this run (a timed cut
                    // not yet due is dropped).
                    power_cut(&mut d);
                    break 'life;
                }
            }
        }
        boots += 1;
        if boots > MAX_BOOTS {
            note(&format!("{boots} boots in one run: a reboot loop"));
            n.stuck += 1;
            break;
        }
        // The power comes back.
        booted = dev.boot();
        d = dev.start();
        restarted = true;
    }
    // The outcome, and what the bootloader does next.
    let st = {
        let mut d = dev.start();
        // Start-up settles the bootloader (counters, a fallback's marks);
        // the outcome is judged once it has.
        d.wait_log(|l| l.contains("ota: start-up checks done"));
        let st = ota_status(&d);
        power_cut(&mut d);
        st
    };
    let state = st["state"].as_str().unwrap_or_default().to_owned();
    let target = st["target_slot"].as_str().unwrap_or_default().to_owned();
    let next = dev.boot();
    // A healthy update may still end rolled back when the bootloader gave
    // up on it: a power cut in its trial boot before the daemon ran (GRUB
    // allows one try). Never by the daemon's own decision.
    let fell_back = st["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("the bootloader fell back"));
    let wrong = match state.as_str() {
        "committed" => !healthy || booted != target || target == from || next != target,
        "rolled-back" => (healthy && !fell_back) || booted != from || next != from,
        "failed" => healthy || booted != from || next != from,
        _ => true,
    };
    if wrong && st["id"] == id.as_str() {
        n.wrong_slot += 1;
        note(&format!(
            "ended {state} (healthy {healthy}) from {from} target {target}, booted {booted}, next boot {next}"
        ));
    } else if st["id"] != id.as_str() {
        n.stuck += 1;
        note(&format!("the deployment is {} not {id}", st["id"]));
    }
    // Reports: every transition once, the last one queued for the hub.
    let Reported {
        rows,
        report: rep,
        queued,
    } = report(dev.dir(), log_start);
    let mut seen = std::collections::BTreeSet::new();
    let mut prev = String::new();
    for (_, s) in &rows {
        if *s != prev && !seen.insert(s.clone()) {
            n.duplicated += 1;
            note(&format!("transition into {s} recorded twice"));
        }
        prev.clone_from(s);
    }
    if rep != Some((id.clone(), state.clone())) || !queued || prev != state {
        n.lost += 1;
        note(&format!(
            "hub report {rep:?} (queued {queued}), log ends {prev}, state {state}"
        ));
    }
    n.runs += 1;
    next
}

fn harness(dev: &mut dyn Device) {
    let seed = std::env::var("KONSUL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut n = Counts::default();
    let mut booted = dev.boot();
    let t0 = Instant::now();
    for i in 0..runs() {
        let boundary = BOUNDARIES.get(i).copied();
        let mut cuts = vec![match boundary {
            Some(b) => Cut::After(b),
            // An install takes a few hundred ms up to its reboot here.
            None => Cut::At(Duration::from_millis(rng.u64(0..700))),
        }];
        if i % 3 == 2 {
            // A second cut, later in the same run (in the next boot).
            cuts.push(Cut::At(Duration::from_millis(rng.u64(700..1500))));
        }
        // "-> rolled-back" needs a failing gate to be reached; the others
        // fail at random.
        let healthy = match boundary {
            Some(b) => b != "-> rolled-back" && b != "health gate started",
            None => rng.u8(0..4) != 0,
        };
        booted = one_run(dev, i, booted, cuts, healthy, &mut n);
    }
    let line = format!(
        "ota-powercut {}: runs={} lost={} stuck={} wrong_slot={} duplicated={} (seed {seed}, {:.0?})",
        dev.name(),
        n.runs,
        n.lost,
        n.stuck,
        n.wrong_slot,
        n.duplicated,
        t0.elapsed()
    );
    // Past the test harness's capture: CI's log shows it on success too.
    let _ = writeln!(std::io::stderr(), "{line}");
    assert!(n.runs >= runs(), "{line}");
    assert_eq!(
        (n.lost, n.stuck, n.wrong_slot, n.duplicated),
        (0, 0, 0, 0),
        "{line}"
    );
}

#[test]
fn power_cuts_during_uboot_updates() {
    if !ota_rig::have("fw_setenv") || !ota_rig::have("mkenvimage") {
        return;
    }
    harness(&mut Env::new(ota_rig::Flavor::Uboot));
}

#[test]
fn power_cuts_during_grub_updates() {
    if !ota_rig::have("grub-editenv") {
        return;
    }
    harness(&mut Env::new(ota_rig::Flavor::Grub));
}

#[test]
fn power_cuts_during_rauc_updates() {
    if ota_rauc_rig::cannot_run() {
        return;
    }
    harness(&mut Rauc::new());
}
