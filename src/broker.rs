//! Starting and stopping the broker: binds one SO_REUSEPORT listener per worker, builds the rings
//! between every pair of workers, spawns the pinned worker threads. The only state shared between
//! threads lives in `Shared`, and none of it is touched per message.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use mio::{Poll, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::ring::{ring, Consumer, Producer};
use crate::worker::{Mail, WAKER};

/// Counters a worker publishes for `$SYS`, stored (not incremented) once per tick by their one
/// writer, so the hot path touches no shared cache line.
#[derive(Default, Debug)]
pub struct WorkerStats {
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub publish_dropped: AtomicU64,
    pub clients_connected: AtomicU64,
    pub sessions: AtomicU64,
    pub retained: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Routing costs, for `$SYS/broker/internal/`: pushes into peer rings, subscription trie
    /// walks, wake-ups of sleeping peers, filters announced to peers.
    pub ring_pushes: AtomicU64,
    /// Messages routed to a peer worker, one per peer.
    pub crossed: AtomicU64,
    pub trie_walks: AtomicU64,
    /// Messages delivered to a subscription read after them (`worker::catchup`).
    pub caught_up: AtomicU64,
    pub wakeups: AtomicU64,
    /// Turns run for a sleeping peer instead of waking it (`worker::Worker::help`).
    pub helped_turns: AtomicU64,
    pub interest_filters: AtomicU64,
    /// Refusals by byte budget (see `worker::limits`).
    pub limits: [AtomicU64; crate::worker::LIMITS],
    /// Messages not delivered by cause (`metrics::Drop`), PUBLISH received by QoS.
    pub drops: [AtomicU64; crate::metrics::DROPS],
    pub received_qos: [AtomicU64; 3],
    /// Payload bytes received by QoS; PUBLISH sent and their payload bytes by QoS.
    pub received_bytes: [AtomicU64; 3],
    pub sent_qos: [AtomicU64; 3],
    pub sent_bytes: [AtomicU64; 3],
    /// Mail waiting in this worker's rings and overflow, last tick.
    pub mail_waiting: AtomicU64,
}

pub struct Shared {
    pub config: Config,
    pub workers: usize,
    pub shutdown: AtomicBool,
    /// Workers that, shutting down, have put the wills of their clients in the rings
    /// (`worker::connect`: shutting down in two steps).
    pub wills_sent: AtomicUsize,
    /// Open connections over all workers, for `max_connections`.
    pub connections: AtomicUsize,
    pub wakers: Vec<Arc<Waker>>,
    /// Whether each worker sleeps (and must be woken for mail).
    pub parking: Vec<crate::ring::Parking>,
    /// Each worker, locked by its thread for a turn and free while it sleeps, when a peer with
    /// mail for it may run a turn for it instead of waking it (`worker::run`).
    pub slots: Vec<std::sync::Mutex<Option<Box<crate::worker::Worker>>>>,
    /// Which workers worker 0's thread serves while the load is light (`worker::host`).
    pub hosting: crate::worker::Hosting,
    pub stats: Vec<WorkerStats>,
    /// Every `[[bridge]]`: its configuration, TLS client configuration and live figures.
    pub bridges: Vec<crate::worker::BridgeShared>,
    /// Each worker's delivery latency (see `metrics::latency`).
    pub latency: Vec<crate::metrics::latency::LatencySlot>,
    /// Decides each client id's home worker; the same keys on every worker.
    pub hasher: ahash::RandomState,
    pub started: Instant,
    pub clients_maximum: AtomicU64,
    /// A worker died (a panic or an I/O error of its poll): the broker stops and exits non-zero.
    pub failed: AtomicBool,
    /// Bytes held by partly received packets over all connections (`max_partial_bytes`).
    pub partial_bytes: AtomicUsize,
    /// Bytes of topic filters over all sessions (`max_subscription_bytes`).
    pub subscription_bytes: AtomicUsize,
    /// Every listener (`Config::listeners()`), and the TLS configuration of those with TLS.
    pub listeners: Vec<crate::config::ListenerConfig>,
    pub tls: crate::transport::TlsConfigs,
    /// Password file, `allow_anonymous` and the verifier pool.
    pub auth: Arc<crate::auth::Auth>,
    /// Persistence (none when off): the store thread's marks, its channel, and what the store
    /// held at start-up for the workers to put back.
    pub store: Option<Arc<crate::store::StoreShared>>,
    pub store_tx: std::sync::Mutex<Option<std::sync::mpsc::Sender<crate::store::Batch>>>,
    pub recovery: Option<Arc<crate::worker::RecoveryPlan>>,
}

