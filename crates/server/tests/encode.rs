//! `get_all_records` is encoded straight from the tables (no Value tree);
//! the bytes must equal the generic encoding of the same records.

use corral_model::{ClassId, Value, class, field, jsonrpc, xmlrpc};
use corral_server::core::config::Config;
use corral_server::daemon::{Options, build};

#[test]
fn streamed_all_records_equal_the_value_encoding() {
    let dir = std::env::temp_dir().join(format!("corral-encode-{}", uuid::Uuid::new_v4()));
    let server = build(&Options {
        state_dir: dir.clone(),
        listen: None,
        tls_listen: None,
        root_password: Some("pw".into()),
        config: Config::default(),
    })
    .expect("server");
    // Text that needs escaping in both encodings, and a non-empty map.
    let pool = server.pool_ref.clone();
    server
        .db
        .write(|t| {
            t.set(
                field::pool::NAME_LABEL,
                &pool,
                Value::str("<a & \"b\"> \u{e9}\\"),
            )?;
            t.set(
                field::pool::OTHER_CONFIG,
                &pool,
                Value::Struct(vec![("k<".into(), Value::str("v&"))]),
            )
        })
        .expect("write");
    let classes: Vec<ClassId> = ClassId::all().filter(|c| c.def().in_db).collect();
    assert!(classes.contains(&class::HOST));
    for c in classes {
        let st = server.db.read();
        let value = Value::Struct(
            st.refs(c)
                .filter_map(|r| Some((r.clone(), st.record(c, r)?)))
                .collect(),
        );
        drop(st);
        let xml_streamed = xmlrpc::success_with(0, |out| server.write_all_records(c, false, out));
        assert_eq!(
            xml_streamed,
            xmlrpc::success(&value),
            "XML for {}",
            c.def().name
        );
        let id = serde_json::json!(7);
        for v2 in [false, true] {
            let json_streamed =
                jsonrpc::success_with(&id, v2, 0, |out| server.write_all_records(c, true, out));
            assert_eq!(
                json_streamed,
                jsonrpc::success(&value, &id, v2),
                "JSON for {}",
                c.def().name
            );
        }
    }
    let xml = xmlrpc::success_with(0, |out| server.write_all_records(class::POOL, false, out));
    assert!(xml.contains("&lt;a &amp; &quot;b&quot;&gt;"), "{xml}");
    let _ = std::fs::remove_dir_all(dir);
}
