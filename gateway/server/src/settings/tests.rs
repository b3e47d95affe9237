use std::time::Duration;

use super::*;

fn from_toml(s: &str) -> Result<Settings, ConfigError> {
    from_toml_env(s, &[])
}

/// `s` as the file, `env` as the only environment variables.
fn from_toml_env(s: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.toml");
    std::fs::write(&p, s).unwrap();
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::load_with(Some(&p), Some(env))
}

fn err(toml: &str) -> String {
    from_toml(toml).unwrap_err().0
}

#[test]
fn the_shipped_example_is_valid() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mqgate.toml");
    let s = Settings::load(Some(&p)).expect("mqgate.toml loads");
    assert_eq!(s.listeners.amqp.to_string(), "[::]:5672");
}

#[test]
fn the_shipped_example_spells_out_the_defaults() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mqgate.toml");
    let file = Settings::load_with(Some(&p), Some(config::Map::new())).unwrap();
    let defaults = Settings::load_with(None, Some(config::Map::new())).unwrap();
    assert_eq!(format!("{file:?}"), format!("{defaults:?}"));
}

#[test]
fn defaults_without_a_file() {
    let s = Settings::load(None).unwrap();
    assert_eq!(s.store.backend, Backend::Rocksdb);
    assert!(s.users().authenticate("guest", "guest").is_some());
    assert_eq!(s.core().delay_levels.len(), 18);
    assert_eq!(s.core().delay_levels, CoreConfig::default().delay_levels);
    let l = &s.listeners;
    assert_eq!(
        l.all().map(|(k, v)| format!("{k}={v}")).join(" "),
        "amqp=[::]:5672 amqps=off mqtt=[::]:1883 mqtts=off mqtt_ws=off mqtt_wss=off \
         admin=127.0.0.1:15672"
    );
    let r = s.rocks(Path::new("/x"));
    assert_eq!(r.fsync, FsyncPolicy::EveryBatch);
    assert_eq!(r.retention.max_age, None);
    let m = s.mqtt(&s.users());
    assert_eq!(m.qos0_max_wait, Duration::from_secs(5));
    let c = s.core();
    assert_eq!(c.login_throttle.failure_delay, Duration::from_millis(200));
    assert_eq!(c.login_throttle.max_delay, Duration::from_secs(5));
    assert_eq!(s.amqp(&s.users()).default_retry_policy, None);
}

#[test]
fn typed_values_reach_the_components() {
    let s = from_toml(
        r#"
[store]
fsync = "periodic"
fsync_interval = "250ms"
retention_max_age = "72h"
[limits]
mqtt_qos0_max_wait = "1m"
login_failure_delay = "0s"
login_failure_max_delay = "1d"
memory_high_watermark = "2000000000"
[delay]
levels = ["1s", "2m", "3h"]
[retry]
first_level = 2
amqp_default_policy = "rocketmq"
"#,
    )
    .unwrap();
    let r = s.rocks(Path::new("/x"));
    assert_eq!(
        r.fsync,
        FsyncPolicy::Periodic {
            interval: Duration::from_millis(250)
        }
    );
    assert_eq!(r.retention.max_age, Some(Duration::from_secs(72 * 3600)));
    let c = s.core();
    assert_eq!(
        c.delay_levels,
        [1, 120, 3 * 3600].map(Duration::from_secs).to_vec()
    );
    assert_eq!(c.retry_first_level, 2);
    assert_eq!(c.memory_high_watermark, Some(2_000_000_000));
    assert_eq!(c.login_throttle.failure_delay, Duration::ZERO);
    assert_eq!(c.login_throttle.max_delay, Duration::from_secs(86_400));
    assert_eq!(s.mqtt(&s.users()).qos0_max_wait, Duration::from_secs(60));
    assert_eq!(
        s.amqp(&s.users()).default_retry_policy,
        Some(RetryPolicy::RocketMq)
    );
}

