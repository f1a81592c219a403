//! The server side of `xe`: XenServer's thin-CLI protocol on `POST /cli`.
//!
//! The client sends its argv; the server parses it, runs the command through
//! the same dispatcher as API calls (so sessions and RBAC apply), and streams
//! back `Print`/`PrintStderr`/`Error`/`Exit` frames. The generic
//! `<class>-list` and `<class>-param-*` commands are derived from the
//! datamodel.

use crate::api::{Caller, Server};
use crate::http::Origin;
use corral_model::schema::{ClassId, FieldDef, Ty, class, error_def};
use corral_model::value::format_float;
use corral_model::{ApiError, NULL_REF, Value};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const GREETING: &[u8] = b"XenSource thin CLI protocol";

/// The per-class generic commands: suffix, required params, optional
/// params, description. `-list` comes last so that `vm-param-list` is not
/// taken for a `-list` of the class `vm-param`.
/// A hand-written command, for dispatch and `xe help`.
pub struct CommandSpec {
    pub name: &'static str,
    /// Required parameters, comma-separated as `xe help` prints them.
    pub reqd: &'static str,
    pub optional: &'static str,
    pub description: &'static str,
}

const fn cmd(
    name: &'static str,
    reqd: &'static str,
    optional: &'static str,
    description: &'static str,
) -> CommandSpec {
    CommandSpec {
        name,
        reqd,
        optional,
        description,
    }
}

pub const COMMANDS: &[CommandSpec] = &[
    cmd(
        "host-refresh-server-certificate",
        "",
        "host",
        "Replace the host's self-signed TLS certificate with a new one (valid ten years); new connections see it at once.",
    ),
    cmd(
        "host-shutdown-vms",
        "",
        "",
        "Apply this host's VM shutdown policy (other-config:vm-shutdown-policy, vm-shutdown-timeout) before the host goes down (Corral extension; run by corral-host-shutdown.service).",
    ),
    cmd(
        "console",
        "",
        "vm, uuid",
        "Attach to the VM's serial console (vt100); Ctrl-] leaves it.",
    ),
    cmd(
        "vm-start",
        "",
        "vm, uuid, paused, force, on",
        "Start a VM (on= a host).",
    ),
    cmd(
        "vm-shutdown",
        "",
        "vm, uuid, force",
        "Shut a VM down cleanly, or at once with force=true.",
    ),
    cmd(
        "vm-reboot",
        "",
        "vm, uuid, force",
        "Reboot a VM cleanly, or reset it with force=true.",
    ),
    cmd(
        "vm-suspend",
        "",
        "vm, uuid",
        "Suspend a VM to its suspend SR.",
    ),
    cmd(
        "vm-resume",
        "",
        "vm, uuid, paused, force, on",
        "Resume a suspended VM.",
    ),
    cmd("vm-pause", "", "vm, uuid", "Pause a running VM."),
    cmd("vm-unpause", "", "vm, uuid", "Unpause a paused VM."),
    cmd(
        "vm-cd-insert",
        "cd-name",
        "vm, uuid",
        "Insert an ISO (by VDI name-label) into the VM's empty CD drive.",
    ),
    cmd("vm-cd-eject", "", "vm, uuid", "Eject the VM's CD."),
    cmd(
        "vm-cd-list",
        "",
        "vm, uuid",
        "List the VM's CD drives and their media.",
    ),
    cmd(
        "vm-clone",
        "new-name-label",
        "vm, uuid, new-name-description",
        "Clone a halted VM or template; its disks are cloned (instant). Prints the new uuid.",
    ),
    cmd(
        "vm-copy",
        "new-name-label",
        "vm, uuid, new-name-description, sr-uuid",
        "Copy a halted VM or template with full copies of its disks (onto sr-uuid if given). Prints the new uuid.",
    ),
    cmd(
        "vm-install",
        "new-name-label",
        "template, template-uuid, template-name-label, sr-uuid, sr-name-label, copy",
        "Install a VM from a template: clone it, make the disks its other-config:disks asks for (on sr-uuid, else the pool's default SR). Prints the new uuid.",
    ),
    cmd(
        "vm-uninstall",
        "",
        "vm, uuid, force",
        "Destroy a halted VM and the disks only it uses (force=true: do not ask).",
    ),
    cmd(
        "vm-destroy",
        "uuid",
        "",
        "Destroy a VM record; its disks stay.",
    ),
    cmd(
        "vm-reset-powerstate",
        "",
        "vm, uuid, force",
        "Mark a VM halted whose host is known to be down (force=true required).",
    ),
    cmd(
        "vm-disk-list",
        "",
        "vm, uuid",
        "List the VM's disks (VBDs and their VDIs).",
    ),
    cmd(
        "vdi-import",
        "uuid, filename",
        "format",
        "Import a disk image (raw, vhd or qcow2) into a VDI.",
    ),
    cmd(
        "vdi-export",
        "uuid, filename",
        "format",
        "Export a VDI's data as raw, vhd or qcow2.",
    ),
    cmd(
        "sr-create",
        "name-label, type",
        "host-uuid, content-type, shared, physical-size, device-config:, sm-config:",
        "Create an SR, plugging it on its host(s).",
    ),
    cmd(
        "sr-probe",
        "type",
        "host-uuid, device-config:, sm-config:",
        "Probe for SRs with the given device-config; prints what was found.",
    ),
    cmd(
        "sr-introduce",
        "uuid, name-label, type",
        "content-type, shared, sm-config:",
        "Introduce an SR record for existing storage (no PBDs).",
    ),
    cmd(
        "sr-forget",
        "uuid",
        "",
        "Forget an SR (its storage is untouched).",
    ),
    cmd("sr-destroy", "uuid", "", "Destroy an SR and its storage."),
    cmd(
        "sr-scan",
        "uuid",
        "",
        "Rescan an SR, reconciling the database with its storage.",
    ),
    cmd("sr-update", "uuid", "", "Refresh an SR's sizes."),
    cmd(
        "sr-repair",
        "uuid",
        "",
        "Create missing PBDs and plug every unplugged one, reporting each host (Corral extension, as XenCenter's Repair).",
    ),
    cmd(
        "sr-upgrade",
        "uuid",
        "",
        "Upgrade a legacy-format SR in place, one way (Corral extension).",
    ),
    cmd(
        "pbd-create",
        "host-uuid, sr-uuid",
        "device-config:",
        "Create a PBD.",
    ),
    cmd("pbd-plug", "uuid", "", "Attach the SR on the PBD's host."),
    cmd(
        "pbd-unplug",
        "uuid",
        "",
        "Detach the SR from the PBD's host.",
    ),
    cmd("pbd-destroy", "uuid", "", "Destroy an unplugged PBD."),
    cmd(
        "vdi-create",
        "sr-uuid, name-label, virtual-size",
        "type, sharable, read-only, sm-config:, other-config:",
        "Create a VDI; sizes take KiB, MiB, GiB, TiB suffixes.",
    ),
    cmd("vdi-destroy", "uuid", "", "Destroy a VDI and its data."),
    cmd(
        "vdi-forget",
        "uuid",
        "",
        "Forget a VDI record (its data stays).",
    ),
    cmd(
        "vdi-clone",
        "uuid",
        "new-name-label, new-name-description",
        "Clone a VDI (instant).",
    ),
    cmd("vdi-snapshot", "uuid", "", "Snapshot a VDI (instant)."),
    cmd("vdi-resize", "uuid, disk-size", "online", "Grow a VDI."),
    cmd(
        "vdi-copy",
        "uuid",
        "sr-uuid",
        "Copy a VDI's data into a new VDI.",
    ),
    cmd(
        "vdi-update",
        "uuid",
        "",
        "Refresh a VDI's sizes from its storage.",
    ),
    cmd(
        "vbd-create",
        "vm-uuid, device",
        "vdi-uuid, type, mode, bootable, empty, unpluggable",
        "Create a VBD.",
    ),
    cmd("vbd-destroy", "uuid", "", "Destroy a VBD."),
    cmd(
        "vbd-insert",
        "uuid, vdi-uuid",
        "",
        "Insert a VDI into an empty CD drive.",
    ),
    cmd("vbd-eject", "uuid", "", "Eject the media from a CD drive."),
    cmd(
        "vbd-plug",
        "uuid",
        "",
        "Hot-plug a disk into its running VM.",
    ),
    cmd(
        "vbd-unplug",
        "uuid",
        "",
        "Hot-unplug a disk from its running VM.",
    ),
    cmd(
        "user-create",
        "user-name, password-new, role",
        "fullname",
        "Creates a local user with a role (Corral extension).",
    ),
    cmd(
        "user-password-change",
        "new",
        "old",
        "Changes the password of the logged-in user.",
    ),
];

