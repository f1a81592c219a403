//! What a hand-written xe command is: its name, parameters, help and
//! implementation (the per-area tables in `commands` and `network` list them).

use crate::cli::args::Cmd;
use crate::cli::context::{CliCtx, CliError};
use crate::cli::protocol::Out;
use std::future::Future;
use std::pin::Pin;

/// What running a command returns.
pub(crate) type Running<'a> = Pin<Box<dyn Future<Output = Result<(), CliError>> + Send + 'a>>;

/// A command's implementation: a `CliCtx` method that calls the API.
pub(crate) type Action = for<'a> fn(&'a CliCtx, &'a Cmd, &'a mut Vec<Out>) -> Running<'a>;

/// `act!(method)`: the [`Action`] that runs `CliCtx::method`.
macro_rules! act {
    ($($method:tt)+) => {
        |c, cmd, out| Box::pin(c.$($method)+(cmd, out))
    };
}
pub(crate) use act;

/// A hand-written command: what dispatch, `xe help` and bash completion read.
pub(crate) struct Command {
    pub name: &'static str,
    /// Required parameters, comma-separated as `xe help` prints them.
    pub reqd: &'static str,
    pub optional: &'static str,
    pub description: &'static str,
    pub run: Action,
}

pub(crate) const fn cmd(
    name: &'static str,
    reqd: &'static str,
    optional: &'static str,
    description: &'static str,
    run: Action,
) -> Command {
    Command {
        name,
        reqd,
        optional,
        description,
        run,
    }
}
