//! Fuzz target: what a container runtime hands `vswitch-cni`: the `CNI_*` environment (the
//! input's first line, `KEY=VALUE` pairs separated by NUL) and the network configuration (the
//! rest, JSON). Parsed and checked as the plugin does before it touches anything; the
//! VERSION answer is built. No input makes it panic.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use libvirtual::cni::plugin::check_config;
use libvirtual::cni::{Command, Env};

fuzz_target!(|data: &[u8]| {
    let (env_part, config) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let vars: BTreeMap<String, String> = env_part
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect();
    let Ok(env) = Env::from_vars(|k| vars.get(k).cloned()) else {
        return;
    };
    let _ = env.container_id();
    let _ = env.ifname();
    let _ = env.netns();
    if env.command == Command::Version {
        let (out, _) = libvirtual::cni::run(&env, config);
        assert!(out.is_ok());
        return;
    }
    if let Ok(raw) = serde_json::from_slice::<serde_json::Value>(config) {
        let _ = check_config(&env, &raw);
    }
});
