//! The examples of the README and of `docs/` are true: every shell, JSON or Rust block is
//! exercised. A block is preceded by a directive comment saying how:
//!
//! * `<!-- docs-test: run ... -->`: the block runs here as written, as root, in a network
//!   namespace of its own whose underlay address is 192.0.2.10, with `LIBVIRTUAL_RUN_DIR` and
//!   `LIBVIRTUAL_STATE_DIR` pointing into a scratch directory (the literal `/run/libvirtual`
//!   and `/var/lib/libvirtual` in the text are read as those), `target/release/` read as the
//!   binaries this test run built (`cargo build` lines are skipped: they are built), namespaces
//!   it adds renamed uniquely and removed afterwards, and a small qcow2 image `debian.qcow2` in
//!   its working directory. `run with daemons` starts vswitchd and vblockd first.
//! * `<!-- docs-test: json TYPE -->`: the block parses as that API type.
//! * `<!-- docs-test: covered by PATH... -->`: what it does is run by the named tests (or by
//!   CI itself); the paths must exist.
//! * Rust blocks of the README are compiled as doc tests of `libvirtual`.
//!
//! A block without a directive fails the first test: nothing pasteable goes unexercised.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testbeds::daemon::workspace_binary;
use testbeds::netns::{Netns, missing_privileges};
use testbeds::scratch::Scratch;

/// One fenced code block.
#[derive(Debug)]
struct Block {
    file: String,
    line: usize,
    lang: String,
    directive: Option<String>,
    text: String,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn blocks() -> Vec<Block> {
    let mut files = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.strip_prefix(repo()).unwrap().display().to_string();
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            if let Some(lang) = lines[i].strip_prefix("```") {
                let start = i;
                let directive = lines[..i]
                    .iter()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .and_then(|l| l.trim().strip_prefix("<!-- docs-test: "))
                    .and_then(|l| l.strip_suffix("-->"))
                    .map(|d| d.trim().to_owned());
                i += 1;
                let mut body = String::new();
                while i < lines.len() && !lines[i].starts_with("```") {
                    body.push_str(lines[i]);
                    body.push('\n');
                    i += 1;
                }
                out.push(Block {
                    file: name.clone(),
                    line: start + 1,
                    lang: lang.split(',').next().unwrap_or("").trim().to_owned(),
                    directive,
                    text: body,
                });
            }
            i += 1;
        }
    }
    out
}

/// Parses a JSON block as the type its directive names.
fn parse_as(kind: &str, text: &str) -> Result<(), String> {
    let e = |e: serde_json::Error| e.to_string();
    match kind {
        "error" => serde_json::from_str::<daemon_kit::ErrorResponse>(text)
            .map(drop)
            .map_err(e),
        "vswitch::api::PortSpec" => serde_json::from_str::<vswitch::api::PortSpec>(text)
            .map(drop)
            .map_err(e),
        "cni conflist" => {
            let v: serde_json::Value = serde_json::from_str(text).map_err(e)?;
            let plugins = v["plugins"].as_array().ok_or("no plugins")?;
            let ours = plugins
                .iter()
                .find(|p| p["type"] == "vswitch-cni")
                .ok_or("no vswitch-cni plugin")?;
            let mut conf = ours.clone();
            conf["cniVersion"] = v["cniVersion"].clone();
            conf["name"] = v["name"].clone();
            serde_json::from_value::<libvirtual::cni::NetConf>(conf)
                .map(drop)
                .map_err(e)
        }
        other => Err(format!("unknown JSON type {other:?}")),
    }
}

