//! The `nfs` SR driver, with no kernel NFS client: image data is reached by
//! qemu-img and QEMU through their built-in libnfs client (`nfs://` URLs),
//! and the driver manages files (listing, deleting, the SR marker, sizes)
//! with the userspace NFSv3 client of the `nfs3_client` crate.
//!
//! Layout as XAPI's NFS SR: `<serverpath>/<sr-uuid>/<location>.qcow2`.
//! Backing files are stored as absolute `nfs://` URLs (QEMU cannot resolve
//! relative backing names under `nfs://`), so every host must reach the
//! server under the same name. Assumptions: AUTH_SYS as root, the export
//! has `no_root_squash`, no Kerberos/CHAP; NFSv3 (Debian's libnfs 4.0, which
//! QEMU links, has no NFSv4).

use crate::nfs::client::{
    Conn, Entry, block, exports, list, lookup, mkdir, mount, nfs_err, read_small, remove,
    status_err, write_small, xml_escape,
};
use crate::qemu_img::{ImageInfo, QemuImg, plain_file_name};
use crate::{
    Driver, FILE_CAPS, FORMAT_VERSION, Image, ImageFormat, LEGACY_FORMAT_VERSION, MARKER, Result,
    SmInfo, SrCtx, SrStat, StorageError, VdiInfo,
};
use nfs3_client::nfs3_types::nfs3::{FSSTAT3args, Nfs3Result, RMDIR3args, diropargs3, nfs_fh3};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
pub mod client;

pub(crate) static NFS_INFO: SmInfo = SmInfo {
    kind: "nfs",
    name: "NFS",
    description: "SR backed by qcow2 files on an NFS export, reached in userspace (libnfs, NFSv3)",
    configuration: &[
        (
            "server",
            "hostname or IP address of the NFS server (required)",
        ),
        ("serverpath", "path of the export on the server (required)"),
        (
            "nfsversion",
            "NFS version: 3 (4 is refused: this host's userspace client speaks NFSv3)",
        ),
    ],
    capabilities: FILE_CAPS,
    content_type: "user",
};

pub(crate) type InfoCache = HashMap<String, ((u32, u32), u64, ImageInfo)>;

pub struct NfsDriver {
    cache: Mutex<Option<InfoCache>>,
}

pub(crate) struct Where {
    server: String,
    export: String,
    base_url: String,
}

impl NfsDriver {
    pub const fn new() -> NfsDriver {
        NfsDriver {
            cache: Mutex::new(None),
        }
    }