const GENERIC_COMMANDS: &[(&str, &str, &str, &str)] = &[
    (
        "-param-list",
        "uuid",
        "",
        "Lists all the parameters of the object",
    ),
    (
        "-param-get",
        "uuid, param-name",
        "param-key",
        "Gets a parameter of the object",
    ),
    ("-param-set", "uuid", "", "Sets parameters of the object"),
    (
        "-param-add",
        "uuid, param-name",
        "param-key",
        "Adds to a set or map parameter",
    ),
    (
        "-param-remove",
        "uuid, param-name, param-key",
        "",
        "Removes from a set or map parameter",
    ),
    ("-param-clear", "uuid, param-name", "", "Clears a parameter"),
    (
        "-list",
        "",
        "params",
        "Lists the objects, filtered by field=value",
    ),
];

type GenericCommand = (&'static str, &'static str, &'static str, &'static str);

/// Splits `vm-param-get` into the CLI class and the generic command's entry.
fn generic_command(name: &str) -> Option<(CliClass, &'static GenericCommand)> {
    GENERIC_COMMANDS.iter().find_map(|entry| {
        let cname = name.strip_suffix(entry.0)?;
        cli_classes()
            .into_iter()
            .find(|c| c.name == cname)
            .map(|c| (c, entry))
    })
}

/// What a command produced, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Print(String),
    Stderr(String),
    Error(String, Vec<String>),
    /// Ask the client to upload (`put`) or download a file to/from `url`
    /// (XenServer's HttpPut/HttpGet), then report how `task` ended.
    Transfer {
        put: bool,
        filename: String,
        url: String,
        task: String,
        session: String,
    },
    /// Ask the client to CONNECT to a console `url` and proxy the user's
    /// terminal to it (XenServer's HttpConnect); it answers when it is done.
    Connect {
        url: String,
        session: String,
    },
}

pub struct Run {
    pub out: Vec<Out>,
    pub exit: i32,
}

fn frame_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as i32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn command_frame(tag: i32, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(body.len() + 8);
    payload.extend_from_slice(&9i32.to_le_bytes());
    payload.extend_from_slice(&tag.to_le_bytes());
    payload.extend_from_slice(body);
    let mut f = (payload.len() as i32).to_le_bytes().to_vec();
    f.extend_from_slice(&payload);
    f
}

/// Encodes the frames for a finished command.
pub fn encode(run: &Run) -> Vec<u8> {
    let mut out = Vec::new();
    for o in &run.out {
        out.extend(encode_one(o));
    }
    out.extend(command_frame(4, &run.exit.to_le_bytes()));
    out
}

fn encode_one(o: &Out) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut body = Vec::new();
        match o {
            Out::Print(s) => {
                frame_string(&mut body, s);
                out.extend(command_frame(0, &body));
            }
            Out::Stderr(s) => {
                frame_string(&mut body, s);
                out.extend(command_frame(16, &body));
            }
            Out::Error(code, params) => {
                frame_string(&mut body, code);
                body.extend_from_slice(&(params.len() as i32).to_le_bytes());
                for p in params {
                    frame_string(&mut body, p);
                }
                out.extend(command_frame(14, &body));
            }
            Out::Transfer {
                put, filename, url, ..
            } => {
                frame_string(&mut body, filename);
                frame_string(&mut body, url);
                out.extend(command_frame(if *put { 13 } else { 12 }, &body));
            }
            Out::Connect { url, .. } => {
                frame_string(&mut body, url);
                out.extend(command_frame(17, &body));
            }
        }
    }
    out
}

