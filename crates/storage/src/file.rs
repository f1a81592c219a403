//! SRs whose images are files in one local directory:
//! - `file`: `device-config:location`, a directory (shared when it is on a
//!   filesystem every host mounts);
//! - `ext`: `device-config:device`, a block device formatted ext4 by
//!   `SR.create` and mounted under the state directory while attached;
//! - `iso`: `device-config:location`, a directory of `.iso` files, read-only.
//!
//! Disk images are `<location>.qcow2`, with backing files named relative to
//! the directory. A legacy (format 1) SR holds raw images under any name. The
//! directory's `.corral-sr` file records the SR uuid and format version.

use crate::qemu_img::{ImageInfo, QemuImg, iso_file_name, path_str, plain_file_name};
use crate::{
    Driver, FILE_CAPS, FORMAT_VERSION, Image, ImageFormat, LEGACY_FORMAT_VERSION, MARKER, Result,
    SmInfo, SrCtx, SrStat, StorageError, VdiInfo, check_absolute,
};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Ext,
    Iso,
}

type InfoCache = HashMap<PathBuf, (SystemTime, u64, ImageInfo)>;

pub struct FileDriver {
    kind: Kind,
    /// `qemu-img info` results by file, valid while mtime and length match,
    /// so rescanning an SR of thousands of unchanged images runs no tools.
    cache: Mutex<Option<InfoCache>>,
}

static FILE_INFO: SmInfo = SmInfo {
    kind: "file",
    name: "Local directory",
    description: "SR backed by qcow2 files in a directory (shared when every host mounts it)",
    configuration: &[("location", "local directory path (required)")],
    capabilities: FILE_CAPS,
    content_type: "user",
};

static EXT_INFO: SmInfo = SmInfo {
    kind: "ext",
    name: "Local EXT4",
    description: "SR backed by qcow2 files on a local block device formatted ext4",
    configuration: &[("device", "local device path (required) (e.g. /dev/sdb)")],
    capabilities: FILE_CAPS,
    content_type: "user",
};

static ISO_INFO: SmInfo = SmInfo {
    kind: "iso",
    name: "ISO",
    description: "Library of read-only ISO images in a directory",
    configuration: &[(
        "location",
        "the directory of .iso files, or nfs://server/path (required)",
    )],
    capabilities: &[
        "SR_PROBE",
        "SR_SCAN",
        "SR_ATTACH",
        "SR_DETACH",
        "VDI_ATTACH",
        "VDI_DETACH",
        "VDI_INTRODUCE",
    ],
    content_type: "iso",
};

fn config_missing(key: &str) -> StorageError {
    // SMAPI's ConfigLocationMissing / ConfigDeviceMissing.
    let (code, what) = match key {
        "device" => (100, "The request is missing the device parameter"),
        _ => (112, "The request is missing the location parameter"),
    };
    StorageError::backend(code, what, "")
}

impl FileDriver {
    pub const fn new(kind: Kind) -> FileDriver {
        FileDriver {
            kind,
            cache: Mutex::new(None),
        }
    }

    /// An ISO library on NFS (`location=nfs://server/path`), reached in userspace.
    fn nfs_url(&self, sr: &SrCtx) -> Option<String> {
        match self.kind {
            Kind::Iso => sr
                .device_config
                .get("location")
                .filter(|l| l.starts_with("nfs://"))
                .cloned(),
            _ => None,
        }
    }

    /// The directory holding the SR's images on this host.
    pub fn dir(&self, sr: &SrCtx) -> Result<PathBuf> {
        match self.kind {
            Kind::File | Kind::Iso => location_dir(&sr.device_config),
            Kind::Ext => Ok(mount_point(&sr.state_dir, &sr.uuid)),
        }
    }