#[test]
fn the_memory_watermark_is_off_bytes_or_a_fraction() {
    let w = |v: &str| from_toml(&format!("[limits]\nmemory_high_watermark = {v}\n"));
    for off in ["\"\"", "\"0\"", "0", "\" 0 \""] {
        assert_eq!(w(off).unwrap().core().memory_high_watermark, None, "{off}");
    }
    assert_eq!(
        w("5000000000").unwrap().core().memory_high_watermark,
        Some(5_000_000_000)
    );
    // A fraction of the machine's memory, as a string or a number.
    for frac in ["\"0.4\"", "0.4"] {
        let s = w(frac).unwrap();
        assert_eq!(
            s.limits.memory_high_watermark,
            MemoryWatermark::Fraction(0.4)
        );
        assert!(s.core().memory_high_watermark.unwrap() > 0);
    }
    for bad in ["\"-1\"", "\"0.0\"", "\"lots\""] {
        let e = w(bad).unwrap_err().0;
        let v = bad.trim_matches('"');
        assert_eq!(
            e,
            format!(
                "config: limits.memory_high_watermark = \"{v}\": must be bytes, or a fraction \
                 of memory below 1 such as 0.4"
            )
        );
    }
}

#[test]
fn bad_values_name_key_value_and_reason() {
    let e = err("[store]\nbackend = \"rockdb\"\n");
    assert_eq!(
        e,
        "config: store.backend = \"rockdb\": must be rocksdb, jetstream or memory"
    );
    let e = err("[listeners]\nmqtt = \"localhost\"\n");
    assert!(e.contains("listeners.mqtt = \"localhost\""), "{e}");
    let e = err("[store]\nbakend = \"memory\"\n");
    assert!(e.contains("bakend"), "{e}");
    let e = err("[limits]\namqp_frame_max = \"big\"\n");
    assert!(e.contains("amqp_frame_max"), "{e}");
    let e = err("[[users]]\nname = \"a\"\npassword_hash = \"nope\"\n");
    assert!(e.contains("users[0].password_hash"), "{e}");
}

#[test]
fn every_parsed_value_names_key_value_and_reason() {
    let d = "must be a duration such as 250ms, 10s, 5m, 2h or 1d";
    for (toml, want) in [
        (
            "[store]\nfsync = \"always\"\n",
            "config: store.fsync = \"always\": must be every-batch or periodic".to_owned(),
        ),
        (
            "[store]\nfsync = \"periodic\"\nfsync_interval = \"100\"\n",
            format!("config: store.fsync_interval = \"100\": {d}"),
        ),
        (
            "[store]\nretention_max_age = \"3 days\"\n",
            "config: store.retention_max_age = \"3 days\": must be a duration such as 72h, or \"\""
                .to_owned(),
        ),
        (
            "[limits]\nmqtt_qos0_max_wait = \"5\"\n",
            format!("config: limits.mqtt_qos0_max_wait = \"5\": {d}"),
        ),
        (
            "[limits]\nlogin_failure_delay = \"0.2s\"\n",
            format!("config: limits.login_failure_delay = \"0.2s\": {d}"),
        ),
        (
            "[limits]\nlogin_failure_max_delay = \"5 s\"\n",
            format!("config: limits.login_failure_max_delay = \"5 s\": {d}"),
        ),
        (
            "[delay]\nlevels = [\"1s\", \"2x\"]\n",
            format!("config: delay.levels[1] = \"2x\": {d}"),
        ),
        (
            "[delay]\nlevels = []\n",
            "config: delay.levels = \"[]\": needs at least one level".to_owned(),
        ),
        (
            "[retry]\nfirst_level = 19\n",
            "config: retry.first_level = \"19\": must be a delay level (1-based)".to_owned(),
        ),
        (
            "[retry]\namqp_default_policy = \"always\"\n",
            "config: retry.amqp_default_policy = \"always\": must be none or rocketmq".to_owned(),
        ),
        (
            "[listeners]\namqps = \"127.0.0.1:5671\"\n",
            "config: tls.cert_file and tls.key_file are required when a TLS listener (amqps, \
             mqtts, mqtt_wss) is on"
                .to_owned(),
        ),
        (
            "[limits]\nreserved_fds = 100\n",
            "config: limits.reserved_fds = \"100\": must be 0 (no reservation) or at least 128 \
             (the store needs that many)"
                .to_owned(),
        ),
        (
            "[limits]\nlisten_backlog = 0\n",
            "config: limits.listen_backlog = \"0\": must be at least 1 (connections the kernel \
             queues before accept)"
                .to_owned(),
        ),
        (
            "[store]\nbackend = \"jetstream\"\n[store.jetstream]\nservers = []\n",
            "config: store.jetstream.servers = \"[]\": list at least one NATS server URL"
                .to_owned(),
        ),
        (
            "[store]\nbackend = \"jetstream\"\n[store.jetstream]\nreplicas = 0\n",
            "config: store.jetstream.replicas = \"0\": must be 1 to 5 (JetStream's limit; 3 \
             survives the loss of one server)"
                .to_owned(),
        ),
        (
            "[store]\nbackend = \"jetstream\"\n[store.jetstream]\nlease_ttl = \"500ms\"\n",
            "config: store.jetstream.lease_ttl = \"500ms\": must be at least 1s (the owner \
             renews it every fifth of it)"
                .to_owned(),
        ),
        (
            "[limits]\namqp_frame_max = 1000\n",
            "config: limits.amqp_frame_max = \"1000\": must be at least 4096".to_owned(),
        ),
        (
            "[[users]]\nname = \"a\"\n",
            "config: users[0] = \"a\": needs exactly one of password_hash and password"
                .to_owned(),
        ),
        (
            "[[users]]\nname = \"a\"\npassword = \"x\"\n[[users]]\nname = \"a\"\npassword = \"y\"\n",
            "config: users[1].name = \"a\": listed twice".to_owned(),
        ),
        (
            "[[users]]\npassword = \"x\"\n",
            "config: users[0].name = \"\": a user needs a name".to_owned(),
        ),
        (
            "[[vhosts]]\nname = \"v\"\npermissions = [{ user = \"u\", read = \"(\" }]\n",
            "config: vhosts[0].permissions[0].read = \"(\": not a regular expression:".to_owned(),
        ),
        (
            "[[users]]\nname = \"a\"\npassword = \"x\"\n[[vhosts]]\nname = \"v\"\npermissions = [{ user = \"b\" }]\n",
            "config: vhosts[0].permissions[0].user = \"b\": no such user in [[users]]".to_owned(),
        ),
        (
            "[mqtt]\nacl = [{ filter = \"a/#\" }]\n",
            "config: mqtt.acl[0].access = \"\": must be publish, subscribe or all".to_owned(),
        ),
        (
            "[mqtt]\nacl = [{ access = \"all\", filter = \"a\" }, { access = \"read\", filter = \"a\" }]\n",
            "config: mqtt.acl[1].access = \"read\": must be publish, subscribe or all".to_owned(),
        ),
        (
            "[mqtt]\nacl = [{ access = \"all\" }]\n",
            "config: mqtt.acl[0].filter = \"\": a rule needs a topic filter".to_owned(),
        ),
    ] {
        let e = err(toml);
        assert!(e.starts_with(&want), "{toml}\n got: {e}\nwant: {want}");
    }
}

