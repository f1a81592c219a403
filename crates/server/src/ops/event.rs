//! event.from, event.next, event.register and event.inject.

use crate::context::Server;
use crate::core::call::{ApiResult, Ctx};
use corral_db::{EventOp, State};
use corral_model::errors;
use corral_model::schema::ClassId;
use corral_model::{ApiError, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub fn token(g: u64) -> String {
    format!("{g:020},{:020}", 0)
}

pub(crate) fn parse_token(t: &str) -> Result<Option<u64>, ApiError> {
    if t.is_empty() {
        return Ok(None);
    }
    let first = t.split(',').next().unwrap_or("");
    first
        .trim()
        .parse::<u64>()
        .map(Some)
        .map_err(|_| errors::event_from_token_parse_failure(t))
}

/// A parsed subscription list.
#[derive(Clone, Debug)]
pub struct Subs {
    all: bool,
    classes: Vec<ClassId>,
    objects: Vec<(ClassId, String)>,
}

impl Subs {
    pub fn parse(items: &[String]) -> Result<Subs, ApiError> {
        let mut s = Subs {
            all: false,
            classes: vec![],
            objects: vec![],
        };
        for i in items {
            if i == "*" {
                s.all = true;
            } else if let Some((c, r)) = i.split_once('/') {
                if c.is_empty() || r.is_empty() {
                    return Err(errors::event_subscription_parse_failure(i.as_str()));
                }
                if let Some(c) = ClassId::by_lower_name(c) {
                    s.objects.push((c, r.to_owned()));
                }
            } else if i.is_empty() {
                return Err(errors::event_subscription_parse_failure(i.as_str()));
            } else if let Some(c) = ClassId::by_lower_name(i) {
                s.classes.push(c);
            }
        }
        Ok(s)
    }
    fn class_wanted(&self, c: ClassId) -> bool {
        c.def().events
            && (self.all
                || self.classes.contains(&c)
                || self.objects.iter().any(|(oc, _)| *oc == c))
    }
    fn wants(&self, c: ClassId, r: &str) -> bool {
        c.def().events
            && (self.all
                || self.classes.contains(&c)
                || self.objects.iter().any(|(oc, or)| *oc == c && or == r))
    }
}

pub(crate) fn event_record(st: &State, c: ClassId, r: &str, op: EventOp, id: u64) -> Value {
    let mut m = vec![
        ("id".to_owned(), Value::String(id.to_string())),
        ("timestamp".to_owned(), Value::str("0.0")),
        ("class".to_owned(), Value::String(c.name().to_lowercase())),
        ("operation".to_owned(), Value::str(op.as_str())),
        ("ref".to_owned(), Value::str(r)),
    ];
    if op != EventOp::Del {
        if let Some(rec) = st.record(c, r) {
            m.push(("snapshot".to_owned(), rec));
        }
    }
    Value::Struct(m)
}

/// Events after `since`, coalesced per object: adds, then mods, then dels.
pub(crate) fn collect(st: &State, subs: &Subs, since: u64) -> Vec<Value> {
    let mut per: HashMap<(ClassId, &str), (EventOp, EventOp, u64)> = HashMap::new();
    let mut order: Vec<(ClassId, &str)> = Vec::new();
    for e in st.events_since(since) {
        if !subs.wants(e.class, &e.reference) {
            continue;
        }
        let k = (e.class, e.reference.as_str());
        match per.get_mut(&k) {
            Some(x) => {
                x.1 = e.op;
                x.2 = e.generation;
            }
            None => {
                per.insert(k, (e.op, e.op, e.generation));
                order.push(k);
            }
        }
    }
    let (mut adds, mut mods, mut dels) = (vec![], vec![], vec![]);
    for k in order {
        let (first, last, g) = per[&k];
        let op = match (first, last) {
            (EventOp::Add, EventOp::Del) => continue,
            (EventOp::Add, _) => EventOp::Add,
            (_, EventOp::Del) => EventOp::Del,
            _ => EventOp::Mod,
        };
        if op != EventOp::Del && !st.exists(k.0, k.1) {
            continue;
        }
        let rec = event_record(st, k.0, k.1, op, g);
        match op {
            EventOp::Add => adds.push(rec),
            EventOp::Mod => mods.push(rec),
            EventOp::Del => dels.push(rec),
        }
    }
    adds.extend(mods);
    adds.extend(dels);
    adds
}

pub(crate) fn ref_counts(st: &State) -> Value {
    Value::Struct(
        ClassId::all()
            .filter(|c| c.def().in_db && c.def().events)
            .map(|c| (c.name().to_lowercase(), Value::I4(st.count(c) as i32)))
            .collect(),
    )
}

/// `event.from(classes, token, timeout)`.
pub async fn from(
    server: Arc<Server>,
    ctx: Ctx,
    classes: Vec<String>,
    tok: String,
    timeout: f64,
) -> ApiResult {
    let subs = Subs::parse(&classes)?;
    let since = parse_token(&tok)?;
    let timeout = if timeout.is_finite() && timeout > 0.0 {
        timeout.min(3600.0)
    } else {
        0.0
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    let mut rx = server.events.subscribe();
    loop {
        rx.borrow_and_update();
        if !server.sessions.exists(&ctx.session) {
            return Err(ApiError::session_invalid(&ctx.session));
        }
        {
            let st = server.db.read();
            let g = st.generation();
            let events = match since {
                None => {
                    let mut out = Vec::new();
                    for c in ClassId::all().filter(|c| c.def().in_db && subs.class_wanted(*c)) {
                        for r in st.refs(c) {
                            if subs.wants(c, r) {
                                let created = st.row(c, r).map(|x| x.created).unwrap_or(0);
                                out.push(event_record(&st, c, r, EventOp::Add, created));
                            }
                        }
                    }
                    out
                }
                Some(s) if s > g || s < st.log_floor() => {
                    return Err(errors::events_lost());
                }
                Some(s) => collect(&st, &subs, s),
            };
            if !events.is_empty() || since.is_none() || tokio::time::Instant::now() >= deadline {
                return Ok(Value::Struct(vec![
                    ("events".into(), Value::Array(events)),
                    ("valid_ref_counts".into(), ref_counts(&st)),
                    ("token".into(), Value::String(token(g))),
                ]));
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            continue; // deadline: one last look, then an empty reply
        }
    }
}

/// `event.inject(class, ref)`: touches the object; the token returned sits
/// just before that change.
pub fn inject(server: &Server, class_name: &str, r: &str) -> ApiResult {
    let c = ClassId::by_lower_name(class_name)
        .filter(|c| c.def().in_db)
        .ok_or_else(|| ApiError::handle_invalid(class_name, r))?;
    let before = server.db.write(|t| {
        let g = t.state().generation();
        t.touch(c, r)?;
        Ok(g)
    });
    before.map(|g| Value::String(token(g))).map_err(Into::into)
}

/// Legacy `event.register`.
pub fn register(server: &Server, ctx: &Ctx, classes: Vec<String>, add: bool) -> ApiResult {
    let g = server.db.read().generation();
    server.sessions.with(&ctx.session, |info| {
        let (mut subs, cursor) = info.registered.take().unwrap_or((vec![], g));
        for c in classes {
            let c = c.to_lowercase();
            // Only what can match is kept: "*" and class names, so a
            // session's list stays bounded by the datamodel.
            if add && c != "*" && ClassId::by_lower_name(&c).is_none() {
                continue;
            }
            if add {
                if !subs.contains(&c) {
                    subs.push(c);
                }
            } else {
                subs.retain(|x| *x != c);
            }
        }
        info.registered = Some((subs, cursor));
    });
    Ok(Value::String(String::new()))
}

/// Legacy `event.next`: blocks until something the session registered for changes.
pub async fn next(server: Arc<Server>, ctx: Ctx) -> ApiResult {
    let mut rx = server.events.subscribe();
    loop {
        rx.borrow_and_update();
        let reg = server.sessions.with(&ctx.session, |i| i.registered.clone());
        let Some(reg) = reg else {
            return Err(ApiError::session_invalid(&ctx.session));
        };
        let Some((subs, cursor)) = reg else {
            return Err(errors::session_not_registered(ctx.session.as_str()));
        };
        let parsed = Subs::parse(&subs)?;
        let (events, g) = {
            let st = server.db.read();
            if cursor < st.log_floor() {
                return Err(errors::events_lost());
            }
            let mut out = Vec::new();
            for e in st.events_since(cursor) {
                if parsed.wants(e.class, &e.reference) {
                    let mut rec = event_record(&st, e.class, &e.reference, e.op, e.generation);
                    if let Value::Struct(m) = &mut rec {
                        m[1].1 = Value::String(format!("{}.", corral_model::date::now_secs()));
                    }
                    out.push(rec);
                }
            }
            (out, st.generation())
        };
        server.sessions.with(&ctx.session, |i| {
            if let Some((_, c)) = i.registered.as_mut() {
                *c = g;
            }
        });
        if !events.is_empty() {
            return Ok(Value::Array(events));
        }
        if rx.changed().await.is_err() {
            return Err(ApiError::internal("event hub closed"));
        }
    }
}
