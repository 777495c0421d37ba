//! Persistence: sessions, their queued and in-flight QoS 1/2 messages, and retained messages,
//! kept in an embedded redb database (`persistence_location/tern.redb`) by one store thread.
//!
//! Workers never touch the disk. Each collects what changed during a loop turn into a `Batch`
//! and sends it (one channel send per turn, not per message) to the store thread, which applies
//! every batch waiting in one write transaction: in `durable` mode committed at once with an
//! fsync (group commit: every batch that arrived meanwhile shares it), in `periodic` mode synced
//! once every `persistence_interval` and, between syncs, applied without fsync whenever half of
//! `BACKLOG_MAX` changes wait.
//!
//! A durable acknowledgement must wait for the queue entries of every session the message went
//! to, which live on the subscribers' home workers. So each message a worker persists carries a
//! stamp (origin worker, sequence number); every worker reports in its batches the highest stamp
//! it has routed from each origin, and after a commit the store publishes those as
//! `committed[target][origin]`. A publisher's PUBACK (PUBREC) goes out once every worker the
//! message was handed to has a committed mark at or past its stamp.

pub mod record;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::codec::MqttStr;
use crate::session::Message;
use record::{EntryRecord, SessionRecord};

const SESSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("sessions");
const ENTRIES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("entries");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Changes sent to the store thread and not yet committed past which, in periodic mode, QoS 1/2
/// acknowledgements wait for the commit (so their publishers slow to the disk's pace).
pub const BACKLOG_MAX: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Periodic,
    Durable,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "off" => Some(Mode::Off),
            "periodic" => Some(Mode::Periodic),
            "durable" => Some(Mode::Durable),
            _ => None,
        }
    }
}

/// One change, as a worker saw it.
pub enum Op {
    /// A persistent session's own record (written whole when it changes).
    Session {
        sid: u64,
        record: Bytes,
    },
    /// The session ended: it and its queue go.
    SessionEnd {
        sid: u64,
    },
    /// A queued or in-flight message of a session, new or in a new state.
    Entry {
        sid: u64,
        seq: u64,
        entry: EntryRecord,
    },
    EntryDel {
        sid: u64,
        seq: u64,
    },
    /// A retained message (None: the topic was cleared).
    Retain {
        topic: MqttStr,
        msg: Option<Arc<Message>>,
    },
}

/// What one worker sends after a loop turn.
pub struct Batch {
    pub worker: u16,
    pub ops: Vec<Op>,
    /// (origin worker, highest stamp sequence routed from it), where it moved.
    pub routed: Vec<(u16, u64)>,
}

/// What the workers share with the store thread.
pub struct StoreShared {
    pub mode: Mode,
    pub workers: usize,
    /// committed[target * workers + origin]: the highest stamp from `origin` whose routing on
    /// `target` is on disk.
    pub committed: Vec<AtomicU64>,
    /// A write failed (disk full, I/O error): in durable mode QoS 1/2 publishes are refused.
    pub failed: AtomicBool,
    /// Session ids are unique for the life of the store.
    pub next_sid: AtomicU64,
    /// Commits, and changes they carried (logged at exit: how many changes share a sync).
    pub commits: AtomicU64,
    pub ops: AtomicU64,
    /// Changes sent by workers and not yet staged, plus changes staged and not yet committed.
    pub backlog: std::sync::atomic::AtomicUsize,
}

impl StoreShared {
    pub fn committed(&self, target: usize, origin: usize) -> u64 {
        self.committed[target * self.workers + origin].load(Ordering::Acquire)
    }
}

/// A recovered session with its queue, oldest first.
pub struct RecoveredSession {
    pub sid: u64,
    pub record: SessionRecord,
    pub entries: Vec<(u64, EntryRecord)>,
}

/// What the store held at start-up.
#[derive(Default)]
pub struct Recovered {
    pub sessions: Vec<RecoveredSession>,
    pub retained: Vec<Arc<Message>>,
    /// When the broker last wrote (a lower bound of when it stopped), wall-clock ms.
    pub last_alive: u64,
    pub took: Duration,
}

