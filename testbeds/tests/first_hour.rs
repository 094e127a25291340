//! What a newcomer meets in the first hour, against real daemons: names follow one rule,
//! mistakes come back as 4xx with a message that says what to do, local file errors and
//! unreachable or root-only sockets are explained, startup errors are one line (no
//! backtrace), logs in files carry no colour codes, a closed pipe ends vctl quietly, the CNI
//! plugin answers VERSION without a configuration, and the help says what the flags are.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use testbeds::daemon::{Daemon, start_vswitchd, workspace_binary};
use testbeds::netns::{Netns, missing_privileges};
use testbeds::scratch::Scratch;
use testbeds::switch_bed::Underlay;

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Bed {
    dir: Scratch,
    _ul: Underlay,
    host: Netns,
    vswitchd: Daemon,
    vblockd: Option<Daemon>,
}

impl Bed {
    fn new(role: &str, with_vblockd: bool) -> Bed {
        if let Some(why) = missing_privileges() {
            panic!("needs root: {why}");
        }
        let dir = Scratch::new(Path::new("/var/tmp"), role).unwrap();
        let mut ul = Underlay::new().unwrap();
        let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
        let vswitchd =
            start_vswitchd(&host, "198.18.0.1".parse().unwrap(), dir.path(), &[]).unwrap();
        let vblockd = with_vblockd.then(|| {
            let args: Vec<String> = [
                "--run-dir".into(),
                dir.join("run").display().to_string(),
                "--state-dir".into(),
                dir.join("state").display().to_string(),
            ]
            .to_vec();
            Daemon::start_local(
                &workspace_binary("vblockd").unwrap(),
                &args,
                dir.join("run/vblockd.sock"),
            )
            .unwrap()
        });
        Bed {
            dir,
            _ul: ul,
            host,
            vswitchd,
            vblockd,
        }
    }

    /// Runs vctl with the bed's sockets (`net` and `status` get vswitchd's, the rest
    /// vblockd's).
    fn vctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(workspace_binary("vctl").unwrap());
        if args[0] == "status" {
            cmd.args(args).args([
                "--vswitchd-socket",
                &self.dir.join("run/vswitchd.sock").display().to_string(),
                "--vblockd-socket",
                &self.dir.join("run/vblockd.sock").display().to_string(),
            ]);
        } else {
            let daemon = if args[0] == "net" {
                "vswitchd"
            } else {
                "vblockd"
            };
            // The socket before the command: a global option is taken anywhere.
            cmd.arg("--socket")
                .arg(self.dir.join(format!("run/{daemon}.sock")))
                .args(args);
        }
        cmd.output().unwrap()
    }
}

