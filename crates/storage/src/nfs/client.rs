//! The userspace NFSv3 client calls the driver makes: mount, lookup, list, read and write small files, exports.

use crate::{Result, StorageError};
use nfs3_client::nfs3_types::nfs3;
use nfs3_client::nfs3_types::nfs3::{
    CREATE3args, LOOKUP3args, MKDIR3args, Nfs3Option, Nfs3Result, READ3args, READDIRPLUS3args,
    REMOVE3args, WRITE3args, createhow3, diropargs3, nfs_fh3, sattr3,
};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::{TokioConnector, TokioIo};
use nfs3_client::{MountClient, Nfs3Connection, Nfs3ConnectionBuilder, PortmapperClient};
use std::net::{IpAddr, ToSocketAddrs};
use std::time::Duration;

/// One NFS management call (mount + a few RPCs) may take this long.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) type Conn = Nfs3Connection<TokioIo<tokio::net::TcpStream>>;

pub(crate) fn nfs_err(what: &str, e: impl std::fmt::Display) -> StorageError {
    // SMAPI 73: NFS mount error.
    StorageError::backend(73, "NFS mount error", format!("{what}: {e}"))
}

pub(crate) fn status_err<E: std::fmt::Debug>(what: &str, r: (nfs3::nfsstat3, E)) -> StorageError {
    StorageError::Tool(format!("NFS {what}: {:?}", r.0))
}

pub(crate) fn credential() -> opaque_auth<'static> {
    let a = auth_unix {
        stamp: 0,
        machinename: Opaque::owned(b"corral".to_vec()),
        uid: 0,
        gid: 0,
        gids: vec![],
    };
    opaque_auth::auth_unix(&a)
}

pub(crate) fn resolve(server: &str) -> Result<IpAddr> {
    if let Ok(ip) = server.parse::<IpAddr>() {
        return Ok(ip);
    }
    (server, 111)
        .to_socket_addrs()
        .map_err(|e| {
            StorageError::backend(
                140,
                "Incorrect DNS name, unable to resolve.",
                format!("{server}: {e}"),
            )
        })?
        .next()
        .map(|a| a.ip())
        .ok_or_else(|| {
            StorageError::backend(
                140,
                "Incorrect DNS name, unable to resolve.",
                server.to_owned(),
            )
        })
}

/// Runs one management exchange on a private single-threaded runtime in its
/// own thread (callers may be inside another runtime), bounded by
/// [`RPC_TIMEOUT`].
pub(crate) fn block<T: Send>(f: impl std::future::Future<Output = Result<T>> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| StorageError::Tool(format!("runtime: {e}")))?;
                rt.block_on(async {
                    match tokio::time::timeout(RPC_TIMEOUT, f).await {
                        Ok(r) => r,
                        Err(_) => Err(StorageError::backend(
                            73,
                            "NFS mount error",
                            "the NFS server did not answer in time",
                        )),
                    }
                })
            })
            .join()
            .unwrap_or_else(|_| Err(StorageError::Tool("NFS client thread panicked".into())))
    })
}

pub(crate) async fn mount(server: &str, export: &str) -> Result<Conn> {
    let ip = resolve(server)?;
    Nfs3ConnectionBuilder::new(TokioConnector, ip.to_string(), export)
        .credential(credential())
        .mount()
        .await
        .map_err(|e| nfs_err(&format!("mounting {server}:{export}"), format!("{e:?}")))
}

pub(crate) async fn lookup(
    c: &mut Conn,
    dir: &nfs_fh3,
    name: &str,
) -> Result<Option<(nfs_fh3, Option<nfs3::fattr3>)>> {
    let r = c
        .lookup(&LOOKUP3args {
            what: diropargs3 {
                dir: dir.clone(),
                name: name.as_bytes().into(),
            },
        })
        .await
        .map_err(|e| nfs_err("lookup", format!("{e:?}")))?;
    Ok(match r {
        Nfs3Result::Ok(ok) => {
            let attr = match ok.obj_attributes {
                Nfs3Option::Some(a) => Some(a),
                Nfs3Option::None => None,
            };
            Some((ok.object, attr))
        }
        Nfs3Result::Err((nfs3::nfsstat3::NFS3ERR_NOENT, _)) => None,
        Nfs3Result::Err(e) => return Err(status_err("lookup", e)),
    })
}

