//! mosquitto's password file: `user:HASH` lines, `#` comments. Two hash forms are read, both
//! standard base64 with padding:
//! - `$6$<salt>$<hash>`: one SHA-512 of password || salt (mosquitto 1.x, `mosquitto_passwd -H sha512`);
//! - `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512, 64-byte output (mosquitto 2.0 writes 101
//!   iterations and 12-byte salts, 2.1 210,000 and 64): any iteration count and salt length.
//!
//! `tern passwd` writes `$7$` entries, which mosquitto 2.0 reads too; `tern passwd --scram` writes
//! tern's own `$scram-sha-256$<iterations>$<salt>$<StoredKey>$<ServerKey>` entries, which serve
//! SCRAM-SHA-256 enhanced authentication and plain passwords alike (mosquitto does not read them).

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// Iterations `tern passwd` uses unless told otherwise (mosquitto 2.1's choice, OWASP's advice
/// for PBKDF2-HMAC-SHA512).
pub const DEFAULT_ITERATIONS: u32 = 210_000;

/// How one user's password is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hash {
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// tern's own `$scram-sha-256$` entry: a SCRAM-SHA-256 client can authenticate with it
    /// (see `scram`), and a plain password is checked against it too.
    Scram(super::scram::Entry),
}

impl Hash {
    pub fn parse(text: &str) -> Result<Hash, String> {
        let parts: Vec<&str> = text.split('$').collect();
        let b64 = |what: &str, s: &str| B64.decode(s).map_err(|e| format!("{what} is not base64: {e}"));
        match parts.as_slice() {
            ["", "6", salt, hash] => Ok(Hash::Sha512 { salt: b64("salt", salt)?, hash: b64("hash", hash)? }),
            ["", "7", iterations, salt, hash] => {
                let iterations: u32 =
                    iterations.parse().map_err(|_| format!("iteration count {iterations:?} is not a number"))?;
                if iterations == 0 {
                    return Err("iteration count 0".into());
                }
                let hash = b64("hash", hash)?;
                if hash.len() != 64 {
                    return Err(format!("a $7$ hash is 64 bytes, this one {}", hash.len()));
                }
                Ok(Hash::Pbkdf2 { iterations, salt: b64("salt", salt)?, hash })
            }
            ["", "scram-sha-256", rest @ ..] => Ok(Hash::Scram(super::scram::Entry::parse(rest)?)),
            _ => Err("expected $6$salt$hash, $7$iterations$salt$hash or $scram-sha-256$...".into()),
        }
    }

    /// Whether `password` matches, compared in constant time. A `$7$` check costs `iterations`
    /// HMAC-SHA512 rounds: never call it on an event loop.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Sha512 { salt, hash } => {
                let mut h = Sha512::new();
                h.update(password);
                h.update(salt);
                h.finalize().as_slice().ct_eq(hash).into()
            }
            Hash::Pbkdf2 { iterations, salt, hash } => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                out.as_slice().ct_eq(hash).into()
            }
            Hash::Scram(entry) => entry.verify_password(password),
        }
    }

    /// A new `$7$` hash of `password` with a fresh 12-byte salt (as mosquitto 2.0 writes).
    pub fn new_pbkdf2(password: &[u8], iterations: u32) -> Hash {
        use rand_core::RngCore;
        let mut salt = vec![0u8; 12];
        rand_core::OsRng.fill_bytes(&mut salt);
        let mut hash = vec![0u8; 64];
        pbkdf2::pbkdf2_hmac::<Sha512>(password, &salt, iterations, &mut hash);
        Hash::Pbkdf2 { iterations, salt, hash }
    }

    pub fn encode(&self) -> String {
        match self {
            Hash::Sha512 { salt, hash } => format!("$6${}${}", B64.encode(salt), B64.encode(hash)),
            Hash::Pbkdf2 { iterations, salt, hash } => {
                format!("$7${iterations}${}${}", B64.encode(salt), B64.encode(hash))
            }
            Hash::Scram(entry) => entry.encode(),
        }
    }
}

/// The users of a password file and their hashes.
#[derive(Debug, Default, Clone)]
pub struct PasswordFile {
    users: HashMap<String, (Hash, String)>,
}

impl PasswordFile {
    /// Parses the file's text; an error names the line.
    pub fn parse(text: &str) -> Result<PasswordFile, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {}: expected user:hash", i + 1));
            };
            let parsed = Hash::parse(hash).map_err(|e| format!("line {} (user {user}): {e}", i + 1))?;
            users.insert(user.to_string(), (parsed, hash.to_string()));
        }
        Ok(PasswordFile { users })
    }

    pub fn load(path: &std::path::Path) -> Result<PasswordFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A user's hash, and the entry's text (part of the verification cache key, so a changed
    /// entry is checked afresh).
    pub fn get(&self, user: &str) -> Option<(&Hash, &str)> {
        self.users.get(user).map(|(h, text)| (h, text.as_str()))
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// `tern passwd`: edits a password file the way `mosquitto_passwd` does. Lines other than the
/// user's are kept as they are.
pub fn set_user(text: &str, user: &str, entry: Option<&Hash>) -> String {
    let mut out = String::new();
    let mut done = false;
    for line in text.lines() {
        if line.split_once(':').is_some_and(|(u, _)| u == user) {
            if let (Some(h), false) = (entry, done) {
                out.push_str(&format!("{user}:{}\n", h.encode()));
                done = true;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if let (Some(h), false) = (entry, done) {
        out.push_str(&format!("{user}:{}\n", h.encode()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha512_and_pbkdf2_entries_verify_and_round_trip() {
        let h = Hash::new_pbkdf2(b"secret", 101);
        assert!(h.verify(b"secret"));
        assert!(!h.verify(b"Secret"));
        assert_eq!(Hash::parse(&h.encode()).unwrap(), h);
        // $6$: SHA-512 of password || salt.
        let salt = b"0123456789ab".to_vec();
        let mut d = Sha512::new();
        d.update(b"pw");
        d.update(&salt);
        let six = Hash::Sha512 { salt, hash: d.finalize().to_vec() };
        assert!(Hash::parse(&six.encode()).unwrap().verify(b"pw"));
        assert!(!six.verify(b"px"));
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = PasswordFile::parse("# users\nalice:$7$101$AAAA$AAAA\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("alice"), "{e}");
        let e = PasswordFile::parse("bob\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        assert!(PasswordFile::parse("\n# only a comment\n").unwrap().is_empty());
    }

    #[test]
    fn set_user_adds_replaces_and_deletes() {
        let h = Hash::new_pbkdf2(b"a", 1);
        let t = set_user("# keep\nbob:$6$x$y\n", "alice", Some(&h));
        assert!(t.starts_with("# keep\nbob:$6$x$y\nalice:$7$1$"), "{t}");
        let h2 = Hash::new_pbkdf2(b"b", 1);
        let t2 = set_user(&t, "alice", Some(&h2));
        assert_eq!(t2.matches("alice:").count(), 1);
        assert!(t2.contains(&h2.encode()));
        assert_eq!(set_user(&t2, "alice", None), "# keep\nbob:$6$x$y\n");
    }
}
