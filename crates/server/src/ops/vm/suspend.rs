//! VM.suspend and VM.resume through a suspend VDI.

use crate::context::Server;
use crate::context::hosts::HostHandle;
use crate::core::driver_errors;
use crate::core::records::{db, to_value};
use crate::ops::query::{int, strmap, vm_uuid};
use crate::ops::vdi::vdi_image_of;
use crate::ops::vm::clone::new_vdi;
use crate::ops::vm::lifecycle::refresh_allowed;
use crate::ops::vm::power::launch;
use crate::ops::vm::state::{SUSPEND_OF, alert, record_stopped, set_paused};
use corral_model::enums::VmPowerState;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, errors};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

pub(crate) fn suspend_sr(s: &Server, host: &str, vm: &str) -> Result<String, ApiError> {
    let st = s.db.read();
    let candidates = [
        st.get_str(field::vm::SUSPEND_SR, vm),
        st.get_str(field::pool::SUSPEND_IMAGE_SR, &s.pool_ref),
        st.get_str(field::host::SUSPEND_IMAGE_SR, host),
        st.get_str(field::pool::DEFAULT_SR, &s.pool_ref),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|sr| st.exists(class::SR, sr))
        .ok_or_else(|| errors::vm_no_suspend_sr(vm))
}

pub(crate) fn fifo(dir: &std::path::Path) -> Result<std::path::PathBuf, ApiError> {
    std::fs::create_dir_all(dir).map_err(|e| ApiError::internal(e.to_string()))?;
    let p = dir.join(format!("stream-{}", &corral_model::new_uuid()[..8]));
    let c = std::ffi::CString::new(p.to_string_lossy().as_bytes())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // SAFETY: mkfifo with a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(ApiError::internal(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(p)
}

/// Saves a running VM's memory into a new suspend VDI, then stops it.
pub(crate) async fn suspend(s: Arc<Server>, h: &HostHandle, vm: &str) -> Result<(), ApiError> {
    let sr = suspend_sr(&s, &h.host, vm)?;
    let (uuid, mem, name) = {
        let st = s.db.read();
        (
            vm_uuid(&st, vm),
            int(&st, field::vm::MEMORY_STATIC_MAX, vm),
            st.get_str(field::vm::NAME_LABEL, vm).unwrap_or_default(),
        )
    };
    // Room for RAM and device state; the image is thin, so only what the
    // stream holds is allocated.
    let size = mem + mem / 8 + (64 << 20);
    let vdi = new_vdi(
        &s,
        &sr,
        &format!("Suspend image for {name}"),
        size,
        "suspend",
        &[(SUSPEND_OF, &uuid)],
    )
    .await?;
    let result = async {
        let image = vdi_image_of(&s, &s.db.read(), &vdi)?;
        let pipe = fifo(&h.state_dir.join("streams"))?;
        let run_dir = h.state_dir.clone();
        let reader = {
            let pipe = pipe.clone();
            tokio::task::spawn_blocking(move || stream_into_vdi(&pipe, &image, &run_dir))
        };
        let saved = h
            .agent
            .save(&uuid, pipe.clone())
            .await
            .map_err(|e| driver_errors::agent(vm, e));
        if saved.is_err() {
            // Unblock the reader if QEMU never opened the FIFO.
            let _ = std::fs::OpenOptions::new().write(true).open(&pipe);
        }
        let len = reader
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let _ = std::fs::remove_file(&pipe);
        saved?;
        let len = len?;
        db(s.db.write(|t| {
            let mut oc = strmap(t.state().get(field::vdi::OTHER_CONFIG, &vdi));
            oc.insert("corral-suspend-length".into(), len.to_string());
            t.set(field::vdi::OTHER_CONFIG, &vdi, to_value(&oc))
        }))?;
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = result {
        // Undo: the VM keeps running, the image goes.
        let _ = h.agent.unpause(&uuid).await;
        let _ = crate::ops::vdi::vdi_destroy(Arc::clone(&s), &vdi).await;
        return Err(e);
    }
    h.agent
        .destroy(&uuid)
        .await
        .map_err(|e| driver_errors::agent(vm, e))?;
    record_stopped(&s, vm, VmPowerState::Suspended, Some(&vdi))?;
    alert(&s, vm, "VM_SUSPENDED", 5, "VM suspended");
    Ok(())
}

/// Copies the save stream from the FIFO into the VDI; returns its length.
pub(crate) fn stream_into_vdi(
    pipe: &std::path::Path,
    image: &corral_storage::Image,
    run_dir: &std::path::Path,
) -> Result<u64, ApiError> {
    use std::io::Read;
    let mut src = std::fs::File::open(pipe).map_err(|e| ApiError::internal(e.to_string()))?;
    let mut img = corral_storage::nbd::NbdImage::open(image, true, run_dir)
        .map_err(|e| errors::vdi_io_error(e.to_string()))?;
    let mut buf = vec![0u8; corral_storage::nbd::CHUNK];
    let mut off = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match src.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(ApiError::internal(e.to_string())),
            }
        }
        if n == 0 {
            break;
        }
        if off + n as u64 > img.size() {
            return Err(errors::vdi_io_error("suspend image too large for its VDI"));
        }
        img.write_queued(off, &buf[..n])
            .map_err(|e| errors::vdi_io_error(e.to_string()))?;
        off += n as u64;
        if n < buf.len() {
            break;
        }
    }
    img.close()
        .map_err(|e| errors::vdi_io_error(e.to_string()))?;
    Ok(off)
}

