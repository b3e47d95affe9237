//! A Celery app and Flower through mqgate: `tests/celery/scenario.py` starts a worker
//! (prefork, 2 processes), runs 50 tasks, a task that retries itself twice and a task
//! with `countdown=3` (result backend `rpc://`), then starts Flower with `--broker_api`
//! on the admin listener and checks its broker page shows the `celery` queue with its
//! counts: empty with the worker consuming, 20 messages waiting with no worker, empty
//! again once a new worker ran them.
//!
//! Celery and Flower come from `tests/celery/requirements.txt` (every package pinned by
//! hash), installed once into a venv at `target/celery-venv` with `python3 -m venv` and
//! pip, reused while the requirements are the same.
//!
//! Against RabbitMQ itself, to check that the scenario encodes what RabbitMQ does:
//! `MQGATE_ADMIN_URL=http://127.0.0.1:15672 MQGATE_AMQP_URL=amqp://guest:guest@127.0.0.1:5672//
//! cargo test -p mqgate-server --test celery` (RabbitMQ 3.10 from Debian with its
//! management plugin).

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const REQUIREMENTS: &str = include_str!("celery/requirements.txt");
/// Written into the venv once every package is in: its content is the requirements the
/// venv was made from. A venv without it (an install that died) is made again.
const STAMP: &str = "mqgate-requirements.txt";
/// The whole scenario (about 15 s on mqgate, 30 s on RabbitMQ, whose counts lag 5 s).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);

fn celery_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/celery")
}

/// target/<profile>/mqgate -> target/
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_mqgate"))
        .parent()
        .and_then(Path::parent)
        .map_or_else(std::env::temp_dir, Path::to_path_buf)
}

fn venv_ready(venv: &Path) -> bool {
    venv.join("bin/python").exists()
        && std::fs::read_to_string(venv.join(STAMP)).is_ok_and(|s| s == REQUIREMENTS)
}

/// The venv's python, making the venv first if it is missing or out of date. One test
/// process at a time installs: it holds `celery-venv.lock` (created exclusively, holding
/// its pid); the others wait for the stamp. A lock whose process is gone, or older than
/// 20 minutes, is taken over.
fn venv_python() -> PathBuf {
    let target = target_dir();
    let venv = target.join("celery-venv");
    let lock = target.join("celery-venv.lock");
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if venv_ready(&venv) {
            return venv.join("bin/python");
        }
        std::fs::create_dir_all(&target).expect("create the target folder");
        match OpenOptions::new().write(true).create_new(true).open(&lock) {
            Ok(mut f) => {
                let _held = RemoveOnDrop(lock.clone());
                let _ = write!(f, "{}", std::process::id());
                drop(f);
                make_venv(&venv);
                return venv.join("bin/python");
            }
            Err(_) if lock_stale(&lock) => {
                eprintln!("celery test: taking over a stale {}", lock.display());
                let _ = std::fs::remove_file(&lock);
            }
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "{} is still held after 15 minutes",
                    lock.display()
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Removes the lock file when the installer is done, or panicked.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn lock_stale(lock: &Path) -> bool {
    let holder_gone = std::fs::read_to_string(lock)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .is_some_and(|pid| {
            Path::new("/proc").exists() && !Path::new(&format!("/proc/{pid}")).exists()
        });
    let old = std::fs::metadata(lock)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > Duration::from_secs(1200));
    holder_gone || old
}

/// Run a setup command; its stderr when it fails.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A new venv at `venv` with the pinned Celery and Flower (the caller holds the lock).
/// `python3 -m venv` needs ensurepip, which Debian ships apart (python3-venv): without
/// it the venv is made `--without-pip` and the host's pip installs into it.
fn make_venv(venv: &Path) {
    let _ = std::fs::remove_dir_all(venv);
    eprintln!(
        "celery test: installing Celery and Flower (tests/celery/requirements.txt) into {}",
        venv.display()
    );
    let python = venv.join("bin/python");
    let req = celery_dir().join("requirements.txt");
    let pip_args = [
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        "--require-hashes",
        "-r",
    ];
    let with_pip = run(Command::new("python3").args(["-m", "venv"]).arg(venv));
    let installed = match with_pip {
        Ok(()) => run(Command::new(&python)
            .args(["-m", "pip"])
            .args(pip_args)
            .arg(&req)),
        Err(venv_err) => {
            eprintln!("celery test: python3 -m venv failed, trying --without-pip:\n{venv_err}");
            let _ = std::fs::remove_dir_all(venv);
            run(Command::new("python3")
                .args(["-m", "venv", "--without-pip"])
                .arg(venv))
            .and_then(|()| {
                run(Command::new("python3")
                    .args(["-m", "pip", "--python"])
                    .arg(&python)
                    .args(pip_args)
                    .arg(&req))
            })
            .map_err(|e| {
                format!(
                    "{e}\n(the celery test needs python3 >= 3.8 with its venv module and pip: \
                     apt-get install python3-venv python3-pip)\nfirst try: {venv_err}"
                )
            })
        }
    };
    if let Err(e) = installed {
        let _ = std::fs::remove_dir_all(venv);
        panic!("making the Celery venv failed: {e}");
    }
    // The stamp goes in last, whole (written aside, then renamed): a venv has it only
    // once every package is installed.
    let tmp = venv.join(format!("{STAMP}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, REQUIREMENTS).expect("write the venv's stamp");
    std::fs::rename(&tmp, venv.join(STAMP)).expect("rename the venv's stamp");
}

#[test]
fn celery_worker_retries_countdown_and_flower_broker_tab() {
    let python = venv_python();
    // mqgate on free ports, or the broker the environment names (RabbitMQ, to compare).
    let (broker, amqp_url, admin_url) = match (
        std::env::var("MQGATE_AMQP_URL"),
        std::env::var("MQGATE_ADMIN_URL"),
    ) {
        (Ok(amqp), Ok(admin)) => (None, amqp, admin),
        _ => {
            let b = common::Broker::start();
            let (amqp, admin) = (b.amqp_url(), b.admin_url());
            (Some(b), amqp, admin)
        }
    };
    let logs = tempfile::tempdir().expect("tempdir");
    let out_path = logs.path().join("scenario.out");
    let out = std::fs::File::create(&out_path).expect("create the scenario's output file");
    let started = Instant::now();
    let mut child = Command::new(&python)
        .arg("scenario.py")
        .current_dir(celery_dir())
        .env("MQGATE_AMQP_URL", &amqp_url)
        .env("MQGATE_ADMIN_URL", &admin_url)
        .env("MQGATE_CELERY_LOGS", logs.path().join("logs"))
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("output handle"))
        .stderr(out)
        .spawn()
        .expect("start scenario.py");
    // The scenario's worker and Flower get SIGTERM when it dies (PR_SET_PDEATHSIG), so a
    // SIGKILL on timeout leaves nothing behind.
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for scenario.py") {
            break Some(s);
        }
        if started.elapsed() > SCENARIO_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    println!("{output}");
    drop(broker);
    match status {
        None => panic!(
            "scenario.py did not finish within {} s; its output:\n{output}",
            SCENARIO_TIMEOUT.as_secs()
        ),
        Some(s) => assert!(
            s.success(),
            "scenario.py failed ({s}) in {:.1} s; its output:\n{output}",
            started.elapsed().as_secs_f64()
        ),
    }
}
