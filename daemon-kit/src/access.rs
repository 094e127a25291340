//! Who may connect to a daemon's unix sockets: the owner, group and mode applied to every
//! socket it creates (the API, vhost-user, NBD). QEMU and cloud-hypervisor usually run as an
//! unprivileged user (`libvirt-qemu`, group `kvm`): `--socket-group kvm --socket-mode 0660`
//! lets them connect. Default: the daemon's user only (0600).

use std::path::Path;
use std::sync::OnceLock;

/// Owner, group and permission bits of the daemon's sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    /// Owner (uid); `None`: the daemon's user.
    pub owner: Option<u32>,
    /// Group (gid); `None`: the daemon's group.
    pub group: Option<u32>,
    /// Permission bits (0600 by default; at most 0666: sockets need no execute bit).
    pub mode: u32,
}

impl Default for SocketAccess {
    fn default() -> SocketAccess {
        SocketAccess {
            owner: None,
            group: None,
            mode: 0o600,
        }
    }
}

static ACCESS: OnceLock<SocketAccess> = OnceLock::new();

impl SocketAccess {
    /// From the settings as given: a user and group by name or number, a mode in octal
    /// (`0660`). The error says which value is wrong.
    pub fn parse(
        owner: Option<&str>,
        group: Option<&str>,
        mode: Option<&str>,
    ) -> Result<SocketAccess, String> {
        let owner = owner
            .map(|o| match o.parse::<u32>() {
                Ok(uid) => Ok(uid),
                Err(_) => nix::unistd::User::from_name(o)
                    .ok()
                    .flatten()
                    .map(|u| u.uid.as_raw())
                    .ok_or_else(|| format!("socket owner {o:?}: no such user")),
            })
            .transpose()?;
        let group = group
            .map(|g| match g.parse::<u32>() {
                Ok(gid) => Ok(gid),
                Err(_) => nix::unistd::Group::from_name(g)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw())
                    .ok_or_else(|| format!("socket group {g:?}: no such group")),
            })
            .transpose()?;
        let mode = match mode {
            None => 0o600,
            Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m & !0o666 == 0 && *m & 0o600 == 0o600)
                .ok_or_else(|| {
                    format!(
                        "socket mode {m:?}: octal permission bits up to 0666 that keep the \
                         owner's read and write (0600, 0660, 0666)"
                    )
                })?,
        };
        Ok(SocketAccess { owner, group, mode })
    }

    /// Makes this the access of every socket the process creates from now on (once, at
    /// start; later calls are ignored). The process's umask is set to 077, so that a socket
    /// is never more open than this between its creation and [`SocketAccess::apply`].
    pub fn install(self) {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let _ = ACCESS.set(self);
    }

    /// The access installed (the default if none was).
    pub fn current() -> SocketAccess {
        ACCESS.get().copied().unwrap_or_default()
    }

    /// Creates a directory for sockets (and its parents) that everyone may traverse (0755):
    /// the sockets in it are protected by their own access. An existing directory is left as
    /// it is.
    pub fn create_dir(path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if path.is_dir() {
            return Ok(());
        }
        std::fs::create_dir_all(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
    }

    /// Applies owner, group and mode to the socket at `path`.
    pub fn apply(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if self.owner.is_some() || self.group.is_some() {
            std::os::unix::fs::chown(path, self.owner, self.group)?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_parsed_or_refused_with_the_reason() {
        assert_eq!(
            SocketAccess::parse(None, None, None).unwrap(),
            SocketAccess::default()
        );
        let a = SocketAccess::parse(Some("0"), Some("root"), Some("0660")).unwrap();
        assert_eq!((a.owner, a.group, a.mode), (Some(0), Some(0), 0o660));
        assert!(
            SocketAccess::parse(Some("no-such-user-x"), None, None)
                .unwrap_err()
                .contains("no such user")
        );
        for bad in ["0777", "0644x", "0060", "abc", "01660"] {
            assert!(SocketAccess::parse(None, None, Some(bad)).is_err(), "{bad}");
        }
    }
}
