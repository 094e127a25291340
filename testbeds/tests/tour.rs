//! The whole-system tour (the README's first command) as a test, once with podman starting
//! the containers and once with plain namespaces: tenants with the same subnet reach exactly
//! their own endpoints on both hosts, the VM boots from its thin clone through vhost-user-blk
//! and reaches its tenant through vhost-user-net, the golden image stays untouched, and
//! nothing the tour made is left behind.

use std::path::Path;

use testbeds::netns::missing_privileges;
use testbeds::scratch::Scratch;
use testbeds::tour::{Containers, TourOptions, TourReport, run};
use testbeds::{cni, guest, podman};

fn tour(podman: bool) -> TourReport {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    assert!(
        guest::available(),
        "QEMU is not installed: scripts/install-qemu installs it"
    );
    let base = Scratch::new(
        Path::new("/var/tmp"),
        if podman {
            "lv-tour-podman"
        } else {
            "lv-tour-netns"
        },
    )
    .unwrap();
    let opts = TourOptions {
        scratch: base.path().to_owned(),
        podman: Some(podman),
    };
    let report = run(&opts, &mut |line| eprintln!("{line}")).unwrap();
    for line in &report.counters {
        eprintln!("{line}");
    }
    // Nothing left behind: namespaces (the podman ones included) and files.
    let live = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let left: Vec<&String> = report
        .namespaces
        .iter()
        .filter(|n| live.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(report.namespaces.len() >= 7, "{:?}", report.namespaces);
    assert!(!report.scratch.exists(), "{}", report.scratch.display());
    report
}

fn check(r: &TourReport) {
    assert_eq!(r.endpoints.len(), 5);
    assert!(r.isolation_holds(), "{:?}\n{:?}", r.endpoints, r.answers);
    // Both tenants really share addresses: a1 and b1 hold the same one, a2 and b2 too.
    let ip = |name: &str| r.endpoints.iter().find(|e| e.name == name).unwrap().ip;
    assert_eq!(ip("a1@h1"), ip("b1@h1"));
    assert_eq!(ip("a2@h2"), ip("b2@h2"));
    // The VM answered the containers of its tenant and reached both of them itself.
    let vm = r.endpoints.len() - 1;
    let answered_by_vm = r
        .answers
        .iter()
        .flatten()
        .filter(|a| **a == Some(vm))
        .count();
    assert_eq!(answered_by_vm, 2, "{:?}", r.answers);
    assert_eq!(r.answers[vm].iter().flatten().count(), 2, "{:?}", r.vm_log);
    let s = &r.storage;
    assert!(s.golden_untouched);
    assert!(s.clone_io.reads > 0 && s.clone_io.writes > 0, "{s:?}");
    // The VM wrote 1 MiB of its own; the clone shares the rest with the golden snapshot.
    assert!(s.clone_own >= 1 << 20, "{s:?}");
    assert!(s.clone_allocated >= s.golden_allocated, "{s:?}");
    assert!(
        s.pool_used < s.golden_allocated * 2 + s.clone_own,
        "the pool holds golden, snapshot and clone in less than two copies: {s:?}"
    );
    assert_eq!(s.replicated, s.golden_allocated, "{s:?}");
    // vctl status saw the VM's port and its exported clone.
    assert!(r.status.contains("vhost-user-net"), "{}", r.status);
    let clone_row = r
        .status
        .lines()
        .find(|l| l.contains("vm1-root"))
        .unwrap_or_default();
    assert!(
        clone_row.contains("golden@v1") && clone_row.contains("vhost-user-blk"),
        "{}",
        r.status
    );
    assert!(r.passed());
}

#[test]
fn the_tour_with_podman_containers_passes_and_leaves_nothing() {
    assert!(
        podman::available() && cni::reference_plugins_installed(),
        "podman and the reference CNI plugins are missing: scripts/install-deps installs them"
    );
    let r = tour(true);
    assert_eq!(r.containers, Containers::Podman);
    check(&r);
}

#[test]
fn the_tour_with_namespace_containers_passes_and_leaves_nothing() {
    let r = tour(false);
    assert_eq!(r.containers, Containers::Netns);
    check(&r);
}
