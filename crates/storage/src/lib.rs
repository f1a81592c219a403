//! Corral's storage manager (XenServer's SM layer): one [`Driver`] trait per
//! SR type, each turning SR and VDI operations into operations on real
//! storage. VDI images are qcow2 files made and changed only by `qemu-img`.
//!
//! Drivers are stateless between calls apart from caches: everything that
//! must survive lives either on the storage (the images, their backing
//! chains, the SR's format marker) or in the pool database, which the server
//! reconciles with [`Driver::scan`].

pub mod direct;
pub mod file;
pub mod nbd;
pub mod nfs;
pub mod qemu_img;

use std::collections::BTreeMap;
use std::path::Path;

/// The on-storage format this Corral writes. Version 1 is a legacy SR of raw
/// images (no snapshots or fast clones until upgraded); version 2 keeps qcow2
/// images with backing chains. An SR marked with a newer version than this is
/// refused rather than misread.
pub const FORMAT_VERSION: u32 = 2;
pub const LEGACY_FORMAT_VERSION: u32 = 1;

/// Failures of the storage layer. The server maps them to XenAPI errors
/// (`SR_BACKEND_FAILURE_<n>` with `["", reason, detail]` for most).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An SMAPI-style failure with its numeric code.
    #[error("SR backend failure {code}: {reason} {detail}")]
    Backend {
        code: u32,
        reason: String,
        detail: String,
    },
    /// An external tool (qemu-img, mkfs, mount) failed.
    #[error("{0}")]
    Tool(String),
    /// The storage ran out of space.
    #[error("no space left: {0}")]
    Full(String),
    /// The image the database names is not on the storage.
    #[error("VDI missing: {0}")]
    Missing(String),
    /// This driver cannot do that.
    #[error("operation not supported by this SR type")]
    NotSupported,
    /// The SR's format predates snapshots and clones.
    #[error("SR requires upgrade")]
    RequiresUpgrade,
    /// The SR was written by a newer Corral.
    #[error("SR format version {found} is newer than this Corral supports ({supported})")]
    TooNew { found: u32, supported: u32 },
    /// An image (an upload, or a file found on an SR) that Corral will not
    /// open: it names a backing file or an external data file, or is not
    /// the format it claims.
    #[error("image refused: {0}")]
    Untrusted(String),
    /// A device-config value that is not what the driver takes.
    #[error("invalid device-config {key}: {why}")]
    BadConfig { key: String, why: String },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl StorageError {
    pub fn backend(code: u32, reason: impl Into<String>, detail: impl Into<String>) -> Self {
        StorageError::Backend {
            code,
            reason: reason.into(),
            detail: detail.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// The format an image is opened in. It is never probed from the image's
/// own bytes and never taken from anything a user can set: for images on an
/// SR the driver derives it from how the storage layer named the file
/// (`<location>.qcow2` is qcow2, anything else raw, ISOs raw), and for an
/// upload it is the format the client declared, checked by
/// [`qemu_img::QemuImg::inspect_upload`]. Every `qemu-img`, `qemu-nbd` and
/// QEMU open passes it explicitly (`-f` / `format=`), so a guest that writes
/// a qcow2 header into a raw disk cannot make root open host files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Qcow2,
    Raw,
    /// VHD, as qemu-img calls it; only ever an upload or download format.
    Vpc,
}

impl ImageFormat {
    /// The name QEMU's block layer gives the format.
    pub fn qemu_name(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
            ImageFormat::Vpc => "vpc",
        }
    }

    /// The format of an SR's image file, from the name the storage layer
    /// gave it.
    pub fn of_file_name(name: &str) -> ImageFormat {
        if name.ends_with(".qcow2") {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        }
    }
}

/// An image to open: where it is and the format it must be opened in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// A local path or an `nfs://` URL.
    pub path: String,
    pub format: ImageFormat,
}

/// One image on an SR, as the storage describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct VdiInfo {
    /// The driver's name for it (VDI.location): the file name without the
    /// format's extension for disk images, the full file name for ISOs.
    pub location: String,
    pub virtual_size: i64,
    pub physical_utilisation: i64,
    /// The location of the image this one is backed by.
    pub parent: Option<String>,
    /// What the image is opened as (ISOs: raw).
    pub format: ImageFormat,
    pub read_only: bool,
}

/// Sizes of an SR in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SrStat {
    pub physical_size: i64,
    pub physical_utilisation: i64,
}

/// What a driver is handed for SR-level calls.
#[derive(Debug, Clone)]
pub struct SrCtx {
    pub uuid: String,
    pub device_config: BTreeMap<String, String>,
    pub sm_config: BTreeMap<String, String>,
    /// Corral's state directory on this host (mount points live under it).
    pub state_dir: std::path::PathBuf,
}

/// One SR type's description, which becomes its `SM` record.
#[derive(Debug)]
pub struct SmInfo {
    pub kind: &'static str,
    pub name: &'static str,
    pub description: &'static str,
    /// device-config keys with their help text; required ones say so.
    pub configuration: &'static [(&'static str, &'static str)],
    pub capabilities: &'static [&'static str],
    pub content_type: &'static str,
}

/// An SR driver. Calls block (they run tools and touch storage); the server
/// runs them off its async threads. Every call either completes or leaves
/// the storage as it found it, except where noted.
pub trait Driver: Send + Sync {
    fn info(&self) -> &'static SmInfo;

