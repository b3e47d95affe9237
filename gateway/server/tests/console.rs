//! The web console in a real browser: `tests/console/browser.py` drives headless
//! Chromium with Selenium against a broker started here (the console files built into
//! the binary), logs in, opens every page and uses its controls (a queue's backlog
//! growing, a group reset, a DLQ resend, a delayed message cancelled, a connection
//! closed), and fails on an error shown by a page or logged by the browser.
//!
//! Needs Chromium and chromedriver (Debian's `chromium` and `chromium-driver`: installed
//! with apt-get when missing and the test runs as root) and python3 with `venv`. The
//! Python packages (`tests/console/requirements.txt`, pinned with hashes) are installed
//! once into `<target>/console-venv`. Screenshots of each page go to
//! `<target>/console-screenshots`, with the script's log (`browser.log`).

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::Broker;

const REQUIREMENTS: &str = include_str!("console/requirements.txt");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/console/browser.py");
/// A screenshot each: `<page>.png`.
const PAGES: &[&str] = &[
    "login",
    "overview",
    "topics",
    "groups",
    "group",
    "dlq",
    "delayed",
    "connections",
    "cluster",
];
const TIMEOUT: Duration = Duration::from_secs(180);

/// `target/` (the parent of the profile folder holding the binary).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_mqgate"))
        .parent()
        .and_then(Path::parent)
        .expect("the mqgate binary sits in <target>/<profile>/")
        .to_path_buf()
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn find_browser() -> Option<(PathBuf, PathBuf)> {
    let browser = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| on_path("chromium"))
        .or_else(|| on_path("chromium-browser"))?;
    let driver = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| on_path("chromedriver"))?;
    Some((browser, driver))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn apt_get(args: &[&str]) -> bool {
    Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Chromium and chromedriver, installed from Debian's packages when missing (as root).
fn ensure_browser() -> (PathBuf, PathBuf) {
    if let Some(found) = find_browser() {
        return found;
    }
    assert!(
        is_root(),
        "the console test needs Chromium and chromedriver: install them \
         (Debian: sudo apt-get install chromium chromium-driver), or point CHROMIUM and \
         CHROMEDRIVER at them"
    );
    eprintln!(
        "console test: Chromium or chromedriver is missing; installing Debian's chromium and \
         chromium-driver with apt-get (running as root)"
    );
    if !apt_get(&["install", "-y", "-q", "chromium", "chromium-driver"]) {
        // A machine whose package lists were never fetched.
        assert!(apt_get(&["update", "-q"]), "apt-get update failed");
        assert!(
            apt_get(&["install", "-y", "-q", "chromium", "chromium-driver"]),
            "apt-get install chromium chromium-driver failed"
        );
    }
    find_browser().expect("chromium and chromedriver are still not on PATH after apt-get install")
}

/// `<target>/console-venv` with the pinned packages, made once: built in a folder of its
/// own and renamed into place, so concurrent runs never see half an install.
fn python() -> PathBuf {
    let target = target_dir();
    let dir = target.join("console-venv");
    let ready = |d: &Path| {
        d.join("bin/python").exists()
            && fs::read_to_string(d.join("requirements.txt")).is_ok_and(|r| r == REQUIREMENTS)
    };
    if ready(&dir) {
        return dir.join("bin/python");
    }
    let tmp = target.join(format!("console-venv.{}.tmp", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    eprintln!(
        "console test: installing selenium and pika (tests/console/requirements.txt) into {}",
        dir.display()
    );
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&tmp)
        .output()
        .unwrap_or_else(|e| panic!("the console test needs python3: {e}"));
    assert!(
        out.status.success(),
        "python3 -m venv failed (Debian: apt-get install python3-venv):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let req = tmp.join("requirements.txt");
    fs::write(&req, REQUIREMENTS).expect("write the requirements into the venv");
    let out = Command::new(tmp.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--require-hashes",
            "-r",
        ])
        .arg(&req)
        .output()
        .expect("run pip");
    if !out.status.success() {
        let _ = fs::remove_dir_all(&tmp);
        panic!(
            "pip install --require-hashes -r tests/console/requirements.txt failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Another run may have finished first: keep its venv. An outdated one is replaced.
    if !ready(&dir) {
        let _ = fs::remove_dir_all(&dir);
        if fs::rename(&tmp, &dir).is_err() && !ready(&dir) {
            panic!("could not move {} to {}", tmp.display(), dir.display());
        }
    }
    let _ = fs::remove_dir_all(&tmp);
    assert!(ready(&dir), "no venv at {}", dir.display());
    dir.join("bin/python")
}

/// Wait for `child` at most `limit`; past it, kill its whole process group (the browser
/// and its driver too) and answer None.
fn wait_or_kill(child: &mut std::process::Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for browser.py") {
            return Some(status);
        }
        if start.elapsed() > limit {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn console_pages_work_in_a_real_browser() {
    let (browser, driver) = ensure_browser();
    let python = python();
    let shots = target_dir().join("console-screenshots");
    fs::create_dir_all(&shots).expect("create the screenshots folder");
    for entry in fs::read_dir(&shots)
        .expect("read the screenshots folder")
        .flatten()
    {
        if entry.path().extension().is_some_and(|x| x == "png") {
            let _ = fs::remove_file(entry.path());
        }
    }
    let log_path = shots.join("browser.log");
    let log = fs::File::create(&log_path).expect("create browser.log");

    let b = Broker::start();
    let start = Instant::now();
    let mut child = Command::new(&python)
        .arg(SCRIPT)
        .env("MQGATE_ADMIN_URL", b.admin_url())
        .env("MQGATE_AMQP_URL", b.amqp_url())
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", &browser)
        .env("CHROMEDRIVER", &driver)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("run {} {SCRIPT}: {e}", python.display()));
    let status = wait_or_kill(&mut child, TIMEOUT);
    let took = start.elapsed();
    let out = fs::read_to_string(&log_path).unwrap_or_default();
    eprintln!("browser.py ({took:.1?}):\n{out}");
    let status = status.unwrap_or_else(|| {
        panic!(
            "browser.py did not finish in {TIMEOUT:?}: killed (log: {})",
            log_path.display()
        )
    });
    assert!(
        status.success(),
        "browser.py failed ({status}); screenshots and browser.log in {}",
        shots.display()
    );
    for page in PAGES {
        let png = shots.join(format!("{page}.png"));
        assert!(
            fs::metadata(&png).is_ok_and(|m| m.len() > 0),
            "no screenshot of the {page} page at {}",
            png.display()
        );
    }
    eprintln!("console test: screenshots in {}", shots.display());
}
