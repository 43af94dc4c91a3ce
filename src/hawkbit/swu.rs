//! Our signed image inside SWUpdate's `.swu` (module note in `hawkbit`).
//!
//! Servers made for SWUpdate and RAUC (gooseBit) take only a `.swu` or a
//! RAUC bundle: one file per software, whose header they parse. For the
//! `uboot` and `grub` backends our image needs its signed `.manifest` next
//! to it, so it travels as a `.swu`: a cpio "newc" archive whose first
//! entry is `sw-description` (read by the server, ignored here), holding
//! `<image>` and `<image>.manifest`. The archive is unpacked once, after
//! its digest was checked, into `<image>` and the manifest files the
//! handover takes; the manifest's signature then covers the image as for
//! any other input. Anything else in the archive is skipped; an archive
//! without exactly that pair is refused before any slot write.

use std::io::{self, Read, Write};
use std::path::Path;

const MAGIC: &[u8; 6] = b"070701";
/// `070702`: the same format with a checksum field (ignored).
const MAGIC_CRC: &[u8; 6] = b"070702";
const HEADER: usize = 110;
const TRAILER: &str = "TRAILER!!!";
const MAX_NAME: u64 = 4096;
const MAX_MANIFEST: u64 = 64 << 10;

/// Whether `path` starts like a cpio "newc" archive.
// Runs on the blocking pool (`download_os`).
#[allow(clippy::disallowed_methods)]
pub(super) fn is_swu(path: &Path) -> bool {
    let mut magic = [0u8; 6];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == MAGIC || &magic == MAGIC_CRC)
}

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn hex_field(h: &[u8], at: usize) -> io::Result<u64> {
    std::str::from_utf8(&h[at..at + 8])
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| bad("a cpio header field is not hex".into()))
}

/// Bytes to the next multiple of four.
fn pad(n: u64) -> i64 {
    ((4 - n % 4) % 4) as i64
}

/// Unpacks the `.swu` at `src`: its image into `image`, the image's
/// manifest into `manifest`. Returns the image's name in the archive.
// Runs on the blocking pool (`download_os`).
#[allow(clippy::disallowed_methods)]
pub(super) fn unpack(src: &Path, image: &Path, manifest: &Path) -> io::Result<String> {
    let mut f = io::BufReader::new(std::fs::File::open(src)?);
    let mut names = Vec::new();
    let (mut image_name, mut manifest_text) = (None::<String>, None::<(String, Vec<u8>)>);
    loop {
        let mut h = [0u8; HEADER];
        f.read_exact(&mut h)
            .map_err(|_| bad("the archive ends before its trailer".into()))?;
        if &h[..6] != MAGIC && &h[..6] != MAGIC_CRC {
            return Err(bad("a cpio header without the newc magic".into()));
        }
        let size = hex_field(&h, 54)?;
        let name_len = hex_field(&h, 94)?;
        if name_len == 0 || name_len > MAX_NAME {
            return Err(bad(format!("a cpio name of {name_len} bytes")));
        }
        let mut name = vec![0u8; name_len as usize];
        f.read_exact(&mut name)?;
        let name = String::from_utf8_lossy(&name[..name.len() - 1]).into_owned();
        f.seek_relative(pad(HEADER as u64 + name_len))?;
        if name == TRAILER {
            break;
        }
        names.push(name.clone());
        let mut entry = (&mut f).take(size);
        if name.ends_with(".manifest") && manifest_text.is_none() && size <= MAX_MANIFEST {
            let mut text = Vec::new();
            entry.read_to_end(&mut text)?;
            manifest_text = Some((name, text));
        } else if name != "sw-description" && !name.ends_with(".manifest") && image_name.is_none() {
            let tmp = image.with_extension("tmp");
            let copied = std::fs::File::create(&tmp).and_then(|mut out| {
                io::copy(&mut entry, &mut out)?;
                out.flush()
            });
            if copied.is_err() || entry.limit() > 0 {
                let _ = std::fs::remove_file(&tmp);
                copied?;
                return Err(bad("the archive ends inside an entry".into()));
            }
            std::fs::rename(&tmp, image)?;
            image_name = Some(name);
        } else {
            io::copy(&mut entry, &mut io::sink())?;
        }
        if entry.limit() > 0 {
            return Err(bad("the archive ends inside an entry".into()));
        }
        f.seek_relative(pad(size))?;
    }
    let listed = names.join(", ");
    let Some(name) = image_name else {
        return Err(bad(format!("no image in the archive (it holds: {listed})")));
    };
    match manifest_text {
        Some((m, text)) if m == format!("{name}.manifest") => {
            std::fs::write(manifest, text)?;
            Ok(name)
        }
        _ => Err(bad(format!(
            "no `{name}.manifest` next to `{name}` in the archive (it holds: {listed})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(out: &mut Vec<u8>, name: &str, data: &[u8]) {
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0o100644,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(
            out.len() + pad((HEADER + name.len() + 1) as u64) as usize,
            0,
        );
        out.extend_from_slice(data);
        out.resize(out.len() + pad(data.len() as u64) as usize, 0);
    }

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, d) in entries {
            entry(&mut out, n, d);
        }
        entry(&mut out, TRAILER, b"");
        out
    }

    fn unpack_bytes(bytes: &[u8]) -> (io::Result<String>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("u.swu");
        std::fs::write(&src, bytes).unwrap();
        let r = unpack(&src, &dir.path().join("img"), &dir.path().join("m"));
        (r, dir)
    }

    #[test]
    fn the_image_and_its_manifest_come_out_whole() {
        let img: Vec<u8> = (0..10_001u32).map(|i| i as u8).collect();
        let a = archive(&[
            ("sw-description", b"software = { version = \"2.0\"; };"),
            ("rootfs.img", &img),
            ("rootfs.img.manifest", b"{\"version\":\"2.0\"}"),
        ]);
        let (r, dir) = unpack_bytes(&a);
        assert_eq!(r.unwrap(), "rootfs.img");
        assert_eq!(std::fs::read(dir.path().join("img")).unwrap(), img);
        assert_eq!(
            std::fs::read(dir.path().join("m")).unwrap(),
            b"{\"version\":\"2.0\"}"
        );
        assert!(is_swu(&dir.path().join("u.swu")));
        assert!(!is_swu(&dir.path().join("img")));
    }

    #[test]
    fn a_missing_manifest_a_foreign_one_or_a_cut_archive_is_refused() {
        let (r, _d) = unpack_bytes(&archive(&[("sw-description", b"x"), ("a.img", b"abc")]));
        assert!(r.unwrap_err().to_string().contains("no `a.img.manifest`"));
        let (r, _d) = unpack_bytes(&archive(&[("a.img", b"abc"), ("b.img.manifest", b"{}")]));
        assert!(r.unwrap_err().to_string().contains("no `a.img.manifest`"));
        let whole = archive(&[("a.img", &[7u8; 5000]), ("a.img.manifest", b"{}")]);
        let (r, _d) = unpack_bytes(&whole[..3000]);
        assert!(r.unwrap_err().to_string().contains("ends inside an entry"));
        let (r, _d) = unpack_bytes(&whole[..whole.len() - 20]);
        assert!(r.is_err());
        let mut odd = whole.clone();
        odd[94..102].copy_from_slice(b"zzzzzzzz");
        let (r, _d) = unpack_bytes(&odd);
        assert!(r.unwrap_err().to_string().contains("not hex"));
    }
}