#[test]
fn environment_variables_override_the_file_with_the_same_spellings() {
    let toml = "[store]\nbackend = \"rocksdb\"\n[listeners]\nmqtt = \"127.0.0.1:1111\"\n";
    let s = from_toml_env(
        toml,
        &[
            ("MQGATE__STORE__BACKEND", "memory"),
            ("MQGATE__STORE__FSYNC", "periodic"),
            ("MQGATE__STORE__FSYNC_INTERVAL", "250ms"),
            ("MQGATE__LISTENERS__MQTT", "127.0.0.1:3333"),
            ("MQGATE__LISTENERS__MQTT_WS", "0.0.0.0:8083"),
            ("MQGATE__LISTENERS__AMQP", ""),
            ("MQGATE__LIMITS__MEMORY_HIGH_WATERMARK", "3000000000"),
            ("MQGATE__LIMITS__LOGIN_FAILURE_DELAY", "1s"),
            ("MQGATE__LIMITS__AMQP_HEARTBEAT", "30"),
            ("MQGATE__MQTT__ACL_DEFAULT", "deny"),
            ("MQGATE__RETRY__AMQP_DEFAULT_POLICY", "rocketmq"),
        ],
    )
    .unwrap();
    assert_eq!(s.store.backend, Backend::Memory);
    assert_eq!(s.listeners.mqtt.to_string(), "127.0.0.1:3333");
    assert_eq!(s.listeners.mqtt_ws.to_string(), "0.0.0.0:8083");
    assert!(!s.listeners.amqp.is_on());
    assert_eq!(
        s.rocks(Path::new("/x")).fsync,
        FsyncPolicy::Periodic {
            interval: Duration::from_millis(250)
        }
    );
    let c = s.core();
    assert_eq!(c.memory_high_watermark, Some(3_000_000_000));
    assert_eq!(c.login_throttle.failure_delay, Duration::from_secs(1));
    assert_eq!(s.limits.amqp_heartbeat, 30);
    assert_eq!(s.mqtt.acl_default, AclFallback::Deny);
    assert_eq!(s.retry.amqp_default_policy, AmqpRetryPolicy::Rocketmq);
    // A number (the variables are parsed as numbers when they look like one).
    let s = from_toml_env("", &[("MQGATE__LIMITS__MEMORY_HIGH_WATERMARK", "0.5")]).unwrap();
    assert_eq!(
        s.limits.memory_high_watermark,
        MemoryWatermark::Fraction(0.5)
    );
    let e = from_toml_env("", &[("MQGATE__STORE__BACKEND", "disk")])
        .unwrap_err()
        .0;
    assert_eq!(
        e,
        "config: store.backend = \"disk\": must be rocksdb, jetstream or memory"
    );
    let e = from_toml_env("", &[("MQGATE__LIMITS__LOGIN_FAILURE_DELAY", "100")])
        .unwrap_err()
        .0;
    assert!(
        e.starts_with("config: limits.login_failure_delay = \"100\": must be a duration"),
        "{e}"
    );
}

