//! The I/O shell: one task per vswitchd keeps the host's records in etcd under its lease,
//! mirrors the cluster into a [`ClusterView`] and says which tenants changed; and the
//! cluster-wide operations (tenants, addresses) as etcd transactions.
//!
//! A session: connect, grant a lease, publish the host and its bindings, load the cluster at
//! a revision, then watch from the next revision. Any failure ends the session: the view is
//! kept as it was (the datapath forwards with it), the state is `degraded`, and the next
//! session reloads and replaces the view — what changed meanwhile is a diff, not a flush.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::{Notify, mpsc};
use vswitch_api::{AddressInfo, BindingInfo, ClusterInfo, MemberInfo, TenantSpec};

use crate::Error;
use crate::ipam::Subnet;
use crate::keys::{AddressRecord, BindingRecord, HostRecord, Key, Keys};
use crate::view::{Change, ClusterView, Touched};

/// TLS to etcd: the CA that signs its certificates, and this host's client certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file of the CA.
    pub ca: Option<PathBuf>,
    /// PEM client certificate (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

/// How a vswitchd joins a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd endpoints (`http://10.0.0.1:2379`, `https://...`).
    pub endpoints: Vec<String>,
    /// This host's name in the cluster (unique).
    pub host: String,
    /// Key prefix (default `/libvirtual/`).
    pub prefix: String,
    /// TTL of the lease the host's records live under.
    pub lease_ttl: Duration,
    /// TLS to etcd (with `https://` endpoints).
    pub tls: Option<TlsFiles>,
    /// This host's underlay addresses.
    pub underlay: Vec<IpAddr>,
    /// This host's VXLAN UDP port.
    pub udp_port: u16,
}

/// Allocations younger than this are spared by garbage collection: their port is still
/// being made.
const GC_GRACE_SECS: u64 = 60;
/// How often this host looks for its addresses whose port is gone.
const GC_INTERVAL: Duration = Duration::from_secs(30);
/// Timeout of one etcd request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most operations in one transaction (etcd's default limit is 128).
const TXN_OPS: usize = 100;

#[derive(Debug)]
struct Link {
    connected: bool,
    since: Instant,
    last_error: Option<String>,
    syncs: u64,
}

#[derive(Debug)]
enum Command {
    /// The local binding `(tenant, port)` changed (its record is in `local`, or gone).
    Binding(String, String),
}

struct Inner {
    config: ClusterConfig,
    keys: Keys,
    view: Mutex<ClusterView>,
    link: Mutex<Link>,
    client: Mutex<Option<Client>>,
    /// This host's bindings: (tenant, port) → record.
    local: Mutex<BTreeMap<(String, String), BindingRecord>>,
    commands: mpsc::UnboundedSender<Command>,
    touched: Mutex<Touched>,
    changed: Notify,
    /// The revision of the view last cached.
    cached_revision: std::sync::atomic::AtomicI64,
}

