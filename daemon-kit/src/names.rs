//! The one rule for names in libvirtual: tenants, ports, pools, volumes, snapshots and clones.
//!
//! A name is 1 to 64 bytes of ASCII letters, digits and `_ . - @`, starting with a letter or
//! a digit. Names appear in URL paths, file names (`vhost/<name>.sock`), logs and terminals,
//! so nothing else is allowed: no spaces, slashes, `?`/`#`/`%`, control characters or
//! non-ASCII. Ports also name Linux interfaces and take at most 15 bytes ([`PORT_NAME_MAX`])
//! and no `@`. The daemons check every name they are given; clients percent-encode path
//! segments anyway ([`encode_path_segment`]).

/// The longest name (bytes).
pub const NAME_MAX: usize = 64;
/// The longest port name (a Linux interface name: `IFNAMSIZ` - 1).
pub const PORT_NAME_MAX: usize = 15;

/// What the rule says, for error messages and help texts.
pub const NAME_RULE: &str =
    "1 to 64 characters of A-Z a-z 0-9 _ . - @, starting with a letter or digit";
/// The rule for port names.
pub const PORT_NAME_RULE: &str =
    "1 to 15 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit";

/// Checks `name` against the rule; `what` names the kind of object in the error (e.g.
/// "tenant"). The error shows the name escaped, never raw.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    check(what, name, NAME_MAX, "_.-@", NAME_RULE)
}

/// Checks a port name (also an interface name).
pub fn check_port_name(name: &str) -> Result<(), String> {
    check("port", name, PORT_NAME_MAX, "_.-", PORT_NAME_RULE)
}

fn check(what: &str, name: &str, max: usize, punct: &str, rule: &str) -> Result<(), String> {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || punct.contains(c));
    if first_ok && rest_ok && name.len() <= max {
        Ok(())
    } else {
        Err(format!("{what} name {}: {rule}", printable(name)))
    }
}

/// `"..."` with control and non-ASCII characters escaped (safe to print on a terminal),
/// cut after 80 characters.
pub fn printable(text: &str) -> String {
    let mut s: String = text
        .chars()
        .take(80)
        .flat_map(char::escape_default)
        .collect();
    if text.chars().count() > 80 {
        s.push_str("...");
    }
    format!("\"{s}\"")
}

/// Percent-encodes one URL path segment (everything but unreserved characters, RFC 3986).
pub fn encode_path_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_one_rule() {
        for good in [
            "a",
            "tenant-a",
            "golden@v1",
            "vm1.root",
            "A_9",
            &"x".repeat(64),
        ] {
            assert!(check_name("volume", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "bad name/x",
            "x?y#z",
            ".",
            "..",
            "-a",
            "@a",
            "a\0b",
            "a\nb",
            "a\x1b[31mred",
            "é",
            "a%2F",
            &"x".repeat(65),
        ] {
            let err = check_name("volume", bad).unwrap_err();
            assert!(!err.contains('\n') && !err.contains('\x1b'), "{err:?}");
            assert!(err.contains(NAME_RULE), "{err}");
        }
    }

    #[test]
    fn port_names_are_interface_names() {
        assert!(check_port_name("vm1-eth0.100").is_ok());
        assert!(check_port_name("a-name-that-is-too-long").is_err());
        assert!(check_port_name("vm@1").is_err());
        assert!(check_port_name("sp ace").is_err());
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_path_segment("golden@v1"), "golden@v1");
        assert_eq!(encode_path_segment("x?y#z/ü"), "x%3Fy%23z%2F%C3%BC");
    }
}