/// The store: opened (and read) at start-up, then run by its thread.
pub struct Store {
    db: Database,
    path: PathBuf,
    /// Per session in the store, the highest entry number written (entries above it are not on
    /// disk).
    synced: HashMap<u64, u64>,
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> String {
    format!("`persistence_location` {}: {what}: {e}", path.display())
}

impl Store {
    /// Opens (or creates) the store in `dir` and reads everything in it. A directory that
    /// cannot be written, or a store that is corrupt or truncated, is an error naming the file.
    pub fn open(dir: &Path) -> Result<(Store, Recovered), String> {
        let started = Instant::now();
        std::fs::create_dir_all(dir).map_err(|e| err(dir, "cannot create the directory", e))?;
        let path = dir.join("tern.redb");
        // redb needs to write even to open; say so plainly rather than with its own error.
        let probe = dir.join(".tern-write-test");
        std::fs::write(&probe, b"").map_err(|e| err(dir, "the directory is not writable", e))?;
        let _ = std::fs::remove_file(&probe);
        let db = match std::panic::catch_unwind(|| Database::create(&path)) {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(err(&path, "cannot open the store (corrupt or truncated?)", e)),
            Err(_) => return Err(err(&path, "cannot open the store", "the file is corrupt")),
        };
        let mut store = Store { db, path, synced: HashMap::new() };
        let recovered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.read()))
            .unwrap_or_else(|_| Err("the file is corrupt".into()))
            .map_err(|e| err(&store.path, "cannot read the store", e))?;
        for rs in &recovered.sessions {
            store.synced.insert(rs.sid, rs.entries.iter().map(|(seq, _)| *seq).max().unwrap_or(0));
        }
        Ok((store, Recovered { took: started.elapsed(), ..recovered }))
    }

    fn read(&self) -> Result<Recovered, String> {
        let s = |e: &dyn std::fmt::Display| e.to_string();
        // Make sure every table exists, so an empty store reads as empty.
        let w = self.db.begin_write().map_err(|e| s(&e))?;
        {
            w.open_table(SESSIONS).map_err(|e| s(&e))?;
            w.open_table(ENTRIES).map_err(|e| s(&e))?;
            w.open_table(RETAINED).map_err(|e| s(&e))?;
            w.open_table(META).map_err(|e| s(&e))?;
        }
        w.commit().map_err(|e| s(&e))?;
        let r = self.db.begin_read().map_err(|e| s(&e))?;
        let now = Instant::now();
        let wall_now = record::wall_ms();
        let meta = r.open_table(META).map_err(|e| s(&e))?;
        let last_alive = meta.get("last_alive").map_err(|e| s(&e))?.map_or(wall_now, |v| v.value());
        let mut out = Recovered { last_alive, ..Default::default() };
        let sessions = r.open_table(SESSIONS).map_err(|e| s(&e))?;
        let entries = r.open_table(ENTRIES).map_err(|e| s(&e))?;
        for row in sessions.iter().map_err(|e| s(&e))? {
            let (k, v) = row.map_err(|e| s(&e))?;
            let sid = k.value();
            let record = record::get_session(v.value()).map_err(|e| format!("session {sid}: {e}"))?;
            let mut queue = Vec::new();
            for row in entries.range((sid, 0)..=(sid, u64::MAX)).map_err(|e| s(&e))? {
                let (k, v) = row.map_err(|e| s(&e))?;
                let seq = k.value().1;
                let e = record::get_entry(v.value(), now, wall_now).map_err(|e| format!("entry {sid}/{seq}: {e}"))?;
                queue.push((seq, e));
            }
            out.sessions.push(RecoveredSession { sid, record, entries: queue });
        }
        let retained = r.open_table(RETAINED).map_err(|e| s(&e))?;
        for row in retained.iter().map_err(|e| s(&e))? {
            let (k, v) = row.map_err(|e| s(&e))?;
            let mut rd = crate::codec::wire::Reader::new(BytesMut::from(v.value()));
            let m = record::get_message(&mut rd, now, wall_now).map_err(|e| format!("retained {}: {e}", k.value()))?;
            if !m.expired(now) {
                out.retained.push(Arc::new(m));
            }
        }
        Ok(out)
    }

    /// The highest session id in use, so new ones do not collide.
    pub fn max_sid(recovered: &Recovered) -> u64 {
        recovered.sessions.iter().map(|s| s.sid).max().unwrap_or(0)
    }

    /// Runs the store thread until every worker's sender is dropped; then commits what is left.
    pub fn run(mut self, rx: Receiver<Batch>, shared: Arc<StoreShared>, interval: Duration, wake: impl Fn(usize)) {
        let mut marks: Vec<u64> = vec![0; shared.workers * shared.workers];
        let mut last_sync = Instant::now();
        let mut staged = Staged::default();
        // Changes received since the last commit. The backlog counts what workers sent and the
        // store has not staged, plus what is staged (`counted`, as last reported).
        let mut received = 0usize;
        let mut counted = 0usize;
        // A batch arrived since the last commit (it may carry only routing marks, which a commit
        // publishes).
        let mut arrived = false;
        loop {
            let wait = match shared.mode {
                Mode::Durable => Duration::from_millis(100),
                _ => interval.saturating_sub(last_sync.elapsed()).max(Duration::from_millis(1)),
            };
            let mut take = |b: Batch, staged: &mut Staged| {
                received += b.ops.len();
                arrived = true;
                shared.backlog.fetch_sub(b.ops.len(), Ordering::Relaxed);
                for &(origin, seq) in &b.routed {
                    let i = b.worker as usize * shared.workers + origin as usize;
                    marks[i] = marks[i].max(seq);
                }
                staged.add(b.ops, &self.synced);
            };
            let closed = match rx.recv_timeout(wait) {
                Ok(b) => {
                    take(b, &mut staged);
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            while let Ok(b) = rx.try_recv() {
                take(b, &mut staged);
            }
            let now_staged = staged.len();
            if now_staged > counted {
                shared.backlog.fetch_add(now_staged - counted, Ordering::Relaxed);
            } else {
                shared.backlog.fetch_sub(counted - now_staged, Ordering::Relaxed);
            }
            counted = now_staged;
            // Periodic mode syncs once per interval; between syncs, once half of BACKLOG_MAX
            // changes are staged, they are applied in a commit without fsync (lost on a crash, as
            // the interval's changes are anyway), so the stage stays small and acknowledgements
            // are not held while the disk keeps up.
            let sync = closed || shared.mode == Mode::Durable || last_sync.elapsed() >= interval;
            if !sync && staged.len() <= BACKLOG_MAX / 2 {
                continue;
            }
            if sync {
                last_sync = Instant::now();
            }
            if arrived || closed {
                arrived = false;
                if shared.failed.load(Ordering::Relaxed) {
                    staged = Staged::default();
                } else {
                    shared.ops.fetch_add(received as u64, Ordering::Relaxed);
                    let durability = if sync { Durability::Immediate } else { Durability::None };
                    match self.commit(&mut staged, durability) {
                        Ok(()) => {
                            shared.commits.fetch_add(1, Ordering::Relaxed);
                            for (i, m) in marks.iter().enumerate() {
                                shared.committed[i].store(*m, Ordering::Release);
                            }
                            // Held acknowledgements may be due (in periodic mode only those
                            // held past BACKLOG_MAX).
                            for w in 0..shared.workers {
                                wake(w);
                            }
                        }
                        Err(e) => {
                            log::error!(
                                "persistence: writing {} failed: {e}; nothing more is written{}",
                                self.path.display(),
                                if shared.mode == Mode::Durable { " and QoS 1/2 publishes are refused" } else { "" }
                            );
                            shared.failed.store(true, Ordering::SeqCst);
                            staged = Staged::default();
                            for w in 0..shared.workers {
                                wake(w);
                            }
                        }
                    }
                }
                received = 0;
                shared.backlog.fetch_sub(std::mem::take(&mut counted), Ordering::Relaxed);
            }
            if closed {
                log::info!(
                    "persistence: {} commit(s) of {} change(s)",
                    shared.commits.load(Ordering::Relaxed),
                    shared.ops.load(Ordering::Relaxed)
                );
                return;
            }
        }
    }

    /// Writes what is staged in one transaction and empties the stage.
    #[allow(clippy::result_large_err)]
    fn commit(&mut self, staged: &mut Staged, durability: Durability) -> Result<(), redb::Error> {
        let mut w = self.db.begin_write()?;
        w.set_durability(durability);
        let now = Instant::now();
        let wall_now = record::wall_ms();
        let mut buf = BytesMut::new();
        {
            let mut sessions = w.open_table(SESSIONS)?;
            let mut entries = w.open_table(ENTRIES)?;
            let mut retained = w.open_table(RETAINED)?;
            for (sid, record) in staged.sessions.drain() {
                match record {
                    Some(record) => {
                        sessions.insert(sid, &record[..])?;
                        self.synced.entry(sid).or_insert(0);
                    }
                    None => {
                        sessions.remove(sid)?;
                        entries.retain_in((sid, 0)..=(sid, u64::MAX), |_, _| false)?;
                        self.synced.remove(&sid);
                    }
                }
            }
            for ((sid, seq), entry) in std::mem::take(&mut staged.entries) {
                match entry {
                    Some(entry) => {
                        buf.clear();
                        record::put_entry(&mut buf, &entry, now, wall_now);
                        entries.insert((sid, seq), &buf[..])?;
                        let top = self.synced.entry(sid).or_insert(0);
                        *top = (*top).max(seq);
                    }
                    None => {
                        entries.remove((sid, seq))?;
                    }
                }
            }
            for (topic, msg) in staged.retained.drain() {
                match msg {
                    Some(m) => {
                        buf.clear();
                        record::put_message(&mut buf, &m, now, wall_now);
                        retained.insert(topic.as_str(), &buf[..])?;
                    }
                    None => {
                        retained.remove(topic.as_str())?;
                    }
                }
            }
            let mut meta = w.open_table(META)?;
            meta.insert("last_alive", wall_now)?;
        }
        w.commit()?;
        Ok(())
    }
}

/// Changes received and not yet committed, with only the last state of each key: a message
/// queued and completed before the next commit (the common case for a connected subscriber)
/// costs the disk nothing, and a session that ended takes its staged entries with it.
#[derive(Default)]
struct Staged {
    /// Session records (None: the session ended).
    sessions: HashMap<u64, Option<Bytes>>,
    /// Queue entries by (session, entry number) (None: delete it from the disk).
    entries: BTreeMap<(u64, u64), Option<EntryRecord>>,
    retained: HashMap<MqttStr, Option<Arc<Message>>>,
}

impl Staged {
    fn len(&self) -> usize {
        self.sessions.len() + self.entries.len() + self.retained.len()
    }

    /// `synced`: per session, the highest entry number that may be on disk; a deleted entry
    /// above it was never written, so it just leaves the stage.
    fn add(&mut self, ops: Vec<Op>, synced: &HashMap<u64, u64>) {
        for op in ops {
            match op {
                Op::Session { sid, record } => {
                    self.sessions.insert(sid, Some(record));
                }
                Op::SessionEnd { sid } => {
                    self.sessions.insert(sid, None);
                    let gone: Vec<_> = self.entries.range((sid, 0)..=(sid, u64::MAX)).map(|(k, _)| *k).collect();
                    for k in gone {
                        self.entries.remove(&k);
                    }
                }
                Op::Entry { sid, seq, entry } => {
                    self.entries.insert((sid, seq), Some(entry));
                }
                Op::EntryDel { sid, seq } => {
                    if seq > synced.get(&sid).copied().unwrap_or(0) {
                        self.entries.remove(&(sid, seq));
                    } else {
                        self.entries.insert((sid, seq), None);
                    }
                }
                Op::Retain { topic, msg } => {
                    self.retained.insert(topic, msg);
                }
            }
        }
    }
}

/// Starts the store thread. Returns the sender each worker clones.
pub fn start(
    store: Store,
    shared: Arc<StoreShared>,
    interval: Duration,
    wake: impl Fn(usize) + Send + 'static,
) -> (Sender<Batch>, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::Builder::new()
        .name("tern-store".into())
        .spawn(move || store.run(rx, shared, interval, wake))
        .expect("spawn the store thread");
    (tx, t)
}