/// A vswitchd's membership in a cluster (cheap to clone).
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Cluster {
    /// Starts the membership on `runtime` with this host's bindings `local` ((tenant, port)
    /// → record): the view begins as `cached` (what the host knew before a restart) until
    /// etcd answers.
    pub fn start(
        config: ClusterConfig,
        runtime: &tokio::runtime::Handle,
        cached: Option<ClusterView>,
        local: BTreeMap<(String, String), BindingRecord>,
    ) -> Result<Cluster, Error> {
        if config.endpoints.is_empty() {
            return Err(Error::Invalid("no etcd endpoint".into()));
        }
        daemon_kit::names::check_name("host", &config.host).map_err(Error::Invalid)?;
        if config.lease_ttl < Duration::from_secs(2) {
            return Err(Error::Invalid("lease TTL: at least 2 seconds".into()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let keys = Keys::new(&config.prefix);
        let inner = Arc::new(Inner {
            config,
            keys,
            view: Mutex::new(cached.unwrap_or_default()),
            link: Mutex::new(Link {
                connected: false,
                since: Instant::now(),
                last_error: Some("connecting".into()),
                syncs: 0,
            }),
            client: Mutex::new(None),
            local: Mutex::new(local),
            commands: tx,
            touched: Mutex::new(Touched {
                all: true,
                tenants: BTreeSet::new(),
                tenant_set: true,
            }),
            changed: Notify::new(),
            cached_revision: std::sync::atomic::AtomicI64::new(0),
        });
        runtime.spawn(run(Arc::downgrade(&inner), rx));
        Ok(Cluster { inner })
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.inner.config.host
    }

    /// This host's underlay addresses.
    pub fn underlay(&self) -> &[IpAddr] {
        &self.inner.config.underlay
    }

    /// This host's VXLAN UDP port.
    pub fn udp_port(&self) -> u16 {
        self.inner.config.udp_port
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// The view of the cluster (locked: keep it short).
    pub fn view(&self) -> MutexGuard<'_, ClusterView> {
        lock(&self.inner.view)
    }

    /// Waits until the view changed, and returns what changed since the last call.
    pub async fn changes(&self) -> Touched {
        loop {
            let t = std::mem::take(&mut *lock(&self.inner.touched));
            if !t.is_empty() {
                return t;
            }
            self.inner.changed.notified().await;
        }
    }

    /// Publishes (or updates) a local port's binding.
    pub fn publish(&self, tenant: &str, port: &str, record: BindingRecord) {
        lock(&self.inner.local).insert((tenant.into(), port.into()), record.clone());
        // The view has it at once (also while etcd is away): ARP answers and programs
        // follow this host's own ports, never a stale record of them.
        lock(&self.inner.view)
            .bindings
            .entry(tenant.into())
            .or_default()
            .insert((self.inner.config.host.clone(), port.into()), record);
        self.touch_tenant(tenant);
        let _ = self
            .inner
            .commands
            .send(Command::Binding(tenant.into(), port.into()));
    }

    /// Withdraws a local port's binding.
    pub fn unpublish(&self, tenant: &str, port: &str) {
        lock(&self.inner.local).remove(&(tenant.into(), port.into()));
        {
            let mut view = lock(&self.inner.view);
            if let Some(b) = view.bindings.get_mut(tenant) {
                b.remove(&(self.inner.config.host.clone(), port.into()));
                if b.is_empty() {
                    view.bindings.remove(tenant);
                }
            }
        }
        self.touch_tenant(tenant);
        let _ = self
            .inner
            .commands
            .send(Command::Binding(tenant.into(), port.into()));
    }

    /// The revision of the view last written to the local cache.
    pub fn cached_revision(&self) -> i64 {
        self.inner
            .cached_revision
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records that the view at `revision` was written to the local cache.
    pub fn note_cached(&self, revision: i64) {
        self.inner
            .cached_revision
            .store(revision, std::sync::atomic::Ordering::Relaxed);
    }

    fn touch_tenant(&self, tenant: &str) {
        let mut t = Touched::default();
        t.tenants.insert(tenant.to_owned());
        touch(&self.inner, t);
    }

    /// Whether etcd answers.
    pub fn is_connected(&self) -> bool {
        lock(&self.inner.link).connected
    }

    /// The status, for the API.
    pub fn info(&self) -> ClusterInfo {
        let link = lock(&self.inner.link);
        let view = lock(&self.inner.view);
        let c = &self.inner.config;
        ClusterInfo {
            mode: "cluster".into(),
            host: Some(c.host.clone()),
            state: Some(
                if link.connected {
                    "connected"
                } else {
                    "degraded"
                }
                .into(),
            ),
            endpoints: c.endpoints.clone(),
            prefix: Some(self.inner.keys.prefix().into()),
            lease_ttl_secs: Some(c.lease_ttl.as_secs()),
            revision: view.revision,
            state_age_secs: link.since.elapsed().as_secs(),
            last_error: link.last_error.clone(),
            syncs: link.syncs,
            cached_revision: self
                .inner
                .cached_revision
                .load(std::sync::atomic::Ordering::Relaxed),
            invalid_records: view.invalid,
        }
    }

    /// The hosts of the cluster.
    pub fn members(&self) -> Vec<MemberInfo> {
        let view = lock(&self.inner.view);
        view.hosts
            .iter()
            .map(|(name, r)| MemberInfo {
                name: name.clone(),
                underlay: r.underlay.clone(),
                udp_port: r.udp_port,
                local: *name == self.inner.config.host,
            })
            .collect()
    }

    /// The bindings of the tenants this host has ports in.
    pub fn bindings(&self) -> Vec<BindingInfo> {
        let view = lock(&self.inner.view);
        view.all_bindings()
            .map(|(tenant, b)| BindingInfo {
                tenant: tenant.into(),
                host: b.host,
                port: b.port,
                mac: b.record.mac,
                ips: b.record.ips,
            })
            .collect()
    }

    fn client(&self) -> Result<Client, Error> {
        lock(&self.inner.client).clone().ok_or_else(|| {
            Error::Unavailable(
                lock(&self.inner.link)
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "not connected".into()),
            )
        })
    }

    /// Creates a cluster tenant: its name and its VNI must both be free in the cluster.
    pub async fn create_tenant(&self, spec: &TenantSpec) -> Result<(), Error> {
        let mut client = self.client()?;
        let k = &self.inner.keys;
        let (tkey, vkey) = (k.tenant(&spec.name), k.vni(spec.vni));
        let value = serde_json::to_vec(spec).map_err(|e| Error::Invalid(e.to_string()))?;
        let txn = Txn::new()
            .when([
                Compare::create_revision(tkey.clone(), CompareOp::Equal, 0),
                Compare::create_revision(vkey.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(tkey.clone(), value, None),
                TxnOp::put(vkey.clone(), spec.name.clone(), None),
            ])
            .or_else([TxnOp::get(tkey, None), TxnOp::get(vkey, None)]);
        let resp = timed(client.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(());
        }
        // Which one is taken: the same tenant again is fine (idempotent create).
        let existing = client.get(k.tenant(&spec.name), None).await.map_err(etcd)?;
        if let Some(kv) = existing.kvs().first() {
            return match serde_json::from_slice::<TenantSpec>(kv.value()) {
                Ok(t) if t == *spec => Ok(()),
                _ => Err(Error::Conflict(format!(
                    "tenant {} exists in the cluster with another configuration",
                    spec.name
                ))),
            };
        }
        Err(Error::Conflict(format!(
            "VNI {} belongs to another tenant of the cluster",
            spec.vni
        )))
    }

    /// Deletes a cluster tenant that has no port on any host (its addresses go with it).
    pub async fn delete_tenant(&self, name: &str) -> Result<bool, Error> {
        let mut client = self.client()?;
        let k = &self.inner.keys;
        let got = timed(client.get(k.tenant(name), None)).await?;
        let Some(kv) = got.kvs().first() else {
            return Ok(false);
        };
        let spec: Option<TenantSpec> = serde_json::from_slice(kv.value()).ok();
        // This host's bindings of ports it no longer has (an unpublish still queued) are
        // not ports in the tenant.
        let mine = timed(client.get(
            format!("{}{}/", k.tenant_bindings(name), self.inner.config.host),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ))
        .await?;
        for b in mine.kvs() {
            if let Some(Key::Binding { tenant, port, .. }) = k.parse(b.key())
                && !lock(&self.inner.local).contains_key(&(tenant, port))
            {
                timed(client.delete(b.key(), None)).await?;
            }
        }
        let mut ops = vec![
            TxnOp::delete(k.tenant(name), None),
            TxnOp::delete(
                k.tenant_addresses(name),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        ];
        if let Some(s) = &spec {
            ops.push(TxnOp::delete(k.vni(s.vni), None));
        }
        let txn = Txn::new()
            .when([
                Compare::mod_revision(k.tenant(name), CompareOp::Equal, kv.mod_revision()),
                // No key in the range: no host has a port in the tenant.
                Compare::version(k.tenant_bindings(name), CompareOp::Equal, 0).with_prefix(),
            ])
            .and_then(ops);
        let resp = timed(client.txn(txn)).await?;
        if !resp.succeeded() {
            return Err(Error::Conflict(format!(
                "tenant {name} has ports on some host of the cluster (or changed meanwhile)"
            )));
        }
        Ok(true)
    }

    /// Takes an address from `tenant`'s subnet for `owner` (a port of this host), unique in
    /// the cluster; the same owner gets the address it already has.
    pub async fn allocate(
        &self,
        tenant: &str,
        subnet: &Subnet,
        owner: &str,
    ) -> Result<AddressInfo, Error> {
        let mut client = self.client()?;
        let k = &self.inner.keys;
        let host = &self.inner.config.host;
        let info = |ip| AddressInfo {
            ip,
            prefix_len: subnet.prefix_len(),
            gateway: subnet.gateway(),
            host: host.clone(),
            owner: owner.to_owned(),
        };
        for _ in 0..32 {
            let (taken, mine) = self.addresses_of(&mut client, tenant).await?;
            if let Some((ip, _, at)) = mine.into_iter().find(|(_, r, _)| r.owner == owner) {
                // Taken again: its grace period starts again (garbage collection must not
                // free it while its port is being made).
                let record = AddressRecord {
                    host: host.clone(),
                    owner: owner.to_owned(),
                    allocated_at: now_secs(),
                };
                let key = k.address(tenant, ip);
                let value =
                    serde_json::to_vec(&record).map_err(|e| Error::Invalid(e.to_string()))?;
                let txn = Txn::new()
                    .when([Compare::mod_revision(key.clone(), CompareOp::Equal, at)])
                    .and_then([TxnOp::put(key, value, None)]);
                if timed(client.txn(txn)).await?.succeeded() {
                    return Ok(info(ip));
                }
                continue;
            }
            let taken: BTreeSet<IpAddr> = taken.into_iter().collect();
            let ip = subnet
                .first_free(&taken, 1 << 20)
                .ok_or_else(|| Error::Exhausted(format!("tenant {tenant}'s subnet is full")))?;
            let record = AddressRecord {
                host: host.clone(),
                owner: owner.to_owned(),
                allocated_at: now_secs(),
            };
            let key = k.address(tenant, ip);
            let value = serde_json::to_vec(&record).map_err(|e| Error::Invalid(e.to_string()))?;
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, value, None)]);
            if timed(client.txn(txn)).await?.succeeded() {
                return Ok(info(ip));
            }
            // Another host took it first: look again.
        }
        Err(Error::Conflict(format!(
            "could not take an address in tenant {tenant}: too much contention"
        )))
    }

    /// Gives back the addresses `owner` (a port of this host) holds in `tenant`; returns how
    /// many.
    pub async fn release(&self, tenant: &str, owner: &str) -> Result<usize, Error> {
        let mut client = self.client()?;
        let k = &self.inner.keys;
        let host = &self.inner.config.host;
        let got = timed(client.get(
            k.tenant_addresses(tenant),
            Some(GetOptions::new().with_prefix()),
        ))
        .await?;
        let mut released = 0;
        for kv in got.kvs() {
            let Ok(r) = serde_json::from_slice::<AddressRecord>(kv.value()) else {
                continue;
            };
            if r.owner == owner && r.host == *host && delete_unchanged(&mut client, kv).await? {
                released += 1;
            }
        }
        Ok(released)
    }

    /// The addresses taken in a tenant.
    pub async fn addresses(
        &self,
        tenant: &str,
        subnet: &Subnet,
    ) -> Result<Vec<AddressInfo>, Error> {
        let mut client = self.client()?;
        let got = timed(client.get(
            self.inner.keys.tenant_addresses(tenant),
            Some(GetOptions::new().with_prefix()),
        ))
        .await?;
        Ok(got
            .kvs()
            .iter()
            .filter_map(|kv| {
                let Some(Key::Address { ip, .. }) = self.inner.keys.parse(kv.key()) else {
                    return None;
                };
                let r: AddressRecord = serde_json::from_slice(kv.value()).ok()?;
                Some(AddressInfo {
                    ip,
                    prefix_len: subnet.prefix_len(),
                    gateway: subnet.gateway(),
                    host: r.host,
                    owner: r.owner,
                })
            })
            .collect())
    }

    /// All addresses taken in `tenant`, and those of this host with their records and
    /// revisions.
    async fn addresses_of(
        &self,
        client: &mut Client,
        tenant: &str,
    ) -> Result<(Vec<IpAddr>, Vec<(IpAddr, AddressRecord, i64)>), Error> {
        let got = timed(client.get(
            self.inner.keys.tenant_addresses(tenant),
            Some(GetOptions::new().with_prefix()),
        ))
        .await?;
        let mut taken = Vec::new();
        let mut mine = Vec::new();
        for kv in got.kvs() {
            let Some(Key::Address { ip, .. }) = self.inner.keys.parse(kv.key()) else {
                continue;
            };
            taken.push(ip);
            if let Ok(r) = serde_json::from_slice::<AddressRecord>(kv.value())
                && r.host == self.inner.config.host
            {
                mine.push((ip, r, kv.mod_revision()));
            }
        }
        Ok((taken, mine))
    }
}

/// Deletes `kv`'s key if it is still as read (no one changed it since); returns whether it
/// did.
async fn delete_unchanged(client: &mut Client, kv: &etcd_client::KeyValue) -> Result<bool, Error> {
    let txn = Txn::new()
        .when([Compare::mod_revision(
            kv.key(),
            CompareOp::Equal,
            kv.mod_revision(),
        )])
        .and_then([TxnOp::delete(kv.key(), None)]);
    Ok(timed(client.txn(txn)).await?.succeeded())
}

fn etcd(e: etcd_client::Error) -> Error {
    Error::Unavailable(e.to_string())
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(etcd),
        Err(_) => Err(Error::Unavailable("etcd did not answer in time".into())),
    }
}

/// The membership task: sessions, one after the other, until the handle is dropped.
async fn run(inner: std::sync::Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let started = Instant::now();
        let error = session(&strong, &mut rx).await;
        *lock(&strong.client) = None;
        {
            let mut link = lock(&strong.link);
            if link.connected {
                link.since = Instant::now();
                tracing::warn!(error = %error, "cluster degraded: etcd does not answer; forwarding with what is known");
            } else {
                tracing::debug!(error = %error, "etcd still unavailable");
            }
            link.connected = false;
            link.last_error = Some(match error {
                Error::Unavailable(m) => m,
                other => other.to_string(),
            });
        }
        drop(strong);
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn connect(config: &ClusterConfig) -> Result<Client, Error> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    if let Some(tls) = &config.tls {
        let mut t = TlsOptions::new();
        if let Some(ca) = &tls.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| Error::Invalid(format!("etcd CA {}: {e}", ca.display())))?;
            t = t.ca_certificate(Certificate::from_pem(pem));
        }
        match (&tls.cert, &tls.key) {
            (Some(c), Some(k)) => {
                let cert = std::fs::read(c)
                    .map_err(|e| Error::Invalid(format!("etcd cert {}: {e}", c.display())))?;
                let key = std::fs::read(k)
                    .map_err(|e| Error::Invalid(format!("etcd key {}: {e}", k.display())))?;
                t = t.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => return Err(Error::Invalid("etcd TLS: give both cert and key".into())),
        }
        options = options.with_tls(t);
    }
    timed(Client::connect(&config.endpoints, Some(options))).await
}

