//! qemu-img, the only code here that touches image formats. Every call is a
//! child process; failures carry qemu-img's own message.

use crate::StorageError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `qemu-img info` says about one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: i64,
    /// Bytes allocated on the storage.
    pub actual_size: i64,
    /// The backing file as written in the image (relative to it for ours).
    pub backing: Option<String>,
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
        backing: Option<(&str, &str)>,
    ) -> Result<(), StorageError> {
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on"];
        if let Some((b, f)) = backing {
            args.extend(["-b", b, "-F", f]);
        }
        args.push(path);
        args.push(&size);
        self.run(&args).map(|_| ())
    }

    pub fn create_raw(&self, path: &str, size: i64) -> Result<(), StorageError> {
        let size = size.to_string();
        self.run(&["create", "-q", "-f", "raw", path, &size])
            .map(|_| ())
    }

    pub fn info(&self, path: &str) -> Result<ImageInfo, StorageError> {
        let text = self.run(&["info", "--output=json", "-U", path])?;
        let j: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| StorageError::Tool(format!("qemu-img info: {e}")))?;
        Ok(ImageInfo {
            format: j["format"].as_str().unwrap_or("raw").to_owned(),
            virtual_size: j["virtual-size"].as_i64().unwrap_or(0),
            actual_size: j["actual-size"].as_i64().unwrap_or(0),
            backing: j["backing-filename"].as_str().map(str::to_owned),
        })
    }

    /// `qemu-img info --backing-chain` (top image first) and `qemu-img map`
    /// of `path`, as JSON: where each guest range lives in the chain.
    pub fn chain_and_map(
        &self,
        path: &str,
        format: &str,
    ) -> Result<(serde_json::Value, serde_json::Value), StorageError> {
        let parse = |what: &str, text: String| {
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| StorageError::Tool(format!("qemu-img {what}: {e}")))
        };
        let chain = parse(
            "info",
            self.run(&[
                "info",
                "--backing-chain",
                "--output=json",
                "-U",
                "-f",
                format,
                path,
            ])?,
        )?;
        let map = parse(
            "map",
            self.run(&["map", "--output=json", "-U", "-f", format, path])?,
        )?;
        Ok((chain, map))
    }

    pub fn resize(&self, path: &str, format: &str, size: i64) -> Result<(), StorageError> {
        let size = size.to_string();
        self.run(&["resize", "-q", "-f", format, path, &size])
            .map(|_| ())
    }

    /// Writes the changes held in `path` into its backing image; `path`
    /// itself is left as it was (still a valid view of the same data).
    pub fn commit(&self, path: &str) -> Result<(), StorageError> {
        self.run(&["commit", "-q", "-f", "qcow2", "-d", path])
            .map(|_| ())
    }

    /// Copies `src` (any format qemu-img detects, whole chain) into a new
    /// image `dst` of `format`, sparse.
    pub fn convert(
        &self,
        src: &str,
        src_format: Option<&str>,
        dst: &str,
        format: &str,
    ) -> Result<(), StorageError> {
        let mut args = vec!["convert", "-q"];
        if let Some(f) = src_format {
            args.extend(["-f", f]);
        }
        args.extend(["-O", format]);
        if format == "vpc" {
            // Keep the exact virtual size instead of rounding to CHS geometry.
            args.extend(["-o", "subformat=dynamic,force_size=on"]);
        }
        args.extend([src, dst]);
        self.run(&args).map(|_| ())
    }

    /// Makes `path` independent of its current backing image by copying in
    /// what it reads from there, leaving `backing` (or nothing) underneath.
    /// `path` shows the same data before, during and after.
    pub fn rebase_safe(
        &self,
        path: &str,
        backing: Option<(&str, &str)>,
    ) -> Result<(), StorageError> {
        let mut args = vec!["rebase", "-q", "-f", "qcow2"];
        match backing {
            Some((b, f)) => args.extend(["-F", f, "-b", b]),
            None => args.extend(["-b", ""]),
        }
        args.push(path);
        self.run(&args).map(|_| ())
    }

    /// Writes `src`'s data over the existing image `dst` (of `dst_format`),
    /// which must be at least as large.
    pub fn convert_into(
        &self,
        src: &str,
        src_format: Option<&str>,
        dst: &str,
        dst_format: &str,
    ) -> Result<(), StorageError> {
        let mut args = vec!["convert", "-q", "-n"];
        if let Some(f) = src_format {
            args.extend(["-f", f]);
        }
        args.extend(["-O", dst_format, src, dst]);
        self.run(&args).map(|_| ())
    }

    /// Rewrites the backing-file name in `path` without copying data.
    pub fn rebase_unsafe(&self, path: &str, backing: &str) -> Result<(), StorageError> {
        self.run(&[
            "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, path,
        ])
        .map(|_| ())
    }
}

/// A path as a str for qemu-img's argv.
pub fn path_str(p: &Path) -> Result<&str, StorageError> {
    p.to_str()
        .ok_or_else(|| StorageError::Tool(format!("path is not UTF-8: {}", p.display())))
}