    fn where_(dc: &BTreeMap<String, String>, sr_uuid: &str) -> Result<Where> {
        let server = dc.get("server").filter(|s| !s.is_empty()).ok_or_else(|| {
            StorageError::backend(102, "The request is missing the server parameter", "")
        })?;
        let export = dc
            .get("serverpath")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                StorageError::backend(101, "The request is missing the serverpath parameter", "")
            })?;
        // Both end up in libnfs URLs: no options (`?uid=0`), fragments or
        // other servers can be smuggled in.
        let host_ok = server
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c))
            && !server.starts_with('-');
        if !host_ok {
            return Err(StorageError::BadConfig {
                key: "server".into(),
                why: "must be a host name or an IP address".into(),
            });
        }
        crate::check_absolute("serverpath", export)?;
        if export.contains(['?', '#', '%']) {
            return Err(StorageError::BadConfig {
                key: "serverpath".into(),
                why: "must not contain ?, # or %".into(),
            });
        }
        match dc.get("nfsversion").map(String::as_str) {
            None | Some("") | Some("3") => {}
            Some(v) => {
                return Err(StorageError::backend(
                    73,
                    "NFS mount error",
                    format!(
                        "nfsversion={v} is not supported: this host's userspace NFS client (libnfs) speaks NFSv3"
                    ),
                ));
            }
        }
        let export = format!("/{}", export.trim_matches('/'));
        Ok(Where {
            base_url: format!("nfs://{server}{export}/{sr_uuid}/"),
            server: server.clone(),
            export,
        })
    }

    async fn sr_dir(c: &mut Conn, sr_uuid: &str, create: bool) -> Result<nfs_fh3> {
        let root = c.root_nfs_fh3();
        match lookup(c, &root, sr_uuid).await? {
            Some((fh, _)) => Ok(fh),
            None if create => mkdir(c, &root, sr_uuid).await,
            None => Err(StorageError::backend(
                47,
                "The SR is not available",
                format!("no directory {sr_uuid} on the export"),
            )),
        }
    }

    fn entries(&self, sr: &SrCtx) -> Result<(Where, Vec<Entry>)> {
        let w = Self::where_(&sr.device_config, &sr.uuid)?;
        let (server, export, uuid) = (w.server.clone(), w.export.clone(), sr.uuid.clone());
        let entries = block(async move {
            let mut c = mount(&server, &export).await?;
            let dir = Self::sr_dir(&mut c, &uuid, false).await?;
            let l = list(&mut c, &dir).await;
            let _ = c.unmount().await;
            l
        })?;
        Ok((w, entries))
    }

    fn url_of(&self, w: &Where, entries: &[Entry], location: &str) -> Result<String> {
        if location.is_empty() || location.contains('/') || location.starts_with('.') {
            return Err(StorageError::Missing(location.to_owned()));
        }
        let q = format!("{location}.qcow2");
        if entries.iter().any(|e| e.name == q) {
            return Ok(format!("{}{q}", w.base_url));
        }
        if entries.iter().any(|e| e.name == location && e.is_file) {
            return Ok(format!("{}{location}", w.base_url));
        }
        Err(StorageError::Missing(location.to_owned()))
    }

    fn describe(&self, w: &Where, e: &Entry) -> Result<VdiInfo> {
        let url = format!("{}{}", w.base_url, e.name);
        let format = ImageFormat::of_file_name(&e.name);
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.as_ref().and_then(|c| c.get(&url).cloned()))
            .filter(|(m, l, _)| *m == e.mtime && *l == e.size)
            .map(|x| x.2);
        let info = match cached {
            Some(i) => i,
            None => {
                let i = QemuImg::default().info(&url, format)?;
                if let Ok(mut c) = self.cache.lock() {
                    c.get_or_insert_with(HashMap::new)
                        .insert(url, (e.mtime, e.size, i.clone()));
                }
                i
            }
        };
        // Backing files are absolute URLs into this SR's own directory.
        info.check_sr_references(|b| {
            let name = b.strip_prefix(w.base_url.as_str())?;
            plain_file_name(name).then(|| ImageFormat::of_file_name(name))
        })?;
        let location = e.name.strip_suffix(".qcow2").unwrap_or(&e.name).to_owned();
        let parent = info.backing.as_deref().map(|b| {
            let name = b.rsplit('/').next().unwrap_or(b);
            name.strip_suffix(".qcow2").unwrap_or(name).to_owned()
        });
        Ok(VdiInfo {
            location,
            virtual_size: info.virtual_size,
            physical_utilisation: e.used as i64,
            parent,
            format,
            read_only: false,
        })
    }

    fn info_by_location(&self, sr: &SrCtx, location: &str) -> Result<(Where, VdiInfo, String)> {
        let (w, entries) = self.entries(sr)?;
        let url = self.url_of(&w, &entries, location)?;
        let name = url.rsplit('/').next().unwrap_or_default().to_owned();
        let e = entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| StorageError::Missing(location.to_owned()))?;
        let info = self.describe(&w, e)?;
        Ok((w, info, url))
    }

    fn marker(&self, w: &Where, sr_uuid: &str) -> Result<Option<u32>> {
        let (server, export, uuid) = (w.server.clone(), w.export.clone(), sr_uuid.to_owned());
        let data = block(async move {
            let mut c = mount(&server, &export).await?;
            let dir = Self::sr_dir(&mut c, &uuid, false).await?;
            let r = read_small(&mut c, &dir, MARKER).await;
            let _ = c.unmount().await;
            r
        })?;
        Ok(data
            .and_then(|d| serde_json::from_slice::<serde_json::Value>(&d).ok())
            .map(|j| j["format_version"].as_u64().unwrap_or(0) as u32))
    }

    fn write_marker(&self, w: &Where, sr_uuid: &str, version: u32, create_dir: bool) -> Result<()> {
        let (server, export, uuid) = (w.server.clone(), w.export.clone(), sr_uuid.to_owned());
        let text = serde_json::json!({ "uuid": sr_uuid, "format_version": version }).to_string();
        block(async move {
            let mut c = mount(&server, &export).await?;
            let dir = Self::sr_dir(&mut c, &uuid, create_dir).await?;
            let r = write_small(&mut c, &dir, MARKER, text.as_bytes()).await;
            let _ = c.unmount().await;
            r
        })
    }
}