/// Puts this host's record and all its bindings under `lease`.
async fn publish_all(inner: &Inner, client: &mut Client, lease: i64) -> Result<(), Error> {
    let k = &inner.keys;
    let c = &inner.config;
    let host = HostRecord {
        underlay: c.underlay.clone(),
        udp_port: c.udp_port,
    };
    let mut ops = vec![TxnOp::put(
        k.host(&c.host),
        serde_json::to_vec(&host).map_err(|e| Error::Invalid(e.to_string()))?,
        Some(PutOptions::new().with_lease(lease)),
    )];
    let local = lock(&inner.local).clone();
    for ((tenant, port), record) in &local {
        ops.push(TxnOp::put(
            k.binding(tenant, &c.host, port),
            serde_json::to_vec(record).map_err(|e| Error::Invalid(e.to_string()))?,
            Some(PutOptions::new().with_lease(lease)),
        ));
    }
    for chunk in ops.chunks(TXN_OPS) {
        timed(client.txn(Txn::new().and_then(chunk.to_vec()))).await?;
    }
    Ok(())
}

fn hosted(inner: &Inner) -> BTreeSet<String> {
    lock(&inner.local).keys().map(|(t, _)| t.clone()).collect()
}

fn touch(inner: &Inner, t: Touched) {
    if t.is_empty() {
        return;
    }
    lock(&inner.touched).merge(t);
    inner.changed.notify_one();
}

