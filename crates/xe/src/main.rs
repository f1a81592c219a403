//! xe: a thin client speaking XenServer's thin-CLI protocol to corrald.
//!
//! Everything but the connection options is sent to the server, which parses
//! and runs the command. With no server named, xe uses the local unix socket
//! (`$CORRAL_XAPI_SOCKET`, default `/var/lib/corral/xapi.sock`), where the
//! caller is root. Otherwise it connects with TLS to port 443 (or plain HTTP
//! to port 80 with `--nossl`). Like XenServer's xe it does not verify the
//! server certificate.

mod conn;
mod console;
mod opts;
mod session;
mod transfer;

use crate::opts::parse;
use crate::session::run;

pub(crate) fn die(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(1)
}

pub(crate) fn main() {
    let o = parse();
    if o.rest.is_empty() || o.rest[0] == "--help" || o.rest[0] == "-help" {
        let mut args = o.rest.clone();
        args.retain(|a| a != "--help" && a != "-help");
        args.insert(0, "help".into());
        run(&o, args)
    }
    run(&o, o.rest.clone())
}
