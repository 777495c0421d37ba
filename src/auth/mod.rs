//! Who may connect: mosquitto's password file and `allow_anonymous`. Password hashes are checked
//! off the event loops, by a small pool of verifier threads (a `$7$` entry with 210,000
//! iterations costs tens of milliseconds); each worker keeps the checks that passed, keyed by a
//! keyed hash of (user, password, entry), so a reconnect storm of known clients costs no hashing.
//! The password file is read again on SIGHUP; one that does not parse is refused with its line
//! named and the old one stays.

pub mod acl;
pub mod passwd;
pub mod scram;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};

pub use passwd::{Hash, PasswordFile};

/// A password check for the verifier pool.
pub struct Request {
    pub worker: usize,
    pub conn: usize,
    pub uid: u64,
    pub user: String,
    pub password: Vec<u8>,
}

/// Its answer, for the connection's worker.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub conn: usize,
    pub uid: u64,
    /// The password matched: the cache key to remember it by.
    pub passed: Option<u64>,
}

/// What a CONNECT's credentials come to, as far as the worker can tell at once.
pub enum Check {
    /// No check needed, or a cached pass.
    Pass,
    /// Refused: (3.1.1 return code, 5.0 reason code, why).
    Refuse(crate::codec::ReasonCode, crate::codec::ReasonCode, &'static str),
    /// The password must be verified: ask the pool.
    Verify,
}

pub struct Auth {
    path: Option<PathBuf>,
    acl_path: Option<PathBuf>,
    acl: RwLock<Option<Arc<acl::Acl>>>,
    /// Bumped on every ACL reload: sessions rebuild their view when it moves.
    pub acl_generation: std::sync::atomic::AtomicU64,
    passwords: RwLock<Option<Arc<PasswordFile>>>,
    pub allow_anonymous: bool,
    /// Keys the verification cache (random per broker run, so keys cannot be precomputed).
    hasher: ahash::RandomState,
    /// Derives SCRAM stand-in salts for unknown users (random per broker run).
    scram_secret: [u8; 32],
    requests: Mutex<Option<Sender<Request>>>,
    /// Per worker: verdicts waiting, and whether any are.
    verdicts: Vec<Mutex<Vec<Verdict>>>,
    ready: Vec<AtomicBool>,
}

impl Auth {
    /// Loads the password file (an error names the file and line) and decides `allow_anonymous`:
    /// as configured, else mosquitto 2.0's rule (only while every listener is on loopback and
    /// there is no password file).
    pub fn new(config: &crate::config::Config, workers: usize) -> Result<Auth, String> {
        let passwords = match &config.password_file {
            Some(p) => Some(Arc::new(PasswordFile::load(p).map_err(|e| format!("`password_file` {e}"))?)),
            None => None,
        };
        let acl = match &config.acl_file {
            Some(p) => Some(Arc::new(acl::Acl::load(p).map_err(|e| format!("`acl_file` {e}"))?)),
            None => None,
        };
        let loopback_only = config.listeners().iter().all(|l| l.bind.is_some_and(|b| b.is_loopback()));
        let allow_anonymous = config.allow_anonymous.unwrap_or(passwords.is_none() && loopback_only);
        Ok(Auth {
            path: config.password_file.clone(),
            acl_path: config.acl_file.clone(),
            acl: RwLock::new(acl),
            acl_generation: std::sync::atomic::AtomicU64::new(0),
            passwords: RwLock::new(passwords),
            allow_anonymous,
            hasher: ahash::RandomState::new(),
            scram_secret: {
                use rand_core::RngCore;
                let mut s = [0u8; 32];
                rand_core::OsRng.fill_bytes(&mut s);
                s
            },
            requests: Mutex::new(None),
            verdicts: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            ready: (0..workers).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// Whether CONNECTs need looking at at all.
    pub fn enabled(&self) -> bool {
        !self.allow_anonymous || self.path.is_some()
    }

    fn passwords(&self) -> Option<Arc<PasswordFile>> {
        self.passwords.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the password and ACL files (SIGHUP). A file that does not parse is refused and
    /// its old version stays.
    pub fn reload(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if let Some(path) = &self.path {
            match PasswordFile::load(path) {
                Ok(fresh) => *self.passwords.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(fresh)),
                Err(e) => errors.push(format!("`password_file` {e}")),
            }
        }
        if let Some(path) = &self.acl_path {
            match acl::Acl::load(path) {
                Ok(fresh) => {
                    *self.acl.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(fresh));
                    self.acl_generation.fetch_add(1, Ordering::Release);
                }
                Err(e) => errors.push(format!("`acl_file` {e}")),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Whether SCRAM-SHA-256 enhanced authentication can be offered (there is a password file).
    pub fn scram_available(&self) -> bool {
        self.path.is_some()
    }

    /// The SCRAM entry of `user`, or a stand-in that fails at the proof for a user without one
    /// (unknown, or with a `$7$`/`$6$` entry, which SCRAM cannot use).
    pub fn scram_entry(&self, user: &str) -> scram::Entry {
        match self.passwords().as_deref().and_then(|f| f.get(user)) {
            Some((Hash::Scram(entry), _)) => entry.clone(),
            _ => scram::stand_in(&self.scram_secret, user),
        }
    }

    /// A client's view of the ACL file, if there is one.
    pub fn client_acl(&self, user: Option<&str>, client_id: &str) -> Option<acl::ClientAcl> {
        let acl = self.acl.read().unwrap_or_else(|e| e.into_inner()).clone()?;
        Some(acl.client(user, client_id))
    }

    /// The first look at a CONNECT's credentials, on the worker: anonymous, unknown user, or a
    /// pass remembered in `cache`; otherwise the hash must be checked off the loop.
    pub fn check(&self, user: Option<&str>, password: Option<&[u8]>, cache: &std::collections::HashSet<u64>) -> Check {
        use crate::codec::{ConnectReturnCode as V3, ReasonCode as V5};
        let Some(user) = user else {
            return if self.allow_anonymous {
                Check::Pass
            } else {
                Check::Refuse(V3::NOT_AUTHORIZED, V5::NOT_AUTHORIZED, "anonymous clients are not allowed")
            };
        };
        let Some(file) = self.passwords() else {
            return if self.allow_anonymous {
                Check::Pass
            } else {
                Check::Refuse(V3::NOT_AUTHORIZED, V5::NOT_AUTHORIZED, "no password_file to check a password against")
            };
        };
        let bad =
            Check::Refuse(V3::BAD_USER_NAME_OR_PASSWORD, V5::BAD_USER_NAME_OR_PASSWORD, "bad user name or password");
        let Some((_, entry)) = file.get(user) else { return bad };
        let Some(password) = password else { return bad };
        if cache.contains(&self.hasher.hash_one((user, password, entry))) {
            return Check::Pass;
        }
        Check::Verify
    }

    /// Asks the verifier pool to check a password; the verdict comes back to `req.worker`.
    pub fn submit(&self, req: Request) {
        if let Some(tx) = self.requests.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(req);
        }
    }

    /// The verdicts waiting for worker `id`, if any (one relaxed load when there are none).
    pub fn take_verdicts(&self, id: usize, into: &mut Vec<Verdict>) {
        if self.ready[id].swap(false, Ordering::Acquire) {
            into.append(&mut self.verdicts[id].lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    fn verify(&self, req: &Request) -> Option<u64> {
        let file = self.passwords()?;
        let (hash, entry) = file.get(&req.user)?;
        hash.verify(&req.password).then(|| self.hasher.hash_one((req.user.as_str(), req.password.as_slice(), entry)))
    }
}

/// Starts `threads` verifier threads; each answers requests until the broker drops its sender.
/// `wake(worker)` wakes the worker a verdict is for.
pub fn start_verifiers(auth: &Arc<Auth>, threads: usize, wake: impl Fn(usize) + Send + Sync + 'static) {
    let (tx, rx): (Sender<Request>, Receiver<Request>) = channel();
    *auth.requests.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    let rx = Arc::new(Mutex::new(rx));
    let wake = Arc::new(wake);
    for i in 0..threads {
        let (auth, rx, wake) = (auth.clone(), rx.clone(), wake.clone());
        let _ = std::thread::Builder::new().name(format!("tern-verifier-{i}")).spawn(move || loop {
            let req = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                Ok(r) => r,
                Err(_) => return,
            };
            let passed = auth.verify(&req);
            let v = Verdict { conn: req.conn, uid: req.uid, passed };
            auth.verdicts[req.worker].lock().unwrap_or_else(|e| e.into_inner()).push(v);
            auth.ready[req.worker].store(true, Ordering::Release);
            wake(req.worker);
        });
    }
}

/// Stops the verifier threads (they exit once the queue is empty).
pub fn stop_verifiers(auth: &Auth) {
    auth.requests.lock().unwrap_or_else(|e| e.into_inner()).take();
}
