//! Codec properties: whatever the server can send, the parser reads back
//! unchanged; the fuzz seed corpus parses without panicking.

use corral_model::value::Value;
use corral_model::{ApiError, jsonrpc, xmlrpc};
use proptest::prelude::*;

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        ".*".prop_map(Value::String),
        any::<i64>().prop_map(Value::Int),
        any::<bool>().prop_map(Value::Bool),
        (-1e12f64..1e12f64).prop_map(Value::Float),
        (0i64..4_102_444_800).prop_map(|s| Value::DateTime(corral_model::date::format(s))),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("[a-zA-Z_:<&>]{0,12}", inner), 0..6).prop_map(Value::Struct),
        ]
    })
}

/// XML-RPC sends ints as untyped strings and drops control characters, so
/// a round trip yields the wire form of the value.
fn xml_expected(v: &Value) -> Value {
    match v {
        Value::Int(i) => Value::String(i.to_string()),
        Value::String(s) => Value::String(
            s.chars()
                .filter(|c| *c >= ' ' || matches!(c, '\t' | '\n' | '\r'))
                .collect(),
        ),
        Value::Float(f) => {
            Value::Float(corral_model::value::format_float(*f).parse().unwrap_or(*f))
        }
        Value::Array(a) => Value::Array(a.iter().map(xml_expected).collect()),
        Value::Struct(m) => Value::Struct(
            m.iter()
                .map(|(k, v)| (k.clone(), xml_expected(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

proptest! {
    #[test]
    fn xmlrpc_call_round_trip(v in arb_value(), method in "[A-Za-z_.]{1,30}") {
        let text = xmlrpc::call(&method, std::slice::from_ref(&v));
        let call = xmlrpc::parse_call(text.as_bytes()).expect("parses");
        prop_assert_eq!(call.method, method);
        prop_assert_eq!(&call.params[0], &xml_expected(&v));
    }

    #[test]
    fn xmlrpc_response_round_trip(v in arb_value()) {
        let text = xmlrpc::success(&v);
        prop_assert_eq!(xmlrpc::parse_response(text.as_bytes()), Ok(xmlrpc::Response::Success(xml_expected(&v))));
    }

    #[test]
    fn jsonrpc_round_trip(v in arb_value()) {
        let mut text = String::new();
        jsonrpc::write_value(&v, &mut text);
        let back = jsonrpc::from_json(serde_json::from_str(&text).expect("valid JSON"));
        let expected = match &v { Value::DateTime(d) => Value::String(d.clone()), other => other.clone() };
        fn norm(v: &Value) -> Value {
            match v {
                Value::DateTime(d) => Value::String(d.clone()),
                Value::Float(f) if f.fract() == 0.0 && f.abs() < 9e15 => Value::Int(*f as i64),
                Value::Array(a) => Value::Array(a.iter().map(norm).collect()),
                Value::Struct(m) => {
                    // JSON objects keep the last of duplicate keys.
                    let mut out: Vec<(String, Value)> = Vec::new();
                    for (k, x) in m {
                        match out.iter_mut().find(|(ek, _)| ek == k) {
                            Some(slot) => slot.1 = norm(x),
                            None => out.push((k.clone(), norm(x))),
                        }
                    }
                    out.sort_by(|a, b| a.0.cmp(&b.0));
                    Value::Struct(out)
                }
                other => other.clone(),
            }
        }
        prop_assert_eq!(norm(&back), norm(&expected));
    }

    #[test]
    fn xmlrpc_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = xmlrpc::parse_call(&bytes);
        let _ = xmlrpc::parse_response(&bytes);
        let _ = jsonrpc::parse_call(&bytes);
    }
}

#[test]
fn wire_shapes_match_xenapi() {
    let ok = xmlrpc::success(&Value::Struct(vec![
        ("VCPUs_max".into(), Value::Int(2)),
        ("flag".into(), Value::Bool(true)),
    ]));
    assert_eq!(
        ok,
        "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value><struct><member><name>VCPUs_max</name><value>2</value></member><member><name>flag</name><value><boolean>1</boolean></value></member></struct></value></member></struct></value></param></params></methodResponse>"
    );
    let err = xmlrpc::failure(&ApiError::handle_invalid("VM", "OpaqueRef:abc"));
    assert!(err.contains("<member><name>ErrorDescription</name><value><array><data><value>HANDLE_INVALID</value><value>VM</value><value>OpaqueRef:abc</value></data></array></value></member>"));
    let id = serde_json::json!(7);
    assert_eq!(
        jsonrpc::success(&Value::Int(3), &id, true),
        r#"{"jsonrpc":"2.0","result":3,"id":7}"#
    );
    assert_eq!(
        jsonrpc::success(&Value::Int(3), &id, false),
        r#"{"result":3,"error":null,"id":7}"#
    );
    assert_eq!(
        jsonrpc::failure(&ApiError::new("X", ["a"]), &id, true),
        r#"{"jsonrpc":"2.0","error":{"code":1,"message":"X","data":["a"]},"id":7}"#
    );
    assert_eq!(
        jsonrpc::failure(&ApiError::new("X", ["a"]), &id, false),
        r#"{"result":null,"error":["X","a"],"id":7}"#
    );
    assert_eq!(
        xmlrpc::value_to_string(&Value::Array(vec![Value::str("OpaqueRef:1")])),
        "<value><array><data><value>OpaqueRef:1</value></data></array></value>"
    );
    assert_eq!(
        xmlrpc::value_to_string(&Value::I4(5)),
        "<value><i4>5</i4></value>"
    );
    assert_eq!(
        xmlrpc::value_to_string(&Value::str("a<b&\u{1}c")),
        "<value>a&lt;b&amp;c</value>"
    );
}

#[test]
fn accepts_what_clients_send() {
    let c = xmlrpc::parse_call(include_bytes!("../fuzz-seeds/int.xml")).expect("parses");
    assert_eq!(c.params[1], Value::Int(4));
    let c = xmlrpc::parse_call(include_bytes!("../fuzz-seeds/cdata.xml")).expect("parses");
    assert_eq!(c.params[0], Value::str("<raw> AB"));
    let c = xmlrpc::parse_call(include_bytes!("../fuzz-seeds/nested.xml")).expect("parses");
    let arr = c.params[0]
        .member("a&b")
        .and_then(Value::as_array)
        .expect("array");
    assert_eq!(
        arr,
        &[
            Value::Bool(true),
            Value::Float(1.5),
            Value::Nil,
            Value::str("")
        ]
    );
    assert!(xmlrpc::parse_call(b"<!DOCTYPE x [<!ENTITY a 'b'>]><methodCall/>").is_err());
    let j = jsonrpc::parse_call(include_bytes!("../fuzz-seeds/login.json")).expect("parses");
    assert!(j.v2 && j.method == "session.login_with_password" && j.params.len() == 2);
    assert!(
        jsonrpc::parse_call(br#"{"method":"x","params":[]}"#).is_err(),
        "notifications are refused"
    );
}

/// Every file of the fuzz seed corpus runs through the parsers in ordinary
/// `cargo test`: none may panic, and the well-formed ones must parse.
#[test]
fn fuzz_seed_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-seeds");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("seed dir") {
        let p = e.expect("entry").path();
        let data = std::fs::read(&p).expect("read");
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.ends_with(".json") {
            assert!(jsonrpc::parse_call(&data).is_ok(), "{name}");
        } else if name.starts_with("truncated") {
            assert!(xmlrpc::parse_call(&data).is_err(), "{name}");
        } else {
            assert!(xmlrpc::parse_call(&data).is_ok(), "{name}");
        }
        n += 1;
    }
    assert!(n >= 6);
    // Deep nesting is refused, not a stack overflow.
    let deep = format!(
        "<methodCall><methodName>x</methodName><params><param>{}</param></params></methodCall>",
        "<value><array><data>".repeat(10_000)
    );
    assert!(xmlrpc::parse_call(deep.as_bytes()).is_err());
}
