//! vctl's exit codes and errors without a daemon (the daemon-backed cases run in testbeds).

use std::process::Command;

fn vctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vctl"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn an_unreachable_daemon_exits_3_with_a_clear_message() {
    let out = vctl(&[
        "net",
        "tenant",
        "list",
        "--socket",
        "/nonexistent/vswitchd.sock",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach /nonexistent/vswitchd.sock"),
        "{err}"
    );
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(
        vctl(&["net", "tenant", "create", "a"]).status.code(),
        Some(2),
        "missing --vni"
    );
    assert_eq!(
        vctl(&["net", "fdb", "add", "a", "02:00:00:00:00:01"])
            .status
            .code(),
        Some(2),
        "no --port/--vtep"
    );
    assert_eq!(
        vctl(&["net", "vtep", "add", "a", "not-an-ip"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn completion_scripts_are_valid_shell_and_know_the_commands() {
    let out = vctl(&["completions", "bash"]);
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout).into_owned();
    for word in ["tenant", "snapshot", "clone", "vhost", "--output"] {
        assert!(script.contains(word), "bash completion lacks {word}");
    }
    // bash itself parses it (syntax only).
    let path = std::env::temp_dir().join(format!("vctl-completion-{}.bash", std::process::id()));
    std::fs::write(&path, &script).unwrap();
    let checked = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert_eq!(vctl(&["completions", "tcsh"]).status.code(), Some(2));
}