/// Reads the client's Response frame ([len][10][5 = OK | 6 = failed | 18 =
/// wait]), skipping heartbeats; true for OK.
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> bool {
    loop {
        let mut head = [0u8; 4];
        if stream.read_exact(&mut head).await.is_err() {
            return false;
        }
        let n = i32::from_le_bytes(head).clamp(0, 64) as usize;
        let mut body = vec![0u8; n];
        if stream.read_exact(&mut body).await.is_err() || body.len() < 8 {
            return false;
        }
        match i32::from_le_bytes([body[4], body[5], body[6], body[7]]) {
            18 => continue,
            code => return code == 5,
        }
    }
}

/// Ends the session a transfer or console kept open for the client.
async fn logout(server: &Arc<Server>, session: &str, origin: &Origin) {
    if session.is_empty() {
        return;
    }
    let caller = Caller {
        origin: origin.clone(),
        originator: Some("cli".into()),
    };
    let _ = server
        .call(
            "session.logout",
            vec![Value::String(session.to_owned())],
            &caller,
        )
        .await;
}

/// Runs one `xe console` exchange: the client proxies its terminal to the
/// console until the user leaves (Ctrl-]) or the console closes.
async fn console<S: AsyncRead + AsyncWrite + Unpin + Send>(
    server: &Arc<Server>,
    stream: &mut S,
    o: &Out,
    origin: &Origin,
) -> Vec<Out> {
    let Out::Connect { session, .. } = o else {
        return vec![];
    };
    let ok = stream.write_all(&encode_one(o)).await.is_ok()
        && stream.flush().await.is_ok()
        && read_response(stream).await;
    logout(server, session, origin).await;
    if ok {
        vec![]
    } else {
        vec![Out::Stderr("Failed to connect to the console.\n".into())]
    }
}

/// Runs one HttpPut/HttpGet exchange: the client moves the file, answers
/// with a Response frame, and the task says how the server side ended.
async fn transfer<S: AsyncRead + AsyncWrite + Unpin + Send>(
    server: &Arc<Server>,
    stream: &mut S,
    o: &Out,
    origin: &Origin,
) -> Vec<Out> {
    let Out::Transfer { task, session, .. } = o else {
        return vec![];
    };
    if stream.write_all(&encode_one(o)).await.is_err() || stream.flush().await.is_err() {
        return vec![];
    }
    let client_ok = read_response(stream).await;
    // Wait for the handler to finish the task; when the client failed (no
    // file, say), the handler may never have started.
    let wait = if client_ok { 3600 } else { 5 };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    let status = loop {
        let st = server
            .db
            .read()
            .get_str(corral_model::field::task::STATUS, task);
        match st.as_deref() {
            Some("pending") if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            other => break other.map(str::to_owned),
        }
    };
    let error = server
        .db
        .read()
        .get(corral_model::field::task::ERROR_INFO, task)
        .and_then(|v| {
            v.as_array()
                .map(|a| a.iter().map(|x| x.db_string()).collect::<Vec<_>>())
        })
        .unwrap_or_default();
    server.task_destroy(task);
    logout(server, session, origin).await;
    let ctx = CliCtx {
        server: Arc::clone(server),
        session: session.clone(),
        caller: Caller {
            origin: origin.clone(),
            originator: Some("cli".into()),
        },
    };
    match (status.as_deref(), client_ok) {
        (Some("success"), true) => vec![],
        (Some("failure"), _) if !error.is_empty() => {
            ctx.api_error(&ApiError::new(&error[0], error[1..].iter().cloned()))
        }
        (_, false) => vec![Out::Stderr("The file transfer failed.\n".into())],
        _ => vec![Out::Stderr("The transfer did not complete.\n".into())],
    }
}

pub async fn serve_cli<S: AsyncRead + AsyncWrite + Unpin + Send>(
    server: Arc<Server>,
    mut stream: S,
    origin: Origin,
    body: Vec<u8>,
) {
    let text = String::from_utf8_lossy(&body);
    let args: Vec<String> = text
        .split('\n')
        .map(|l| l.trim_end_matches('\r').to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    let mut hello = GREETING.to_vec();
    hello.extend_from_slice(&0i32.to_le_bytes());
    hello.extend_from_slice(&2i32.to_le_bytes());
    if stream.write_all(&hello).await.is_err() {
        return;
    }
    let mut reply = vec![0u8; hello.len()];
    if stream.read_exact(&mut reply).await.is_err() || !reply.starts_with(GREETING) {
        return;
    }
    // The command runs on its own; if the client goes away meanwhile (xe
    // sends nothing while a command runs, so any read here is its end:
    // Ctrl-C), the tasks the command started are cancelled, and the
    // command still finishes cleanly.
    let session_slot: SessionSlot = Default::default();
    let mut job = {
        let (server, origin, slot) = (
            Arc::clone(&server),
            origin.clone(),
            Arc::clone(&session_slot),
        );
        tokio::spawn(async move { run(&server, args, origin, slot).await })
    };
    let mut probe = [0u8; 1];
    let finished = tokio::select! {
        r = &mut job => r,
        _ = stream.read(&mut probe) => {
            let session = session_slot.lock().ok().and_then(|s| s.clone());
            if let Some(session) = session {
                tracing::info!("xe client left during its command: cancelling its tasks");
                server.cancel_session_tasks(&session);
                let _ = job.await;
                server.sessions.logout(&server, &session);
            } else {
                let _ = job.await;
            }
            return;
        }
    };
    let Ok(run) = finished else { return };
    let mut exit = run.exit;
    let mut frames = Vec::new();
    for o in &run.out {
        if let Out::Transfer { .. } | Out::Connect { .. } = o {
            if stream.write_all(&frames).await.is_err() {
                return;
            }
            frames.clear();
            let errors = match o {
                Out::Connect { .. } => console(&server, &mut stream, o, &origin).await,
                _ => transfer(&server, &mut stream, o, &origin).await,
            };
            if !errors.is_empty() {
                exit = 1;
            }
            for e in &errors {
                frames.extend(encode_one(e));
            }
        } else {
            frames.extend(encode_one(o));
        }
    }
    frames.extend(command_frame(4, &exit.to_le_bytes()));
    let _ = stream.write_all(&frames).await;
    let _ = stream.flush().await;
}

/// Parsed command line.
pub struct Cmd {
    pub name: String,
    pub params: Vec<(String, String)>,
    pub flags: Vec<String>,
}

impl Cmd {
    pub(crate) fn get(&self, k: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
    }
    pub(crate) fn flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
            || self.get(f).is_some_and(|v| parse_bool(v) == Some(true))
    }
}

