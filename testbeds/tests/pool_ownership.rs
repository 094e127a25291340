//! A pool file has one owner: a second opener — the same vblockd under another spelling of
//! the path, a second vblockd, `vblock check --repair` — is refused with an error naming
//! the holder; `vblock check` reads without writing and refuses a served pool instead of
//! destroying what the daemon writes later.

use std::path::Path;
use std::process::Command;

use testbeds::daemon::{Daemon, workspace_binary};
use testbeds::scratch::Scratch;

fn start_vblockd(dir: &Path, extra: &[String]) -> Daemon {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    testbeds::daemon::start_vblockd(dir, &extra).unwrap()
}

/// Makes a new 64 MiB pool `name` at `file` through the daemon's API.
fn create_pool(d: &Daemon, name: &str, file: &Path) {
    let (status, body) = d
        .request(
            "POST",
            "/v1/pools",
            Some(&format!(
                r#"{{"name":"{name}","path":"{}","size":67108864}}"#,
                file.display()
            )),
        )
        .unwrap();
    assert_eq!(status, 201, "{body}");
}

fn crc(path: &Path) -> u32 {
    crc32fast::hash(&std::fs::read(path).unwrap())
}

fn check(path: &Path, repair: bool) -> (Option<i32>, String) {
    let mut cmd = Command::new(workspace_binary("vblock").unwrap());
    cmd.arg("check").arg(path);
    if repair {
        cmd.arg("--repair");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_pool_file_has_one_opener_under_any_path_and_in_any_process() {
    if let Some(why) = testbeds::netns::missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-pool-owner").unwrap();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let file = dir.join("p.pool");
    let a = start_vblockd(&dir.join("a"), &[]);
    create_pool(&a, "p", &file);
    // The same file again in the same daemon: through `..` and through a symlink.
    std::os::unix::fs::symlink(&file, dir.join("link.pool")).unwrap();
    for other in [dir.join("sub/../p.pool"), dir.join("link.pool")] {
        let (status, body) = a
            .request(
                "POST",
                "/v1/pools",
                Some(&format!(r#"{{"name":"q","path":"{}"}}"#, other.display())),
            )
            .unwrap();
        assert_eq!(status, 409, "{}: {body}", other.display());
        assert!(body.contains("it is pool p"), "{body}");
    }
    // A second vblockd: configured with it, it does not serve it; asked through its API, it
    // refuses and names the holder.
    let b = start_vblockd(
        &dir.join("b"),
        &["--pool".into(), format!("x={}", file.display())],
    );
    let (_, pools) = b.request("GET", "/v1/pools", None).unwrap();
    assert_eq!(pools.trim(), "[]", "{pools}");
    let (status, body) = b
        .request(
            "POST",
            "/v1/pools",
            Some(&format!(r#"{{"name":"y","path":"{}"}}"#, file.display())),
        )
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains(&format!("vblockd (pid {})", a.pid().unwrap())),
        "{body}"
    );
    // vblock check, with or without --repair, refuses a served pool and says how to check it.
    for repair in [false, true] {
        let (code, out) = check(&file, repair);
        assert_eq!(code, Some(2), "{out}");
        assert!(out.contains("vctl pool check"), "{out}");
    }
    // The daemon goes on: a volume made and written after those attempts survives its
    // restart.
    let (status, body) = a
        .request(
            "POST",
            "/v1/pools/p/volumes",
            Some(r#"{"name":"later","size":1048576}"#),
        )
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let mut a = a;
    assert!(a.terminate(), "vblockd shut down cleanly");
    let a = start_vblockd(&dir.join("a"), &[]);
    let (status, body) = a.request("GET", "/v1/pools/p/volumes/later", None).unwrap();
    assert_eq!(status, 200, "{body}");
    drop(a);
    drop(b);
}

#[test]
fn vblock_check_reads_without_writing() {
    if let Some(why) = testbeds::netns::missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-pool-check").unwrap();
    let file = dir.join("p.pool");
    let mut d = start_vblockd(dir.path(), &[]);
    create_pool(&d, "p", &file);
    d.request(
        "POST",
        "/v1/pools/p/volumes",
        Some(r#"{"name":"v","size":1048576}"#),
    )
    .unwrap();
    let (status, _) = d
        .request(
            "PUT",
            "/v1/pools/p/volumes/v/data?offset=0",
            Some(&"x".repeat(4096)),
        )
        .unwrap();
    assert_eq!(status, 204);
    // A crash: what was committed is in the journal, not yet folded into a checkpoint.
    d.request("POST", "/v1/pools/p/flush", None).unwrap();
    d.kill9();
    let before = crc(&file);
    for _ in 0..2 {
        let (code, out) = check(&file, false);
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("1 volumes"), "{out}");
        assert_eq!(crc(&file), before, "vblock check changed the pool file");
    }
    // --repair writes (it recovers the journal into a checkpoint) and says clean.
    let (code, out) = check(&file, true);
    assert_eq!(code, Some(0), "{out}");
    let d = start_vblockd(dir.path(), &[]);
    let (status, body) = d.request("GET", "/v1/pools/p/volumes/v", None).unwrap();
    assert_eq!(status, 200, "{body}");
}

/// A vblockd whose log goes to a file.
struct Logged {
    child: std::process::Child,
    log: std::path::PathBuf,
    socket: std::path::PathBuf,
}

impl Logged {
    fn start(dir: &Path, log: &str) -> Logged {
        let log = dir.join(log);
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(workspace_binary("vblockd").unwrap());
        cmd.arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        testbeds::daemon::tie_to_parent(&mut cmd);
        let child = cmd.spawn().unwrap();
        let socket = dir.join("run/vblockd.sock");
        testbeds::wait::until("vblockd's socket", testbeds::wait::SOON, || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        })
        .unwrap();
        Logged { child, log, socket }
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        testbeds::daemon::http(&self.socket, method, path, body).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, what: &str) {
        testbeds::wait::until(what, testbeds::wait::SOON, || self.log().contains(what))
            .unwrap_or_else(|e| panic!("{e}:\n{}", self.log()));
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn operators_see_recovery_connections_and_a_full_pool_in_logs_and_metrics() {
    if let Some(why) = testbeds::netns::missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-pool-logs").unwrap();
    let file = dir.join("p.pool");
    let d = Logged::start(dir.path(), "first.log");
    let (status, body) = d.request(
        "POST",
        "/v1/pools",
        Some(&format!(
            r#"{{"name":"p","path":"{}","size":67108864}}"#,
            file.display()
        )),
    );
    assert_eq!(status, 201, "{body}");
    d.request(
        "POST",
        "/v1/pools/p/volumes",
        Some(r#"{"name":"v","size":268435456}"#),
    );
    d.request(
        "PUT",
        "/v1/pools/p/volumes/v/data?offset=0",
        Some(&"x".repeat(4096)),
    );
    d.request("POST", "/v1/pools/p/flush", None);
    drop(d); // SIGKILL: the committed transactions stay in the journal
    let d = Logged::start(dir.path(), "second.log");
    d.wait_log("journal replayed");
    assert!(d.log().contains("pool=p"), "{}", d.log());
    // An NBD client: who, which volume, how it ended.
    let uri = format!(
        "nbd+unix:///v?socket={}",
        dir.join("run/nbd.sock").display()
    );
    let read = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", &uri])
        .output()
        .unwrap();
    assert!(read.status.success(), "{read:?}");
    d.wait_log("NBD client disconnected");
    assert!(
        d.log().lines().any(|l| l.contains("NBD client connected")
            && l.contains("volume=p/v")
            && l.contains("pid")),
        "{}",
        d.log()
    );
    // Filling the pool (64 MiB) through a 256 MiB volume: the writes past it fail with
    // ENOSPC; the log says so once, the metrics count every refusal.
    let fill = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 0 128M", &uri])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&fill.stdout),
        String::from_utf8_lossy(&fill.stderr)
    );
    assert!(said.contains("No space left"), "{said}");
    d.wait_log("pool full");
    assert_eq!(d.log().matches("pool full").count(), 1, "{}", d.log());
    let (_, metrics) = d.request("GET", "/metrics", None);
    let refused: u64 = metrics
        .lines()
        .find(|l| l.starts_with("vblock_pool_no_space_writes_total{pool=\"p\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(refused >= 1, "{metrics}");
}

/// A small tmpfs at `dir`, unmounted on drop (even when the test fails).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: std::path::PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "lv-test"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {}", dir.display());
        Tmpfs(dir)
    }

    /// Fills the file system (a file of zeros until there is no space left).
    fn fill(&self) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M"])
            .arg(format!("of={}", self.0.join("fill").display()))
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn free(&self) {
        let _ = std::fs::remove_file(self.0.join("fill"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn metadata_changes_on_a_full_file_system_fail_without_a_trace() {
    if let Some(why) = testbeds::netns::missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-pool-full").unwrap();
    let fs = Tmpfs::mount(dir.join("fs"), "48m");
    let mut d = start_vblockd(dir.path(), &[]);
    let post = |d: &Daemon, path: &str, body: String| d.request("POST", path, Some(&body)).unwrap();
    // A pool file with holes where nothing was written yet (its journal): made on the disk,
    // closed, copied sparse onto the small file system, opened there.
    let orig = dir.join("orig.pool");
    let (status, body) = post(
        &d,
        "/v1/pools",
        format!(
            r#"{{"name":"orig","path":"{}","size":33554432}}"#,
            orig.display()
        ),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(d.request("DELETE", "/v1/pools/orig", None).unwrap().0, 204);
    let sparse = fs.0.join("p.pool");
    let copied = Command::new("cp")
        .arg("--sparse=always")
        .arg(&orig)
        .arg(&sparse)
        .status()
        .unwrap();
    assert!(copied.success());
    let (status, body) = post(
        &d,
        "/v1/pools",
        format!(r#"{{"name":"p","path":"{}"}}"#, sparse.display()),
    );
    assert_eq!(status, 201, "{body}");
    // The file system fills up: a create and a snapshot fail, and leave nothing.
    fs.fill();
    let (status, body) = post(
        &d,
        "/v1/pools/p/volumes",
        r#"{"name":"v","size":1048576}"#.into(),
    );
    assert_eq!(status, 507, "{body}");
    assert!(body.contains("No space left"), "{body}");
    assert_eq!(
        d.request("GET", "/v1/pools/p/volumes/v", None).unwrap().0,
        404
    );
    fs.free();
    let (status, body) = post(
        &d,
        "/v1/pools/p/volumes",
        r#"{"name":"v","size":1048576}"#.into(),
    );
    assert_eq!(status, 201, "the retry: {body}");
    fs.fill();
    let (status, body) = post(
        &d,
        "/v1/pools/p/snapshots",
        r#"{"source":"v","name":"s"}"#.into(),
    );
    assert_eq!(status, 507, "{body}");
    assert_eq!(
        d.request("GET", "/v1/pools/p/volumes/s", None).unwrap().0,
        404
    );
    // A delete, a resize and new limits fail the same way: the volume is still there,
    // its size and limits as they were.
    let (status, body) = d.request("DELETE", "/v1/pools/p/volumes/v", None).unwrap();
    assert_eq!(status, 507, "{body}");
    let (status, body) = post(
        &d,
        "/v1/pools/p/volumes/v/resize",
        r#"{"size":2097152}"#.into(),
    );
    assert_eq!(status, 507, "{body}");
    let (status, body) = d
        .request(
            "PUT",
            "/v1/pools/p/volumes/v/qos",
            Some(r#"{"iops":100,"bps":0}"#),
        )
        .unwrap();
    assert_eq!(status, 507, "{body}");
    let (status, body) = d.request("GET", "/v1/pools/p/volumes/v", None).unwrap();
    assert_eq!(status, 200, "the failed delete took the volume: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["size"], 1048576, "{body}");
    assert_eq!(v["qos"]["iops"], 0, "{body}");
    fs.free();
    // After a restart: what succeeded is there, what failed is not.
    assert!(d.terminate());
    let d = start_vblockd(dir.path(), &[]);
    let (_, list) = d.request("GET", "/v1/pools/p/volumes", None).unwrap();
    let names: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&list)
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec!["v".to_owned()], "{list}");
    let v: &serde_json::Value = &serde_json::from_str::<Vec<serde_json::Value>>(&list).unwrap()[0];
    assert_eq!(v["size"], 1048576, "{list}");
    assert_eq!(v["qos"]["iops"], 0, "{list}");
    drop(d);
}

#[test]
fn space_settings_and_growth_are_live_checked_and_kept() {
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-pool-space").unwrap();
    let d = start_vblockd(dir.path(), &[]);
    let file = dir.join("p.pool");
    create_pool(&d, "p", &file);
    let show = |d: &Daemon| -> serde_json::Value {
        let (status, body) = d.request("GET", "/v1/pools/p", None).unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let before = show(&d);
    assert_eq!(before["space"]["when_full"], "error", "{before}");
    assert_eq!(
        before["used"].as_u64().unwrap() + before["free"].as_u64().unwrap(),
        before["capacity"].as_u64().unwrap(),
        "{before}"
    );
    // Bad settings and a shrink are refused and change nothing.
    for body in [
        r#"{"when_full":"queue","queue_timeout":0}"#,
        r#"{"when_full":"sometimes"}"#,
    ] {
        let (status, answer) = d.request("PUT", "/v1/pools/p/space", Some(body)).unwrap();
        assert_eq!(status, 400, "{body}: {answer}");
    }
    let (status, answer) = d
        .request("POST", "/v1/pools/p/resize", Some(r#"{"size":1048576}"#))
        .unwrap();
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("only grow"), "{answer}");
    assert_eq!(show(&d), before);
    // Set with vctl, grown with the API: both live, both kept across a restart.
    let vctl = Command::new(workspace_binary("vctl").unwrap())
        .arg("--socket")
        .arg(dir.join("run/vblockd.sock"))
        .args([
            "pool",
            "space",
            "p",
            "--when-full",
            "queue",
            "--queue-timeout",
            "30",
            "--low-water",
            "1M",
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&vctl.stdout);
    assert!(
        vctl.status.success(),
        "{}",
        String::from_utf8_lossy(&vctl.stderr)
    );
    assert!(table.contains("queue 30s"), "{table}");
    let (status, answer) = d
        .request("POST", "/v1/pools/p/resize", Some(r#"{"size":134217728}"#))
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let grown = show(&d);
    assert!(
        grown["capacity"].as_u64() > before["capacity"].as_u64(),
        "{grown}"
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 128 << 20);
    drop(d);
    let d = start_vblockd(dir.path(), &[]);
    let after = show(&d);
    assert_eq!(after["capacity"], grown["capacity"], "{after}");
    assert_eq!(after["space"]["when_full"], "queue", "{after}");
    assert_eq!(after["space"]["queue_timeout"], 30, "{after}");
    assert_eq!(after["space"]["low_water"], 1 << 20, "{after}");
}