pub(crate) async fn mkdir(c: &mut Conn, dir: &nfs_fh3, name: &str) -> Result<nfs_fh3> {
    let mut attrs = sattr3::default();
    attrs.mode = nfs3::set_mode3::Some(0o755);
    let r = c
        .mkdir(&MKDIR3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: name.as_bytes().into(),
            },
            attributes: attrs,
        })
        .await
        .map_err(|e| nfs_err("mkdir", format!("{e:?}")))?;
    match r {
        Nfs3Result::Ok(ok) => match ok.obj {
            Nfs3Option::Some(fh) => Ok(fh),
            Nfs3Option::None => lookup(c, dir, name)
                .await?
                .map(|x| x.0)
                .ok_or_else(|| StorageError::Tool("NFS mkdir: no handle".into())),
        },
        Nfs3Result::Err((nfs3::nfsstat3::NFS3ERR_EXIST, _)) => lookup(c, dir, name)
            .await?
            .map(|x| x.0)
            .ok_or_else(|| StorageError::Tool("NFS mkdir: vanished".into())),
        Nfs3Result::Err(e) => Err(status_err("mkdir", e)),
    }
}

pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) used: u64,
    pub(crate) mtime: (u32, u32),
    pub(crate) is_file: bool,
}

pub(crate) async fn list(c: &mut Conn, dir: &nfs_fh3) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut cookie = 0;
    let mut verf = nfs3::cookieverf3::default();
    loop {
        let r = c
            .readdirplus(&READDIRPLUS3args {
                dir: dir.clone(),
                cookie,
                cookieverf: verf,
                dircount: 64 * 1024,
                maxcount: 256 * 1024,
            })
            .await
            .map_err(|e| nfs_err("readdirplus", format!("{e:?}")))?;
        let ok = match r {
            Nfs3Result::Ok(ok) => ok,
            Nfs3Result::Err(e) => return Err(status_err("readdirplus", e)),
        };
        verf = ok.cookieverf;
        for e in ok.reply.entries.0 {
            cookie = e.cookie;
            let name = String::from_utf8_lossy(&e.name.0).into_owned();
            if let Nfs3Option::Some(a) = e.name_attributes {
                out.push(Entry {
                    name,
                    size: a.size,
                    used: a.used,
                    mtime: (a.mtime.seconds, a.mtime.nseconds),
                    is_file: matches!(a.type_, nfs3::ftype3::NF3REG),
                });
            }
        }
        if ok.reply.eof {
            return Ok(out);
        }
    }
}

pub(crate) async fn remove(c: &mut Conn, dir: &nfs_fh3, name: &str) -> Result<()> {
    let r = c
        .remove(&REMOVE3args {
            object: diropargs3 {
                dir: dir.clone(),
                name: name.as_bytes().into(),
            },
        })
        .await
        .map_err(|e| nfs_err("remove", format!("{e:?}")))?;
    match r {
        Nfs3Result::Ok(_) | Nfs3Result::Err((nfs3::nfsstat3::NFS3ERR_NOENT, _)) => Ok(()),
        Nfs3Result::Err(e) => Err(status_err("remove", e)),
    }
}

pub(crate) async fn read_small(c: &mut Conn, dir: &nfs_fh3, name: &str) -> Result<Option<Vec<u8>>> {
    let Some((fh, _)) = lookup(c, dir, name).await? else {
        return Ok(None);
    };
    let r = c
        .read(&READ3args {
            file: fh,
            offset: 0,
            count: 64 * 1024,
        })
        .await
        .map_err(|e| nfs_err("read", format!("{e:?}")))?;
    match r {
        Nfs3Result::Ok(ok) => Ok(Some(ok.data.to_vec())),
        Nfs3Result::Err(e) => Err(status_err("read", e)),
    }
}