/// Feeds `len` bytes of the VDI into the FIFO QEMU restores from.
pub(crate) fn stream_from_vdi(
    pipe: &std::path::Path,
    image: &corral_storage::Image,
    len: u64,
    run_dir: &std::path::Path,
) -> Result<(), ApiError> {
    // The FIFO first: if the image cannot be read, closing it ends QEMU's
    // incoming stream instead of leaving it waiting for a writer.
    let out = std::fs::OpenOptions::new()
        .write(true)
        .open(pipe)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut img = corral_storage::nbd::NbdImage::open(image, false, run_dir)
        .map_err(|e| errors::vdi_io_error(e.to_string()))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&out);
    let mut left = len;
    let mut failed = None;
    img.read_all(4, |chunk| {
        let n = (chunk.len() as u64).min(left) as usize;
        if let Err(e) = corral_storage::nbd::write_all_fd(fd, &chunk[..n]) {
            failed = Some(e);
            return false;
        }
        left -= n as u64;
        left > 0
    })
    .map_err(|e| errors::vdi_io_error(e.to_string()))?;
    if let Some(e) = failed {
        return Err(errors::vdi_io_error(e.to_string()));
    }
    Ok(())
}

/// Restores a suspended VM on `h` from its suspend VDI.
pub(crate) async fn resume(
    s: Arc<Server>,
    h: &HostHandle,
    vm: &str,
    paused: bool,
) -> Result<(), ApiError> {
    let (vdi, uuid) = {
        let st = s.db.read();
        (
            st.get_str(field::vm::SUSPEND_VDI, vm).unwrap_or_default(),
            vm_uuid(&st, vm),
        )
    };
    let (image, len) = {
        let st = s.db.read();
        if !st.exists(class::VDI, &vdi) {
            return Err(errors::vm_requires_vdi(vm, vdi.as_str()));
        }
        let image = vdi_image_of(&s, &st, &vdi)?;
        let len = strmap(st.get(field::vdi::OTHER_CONFIG, &vdi))
            .get("corral-suspend-length")
            .and_then(|l| l.parse::<u64>().ok())
            .unwrap_or(0);
        (image, len)
    };
    let pipe = fifo(&h.state_dir.join("streams"))?;
    let writer = {
        let (pipe, run_dir) = (pipe.clone(), h.state_dir.clone());
        tokio::task::spawn_blocking(move || stream_from_vdi(&pipe, &image, len, &run_dir))
    };
    let launched = launch(&s, h, vm, true, Some(pipe.clone())).await;
    if launched.is_err() {
        // Unblock the writer: nobody will read the FIFO.
        let _ = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe);
    }
    let fed = writer
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let _ = std::fs::remove_file(&pipe);
    if let Err(e) = launched {
        let _ = db(s.db.write(|t| {
            t.set(
                field::vm::POWER_STATE,
                vm,
                Value::str(VmPowerState::Suspended.as_str()),
            )?;
            t.set(field::vm::SUSPEND_VDI, vm, Value::str(&vdi))?;
            refresh_allowed(t, vm)
        }));
        return Err(e);
    }
    let restored = async {
        fed?;
        if !paused {
            h.agent
                .unpause(&uuid)
                .await
                .map_err(|e| driver_errors::agent(vm, e))?;
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = restored {
        // Undo: back to Suspended with the image kept.
        let _ = h.agent.destroy(&uuid).await;
        let _ = record_stopped(&s, vm, VmPowerState::Suspended, Some(&vdi));
        return Err(e);
    }
    set_paused(&s, vm, paused)?;
    let _ = crate::ops::vdi::vdi_destroy(Arc::clone(&s), &vdi).await;
    alert(&s, vm, "VM_RESUMED", 5, "VM resumed");
    Ok(())
}