/// One session with etcd; returns why it ended.
async fn session(inner: &Arc<Inner>, rx: &mut mpsc::UnboundedReceiver<Command>) -> Error {
    match session_inner(inner, rx).await {
        Ok(()) => Error::Unavailable("session ended".into()),
        Err(e) => e,
    }
}

async fn session_inner(
    inner: &Arc<Inner>,
    rx: &mut mpsc::UnboundedReceiver<Command>,
) -> Result<(), Error> {
    let c = &inner.config;
    let k = &inner.keys;
    let mut client = connect(c).await?;
    let ttl = c.lease_ttl.as_secs() as i64;
    let lease = timed(client.lease_grant(ttl, None)).await?.id();
    let (keeper, alive) = timed(client.lease_keep_alive(lease)).await?;
    // The lease is renewed by a task of its own from now on: no other call of the session
    // can delay it. Its end (the lease lost) ends the session.
    let (lost_tx, mut lost) = tokio::sync::oneshot::channel();
    let _keeper = AbortOnDrop(tokio::spawn(keep_lease(
        keeper,
        alive,
        c.lease_ttl,
        lost_tx,
    )));
    // What is queued is in `local` already: all of it is published now.
    while rx.try_recv().is_ok() {}
    publish_all(inner, &mut client, lease).await?;
    let mut hosted_now = hosted(inner);
    // One consistent load at revision R: the hosts, the tenants, and the bindings of the
    // tenants this host has ports in (not the whole cluster's).
    let prefix = || Some(GetOptions::new().with_prefix());
    let hosts = timed(client.get(k.hosts(), prefix())).await?;
    let revision = hosts.header().map_or(0, |h| h.revision());
    let at = || Some(GetOptions::new().with_prefix().with_revision(revision));
    let mut kvs: Vec<(Vec<u8>, Vec<u8>)> = hosts
        .kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
        .collect();
    let tenants = timed(client.get(k.tenants(), at())).await?;
    kvs.extend(
        tenants
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec())),
    );
    let mut stale = Vec::new();
    for t in &hosted_now {
        let got = timed(client.get(k.tenant_bindings(t), at())).await?;
        for kv in got.kvs() {
            // A binding of this host that it no longer has (its port went while it was
            // away, under an old lease): deleted now rather than at that lease's expiry.
            if let Some(Key::Binding { tenant, host, port }) = k.parse(kv.key())
                && host == c.host
                && !lock(&inner.local).contains_key(&(tenant, port))
            {
                stale.push(kv.key().to_vec());
                continue;
            }
            kvs.push((kv.key().to_vec(), kv.value().to_vec()));
        }
    }
    for key in stale {
        timed(client.delete(key, None)).await?;
    }
    let mut fresh = ClusterView::default();
    for (key, value) in kvs {
        fresh.apply(k, &Change::Put { key, value }, &|t| hosted_now.contains(t));
    }
    fresh.revision = revision;
    *lock(&inner.view) = fresh;
    *lock(&inner.client) = Some(client.clone());
    {
        let mut link = lock(&inner.link);
        if !link.connected {
            link.since = Instant::now();
        }
        link.connected = true;
        link.last_error = None;
        link.syncs += 1;
    }
    tracing::info!(revision, host = %c.host, "cluster synchronised");
    touch(
        inner,
        Touched {
            all: true,
            tenants: BTreeSet::new(),
            tenant_set: true,
        },
    );
    let mut watch = timed(
        client.watch(
            k.prefix(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1)
                    .with_progress_notify(),
            ),
        ),
    )
    .await?;
    // Bindings of a tenant loaded after the snapshot: events at or before are in the load.
    let mut loaded_at: HashMap<String, i64> = HashMap::new();
    let _gc = AbortOnDrop(tokio::spawn(collect_garbage(inner.clone(), client.clone())));
    loop {
        tokio::select! {
            why = &mut lost => {
                return Err(why.unwrap_or_else(|_| Error::Unavailable("the lease keeper ended".into())));
            }
            msg = watch.message() => {
                let Some(resp) = msg.map_err(etcd)? else {
                    return Err(Error::Unavailable("the watch ended".into()));
                };
                if resp.canceled() {
                    return Err(Error::Unavailable(format!("the watch was cancelled: {}", resp.cancel_reason())));
                }
                let mut touched = Touched::default();
                let mut view = lock(&inner.view);
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    if let Some(Key::Binding { tenant, .. }) = k.parse(kv.key())
                        && loaded_at.get(&tenant).is_some_and(|at| kv.mod_revision() <= *at)
                    {
                        continue;
                    }
                    let change = match ev.event_type() {
                        EventType::Put => Change::Put { key: kv.key().to_vec(), value: kv.value().to_vec() },
                        EventType::Delete => Change::Delete { key: kv.key().to_vec() },
                    };
                    touched.merge(view.apply(k, &change, &|t| hosted_now.contains(t)));
                    view.revision = view.revision.max(kv.mod_revision());
                }
                if let Some(h) = resp.header() {
                    view.revision = view.revision.max(h.revision());
                }
                drop(view);
                touch(inner, touched);
            }
            cmd = rx.recv() => {
                let Some(Command::Binding(tenant, port)) = cmd else {
                    return Err(Error::Unavailable("shutting down".into()));
                };
                let key = k.binding(&tenant, &c.host, &port);
                let record = lock(&inner.local).get(&(tenant.clone(), port.clone())).cloned();
                match record {
                    Some(r) => {
                        let value = serde_json::to_vec(&r).map_err(|e| Error::Invalid(e.to_string()))?;
                        timed(client.put(key, value, Some(PutOptions::new().with_lease(lease)))).await?;
                    }
                    None => {
                        timed(client.delete(key, None)).await?;
                    }
                }
                let now = hosted(inner);
                for t in now.difference(&hosted_now) {
                    // A tenant this host joins: its bindings, at a revision.
                    let got = timed(client.get(k.tenant_bindings(t), Some(GetOptions::new().with_prefix()))).await?;
                    let at = got.header().map_or(0, |h| h.revision());
                    let mut bindings = BTreeMap::new();
                    for kv in got.kvs() {
                        if let Some(Key::Binding { host, port, .. }) = k.parse(kv.key())
                            && let Ok(r) = serde_json::from_slice::<BindingRecord>(kv.value())
                        {
                            bindings.insert((host, port), r);
                        }
                    }
                    lock(&inner.view).set_tenant_bindings(t, bindings);
                    loaded_at.insert(t.clone(), at);
                }
                for t in hosted_now.difference(&now) {
                    lock(&inner.view).drop_tenant_bindings(t);
                    loaded_at.remove(t);
                }
                let mut touched = Touched::default();
                touched.tenants.insert(tenant);
                touched.tenants.extend(now.symmetric_difference(&hosted_now).cloned());
                hosted_now = now;
                touch(inner, touched);
            }
        }
    }
}

