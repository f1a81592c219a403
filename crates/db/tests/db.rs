//! Pool database: transactions commit whole or not at all, survive reopen,
//! and keep bound fields consistent.

use corral_db::{Db, EventOp, decode_record};
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, new_ref};

fn vm(db: &Db, name: &str) -> String {
    let r = new_ref();
    db.write(|t| {
        t.create(
            class::VM,
            &r,
            vec![(field::vm::NAME_LABEL.index, Value::str(name))],
        )
    })
    .expect("create");
    r
}

#[test]
fn failed_transaction_leaves_nothing_behind() {
    let db = Db::in_memory();
    let a = vm(&db, "a");
    let g = db.read().generation();
    let b = new_ref();
    let res: Result<(), _> = db.write(|t| {
        t.set(field::vm::NAME_LABEL, &a, Value::str("changed"))?;
        t.create(class::VM, &b, vec![])?;
        t.delete(class::VM, &a)?;
        Err(ApiError::internal("boom"))
    });
    assert!(res.is_err());
    let st = db.read();
    assert_eq!(st.get_str(field::vm::NAME_LABEL, &a).as_deref(), Some("a"));
    assert!(!st.exists(class::VM, &b));
    assert_eq!(
        st.generation(),
        g,
        "no generation for a rolled-back transaction"
    );
    assert_eq!(st.count(class::VM), 1);
}

#[test]
fn derived_sets_follow_child_pointers() {
    let db = Db::in_memory();
    let a = vm(&db, "a");
    let b = vm(&db, "b");
    let vbd = new_ref();
    db.write(|t| {
        t.create(
            class::VBD,
            &vbd,
            vec![(field::vbd::VM.index, Value::str(&a))],
        )
    })
    .expect("vbd");
    let set = |r: &str| {
        db.read()
            .get(field::vm::VBDS, r)
            .and_then(|v| v.as_array().map(<[_]>::to_vec))
            .unwrap_or_default()
    };
    assert_eq!(set(&a), vec![Value::str(&vbd)]);
    db.write(|t| t.set(field::vbd::VM, &vbd, Value::str(&b)))
        .expect("move");
    assert!(set(&a).is_empty());
    assert_eq!(set(&b), vec![Value::str(&vbd)]);
    let g = db.read().generation();
    db.write(|t| t.delete(class::VBD, &vbd)).expect("delete");
    assert!(set(&b).is_empty());
    // The parent whose set changed gets a mod event with the child's del.
    let st = db.read();
    let evs: Vec<_> = st
        .events_since(g)
        .map(|e| (e.class, e.reference.clone(), e.op))
        .collect();
    assert!(evs.contains(&(class::VBD, vbd.clone(), EventOp::Del)));
    assert!(evs.contains(&(class::VM, b.clone(), EventOp::Mod)));
}

#[test]
fn committed_writes_survive_reopen_and_volatile_classes_do_not() {
    let dir = std::env::temp_dir().join(format!("corral-db-test-{}", uuid_like()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("pool.db");
    let (a, sess);
    {
        let db = Db::open(&path).expect("open");
        a = vm(&db, "persisted");
        db.write(|t| t.set(field::vm::OTHER_CONFIG, &a, Value::string_map([("k", "v")])))
            .expect("set");
        sess = new_ref();
        db.write(|t| t.create(class::SESSION, &sess, vec![]))
            .expect("session");
    }
    let db = Db::open(&path).expect("reopen");
    let st = db.read();
    assert_eq!(
        st.get_str(field::vm::NAME_LABEL, &a).as_deref(),
        Some("persisted")
    );
    assert_eq!(
        st.get(field::vm::OTHER_CONFIG, &a),
        Some(Value::string_map([("k", "v")]))
    );
    assert!(
        !st.exists(class::SESSION, &sess),
        "sessions are not persisted"
    );
    assert!(st.generation() >= 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn change_records_decode() {
    let text = r#"{"generation":5,"ops":[{"op":"set","class":"VM","field":"name_label","ref":"OpaqueRef:x","value":"n"},{"op":"delete","class":"VBD","ref":"OpaqueRef:y"}]}"#;
    let rec = decode_record(text).expect("decodes");
    assert_eq!(rec.generation, 5);
    assert_eq!(rec.ops.len(), 2);
    assert!(decode_record("{}").is_none());
}

fn uuid_like() -> String {
    corral_model::new_uuid()
}

/// Group commit: many threads writing at once each get their own commit
/// back, every one of them survives a reopen, and the events come in
/// generation order.
#[test]
fn concurrent_writers_share_fsyncs_and_lose_nothing() {
    let dir = std::env::temp_dir().join(format!("corral-db-test-{}", uuid_like()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("pool.db");
    let made: Vec<(String, String)> = {
        let db = std::sync::Arc::new(Db::open(&path).expect("open"));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let db = std::sync::Arc::clone(&db);
                std::thread::spawn(move || {
                    (0..50)
                        .map(|i| {
                            let name = format!("t{t}-{i}");
                            let r = vm(&db, &name);
                            // Acknowledged: readable at once by its writer.
                            assert_eq!(
                                db.read().get_str(field::vm::NAME_LABEL, &r).as_deref(),
                                Some(name.as_str())
                            );
                            (r, name)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let made: Vec<(String, String)> = threads
            .into_iter()
            .flat_map(|h| h.join().expect("writer"))
            .collect();
        let st = db.read();
        assert_eq!(st.generation(), 400, "one generation per commit");
        let gens: Vec<u64> = st.events_since(0).map(|e| e.generation).collect();
        assert!(gens.windows(2).all(|w| w[0] <= w[1]), "events in order");
        made
    };
    let db = Db::open(&path).expect("reopen");
    let st = db.read();
    for (r, name) in &made {
        assert_eq!(
            st.get_str(field::vm::NAME_LABEL, r).as_deref(),
            Some(name.as_str())
        );
    }
    assert_eq!(st.generation(), 400);
    let _ = std::fs::remove_dir_all(&dir);
}