    /// Discovery: an XML document describing what `device_config` finds.
    /// Incomplete configurations fail with the backend error that carries
    /// the choices (as NFS's 101 with `<nfs-exports>`).
    fn probe(&self, device_config: &BTreeMap<String, String>, state_dir: &Path) -> Result<String>;

    /// Prepares new, empty storage for the SR and marks its format version.
    fn create(&self, sr: &SrCtx, physical_size: i64) -> Result<()>;
    /// Removes the SR's storage (it must hold no images).
    fn delete(&self, sr: &SrCtx) -> Result<()>;
    /// Makes the SR usable on this host (mounts); idempotent. Returns the
    /// format version found on the storage.
    fn attach(&self, sr: &SrCtx) -> Result<u32>;
    fn detach(&self, sr: &SrCtx) -> Result<()>;
    fn stat(&self, sr: &SrCtx) -> Result<SrStat>;
    /// Every image on the SR.
    fn scan(&self, sr: &SrCtx) -> Result<Vec<VdiInfo>>;
    /// Writes the current format version marker (one-way upgrade).
    fn upgrade(&self, sr: &SrCtx) -> Result<()>;

    /// A new, sparse image of `size` bytes.
    fn vdi_create(&self, sr: &SrCtx, size: i64, format_version: u32) -> Result<VdiInfo>;
    fn vdi_delete(&self, sr: &SrCtx, location: &str) -> Result<()>;
    fn vdi_info(&self, sr: &SrCtx, location: &str) -> Result<VdiInfo>;
    /// A new empty image whose backing image is `parent` (instant).
    fn vdi_child(&self, sr: &SrCtx, parent: &str) -> Result<VdiInfo>;
    fn vdi_resize(&self, sr: &SrCtx, location: &str, size: i64) -> Result<VdiInfo>;
    /// Merges `child`'s own data into its backing image. The child stays a
    /// valid view of the same disk, so a crash at any point loses nothing.
    fn vdi_commit(&self, sr: &SrCtx, child: &str) -> Result<()>;
    /// How chains are shortened: true = commit the child into its parent
    /// (cheap when the child is small); false = pull the parent's data into
    /// the child ([`Driver::vdi_pull_parent`]), for storage where backing
    /// images cannot be reopened for writing (libnfs).
    fn merges_by_commit(&self) -> bool {
        true
    }
    /// Copies the parent's data into `location`, which then sits directly
    /// on `new_parent` (the parent's own parent) or on nothing.
    fn vdi_pull_parent(&self, sr: &SrCtx, location: &str, new_parent: Option<&str>) -> Result<()>;
    /// Points `location` at another backing image holding the same data
    /// (after a commit); rewrites only the image header.
    fn vdi_set_parent(&self, sr: &SrCtx, location: &str, parent: &str) -> Result<()>;
    /// What QEMU and qemu-img open for this image (a path or an URL) and
    /// the format to open it in.
    fn vdi_image(&self, sr: &SrCtx, location: &str) -> Result<Image>;
    /// A new, standalone image at `location` (the caller's choice, so it can
    /// journal it before the copy starts) holding a full copy of `src`'s
    /// chain.
    fn vdi_import_from(&self, sr: &SrCtx, location: &str, src: &Image) -> Result<VdiInfo>;
}

/// A fresh image location (the file name without `.qcow2`).
pub fn new_location() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The drivers this build has, by SR type.
pub fn driver(kind: &str) -> Option<&'static dyn Driver> {
    static FILE: file::FileDriver = file::FileDriver::new(file::Kind::File);
    static EXT: file::FileDriver = file::FileDriver::new(file::Kind::Ext);
    static ISO: file::FileDriver = file::FileDriver::new(file::Kind::Iso);
    static NFS: nfs::NfsDriver = nfs::NfsDriver::new();
    match kind {
        "file" => Some(&FILE),
        "ext" => Some(&EXT),
        "nfs" => Some(&NFS),
        "iso" => Some(&ISO),
        _ => None,
    }
}

pub fn driver_kinds() -> &'static [&'static str] {
    &["file", "ext", "nfs", "iso"]
}

/// Capabilities shared by the qcow2 file drivers.
pub const FILE_CAPS: &[&str] = &[
    "SR_PROBE",
    "SR_UPDATE",
    "SR_SCAN",
    "SR_ATTACH",
    "SR_DETACH",
    "VDI_CREATE",
    "VDI_DELETE",
    "VDI_ATTACH",
    "VDI_DETACH",
    "VDI_UPDATE",
    "VDI_INTRODUCE",
    "VDI_CLONE",
    "VDI_SNAPSHOT",
    "VDI_RESIZE",
    "VDI_GENERATE_CONFIG",
    "THIN_PROVISIONING",
];

pub const MARKER: &str = ".corral-sr";

/// A device-config path: absolute, normalised (no `.` or `..`), printable.
pub fn check_absolute(key: &str, value: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(StorageError::BadConfig {
            key: key.into(),
            why: why.into(),
        })
    };
    if !value.starts_with('/') {
        return bad("must be an absolute path");
    }
    if value.chars().any(char::is_control) {
        return bad("must not contain control characters");
    }
    if value.split('/').any(|c| c == "." || c == "..") {
        return bad("must not contain . or .. components");
    }
    Ok(())
}