/// Renews the lease every TTL/4; reports on `lost` when it cannot within the TTL.
async fn keep_lease(
    mut keeper: etcd_client::LeaseKeeper,
    mut alive: etcd_client::LeaseKeepAliveStream,
    ttl: Duration,
    lost: tokio::sync::oneshot::Sender<Error>,
) {
    let mut renew = tokio::time::interval(ttl / 4);
    let mut renewed = Instant::now();
    let why = loop {
        tokio::select! {
            _ = renew.tick() => {
                if renewed.elapsed() > ttl {
                    break Error::Unavailable("the lease was not renewed within its TTL".into());
                }
                if let Err(e) = timed(keeper.keep_alive()).await {
                    break e;
                }
            }
            msg = alive.message() => match msg {
                Ok(Some(r)) if r.ttl() > 0 => renewed = Instant::now(),
                Ok(Some(_)) => break Error::Unavailable("the lease expired".into()),
                Ok(None) => break Error::Unavailable("the lease keep-alive stream ended".into()),
                Err(e) => break etcd(e),
            },
        }
    };
    let _ = lost.send(why);
}

/// Aborts a task when dropped (the session's helpers end with it).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every [`GC_INTERVAL`], deletes this host's addresses whose port is gone (older than the
/// grace period). Failures wait for the next round.
async fn collect_garbage(inner: Arc<Inner>, mut client: Client) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + GC_INTERVAL, GC_INTERVAL);
    loop {
        tick.tick().await;
        if let Err(e) = collect_garbage_once(&inner, &mut client).await {
            tracing::debug!(error = %e, "address garbage collection");
        }
    }
}

/// Deletes this host's addresses whose port is gone (older than the grace period).
async fn collect_garbage_once(inner: &Inner, client: &mut Client) -> Result<(), Error> {
    let k = &inner.keys;
    let got = timed(client.get(k.addresses(), Some(GetOptions::new().with_prefix()))).await?;
    let now = now_secs();
    for kv in got.kvs() {
        let Some(Key::Address { tenant, ip }) = k.parse(kv.key()) else {
            continue;
        };
        let Ok(r) = serde_json::from_slice::<AddressRecord>(kv.value()) else {
            continue;
        };
        if r.host != inner.config.host || now.saturating_sub(r.allocated_at) < GC_GRACE_SECS {
            continue;
        }
        let in_use = lock(&inner.local).contains_key(&(tenant.clone(), r.owner.clone()));
        if !in_use && delete_unchanged(client, kv).await? {
            tracing::info!(tenant, address = %ip, owner = %r.owner, "address of a port that is gone reclaimed");
        }
    }
    Ok(())
}
