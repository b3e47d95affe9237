//! The `mqgate` binary as a newcomer meets it: help, bad flags and bad configuration get
//! one line saying why; environment variables override the file.

use std::process::Command;

fn mqgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mqgate"));
    c.env_remove("RUST_BACKTRACE").env("RUST_LOG", "error");
    for (k, _) in std::env::vars() {
        if k.starts_with("MQGATE__") {
            c.env_remove(k);
        }
    }
    c
}

fn run(c: &mut Command) -> (bool, String, String) {
    let out = c.output().expect("run mqgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_the_subcommands() {
    let (ok, out, _) = run(mqgate().arg("--help"));
    assert!(ok);
    for sub in ["serve", "hash-password"] {
        assert!(out.contains(sub), "{sub} missing from --help:\n{out}");
    }
    let (ok, out, _) = run(mqgate().args(["serve", "--help"]));
    assert!(ok);
    assert!(
        out.contains("--config") && out.contains("--memory"),
        "{out}"
    );
}

#[test]
fn a_wrong_flag_is_refused() {
    let (ok, _, err) = run(mqgate().args(["serve", "--bogus"]));
    assert!(!ok);
    assert!(err.contains("unexpected argument '--bogus'"), "{err}");
}

#[test]
fn a_bad_config_gets_one_line_with_key_value_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[store]\nbackend = \"disk\"\n",
            "store.backend = \"disk\": must be rocksdb, jetstream or memory",
        ),
        ("[store]\nbakend = \"memory\"\n", "unknown field `bakend`"),
        (
            "[limits]\namqp_frame_max = \"big\"\n",
            "limits.amqp_frame_max",
        ),
        (
            "[listeners]\nmqtt = \"everywhere\"\n",
            "listeners.mqtt = \"everywhere\": must be host:port",
        ),
        (
            "[retry]\namqp_default_policy = \"always\"\n",
            "retry.amqp_default_policy",
        ),
        ("not toml at all [", "config:"),
    ];
    for (i, (toml, want)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&p, toml).unwrap();
        let (ok, _, err) = run(mqgate()
            .args(["serve", "--check-config", "--config"])
            .arg(&p));
        assert!(!ok, "{toml} accepted");
        assert!(err.contains(want), "{toml}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
    let (ok, _, err) = run(mqgate().args(["serve", "--config", "/nonexistent/mqgate.toml"]));
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn environment_overrides_the_file_and_flags_override_both() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.toml");
    std::fs::write(
        &p,
        "[listeners]\nmqtt = \"127.0.0.1:1111\"\namqp = \"127.0.0.1:2222\"\n",
    )
    .unwrap();
    let (ok, out, err) = run(mqgate()
        .env("MQGATE__LISTENERS__MQTT", "127.0.0.1:3333")
        .env("MQGATE__STORE__BACKEND", "memory")
        .args([
            "serve",
            "--check-config",
            "--amqp",
            "127.0.0.1:4444",
            "--config",
        ])
        .arg(&p));
    assert!(ok, "{err}");
    assert!(out.contains("mqtt: 127.0.0.1:3333"), "{out}");
    assert!(out.contains("amqp: 127.0.0.1:4444"), "{out}");
    assert!(out.contains("store: memory"), "{out}");
}

/// The worker threads: one per core by default, `runtime.workers` when set; a runtime
/// of their own each unless `runtime.scheduler` says work-stealing.
#[test]
fn runtime_workers_default_to_one_per_core() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let (ok, out, err) = run(mqgate().args(["serve", "--check-config"]));
    assert!(ok, "{err}");
    let want = format!("runtime: workers = {cores} (cores: {cores}), scheduler = per-core");
    assert!(out.contains(&want), "{out}");
    let (ok, out, err) = run(mqgate()
        .env("MQGATE__RUNTIME__WORKERS", "3")
        .env("MQGATE__RUNTIME__SCHEDULER", "work-stealing")
        .args(["serve", "--check-config"]));
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "runtime: workers = 3 (cores: {cores}), scheduler = work-stealing"
        )),
        "{out}"
    );
}

#[test]
fn the_shipped_example_checks() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mqgate.toml");
    let (ok, out, err) = run(mqgate()
        .args(["serve", "--check-config", "--config"])
        .arg(&p));
    assert!(ok, "{err}");
    assert!(out.contains("configuration is valid"));
}

#[test]
fn hash_password_output_is_accepted_by_the_config() {
    let (ok, hash, _) = run(mqgate().args(["hash-password", "s3cret"]));
    assert!(ok);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.toml");
    std::fs::write(
        &p,
        format!(
            "[[users]]\nname = \"ops\"\npassword_hash = \"{}\"\ntags = [\"administrator\"]\n",
            hash.trim()
        ),
    )
    .unwrap();
    let (ok, _, err) = run(mqgate()
        .args(["serve", "--check-config", "--config"])
        .arg(&p));
    assert!(ok, "{err}");
}
