//! Raw export straight from an image's files: `qemu-img map` says where
//! each guest range lives in the backing chain, and data ranges go to the
//! client with sendfile(2) from the page cache, zero ranges as zeros. No
//! qemu-nbd, no copy through user space. Only for local qcow2/raw chains
//! whose data sits at plain file offsets; anything else (NFS, compressed
//! or encrypted clusters, external data files) is left to qemu-nbd.

use crate::nbd::{wait_writable, write_all_fd};
use crate::qemu_img::QemuImg;
use crate::{Image, ImageFormat, StorageError};
use serde_json::Value;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Where one guest range comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Zero,
    /// `offset` in `files[file]`.
    File {
        file: usize,
        offset: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub source: Source,
}

/// A whole image as file ranges and zeros, in guest order.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageMap {
    pub size: u64,
    pub files: Vec<PathBuf>,
    pub extents: Vec<Extent>,
}

/// Maps `path` for direct streaming, or `None` when it must go through
/// qemu-nbd.
pub fn map(image: &Image) -> Result<Option<ImageMap>, StorageError> {
    if image.path.contains("://") || image.format == ImageFormat::Vpc {
        return Ok(None);
    }
    let (chain, map) = QemuImg::default().chain_and_map(image)?;
    Ok(from_json(&image.path, &chain, &map))
}

/// Interprets `qemu-img info --backing-chain` and `qemu-img map` output.
pub fn from_json(path: &str, chain: &Value, map: &Value) -> Option<ImageMap> {
    let layers = chain.as_array()?;
    let mut files = Vec::with_capacity(layers.len());
    let mut file = PathBuf::from(path);
    for (i, layer) in layers.iter().enumerate() {
        let plain = matches!(layer["format"].as_str(), Some("qcow2" | "raw"))
            && !layer["encrypted"].as_bool().unwrap_or(false)
            && layer["format-specific"]["data"]["data-file"].is_null();
        if !plain {
            return None;
        }
        files.push(file.clone());
        if i + 1 < layers.len() {
            let next = layer["full-backing-filename"]
                .as_str()
                .or(layer["backing-filename"].as_str())?;
            if next.contains("://") {
                return None;
            }
            file = resolve(&file, next);
        }
    }
    let size = layers.first()?["virtual-size"].as_u64()?;
    let mut extents = Vec::new();
    let mut at = 0u64;
    for e in map.as_array()? {
        let (start, length) = (e["start"].as_u64()?, e["length"].as_u64()?);
        if start != at {
            return None;
        }
        at += length;
        let zero = e["zero"].as_bool().unwrap_or(false) || !e["present"].as_bool().unwrap_or(true);
        let source = if zero || !e["data"].as_bool().unwrap_or(false) {
            Source::Zero
        } else {
            // Data without a file offset: compressed clusters.
            let offset = e["offset"].as_u64()?;
            let depth = e["depth"].as_u64()? as usize;
            if depth >= files.len() {
                return None;
            }
            Source::File {
                file: depth,
                offset,
            }
        };
        extents.push(Extent {
            start,
            length,
            source,
        });
    }
    (at == size).then_some(ImageMap {
        size,
        files,
        extents,
    })
}

fn resolve(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        b.to_owned()
    } else {
        image.parent().unwrap_or(Path::new("/")).join(b)
    }
}

/// Sends the image's guest-visible bytes to `out` (which may be
/// non-blocking), in order.
pub fn send_all(m: &ImageMap, out: i32) -> Result<(), StorageError> {
    let files = m
        .files
        .iter()
        .map(std::fs::File::open)
        .collect::<Result<Vec<_>, _>>()?;
    let zeros = vec![0u8; 1 << 20];
    for e in &m.extents {
        match e.source {
            Source::Zero => {
                let mut left = e.length;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    write_all_fd(out, &zeros[..n])?;
                    left -= n as u64;
                }
            }
            Source::File { file, offset } => {
                send_file(files[file].as_raw_fd(), offset, e.length, out)?;
            }
        }
    }
    Ok(())
}

/// sendfile(2) of `len` bytes at `offset` of `src` to `out`.
fn send_file(src: i32, offset: u64, len: u64, out: i32) -> Result<(), StorageError> {
    let mut off = offset as libc::off_t;
    let end = offset + len;
    while (off as u64) < end {
        let want = ((end - off as u64) as usize).min(1 << 30);
        // SAFETY: sendfile between an fd we opened and the caller's socket;
        // the kernel advances `off`.
        let n = unsafe { libc::sendfile(out, src, &mut off, want) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => wait_writable(out)?,
                std::io::ErrorKind::Interrupted => {}
                _ => return Err(StorageError::Io(e)),
            }
        } else if n == 0 {
            return Err(StorageError::Tool(
                "the image file ended before its mapped data".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_two_layer_chain_and_refuses_compressed_data() {
        let chain = serde_json::json!([
            {"filename": "/sr/top.qcow2", "format": "qcow2", "virtual-size": 4194304,
             "full-backing-filename": "/sr/base.qcow2", "backing-filename": "base.qcow2"},
            {"filename": "/sr/base.qcow2", "format": "qcow2", "virtual-size": 4194304}
        ]);
        let map = serde_json::json!([
            {"start": 0, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "offset": 327680},
            {"start": 65536, "length": 983040, "depth": 1, "present": false, "zero": true, "data": false},
            {"start": 1048576, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
            {"start": 1114112, "length": 3080192, "depth": 0, "present": true, "zero": true, "data": false}
        ]);
        let m = from_json("/sr/top.qcow2", &chain, &map).expect("mappable");
        assert_eq!(
            m.files,
            vec![
                PathBuf::from("/sr/top.qcow2"),
                PathBuf::from("/sr/base.qcow2")
            ]
        );
        assert_eq!(
            m.extents[0].source,
            Source::File {
                file: 1,
                offset: 327680
            }
        );
        assert_eq!(m.extents[1].source, Source::Zero);
        assert_eq!(
            m.extents[2].source,
            Source::File {
                file: 0,
                offset: 327680
            }
        );
        assert_eq!(m.extents[3].source, Source::Zero);

        let mut compressed = map.clone();
        compressed[0].as_object_mut().map(|o| o.remove("offset"));
        assert_eq!(from_json("/sr/top.qcow2", &chain, &compressed), None);
        let mut short = map.clone();
        short.as_array_mut().map(|a| a.pop());
        assert_eq!(from_json("/sr/top.qcow2", &chain, &short), None);
        let mut encrypted = chain.clone();
        encrypted[0]["encrypted"] = serde_json::json!(true);
        assert_eq!(from_json("/sr/top.qcow2", &encrypted, &map), None);
    }
}