#[test]
fn users_vhosts_and_acls_map_onto_the_adapters() {
    let s = from_toml(
        r#"
[[users]]
name = "ops"
password_hash = "XXXX"
tags = ["administrator"]
"#
        .replace("XXXX", &Password::hash("pw").to_hash_string())
        .as_str(),
    )
    .unwrap();
    let users = s.users();
    assert!(users.authenticate("ops", "pw").unwrap().is_admin());
    assert!(users.authenticate("guest", "guest").is_none());
    let a = s.amqp(&users);
    assert!(a.permission("ops", "/").is_some());
    let s = from_toml(
        r#"
[[users]]
name = "app"
password = "pw"
[[vhosts]]
name = "prod"
permissions = [{ user = "app", configure = "^app\\.", write = ".*", read = ".*" }]
[mqtt]
allow_anonymous = false
acl = [{ user = "app", access = "publish", filter = "app/#", allow = true }]
"#,
    )
    .unwrap();
    let users = s.users();
    let a = s.amqp(&users);
    assert_eq!(a.vhosts, ["prod"]);
    assert!(a
        .permission("app", "prod")
        .unwrap()
        .configure
        .is_match("app.q"));
    assert!(!a
        .permission("app", "prod")
        .unwrap()
        .configure
        .is_match("other.q"));
    assert!(a.permission("app", "/").is_none());
    let m = s.mqtt(&users);
    assert!(!m.allow_anonymous);
    assert_eq!(m.acl.len(), 1);
    assert_eq!(m.acl[0].access, Access::Publish);
    // "app" has no permission on "/", where MQTT lives.
    assert!(!m.vhost_allowed("app"));
}

#[test]
fn topic_acl_is_one_rule_set_for_both_doors() {
    let s = Settings::load(None).unwrap();
    assert_eq!(s.mqtt(&s.users()).acl_default, AclDefault::Allow);
    assert!(s.amqp(&s.users()).topic_acl.is_open());
    let s = from_toml(
        r#"
[[users]]
name = "app"
password = "pw"
[[users]]
name = "other"
password = "pw"
[[vhosts]]
name = "/"
permissions = [{ user = "app" }]
[mqtt]
acl_default = "deny"
acl = [{ access = "all", filter = "app/%c/#", allow = true }]
"#,
    )
    .unwrap();
    let users = s.users();
    let (m, a) = (s.mqtt(&users), s.amqp(&users));
    assert_eq!(m.acl_default, AclDefault::Deny);
    assert_eq!(m.topic_acl(), a.topic_acl);
    assert!(m.vhost_allowed("app"));
    assert!(!m.vhost_allowed("other"));
    let e = err("[mqtt]\nacl_default = \"maybe\"\n");
    assert_eq!(
        e,
        "config: mqtt.acl_default = \"maybe\": must be allow or deny"
    );
    let e = err("[mqtt]\nacl = [{ access = \"all\", filter = \"a/#/b\" }]\n");
    assert!(e.contains("mqtt.acl[0].filter = \"a/#/b\""), "{e}");
}

