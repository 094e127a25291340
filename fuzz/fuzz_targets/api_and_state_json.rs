//! Fuzz target: JSON that comes from outside the daemons: API request bodies of vswitchd and
//! vblockd (parsed into their types, then checked as the handlers check them) and the state
//! files both daemons restore at start. No input makes it panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

fn parse<T: DeserializeOwned>(data: &[u8]) -> Option<T> {
    serde_json::from_slice(data).ok()
}

fuzz_target!(|data: &[u8]| {
    use vblock::api as b;
    use vswitch::api as n;
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 12 {
        0 => {
            let _ = parse::<n::TenantSpec>(body);
        }
        1 => {
            if let Some(spec) = parse::<n::PortSpec>(body) {
                let _ = vswitch::daemon::control::port_config(&spec);
            }
        }
        2 => {
            let _ = parse::<n::VtepSpec>(body);
        }
        3 => {
            let _ = parse::<n::FdbEntrySpec>(body);
        }
        4 => {
            let _ = parse::<vswitch::daemon::control::State>(body);
        }
        5 => {
            let _ = parse::<vblock::daemon::control::State>(body);
        }
        6 => {
            let _ = parse::<b::PoolSpec>(body);
        }
        7 => {
            if let Some(space) = parse::<b::SpaceSpec>(body) {
                let _ = vblock::daemon::control::check_space(&space);
            }
        }
        8 => {
            let _ = parse::<b::VolumeSpec>(body);
            let _ = parse::<b::ResizeSpec>(body);
        }
        9 => {
            let _ = parse::<b::SnapshotSpec>(body);
            let _ = parse::<b::CloneSpec>(body);
        }
        10 => {
            let _ = parse::<b::QosSpec>(body);
            let _ = parse::<b::PoolResizeSpec>(body);
        }
        _ => {
            let _ = parse::<b::VhostSpec>(body);
        }
    }
});
