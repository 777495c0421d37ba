//! SCRAM-SHA-256 (RFC 5802 with RFC 7677's hash), the server's side, sans-io: the MQTT 5.0
//! enhanced authentication method `SCRAM-SHA-256` carries its messages in the Authentication
//! Data of CONNECT, AUTH and CONNACK [MQTT-4.12].
//!
//! The server keeps, per user, only the salt, the iteration count, StoredKey and ServerKey (a
//! password file entry `$scram-sha-256$<iterations>$<salt>$<StoredKey>$<ServerKey>`, standard
//! base64), never the password. The client does the PBKDF2 work; checking its proof costs the
//! server two HMACs and a hash, so it runs on the event loop.
//!
//! ```text
//! client-first  n,,n=<user>,r=<client nonce>                      (CONNECT, or AUTH 0x19)
//! server-first  r=<client nonce><server nonce>,s=<salt>,i=<iterations>      (AUTH 0x18)
//! client-final  c=biws,r=<nonce>,p=<ClientProof>                            (AUTH 0x18)
//! server-final  v=<ServerSignature>                            (CONNACK, or AUTH 0x00)
//! ```

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The MQTT Authentication Method name.
pub const METHOD: &str = "SCRAM-SHA-256";

/// Iterations `tern passwd --scram` uses unless told otherwise: RFC 7677's minimum. The client
/// pays for them on every connection, so a small device can keep its connect time short.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// Longest client nonce taken (RFC 5802 sets no bound; 24 bytes is usual).
const MAX_NONCE: usize = 256;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// What the server stores for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl Entry {
    /// The entry for `password` with a fresh 16-byte salt.
    pub fn new(password: &[u8], iterations: u32) -> Entry {
        use rand_core::RngCore;
        let mut salt = vec![0u8; 16];
        rand_core::OsRng.fill_bytes(&mut salt);
        Self::with_salt(password, salt, iterations)
    }

    pub fn with_salt(password: &[u8], salt: Vec<u8>, iterations: u32) -> Entry {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");
        Entry { iterations, salt, stored_key, server_key }
    }

    /// Whether a plain password (a CONNECT without an authentication method) matches; costs
    /// `iterations` PBKDF2 rounds: off the event loop.
    pub fn verify_password(&self, password: &[u8]) -> bool {
        let fresh = Self::with_salt(password, self.salt.clone(), self.iterations);
        fresh.stored_key.ct_eq(&self.stored_key).into()
    }

    /// Parses the part after `$scram-sha-256$`.
    pub fn parse(fields: &[&str]) -> Result<Entry, String> {
        let [iterations, salt, stored, server] = fields else {
            return Err("expected $scram-sha-256$iterations$salt$StoredKey$ServerKey".into());
        };
        let iterations: u32 =
            iterations.parse().map_err(|_| format!("iteration count {iterations:?} is not a number"))?;
        if iterations == 0 {
            return Err("iteration count 0".into());
        }
        let b64 = |what: &str, s: &str| B64.decode(s).map_err(|e| format!("{what} is not base64: {e}"));
        let key = |what: &str, s: &str| -> Result<[u8; 32], String> {
            b64(what, s)?.try_into().map_err(|_| format!("{what} is not 32 bytes"))
        };
        Ok(Entry {
            iterations,
            salt: b64("salt", salt)?,
            stored_key: key("StoredKey", stored)?,
            server_key: key("ServerKey", server)?,
        })
    }

    pub fn encode(&self) -> String {
        format!(
            "$scram-sha-256${}${}${}${}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// Why an exchange failed: logged, and the client is refused with 0x87 (not authorized).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("SCRAM channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM nonce does not match")]
    Nonce,
    #[error("SCRAM proof is wrong")]
    Proof,
}

/// A client-first-message, parsed.
#[derive(Debug)]
pub struct ClientFirst {
    pub user: String,
    nonce: String,
    gs2_header: String,
    bare: String,
}

impl ClientFirst {
    pub fn parse(data: &[u8]) -> Result<ClientFirst, ScramError> {
        let text = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: a channel-binding flag, an optional authzid, then the bare message.
        let (flag, rest) = text.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel-binding flag")),
        }
        let (authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
        let gs2_header = text[..flag.len() + authzid.len() + 2].to_string();
        let mut attrs = bare.split(',');
        let user = match attrs.next() {
            Some(a) if a.starts_with("m=") => return Err(ScramError::Malformed("mandatory extension")),
            Some(a) => a.strip_prefix("n=").ok_or(ScramError::Malformed("no user name"))?,
            None => return Err(ScramError::Malformed("no user name")),
        };
        let user = unescape(user)?;
        let nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(ScramError::Malformed("no nonce"))?;
        if nonce.is_empty() || nonce.len() > MAX_NONCE || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ScramError::Malformed("bad nonce"));
        }
        if !authzid.is_empty() && authzid.strip_prefix("a=").map(unescape) != Some(Ok(user.clone())) {
            return Err(ScramError::Malformed("an authorization identity other than the user"));
        }
        Ok(ClientFirst { user, nonce: nonce.to_string(), gs2_header, bare: bare.to_string() })
    }
}

