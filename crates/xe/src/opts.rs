//! xe's own options (server, port, user, password, --nossl, XE_EXTRA_ARGS); everything else is the command.

use crate::die;
use std::io::BufRead;

pub(crate) struct Opts {
    pub(crate) server: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) nossl: bool,
    pub(crate) rest: Vec<String>,
}

pub(crate) fn parse() -> Opts {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Ok(extra) = std::env::var("XE_EXTRA_ARGS") {
        let mut cur = String::new();
        let mut chars = extra.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&',') => cur.push(chars.next().unwrap_or(',')),
                ',' => args.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        if !cur.is_empty() {
            args.push(cur);
        }
    }
    let mut o = Opts {
        server: None,
        port: None,
        user: String::new(),
        password: String::new(),
        nossl: false,
        rest: vec![],
    };
    let (mut user, mut pwd) = (None, None);
    let mut i = 0;
    let set = |k: &str,
               v: String,
               o: &mut Opts,
               user: &mut Option<String>,
               pwd: &mut Option<String>|
     -> bool {
        match k {
            "server" => o.server = Some(v),
            "port" => o.port = Some(v.parse().unwrap_or_else(|_| die(&format!("Bad port: {v}")))),
            "username" => *user = Some(v),
            "password" => *pwd = Some(v),
            "passwordfile" => {
                let text = std::fs::read_to_string(&v)
                    .unwrap_or_else(|e| die(&format!("Cannot read {v}: {e}")));
                let mut lines = text.lines();
                *user = lines.next().map(str::to_owned);
                *pwd = lines.next().map(str::to_owned);
            }
            "nossl" => o.nossl = v.is_empty() || v == "true",
            _ => return false,
        }
        true
    };
    while i < args.len() {
        let a = args[i].clone();
        let next = |i: &mut usize| -> String {
            *i += 1;
            args.get(*i)
                .cloned()
                .unwrap_or_else(|| die(&format!("Option {a} needs a value")))
        };
        match a.as_str() {
            "-s" | "-h" => {
                let v = next(&mut i);
                set("server", v, &mut o, &mut user, &mut pwd);
            }
            "-p" => {
                let v = next(&mut i);
                set("port", v, &mut o, &mut user, &mut pwd);
            }
            "-u" => {
                let v = next(&mut i);
                set("username", v, &mut o, &mut user, &mut pwd);
            }
            "-pw" => {
                let v = next(&mut i);
                set("password", v, &mut o, &mut user, &mut pwd);
            }
            "-pwf" => {
                let v = next(&mut i);
                set("passwordfile", v, &mut o, &mut user, &mut pwd);
            }
            "--nossl" => o.nossl = true,
            "-version" => {
                println!("ThinCLI protocol: 0.2");
                std::process::exit(0)
            }
            _ => {
                let handled = a
                    .split_once('=')
                    .is_some_and(|(k, v)| set(k, v.to_owned(), &mut o, &mut user, &mut pwd));
                if !handled {
                    o.rest.push(a);
                }
            }
        }
        i += 1;
    }
    if let Some(home) = std::env::var_os("HOME") {
        if let Ok(f) = std::fs::File::open(std::path::Path::new(&home).join(".xe")) {
            for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
                if let Some((k, v)) = line.trim().split_once('=') {
                    let k = k.trim();
                    let already = match k {
                        "server" => o.server.is_some(),
                        "port" => o.port.is_some(),
                        "username" => user.is_some(),
                        "password" | "passwordfile" => pwd.is_some(),
                        _ => true,
                    };
                    if !already {
                        set(k, v.trim().to_owned(), &mut o, &mut user, &mut pwd);
                    }
                }
            }
        }
    }
    o.user = user.unwrap_or_else(|| "root".into());
    o.password = pwd.unwrap_or_default();
    o
}
