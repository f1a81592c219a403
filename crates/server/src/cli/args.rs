//! xe's command line: parameters and switches.

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

pub(crate) const STD_PARAMS: &[&str] = &[
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
