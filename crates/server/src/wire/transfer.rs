//! XAPI's disk transfer handlers: `PUT /import_raw_vdi` and
//! `GET /export_raw_vdi` with `session_id`, `vdi` (ref or uuid), `format`
//! (`raw`, `vhd`, `qcow2`) and an optional `task_id`. Raw data streams
//! through qemu-nbd in fixed-size chunks (bounded memory at any disk size);
//! vhd and qcow2 go through a temporary file converted by qemu-img.

use crate::context::Server;
use crate::wire::http::write_simple;
use crate::wire::query::query_param;
use corral_model::errors;
use corral_model::http::Request;
use corral_model::schema::{Role, class, field};
use corral_model::{ApiError, Value};
use corral_storage::nbd::{CHUNK, NbdImage};
use corral_storage::{Image, ImageFormat};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What a transfer needs, checked before any data moves.
pub(crate) struct Transfer {
    vdi: String,
    /// The VDI's image, in the format the storage layer pins for it.
    image: Image,
    virtual_size: i64,
    /// The format on the wire.
    format: ImageFormat,
    task: String,
    own_task: bool,
}

pub(crate) fn wire_format(wire: &str) -> Option<ImageFormat> {
    match wire {
        "raw" => Some(ImageFormat::Raw),
        "vhd" => Some(ImageFormat::Vpc),
        "qcow2" => Some(ImageFormat::Qcow2),
        _ => None,
    }
}

/// The most a vhd or qcow2 upload of a `virtual_size`-byte disk may take:
/// all of its data plus generous room for metadata (qcow2 with 512-byte
/// clusters needs about 1/50 of the size).
pub(crate) fn upload_limit(virtual_size: i64) -> u64 {
    let v = virtual_size.max(0) as u64;
    v.saturating_add(v / 16).saturating_add(16 << 20)
}

pub(crate) fn prepare(
    server: &Arc<Server>,
    req: &Request,
    op: &str,
) -> Result<Transfer, (&'static str, String)> {
    let q = &req.query;
    let session = query_param(q, "session_id").unwrap_or_default();
    let info = server
        .sessions
        .check(server, &session)
        .map_err(|_| ("401 Unauthorized", "invalid session".to_owned()))?;
    if !info.role.allows(Role::VmAdmin) {
        return Err(("403 Forbidden", errors::RBAC_PERMISSION_DENIED.into()));
    }
    let wire = query_param(q, "format").unwrap_or_else(|| "raw".into());
    let Some(format) = wire_format(&wire) else {
        return Err(("400 Bad Request", "unknown format".to_owned()));
    };
    let vdi_param = query_param(q, "vdi").unwrap_or_default();
    let vdi = {
        let st = server.db.read();
        if st.exists(class::VDI, &vdi_param) {
            vdi_param.clone()
        } else {
            st.by_uuid(class::VDI, &vdi_param)
                .cloned()
                .ok_or(("404 Not Found", format!("no VDI {vdi_param}")))?
        }
    };
    let (sr, location, virtual_size) = {
        let st = server.db.read();
        (
            st.get_str(field::vdi::SR, &vdi).unwrap_or_default(),
            st.get_str(field::vdi::LOCATION, &vdi).unwrap_or_default(),
            st.get(field::vdi::VIRTUAL_SIZE, &vdi)
                .and_then(|v| v.as_int())
                .unwrap_or(0),
        )
    };
    // A running guest writes it: only QEMU may read or write it now
    // (snapshot it and export the snapshot instead).
    if crate::ops::query::plugged_rw_drive(server, &vdi).is_some() {
        return Err(("409 Conflict", format!("VDI_IN_USE {vdi} {op}")));
    }
    let image = crate::ops::vdi::vdi_image(server, &server.db.read(), &sr, &location)
        .map_err(|e| ("500 Internal Server Error", e.to_string()))?;
    let (task, own_task) =
        match query_param(q, "task_id").filter(|t| server.db.read().exists(class::TASK, t)) {
            // Only the caller's own task reports this transfer.
            Some(t)
                if !info.role.allows(Role::PoolOperator)
                    && !server.owns_task(&session, &info.user_name, &t) =>
            {
                return Err(("403 Forbidden", errors::RBAC_PERMISSION_DENIED.into()));
            }
            Some(t) => (t, false),
            None => (
                server
                    .task_create(&format!("VDI {op}"), "", &session, true)
                    .map_err(|e| ("500 Internal Server Error", e.to_string()))?,
                true,
            ),
        };
    Ok(Transfer {
        vdi,
        image,
        virtual_size,
        format,
        task,
        own_task,
    })
}