impl Default for NfsDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl Driver for NfsDriver {
    fn info(&self) -> &'static SmInfo {
        &NFS_INFO
    }

    fn probe(&self, dc: &BTreeMap<String, String>, _state_dir: &Path) -> Result<String> {
        let server = dc.get("server").filter(|s| !s.is_empty()).ok_or_else(|| {
            StorageError::backend(102, "The request is missing the server parameter", "")
        })?;
        if dc.get("serverpath").is_none_or(|p| p.is_empty()) {
            // As XAPI: the export list travels in the error's third field.
            let mut xml = String::from("<?xml version=\"1.0\" ?>\n<nfs-exports>\n");
            for (path, groups) in exports(server)? {
                let access = if groups.is_empty() {
                    "*".to_owned()
                } else {
                    groups.join(",")
                };
                xml.push_str(&format!(
                    "\t<Export>\n\t\t<Target>{}</Target>\n\t\t<Path>{}</Path>\n\t\t<Accesslist>{}</Accesslist>\n\t</Export>\n",
                    xml_escape(server),
                    xml_escape(&path),
                    xml_escape(&access)
                ));
            }
            xml.push_str("</nfs-exports>\n");
            return Err(StorageError::backend(
                101,
                "The request is missing the serverpath parameter",
                xml,
            ));
        }
        let w = Self::where_(dc, "")?;
        let (s2, e2) = (w.server.clone(), w.export.clone());
        let found = block(async move {
            let mut c = mount(&s2, &e2).await?;
            let root = c.root_nfs_fh3();
            let mut found = Vec::new();
            for e in list(&mut c, &root).await? {
                if e.is_file || e.name.starts_with('.') || uuid::Uuid::parse_str(&e.name).is_err() {
                    continue;
                }
                if let Some((dir, _)) = lookup(&mut c, &root, &e.name).await? {
                    if let Some(data) = read_small(&mut c, &dir, MARKER).await? {
                        let v = serde_json::from_slice::<serde_json::Value>(&data)
                            .ok()
                            .and_then(|j| j["format_version"].as_u64())
                            .unwrap_or(0);
                        found.push((e.name.clone(), v));
                    }
                }
            }
            let _ = c.unmount().await;
            Ok(found)
        })?;
        let mut xml = String::from("<?xml version=\"1.0\" ?>\n<SRlist>\n");
        for (uuid, v) in found {
            xml.push_str(&format!(
                "\t<SR>\n\t\t<UUID>{uuid}</UUID>\n\t\t<FormatVersion>{v}</FormatVersion>\n\t</SR>\n"
            ));
        }
        xml.push_str("</SRlist>\n");
        Ok(xml)
    }

    fn create(&self, sr: &SrCtx, _physical_size: i64) -> Result<()> {
        let w = Self::where_(&sr.device_config, &sr.uuid)?;
        self.write_marker(&w, &sr.uuid, FORMAT_VERSION, true)
    }

    fn delete(&self, sr: &SrCtx) -> Result<()> {
        let w = Self::where_(&sr.device_config, &sr.uuid)?;
        let (server, export, uuid) = (w.server.clone(), w.export.clone(), sr.uuid.clone());
        block(async move {
            let mut c = mount(&server, &export).await?;
            let root = c.root_nfs_fh3();
            if let Some((dir, _)) = lookup(&mut c, &root, &uuid).await? {
                remove(&mut c, &dir, MARKER).await?;
                let r = c
                    .rmdir(&RMDIR3args {
                        object: diropargs3 {
                            dir: root.clone(),
                            name: uuid.as_bytes().into(),
                        },
                    })
                    .await
                    .map_err(|e| nfs_err("rmdir", format!("{e:?}")))?;
                if let Nfs3Result::Err(e) = r {
                    return Err(status_err("rmdir", e));
                }
            }
            let _ = c.unmount().await;
            Ok(())
        })
    }

    fn attach(&self, sr: &SrCtx) -> Result<u32> {
        let w = Self::where_(&sr.device_config, &sr.uuid)?;
        match self.marker(&w, &sr.uuid)? {
            Some(v) if v > FORMAT_VERSION => Err(StorageError::TooNew {
                found: v,
                supported: FORMAT_VERSION,
            }),
            Some(v) => Ok(v.max(LEGACY_FORMAT_VERSION)),
            None => {
                self.write_marker(&w, &sr.uuid, LEGACY_FORMAT_VERSION, false)?;
                Ok(LEGACY_FORMAT_VERSION)
            }
        }
    }

    fn detach(&self, _sr: &SrCtx) -> Result<()> {
        Ok(())
    }

    fn stat(&self, sr: &SrCtx) -> Result<SrStat> {
        let w = Self::where_(&sr.device_config, &sr.uuid)?;
        let (server, export) = (w.server.clone(), w.export.clone());
        block(async move {
            let mut c = mount(&server, &export).await?;
            let root = c.root_nfs_fh3();
            let r = c
                .fsstat(&FSSTAT3args { fsroot: root })
                .await
                .map_err(|e| nfs_err("fsstat", format!("{e:?}")))?;
            let _ = c.unmount().await;
            match r {
                Nfs3Result::Ok(ok) => Ok(SrStat {
                    physical_size: ok.tbytes as i64,
                    physical_utilisation: (ok.tbytes - ok.fbytes) as i64,
                }),
                Nfs3Result::Err(e) => Err(status_err("fsstat", e)),
            }
        })
    }

    fn scan(&self, sr: &SrCtx) -> Result<Vec<VdiInfo>> {
        let (w, entries) = self.entries(sr)?;
        let mut out = Vec::new();
        for e in entries
            .iter()
            .filter(|e| e.is_file && !e.name.starts_with('.'))
        {
            out.push(self.describe(&w, e)?);
        }
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }

    fn upgrade(&self, sr: &SrCtx) -> Result<()> {
        let w = Self::where_(&sr.device_config, &sr.uuid)?;
        self.write_marker(&w, &sr.uuid, FORMAT_VERSION, false)
    }

    fn vdi_create(&self, sr: &SrCtx, size: i64, format_version: u32) -> Result<VdiInfo> {
        let w = Self::where_(&sr.device_config, &sr.uuid)?;
        let loc = crate::new_location();
        let q = QemuImg::default();
        let url = if format_version >= FORMAT_VERSION {
            let url = format!("{}{loc}.qcow2", w.base_url);
            q.create_qcow2(&url, size, None)?;
            url
        } else {
            let url = format!("{}{loc}", w.base_url);
            q.create_raw(&url, size)?;
            url
        };
        let info = q.info(&url, ImageFormat::of_file_name(&url))?;
        Ok(VdiInfo {
            location: loc,
            virtual_size: info.virtual_size,
            physical_utilisation: info.actual_size,
            parent: None,
            format: info.format,
            read_only: false,
        })
    }

    fn vdi_delete(&self, sr: &SrCtx, location: &str) -> Result<()> {
        let w = Self::where_(&sr.device_config, &sr.uuid)?;
        let (server, export, uuid, loc) = (
            w.server.clone(),
            w.export.clone(),
            sr.uuid.clone(),
            location.to_owned(),
        );
        block(async move {
            let mut c = mount(&server, &export).await?;
            let dir = Self::sr_dir(&mut c, &uuid, false).await?;
            remove(&mut c, &dir, &format!("{loc}.qcow2")).await?;
            remove(&mut c, &dir, &loc).await?;
            let _ = c.unmount().await;
            Ok(())
        })
    }

    fn vdi_info(&self, sr: &SrCtx, location: &str) -> Result<VdiInfo> {
        Ok(self.info_by_location(sr, location)?.1)
    }

    fn vdi_child(&self, sr: &SrCtx, parent: &str) -> Result<VdiInfo> {
        let (w, pinfo, purl) = self.info_by_location(sr, parent)?;
        let loc = crate::new_location();
        let url = format!("{}{loc}.qcow2", w.base_url);
        QemuImg::default().create_qcow2(&url, pinfo.virtual_size, Some((&purl, pinfo.format)))?;
        Ok(VdiInfo {
            location: loc,
            virtual_size: pinfo.virtual_size,
            physical_utilisation: 0,
            parent: Some(parent.to_owned()),
            format: ImageFormat::Qcow2,
            read_only: false,
        })
    }

    fn vdi_resize(&self, sr: &SrCtx, location: &str, size: i64) -> Result<VdiInfo> {
        let (_, info, url) = self.info_by_location(sr, location)?;
        QemuImg::default().resize(
            &Image {
                path: url,
                format: info.format,
            },
            size,
        )?;
        self.vdi_info(sr, location)
    }

    fn vdi_commit(&self, sr: &SrCtx, child: &str) -> Result<()> {
        let (_, _, url) = self.info_by_location(sr, child)?;
        QemuImg::default().commit(&url)
    }

    fn merges_by_commit(&self) -> bool {
        // libnfs cannot reopen a backing image read-write, so qemu-img
        // commit fails on nfs:// chains.
        false
    }

    fn vdi_pull_parent(&self, sr: &SrCtx, location: &str, new_parent: Option<&str>) -> Result<()> {
        let (w, entries) = self.entries(sr)?;
        let url = self.url_of(&w, &entries, location)?;
        let backing = match new_parent {
            Some(np) => {
                let purl = self.url_of(&w, &entries, np)?;
                let fmt = ImageFormat::of_file_name(&purl);
                Some((purl, fmt))
            }
            None => None,
        };
        QemuImg::default().rebase_safe(&url, backing.as_ref().map(|(b, f)| (b.as_str(), *f)))
    }

    fn vdi_set_parent(&self, sr: &SrCtx, location: &str, parent: &str) -> Result<()> {
        let (w, entries) = self.entries(sr)?;
        let url = self.url_of(&w, &entries, location)?;
        let purl = self.url_of(&w, &entries, parent)?;
        let pfmt = ImageFormat::of_file_name(&purl);
        QemuImg::default().rebase_unsafe(&url, &purl, pfmt)
    }

    fn vdi_image(&self, sr: &SrCtx, location: &str) -> Result<Image> {
        // Described (so checked) as the scan does: only chains Corral made
        // are opened.
        let (_, info, url) = self.info_by_location(sr, location)?;
        Ok(Image {
            path: url,
            format: info.format,
        })
    }

    fn vdi_import_from(&self, sr: &SrCtx, loc: &str, src: &Image) -> Result<VdiInfo> {
        let w = Self::where_(&sr.device_config, &sr.uuid)?;
        let url = format!("{}{loc}.qcow2", w.base_url);
        if let Err(e) = QemuImg::default().convert(src, &url, ImageFormat::Qcow2) {
            let _ = self.vdi_delete(sr, loc);
            return Err(e);
        }
        self.vdi_info(sr, loc)
    }
}
