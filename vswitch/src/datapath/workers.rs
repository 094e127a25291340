//! The worker threads: spawned with their uplinks, configured through worker 0, stopped
//! on drop.

use super::worker::Worker;
use super::*;
use crate::xdp::XdpAttachment;

/// The running datapath: its worker threads and a way to configure it.
pub struct DatapathWorkers {
    shared: Arc<Mutex<Datapath>>,
    commands: mpsc::Sender<Command>,
    stop: Arc<AtomicBool>,
    wakes: Vec<Arc<EventFd>>,
    threads: Vec<JoinHandle<()>>,
    /// Slow kernel work (deleting interfaces: RCU grace periods of 10–20 ms each) runs on
    /// this thread, in the underlay's namespace, so that no worker stalls its ports for it.
    kernel: Option<mpsc::Sender<KernelJob>>,
    kernel_thread: Option<JoinHandle<()>>,
    /// What carries each worker's uplinks (socket or AF_XDP, and why), for the log.
    uplink_paths: Vec<String>,
}

type KernelJob = Box<dyn FnOnce() + Send>;

impl std::fmt::Debug for DatapathWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathWorkers")
            .field("workers", &self.threads.len())
            .finish()
    }
}

/// Binds a worker's uplinks and registers them and its eventfd with its epoll; with AF_XDP
/// configured, worker 0 attaches the XDP program (for the first underlay address) and its
/// socket on queue 0, and worker `i` a socket on queue `i` in the same program
/// (`attachments`: worker 0's, by uplink) while the interface has such a queue. Returns the
/// uplinks and, per uplink, what carries its traffic (for the log).
fn bind_uplinks(
    index: usize,
    addrs: &[SocketAddr],
    attachments: &[Option<Arc<XdpAttachment>>],
    cfg: &DatapathConfig,
    epoll: &Epoll,
    wake: &EventFd,
) -> Result<(Vec<Uplink>, Vec<String>), Error> {
    epoll
        .add(wake, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_CONTROL))
        .map_err(|e| nix_err("epoll_ctl eventfd", e))?;
    let mut uplinks = Vec::new();
    let mut paths = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let mut up = Uplink::bind(*addr, cfg.underlay_mtu, true, cfg.udp6_zero_checksum)?;
        epoll
            .add(
                up.fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_UPLINK + i as u64),
            )
            .map_err(|e| nix_err("epoll_ctl uplink", e))?;
        let bound = up.local_addr().unwrap_or(*addr);
        let path = match cfg.uplink_io {
            UplinkIo::Socket => format!("{bound}: UDP socket"),
            // Another worker: a socket of its own on its own queue, where there is one.
            io if index > 0 => match attachments.get(i).cloned().flatten() {
                Some(a) if (index as u32) < a.queues() => {
                    match up.join_xdp(a, index as u32, io == UplinkIo::Auto) {
                        Ok(what) => what,
                        Err(e) if io == UplinkIo::Xdp => return Err(e),
                        Err(e) => format!("{bound}: UDP socket (AF_XDP does not run: {e})"),
                    }
                }
                Some(a) => format!(
                    "{bound}: UDP socket (the interface has {} receive queue(s); AF_XDP on \
                     the first workers)",
                    a.queues()
                ),
                None => format!("{bound}: UDP socket (AF_XDP is not on worker 0)"),
            },
            // One program and socket, for the first address; the others keep their sockets.
            _ if i > 0 && uplinks.iter().any(|u: &Uplink| u.xdp_fd().is_some()) => {
                format!("{bound}: UDP socket (AF_XDP serves the first underlay address only)")
            }
            io => match up.attach_xdp(0, io == UplinkIo::Auto) {
                Ok(what) => what,
                Err(e) if io == UplinkIo::Xdp => return Err(e),
                Err(e) => format!("{bound}: UDP socket (AF_XDP does not run: {e})"),
            },
        };
        if let Some(fd) = up.xdp_fd() {
            epoll
                .add(
                    fd,
                    EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_UPLINK_XDP + i as u64),
                )
                .map_err(|e| nix_err("epoll_ctl AF_XDP socket", e))?;
        }
        paths.push(path);
        uplinks.push(up);
    }
    Ok((uplinks, paths))
}