pub(crate) fn finish(server: &Server, t: &Transfer, result: Result<(), ApiError>) {
    server.task_complete(&t.task, result.map(|_| Value::str("")));
    if t.own_task {
        // A task nobody asked for is not left behind on success.
        let ok = server
            .db
            .read()
            .get_str(field::task::STATUS, &t.task)
            .as_deref()
            == Some("success");
        if ok {
            server.task_destroy(&t.task);
        }
    }
}

pub(crate) fn storage_err(vdi: &str, e: corral_storage::StorageError) -> ApiError {
    match e {
        corral_storage::StorageError::Untrusted(why) => {
            errors::import_error(format!("the image cannot be imported: {why}"))
        }
        e => crate::core::driver_errors::storage(1, vdi, e),
    }
}

/// `PUT /import_raw_vdi`. `pending` holds body bytes already read.
pub async fn import<S: AsyncRead + AsyncWrite + Unpin + Send>(
    server: Arc<Server>,
    stream: &mut S,
    req: &Request,
    mut pending: Vec<u8>,
) {
    let t = match prepare(&server, req, "import") {
        Ok(t) => t,
        Err((status, why)) => {
            let _ = write_simple(stream, status, "text/plain", why.as_bytes(), false, "").await;
            return;
        }
    };
    let Some(len) = req.content_length().ok().flatten().map(|l| l as u64) else {
        finish(
            &server,
            &t,
            Err(ApiError::internal("import needs a Content-Length")),
        );
        let _ = write_simple(stream, "411 Length Required", "text/plain", b"", false, "").await;
        return;
    };
    // Data flows socket → bounded channel → blocking writer.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let run_dir = server.state_dir.join("run");
    if t.format != ImageFormat::Raw && len > upload_limit(t.virtual_size) {
        finish(
            &server,
            &t,
            Err(errors::import_error(format!(
                "{len} bytes are more than an image of a {}-byte VDI can hold",
                t.virtual_size
            ))),
        );
        let _ = write_simple(
            stream,
            "413 Payload Too Large",
            "text/plain",
            b"",
            false,
            "",
        )
        .await;
        return;
    }
    let (image, fmt, vsize) = (t.image.clone(), t.format, t.virtual_size);
    let tmp = server
        .state_dir
        .join("transfer")
        .join(format!("{}.upload", uuid::Uuid::new_v4()));
    let tmp2 = tmp.clone();
    let writer =
        tokio::task::spawn_blocking(move || -> Result<(), corral_storage::StorageError> {
            if fmt == ImageFormat::Raw {
                if len > vsize as u64 {
                    return Err(corral_storage::StorageError::backend(
                        79,
                        "VDI Invalid size",
                        format!("{len} bytes do not fit in a {vsize}-byte VDI"),
                    ));
                }
                let mut img = NbdImage::open(&image, true, &run_dir)?;
                let mut off = 0u64;
                for chunk in rx {
                    img.write_queued(off, &chunk)?;
                    off += chunk.len() as u64;
                }
                img.close()
            } else {
                use std::io::Write;
                if let Some(d) = tmp2.parent() {
                    std::fs::create_dir_all(d)?;
                }
                let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp2)?);
                for chunk in rx {
                    f.write_all(&chunk)?;
                }
                f.flush()?;
                drop(f);
                let q = corral_storage::qemu_img::QemuImg::default();
                // The upload is the client's: a backing file or data file
                // named in it would have root read or write that path.
                let info = q.inspect_upload(&tmp2, fmt)?;
                if info.virtual_size > vsize {
                    return Err(corral_storage::StorageError::backend(
                        79,
                        "VDI Invalid size",
                        format!("the image is {} bytes; the VDI {vsize}", info.virtual_size),
                    ));
                }
                let upload = Image {
                    path: tmp2.to_string_lossy().into_owned(),
                    format: fmt,
                };
                q.convert_into(&upload, &image)
            }
        });
    let mut received = 0u64;
    let mut last_progress = 0.0;
    let mut buf = vec![0u8; CHUNK];
    let mut fill = pending.len().min(CHUNK);
    buf[..fill].copy_from_slice(&pending[..fill]);
    pending.drain(..fill);
    let mut ok = true;
    while received < len {
        while fill < CHUNK && received + (fill as u64) < len {
            let want = (CHUNK - fill).min((len - received) as usize - fill);
            // A client that stops sending is dropped, not waited for.
            let pause = server.config.limits.request;
            match tokio::time::timeout(pause, stream.read(&mut buf[fill..fill + want]))
                .await
                .unwrap_or(Ok(0))
            {
                Ok(0) | Err(_) => {
                    ok = false;
                    break;
                }
                Ok(n) => fill += n,
            }
        }
        if !ok || fill == 0 {
            break;
        }
        received += fill as u64;
        if tx.send(buf[..fill].to_vec()).is_err() {
            // The writer failed (its error is reported below); read the rest
            // of the body so the client gets to see the answer.
            let mut left = len - received;
            while left > 0 {
                let want = (left as usize).min(CHUNK);
                let pause = server.config.limits.request;
                match tokio::time::timeout(pause, stream.read(&mut buf[..want]))
                    .await
                    .unwrap_or(Ok(0))
                {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left -= n as u64,
                }
            }
            received = len;
            break;
        }
        fill = 0;
        let p = received as f64 / len.max(1) as f64;
        if p - last_progress >= 0.05 {
            server.task_progress(&t.task, p.min(0.99));
            last_progress = p;
        }
    }
    drop(tx);
    let written = writer.await.map_err(|e| ApiError::internal(e.to_string()));
    let _ = std::fs::remove_file(&tmp);
    let result = match written {
        Ok(Ok(())) if ok && received == len => Ok(()),
        Ok(Ok(())) => Err(ApiError::internal(format!(
            "the upload ended after {received} of {len} bytes"
        ))),
        Ok(Err(e)) => Err(storage_err(&t.vdi, e)),
        Err(e) => Err(e),
    };
    let failed = result.is_err();
    let text = result
        .as_ref()
        .err()
        .map(|e| e.description().join(" "))
        .unwrap_or_default();
    finish(&server, &t, result);
    if !failed {
        crate::ops::vdi::refresh_vdi(&server, &t.vdi).await;
    }
    let status = if failed {
        "500 Internal Server Error"
    } else {
        "200 OK"
    };
    let _ = write_simple(
        stream,
        status,
        "text/plain",
        text.as_bytes(),
        false,
        &format!("Task-Id: {}\r\n", t.task),
    )
    .await;
}

