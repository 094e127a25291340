//! vswitchd as a real daemon in two hosts, driven only through its API socket: endpoints in
//! their own namespaces reach each other, API errors are clear, and after `kill -9` and a
//! restart the endpoints reach their peers again without any reconfiguration.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use testbeds::daemon::{Daemon, workspace_binary};
use testbeds::netns::{Netns, missing_privileges};
use testbeds::probe::ping;
use testbeds::switch_bed::Underlay;

struct Host {
    ns: Netns,
    ip: Ipv4Addr,
    dir: PathBuf,
}

impl Host {
    fn args(&self) -> Vec<String> {
        vec![
            "--underlay".into(),
            self.ip.to_string(),
            "--run-dir".into(),
            self.dir.join("run").display().to_string(),
            "--state-dir".into(),
            self.dir.join("state").display().to_string(),
            "--log-format".into(),
            "json".into(),
            "--workers".into(),
            "2".into(),
        ]
    }

    fn start(&self) -> Daemon {
        let bin = workspace_binary("vswitchd").unwrap();
        Daemon::start(
            &self.ns,
            &bin,
            &self.args(),
            self.dir.join("run/vswitchd.sock"),
        )
        .unwrap()
    }
}

fn post(d: &Daemon, path: &str, body: &str) -> String {
    d.create(path, body).unwrap()
}

