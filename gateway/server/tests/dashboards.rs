//! The Grafana dashboards parse, import cleanly (a `${DS_PROMETHEUS}` input, stable uids),
//! every PromQL expression parses (Prometheus's own parser, through `promtool check
//! rules`), and every metric they use is in METRICS.md.

mod common;

use std::collections::HashSet;

#[test]
fn dashboards_are_importable_with_stable_uids() {
    let mut uids = HashSet::new();
    let mut n = 0;
    for e in std::fs::read_dir(common::dashboards_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        n += 1;
        let text = std::fs::read_to_string(&p).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        let uid = v["uid"].as_str().expect("uid");
        assert!(uid.starts_with("mqgate-"), "{p:?}: uid {uid}");
        assert_eq!(
            p.file_stem().unwrap().to_str().unwrap(),
            uid,
            "file named after its uid"
        );
        assert!(uids.insert(uid.to_owned()), "uid {uid} twice");
        let inputs = v["__inputs"].as_array().expect("__inputs");
        assert!(inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"));
        for panel in v["panels"].as_array().expect("panels") {
            assert_eq!(
                panel["datasource"]["uid"], "${DS_PROMETHEUS}",
                "{p:?}: {}",
                panel["title"]
            );
            assert!(panel["id"].is_u64() && panel["gridPos"].is_object());
            for t in panel["targets"].as_array().expect("targets") {
                assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}");
            }
        }
    }
    assert_eq!(n, 3, "overview, topics and groups, protocols");
}

#[test]
fn every_expression_parses_and_uses_documented_metrics() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../METRICS.md")).unwrap();
    let name = regex::Regex::new(r"mqgate_[a-z_]+").unwrap();
    let queries = common::dashboard_queries();
    assert!(queries.len() >= 25, "{} queries", queries.len());
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for (i, (file, title, expr)) in queries.iter().enumerate() {
        for m in name.find_iter(expr) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(m.as_str(), |s, suf| s.strip_suffix(suf).unwrap_or(s));
            assert!(
                doc.contains(&format!("`{base}`")),
                "{file} / {title}: {base} is not in METRICS.md"
            );
        }
        rules.push_str(&format!(
            "      - record: dashboard_expr_{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("rules.yml");
    std::fs::write(&f, &rules).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&f)
        .output()
        .expect("promtool not found: apt-get install prometheus (.ci/run does)");
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