/// The hash that places sessions and shared groups: keyed by `placement_seed` when set, else
/// random.
fn placement(seed: Option<u64>) -> ahash::RandomState {
    match seed {
        // Four keys from one: any fixed, distinct derivation will do.
        Some(seed) => ahash::RandomState::with_seeds(
            seed,
            seed ^ 0x9e37_79b9_7f4a_7c15,
            seed.rotate_left(17) ^ 0xbf58_476d_1ce4_e5b9,
            seed.rotate_left(41) ^ 0x94d0_49bb_1331_11eb,
        ),
        None => ahash::RandomState::new(),
    }
}

/// Which of `workers` a key (a client id, a shared group) lives on.
fn home(hasher: &ahash::RandomState, workers: usize, key: impl std::hash::Hash) -> usize {
    (hasher.hash_one(key) % workers as u64) as usize
}

impl Shared {
    pub fn home_of(&self, client_id: &str) -> usize {
        home(&self.hasher, self.workers, client_id)
    }

    /// The worker that keeps a shared subscription group's members and picks who gets a message.
    pub fn home_of_group(&self, group: &str, filter: &str) -> usize {
        home(&self.hasher, self.workers, (group, filter))
    }
}

/// Makes the calling thread SCHED_BATCH (`worker_scheduling`): when a packet or a peer wakes it
/// while its CPU runs another thread, it does not preempt that thread but runs when it sleeps or
/// at the next scheduler tick, so it finds more to do per wake-up. Nothing changes on an idle
/// CPU. No privilege is needed to go from the normal policy to it.
fn schedule_as_batch() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Capacity of each worker-to-worker ring: 16 Ki entries of 16 bytes with a few workers, fewer
/// as the number of rings (workers x (workers - 1)) grows, so that a worker's inbound rings hold
/// about 128 Ki entries (2 MiB) whatever the count, and never fewer than 1 Ki each.
pub fn ring_capacity(workers: usize) -> usize {
    let share = 128 * 1024 / workers.saturating_sub(1).max(1);
    // The largest power of two within the share (rings round up to one).
    (1usize << (usize::BITS - 1 - share.leading_zeros())).clamp(1024, 16 * 1024)
}

#[cfg(test)]
mod tests {
    use super::{home, placement};

    #[test]
    fn a_placement_seed_places_every_client_id_alike_at_every_start() {
        let ids: Vec<String> = (0..1000).map(|i| format!("device-{i}")).collect();
        let places = |seed| ids.iter().map(|id| home(&placement(seed), 4, id.as_str())).collect::<Vec<_>>();
        let seven = places(Some(7));
        assert_eq!(seven, places(Some(7)), "the same seed, the same workers");
        assert_ne!(seven, places(Some(8)), "another seed, another placement");
        // Still a spread: each of the 4 workers gets a fair share of 1,000 ids.
        for w in 0..4 {
            let n = seven.iter().filter(|&&x| x == w).count();
            assert!((150..350).contains(&n), "worker {w} got {n} of 1000");
        }
        // Unset: random per start (two starts agreeing on all 1,000 ids would be a fixed key).
        assert_ne!(places(None), places(None));
    }

    #[test]
    fn ring_memory_per_worker_stays_flat_as_workers_grow() {
        assert_eq!(super::ring_capacity(2), 16 * 1024);
        assert_eq!(super::ring_capacity(16), 8 * 1024);
        assert_eq!(super::ring_capacity(64), 2 * 1024);
        assert_eq!(super::ring_capacity(256), 1024);
    }
}

pub struct Broker {
    /// Each listener's bound address, in `Config::listeners()` order.
    addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    store_thread: Option<JoinHandle<()>>,
}

fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

