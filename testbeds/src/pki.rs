//! A throwaway test PKI made with `openssl`: CAs and leaf certificates (EC P-256, 30 days),
//! as `NAME-cert.pem` and `NAME-key.pem` in one directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Error;

/// Serial numbers: unique per certificate of a test process.
static SERIAL: AtomicU64 = AtomicU64::new(1);

/// A directory of test certificates.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// An empty PKI in `dir` (created).
    pub fn new(dir: &Path) -> Result<Pki, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("{}", dir.display()), e))?;
        Ok(Pki {
            dir: dir.to_owned(),
        })
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of a file of the PKI (`ca-cert.pem`, `server-key.pem`...).
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn openssl(&self, args: &[&str]) -> Result<(), Error> {
        crate::netns::run(Command::new("openssl").args(args)).map(|_| ())
    }

    /// A self-signed CA `name`.
    pub fn ca(&self, name: &str) -> Result<(), Error> {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "30",
            "-subj",
            &format!("/CN=libvirtual test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &self.path(&format!("{name}-key.pem")),
            "-out",
            &self.path(&format!("{name}-cert.pem")),
        ])
    }

    /// A certificate `name` signed by CA `ca`, for `purpose` (`serverAuth`, `clientAuth`)
    /// with subject alternative names `san` (`IP:127.0.0.1,DNS:localhost`).
    pub fn leaf(&self, ca: &str, name: &str, purpose: &str, san: &str) -> Result<(), Error> {
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={purpose}\nsubjectAltName={san}\n"
            ),
        )
        .map_err(|e| Error::Io(format!("{}", ext.display()), e))?;
        let csr = self.path(&format!("{name}.csr"));
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &self.path(&format!("{name}-key.pem")),
            "-out",
            &csr,
        ])?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &self.path(&format!("{ca}-cert.pem")),
            "-CAkey",
            &self.path(&format!("{ca}-key.pem")),
            "-set_serial",
            &format!(
                "{}",
                u64::from(std::process::id()) * 1000 + SERIAL.fetch_add(1, Ordering::Relaxed)
            ),
            "-days",
            "30",
            "-extfile",
            &ext.display().to_string(),
            "-out",
            &self.path(&format!("{name}-cert.pem")),
        ])
    }
}
