//! `vswitch-cni`: the CNI plugin that attaches containers to vswitchd tenants (CNI spec
//! 1.1.0; see `docs/cni.md`). The runtime runs it with `CNI_*` variables and the network
//! configuration on stdin; it prints a result or a spec error on stdout.

use std::io::Read;
use std::process::ExitCode;

use libvirtual::cni::{self, CniError, Env};

fn main() -> ExitCode {
    // Run by hand (no CNI_COMMAND): say what this is, as the reference plugins do.
    if std::env::var_os("CNI_COMMAND").is_none_or(|c| c.is_empty()) {
        eprintln!(
            "CNI vswitch-cni plugin v{}: attaches containers to libvirtual vswitchd tenants",
            env!("CARGO_PKG_VERSION")
        );
        eprintln!(
            "CNI protocol versions supported: {}",
            cni::SUPPORTED_VERSIONS.join(", ")
        );
        return ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let (out, version) = match (Env::from_vars(|k| std::env::var(k).ok()), read) {
        (Err(e), _) => (Err(e), "1.1.0".to_owned()),
        (Ok(_), Err(e)) => (
            Err(CniError::new(cni::spec::code::IO, "reading stdin").with_details(e.to_string())),
            "1.1.0".to_owned(),
        ),
        (Ok(env), Ok(_)) => cni::run(&env, &stdin),
    };
    match out {
        Ok(Some(v)) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.to_json(&version));
            eprintln!("vswitch-cni: {e}");
            ExitCode::FAILURE
        }
    }
}
