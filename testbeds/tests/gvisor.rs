//! gVisor on a tenant: podman 4 runs a container with `runsc` (Debian's gVisor 2022-12-19) as
//! its OCI runtime, networked by `vswitch-cni`. A runc container on the same tenant reaches it
//! (ICMP, and TCP both ways to httpd in each); a container of another tenant with the same
//! subnet does not.
//!
//! gVisor runs with `--network=host` (hostinet: the sandbox's sockets are sockets of the
//! container's network namespace, the veth vswitch-cni put there), not with its own netstack:
//! this runsc decides it is in the root network namespace when
//! `/proc/sys/net/core/rmem_default` exists, which on kernel 6.x it does in every namespace,
//! and refuses to start a netstack there ("cannot run with network enabled in root network
//! namespace"); newer gVisor releases check differently.

use std::path::Path;

use serde_json::json;
use testbeds::cni::{self, Runtime};
use testbeds::daemon::start_vswitchd;
use testbeds::netns::missing_privileges;
use testbeds::podman::{self, IMAGE, Podman};
use testbeds::scratch::Scratch;
use testbeds::switch_bed::Underlay;
use testbeds::wait::{SOON, until};

const RUNSC: &str = "/usr/bin/runsc";

#[test]
fn a_gvisor_container_talks_to_a_runc_container_of_its_tenant_only() {
    if let Some(why) = missing_privileges() {
        eprintln!("SKIPPED gvisor test: {why}");
        return;
    }
    assert!(
        podman::available() && cni::reference_plugins_installed() && Path::new(RUNSC).is_file(),
        "podman, runsc or the reference CNI plugins are missing: scripts/install-deps installs them"
    );
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-gvisor").unwrap();
    let mut ul = Underlay::new().unwrap();
    let host = ul.host("gv", "192.168.82.1".parse().unwrap()).unwrap();
    let d = start_vswitchd(&host, "192.168.82.1".parse().unwrap(), &dir.join("vs"), &[]).unwrap();
    for (t, vni) in [("a", 501), ("b", 502)] {
        d.create("/v1/tenants", &format!(r#"{{"name":"{t}","vni":{vni}}}"#))
            .unwrap();
    }
    let rt = Runtime::new().unwrap();
    let pm = Podman::new(&dir.join("podman"), &rt.plugin_dir()).unwrap();
    for t in ["a", "b"] {
        pm.add_network(&json!({
            "cniVersion": "1.0.0",
            "name": format!("gv{t}"),
            "plugins": [{
                "type": "vswitch-cni",
                "tenant": t,
                "socket": dir.join("vs/run/vswitchd.sock"),
                "ipam": {"type": "host-local", "subnet": "10.67.0.0/24",
                         "dataDir": dir.join(format!("ipam-{t}"))},
            }]
        }))
        .unwrap();
    }
    let start = |name: &str, net: &str, runtime: Option<&str>, cmd: &[&str]| {
        let mut args = vec!["run", "-d", "--name", name, "--network", net];
        if let Some(r) = runtime {
            // gVisor with the host network stack of the container's namespace (hostinet):
            // Debian's runsc (2022-12-19) takes every network namespace for the root one on
            // this kernel and refuses its own netstack there (see the module's doc).
            args.extend(["--runtime", r, "--runtime-flag", "network=host"]);
        }
        args.push(IMAGE);
        args.extend_from_slice(cmd);
        pm.run(&host, &args).unwrap();
        pm.run(
            &host,
            &[
                "inspect",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                name,
            ],
        )
        .unwrap()
        .trim()
        .to_owned()
    };
    // gVisor serves HTTP; runc too.
    let g = start(
        "g1",
        "gva",
        Some(RUNSC),
        &["httpd", "-f", "-p", "8080", "-h", "/"],
    );
    let r = start("r1", "gva", None, &["httpd", "-f", "-p", "8080", "-h", "/"]);
    let b = start("b1", "gvb", None, &["sleep", "3600"]);
    let runtime = pm
        .run(&host, &["inspect", "--format", "{{.OCIRuntime}}", "g1"])
        .unwrap();
    assert!(runtime.contains("runsc"), "g1 runs with {runtime}");
    // An HTTP request over TCP with busybox nc (busybox wget crashes in these images: its
    // static resolver), answered by the other container's httpd.
    let fetch = |from: &str, ip: &str| {
        pm.run(
            &host,
            &[
                "exec",
                from,
                "sh",
                "-c",
                &format!("printf 'GET /bin/busybox HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 8080"),
            ],
        )
        .is_ok_and(|out| out.starts_with("HTTP/1.1 200 OK"))
    };
    until("runc -> gVisor over TCP", SOON, || fetch("r1", &g)).unwrap();
    assert!(fetch("g1", &r), "gVisor -> runc over TCP");
    assert!(
        pm.succeeds(&host, &["exec", "r1", "ping", "-c", "1", "-W", "3", &g]),
        "runc pings gVisor"
    );
    // Tenant b has the same subnet (b1 has g1's address): it reaches nothing of tenant a.
    assert_eq!(b, g, "both tenants' IPAM start at the same address");
    assert!(!fetch("b1", &r), "tenant b reached tenant a over TCP");
    assert!(
        !pm.succeeds(&host, &["exec", "b1", "ping", "-c", "1", "-W", "2", &r]),
        "tenant b pinged tenant a"
    );
    pm.run(&host, &["rm", "-f", "g1", "r1", "b1"]).unwrap();
    let (_, ports) = d.request("GET", "/v1/ports", None).unwrap();
    assert_eq!(ports, "[]", "ports left after podman rm -f");
}
