//! libvirtual's API examples run against real daemons: `tenant_port` against a vswitchd in a
//! host namespace of its own, `volumes` against a vblockd. Each example checks what it does and
//! exits non-zero otherwise (`embedded_switch` needs no daemon and runs in `.ci/run`).

use std::path::{Path, PathBuf};
use std::process::Command;

use testbeds::daemon::{Daemon, start_vswitchd, workspace_binary};
use testbeds::netns::{Netns, missing_privileges};
use testbeds::scratch::Scratch;

/// An example's binary (`cargo test` and nextest build examples; else it is built now).
fn example(name: &str) -> PathBuf {
    let debug_dir = workspace_binary("vblockd")
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .expect("the workspace is built");
    let bin = debug_dir.join("examples").join(name);
    if !bin.is_file() {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "libvirtual", "--example", name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "building example {name}");
    }
    bin
}

fn run(bin: &Path, args: &[&Path]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}: {}\n{stdout}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_tenant_and_port_example_runs_against_vswitchd() {
    if let Some(why) = missing_privileges() {
        eprintln!("SKIPPED examples test: {why}");
        return;
    }
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-example-net").unwrap();
    let ns = Netns::create("ex").unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    let _vswitchd = start_vswitchd(&ns, "127.0.0.1".parse().unwrap(), dir.path(), &[]).unwrap();
    let out = run(&example("tenant_port"), &[&dir.join("run/vswitchd.sock")]);
    assert!(out.contains("1 port(s) on"), "{out}");
    // Nothing is left: the example removed its tenant and port.
    let api = libvirtual::net::Client::new(dir.join("run/vswitchd.sock"));
    assert!(api.tenants().unwrap().is_empty());
    assert!(api.ports().unwrap().is_empty());
}

#[test]
fn the_volumes_example_runs_against_vblockd() {
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-example-block").unwrap();
    let args: Vec<String> = vec![
        "--run-dir".into(),
        dir.join("run").display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
    ];
    let socket = dir.join("run/vblockd.sock");
    let _vblockd =
        Daemon::start_local(&workspace_binary("vblockd").unwrap(), &args, socket.clone()).unwrap();
    let out = run(&example("volumes"), &[&socket, dir.path()]);
    assert!(out.contains("vm1") && out.contains("golden@1"), "{out}");
    let api = libvirtual::block::Client::new(&socket);
    assert!(
        api.pools().unwrap().is_empty(),
        "the example removed its pool"
    );
}
