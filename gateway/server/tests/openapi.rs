//! docs/openapi.yaml documents every route the admin API serves, and nothing else.

#[test]
fn every_route_is_documented() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let yaml = std::fs::read_to_string(format!("{root}/docs/openapi.yaml")).unwrap();
    let src = std::fs::read_to_string(format!("{root}/gateway/server/src/admin.rs")).unwrap();
    let path_re = regex::Regex::new(r"(?m)^  (/[^:\s]*):\s*$").unwrap();
    let documented: std::collections::BTreeSet<String> = path_re
        .captures_iter(&yaml)
        .map(|c| c[1].to_owned())
        .collect();
    let route_re = regex::Regex::new(r#"\.route\(\s*"([^"]+)""#).unwrap();
    let served: std::collections::BTreeSet<String> = route_re
        .captures_iter(&src)
        .map(|c| c[1].to_owned())
        .collect();
    assert!(!served.is_empty());
    assert_eq!(
        documented, served,
        "docs/openapi.yaml and admin.rs disagree"
    );
}

/// docs/rabbitmq-management.md lists every RabbitMQ management route mqgate serves.
#[test]
fn every_rabbitmq_route_is_documented() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let doc = std::fs::read_to_string(format!("{root}/docs/rabbitmq-management.md")).unwrap();
    let src = std::fs::read_to_string(format!("{root}/gateway/server/src/rabbit/mod.rs")).unwrap();
    let route_re = regex::Regex::new(r#"\.route\(\s*"([^"]+)""#).unwrap();
    let served: Vec<String> = route_re
        .captures_iter(&src)
        .map(|c| c[1].to_owned())
        .collect();
    assert!(served.len() > 20);
    let missing: Vec<&String> = served
        .iter()
        .filter(|r| !doc.contains(&format!("| `{r}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/rabbitmq-management.md: {missing:?}"
    );
}