pub fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "1" => Some(true),
        "false" | "f" | "no" | "n" | "0" => Some(false),
        _ => None,
    }
}

const STD_PARAMS: &[&str] = &[
    "server",
    "password",
    "port",
    "username",
    "minimal",
    "force",
    "multiple",
    "all",
    "message-priority",
    "trace",
    "session_id",
    "passwordfile",
    "nossl",
    "debug",
];

pub fn parse_args(args: &[String]) -> Result<Cmd, String> {
    let mut it = args.iter();
    let mut name = String::new();
    let mut params = Vec::new();
    let mut flags = Vec::new();
    while let Some(a) = it.next() {
        if let Some(f) = a.strip_prefix("--") {
            flags.push(f.to_owned());
        } else if a.starts_with('-') && a.len() > 1 && !a.contains('=') {
            let key = match a.as_str() {
                "-u" => "username",
                "-pw" => "password",
                "-s" | "-h" => "server",
                "-p" => "port",
                other => return Err(format!("Unknown switch: {other}")),
            };
            params.push((key.to_owned(), it.next().cloned().unwrap_or_default()));
        } else if name.is_empty() && params.is_empty() {
            if a.contains('=') {
                return Err("command name is missing".into());
            }
            name = a.clone();
        } else {
            match a.split_once('=') {
                Some((k, v)) => params.push((k.to_owned(), v.to_owned())),
                None => params.push((a.clone(), String::new())),
            }
        }
    }
    Ok(Cmd {
        name,
        params,
        flags,
    })
}

/// Where a running command publishes the session it works under.
type SessionSlot = Arc<std::sync::Mutex<Option<String>>>;

async fn run(server: &Arc<Server>, args: Vec<String>, origin: Origin, slot: SessionSlot) -> Run {
    let cmd = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => return fail_text(format!("Syntax error: {e}\nFor usage run: 'xe help'")),
    };
    if cmd.name.is_empty() || cmd.name == "help" {
        return help(&cmd);
    }
    let caller = Caller {
        origin,
        originator: Some("cli".into()),
    };
    let session = match cmd.get("session_id") {
        Some(s) => s.to_owned(),
        None => {
            let user = cmd.get("username").unwrap_or("root").to_owned();
            let pwd = cmd.get("password").unwrap_or("").to_owned();
            match server
                .call(
                    "session.login_with_password",
                    vec![
                        Value::String(user.clone()),
                        Value::String(pwd),
                        Value::str("1.0"),
                        Value::str("cli"),
                    ],
                    &caller,
                )
                .await
            {
                Ok(v) => v.as_str().unwrap_or_default().to_owned(),
                Err(_) if user.is_empty() => {
                    return fail_text("Username/password must be specified".into());
                }
                Err(_) => return fail_text("Authentication failed".into()),
            }
        }
    };
    if let Ok(mut s) = slot.lock() {
        *s = Some(session.clone());
    }
    let ctx = CliCtx {
        server: Arc::clone(server),
        session: session.clone(),
        caller,
    };
    let mut out = Vec::new();
    let res = ctx.dispatch(&cmd, &mut out).await;
    // A file transfer still needs the session; serve_cli ends it afterwards.
    let transferring = out
        .iter()
        .any(|o| matches!(o, Out::Transfer { .. } | Out::Connect { .. }));
    if cmd.get("session_id").is_none() && !transferring {
        let _ = server
            .call("session.logout", vec![Value::String(session)], &ctx.caller)
            .await;
    }
    match res {
        Ok(()) => Run { out, exit: 0 },
        Err(CliError::Text(t)) => {
            out.push(Out::Stderr(format!("{t}\n")));
            Run { out, exit: 1 }
        }
        Err(CliError::Api(e)) => {
            out.extend(ctx.api_error(&e));
            Run { out, exit: 1 }
        }
    }
}

fn fail_text(t: String) -> Run {
    Run {
        out: vec![Out::Stderr(format!("{t}\n"))],
        exit: 1,
    }
}

#[derive(Debug)]
pub enum CliError {
    Text(String),
    Api(ApiError),
}

impl From<ApiError> for CliError {
    fn from(e: ApiError) -> Self {
        CliError::Api(e)
    }
}

pub(crate) fn text<T>(t: impl Into<String>) -> Result<T, CliError> {
    Err(CliError::Text(t.into()))
}

/// A CLI class: a datamodel class plus a fixed filter (`template` is VM
/// with `is_a_template=true`).
#[derive(Clone, Copy)]
pub struct CliClass {
    pub name: &'static str,
    pub class: ClassId,
    pub filter: &'static [(&'static str, &'static str)],
    pub default_params: &'static [&'static str],
}