#[test]
fn api_placement_and_restart_after_kill_9() {
    if let Some(why) = missing_privileges() {
        eprintln!("SKIPPED vswitchd daemon test: {why}");
        return;
    }
    let tmp = std::env::temp_dir().join(format!("vswitchd-test-{}", std::process::id()));
    let mut ul = Underlay::new().unwrap();
    let hosts: Vec<Host> = (1..=2u8)
        .map(|n| {
            let ip = Ipv4Addr::new(198, 18, 0, n);
            Host {
                ns: ul.host(&format!("h{n}"), ip).unwrap(),
                ip,
                dir: tmp.join(format!("h{n}")),
            }
        })
        .collect();
    let mut daemons: Vec<Daemon> = hosts.iter().map(Host::start).collect();
    let endpoints: Vec<Netns> = (1..=2)
        .map(|n| Netns::create(&format!("ep{n}")).unwrap())
        .collect();
    for (i, d) in daemons.iter().enumerate() {
        let peer = hosts[1 - i].ip;
        post(d, "/v1/tenants", r#"{"name":"a","vni":100}"#);
        post(d, "/v1/tenants/a/vteps", &format!(r#"{{"ip":"{peer}"}}"#));
        let port = format!(
            r#"{{"name":"p{n}","tenant":"a","netns":"/run/netns/{ns}","ifname":"eth0","mac":"02:00:00:00:00:0{n}","ips":["10.1.0.{n}"]}}"#,
            n = i + 1,
            ns = endpoints[i].name()
        );
        post(d, "/v1/ports", &port);
        let ep = &endpoints[i];
        ep.ip(&[
            "link",
            "set",
            "eth0",
            "address",
            &format!("02:00:00:00:00:0{}", i + 1),
        ])
        .unwrap();
        ep.ip(&[
            "addr",
            "add",
            &format!("10.1.0.{}/24", i + 1),
            "dev",
            "eth0",
        ])
        .unwrap();
        ep.ip(&["link", "set", "eth0", "up"]).unwrap();
    }
    // The daemon placed the interface with the tenant MTU (1500 - 50).
    let link = endpoints[0].ip(&["-o", "link", "show", "eth0"]).unwrap();
    assert!(link.contains("mtu 1450"), "{link}");
    let peer: IpAddr = Ipv4Addr::new(10, 1, 0, 2).into();
    let r = ping(&endpoints[0], peer, 3, 56).unwrap();
    assert_eq!(r.received, r.sent, "before the crash: {r:?}");

    // Errors are JSON with a code, and the daemon keeps serving.
    let d = &daemons[0];
    let (s, body) = d
        .request("POST", "/v1/tenants", Some(r#"{"name":"a","vni":100}"#))
        .unwrap();
    assert_eq!(s, 409, "{body}");
    assert!(body.contains(r#""code":"conflict""#), "{body}");
    let (s, body) = d.request("POST", "/v1/ports", Some("{not json")).unwrap();
    assert_eq!(s, 400, "{body}");
    assert!(body.contains(r#""code":"invalid""#), "{body}");
    let (s, _) = d.request("GET", "/v1/ports/nope", None).unwrap();
    assert_eq!(s, 404);
    // A veth port needs a namespace for its other end; unknown kinds are named.
    for (kind, hint) in [("veth", "netns"), ("macvtap", "veth")] {
        let spec = format!(r#"{{"name":"v1","tenant":"a","kind":"{kind}"}}"#);
        let (s, body) = d.request("POST", "/v1/ports", Some(&spec)).unwrap();
        assert_eq!(s, 400, "{body}");
        assert!(body.contains(hint), "{body}");
    }
    let (s, body) = d
        .request(
            "POST",
            "/v1/tenants",
            Some(r#"{"name":"x","vni":16777216}"#),
        )
        .unwrap();
    assert_eq!(s, 400, "{body}");
    let (s, body) = d.request("GET", "/metrics", None).unwrap();
    assert_eq!(s, 200);
    assert!(
        body.contains(r#"vswitch_port_tx_packets_total{tenant="a",port="p1"}"#),
        "{body}"
    );
    assert!(body.contains("vswitch_datapath_workers 2"), "{body}");
    let (s, body) = d.request("GET", "/v1/ports/p1", None).unwrap();
    assert_eq!(s, 200);
    let port: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(port["worker"].as_u64().is_some_and(|w| w < 2), "{body}");

    // vctl drives the same API: JSON output for scripts, API errors exit 1.
    let vctl = workspace_binary("vctl").unwrap();
    let sock = hosts[0].dir.join("run/vswitchd.sock").display().to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(&vctl)
            .args(["net", "--socket", &sock])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["port", "list", "--output", "json"]);
    assert!(out.status.success());
    let ports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ports[0]["name"], "p1");
    assert!(ports[0]["counters"]["tx_packets"].as_u64().unwrap() > 0);
    assert!(
        run(&["tenant", "create", "b", "--vni", "200"])
            .status
            .success()
    );
    let table = String::from_utf8(run(&["tenant", "list"]).stdout).unwrap();
    assert!(
        table.starts_with("NAME") && table.contains("\nb ") && table.contains("200"),
        "{table}"
    );
    let dup = run(&["tenant", "create", "b", "--vni", "201"]);
    assert_eq!(dup.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&dup.stderr).contains("conflict"));
    assert!(run(&["tenant", "delete", "b"]).status.success());

    // A static entry: a MAC pinned behind the other host's VTEP.
    post(
        &daemons[0],
        "/v1/tenants/a/fdb",
        r#"{"mac":"02:00:00:00:99:99","vtep":"198.18.0.2"}"#,
    );
    let (s, body) = daemons[0]
        .request(
            "POST",
            "/v1/tenants/a/fdb",
            Some(r#"{"mac":"02:00:00:00:99:98"}"#),
        )
        .unwrap();
    assert_eq!(s, 400, "neither port nor vtep: {body}");

    // A crash: the interface stays in the endpoint (persistent TAP), traffic stops.
    daemons[0].kill9();
    assert!(endpoints[0].ip(&["link", "show", "eth0"]).is_ok());
    let r = ping(&endpoints[0], peer, 1, 56).unwrap();
    assert_eq!(r.received, 0, "traffic flowed without a daemon");

    // Restart with the same directories: everything comes back, nothing is reconfigured.
    daemons[0] = hosts[0].start();
    let r = ping(&endpoints[0], peer, 3, 56).unwrap();
    assert_eq!(r.received, r.sent, "after the restart: {r:?}");
    let (_, body) = daemons[0].request("GET", "/v1/tenants/a", None).unwrap();
    assert!(
        body.contains(r#""ports":["p1"]"#) && body.contains("198.18.0.2"),
        "{body}"
    );
    let (_, fdb) = daemons[0]
        .request("GET", "/v1/tenants/a/fdb", None)
        .unwrap();
    assert!(
        fdb.contains(r#"{"mac":"02:00:00:00:99:99","vtep":"198.18.0.2","static":true}"#),
        "static entry not restored: {fdb}"
    );
    let (s, _) = daemons[0]
        .request("DELETE", "/v1/tenants/a/fdb/02:00:00:00:99:99", None)
        .unwrap();
    assert_eq!(s, 204);

    // Deleting the port removes the interface; a clean stop removes the socket.
    let (s, _) = daemons[0].request("DELETE", "/v1/ports/p1", None).unwrap();
    assert_eq!(s, 204);
    assert!(
        endpoints[0].ip(&["link", "show", "eth0"]).is_err(),
        "interface left behind"
    );
    for d in daemons.iter_mut() {
        assert!(d.terminate(), "vswitchd did not exit cleanly on SIGTERM");
    }
    assert!(!hosts[0].dir.join("run/vswitchd.sock").exists());
    let _ = std::fs::remove_dir_all(&tmp);
}
