//! IPAM delegation as the spec describes it: the plugin named by `ipam.type` is run from
//! `CNI_PATH` with the same environment and the whole network configuration on stdin. When
//! the IPAM plugin speaks an older spec than the configuration (the reference plugins stop
//! at 1.0.0), the configuration handed to it names the newest version both sides know.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

use serde_json::Value;

use super::spec::{CniError, CniResult, SUPPORTED_VERSIONS, code, version_cmp};

/// One IPAM plugin, found and asked for its versions.
pub struct Ipam {
    program: PathBuf,
    /// The configuration as handed to the plugin (its `cniVersion` possibly lowered).
    config: Value,
    supported: Vec<String>,
}

impl Ipam {
    /// Finds plugin `kind` in `path` and prepares `config` for it.
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
        let mut ipam = Ipam {
            program,
            config: config.clone(),
            supported: Vec::new(),
        };
        let asked = config["cniVersion"].as_str().unwrap_or("1.0.0").to_owned();
        let answer = ipam.run(
            "VERSION",
            &[],
            &serde_json::to_vec(&serde_json::json!({ "cniVersion": asked })).unwrap_or_default(),
        )?;
        ipam.supported = answer["supportedVersions"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if !ipam.supported.contains(&asked) {
            let common = SUPPORTED_VERSIONS
                .iter()
                .filter(|v| {
                    version_cmp(v, &asked).is_le() && ipam.supported.iter().any(|s| s == *v)
                })
                .max_by(|a, b| version_cmp(a, b))
                .ok_or_else(|| {
                    CniError::new(
                        code::INCOMPATIBLE_VERSION,
                        format!(
                            "IPAM plugin {kind} speaks {:?}, the configuration {asked}",
                            ipam.supported
                        ),
                    )
                })?;
            ipam.config["cniVersion"] = Value::String((*common).to_owned());
        }
        Ok(ipam)
    }

    /// Whether the plugin knows spec `version` (GC and STATUS need 1.1.0).
    pub fn speaks(&self, version: &str) -> bool {
        self.supported.iter().any(|v| v == version)
    }

    /// ADD: the addresses, routes and DNS for the attachment.
    pub fn add(&self) -> Result<CniResult, CniError> {
        let out = self.run("ADD", &[], &self.stdin(None))?;
        CniResult::parse(&out)
    }

    /// DEL for the current attachment, or for `attachment` (container id, ifname).
    pub fn del(&self, attachment: Option<(&str, &str)>) -> Result<(), CniError> {
        let env: Vec<(&str, &str)> = match attachment {
            Some((id, ifname)) => vec![("CNI_CONTAINERID", id), ("CNI_IFNAME", ifname)],
            None => Vec::new(),
        };
        self.run("DEL", &env, &self.stdin(None)).map(|_| ())
    }

    /// CHECK against the previous result.
    pub fn check(&self) -> Result<(), CniError> {
        self.run("CHECK", &[], &self.stdin(None)).map(|_| ())
    }

    /// GC or STATUS, for plugins that speak 1.1.0 (others are skipped).
    pub fn maintenance(&self, command: &str) -> Result<(), CniError> {
        if !self.speaks("1.1.0") {
            return Ok(());
        }
        let mut config = self.config.clone();
        config["cniVersion"] = Value::String("1.1.0".into());
        self.run(command, &[], &self.stdin(Some(config)))
            .map(|_| ())
    }

    fn stdin(&self, config: Option<Value>) -> Vec<u8> {
        serde_json::to_vec(config.as_ref().unwrap_or(&self.config)).unwrap_or_default()
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
            input.write_all(stdin).map_err(io)?;
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
