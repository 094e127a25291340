use overlay_net::{PortId, Vni};

/// Errors of the switch's configuration operations. Frames are never errors: they are
/// forwarded or dropped with a counted [`crate::DropReason`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tenant with this name or VNI exists.
    #[error("tenant {0} already exists")]
    TenantExists(String),
    /// No tenant by that name or VNI.
    #[error("no tenant {0}")]
    NoSuchTenant(String),
    /// A port with this name or id exists.
    #[error("port {0} already exists")]
    PortExists(String),
    /// No port by that name or id.
    #[error("no port {0}")]
    NoSuchPort(String),
    /// The tenant still has ports.
    #[error("tenant {0} still has {1} port(s)")]
    TenantInUse(String, usize),
    /// A configuration value is out of range.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// The setting.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// An interface of that name exists where the port's interface should go, and it is not
    /// one the port can take over.
    #[error("{0}")]
    InterfaceInUse(String),
    /// A name breaks the rule for names (`daemon_kit::names`).
    #[error("{0}")]
    BadName(String),
    /// A system call failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The overlay core refused an operation.
    #[error(transparent)]
    Overlay(#[from] overlay_net::Error),
}

impl Error {
    pub(crate) fn invalid(what: &'static str, why: impl Into<String>) -> Error {
        Error::Invalid {
            what,
            why: why.into(),
        }
    }

    pub(crate) fn no_port(port: PortId) -> Error {
        Error::NoSuchPort(format!("#{}", port.0))
    }

    pub(crate) fn no_vni(vni: Vni) -> Error {
        Error::NoSuchTenant(format!("with VNI {vni}"))
    }
}
