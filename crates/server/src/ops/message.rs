//! message.* queries.

use crate::context::Server;
use crate::core::call::ApiResult;
use corral_model::schema::{class, field};
use corral_model::{Value, date};

pub(crate) fn messages_since(s: &Server, filter: Option<(&str, &str)>, since: &str) -> ApiResult {
    let since = date::parse(since).unwrap_or(0);
    let st = s.db.read();
    let mut out = Vec::new();
    for r in st.refs(class::MESSAGE) {
        let ts = st
            .get_str(field::message::TIMESTAMP, r)
            .and_then(|t| date::parse(&t))
            .unwrap_or(0);
        if ts <= since {
            continue;
        }
        if let Some((cls, obj)) = filter {
            if st.get_str(field::message::CLS, r).as_deref() != Some(cls)
                || st.get_str(field::message::OBJ_UUID, r).as_deref() != Some(obj)
            {
                continue;
            }
        }
        if let Some(rec) = st.record(class::MESSAGE, r) {
            out.push((r.clone(), rec));
        }
    }
    Ok(Value::Struct(out))
}
