//! Compiles proto/ with protox (a pure-Rust protobuf compiler), so neither
//! this machine nor a Yocto/Buildroot build needs `protoc`; and keeps the
//! DWARF unwind tables out of release binaries.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut protos = vec!["proto/konsul/edge/v1/sync.proto"];
    // Sparkplug's own schema, Eclipse Tahu's text as published.
    if std::env::var_os("CARGO_FEATURE_SPARKPLUG").is_some() {
        protos.push("proto/sparkplug_b/sparkplug_b.proto");
    }
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(&protos, ["proto"])?;
    let mut config = prost_build::Config::new();
    config.btree_map(["."]);
    // The edge node sends and reads scalar metrics only: Sparkplug's
    // templates, data sets, property sets and metadata decode as an empty
    // message (their bytes skipped), so their code is not in the binary.
    for opaque in [
        "Template",
        "DataSet",
        "PropertyValue",
        "PropertySet",
        "PropertySetList",
        "MetaData",
    ] {
        config.extern_path(
            format!(".org.eclipse.tahu.protobuf.Payload.{opaque}"),
            "crate::sparkplug::payload::Opaque",
        );
    }
    config.compile_fds(fds)?;
    drop_unwind_tables()?;
    Ok(())
}

/// The release profile aborts on panic, so nothing ever unwinds, yet
/// `.eh_frame` and `.eh_frame_hdr` take 730 KB of the stripped aarch64
/// binary (18 % of the 4 MB budget; docs/decisions/0007-binary-size.md).
/// `-C force-unwind-tables=no` cannot remove them: std is prebuilt with
/// them and the aarch64 outliner gives every outlined sequence its own
/// entry. So the linker discards the section. The price: a panic prints
/// its message and location but no backtrace; core dumps are still read
/// with the image's debug symbols. `KONSUL_KEEP_UNWIND_TABLES=1` keeps them
/// (profiling builds that unwind with perf).
fn drop_unwind_tables() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=KONSUL_KEEP_UNWIND_TABLES");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let keep = std::env::var_os("KONSUL_KEEP_UNWIND_TABLES").is_some_and(|v| v == "1");
    if !release || !linux || keep {
        return Ok(());
    }
    let script = PathBuf::from(std::env::var("OUT_DIR")?).join("discard-unwind-tables.ld");
    // INSERT keeps the toolchain's default script and only adds the discard.
    std::fs::write(
        &script,
        "SECTIONS { /DISCARD/ : { *(.eh_frame) } }\nINSERT AFTER .text;\n",
    )?;
    println!("cargo:rustc-link-arg-bins=-Wl,--no-eh-frame-hdr");
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    Ok(())
}
