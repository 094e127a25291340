//! A real etcd cluster (Debian's `etcd-server`), one member per network namespace on the
//! underlay: the store vswitchd hosts share with `--cluster`. Members can be killed,
//! stopped and started again with their data.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::Error;
use crate::daemon::tie_to_parent;
use crate::netns::Netns;
use crate::switch_bed::Underlay;

/// Whether etcd and etcdctl are installed.
pub fn installed() -> bool {
    ["/usr/bin/etcd", "/usr/bin/etcdctl"]
        .iter()
        .all(|p| Path::new(p).is_file())
}

/// One member: its namespace on the underlay, address, data directory and process.
pub struct Member {
    /// The member's host.
    pub ns: Netns,
    /// Its underlay address (client port 2379, peer port 2380).
    pub ip: Ipv4Addr,
    name: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// An etcd cluster of members on the underlay.
pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
    tls: Option<Tls>,
}

/// TLS for clients and peers: the members' certificate (server and client use) and key, and
/// the CA clients and peers must be signed by (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct Tls {
    /// PEM certificate of the members.
    pub cert: String,
    /// Its key.
    pub key: String,
    /// PEM CA that signs the clients' and the peers' certificates.
    pub ca: String,
}

impl EtcdCluster {
    /// Starts one member per address (hosts plugged into `underlay`), data under `dir`, and
    /// waits until the cluster answers.
    pub fn start(
        underlay: &mut Underlay,
        addrs: &[Ipv4Addr],
        dir: &Path,
    ) -> Result<EtcdCluster, Error> {
        Self::start_with(underlay, addrs, dir, None)
    }

    /// Like [`EtcdCluster::start`], with TLS for clients (who must show a certificate of
    /// the CA) and peers.
    pub fn start_with(
        underlay: &mut Underlay,
        addrs: &[Ipv4Addr],
        dir: &Path,
        tls: Option<Tls>,
    ) -> Result<EtcdCluster, Error> {
        let token = format!("lv-test-{}", std::process::id());
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("{}", dir.display()), e))?;
        let mut members = Vec::new();
        for (i, ip) in addrs.iter().enumerate() {
            let ns = underlay.host(&format!("etcd{i}"), *ip)?;
            let name = format!("e{i}");
            members.push(Member {
                ns,
                ip: *ip,
                data: dir.join(&name),
                log: dir.join(format!("{name}.log")),
                name,
                child: None,
            });
        }
        let mut cluster = EtcdCluster {
            members,
            token,
            tls,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i, "new")?;
        }
        cluster.wait_healthy(Duration::from_secs(60))?;
        Ok(cluster)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn initial_cluster(&self) -> String {
        let scheme = self.scheme();
        self.members
            .iter()
            .map(|m| format!("{}={scheme}://{}:2380", m.name, m.ip))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), Error> {
        let initial = self.initial_cluster();
        let token = self.token.clone();
        let scheme = self.scheme();
        let tls = self.tls.clone();
        let m = &mut self.members[i];
        let client = format!("{scheme}://{}:2379", m.ip);
        let peer = format!("{scheme}://{}:2380", m.ip);
        let data = m.data.display().to_string();
        let mut args: Vec<&str> = vec![
            "--name",
            &m.name,
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &initial,
            "--initial-cluster-token",
            &token,
            "--initial-cluster-state",
            state,
        ];
        if let Some(t) = &tls {
            args.extend([
                "--cert-file",
                &t.cert,
                "--key-file",
                &t.key,
                "--trusted-ca-file",
                &t.ca,
                "--client-cert-auth",
                "--peer-cert-file",
                &t.cert,
                "--peer-key-file",
                &t.key,
                "--peer-trusted-ca-file",
                &t.ca,
                "--peer-client-cert-auth",
            ]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .map_err(|e| Error::Io(format!("{}", m.log.display()), e))?;
        let err = log
            .try_clone()
            .map_err(|e| Error::Io("etcd log".into(), e))?;
        let mut cmd = m.ns.command("etcd", &args);
        cmd.stdout(Stdio::from(log)).stderr(Stdio::from(err));
        tie_to_parent(&mut cmd);
        m.child = Some(
            cmd.spawn()
                .map_err(|e| Error::Io("starting etcd".into(), e))?,
        );
        Ok(())
    }

    /// The client endpoints, comma-separated (`--cluster`'s value).
    pub fn endpoints(&self) -> String {
        let scheme = self.scheme();
        self.members
            .iter()
            .map(|m| format!("{scheme}://{}:2379", m.ip))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The members.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills every member.
    pub fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts member `i` again with its data.
    pub fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.kill(i);
        self.spawn(i, "existing")
    }

    /// Waits until the running members answer with a leader (`etcdctl endpoint health`).
    pub fn wait_healthy(&self, timeout: Duration) -> Result<(), Error> {
        let live: Vec<&Member> = self.members.iter().filter(|m| m.child.is_some()).collect();
        let Some(first) = live.first() else {
            return Err(Error::Setup("no etcd member runs".into()));
        };
        let scheme = self.scheme();
        let endpoints = live
            .iter()
            .map(|m| format!("{scheme}://{}:2379", m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec![
            "--endpoints",
            &endpoints,
            "--dial-timeout=2s",
            "endpoint",
            "health",
        ];
        if let Some(t) = &self.tls {
            // The members' certificate is also a client certificate of the CA.
            args.extend(["--cacert", &t.ca, "--cert", &t.cert, "--key", &t.key]);
        }
        crate::wait::until("etcd to be healthy", timeout, || {
            first.ns.exec("etcdctl", &args).is_ok()
        })
        .map_err(|e| Error::Setup(format!("{e}; logs: {}", self.logs())))
    }

    /// The last lines of each member's log (for a failure message).
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let text = std::fs::read_to_string(&m.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(5).collect();
                format!(
                    "{}: {}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}