    /// `device-config:device`: an absolute path (checked to be a block
    /// device where the device is used).
    fn device<'a>(&self, dc: &'a BTreeMap<String, String>) -> Result<&'a str> {
        let d = dc
            .get("device")
            .map(String::as_str)
            .filter(|d| !d.is_empty())
            .ok_or_else(|| config_missing("device"))?;
        check_absolute("device", d)?;
        Ok(d)
    }

    /// [`FileDriver::device`], which must be a block device now.
    fn block_device<'a>(&self, dc: &'a BTreeMap<String, String>) -> Result<&'a str> {
        use std::os::unix::fs::FileTypeExt;
        let d = self.device(dc)?;
        match std::fs::metadata(d) {
            Ok(m) if m.file_type().is_block_device() => Ok(d),
            _ => Err(StorageError::BadConfig {
                key: "device".into(),
                why: format!("{d} is not a block device"),
            }),
        }
    }

    fn info_cached(&self, path: &Path, format: ImageFormat) -> Result<ImageInfo> {
        let meta = std::fs::metadata(path).map_err(|e| missing_or_io(path, e))?;
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if let Ok(c) = self.cache.lock() {
            if let Some((m, l, info)) = c.as_ref().and_then(|c| c.get(path)) {
                if *m == mtime && *l == meta.len() {
                    return Ok(info.clone());
                }
            }
        }
        let info = QemuImg::default().info(path_str(path)?, format)?;
        if let Ok(mut c) = self.cache.lock() {
            c.get_or_insert_with(HashMap::new)
                .insert(path.to_owned(), (mtime, meta.len(), info.clone()));
        }
        Ok(info)
    }

    /// The file behind a location: `<loc>.qcow2` if present, else `<loc>`.
    fn image_path(&self, dir: &Path, location: &str) -> Result<PathBuf> {
        if location.is_empty() || location.contains('/') || location.starts_with('.') {
            return Err(StorageError::Missing(location.to_owned()));
        }
        let q = dir.join(format!("{location}.qcow2"));
        if q.exists() {
            return Ok(q);
        }
        let p = dir.join(location);
        if p.is_file() {
            return Ok(p);
        }
        Err(StorageError::Missing(location.to_owned()))
    }

    /// An ISO library's file `name`: a `*.iso` regular file inside the
    /// directory, reached through no link that leaves it. The canonical path
    /// is what gets opened.
    fn iso_file(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        let missing = || StorageError::Missing(name.to_owned());
        if !iso_file_name(name) {
            return Err(missing());
        }
        let root = dir.canonicalize().map_err(|e| missing_or_io(dir, e))?;
        let real = root.join(name).canonicalize().map_err(|_| missing())?;
        if real.parent() != Some(root.as_path()) {
            return Err(missing());
        }
        match std::fs::symlink_metadata(&real) {
            Ok(m) if m.file_type().is_file() => Ok(real),
            _ => Err(missing()),
        }
    }

    fn describe(&self, dir: &Path, path: &Path) -> Result<VdiInfo> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let meta = std::fs::metadata(path).map_err(|e| missing_or_io(path, e))?;
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            (meta.blocks() * 512) as i64
        };
        if self.kind == Kind::Iso {
            return Ok(VdiInfo {
                location: name,
                virtual_size: meta.len() as i64,
                physical_utilisation: allocated,
                parent: None,
                format: ImageFormat::Raw,
                read_only: true,
            });
        }
        let format = ImageFormat::of_file_name(&name);
        let info = self.info_cached(path, format)?;
        info.check_sr_references(|b| plain_file_name(b).then(|| ImageFormat::of_file_name(b)))?;
        let location = name.strip_suffix(".qcow2").unwrap_or(&name).to_owned();
        let parent = info.backing.as_deref().map(|b| {
            let b = Path::new(b)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(b);
            b.strip_suffix(".qcow2").unwrap_or(b).to_owned()
        });
        let _ = dir;
        Ok(VdiInfo {
            location,
            virtual_size: info.virtual_size,
            physical_utilisation: allocated,
            parent,
            format,
            read_only: false,
        })
    }

    fn read_marker(dir: &Path) -> Result<Option<(String, u32)>> {
        match std::fs::read_to_string(dir.join(MARKER)) {
            Ok(text) => {
                let j: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                    StorageError::backend(47, "The SR is not available", format!("{MARKER}: {e}"))
                })?;
                Ok(Some((
                    j["uuid"].as_str().unwrap_or_default().to_owned(),
                    j["format_version"].as_u64().unwrap_or(0) as u32,
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn write_marker(dir: &Path, uuid: &str, version: u32) -> Result<()> {
        let tmp = dir.join(format!("{MARKER}.tmp"));
        let text = serde_json::json!({ "uuid": uuid, "format_version": version }).to_string();
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dir.join(MARKER))?;
        Ok(())
    }
}

fn missing_or_io(path: &Path, e: std::io::Error) -> StorageError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StorageError::Missing(path.display().to_string())
    } else {
        e.into()
    }
}

