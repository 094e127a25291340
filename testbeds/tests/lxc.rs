//! LXC containers on a tenant: LXC 5 (Debian's `lxc`) with `lxc.net.0.type = empty` and the
//! hook `scripts/lxc/vswitch-cni-hook`, which runs `vswitch-cni` as a CNI runtime would (ADD
//! at start-host, DEL at post-stop). A busybox container started with `lxc-start` reaches an
//! endpoint of the tenant; `lxc-stop` leaves no port and no address behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use testbeds::cni::{Runtime, reference_plugins_installed, reservations};
use testbeds::daemon::{container_port, start_vswitchd};
use testbeds::netns::{missing_privileges, run};
use testbeds::switch_bed::Underlay;
use testbeds::wait::{SOON, until};

/// An LXC container under `path`, destroyed on drop (also when the test fails).
struct Lxc {
    path: PathBuf,
    name: String,
    host: String,
}

impl Lxc {
    fn command(&self, tool: &str, args: &[&str]) -> Command {
        // LXC's command socket is an abstract unix socket: per network namespace.
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host))
            .arg(tool)
            .arg("-P")
            .arg(&self.path)
            .arg("-n")
            .arg(&self.name)
            .args(args);
        c
    }

    fn attach_succeeds(&self, args: &[&str]) -> bool {
        let mut a = vec!["--"];
        a.extend_from_slice(args);
        self.command("lxc-attach", &a)
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Lxc {
    fn drop(&mut self) {
        let _ = self.command("lxc-stop", &["-k"]).output();
        let _ = self.command("lxc-destroy", &["-f"]).output();
    }
}

fn hook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lxc/vswitch-cni-hook")
}

#[test]
fn an_lxc_container_joins_a_tenant_through_the_hook_and_leaves_nothing() {
    if let Some(why) = missing_privileges() {
        eprintln!("SKIPPED lxc test: {why}");
        return;
    }
    assert!(
        Path::new("/usr/bin/lxc-start").is_file() && reference_plugins_installed(),
        "lxc or the reference CNI plugins are missing: scripts/install-deps installs them"
    );
    let tmp = testbeds::scratch::Scratch::new(&std::env::temp_dir(), "lxc").unwrap();
    let mut ul = Underlay::new().unwrap();
    let host = ul.host("lxh", "192.168.81.1".parse().unwrap()).unwrap();
    let d = start_vswitchd(&host, "192.168.81.1".parse().unwrap(), &tmp.join("vs"), &[]).unwrap();
    d.create("/v1/tenants", r#"{"name":"a","vni":401}"#)
        .unwrap();
    let _peer = container_port(&d, "lxpeer", "a", "10.66.0.9/24").unwrap();

    let lxc = Lxc {
        path: tmp.join("lxc"),
        name: format!("lv{}", std::process::id()),
        host: host.name().to_owned(),
    };
    std::fs::create_dir_all(&lxc.path).unwrap();
    run(&mut lxc.command("lxc-create", &["-t", "busybox"])).unwrap();
    let dir = lxc.path.join(&lxc.name);
    // The container's network: none of LXC's own; the hook attaches it to tenant a.
    let config = std::fs::read_to_string(dir.join("config")).unwrap();
    let mut config: String = config
        .lines()
        .filter(|l| !l.starts_with("lxc.net.0.") && !l.starts_with("lxc.apparmor."))
        .map(|l| format!("{l}\n"))
        .collect();
    let hook = hook().display().to_string();
    config += &format!(
        "lxc.net.0.type = empty\nlxc.apparmor.profile = unconfined\nlxc.hook.version = 1\n\
         lxc.hook.start-host = {hook}\nlxc.hook.post-stop = {hook}\n"
    );
    std::fs::write(dir.join("config"), config).unwrap();
    // The busybox template's init asks DHCP for an address (and drops the one it has when
    // nobody answers): this container keeps the one CNI gives it.
    let rcs = dir.join("rootfs/etc/init.d/rcS");
    let init = std::fs::read_to_string(&rcs)
        .unwrap()
        .replace("/bin/udhcpc\n", "");
    std::fs::write(&rcs, init).unwrap();
    let ipam = tmp.join("ipam");
    let net = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "lxcnet",
        "type": "vswitch-cni",
        "tenant": "a",
        "socket": tmp.join("vs/run/vswitchd.sock"),
        "ipam": {"type": "host-local", "subnet": "10.66.0.0/24", "dataDir": ipam},
    });
    std::fs::write(dir.join("vswitch-cni.json"), net.to_string()).unwrap();

    let rt = Runtime::new().unwrap();
    let mut start = lxc.command(
        "lxc-start",
        &["-o", &dir.join("start.log").display().to_string()],
    );
    start.env("CNI_PATH", rt.cni_path());
    run(&mut start).unwrap();
    until(
        "the LXC container to reach the tenant's endpoint",
        SOON,
        || lxc.attach_succeeds(&["ping", "-c", "1", "-W", "2", "10.66.0.9"]),
    )
    .unwrap();
    let (_, ports) = d.request("GET", "/v1/ports", None).unwrap();
    let container = format!("lxc-{}", lxc.name);
    assert!(
        ports.contains(&container),
        "no port of the container: {ports}"
    );
    assert_eq!(reservations(&ipam, "lxcnet").len(), 1);

    let mut stop = lxc.command("lxc-stop", &[]);
    stop.env("CNI_PATH", rt.cni_path());
    run(&mut stop).unwrap();
    until("the container's port to go", SOON, || {
        d.request("GET", "/v1/ports", None)
            .is_ok_and(|(_, p)| !p.contains(&container))
    })
    .unwrap();
    assert_eq!(
        reservations(&ipam, "lxcnet"),
        vec![],
        "an address left behind"
    );
}
