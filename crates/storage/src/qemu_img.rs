//! qemu-img, the only code here that touches image formats. Every call is a
//! child process; failures carry qemu-img's own message.

use crate::{Image, ImageFormat, StorageError};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `qemu-img info` says about one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub virtual_size: i64,
    /// Bytes allocated on the storage.
    pub actual_size: i64,
    /// The backing file as written in the image (relative to it for ours).
    pub backing: Option<String>,
    /// The backing file's format as written in the image.
    pub backing_format: Option<String>,
    /// An external data file named by a qcow2 header.
    pub data_file: Option<String>,
}

impl ImageInfo {
    /// Refuses an image found on an SR whose references are not ones Corral
    /// writes: no external data file, and a backing file only where
    /// `expected` recognises the name as another image of the same SR (it
    /// returns that image's format), recorded with exactly that format, so
    /// QEMU never probes a backing file either.
    pub fn check_sr_references(
        &self,
        expected: impl FnOnce(&str) -> Option<ImageFormat>,
    ) -> Result<(), StorageError> {
        if let Some(d) = &self.data_file {
            return Err(StorageError::Untrusted(format!(
                "it names an external data file ({})",
                escape(d)
            )));
        }
        let Some(b) = &self.backing else {
            return Ok(());
        };
        match expected(b) {
            Some(f) if self.backing_format.as_deref() == Some(f.qemu_name()) => Ok(()),
            Some(_) => Err(StorageError::Untrusted(format!(
                "its backing file {} is not recorded with its format",
                escape(b)
            ))),
            None => Err(StorageError::Untrusted(format!(
                "its backing file {} is not an image of this SR",
                escape(b)
            ))),
        }
    }
}

/// A name from an image header, fit for an error message or a log line.
fn escape(s: &str) -> String {
    let mut out: String = s.chars().take(200).flat_map(char::escape_default).collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

/// A name from inside an SR's directory that can only mean a sibling file:
/// no directories, no protocol or `json:` prefix, no hidden files.
pub fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.starts_with('-')
        && !name.contains(['/', ':', '\\', '\0', '\n'])
}

/// A file an ISO library lists: a plain name ending in `.iso`.
pub fn iso_file_name(name: &str) -> bool {
    plain_file_name(name) && name.to_ascii_lowercase().ends_with(".iso")
}