pub fn mount_point(state_dir: &Path, sr_uuid: &str) -> PathBuf {
    state_dir.join("sr-mount").join(sr_uuid)
}

/// `device-config:location` as a directory: absolute, and nothing a tool
/// could read as an option.
fn location_dir(dc: &BTreeMap<String, String>) -> Result<PathBuf> {
    let l = dc
        .get("location")
        .filter(|l| !l.is_empty())
        .ok_or_else(|| config_missing("location"))?;
    check_absolute("location", l)?;
    Ok(PathBuf::from(l))
}

/// Runs a system tool; callers put `--` before their operands.
fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| StorageError::Tool(format!("cannot run {cmd}: {e}")))?;
    if !out.status.success() {
        return Err(StorageError::Tool(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_mounted(dir: &Path) -> bool {
    let Ok(canon) = dir.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(&m.replace("\\040", " ")) == canon)
}

impl Driver for FileDriver {
    fn info(&self) -> &'static SmInfo {
        match self.kind {
            Kind::File => &FILE_INFO,
            Kind::Ext => &EXT_INFO,
            Kind::Iso => &ISO_INFO,
        }
    }

    fn probe(&self, dc: &BTreeMap<String, String>, state_dir: &Path) -> Result<String> {
        if self.kind == Kind::Iso {
            if let Some(url) = dc.get("location").filter(|l| l.starts_with("nfs://")) {
                crate::nfs::client::list_files(url)?;
                return Ok("<?xml version=\"1.0\" ?>\n<SRlist>\n</SRlist>\n".into());
            }
        }
        let found = match self.kind {
            Kind::File | Kind::Iso => {
                let dir = location_dir(dc)?;
                let dir = dir.as_path();
                if !dir.is_dir() {
                    return Err(StorageError::backend(
                        113,
                        "The location is not a directory",
                        dir.display().to_string(),
                    ));
                }
                Self::read_marker(dir)?
            }
            Kind::Ext => {
                let dev = self.block_device(dc)?;
                let probe_dir = state_dir
                    .join("sr-mount")
                    .join(format!("probe-{}", uuid::Uuid::new_v4()));
                std::fs::create_dir_all(&probe_dir)?;
                let found = match run("mount", &["-o", "ro", "--", dev, path_str(&probe_dir)?]) {
                    Ok(_) => {
                        let m = Self::read_marker(&probe_dir);
                        let _ = run("umount", &["--", path_str(&probe_dir)?]);
                        m.ok().flatten()
                    }
                    // Not a filesystem (yet): nothing to reattach.
                    Err(_) => None,
                };
                let _ = std::fs::remove_dir(&probe_dir);
                found
            }
        };
        let mut xml = String::from("<?xml version=\"1.0\" ?>\n<SRlist>\n");
        if let Some((uuid, version)) = found {
            xml.push_str(&format!(
                "\t<SR>\n\t\t<UUID>{uuid}</UUID>\n\t\t<FormatVersion>{version}</FormatVersion>\n\t</SR>\n"
            ));
        }
        xml.push_str("</SRlist>\n");
        Ok(xml)
    }

    fn create(&self, sr: &SrCtx, _physical_size: i64) -> Result<()> {
        match self.kind {
            Kind::Ext => {
                let dev = self.block_device(&sr.device_config)?.to_owned();
                let label = format!("corral-{}", &sr.uuid[..8.min(sr.uuid.len())]);
                run("mkfs.ext4", &["-F", "-q", "-L", &label, "--", &dev]).map_err(|e| {
                    StorageError::backend(78, "Failed to format the device", e.to_string())
                })?;
                let dir = self.dir(sr)?;
                std::fs::create_dir_all(&dir)?;
                run("mount", &["--", &dev, path_str(&dir)?])?;
                let r = Self::write_marker(&dir, &sr.uuid, FORMAT_VERSION);
                let _ = run("umount", &["--", path_str(&dir)?]);
                r
            }
            Kind::File => {
                // As XAPI's file SR: only the last component is made.
                let dir = self.dir(sr)?;
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                    Err(e) => {
                        return Err(StorageError::backend(
                            116,
                            "Failed to create the SR directory",
                            format!("{}: {e}", dir.display()),
                        ));
                    }
                }
                if let Some((uuid, _)) = Self::read_marker(&dir)? {
                    if uuid != sr.uuid {
                        return Err(StorageError::backend(
                            16,
                            "The SR is in use by another SR record",
                            format!("{} already holds SR {uuid}", dir.display()),
                        ));
                    }
                }
                Self::write_marker(&dir, &sr.uuid, FORMAT_VERSION)
            }
            Kind::Iso if self.nfs_url(sr).is_some() => self.attach(sr).map(|_| ()),
            Kind::Iso => {
                let dir = self.dir(sr)?;
                if !dir.is_dir() {
                    return Err(StorageError::backend(
                        113,
                        "The location is not a directory",
                        dir.display().to_string(),
                    ));
                }
                Ok(())
            }
        }
    }

    fn delete(&self, sr: &SrCtx) -> Result<()> {
        match self.kind {
            Kind::Iso => Ok(()),
            Kind::File => {
                let dir = self.dir(sr)?;
                let _ = std::fs::remove_file(dir.join(MARKER));
                Ok(())
            }
            Kind::Ext => {
                self.detach(sr)?;
                // Wipe the filesystem signature so the device reads as free.
                let dev = self.device(&sr.device_config)?;
                let _ = run("wipefs", &["-a", "-q", "--", dev]);
                Ok(())
            }
        }
    }

    fn attach(&self, sr: &SrCtx) -> Result<u32> {
        if let Some(url) = self.nfs_url(sr) {
            crate::nfs::client::list_files(&url)?;
            return Ok(FORMAT_VERSION);
        }
        let dir = self.dir(sr)?;
        if self.kind == Kind::Ext && !is_mounted(&dir) {
            let dev = self.block_device(&sr.device_config)?;
            std::fs::create_dir_all(&dir)?;
            run("mount", &["--", dev, path_str(&dir)?])
                .map_err(|e| StorageError::backend(47, "The SR is not available", e.to_string()))?;
        }
        if !dir.is_dir() {
            return Err(StorageError::backend(
                47,
                "The SR is not available",
                format!("{} is not a directory", dir.display()),
            ));
        }
        if self.kind == Kind::Iso {
            return Ok(FORMAT_VERSION);
        }
        match Self::read_marker(&dir)? {
            Some((_, v)) if v > FORMAT_VERSION => Err(StorageError::TooNew {
                found: v,
                supported: FORMAT_VERSION,
            }),
            Some((_, v)) => Ok(v.max(LEGACY_FORMAT_VERSION)),
            None => {
                // A directory Corral did not create (SR.introduce of an old
                // image pool): legacy until upgraded.
                Self::write_marker(&dir, &sr.uuid, LEGACY_FORMAT_VERSION)?;
                Ok(LEGACY_FORMAT_VERSION)
            }
        }
    }

    fn detach(&self, sr: &SrCtx) -> Result<()> {
        if self.kind == Kind::Ext {
            let dir = self.dir(sr)?;
            if is_mounted(&dir) {
                run("umount", &["--", path_str(&dir)?])?;
            }
            let _ = std::fs::remove_dir(&dir);
        }
        Ok(())
    }

    fn stat(&self, sr: &SrCtx) -> Result<SrStat> {
        if self.nfs_url(sr).is_some() {
            let used: i64 = self.scan(sr)?.iter().map(|v| v.physical_utilisation).sum();
            return Ok(SrStat {
                physical_size: used,
                physical_utilisation: used,
            });
        }
        let dir = self.dir(sr)?;
        let c = std::ffi::CString::new(path_str(&dir)?)
            .map_err(|_| StorageError::Tool("path contains NUL".into()))?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs writes into the zeroed struct we own.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let frsize = st.f_frsize as i64;
        Ok(SrStat {
            physical_size: st.f_blocks as i64 * frsize,
            physical_utilisation: (st.f_blocks as i64 - st.f_bfree as i64) * frsize,
        })
    }

    fn scan(&self, sr: &SrCtx) -> Result<Vec<VdiInfo>> {
        if let Some(url) = self.nfs_url(sr) {
            let mut out: Vec<VdiInfo> = crate::nfs::client::list_files(&url)?
                .into_iter()
                .filter(|(n, _, _)| iso_file_name(n))
                .map(|(name, size, used)| VdiInfo {
                    location: name,
                    virtual_size: size as i64,
                    physical_utilisation: used as i64,
                    parent: None,
                    format: ImageFormat::Raw,
                    read_only: true,
                })
                .collect();
            out.sort_by(|a, b| a.location.cmp(&b.location));
            return Ok(out);
        }
        let dir = self.dir(sr)?;
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| StorageError::backend(40, "The SR scan failed", e.to_string()))?;
        for e in entries {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = if self.kind == Kind::Iso {
                match self.iso_file(&dir, name) {
                    Ok(p) => p,
                    Err(_) => continue,
                }
            } else if name.starts_with('.') || !e.file_type()?.is_file() {
                continue;
            } else {
                e.path()
            };
            match self.describe(&dir, &path) {
                // An ISO reached through a link keeps the name it is listed by.
                Ok(v) if self.kind == Kind::Iso => out.push(VdiInfo {
                    location: name.to_owned(),
                    ..v
                }),
                Ok(v) => out.push(v),
                // Vanished between listing and inspection.
                Err(StorageError::Missing(_)) => continue,
                // Not adopted: a file Corral did not make that would have
                // root open other files.
                Err(StorageError::Untrusted(why)) => {
                    tracing::warn!(sr = %sr.uuid, file = %name.escape_default(), %why, "image not adopted");
                    continue;
                }
                Err(err) => return Err(err),
            }
        }
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }

    fn upgrade(&self, sr: &SrCtx) -> Result<()> {
        let dir = self.dir(sr)?;
        Self::write_marker(&dir, &sr.uuid, FORMAT_VERSION)
    }

    fn vdi_create(&self, sr: &SrCtx, size: i64, format_version: u32) -> Result<VdiInfo> {
        if self.kind == Kind::Iso {
            return Err(StorageError::NotSupported);
        }
        let dir = self.dir(sr)?;
        let loc = crate::new_location();
        let path = if format_version >= FORMAT_VERSION {
            let p = dir.join(format!("{loc}.qcow2"));
            QemuImg::default()
                .create_qcow2(path_str(&p)?, size, None)
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&p);
                })?;
            p
        } else {
            let p = dir.join(&loc);
            QemuImg::default()
                .create_raw(path_str(&p)?, size)
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&p);
                })?;
            p
        };
        self.describe(&dir, &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })
    }

    fn vdi_delete(&self, sr: &SrCtx, location: &str) -> Result<()> {
        if self.kind == Kind::Iso {
            return Err(StorageError::NotSupported);
        }
        let dir = self.dir(sr)?;
        match self.image_path(&dir, location) {
            Ok(p) => {
                std::fs::remove_file(&p)?;
                if let Ok(mut c) = self.cache.lock() {
                    if let Some(c) = c.as_mut() {
                        c.remove(&p);
                    }
                }
                Ok(())
            }
            // Already gone: deleting is idempotent.
            Err(StorageError::Missing(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn vdi_info(&self, sr: &SrCtx, location: &str) -> Result<VdiInfo> {
        if self.nfs_url(sr).is_some() {
            return self
                .scan(sr)?
                .into_iter()
                .find(|v| v.location == location)
                .ok_or_else(|| StorageError::Missing(location.to_owned()));
        }
        let dir = self.dir(sr)?;
        if self.kind == Kind::Iso {
            let p = self.iso_file(&dir, location)?;
            return Ok(VdiInfo {
                location: location.to_owned(),
                ..self.describe(&dir, &p)?
            });
        }
        let p = self.image_path(&dir, location)?;
        self.describe(&dir, &p)
    }

    fn vdi_child(&self, sr: &SrCtx, parent: &str) -> Result<VdiInfo> {
        if self.kind == Kind::Iso {
            return Err(StorageError::NotSupported);
        }
        let dir = self.dir(sr)?;
        let parent_path = self.image_path(&dir, parent)?;
        let pinfo = self.describe(&dir, &parent_path)?;
        let backing = parent_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let loc = crate::new_location();
        let p = dir.join(format!("{loc}.qcow2"));
        if let Err(e) = QemuImg::default().create_qcow2(
            path_str(&p)?,
            pinfo.virtual_size,
            Some((&backing, pinfo.format)),
        ) {
            let _ = std::fs::remove_file(&p);
            return Err(e);
        }
        self.describe(&dir, &p).inspect_err(|_| {
            let _ = std::fs::remove_file(&p);
        })
    }

    fn vdi_resize(&self, sr: &SrCtx, location: &str, size: i64) -> Result<VdiInfo> {
        if self.kind == Kind::Iso {
            return Err(StorageError::NotSupported);
        }
        let dir = self.dir(sr)?;
        let p = self.image_path(&dir, location)?;
        let image = Image {
            path: path_str(&p)?.to_owned(),
            format: self.describe(&dir, &p)?.format,
        };
        QemuImg::default().resize(&image, size)?;
        self.describe(&dir, &p)
    }

    fn vdi_commit(&self, sr: &SrCtx, child: &str) -> Result<()> {
        let dir = self.dir(sr)?;
        let p = self.image_path(&dir, child)?;
        QemuImg::default().commit(path_str(&p)?)
    }

    fn vdi_pull_parent(&self, sr: &SrCtx, location: &str, new_parent: Option<&str>) -> Result<()> {
        let dir = self.dir(sr)?;
        let p = self.image_path(&dir, location)?;
        let backing = match new_parent {
            Some(np) => {
                let pp = self.image_path(&dir, np)?;
                let fmt = self.describe(&dir, &pp)?.format;
                Some((
                    pp.file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or_default()
                        .to_owned(),
                    fmt,
                ))
            }
            None => None,
        };
        QemuImg::default().rebase_safe(
            path_str(&p)?,
            backing.as_ref().map(|(b, f)| (b.as_str(), *f)),
        )
    }

    fn vdi_set_parent(&self, sr: &SrCtx, location: &str, parent: &str) -> Result<()> {
        let dir = self.dir(sr)?;
        let p = self.image_path(&dir, location)?;
        let parent_path = self.image_path(&dir, parent)?;
        let name = parent_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        QemuImg::default().rebase_unsafe(path_str(&p)?, &name, ImageFormat::of_file_name(&name))
    }

    fn vdi_image(&self, sr: &SrCtx, location: &str) -> Result<Image> {
        if let Some(url) = self.nfs_url(sr) {
            if !iso_file_name(location) {
                return Err(StorageError::Missing(location.to_owned()));
            }
            return Ok(Image {
                path: format!("{}/{location}", url.trim_end_matches('/')),
                format: ImageFormat::Raw,
            });
        }
        let dir = self.dir(sr)?;
        if self.kind == Kind::Iso {
            return Ok(Image {
                path: path_str(&self.iso_file(&dir, location)?)?.to_owned(),
                format: ImageFormat::Raw,
            });
        }
        let p = self.image_path(&dir, location)?;
        let format = self.describe(&dir, &p)?.format;
        Ok(Image {
            path: path_str(&p)?.to_owned(),
            format,
        })
    }

    fn vdi_import_from(&self, sr: &SrCtx, loc: &str, src: &Image) -> Result<VdiInfo> {
        if self.kind == Kind::Iso {
            return Err(StorageError::NotSupported);
        }
        let dir = self.dir(sr)?;
        let p = dir.join(format!("{loc}.qcow2"));
        if let Err(e) = QemuImg::default().convert(src, path_str(&p)?, ImageFormat::Qcow2) {
            let _ = std::fs::remove_file(&p);
            return Err(e);
        }
        self.describe(&dir, &p).inspect_err(|_| {
            let _ = std::fs::remove_file(&p);
        })
    }
}
