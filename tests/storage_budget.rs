//! `resources.storage_limit` as one budget: the OTA staging share is
//! enforced by the coordinator (the split and the refusal of parts that
//! do not fit are in tests/config.rs's fixtures and `config::budget`).

mod common;

#[path = "common/ota_rig.rs"]
mod ota_rig;

use ota_rig::*;

/// A bundle larger than `ota.staging_max_size` is refused before anything
/// is staged or written; one that fits installs.
#[test]
fn a_bundle_over_the_staging_share_is_refused_before_staging() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    let rig = Rig::new(Flavor::Uboot, "  staging_max_size: 8Ki\n");
    let d = rig.start();
    let img = rig.image("big.img", &new_image(0x22, 10_000), "2.0.0", None);
    let r = install(&d, &img);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("ota.staging_max_size"), "{}", r.text());
    assert_eq!(
        ota(&d)["state"],
        "idle",
        "a refused request changes nothing"
    );
    assert_eq!(rig.slot("B"), vec![OLD_B; SLOT_SIZE]);

    let img = rig.image("small.img", &new_image(0x33, 4_000), "2.0.1", None);
    assert_eq!(install(&d, &img).status, 200);
}