#[test]
fn every_name_follows_one_rule_and_is_never_printed_raw() {
    let bed = Bed::new("lv-first-names", true);
    let pool = bed.dir.join("p.pool").display().to_string();
    let ok = bed.vctl(&["pool", "create", "default", &pool, "--size", "64M"]);
    assert!(ok.status.success(), "{:?}", text(&ok));
    for bad in [
        "bad name/x",
        "x?y#z",
        "a\nb",
        "a\u{1b}[31mred",
        "..",
        "_a",
        "é",
    ] {
        for args in [
            vec!["net", "tenant", "create", bad, "--vni", "7"],
            vec!["volume", "create", bad, "--size", "1M"],
            vec!["pool", "create", bad, &pool],
        ] {
            let out = bed.vctl(&args);
            let (stdout, stderr) = text(&out);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stdout} {stderr}");
            assert!(
                stderr.contains("1 to 64 characters of A-Z a-z 0-9 _ . - @"),
                "{args:?}: {stderr}"
            );
            assert!(
                !stderr.contains('\u{1b}') && stderr.lines().count() == 1,
                "{args:?}: printed raw: {stderr:?}"
            );
        }
    }
    // Nothing of them was made: the lists hold only what was made right.
    let tenants = bed.vctl(&["net", "-o", "json", "tenant", "list"]);
    assert_eq!(text(&tenants).0.trim(), "[]");
    let volumes = bed.vctl(&["volume", "-o", "json", "list"]);
    assert_eq!(text(&volumes).0.trim(), "[]");
    // Snapshot names with '@' are names like any other.
    assert!(
        bed.vctl(&["volume", "create", "golden", "--size", "1M"])
            .status
            .success()
    );
    let snap = bed.vctl(&["snapshot", "create", "golden", "golden@v1"]);
    assert!(snap.status.success(), "{:?}", text(&snap));
    // The daemon refuses a bad name in the path itself too (the client encodes it).
    let (status, body) = bed
        .vswitchd
        .request("POST", "/v1/tenants", Some(r#"{"name":"a b","vni":9}"#))
        .unwrap();
    assert_eq!(status, 400, "{body}");
}

#[test]
fn user_mistakes_are_4xx_with_a_message_that_says_what_to_do() {
    let bed = Bed::new("lv-first-mistakes", true);
    let vblockd = bed.vblockd.as_ref().unwrap();
    let call = |body: &str| vblockd.request("POST", "/v1/pools", Some(body)).unwrap();
    // A pool in a directory that does not exist.
    let (status, body) = call(r#"{"name":"p","path":"/nonexistent/dir/p.pool","size":67108864}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("does not exist"), "{body}");
    // Sizes that cannot hold a pool: refused before any file is made.
    let path = bed.dir.join("small.pool");
    for size in ["0", "1000", "9223372036854775808", "18446744073709551615"] {
        let (status, body) = call(&format!(
            r#"{{"name":"p","path":"{}","size":{size}}}"#,
            path.display()
        ));
        assert_eq!(status, 400, "size {size}: {body}");
        assert!(!path.exists(), "size {size} left a file behind");
    }
    // A relative path would depend on the daemon's working directory.
    let (status, body) = call(r#"{"name":"p","path":"p.pool","size":67108864}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("absolute"), "{body}");
    // A file that is not a pool.
    let not_a_pool = bed.dir.join("hostname");
    std::fs::write(&not_a_pool, "myhost\n").unwrap();
    let (status, body) = call(&format!(
        r#"{{"name":"p","path":"{}"}}"#,
        not_a_pool.display()
    ));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a vblock pool"), "{body}");
    // A volume size the store refuses: one code, said once.
    let pool = bed.dir.join("p.pool").display().to_string();
    assert!(
        bed.vctl(&["pool", "create", "default", &pool, "--size", "64M"])
            .status
            .success()
    );
    let out = bed.vctl(&["volume", "create", "v", "--size", "1000"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("vctl: invalid: "), "{stderr}");
    assert!(!stderr.contains("invalid: invalid"), "{stderr}");
    // A local file that is missing is named as such, not as an answer of the daemon.
    let out = bed.vctl(&["volume", "import", "v", "/nonexistent/disk.raw"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/disk.raw") && !stderr.contains("unexpected answer"),
        "{stderr}"
    );
    // A TAP port whose interface name is taken in the namespace: a conflict, not a failure
    // of the daemon.
    assert!(
        bed.vctl(&["net", "tenant", "create", "a", "--vni", "7"])
            .status
            .success()
    );
    let ct = Netns::create("ct").unwrap();
    ct.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "other",
    ])
    .unwrap();
    let netns = format!("/run/netns/{}", ct.name());
    for kind in ["tap", "veth"] {
        let out = bed.vctl(&[
            "net", "port", "create", "p1", "--tenant", "a", "--kind", kind, "--netns", &netns,
            "--ifname", "eth0",
        ]);
        let (_, stderr) = text(&out);
        assert!(
            stderr.contains("conflict") && stderr.contains("(HTTP 409)"),
            "{kind}: {stderr}"
        );
    }
    // JSON without a content-type (what `curl -d` sends) is taken as JSON.
    let curl = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--unix-socket"])
        .arg(bed.dir.join("run/vswitchd.sock"))
        .args([
            "-X",
            "POST",
            "-d",
            r#"{"name":"b","vni":8}"#,
            "http://localhost/v1/tenants",
        ])
        .output()
        .unwrap();
    assert!(curl.status.success(), "{:?}", text(&curl));
}

#[test]
fn status_shows_what_it_reaches_and_names_what_it_does_not() {
    let bed = Bed::new("lv-first-status", false);
    assert!(
        bed.vctl(&["net", "tenant", "create", "a", "--vni", "7"])
            .status
            .success()
    );
    let out = bed.vctl(&["status"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout} {stderr}");
    assert!(
        stdout.contains("TENANTS") && stdout.contains("a "),
        "{stdout}"
    );
    assert!(
        stdout.contains("vblockd cannot be reached") && stderr.contains("vblockd"),
        "{stdout} {stderr}"
    );
    let json = bed.vctl(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(
        v["unreachable"][0].as_str().unwrap().starts_with("vblockd"),
        "{v}"
    );
    // A user who is not root is told why the socket refuses them.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(workspace_binary("vctl").unwrap())
        .arg("--socket")
        .arg(bed.dir.join("run/vswitchd.sock"))
        .args(["net", "tenant", "list"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("root"), "{stderr}");
    let _ = &bed.host;
}

#[test]
fn startup_errors_are_one_line_and_file_logs_are_plain() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-first-start").unwrap();
    // A bad configuration with RUST_BACKTRACE set: a message, no backtrace.
    let config = dir.join("bad.toml");
    std::fs::write(&config, "underlay = [\"198.18.0.1\"]\nno_such_key = 1\n").unwrap();
    for daemon in ["vswitchd", "vblockd"] {
        let out = Command::new(workspace_binary(daemon).unwrap())
            .arg("--config")
            .arg(&config)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{daemon}: {stderr}");
        assert!(
            stderr.starts_with(&format!("{daemon}: error: ")) && !stderr.contains("backtrace"),
            "{daemon}: {stderr}"
        );
    }
    // Logs written to a file: no ANSI colour codes.
    let log = std::fs::File::create(dir.join("vblockd.log")).unwrap();
    let mut child = Command::new(workspace_binary("vblockd").unwrap())
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(dir.join("vblockd.log")).unwrap_or_default();
    let ready = testbeds::wait::until("vblockd's ready line", testbeds::wait::SOON, || {
        read().contains("ready")
    });
    let _ = child.kill();
    let _ = child.wait();
    ready.unwrap();
    assert!(!read().contains('\u{1b}'), "{:?}", read());
}

#[test]
fn a_closed_pipe_ends_vctl_quietly() {
    let vctl = workspace_binary("vctl").unwrap();
    let mut child = Command::new(&vctl)
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, then close the pipe (what `| head -1` does).
    {
        let mut first = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut first).unwrap();
        assert!(!first.is_empty());
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_cni_plugin_answers_version_without_a_configuration_and_introduces_itself() {
    let cni = workspace_binary("vswitch-cni").unwrap();
    let version = Command::new(&cni)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = text(&version);
    assert!(version.status.success(), "{stdout} {stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&"0.3.1".into())
    );
    let about = Command::new(&cni)
        .env_remove("CNI_COMMAND")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (_, stderr) = text(&about);
    assert!(about.status.success(), "{stderr}");
    assert!(
        stderr.contains("CNI protocol versions supported: 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
        "{stderr}"
    );
}

#[test]
fn help_says_what_every_argument_is_and_its_default() {
    let help = |bin: &str, args: &[&str]| {
        let out = Command::new(workspace_binary(bin).unwrap())
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let net = help("vctl", &["net"]);
    assert!(
        net.contains("veth") && net.contains("vhost-user-net"),
        "{net}"
    );
    for (args, words) in [
        (
            &["volume", "create"][..],
            &["The volume's name", "Virtual size"][..],
        ),
        (&["pool", "create"], &["The pool file", "The pool's name"]),
        (
            &["net", "port", "create"],
            &["The tenant it joins", "The port's name"],
        ),
    ] {
        let h = help("vctl", args);
        for w in words {
            assert!(h.contains(w), "vctl {args:?} --help lacks {w:?}:\n{h}");
        }
    }
    let vswitchd = help("vswitchd", &[]);
    for w in [
        "[default: 4789]",
        "[default: the MTU of the interface that holds the underlay address, else 1500]",
        "Required",
        "[default: human]",
    ] {
        assert!(
            vswitchd.contains(w),
            "vswitchd --help lacks {w:?}:\n{vswitchd}"
        );
    }
}
