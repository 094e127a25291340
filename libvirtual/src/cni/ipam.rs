//! IPAM delegation as the spec describes it: the plugin named by `ipam.type` is run from
//! `CNI_PATH` with the same environment and the whole network configuration on stdin. When
//! the IPAM plugin refuses the configuration's version (the reference plugins stop at 1.0.0),
//! it is asked for its versions and handed the configuration with the newest both know.

use std::cell::RefCell;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

use serde_json::Value;

use super::spec::{CniError, CniResult, SUPPORTED_VERSIONS, code, version_cmp};

/// One IPAM plugin, found in `CNI_PATH`.
pub struct Ipam {
    program: PathBuf,
    kind: String,
    /// The configuration as handed to the plugin (its `cniVersion` lowered when the plugin
    /// refused the original one).
    config: RefCell<Value>,
}

impl Ipam {
    /// Finds plugin `kind` in `path`, for `config`.
    pub fn new(kind: &str, path: &[PathBuf], config: &Value) -> Result<Ipam, CniError> {
        let program = path
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("IPAM plugin {kind:?} is not in CNI_PATH"),
                )
                .with_details(format!("CNI_PATH: {path:?}"))
            })?;
        Ok(Ipam {
            program,
            kind: kind.to_owned(),
            config: RefCell::new(config.clone()),
        })
    }

    /// The versions the plugin speaks (its VERSION answer).
    fn versions(&self) -> Result<Vec<String>, CniError> {
        let asked = self.config.borrow()["cniVersion"].clone();
        let answer = self.run(
            "VERSION",
            &[],
            &serde_json::to_vec(&serde_json::json!({ "cniVersion": asked })).unwrap_or_default(),
        )?;
        Ok(answer["supportedVersions"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Runs `command` with the configuration; when the plugin refuses its version (code 1),
    /// asks the plugin's versions, lowers the configuration's to the newest both speak and
    /// runs it again.
    fn call(&self, command: &str, env: &[(&str, &str)]) -> Result<Value, CniError> {
        match self.run(command, env, &self.stdin()) {
            Err(e) if e.code == code::INCOMPATIBLE_VERSION => {
                let asked = self.config.borrow()["cniVersion"]
                    .as_str()
                    .unwrap_or("1.0.0")
                    .to_owned();
                let supported = self.versions()?;
                let common = SUPPORTED_VERSIONS
                    .iter()
                    .filter(|v| version_cmp(v, &asked).is_lt() && supported.iter().any(|s| s == *v))
                    .max_by(|a, b| version_cmp(a, b))
                    .ok_or_else(|| {
                        CniError::new(
                            code::INCOMPATIBLE_VERSION,
                            format!(
                                "IPAM plugin {} speaks {supported:?}, the configuration {asked}",
                                self.kind
                            ),
                        )
                    })?;
                self.config.borrow_mut()["cniVersion"] = Value::String((*common).to_owned());
                self.run(command, env, &self.stdin())
            }
            other => other,
        }
    }

    /// ADD: the addresses, routes and DNS for the attachment.
    pub fn add(&self) -> Result<CniResult, CniError> {
        CniResult::parse(&self.call("ADD", &[])?)
    }

    /// DEL for the current attachment, or for `attachment` (container id, ifname).
    pub fn del(&self, attachment: Option<(&str, &str)>) -> Result<(), CniError> {
        let env: Vec<(&str, &str)> = match attachment {
            Some((id, ifname)) => vec![("CNI_CONTAINERID", id), ("CNI_IFNAME", ifname)],
            None => Vec::new(),
        };
        self.call("DEL", &env).map(|_| ())
    }

    /// CHECK against the previous result.
    pub fn check(&self) -> Result<(), CniError> {
        self.call("CHECK", &[]).map(|_| ())
    }

    /// GC or STATUS, for plugins that speak 1.1.0 (others are skipped).
    pub fn maintenance(&self, command: &str) -> Result<(), CniError> {
        if !self.versions()?.iter().any(|v| v == "1.1.0") {
            return Ok(());
        }
        self.config.borrow_mut()["cniVersion"] = Value::String("1.1.0".into());
        self.run(command, &[], &self.stdin()).map(|_| ())
    }

    fn stdin(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.config.borrow()).unwrap_or_default()
    }

    /// Runs the plugin for `command` with the caller's environment plus `env`; returns its
    /// parsed output (`null` when it printed nothing) or its spec error.
    fn run(&self, command: &str, env: &[(&str, &str)], stdin: &[u8]) -> Result<Value, CniError> {
        let name = self.program.display().to_string();
        let io = |e: std::io::Error| {
            CniError::new(code::IO, format!("running IPAM plugin {name}"))
                .with_details(e.to_string())
        };
        let mut child = Process::new(&self.program)
            .env("CNI_COMMAND", command)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io)?;
        if let Some(mut input) = child.stdin.take() {
            // A plugin need not read its stdin (the reference plugins skip it for VERSION)
            // and may exit before we finish writing: its exit status and output decide.
            match input.write_all(stdin) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io(e));
                }
                _ => {}
            }
        }
        let out = child.wait_with_output().map_err(io)?;
        let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if out.status.success() {
            return Ok(parsed.unwrap_or(Value::Null));
        }
        if let Some(e) = parsed.and_then(|v| serde_json::from_value::<CniError>(v).ok()) {
            return Err(e);
        }
        Err(CniError::new(
            code::IPAM_FAILED,
            format!("IPAM plugin {name} {command} failed ({})", out.status),
        )
        .with_details(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference `host-local` does not read stdin for VERSION, so writing it can fail
    /// with EPIPE (rarely for the small VERSION input; every time for one larger than a pipe
    /// holds), which must not matter.
    #[test]
    fn a_plugin_that_leaves_its_stdin_unread_is_judged_by_its_answer() {
        let dir = PathBuf::from("/usr/lib/cni");
        let config = serde_json::json!({
            "cniVersion": "1.0.0",
            "padding": "x".repeat(1 << 20),
            "ipam": {"type": "host-local"},
        });
        let ipam = Ipam::new("host-local", &[dir], &config).expect("host-local is installed");
        let answer = ipam
            .run("VERSION", &[], &ipam.stdin())
            .expect("VERSION answered");
        assert!(
            answer["supportedVersions"]
                .as_array()
                .is_some_and(|v| v.iter().any(|v| v == "1.0.0")),
            "{answer}"
        );
    }
}