#[test]
fn every_example_is_run_compiled_parsed_or_covered() {
    let all = blocks();
    assert!(all.len() > 10, "found only {} blocks", all.len());
    let mut problems = Vec::new();
    for b in &all {
        let at = format!("{}:{}", b.file, b.line);
        match (b.lang.as_str(), b.directive.as_deref()) {
            ("text", _) => {}
            ("rust", _) if b.file == "README.md" => {} // doc tests of libvirtual
            (_, Some(d)) if d.starts_with("run") => {}
            (_, Some(d)) if d.starts_with("covered by ") => {
                for word in d["covered by ".len()..].split_whitespace() {
                    if word.starts_with('(') {
                        break;
                    }
                    if !repo().join(word).exists() {
                        problems.push(format!("{at}: covered by {word}, which does not exist"));
                    }
                }
            }
            ("json", Some(d)) if d.starts_with("json ") => {
                if let Err(e) = parse_as(&d[5..], &b.text) {
                    problems.push(format!("{at}: does not parse as {}: {e}", &d[5..]));
                }
            }
            (lang, d) => problems.push(format!(
                "{at}: a {lang:?} block with {d:?}: say how it is exercised (docs-test: run, \
                 json TYPE, covered by PATH)"
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The script a `run` block becomes here (see the module docs), and the namespaces it adds.
fn rewrite(text: &str, bin: &Path, scratch: &Path, unique: &str) -> (String, Vec<String>) {
    let mut script = String::new();
    let mut added = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("cargo build") {
            continue;
        }
        if let Some(rest) = line.trim_start().strip_prefix("ip netns add ") {
            let name = rest.split_whitespace().next().unwrap_or("").to_owned();
            added.push(name);
        }
        script.push_str(line);
        script.push('\n');
    }
    let mut script = script
        .replace("target/release/", &format!("{}/", bin.display()))
        .replace(
            "/run/libvirtual",
            &scratch.join("run").display().to_string(),
        )
        .replace(
            "/var/lib/libvirtual",
            &scratch.join("state").display().to_string(),
        )
        .replace(
            "/etc/bash_completion.d",
            &scratch.join("bash_completion.d").display().to_string(),
        );
    let mut renamed = Vec::new();
    for name in added {
        let new = format!("{unique}{name}");
        script = script
            .replace(
                &format!("ip netns add {name}"),
                &format!("ip netns add {new}"),
            )
            .replace(&format!("/run/netns/{name}"), &format!("/run/netns/{new}"));
        renamed.push(new);
    }
    (script, renamed)
}

#[test]
fn the_shell_examples_run_against_real_daemons() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let bin = workspace_binary("vctl")
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    for b in blocks()
        .into_iter()
        .filter(|b| b.directive.as_deref().is_some_and(|d| d.starts_with("run")))
    {
        let at = format!("{}:{}", b.file, b.line);
        let dir = Scratch::new(Path::new("/var/tmp"), "lv-docs").unwrap();
        for sub in ["run", "state", "work", "bash_completion.d"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // A small image with data and holes, as a downloaded cloud image would have.
        let work = dir.join("work");
        let made = Command::new("sh")
            .arg("-c")
            .arg(
                "qemu-img create -q -f qcow2 debian.qcow2 64M && \
                 qemu-io -f qcow2 -c 'write -P 0x5a 0 1M' -c 'write -P 0xa5 32M 64k' debian.qcow2",
            )
            .current_dir(&work)
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        // The namespace: lo and an underlay interface with 192.0.2.10.
        let ns = Netns::create("docs").unwrap();
        ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"])
            .unwrap();
        ns.ip(&["addr", "add", "192.0.2.10/24", "dev", "ul0"])
            .unwrap();
        ns.ip(&["link", "set", "ul0", "up"]).unwrap();
        ns.ip(&["link", "set", "ul1", "up"]).unwrap();
        let unique = format!("lv{}d", std::process::id());
        let (mut script, added) = rewrite(&b.text, &bin, dir.path(), &unique);
        if b.directive.as_deref() == Some("run with daemons") {
            script = format!(
                "{bin}/vswitchd --underlay 192.0.2.10 >/dev/null 2>&1 &\n\
                 {bin}/vblockd >/dev/null 2>&1 &\n\
                 {bin}/vctl --wait 30 status >/dev/null\n{script}",
                bin = bin.display()
            );
        }
        let mut cmd = ns.command("bash", &["-euo", "pipefail", "-c", &script]);
        cmd.current_dir(&work)
            .env("LIBVIRTUAL_RUN_DIR", dir.join("run"))
            .env("LIBVIRTUAL_STATE_DIR", dir.join("state"))
            // Files, not pipes: daemons the block starts in the background keep them open.
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
        testbeds::daemon::tie_to_parent(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        // The block's commands end by themselves; what it started in the background (the
        // daemons) is stopped with the whole process group afterwards.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let out = rx.recv_timeout(Duration::from_secs(300));
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
        let _ = testbeds::wait::until("the block's processes to end", testbeds::wait::SOON, || {
            nix::sys::signal::killpg(pgid, None).is_err()
        });
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        for name in &added {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let status = out
            .unwrap_or_else(|_| panic!("{at}: still running after 300 s:\n{script}"))
            .unwrap();
        assert!(
            status.success(),
            "{at} failed ({status}):\n--- script\n{script}--- stdout\n{}--- stderr\n{}",
            read("stdout"),
            read("stderr")
        );
        eprintln!("{at}: ran\n{}", read("stdout"));
    }
}