/// `GET /export_raw_vdi`. `raw_fd` is the plain-HTTP socket, if any: raw
/// exports then go into it with sendfile from the image files, or spliced
/// from qemu-nbd.
pub async fn export<S: AsyncRead + AsyncWrite + Unpin + Send>(
    server: Arc<Server>,
    stream: &mut S,
    req: &Request,
    raw_fd: Option<i32>,
) {
    let t = match prepare(&server, req, "export") {
        Ok(t) => t,
        Err((status, why)) => {
            let _ = write_simple(stream, status, "text/plain", why.as_bytes(), false, "").await;
            return;
        }
    };
    if let (Some(fd), ImageFormat::Raw) = (raw_fd, t.format) {
        let _ = stream.flush().await;
        let run_dir = server.state_dir.join("run");
        let (image, task) = (t.image.clone(), t.task.clone());
        // The async side does not touch the stream until this returns.
        let r = tokio::task::spawn_blocking(move || -> Result<(), corral_storage::StorageError> {
            let head = |size: u64| {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\nTask-Id: {task}\r\nConnection: close\r\n\r\n"
                )
            };
            // Local images go straight from their files (sendfile); the
            // rest through qemu-nbd.
            if let Ok(Some(map)) = corral_storage::direct::map(&image) {
                corral_storage::nbd::write_all_fd(fd, head(map.size).as_bytes())?;
                return corral_storage::direct::send_all(&map, fd);
            }
            let mut img = NbdImage::open(&image, false, &run_dir)?;
            corral_storage::nbd::write_all_fd(fd, head(img.size()).as_bytes())?;
            img.splice_all(fd)?;
            img.close()
        })
        .await;
        let result = match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(storage_err(&t.vdi, e)),
            Err(e) => Err(ApiError::internal(e.to_string())),
        };
        finish(&server, &t, result);
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(4);
    let (size_tx, size_rx) =
        tokio::sync::oneshot::channel::<Result<u64, corral_storage::StorageError>>();
    let run_dir = server.state_dir.join("run");
    let (image, fmt) = (t.image.clone(), t.format);
    let tmp = server
        .state_dir
        .join("transfer")
        .join(format!("{}.download", uuid::Uuid::new_v4()));
    let tmp2 = tmp.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let send = |r: Result<Vec<u8>, String>| tx.blocking_send(r).is_ok();
        if fmt == ImageFormat::Raw {
            let mut img = match NbdImage::open(&image, false, &run_dir) {
                Ok(i) => i,
                Err(e) => {
                    let _ = size_tx.send(Err(e));
                    return;
                }
            };
            let size = img.size();
            let _ = size_tx.send(Ok(size));
            if let Err(e) = img.read_all(8, |chunk| send(Ok(chunk))) {
                let _ = send(Err(e.to_string()));
                return;
            }
            let _ = img.close();
        } else {
            use std::io::Read;
            if let Some(d) = tmp2.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let made = corral_storage::qemu_img::QemuImg::default().convert(
                &image,
                &tmp2.to_string_lossy(),
                fmt,
            );
            let mut f = match made.and_then(|_| Ok(std::fs::File::open(&tmp2)?)) {
                Ok(f) => f,
                Err(e) => {
                    let _ = size_tx.send(Err(e));
                    return;
                }
            };
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = size_tx.send(Ok(size));
            loop {
                let mut buf = vec![0u8; CHUNK];
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if !send(Ok(buf)) {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = send(Err(e.to_string()));
                        return;
                    }
                }
            }
        }
    });
    let size = match size_rx.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let err = storage_err(&t.vdi, e);
            let text = err.description().join(" ");
            finish(&server, &t, Err(err));
            let _ = write_simple(
                stream,
                "500 Internal Server Error",
                "text/plain",
                text.as_bytes(),
                false,
                "",
            )
            .await;
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        Err(_) => {
            finish(
                &server,
                &t,
                Err(ApiError::internal("export worker stopped")),
            );
            return;
        }
    };
    let ctype = match t.format {
        ImageFormat::Vpc => "application/vhd",
        ImageFormat::Qcow2 => "application/x-qemu-disk",
        ImageFormat::Raw => "application/octet-stream",
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {size}\r\nTask-Id: {}\r\nConnection: close\r\n\r\n",
        t.task
    );
    let mut result = stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| ApiError::internal(e.to_string()));
    let mut sent = 0u64;
    let mut last = 0.0;
    while result.is_ok() {
        match rx.recv().await {
            None => break,
            Some(Ok(chunk)) => {
                sent += chunk.len() as u64;
                result = stream
                    .write_all(&chunk)
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()));
                let p = sent as f64 / size.max(1) as f64;
                if p - last >= 0.05 {
                    server.task_progress(&t.task, p.min(0.99));
                    last = p;
                }
            }
            Some(Err(e)) => result = Err(ApiError::internal(e)),
        }
    }
    drop(rx);
    let _ = reader.await;
    let _ = stream.flush().await;
    let _ = std::fs::remove_file(&tmp);
    if result.is_ok() && sent != size {
        result = Err(ApiError::internal(format!(
            "exported {sent} of {size} bytes"
        )));
    }
    finish(&server, &t, result);
}