/// saslname: `=2C` is `,` and `=3D` is `=`; any other `=` is malformed.
fn unescape(s: &str) -> Result<String, ScramError> {
    if s.is_empty() {
        return Err(ScramError::Malformed("empty user name"));
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad escape in user name")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The server between its server-first-message and the client's final message.
#[derive(Debug)]
pub struct Exchange {
    pub user: String,
    entry: Entry,
    nonce: String,
    gs2_header: String,
    /// client-first-message-bare "," server-first-message.
    auth_so_far: String,
}

impl Exchange {
    /// Answers a client-first-message with the server-first-message. `entry` is the user's, or
    /// a stand-in for an unknown user (so the exchange looks the same and fails at the proof);
    /// `server_nonce` is fresh randomness, printable and without commas.
    pub fn start(first: ClientFirst, entry: Entry, server_nonce: &str) -> (Exchange, String) {
        let nonce = format!("{}{server_nonce}", first.nonce);
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&entry.salt), entry.iterations);
        let auth_so_far = format!("{},{server_first}", first.bare);
        let x = Exchange { user: first.user, entry, nonce, gs2_header: first.gs2_header, auth_so_far };
        (x, server_first)
    }

    /// Checks the client-final-message; on success returns the server-final-message.
    pub fn finish(&self, data: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // The proof is the last attribute; everything before it is signed.
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs.next().and_then(|a| a.strip_prefix("c=")).ok_or(ScramError::Malformed("no c="))?;
        let binding = B64.decode(binding).map_err(|_| ScramError::Malformed("c= is not base64"))?;
        if binding != self.gs2_header.as_bytes() {
            return Err(ScramError::ChannelBinding);
        }
        let nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(ScramError::Malformed("no nonce"))?;
        if nonce.as_bytes().ct_eq(self.nonce.as_bytes()).unwrap_u8() == 0 {
            return Err(ScramError::Nonce);
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?
            .try_into()
            .map_err(|_| ScramError::Proof)?;
        let auth_message = format!("{},{without_proof}", self.auth_so_far);
        let signature = hmac(&self.entry.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if stored.ct_eq(&self.entry.stored_key).unwrap_u8() == 0 {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&self.entry.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// A stand-in entry for a user the password file does not have (or has without a SCRAM
/// entry): its salt is derived from the user name with a per-broker secret, so asking twice
/// gives the same answer and the reply does not tell whether the user exists.
pub fn stand_in(secret: &[u8; 32], user: &str) -> Entry {
    let salt = hmac(secret, user.as_bytes())[..16].to_vec();
    Entry { iterations: DEFAULT_ITERATIONS, salt, stored_key: hmac(secret, b"no such key"), server_key: [0; 32] }
}

/// A fresh server nonce: 18 random bytes in base64 (24 printable characters, no comma).
pub fn server_nonce() -> String {
    use rand_core::RngCore;
    let mut n = [0u8; 18];
    rand_core::OsRng.fill_bytes(&mut n);
    B64.encode(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3's example: user "user", password "pencil".
    #[test]
    fn rfc7677_example() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let entry = Entry::with_salt(b"pencil", salt, 4096);
        assert!(entry.verify_password(b"pencil"));
        assert!(!entry.verify_password(b"pencil!"));
        let first = ClientFirst::parse(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        assert_eq!(first.user, "user");
        let (x, server_first) = Exchange::start(first, entry.clone(), "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
        assert_eq!(
            server_first,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let client_final =
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(x.finish(client_final.as_bytes()).unwrap(), "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        // A flipped bit in the proof, another nonce.
        let bad = client_final.replace("dHzb", "dHzc");
        assert_eq!(x.finish(bad.as_bytes()), Err(ScramError::Proof));
        let bad = client_final.replace("rOpr", "rOps");
        assert_eq!(x.finish(bad.as_bytes()), Err(ScramError::Nonce));
        assert!(
            Entry::parse(&entry.encode()["$scram-sha-256$".len()..].split('$').collect::<Vec<_>>()).unwrap() == entry
        );
    }

    #[test]
    fn hostile_client_first_messages_are_refused() {
        for bad in [
            &b""[..],
            b"n,,",
            b"p=tls-unique,,n=user,r=abc",
            b"n,,m=ext,n=user,r=abc",
            b"n,,n=us=er,r=abc",
            b"n,,n=user",
            b"n,,n=user,r=",
            b"n,a=other,n=user,r=abc",
            b"\xff,,n=user,r=abc",
        ] {
            assert!(ClientFirst::parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(ClientFirst::parse(b"n,,n=a=2Cb=3Dc,r=x").unwrap().user, "a,b=c");
        assert_eq!(ClientFirst::parse(b"y,a=u,n=u,r=x").unwrap().gs2_header, "y,a=u,");
        let x = Exchange::start(ClientFirst::parse(b"n,,n=u,r=x").unwrap(), stand_in(&[7; 32], "u"), "y").0;
        for bad in [&b""[..], b"c=biws,r=xy", b"c=eSws,r=xy,p=AAAA", b"c=biws,r=xy,p=!!", b"c=biws,r=xy,p=AAAA"] {
            assert!(x.finish(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