/// The CLI classes: every database class with `get_all_records`, named as xe
/// names them.
pub fn cli_classes() -> Vec<CliClass> {
    let mut out = Vec::new();
    for c in ClassId::all() {
        let def = c.def();
        if !def.in_db || c.implicit_role("get_all_records").is_none() {
            continue;
        }
        let name: &'static str =
            Box::leak(def.name.to_lowercase().replace('_', "-").into_boxed_str());
        let (filter, params): (&'static [(&str, &str)], &'static [&str]) = match def.name {
            "VM" => (
                &[("is-a-template", "false"), ("is-control-domain", "false")],
                &["uuid", "name-label", "power-state"],
            ),
            "host" => (&[], &["uuid", "name-label", "name-description"]),
            "pool" => (
                &[],
                &[
                    "uuid",
                    "name-label",
                    "name-description",
                    "master",
                    "default-SR",
                ],
            ),
            "SR" => (
                &[],
                &[
                    "uuid",
                    "name-label",
                    "name-description",
                    "host",
                    "type",
                    "content-type",
                ],
            ),
            "PBD" => (
                &[],
                &[
                    "uuid",
                    "host-uuid",
                    "sr-uuid",
                    "device-config",
                    "currently-attached",
                ],
            ),
            "VDI" => (
                &[],
                &[
                    "uuid",
                    "name-label",
                    "name-description",
                    "virtual-size",
                    "read-only",
                    "sharable",
                    "sr-uuid",
                ],
            ),
            "VBD" => (&[], &["uuid", "vm-uuid", "vdi-uuid", "device", "empty"]),
            "VIF" => (&[], &["uuid", "device", "vm-uuid", "network-uuid"]),
            "network" => (&[], &["uuid", "name-label", "name-description", "bridge"]),
            "PIF" => (
                &[],
                &[
                    "uuid",
                    "device",
                    "VLAN",
                    "MAC",
                    "network-uuid",
                    "currently-attached",
                    "host-uuid",
                ],
            ),
            "Bond" => (&[], &["uuid", "master", "slaves"]),
            "VLAN" => (&[], &["uuid", "tagged-PIF", "untagged-PIF", "tag"]),
            "task" => (
                &[],
                &[
                    "uuid",
                    "name-label",
                    "name-description",
                    "status",
                    "progress",
                ],
            ),
            "subject" => (
                &[],
                &["uuid", "subject-identifier", "other-config", "roles"],
            ),
            "console" => (&[], &["uuid", "vm-uuid", "protocol", "location"]),
            "message" | "user" => (&[], &[]),
            _ => (&[], &["uuid", "name-label", "name-description"]),
        };
        out.push(CliClass {
            name,
            class: c,
            filter,
            default_params: params,
        });
        if def.name == "VM" {
            out.push(CliClass {
                name: "template",
                class: c,
                filter: &[("is-a-template", "true")],
                default_params: &["uuid", "name-label", "name-description"],
            });
            out.push(CliClass {
                name: "snapshot",
                class: c,
                filter: &[("is-a-snapshot", "true")],
                default_params: &["uuid", "name-label", "name-description"],
            });
        }
    }
    out
}

/// The xe name of a field: hyphens for underscores, and `<x>-uuid` for a
/// pointer to the class `x` (`PBD.host` → `host-uuid`).
pub fn cli_field_name(f: &FieldDef) -> String {
    const KEEP: &[&str] = &[
        "cpu_info",
        "subtask_of",
        "error_info",
        "allowed_operations",
        "current_operations",
        "qos_algorithm_type",
        "qos_algorithm_params",
        "qos_supported_algorithms",
        "io_read_kbs",
        "io_write_kbs",
    ];
    if KEEP.contains(&f.name) && !matches!(f.name, "allowed_operations" | "current_operations") {
        return f.name.to_owned();
    }
    if let Ty::Ref(target) = f.ty {
        if target.eq_ignore_ascii_case(f.name) {
            return format!("{}-uuid", f.name.to_lowercase());
        }
    }
    f.name.replace('_', "-")
}

fn tag(f: &FieldDef) -> &'static str {
    match f.ty {
        Ty::Set(_) => {
            if f.ops_role.is_some() {
                "SRW"
            } else {
                "SRO"
            }
        }
        Ty::Map(..) => {
            if f.ops_role.is_some() || f.set_role.is_some() {
                "MRW"
            } else {
                "MRO"
            }
        }
        _ => {
            if f.set_role.is_some() {
                " RW"
            } else {
                " RO"
            }
        }
    }
}

pub(crate) struct CliCtx {
    pub(crate) server: Arc<Server>,
    pub(crate) session: String,
    caller: Caller,
}

impl CliCtx {
    pub(crate) async fn call(
        &self,
        method: &str,
        mut params: Vec<Value>,
    ) -> Result<Value, CliError> {
        params.insert(0, Value::String(self.session.clone()));
        Ok(self.server.call(method, params, &self.caller).await?)
    }

    pub(crate) fn uuid_of(&self, r: &str) -> String {
        if r == NULL_REF || r.is_empty() {
            return r.to_owned();
        }
        let st = self.server.db.read();
        for c in ClassId::all().filter(|c| c.def().in_db) {
            if st.exists(c, r) {
                if let Some(u) = c.field("uuid").and_then(|f| st.get_str(f, r)) {
                    return u;
                }
            }
        }
        "<not in database>".into()
    }