impl DatapathWorkers {
    /// Starts the worker threads. `enter` runs first on each of them (e.g. to enter the
    /// underlay's network namespace); their uplinks are bound after it. Fails if another
    /// socket already has an underlay address's VXLAN port.
    pub fn spawn(
        config: DatapathConfig,
        enter: impl Fn() -> Result<(), Error> + Send + Sync + 'static,
    ) -> Result<DatapathWorkers, Error> {
        let count = config.worker_count();
        let mut underlays = Vec::new();
        for ip in &config.underlay {
            let family = UnderlayFamily::of(*ip);
            let inner = mtu::inner_mtu(config.underlay_mtu, family).ok_or_else(|| {
                Error::invalid(
                    "underlay MTU",
                    format!("{} is too small", config.underlay_mtu),
                )
            })?;
            underlays.push((family, inner));
        }
        let mut links = Vec::new();
        for _ in 0..count {
            links.push(WorkerLink {
                epoll: Arc::new(
                    Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
                        .map_err(|e| nix_err("epoll_create", e))?,
                ),
                wake: Arc::new(
                    EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                        .map_err(|e| nix_err("eventfd", e))?,
                ),
                stats: Arc::default(),
            });
        }
        let wakes: Vec<_> = links.iter().map(|l| l.wake.clone()).collect();
        let epolls: Vec<_> = links.iter().map(|l| l.epoll.clone()).collect();
        let stats: Vec<_> = links.iter().map(|l| l.stats.clone()).collect();
        let shared = Arc::new(Mutex::new(Datapath {
            switch: Switch::new(),
            endpoints: HashMap::default(),
            servers: HashMap::default(),
            owner: HashMap::default(),
            workers: links,
            underlays,
            local: config.underlay.iter().map(|a| a.to_canonical()).collect(),
            vtep_ports: HashMap::default(),
            auto_mtu: Default::default(),
        }));
        let (tx, rx) = mpsc::channel::<Command>();
        let enter = Arc::new(enter);
        let (kernel_tx, kernel_rx) = mpsc::channel::<KernelJob>();
        let kernel_enter = enter.clone();
        let (entered_tx, entered_rx) = mpsc::channel::<Result<(), Error>>();
        let kernel_thread = std::thread::Builder::new()
            .name("vswitch-kernel".into())
            .spawn(move || {
                let entered = kernel_enter();
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                if ok {
                    while let Ok(job) = kernel_rx.recv() {
                        // A job that panics fails alone (its caller sees no answer).
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                }
            })
            .map_err(|e| Error::Io("spawn the datapath's kernel thread".into(), e))?;
        entered_rx
            .recv()
            .map_err(|_| Error::invalid("datapath", "its kernel thread died at start"))??;
        let mut workers = DatapathWorkers {
            shared: shared.clone(),
            commands: tx,
            stop: Arc::new(AtomicBool::new(false)),
            wakes: wakes.clone(),
            threads: Vec::new(),
            kernel: Some(kernel_tx),
            kernel_thread: Some(kernel_thread),
            uplink_paths: Vec::new(),
        };
        let epoch = Instant::now();
        let mut rx = Some(rx);
        // Worker 0 binds the configured addresses first (also checking that nobody else has
        // them); the others join its sockets' SO_REUSEPORT groups on the very same ports.
        let mut addrs: Vec<SocketAddr> = config
            .underlay
            .iter()
            .map(|ip| SocketAddr::new(*ip, config.udp_port))
            .collect();
        // Worker 0's XDP programs (by uplink), which the others' AF_XDP sockets join.
        let mut attachments: Vec<Option<Arc<XdpAttachment>>> = Vec::new();
        type Ready = (
            Vec<SocketAddr>,
            Vec<String>,
            Vec<Option<Arc<XdpAttachment>>>,
        );
        for index in 0..count {
            let (ready_tx, ready_rx) = mpsc::channel::<Result<Ready, Error>>();
            let (enter, cfg, bind_to) = (enter.clone(), config.clone(), addrs.clone());
            let joining = attachments.clone();
            let (epoll, wake, stats) = (
                epolls[index].clone(),
                wakes[index].clone(),
                stats[index].clone(),
            );
            let (shared, stop, commands) = (shared.clone(), workers.stop.clone(), rx.take());
            let thread = std::thread::Builder::new()
                .name(format!("vswitch-dp{index}"))
                .spawn(move || {
                    let setup = enter().and_then(|()| {
                        if index == 0 {
                            for a in &bind_to {
                                // A plain bind fails if any socket has the port, SO_REUSEPORT
                                // group or not: never share an address with another switch.
                                std::net::UdpSocket::bind(a)
                                    .map_err(|e| Error::Io(format!("bind {a}"), e))?;
                            }
                        }
                        bind_uplinks(index, &bind_to, &joining, &cfg, &epoll, &wake)
                    });
                    let uplinks = match setup {
                        Ok((u, paths)) => {
                            let bound = u.iter().filter_map(Uplink::local_addr).collect();
                            let programs = u.iter().map(Uplink::xdp_attachment).collect();
                            let _ = ready_tx.send(Ok((bound, paths, programs)));
                            u
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let worker = Worker::new(index, shared, epoll, stats, uplinks, epoch);
                    debug_assert!(index == 0 || commands.is_none());
                    worker.run(&wake, &stop, commands);
                })
                .map_err(|e| Error::Io("spawn datapath worker".into(), e))?;
            workers.threads.push(thread);
            let (bound, paths, programs) = ready_rx
                .recv()
                .map_err(|_| Error::invalid("datapath", "worker died during setup"))??;
            if index == 0 {
                addrs = bound;
                attachments = programs;
            }
            workers
                .uplink_paths
                .extend(paths.into_iter().map(|p| format!("worker {index}: {p}")));
        }
        Ok(workers)
    }

    /// Runs `f` on worker 0 between its bursts, with the datapath locked, in the underlay's
    /// network namespace, and returns its result.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Datapath) -> R + Send + 'static,
    ) -> Result<R, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.commands
            .send(Box::new(move |dp: &mut Datapath| {
                let _ = tx.send(f(dp));
            }))
            .map_err(|_| Error::invalid("datapath", "worker 0 is gone"))?;
        self.wakes[0]
            .write(1)
            .map_err(|e| nix_err("eventfd write", e))?;
        rx.recv()
            .map_err(|_| Error::invalid("datapath", "worker 0 is gone"))
    }

    /// Removes a port: taken out of the datapath on worker 0 (at once, between bursts), its
    /// interface deleted on the kernel thread, so that no worker waits for the kernel. Returns
    /// when the interface is gone (a veth's descriptor is closed after that, unwaited). Once
    /// the port is out of the datapath the removal has happened: `Ok(Some(e))` says its
    /// interface could not be deleted (it is left behind, and `e` says why).
    pub fn remove_port(&self, name: &str) -> Result<Option<Error>, Error> {
        let n = name.to_owned();
        let detached = self.call(move |dp| dp.detach_port(&n))??;
        let (tx, rx) = mpsc::sync_channel(1);
        let gone = || Error::invalid("datapath", "its kernel thread is gone");
        let Some(kernel) = self.kernel.as_ref() else {
            return Ok(Some(gone()));
        };
        let job: KernelJob = Box::new(move || match detached.delete_interface() {
            Ok(closed_later) => {
                let _ = tx.send(Ok(()));
                drop(closed_later);
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        });
        if kernel.send(job).is_err() {
            return Ok(Some(gone()));
        }
        Ok(match rx.recv() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(gone()),
        })
    }

    /// Reads the shared state from the calling thread (counters, tables); for anything that
    /// creates interfaces use [`Self::call`], which runs in the underlay's namespace.
    pub fn with<R>(&self, f: impl FnOnce(&Datapath) -> R) -> R {
        f(&lock(&self.shared))
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.threads.len()
    }

    /// What carries each worker's uplinks: the UDP socket or AF_XDP (interface, queue,
    /// mode), and why AF_XDP does not run where it was asked for.
    pub fn uplink_paths(&self) -> &[String] {
        &self.uplink_paths
    }
}

impl Drop for DatapathWorkers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for w in &self.wakes {
            let _ = w.write(1);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        drop(self.kernel.take());
        if let Some(t) = self.kernel_thread.take() {
            let _ = t.join();
        }
    }
}
