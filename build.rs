//! Compiles proto/ with protox (a pure-Rust protobuf compiler), so neither
//! this machine nor a Yocto/Buildroot build needs `protoc`; keeps the
//! DWARF unwind tables out of release binaries; and gzips the hub's fleet
//! page (src/http/ui/) so the binary carries a third of its bytes.

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
    if std::env::var_os("CARGO_FEATURE_FLEET_UI").is_none() {
        return Ok(());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for f in ["index.html", "app.js", "app.css"] {
        let src = format!("src/http/ui/{f}");
        println!("cargo:rerun-if-changed={src}");
        // Indentation and whole-line `//` comments go: the page's files
        // have no multi-line strings they could be part of.
        let text = std::fs::read_to_string(&src)?;
        let squeezed: String = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .flat_map(|l| [l, "\n"])
            .collect();
        std::fs::write(out.join(format!("{f}.gz")), gzip(squeezed.as_bytes()))?;
    }
    Ok(())
}

/// RFC 1952 gzip of one RFC 1951 block with the fixed Huffman codes and a
/// greedy LZ77 match (hash chains, 32 KiB window). Not the smallest
/// encoding, but a build-time dependency-free one: every browser inflates
/// it, and on the page's text it is about a third of the input.
fn gzip(data: &[u8]) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        fn put(&mut self, v: u32, len: u32) {
            self.acc |= u64::from(v) << self.n;
            self.n += len;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// A Huffman code: sent most significant bit first.
        fn code(&mut self, code: u32, len: u32) {
            self.put(code.reverse_bits() >> (32 - len), len);
        }
        fn literal(&mut self, sym: u32) {
            match sym {
                0..=143 => self.code(0x30 + sym, 8),
                144..=255 => self.code(0x190 + sym - 144, 9),
                256..=279 => self.code(sym - 256, 7),
                _ => self.code(0xC0 + sym - 280, 8),
            }
        }
    }
    const LEN_BASE: [u32; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const LEN_EXTRA: [u32; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    const DIST_BASE: [u32; 30] = [
        1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
        2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
    ];
    const DIST_EXTRA: [u32; 30] = [
        0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12,
        13, 13,
    ];
    let mut b = Bits {
        out: vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255],
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // BFINAL
    b.put(1, 2); // BTYPE 01: fixed codes
    let mut chains: std::collections::HashMap<[u8; 3], Vec<usize>> = Default::default();
    let mut i = 0;
    while i < data.len() {
        let (mut best_len, mut best_dist) = (0, 0);
        if i + 3 <= data.len() {
            let key = [data[i], data[i + 1], data[i + 2]];
            for &j in chains.get(&key).into_iter().flatten().rev().take(256) {
                if i - j > 32768 {
                    break;
                }
                let len = (0..258.min(data.len() - i))
                    .take_while(|&k| data[j + k] == data[i + k])
                    .count();
                if len > best_len {
                    (best_len, best_dist) = (len, i - j);
                }
            }
        }
        let step = if best_len >= 3 {
            let l = LEN_BASE
                .iter()
                .rposition(|&x| x as usize <= best_len)
                .unwrap_or(0);
            b.literal(257 + l as u32);
            b.put(best_len as u32 - LEN_BASE[l], LEN_EXTRA[l]);
            let d = DIST_BASE
                .iter()
                .rposition(|&x| x as usize <= best_dist)
                .unwrap_or(0);
            b.code(d as u32, 5);
            b.put(best_dist as u32 - DIST_BASE[d], DIST_EXTRA[d]);
            best_len
        } else {
            b.literal(u32::from(data[i]));
            1
        };
        for k in i..(i + step) {
            if k + 3 <= data.len() {
                chains
                    .entry([data[k], data[k + 1], data[k + 2]])
                    .or_default()
                    .push(k);
            }
        }
        i += step;
    }
    b.literal(256);
    b.put(0, 7); // flush the last byte
    let mut out = b.out;
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    out.extend_from_slice(&(!crc).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
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