pub(crate) async fn write_small(
    c: &mut Conn,
    dir: &nfs_fh3,
    name: &str,
    data: &[u8],
) -> Result<()> {
    let mut attrs = sattr3::default();
    attrs.mode = nfs3::set_mode3::Some(0o644);
    attrs.size = nfs3::set_size3::Some(0);
    let r = c
        .create(&CREATE3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: name.as_bytes().into(),
            },
            how: createhow3::UNCHECKED(attrs),
        })
        .await
        .map_err(|e| nfs_err("create", format!("{e:?}")))?;
    let fh = match r {
        Nfs3Result::Ok(ok) => match ok.obj {
            Nfs3Option::Some(fh) => fh,
            Nfs3Option::None => lookup(c, dir, name)
                .await?
                .map(|x| x.0)
                .ok_or_else(|| StorageError::Tool("NFS create: no handle".into()))?,
        },
        Nfs3Result::Err(e) => return Err(status_err("create", e)),
    };
    let r = c
        .write(&WRITE3args {
            file: fh,
            offset: 0,
            count: data.len() as u32,
            stable: nfs3::stable_how::FILE_SYNC,
            data: Opaque::borrowed(data),
        })
        .await
        .map_err(|e| nfs_err("write", format!("{e:?}")))?;
    match r {
        Nfs3Result::Ok(_) => Ok(()),
        Nfs3Result::Err(e) => Err(status_err("write", e)),
    }
}

/// The exports a server offers: (path, allowed clients).
pub(crate) fn exports(server: &str) -> Result<Vec<(String, Vec<String>)>> {
    let ip = resolve(server)?;
    block(async move {
        let pm_io = TokioConnector_connect(ip, 111).await?;
        let mut pm = PortmapperClient::new(pm_io);
        let port = pm
            .getport(
                nfs3_client::nfs3_types::mount::PROGRAM,
                nfs3_client::nfs3_types::mount::VERSION,
                nfs3_client::nfs3_types::portmap::IPPROTO_TCP,
            )
            .await
            .map_err(|e| {
                StorageError::backend(
                    108,
                    "Unable to detect an NFS service on this target.",
                    format!("{e:?}"),
                )
            })?;
        let io = TokioConnector_connect(ip, port).await?;
        let mut m = MountClient::new_with_auth(io, credential(), opaque_auth::default());
        let list = m
            .export()
            .await
            .map_err(|e| nfs_err("export list", format!("{e:?}")))?;
        Ok(list
            .0
            .into_iter()
            .map(|n| {
                (
                    String::from_utf8_lossy(&n.ex_dir.0).into_owned(),
                    n.ex_groups
                        .0
                        .into_iter()
                        .map(|g| String::from_utf8_lossy(&g.0).into_owned())
                        .collect(),
                )
            })
            .collect())
    })
}

#[allow(non_snake_case)]
pub(crate) async fn TokioConnector_connect(
    ip: IpAddr,
    port: u16,
) -> Result<TokioIo<tokio::net::TcpStream>> {
    let s = tokio::net::TcpStream::connect((ip, port))
        .await
        .map_err(|e| {
            StorageError::backend(
                108,
                "Unable to detect an NFS service on this target.",
                e.to_string(),
            )
        })?;
    Ok(TokioIo::new(s))
}

pub(crate) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Splits `nfs://server/path` into (server, path).
pub fn parse_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("nfs://")?;
    let (server, path) = rest.split_once('/')?;
    if server.is_empty() {
        return None;
    }
    Some((
        server.to_owned(),
        format!("/{}", path.trim_end_matches('/')),
    ))
}

/// Regular files in an exported directory: (name, size, bytes used).
pub fn list_files(url: &str) -> Result<Vec<(String, u64, u64)>> {
    let (server, path) = parse_url(url).ok_or_else(|| {
        StorageError::backend(73, "NFS mount error", format!("not an nfs:// URL: {url}"))
    })?;
    block(async move {
        let mut c = mount(&server, &path).await?;
        let root = c.root_nfs_fh3();
        let l = list(&mut c, &root).await;
        let _ = c.unmount().await;
        Ok(l?
            .into_iter()
            .filter(|e| e.is_file)
            .map(|e| (e.name, e.size, e.used))
            .collect())
    })
}