    fn render(&self, f: &FieldDef, v: &Value) -> String {
        let scalar = |ty: &Ty, v: &Value| -> String {
            match (ty, v) {
                (Ty::Ref(_), Value::String(r)) => self.uuid_of(r),
                (Ty::Float, Value::Float(x)) => format!("{x:.3}"),
                (_, Value::Float(x)) => format_float(*x),
                _ => v.db_string(),
            }
        };
        match (&f.ty, v) {
            (Ty::Set(inner), Value::Array(items)) => items
                .iter()
                .map(|i| scalar(inner, i))
                .collect::<Vec<_>>()
                .join("; "),
            (Ty::Map(kt, vt), Value::Struct(m)) => m
                .iter()
                .map(|(k, x)| {
                    format!(
                        "{}: {}",
                        scalar(kt, &Value::String(k.clone())),
                        scalar(vt, x)
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            (Ty::Enum("vm_power_state"), Value::String(s)) => s.to_lowercase(),
            (ty, v) => scalar(ty, v),
        }
    }

    /// The record as (cli name, tag, rendered value), in field order.
    fn cli_record(&self, cc: &CliClass, rec: &Value) -> Vec<(String, &'static str, String)> {
        let mut out = Vec::new();
        for f in cc.class.def().fields.iter().filter(|f| !f.internal) {
            if let Some(v) = rec.member(f.name) {
                out.push((cli_field_name(f), tag(f), self.render(f, v)));
            }
        }
        out
    }

    async fn records(&self, cc: &CliClass) -> Result<Vec<(String, Value)>, CliError> {
        let all = self
            .call(
                &format!("{}.get_all_records_where", cc.class.name()),
                vec![Value::str("true")],
            )
            .await?;
        let mut out = Vec::new();
        for (r, rec) in all.as_struct().map(<[_]>::to_vec).unwrap_or_default() {
            let cr = self.cli_record(cc, &rec);
            if cc
                .filter
                .iter()
                .all(|(k, v)| cr.iter().any(|(n, _, val)| n == k && val == v))
            {
                out.push((r, rec));
            }
        }
        Ok(out)
    }

    fn matches(
        &self,
        cc: &CliClass,
        rec: &Value,
        filters: &[(String, String)],
    ) -> Result<bool, CliError> {
        let cr = self.cli_record(cc, rec);
        for (k, want) in filters {
            let (name, sub) = match k.split_once(':') {
                Some((n, s)) => (n, Some(s)),
                None => (k.as_str(), None),
            };
            let Some(f) = cc
                .class
                .def()
                .fields
                .iter()
                .find(|f| cli_field_name(f) == name)
            else {
                return text(format!(
                    "Parameter '{name}' is not a field of the {} class. Failed to select {} for operation.",
                    cc.class.name(),
                    cc.class.name()
                ));
            };
            let v = rec.member(f.name).cloned().unwrap_or(Value::Nil);
            let ok = match (sub, &f.ty) {
                (Some("contains"), Ty::Set(_)) => v
                    .as_array()
                    .unwrap_or_default()
                    .iter()
                    .any(|x| x.db_string() == *want || self.uuid_of(&x.db_string()) == *want),
                (Some(key), Ty::Map(..)) => {
                    v.member(key).map(|x| x.db_string()) == Some(want.clone())
                }
                _ => {
                    let shown = cr
                        .iter()
                        .find(|(n, _, _)| n == name)
                        .map(|(_, _, s)| s.clone())
                        .unwrap_or_default();
                    if name == "MAC" {
                        shown.eq_ignore_ascii_case(want)
                    } else {
                        shown == *want
                    }
                }
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn dispatch(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        if let Some(spec) = COMMANDS.iter().find(|c| c.name == cmd.name) {
            for k in spec.reqd.split(", ").filter(|k| !k.is_empty()) {
                if cmd.get(k).is_none() {
                    return text(format!("Required parameter not found: {k}"));
                }
            }
            return self.special(cmd, out).await;
        }
        if let Some((cc, (suffix, ..))) = generic_command(&cmd.name) {
            return self.generic(&cc, suffix, cmd, out).await;
        }
        text(format!(
            "Unknown command: {}\nFor usage run: 'xe help'",
            cmd.name
        ))
    }

    /// The hand-written commands of [`COMMANDS`]; required params are checked.
    async fn special(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let arg = |k: &str| cmd.get(k).unwrap_or("").to_owned();
        match cmd.name.as_str() {
            "user-password-change" => {
                self.call(
                    "session.change_password",
                    vec![Value::String(arg("old")), Value::String(arg("new"))],
                )
                .await?;
            }
            "host-refresh-server-certificate" => {
                let host = match cmd.get("host") {
                    Some(_) => self.ref_of(class::HOST, cmd, "host").await?,
                    None => self.server.host_ref.clone(),
                };
                self.call("host.refresh_server_certificate", vec![Value::str(&host)])
                    .await?;
            }
            "user-create" => {
                let r = self
                    .call(
                        "user.create_local",
                        vec![
                            Value::String(arg("user-name")),
                            Value::String(arg("fullname")),
                            Value::String(arg("password-new")),
                            Value::String(arg("role")),
                        ],
                    )
                    .await?;
                out.push(Out::Print(self.uuid_of(r.as_str().unwrap_or_default())));
            }
            other => return self.storage_command(other, cmd, out).await,
        }
        Ok(())
    }

    async fn by_uuid(&self, cc: &CliClass, cmd: &Cmd) -> Result<(String, Value), CliError> {
        let Some(uuid) = cmd.get("uuid") else {
            return text("Required parameter not found: uuid");
        };
        let r = self
            .call(
                &format!("{}.get_by_uuid", cc.class.name()),
                vec![Value::str(uuid)],
            )
            .await?;
        let r = r.as_str().unwrap_or_default().to_owned();
        let rec = self
            .call(
                &format!("{}.get_record", cc.class.name()),
                vec![Value::String(r.clone())],
            )
            .await?;
        Ok((r, rec))
    }

    fn field_for(&self, cc: &CliClass, name: &str) -> Result<&'static FieldDef, CliError> {
        cc.class
            .def()
            .fields
            .iter()
            .filter(|f| !f.internal)
            .find(|f| cli_field_name(f) == name)
            .ok_or_else(|| CliError::Text(format!("Unknown field '{name}'")))
    }

    /// Converts xe text to a wire value of the field's type.
    fn value_of(&self, f: &FieldDef, ty: &Ty, s: &str, name: &str) -> Result<Value, CliError> {
        Ok(match ty {
            Ty::Int => Value::Int(
                s.trim()
                    .parse()
                    .map_err(|_| CliError::Text(format!("Parameter {name} must be an integer")))?,
            ),
            Ty::Float => Value::Float(
                s.trim()
                    .parse()
                    .map_err(|_| CliError::Text(format!("Parameter {name} must be a number")))?,
            ),
            Ty::Bool => Value::Bool(parse_bool(s).ok_or_else(|| {
                CliError::Text(format!(
                    "Parameter {name} must be a boolean (true or false)"
                ))
            })?),
            Ty::Ref(target) => {
                if s.starts_with("OpaqueRef:") || s.is_empty() {
                    Value::str(if s.is_empty() { NULL_REF } else { s })
                } else {
                    let c = ClassId::by_name(target)
                        .ok_or_else(|| CliError::Text(format!("Cannot resolve {s}")))?;
                    let st = self.server.db.read();
                    Value::String(
                        st.by_uuid(c, s)
                            .cloned()
                            .ok_or_else(|| CliError::Api(ApiError::uuid_invalid(target, s)))?,
                    )
                }
            }
            Ty::Set(inner) => Value::Array(
                s.split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(|x| self.value_of(f, inner, x, name))
                    .collect::<Result<_, _>>()?,
            ),
            _ => Value::str(s),
        })
    }

    async fn generic(
        &self,
        cc: &CliClass,
        suffix: &str,
        cmd: &Cmd,
        out: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let cname = cc.class.name();
        match suffix {
            "-list" => {
                let params = cmd.get("params");
                let filters: Vec<(String, String)> = cmd
                    .params
                    .iter()
                    .filter(|(k, _)| {
                        !STD_PARAMS.contains(&k.as_str())
                            && k != "params"
                            && !k.starts_with("database:")
                    })
                    .cloned()
                    .collect();
                let mut printed = Vec::new();
                for (_, rec) in self.records(cc).await? {
                    if !self.matches(cc, &rec, &filters)? {
                        continue;
                    }
                    let cr = self.cli_record(cc, &rec);
                    let cols: Vec<(String, &str, String)> = match params {
                        Some("all") => cr,
                        Some(p) => {
                            let want: Vec<&str> = p.split(',').map(str::trim).collect();
                            cr.into_iter()
                                .filter(|(n, _, _)| want.contains(&n.as_str()))
                                .collect()
                        }
                        None if cc.default_params.is_empty() => cr,
                        None => {
                            let mut cols: Vec<(String, &str, String)> = cr
                                .into_iter()
                                .filter(|(n, _, _)| cc.default_params.contains(&n.as_str()))
                                .collect();
                            // A legacy-format SR says so in sr-list (Corral
                            // extension; the SR needs `xe sr-upgrade`).
                            if cc.class == class::SR
                                && rec
                                    .member("sm_config")
                                    .and_then(|m| m.member("requires_upgrade"))
                                    .and_then(Value::as_str)
                                    == Some("true")
                            {
                                cols.push(("requires-upgrade".into(), " RO", "true".into()));
                            }
                            cols
                        }
                    };
                    printed.push(cols);
                }
                if cmd.flag("minimal") {
                    let firsts: Vec<String> = printed
                        .iter()
                        .filter_map(|c| {
                            c.first()
                                .map(|(_, _, v)| v.replace('\\', "\\\\").replace(',', "\\,"))
                        })
                        .collect();
                    out.push(Out::Print(firsts.join(",")));
                } else {
                    for cols in printed {
                        out.push(Out::Print(format!("{}\n", table(&cols))));
                    }
                }
                Ok(())
            }
            "-param-list" => {
                let (_, rec) = self.by_uuid(cc, cmd).await?;
                out.push(Out::Print(format!(
                    "{}\n",
                    table(&self.cli_record(cc, &rec))
                )));
                Ok(())
            }
            "-param-get" => {
                let (_, rec) = self.by_uuid(cc, cmd).await?;
                let Some(pn) = cmd.get("param-name") else {
                    return text("Required parameter not found: param-name");
                };
                let f = self.field_for(cc, pn)?;
                let v = rec.member(f.name).cloned().unwrap_or(Value::Nil);
                match cmd.get("param-key") {
                    Some(k) => match v.member(k) {
                        Some(x) => out.push(Out::Print(x.db_string())),
                        None => return text(format!("Key {k} not found in map")),
                    },
                    None => out.push(Out::Print(self.render(f, &v))),
                }
                Ok(())
            }
            "-param-set" => {
                let (r, _) = self.by_uuid(cc, cmd).await?;
                for (k, v) in cmd
                    .params
                    .iter()
                    .filter(|(k, _)| k != "uuid" && !STD_PARAMS.contains(&k.as_str()))
                {
                    if let Some((m, key)) = k.split_once(':') {
                        let f = self.field_for(cc, m)?;
                        if !matches!(f.ty, Ty::Map(..)) || f.ops_role.is_none() {
                            return text(format!("Field '{m}' is read-only."));
                        }
                        self.call(
                            &format!("{cname}.remove_from_{}", f.name),
                            vec![Value::String(r.clone()), Value::str(key)],
                        )
                        .await?;
                        self.call(
                            &format!("{cname}.add_to_{}", f.name),
                            vec![Value::String(r.clone()), Value::str(key), Value::str(v)],
                        )
                        .await?;
                        continue;
                    }
                    let f = self.field_for(cc, k)?;
                    if matches!(f.ty, Ty::Set(_)) {
                        return text("Cannot param-set on set fields");
                    }
                    if f.set_role.is_none() || matches!(f.ty, Ty::Map(..)) {
                        return text(format!("Field '{k}' is read-only."));
                    }
                    let val = self.value_of(f, &f.ty, v, k)?;
                    self.call(
                        &format!("{cname}.set_{}", f.name),
                        vec![Value::String(r.clone()), val],
                    )
                    .await?;
                }
                Ok(())
            }
            "-param-add" => {
                let (r, _) = self.by_uuid(cc, cmd).await?;
                let Some(pn) = cmd.get("param-name") else {
                    return text("Required parameter not found: param-name");
                };
                let f = self.field_for(cc, pn)?;
                if f.ops_role.is_none() {
                    return text("Parameter is read-only");
                }
                match f.ty {
                    Ty::Set(inner) => {
                        let Some(key) = cmd.get("param-key") else {
                            return text("Required parameter not found: param-key");
                        };
                        for item in key.split(',') {
                            let v = self.value_of(f, inner, item.trim(), pn)?;
                            self.call(
                                &format!("{cname}.add_{}", f.name),
                                vec![Value::String(r.clone()), v],
                            )
                            .await?;
                        }
                    }
                    _ => {
                        for (k, v) in cmd.params.iter().filter(|(k, _)| {
                            !["uuid", "param-name"].contains(&k.as_str())
                                && !STD_PARAMS.contains(&k.as_str())
                        }) {
                            self.call(
                                &format!("{cname}.add_to_{}", f.name),
                                vec![Value::String(r.clone()), Value::str(k), Value::str(v)],
                            )
                            .await?;
                        }
                    }
                }
                Ok(())
            }
            "-param-remove" => {
                let (r, rec) = self.by_uuid(cc, cmd).await?;
                let Some(pn) = cmd.get("param-name") else {
                    return text("Required parameter not found: param-name");
                };
                let Some(key) = cmd.get("param-key") else {
                    return text("Required parameter not found: param-key");
                };
                let f = self.field_for(cc, pn)?;
                if f.ops_role.is_none() {
                    return text("Parameter is read-only");
                }
                let cur = rec.member(f.name).cloned().unwrap_or(Value::Nil);
                match f.ty {
                    Ty::Set(inner) => {
                        let v = self.value_of(f, inner, key, pn)?;
                        if !cur.as_array().unwrap_or_default().contains(&v) {
                            return text(format!("Key {key} is not in the set"));
                        }
                        self.call(
                            &format!("{cname}.remove_{}", f.name),
                            vec![Value::String(r), v],
                        )
                        .await?;
                    }
                    _ => {
                        if cur.member(key).is_none() {
                            return text(format!("Key {key} is not in map"));
                        }
                        self.call(
                            &format!("{cname}.remove_from_{}", f.name),
                            vec![Value::String(r), Value::str(key)],
                        )
                        .await?;
                    }
                }
                Ok(())
            }
            "-param-clear" => {
                let (r, _) = self.by_uuid(cc, cmd).await?;
                let Some(pn) = cmd.get("param-name") else {
                    return text("Required parameter not found: param-name");
                };
                let f = self.field_for(cc, pn)?;
                if f.set_role.is_none() && f.ops_role.is_none() {
                    return text(format!("Field '{pn}' is read-only."));
                }
                let empty = match f.ty {
                    Ty::Set(_) => Value::Array(vec![]),
                    Ty::Map(..) => Value::Struct(vec![]),
                    _ => Value::str(""),
                };
                if f.set_role.is_some() {
                    self.call(
                        &format!("{cname}.set_{}", f.name),
                        vec![Value::String(r), empty],
                    )
                    .await?;
                } else if let Ty::Map(..) = f.ty {
                    let cur = self
                        .call(
                            &format!("{cname}.get_{}", f.name),
                            vec![Value::String(r.clone())],
                        )
                        .await?;
                    for (k, _) in cur.as_struct().map(<[_]>::to_vec).unwrap_or_default() {
                        self.call(
                            &format!("{cname}.remove_from_{}", f.name),
                            vec![Value::String(r.clone()), Value::String(k)],
                        )
                        .await?;
                    }
                }
                Ok(())
            }
            _ => text(format!("Unknown command: {}", cmd.name)),
        }
    }

    /// An API error as xe prints it: the datamodel's sentence and one line
    /// per parameter, or `Error code:` for codes the datamodel does not know.
    fn api_error(&self, e: &ApiError) -> Vec<Out> {
        match error_def(&e.code) {
            Some(def) => {
                let mut s = format!("{}\n", def.doc);
                for (i, name) in def.params.iter().enumerate() {
                    let v = e.params.get(i).map(|p| {
                        if p.starts_with("OpaqueRef:") && p != NULL_REF {
                            self.uuid_of(p)
                        } else {
                            p.clone()
                        }
                    });
                    s.push_str(&format!(
                        "{name}: {}\n",
                        v.unwrap_or_else(|| "<unknown>".into())
                    ));
                }
                for extra in e.params.iter().skip(def.params.len()) {
                    s.push_str(&format!("<extra>: {extra}\n"));
                }
                vec![Out::Stderr(s)]
            }
            None => vec![Out::Error(e.code.clone(), e.params.clone())],
        }
    }
}

/// xe's record table: the first key left-aligned, the others right-aligned,
/// all padded to 4 + the longest key with its tag.
pub fn table(cols: &[(String, &str, String)]) -> String {
    let keys: Vec<String> = cols.iter().map(|(n, t, _)| format!("{n} ({t})")).collect();
    let w = 4 + keys.iter().map(String::len).max().unwrap_or(0);
    let mut s = String::new();
    for (i, (k, (_, _, v))) in keys.iter().zip(cols).enumerate() {
        if i == 0 {
            s.push_str(&format!("{k:<w$}: {v}\n"));
        } else {
            s.push_str(&format!("{k:>w$}: {v}\n"));
        }
    }
    s
}

fn help(cmd: &Cmd) -> Run {
    let classes = cli_classes();
    let target = cmd
        .params
        .iter()
        .find(|(k, v)| v.is_empty() && !STD_PARAMS.contains(&k.as_str()))
        .map(|(k, _)| k.clone());
    let mut out = Vec::new();
    match target {
        Some(c) if c != "--all" => {
            let (reqd, opt, desc) = if let Some((_, (_, reqd, opt, desc))) = generic_command(&c) {
                (*reqd, *opt, (*desc).to_owned())
            } else if let Some(spec) = COMMANDS.iter().find(|s| s.name == c) {
                (spec.reqd, spec.optional, spec.description.to_owned())
            } else {
                return fail_text(format!("Unknown command: {c}\nFor usage run: 'xe help'"));
            };
            out.push(Out::Print(format!("command name            : {c}\n        reqd params     : {reqd}\n        optional params : {opt}\n\n        description     : {desc}")));
        }
        _ => {
            let mut names: Vec<String> = vec!["help".into()];
            names.extend(COMMANDS.iter().map(|c| c.name.to_owned()));
            for c in &classes {
                for (suffix, ..) in GENERIC_COMMANDS {
                    names.push(format!("{}{suffix}", c.name));
                }
            }
            names.sort();
            if cmd.flag("minimal") {
                // What shell completion reads.
                out.push(Out::Print(names.join(",")));
                return Run { out, exit: 0 };
            }
            out.push(Out::Print(format!("Usage: xe <command> [-s server] [-pw passwd] [-p port] [-u user] [-pwf password-file]\n  [command specific arguments]\n\nTo get help on a specific command: xe help <command>\n\nCommands:\n{}", names.join(", "))));
        }
    }
    Run { out, exit: 0 }
}
