//! vswitchd never drops saved state: what cannot be restored at start (a port whose network
//! namespace is gone, a tenant with a bad value) stays in the state file, is reported by the
//! API with its error and is retried (the namespace comes back: so does the port); a state
//! file of an unknown version is refused rather than overwritten.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::Duration;

use testbeds::daemon::{start_vswitchd, vswitchd_args, workspace_binary};
use testbeds::netns::{Netns, missing_privileges};
use testbeds::scratch::Scratch;
use testbeds::switch_bed::Underlay;

fn state(dir: &Scratch) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("state/vswitchd.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn names(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn what_cannot_be_restored_is_kept_reported_and_retried() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir = Scratch::new(std::path::Path::new("/var/tmp"), "lv-kept").unwrap();
    let mut ul = Underlay::new().unwrap();
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    let underlay: IpAddr = "198.18.0.1".parse().unwrap();
    let c1 = Netns::create("c1").unwrap();
    let c2 = Netns::create("c2").unwrap();
    let mut d = start_vswitchd(&host, underlay, dir.path(), &[]).unwrap();
    d.create("/v1/tenants", r#"{"name":"a","vni":100}"#)
        .unwrap();
    d.create("/v1/tenants", r#"{"name":"b","vni":200}"#)
        .unwrap();
    for (port, tenant, ns) in [("pa", "a", &c1), ("pb", "b", &c2)] {
        d.create(
            "/v1/ports",
            &format!(
                r#"{{"name":"{port}","tenant":"{tenant}","netns":"/run/netns/{}","ifname":"eth0"}}"#,
                ns.name()
            ),
        )
        .unwrap();
    }
    d.create("/v1/tenants/a/vteps", r#"{"ip":"198.18.0.2"}"#)
        .unwrap();
    assert!(d.terminate());

    // While it is down: port pa's namespace goes away, and tenant b's VNI is broken by hand.
    Command::new("ip")
        .args(["netns", "del", c1.name()])
        .status()
        .unwrap();
    let mut saved = state(&dir);
    saved["tenants"][1]["vni"] = serde_json::json!(1u64 << 25);
    std::fs::write(
        dir.join("state/vswitchd.json"),
        serde_json::to_vec_pretty(&saved).unwrap(),
    )
    .unwrap();

    let d = start_vswitchd(&host, underlay, dir.path(), &[]).unwrap();
    let get = |path: &str| -> (u16, serde_json::Value) {
        let (status, body) = d.request("GET", path, None).unwrap();
        (status, serde_json::from_str(&body).unwrap_or_default())
    };
    let (_, unrestored) = get("/v1/unrestored");
    let mut kept = names(&unrestored);
    kept.sort();
    assert_eq!(kept, ["b", "pa", "pb"], "{unrestored}");
    let error_of = |name: &str| {
        unrestored
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(error_of("pa").contains("namespace"), "{unrestored}");
    assert!(
        error_of("b").contains("VNI") || error_of("b").contains("vni"),
        "{unrestored}"
    );
    // Nothing was dropped from the state file; what came back works.
    let kept_state = state(&dir);
    assert_eq!(names(&kept_state["tenants"]), ["a", "b"], "{kept_state}");
    let mut ports = names(&kept_state["ports"]);
    ports.sort();
    assert_eq!(ports, ["pa", "pb"], "{kept_state}");
    assert_eq!(get("/v1/tenants/a").0, 200);
    let (status, pa) = get("/v1/ports/pa");
    assert_eq!(status, 200);
    assert!(
        pa["error"].as_str().unwrap().contains("not restored"),
        "{pa}"
    );
    assert_eq!(
        get("/v1/tenants/a/vteps").1,
        serde_json::json!([{"ip":"198.18.0.2"}])
    );

    // The namespace comes back: so does the port, on its own.
    Command::new("ip")
        .args(["netns", "add", c1.name()])
        .status()
        .unwrap();
    testbeds::wait::until("port pa to be restored", Duration::from_secs(60), || {
        get("/v1/ports/pa").1.get("error").is_none()
    })
    .unwrap();
    assert!(
        c1.exec("cat", &["/sys/class/net/eth0/mtu"]).is_ok(),
        "pa's interface is back in its namespace"
    );
    let (_, unrestored) = get("/v1/unrestored");
    let mut kept = names(&unrestored);
    kept.sort();
    assert_eq!(kept, ["b", "pb"], "{unrestored}");

    // Deleting the broken tenant forgets it and its port, in the state file too.
    let (status, body) = d.request("DELETE", "/v1/tenants/b", None).unwrap();
    assert_eq!(status, 204, "{body}");
    assert_eq!(get("/v1/unrestored").1, serde_json::json!([]));
    let after = state(&dir);
    assert_eq!(names(&after["tenants"]), ["a"], "{after}");
    assert_eq!(names(&after["ports"]), ["pa"], "{after}");
    drop(d);
    drop(c2);
}

#[test]
fn a_state_file_of_an_unknown_version_is_refused_not_overwritten() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir = Scratch::new(std::path::Path::new("/var/tmp"), "lv-version").unwrap();
    let mut ul = Underlay::new().unwrap();
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let future = r#"{"version":99,"tenants":[{"name":"x","vni":1}],"ports":[],"vteps":{},"fdb":{},"quantum":true}"#;
    std::fs::write(dir.join("state/vswitchd.json"), future).unwrap();
    let args = vswitchd_args("198.18.0.1".parse().unwrap(), dir.path(), &[]);
    let mut child = host
        .command(workspace_binary("vswitchd").unwrap().to_str().unwrap(), &[])
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    let exited = testbeds::wait::until("vswitchd to refuse", Duration::from_secs(60), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if exited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("vswitchd started on a state file of version 99");
    }
    assert!(!status.unwrap().success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("version 99"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(dir.join("state/vswitchd.json")).unwrap(),
        future,
        "the state file was changed"
    );
}

fn start_vblockd(dir: &Scratch) -> testbeds::daemon::Daemon {
    testbeds::daemon::start_vblockd(dir.path(), &[]).unwrap()
}

#[test]
fn vblockd_keeps_a_pool_it_cannot_open_and_its_export_and_opens_them_when_it_can() {
    let dir = Scratch::new(std::path::Path::new("/var/tmp"), "lv-keptpool").unwrap();
    let disks = dir.join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let mut d = start_vblockd(&dir);
    d.create(
        "/v1/pools",
        &format!(
            r#"{{"name":"p","path":"{}","size":67108864}}"#,
            disks.join("p.pool").display()
        ),
    )
    .unwrap();
    d.create("/v1/pools/p/volumes", r#"{"name":"v","size":1048576}"#)
        .unwrap();
    let (status, body) = d
        .request("PUT", "/v1/pools/p/volumes/v/vhost", Some("{}"))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(d.terminate());
    // The pool's directory is away (a file system not mounted yet) while vblockd starts.
    let away = dir.join("disks.away");
    std::fs::rename(&disks, &away).unwrap();
    let d = start_vblockd(&dir);
    let get = |path: &str| -> (u16, serde_json::Value) {
        let (status, body) = d.request("GET", path, None).unwrap();
        (status, serde_json::from_str(&body).unwrap_or_default())
    };
    let (_, unrestored) = get("/v1/unrestored");
    let kinds: Vec<(String, String)> = unrestored
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["kind"].as_str().unwrap().to_owned(),
                x["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("pool".into(), "p".into()), ("vhost".into(), "p/v".into())],
        "{unrestored}"
    );
    assert_eq!(get("/v1/pools/p").0, 404);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state/vblockd.json")).unwrap())
            .unwrap();
    assert_eq!(saved["pools"][0]["name"], "p", "{saved}");
    assert_eq!(saved["vhost"][0][1], "v", "{saved}");
    // The directory comes back: the pool and its export follow, by themselves.
    std::fs::rename(&away, &disks).unwrap();
    testbeds::wait::until("pool p and its export", Duration::from_secs(60), || {
        get("/v1/pools/p").0 == 200 && get("/v1/unrestored").1 == serde_json::json!([])
    })
    .unwrap();
    assert_eq!(get("/v1/vhost").1[0]["volume"], "v");
}

#[test]
fn vblockd_refuses_a_state_file_of_an_unknown_version() {
    let dir = Scratch::new(std::path::Path::new("/var/tmp"), "lv-vversion").unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let future = r#"{"version":7,"pools":[],"vhost":[]}"#;
    std::fs::write(dir.join("state/vblockd.json"), future).unwrap();
    let out = Command::new(workspace_binary("vblockd").unwrap())
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("version 7"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(dir.join("state/vblockd.json")).unwrap(),
        future
    );
}
