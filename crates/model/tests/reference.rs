//! docs/api-reference.md is generated from the datamodel; this fails when the
//! checked-in page no longer matches the spec.

#[test]
fn api_reference_page_matches_the_spec() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api-reference.md");
    let generated = corral_model::reference::markdown();
    if std::env::var_os("CORRAL_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &generated).expect("write docs/api-reference.md");
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/api-reference.md is out of date; run CORRAL_UPDATE_DOCS=1 cargo test -p corral-model --test reference"
    );
    assert!(generated.contains("## Class: VM\n"));
    assert!(generated.contains("| `power_state` | enum vm_power_state |"));
}
