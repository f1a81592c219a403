//! A POST /cli session.

use crate::cli::args::parse_args;
use crate::cli::commands::help;
use crate::cli::context::{CliCtx, CliError};
use crate::cli::protocol::{Out, Run, encode_one, exit_frame, fail_text, read_response};
use crate::context::Server;
use crate::core::call::{Caller, Origin};
use corral_model::{ApiError, Value};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Ends the session a transfer or console kept open for the client.
pub(crate) async fn logout(server: &Arc<Server>, session: &str, origin: &Origin) {
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
pub(crate) async fn console<S: AsyncRead + AsyncWrite + Unpin + Send>(
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
pub(crate) async fn transfer<S: AsyncRead + AsyncWrite + Unpin + Send>(
    server: &Arc<Server>,
    stream: &mut S,
    o: &Out,
    origin: &Origin,
) -> Vec<Out> {
    let Out::Transfer {
        task,
        session,
        own_session,
        ..
    } = o
    else {
        return vec![];
    };
    let caller = Caller {
        origin: origin.clone(),
        originator: Some("cli".into()),
    };
    let ctx = CliCtx::new(Arc::clone(server), session.clone(), caller);
    let errors = ctx.transfer(stream, o, task).await;
    if *own_session {
        logout(server, session, origin).await;
    }
    errors
}

impl CliCtx {
    async fn transfer<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        stream: &mut S,
        o: &Out,
        task: &str,
    ) -> Vec<Out> {
        if stream.write_all(&encode_one(o)).await.is_err() || stream.flush().await.is_err() {
            return vec![];
        }
        let client_ok = read_response(stream).await;
        // Wait for the handler to finish the task; when the client failed (no
        // file, say), the handler may never have started.
        let wait = if client_ok { 3600 } else { 5 };
        let status = self
            .task_end(task, std::time::Duration::from_secs(wait))
            .await;
        let error: Vec<String> = match self.get("task", task, "error_info").await {
            Ok(v) => v
                .as_array()
                .unwrap_or_default()
                .iter()
                .map(Value::db_string)
                .collect(),
            Err(_) => Vec::new(),
        };
        let _ = self.call("task.destroy", vec![Value::str(task)]).await;
        match (status.as_deref(), client_ok) {
            (Some("success"), true) => vec![],
            (Some("failure"), _) if !error.is_empty() => {
                self.api_error(&ApiError::new(&error[0], error[1..].iter().cloned()))
                    .await
            }
            (_, false) => vec![Out::Stderr("The file transfer failed.\n".into())],
            _ => vec![Out::Stderr("The transfer did not complete.\n".into())],
        }
    }

    /// The task's status once it is no longer pending, or when `wait` has
    /// passed; woken by each database commit rather than polling.
    async fn task_end(&self, task: &str, wait: std::time::Duration) -> Option<String> {
        let mut commits = self.server.events.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let status = self
                .get("task", task, "status")
                .await
                .ok()
                .map(|v| v.db_string());
            if status.as_deref() != Some("pending") {
                return status;
            }
            match tokio::time::timeout_at(deadline, commits.changed()).await {
                Ok(Ok(())) => {}
                _ => return status,
            }
        }
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
    let hello = corral_cli_proto::greeting();
    if stream.write_all(&hello).await.is_err() {
        return;
    }
    let mut reply = vec![0u8; hello.len()];
    if stream.read_exact(&mut reply).await.is_err() || !corral_cli_proto::greeting_ok(&reply) {
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
    frames.extend(exit_frame(exit));
    let _ = stream.write_all(&frames).await;
    let _ = stream.flush().await;
}

/// Where a running command publishes the session it works under.
pub(crate) type SessionSlot = Arc<std::sync::Mutex<Option<String>>>;

pub(crate) async fn run(
    server: &Arc<Server>,
    args: Vec<String>,
    origin: Origin,
    slot: SessionSlot,
) -> Run {
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
    let ctx = CliCtx::new(Arc::clone(server), session.clone(), caller);
    let mut out = Vec::new();
    let res = ctx.dispatch(&cmd, &mut out).await;
    // The error is rendered while the session still lives: its references
    // are shown as uuids, which takes API calls.
    let exit = match res {
        Ok(()) => 0,
        Err(CliError::Text(t)) => {
            out.push(Out::Stderr(format!("{t}\n")));
            1
        }
        Err(CliError::Api(e)) => {
            out.extend(ctx.api_error(&e).await);
            1
        }
    };
    // A file transfer still needs the session; serve_cli ends it afterwards.
    let transferring = out
        .iter()
        .any(|o| matches!(o, Out::Transfer { .. } | Out::Connect { .. }));
    if cmd.get("session_id").is_none() && !transferring {
        let _ = server
            .call("session.logout", vec![Value::String(session)], &ctx.caller)
            .await;
    }
    Run { out, exit }
}

/// Encodes the frames for a finished command.
pub fn encode(run: &Run) -> Vec<u8> {
    let mut out = Vec::new();
    for o in &run.out {
        out.extend(encode_one(o));
    }
    out.extend(exit_frame(run.exit));
    out
}