impl Broker {
    pub fn start(config: Config) -> io::Result<Broker> {
        config.validate().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let n = config.worker_count();
        let (http_specs, specs): (Vec<_>, Vec<_>) =
            config.listeners().into_iter().partition(|l| l.protocol == crate::config::Protocol::Http);
        let tls =
            crate::transport::TlsConfigs::load(&specs).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let auth =
            Arc::new(crate::auth::Auth::new(&config, n).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?);
        // Per listener, one socket per worker: the first bind settles the port (port 0 picks
        // one); the others share it through SO_REUSEPORT. listeners[worker][listener]
        let mut listeners: Vec<Vec<std::net::TcpListener>> = (0..n).map(|_| Vec::new()).collect();
        let mut addrs = Vec::with_capacity(specs.len());
        for spec in &specs {
            let wanted = SocketAddr::new(spec.bind.unwrap_or(config.bind), spec.port);
            let first =
                listener(wanted).map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {wanted}: {e}")))?;
            let addr = first.local_addr()?;
            listeners[0].push(first);
            for l in listeners.iter_mut().skip(1) {
                l.push(listener(addr)?);
            }
            addrs.push(addr);
        }
        let bridges = config
            .bridge
            .iter()
            .map(crate::worker::BridgeShared::new)
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut http_listeners = Vec::new();
        for spec in &http_specs {
            let wanted = SocketAddr::new(spec.bind.unwrap_or(config.bind), spec.port);
            let l = std::net::TcpListener::bind(wanted)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {wanted} (http): {e}")))?;
            http_listeners.push(l);
        }
        let mut polls = Vec::with_capacity(n);
        let mut wakers = Vec::with_capacity(n);
        for _ in 0..n {
            let poll = Poll::new()?;
            wakers.push(Arc::new(Waker::new(poll.registry(), WAKER)?));
            polls.push(poll);
        }
        // rings[from][to]
        let mut producers: Vec<Vec<Option<Producer<Mail>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut consumers: Vec<Vec<Option<Consumer<Mail>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for from in 0..n {
            for to in 0..n {
                if from != to {
                    let (p, c) = ring(ring_capacity(n));
                    producers[from][to] = Some(p);
                    consumers[to][from] = Some(c);
                }
            }
        }
        let mode = crate::store::Mode::parse(&config.persistence).unwrap_or(crate::store::Mode::Off);
        let opened = match (&config.persistence_location, mode) {
            (Some(dir), m) if m != crate::store::Mode::Off => {
                Some(crate::store::Store::open(dir).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?)
            }
            _ => None,
        };
        let hasher = placement(config.placement_seed);
        let mut store_parts = None;
        let mut recovery = None;
        if let Some((store, recovered)) = opened {
            let max_sid = crate::store::Store::max_sid(&recovered);
            let queued: usize = recovered.sessions.iter().map(|s| s.entries.len()).sum();
            log::info!(
                "persistence ({}): recovered {} session(s), {queued} queued message(s), {} retained message(s) in {:.1?}",
                config.persistence,
                recovered.sessions.len(),
                recovered.retained.len(),
                recovered.took
            );
            let ss = Arc::new(crate::store::StoreShared {
                mode,
                workers: n,
                committed: (0..n * n).map(|_| AtomicU64::new(0)).collect(),
                failed: AtomicBool::new(false),
                next_sid: AtomicU64::new(max_sid + 1),
                commits: AtomicU64::new(0),
                ops: AtomicU64::new(0),
                backlog: AtomicUsize::new(0),
            });
            recovery = Some(Arc::new(crate::worker::RecoveryPlan::new(
                recovered,
                n,
                |id| home(&hasher, n, id),
                |g, f| home(&hasher, n, (g, f)),
            )));
            store_parts = Some((store, ss));
        }
        let shared = Arc::new(Shared {
            store: store_parts.as_ref().map(|(_, ss)| ss.clone()),
            store_tx: std::sync::Mutex::new(None),
            recovery,
            workers: n,
            shutdown: AtomicBool::new(false),
            wills_sent: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            wakers,
            parking: (0..n).map(|_| crate::ring::Parking::default()).collect(),
            slots: (0..n).map(|_| std::sync::Mutex::new(None)).collect(),
            hosting: crate::worker::Hosting::new(
                config.host_idle_workers,
                polls.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect(),
            ),
            stats: (0..n).map(|_| WorkerStats::default()).collect(),
            latency: (0..n).map(|_| Default::default()).collect(),
            bridges,
            hasher,
            started: Instant::now(),
            clients_maximum: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            partial_bytes: AtomicUsize::new(0),
            subscription_bytes: AtomicUsize::new(0),
            listeners: specs,
            tls,
            auth,
            config,
        });
        if shared.auth.enabled() {
            let wakers = shared.wakers.clone();
            crate::auth::start_verifiers(&shared.auth, 2, move |w| {
                let _ = wakers[w].wake();
            });
        }
        let mut store_thread = None;
        if let Some((store, ss)) = store_parts {
            let wakers = shared.wakers.clone();
            let interval = std::time::Duration::from_secs(shared.config.persistence_interval);
            let (tx, t) = crate::store::start(store, ss, interval, move |w| {
                let _ = wakers[w].wake();
            });
            *shared.store_tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
            store_thread = Some(t);
        }
        let cores = if shared.config.pin_workers { core_affinity::get_core_ids().unwrap_or_default() } else { vec![] };
        let batch = shared.config.batch_scheduling();
        let mut threads = Vec::with_capacity(n);
        for (id, ((poll, listener), (outbox, inbox))) in
            polls.into_iter().zip(listeners).zip(producers.into_iter().zip(consumers)).enumerate()
        {
            let shared = shared.clone();
            let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
            let listener = listener.into_iter().map(mio::net::TcpListener::from_std).collect();
            let t = std::thread::Builder::new().name(format!("tern-worker-{id}")).spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                if batch {
                    if let Err(e) = schedule_as_batch() {
                        log::warn!("worker {id}: SCHED_BATCH refused ({e}); scheduled as normal");
                    }
                }
                let stopper = Stopper(shared.clone());
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    crate::worker::run(id, shared, poll, listener, outbox, inbox)
                }));
                let why = match run {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(panic) => panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into()),
                };
                // One worker's clients cannot be served any more: stop them all, loudly, rather
                // than run on with part of the broker missing.
                log::error!("worker {id} died ({why}): stopping the broker");
                stopper.0.failed.store(true, Ordering::SeqCst);
                stopper.stop();
            })?;
            threads.push(t);
        }
        log::info!("tern {} listening on {} with {n} worker(s)", env!("CARGO_PKG_VERSION"), addrs[0]);
        if !shared.auth.allow_anonymous {
            log::info!("anonymous clients are not allowed");
        }
        for (i, (spec, addr)) in shared.listeners.iter().zip(&addrs).enumerate().skip(1) {
            log::info!("listener {i} on {addr} ({})", spec.scheme());
        }
        for l in http_listeners {
            let addr = l.local_addr()?;
            log::info!("metrics on http://{addr}/metrics, status page on http://{addr}/");
            addrs.push(addr);
            threads.push(crate::metrics::http::start(l, shared.clone())?);
        }
        Ok(Broker { addrs, shared, threads, store_thread })
    }

    /// The plain listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every listener's address, the plain one first, then the MQTT `[[listener]]`s in order,
    /// then the HTTP ones.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Re-reads TLS certificates and keys (SIGHUP); connections keep theirs. Returns the errors
    /// of listeners that keep their old configuration.
    pub fn reload_tls(&self) -> Vec<String> {
        self.stopper().reload_tls()
    }

    /// Re-reads the password and ACL files (SIGHUP); what does not load keeps its old version.
    pub fn reload_auth(&self) -> Result<(), String> {
        self.stopper().reload_auth()
    }

    /// Whether every worker thread is still running (none has died of a panic).
    pub fn is_healthy(&self) -> bool {
        !self.shared.failed.load(Ordering::SeqCst) && self.threads.iter().all(|t| !t.is_finished())
    }

    /// A handle that can stop the broker from another thread (a signal handler's thread).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.clone())
    }

    /// Stops accepting, publishes the wills of connected clients, flushes, and joins the workers.
    pub fn shutdown(self) -> bool {
        self.stopper().stop();
        self.join()
    }

    /// Waits for the workers to exit (after a `Stopper::stop`). Returns false if any of them
    /// died rather than stopped.
    pub fn join(self) -> bool {
        for t in self.threads {
            let _ = t.join();
        }
        // Every worker has sent its last batch: the store commits it and stops.
        self.shared.store_tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.store_thread {
            let _ = t.join();
        }
        crate::auth::stop_verifiers(&self.shared.auth);
        !self.shared.failed.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    /// See `Broker::reload_tls`.
    pub fn reload_tls(&self) -> Vec<String> {
        self.0.tls.reload(&self.0.listeners)
    }

    /// Re-reads the password file (SIGHUP); on error the old one stays.
    pub fn reload_auth(&self) -> Result<(), String> {
        self.0.auth.reload()
    }

    pub fn stop(&self) {
        self.0.shutdown.store(true, Ordering::SeqCst);
        for w in &self.0.wakers {
            let _ = w.wake();
        }
        self.0.hosting.wake_all();
    }
}