/// Checks a qcow2 header's own bytes before any tool opens the file: an
/// upload must not name a backing file or an external data file (either
/// would make root open a path of the uploader's choosing).
pub fn check_qcow2_header(head: &[u8]) -> Result<(), StorageError> {
    let be32 = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let be64 = |o: usize| {
        head.get(o..o + 8)
            .map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    };
    if head.get(0..4) != Some(b"QFI\xfb".as_slice()) {
        return Err(StorageError::Untrusted("it is not a qcow2 image".into()));
    }
    let version = be32(4).unwrap_or(0);
    if !(2..=3).contains(&version) {
        return Err(StorageError::Untrusted(format!(
            "qcow2 version {version} is not supported"
        )));
    }
    if be64(8).unwrap_or(1) != 0 || be32(16).unwrap_or(1) != 0 {
        return Err(StorageError::Untrusted(
            "it names a backing file; only standalone images can be imported".into(),
        ));
    }
    // Incompatible feature bit 2: an external data file.
    if version == 3 && be64(72).is_none_or(|f| f & 4 != 0) {
        return Err(StorageError::Untrusted(
            "it names an external data file".into(),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct QemuImg {
    bin: PathBuf,
}

impl Default for QemuImg {
    fn default() -> Self {
        // Tests point this at a failing stand-in to prove error handling.
        let bin = std::env::var_os("CORRAL_QEMU_IMG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("qemu-img"));
        QemuImg { bin }
    }
}

/// Every call ends its options with `--`, so no operand (a path or URL) is
/// ever read as an option.
impl QemuImg {
    fn run(&self, args: &[&str]) -> Result<String, StorageError> {
        tracing::debug!(?args, "qemu-img");
        let out = Command::new(&self.bin)
            .args(args)
            .output()
            .map_err(|e| StorageError::Tool(format!("cannot run {}: {e}", self.bin.display())))?;
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(if msg.contains("No space left on device") {
                StorageError::Full(msg)
            } else {
                StorageError::Tool(format!("qemu-img {}: {msg}", args.first().unwrap_or(&"")))
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A sparse qcow2 image, optionally on top of `backing` = (name, format);
    /// the name is relative to the new image, so SR directories can move and
    /// be reached over NFS.
    pub fn create_qcow2(
        &self,
        path: &str,
        size: i64,
        backing: Option<(&str, ImageFormat)>,
    ) -> Result<(), StorageError> {
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on"];
        if let Some((b, f)) = backing {
            args.extend(["-b", b, "-F", f.qemu_name()]);
        }
        args.extend(["--", path, &size]);
        self.run(&args).map(|_| ())
    }

    pub fn create_raw(&self, path: &str, size: i64) -> Result<(), StorageError> {
        let size = size.to_string();
        self.run(&["create", "-q", "-f", "raw", "--", path, &size])
            .map(|_| ())
    }

    /// The image's header as `format` reads it (a shared lock: a running
    /// VM's image can be inspected).
    pub fn info(&self, path: &str, format: ImageFormat) -> Result<ImageInfo, StorageError> {
        let text = self.run(&[
            "info",
            "--output=json",
            "-U",
            "-f",
            format.qemu_name(),
            "--",
            path,
        ])?;
        let j: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| StorageError::Tool(format!("qemu-img info: {e}")))?;
        let s = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        Ok(ImageInfo {
            format,
            virtual_size: j["virtual-size"].as_i64().unwrap_or(0),
            actual_size: j["actual-size"].as_i64().unwrap_or(0),
            backing: s(&j["backing-filename"]),
            backing_format: s(&j["backing-filename-format"]),
            data_file: s(&j["format-specific"]["data"]["data-file"]),
        })
    }

    /// An uploaded image, checked before anything reads its data: its own
    /// header (for qcow2) and then qemu-img's reading of it must show a
    /// standalone image of the declared format.
    pub fn inspect_upload(
        &self,
        path: &Path,
        format: ImageFormat,
    ) -> Result<ImageInfo, StorageError> {
        if format == ImageFormat::Qcow2 {
            use std::io::Read;
            let mut head = Vec::with_capacity(104);
            std::fs::File::open(path)?
                .take(104)
                .read_to_end(&mut head)?;
            check_qcow2_header(&head)?;
        }
        let info = self.info(path_str(path)?, format)?;
        if info.backing.is_some() {
            return Err(StorageError::Untrusted(
                "it names a backing file; only standalone images can be imported".into(),
            ));
        }
        info.check_sr_references(|_| None)?;
        Ok(info)
    }

    /// `qemu-img info --backing-chain` (top image first) and `qemu-img map`
    /// of `image`, as JSON: where each guest range lives in the chain.
    pub fn chain_and_map(
        &self,
        image: &Image,
    ) -> Result<(serde_json::Value, serde_json::Value), StorageError> {
        let parse = |what: &str, text: String| {
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| StorageError::Tool(format!("qemu-img {what}: {e}")))
        };
        let f = image.format.qemu_name();
        let chain = parse(
            "info",
            self.run(&[
                "info",
                "--backing-chain",
                "--output=json",
                "-U",
                "-f",
                f,
                "--",
                &image.path,
            ])?,
        )?;
        let map = parse(
            "map",
            self.run(&["map", "--output=json", "-U", "-f", f, "--", &image.path])?,
        )?;
        Ok((chain, map))
    }

    pub fn resize(&self, image: &Image, size: i64) -> Result<(), StorageError> {
        let size = size.to_string();
        self.run(&[
            "resize",
            "-q",
            "-f",
            image.format.qemu_name(),
            "--",
            &image.path,
            &size,
        ])
        .map(|_| ())
    }

    /// Writes the changes held in the qcow2 image `path` into its backing
    /// image; `path` itself is left as it was (still a valid view of the
    /// same data).
    pub fn commit(&self, path: &str) -> Result<(), StorageError> {
        self.run(&["commit", "-q", "-f", "qcow2", "-d", "--", path])
            .map(|_| ())
    }

    /// Copies `src` (whole chain) into a new image `dst` of `format`, sparse.
    pub fn convert(&self, src: &Image, dst: &str, format: ImageFormat) -> Result<(), StorageError> {
        let mut args = vec!["convert", "-q", "-f", src.format.qemu_name()];
        args.extend(["-O", format.qemu_name()]);
        if format == ImageFormat::Vpc {
            // Keep the exact virtual size instead of rounding to CHS geometry.
            args.extend(["-o", "subformat=dynamic,force_size=on"]);
        }
        args.extend(["--", &src.path, dst]);
        self.run(&args).map(|_| ())
    }

    /// Makes the qcow2 image `path` independent of its current backing image
    /// by copying in what it reads from there, leaving `backing` (or
    /// nothing) underneath. `path` shows the same data before, during and
    /// after.
    pub fn rebase_safe(
        &self,
        path: &str,
        backing: Option<(&str, ImageFormat)>,
    ) -> Result<(), StorageError> {
        let mut args = vec!["rebase", "-q", "-f", "qcow2"];
        match backing {
            Some((b, f)) => args.extend(["-F", f.qemu_name(), "-b", b]),
            None => args.extend(["-b", ""]),
        }
        args.extend(["--", path]);
        self.run(&args).map(|_| ())
    }

    /// Writes `src`'s data over the existing image `dst`, which must be at
    /// least as large.
    pub fn convert_into(&self, src: &Image, dst: &Image) -> Result<(), StorageError> {
        self.run(&[
            "convert",
            "-q",
            "-n",
            "-f",
            src.format.qemu_name(),
            "-O",
            dst.format.qemu_name(),
            "--",
            &src.path,
            &dst.path,
        ])
        .map(|_| ())
    }

    /// Rewrites the backing-file name in the qcow2 image `path` without
    /// copying data.
    pub fn rebase_unsafe(
        &self,
        path: &str,
        backing: &str,
        backing_format: ImageFormat,
    ) -> Result<(), StorageError> {
        self.run(&[
            "rebase",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-F",
            backing_format.qemu_name(),
            "-b",
            backing,
            "--",
            path,
        ])
        .map(|_| ())
    }
}

/// A path as a str for qemu-img's argv.
pub fn path_str(p: &Path) -> Result<&str, StorageError> {
    p.to_str()
        .ok_or_else(|| StorageError::Tool(format!("path is not UTF-8: {}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, backing_off: u64, incompat: u64) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[0..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[8..16].copy_from_slice(&backing_off.to_be_bytes());
        h[72..80].copy_from_slice(&incompat.to_be_bytes());
        h
    }

    #[test]
    fn qcow2_headers_with_references_are_refused() {
        assert!(check_qcow2_header(&header(3, 0, 0)).is_ok());
        assert!(check_qcow2_header(&header(2, 0, 0)).is_ok());
        assert!(check_qcow2_header(&header(3, 512, 0)).is_err());
        assert!(check_qcow2_header(&header(3, 0, 4)).is_err());
        assert!(check_qcow2_header(&header(4, 0, 0)).is_err());
        assert!(check_qcow2_header(b"QFI").is_err());
        assert!(check_qcow2_header(&[0u8; 104]).is_err());
        // A truncated v3 header cannot prove it has no data file.
        assert!(check_qcow2_header(&header(3, 0, 0)[..72]).is_err());
    }

    #[test]
    fn sr_references_must_be_siblings_with_their_format() {
        let info = |b: Option<&str>, bf: Option<&str>, d: Option<&str>| ImageInfo {
            format: ImageFormat::Qcow2,
            virtual_size: 1,
            actual_size: 1,
            backing: b.map(str::to_owned),
            backing_format: bf.map(str::to_owned),
            data_file: d.map(str::to_owned),
        };
        let sibling = |b: &str| plain_file_name(b).then(|| ImageFormat::of_file_name(b));
        assert!(info(None, None, None).check_sr_references(sibling).is_ok());
        assert!(
            info(Some("a.qcow2"), Some("qcow2"), None)
                .check_sr_references(sibling)
                .is_ok()
        );
        assert!(
            info(Some("a"), Some("raw"), None)
                .check_sr_references(sibling)
                .is_ok()
        );
        for (b, f) in [
            ("a.qcow2", None),
            ("a.qcow2", Some("raw")),
            ("/etc/shadow", Some("raw")),
            ("../x.qcow2", Some("qcow2")),
            ("json:{\"driver\":\"file\"}", Some("raw")),
            ("nbd:localhost:1", Some("raw")),
        ] {
            assert!(
                info(Some(b), f, None).check_sr_references(sibling).is_err(),
                "{b}"
            );
        }
        assert!(
            info(None, None, Some("victim.bin"))
                .check_sr_references(sibling)
                .is_err()
        );
    }
}