#[test]
fn small_profile_cuts_the_caches() {
    let mut s = Settings::default();
    s.small();
    assert_eq!(s.store.block_cache_bytes, 4 << 20);
    assert_eq!(s.store.write_buffer_bytes, 8 << 20);
    assert_eq!(s.store.tail_cache_bytes, 2 << 20);
    let r = s.rocks(std::path::Path::new("/tmp/x"));
    assert_eq!(r.write_buffer_bytes, 8 << 20);
    assert_eq!(r.tail_cache_bytes, 2 << 20);
}

#[test]
fn jetstream_settings_reach_the_backend() {
    let s = from_toml(
        "[store]\nbackend = \"jetstream\"\npath = \"/v\"\n[store.jetstream]\n\
         servers = [\"nats://a:4222\", \"nats://b:4222\"]\nstream = \"orders\"\n\
         node_id = \"gw7\"\nreplicas = 5\nlease_ttl = \"4s\"\nuser = \"u\"\npassword = \"p\"\n",
    )
    .unwrap();
    assert_eq!(s.store.backend, Backend::Jetstream);
    let j = s.jetstream(Path::new("/v"));
    assert_eq!(j.servers, ["nats://a:4222", "nats://b:4222"]);
    assert_eq!(
        (j.stream.as_str(), j.node_id.as_str(), j.replicas),
        ("orders", "gw7", 5)
    );
    assert_eq!(j.lease_ttl, std::time::Duration::from_secs(4));
    assert_eq!(j.user, Some(("u".into(), "p".into())));
    assert_eq!(j.token, None);
    assert_eq!(j.view.path, Path::new("/v"));
    // Defaults: one local server, stream "mqgate", 3 replicas, 10 s, the host name.
    let d = from_toml("[store]\nbackend = \"jetstream\"\n").unwrap();
    let j = d.jetstream(Path::new("/v"));
    assert_eq!(j.servers, ["nats://127.0.0.1:4222"]);
    assert_eq!((j.stream.as_str(), j.replicas), ("mqgate", 3));
    assert_eq!(j.lease_ttl, std::time::Duration::from_secs(10));
    assert!(!j.node_id.is_empty());
}

#[test]
fn cluster_settings_are_checked() {
    let s = from_toml(
        "[store]\nbackend = \"jetstream\"\n[cluster]\nshards = 8\nrelay_timeout = \"2s\"\n",
    )
    .unwrap();
    assert_eq!(s.cluster.shards, 8);
    assert_eq!(s.cluster.relay_timeout.get(), Duration::from_secs(2));
    assert_eq!(s.cluster.node_ttl.get(), Duration::from_secs(3));
    assert_eq!(
        Settings::load(None).unwrap().cluster.shards,
        0,
        "off by default"
    );
    let e = err("[cluster]\nshards = 8\n");
    assert!(
        e.contains("cluster.shards") && e.contains("jetstream"),
        "{e}"
    );
    let e = err("[store]\nbackend = \"jetstream\"\n[cluster]\nshards = 600\n");
    assert!(e.contains("at most 512"), "{e}");
    let e = err("[store]\nbackend = \"jetstream\"\n[cluster]\nshards = 4\nnode_ttl = \"100ms\"\n");
    assert!(e.contains("cluster.node_ttl"), "{e}");
    let e = err("[cluster]\nshard = 4\n");
    assert!(e.contains("shard"), "{e}");
}

#[test]
fn runtime_workers_one_per_core_unless_set() {
    let auto = Settings::load_with(None, Some(config::Map::new()))
        .unwrap()
        .runtime;
    assert_eq!(auto.workers(1), 1);
    assert_eq!(auto.workers(2), 2);
    assert_eq!(auto.workers(8), 8);
    let set = from_toml("[runtime]\nworkers = 4\n").unwrap().runtime;
    assert_eq!(set.workers(2), 4);
    assert!(err("[runtime]\nthreads = 4\n").contains("threads"));
    assert_eq!(auto.scheduler, Scheduler::PerCore);
    let stealing = from_toml("[runtime]\nscheduler = \"work-stealing\"\n")
        .unwrap()
        .runtime;
    assert_eq!(stealing.scheduler, Scheduler::WorkStealing);
    assert!(!auto.transparent_huge_pages, "off unless kept");
    let keep = from_toml("[runtime]\ntransparent_huge_pages = true\n")
        .unwrap()
        .runtime;
    assert!(keep.transparent_huge_pages);
    let e = err("[runtime]\nscheduler = \"fair\"\n");
    assert!(
        e.contains("runtime.scheduler") && e.contains("per-core or work-stealing"),
        "{e}"
    );
}
