//! Who may connect: every socket a daemon creates (API, vhost-user, NBD) gets the configured
//! owner, group and mode — root-only (0600) by default, `--socket-group G --socket-mode 0660`
//! for a VMM running unprivileged in group G — and an unprivileged client is refused or let in
//! accordingly.

use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use testbeds::daemon::{start_vswitchd, workspace_binary};
use testbeds::netns::missing_privileges;
use testbeds::scratch::Scratch;
use testbeds::switch_bed::Underlay;

/// A group no one is in (by number: no name needed).
const GID: u32 = 4242;
/// `nobody`.
const NOBODY: u32 = 65534;

/// (mode bits, group) of a socket.
fn access(path: &Path) -> (u32, u32) {
    let m = std::fs::metadata(path).unwrap();
    (m.permissions().mode() & 0o777, m.gid())
}

/// Whether `nobody`, with `gid` as its only group, gets an answer from the API on `socket`.
fn unprivileged_get(socket: &Path, gid: u32, path: &str) -> bool {
    Command::new("setpriv")
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(["curl", "-sS", "--fail", "--max-time", "20", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://localhost{path}"))
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn vswitchd_sockets_take_the_configured_owner_group_and_mode() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let mut ul = Underlay::new().unwrap();
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    for (extra, expected, in_group) in [
        (vec![], (0o600, 0), false),
        (
            vec!["--socket-group", "4242", "--socket-mode", "0660"],
            (0o660, GID),
            true,
        ),
    ] {
        let dir = Scratch::new(Path::new("/var/tmp"), "lv-access").unwrap();
        let d = start_vswitchd(&host, "198.18.0.1".parse().unwrap(), dir.path(), &extra).unwrap();
        d.create("/v1/tenants", r#"{"name":"a","vni":1}"#).unwrap();
        d.create(
            "/v1/ports",
            r#"{"name":"vm1","tenant":"a","kind":"vhost-user-net"}"#,
        )
        .unwrap();
        let api = dir.join("run/vswitchd.sock");
        let vhost = dir.join("run/vhost/vm1.sock");
        assert_eq!(access(&api), expected, "{extra:?}");
        assert_eq!(access(&vhost), expected, "{extra:?}");
        assert_eq!(
            unprivileged_get(&api, GID, "/v1/tenants"),
            in_group,
            "{extra:?}"
        );
        // Someone outside the group never gets in.
        assert!(!unprivileged_get(&api, NOBODY, "/v1/tenants"));
    }
}

#[test]
fn vblockd_sockets_take_the_configured_owner_group_and_mode() {
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-vaccess").unwrap();
    let d = testbeds::daemon::start_vblockd(
        dir.path(),
        &["--socket-group", "4242", "--socket-mode", "0660"],
    )
    .unwrap();
    d.create(
        "/v1/pools",
        &format!(
            r#"{{"name":"p","path":"{}","size":67108864}}"#,
            dir.join("p.pool").display()
        ),
    )
    .unwrap();
    d.create("/v1/pools/p/volumes", r#"{"name":"v","size":1048576}"#)
        .unwrap();
    let (status, body) = d
        .request("PUT", "/v1/pools/p/volumes/v/vhost", Some("{}"))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    for socket in ["vblockd.sock", "nbd.sock", "vhost/v.sock"] {
        assert_eq!(
            access(&dir.join("run").join(socket)),
            (0o660, GID),
            "{socket}"
        );
    }
    let api = dir.join("run/vblockd.sock");
    assert!(unprivileged_get(&api, GID, "/v1/pools"));
    assert!(!unprivileged_get(&api, NOBODY, "/v1/pools"));
}

#[test]
fn a_bad_socket_setting_is_refused_at_start() {
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-badaccess").unwrap();
    for (flag, value, says) in [
        ("--socket-mode", "0777", "socket mode"),
        ("--socket-group", "no-such-group-x", "no such group"),
    ] {
        let out = Command::new(workspace_binary("vblockd").unwrap())
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args([flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
    }
}
