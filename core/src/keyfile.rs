//! Key files: the master key on disk, as its recovery text or wrapped under a passphrase.
//!
//! A key file holds one line. Either the recovery text itself (`sakey1-...`, see
//! [`MasterKey::to_text`]), or `sawkey1-` followed by the hex of a wrapped key:
//!
//! ```text
//! offset size field                         (PLEASE DO NOT MODIFY: key files live for years)
//!      0    8 magic "SA-WRKEY"
//!      8    2 format version (1), LE
//!     10    1 KDF (1 = Argon2id, version 0x13)
//!     11    1 AEAD (1 = AES-256-GCM)
//!     12    4 Argon2 memory cost, KiB, LE
//!     16    4 Argon2 passes, LE
//!     20    4 Argon2 lanes, LE
//!     24   16 salt (random)
//!     40   12 nonce (random)
//!     52   32 the master key, encrypted
//!     84   16 AEAD tag; associated data: bytes 0..52
//! ```
//!
//! The wrapping key is Argon2id(passphrase, salt, params), 32 bytes. The header (params
//! included) is authenticated, so lowering the cost in the file only makes the tag fail.
//! Costs read from a file are bounded ([`MAX_M_COST_KIB`], [`MAX_T_COST`], [`MAX_LANES`]) before
//! any memory is taken, so a hostile file cannot make the reader allocate without limit.
//!
//! Reading a key file ([`read_key_file`]) refuses one that group or others may read
//! (Unix modes `0o077`): the key decrypts every backup.

use std::fmt;
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use crate::error::{Error, Result};
use crate::keys::{hex, random_bytes, unhex, MasterKey, MASTER_KEY_LEN};
use crate::seal::TAG_LEN;

/// Prefix of the text form of a wrapped key.
pub const WRAPPED_TEXT_PREFIX: &str = "sawkey1-";
/// Magic of a wrapped key.
pub const WRAPPED_MAGIC: [u8; 8] = *b"SA-WRKEY";
/// Wrapped key format version.
pub const WRAPPED_VERSION: u16 = 1;
/// Bytes in a wrapped key.
pub const WRAPPED_LEN: usize = 100;
const HEADER_LEN: usize = 52;
const _: () = assert!(WRAPPED_LEN == HEADER_LEN + MASTER_KEY_LEN + TAG_LEN);
const KDF_ARGON2ID: u8 = 1;
const AEAD_AES_256_GCM: u8 = 1;
/// Largest Argon2 memory cost accepted from a file: 4 GiB.
pub const MAX_M_COST_KIB: u32 = 4 << 20;
/// Most Argon2 passes accepted from a file.
pub const MAX_T_COST: u32 = 64;
/// Most Argon2 lanes accepted from a file.
pub const MAX_LANES: u32 = 16;

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory, KiB.
    pub m_cost_kib: u32,
    /// Passes over the memory.
    pub t_cost: u32,
    /// Lanes.
    pub lanes: u32,
}

impl KdfParams {
    /// The default for new key files: 64 MiB, 3 passes, 1 lane (RFC 9106's second
    /// recommendation with one lane: about a quarter of a second here, and 64 MiB per guess).
    pub const DEFAULT: KdfParams = KdfParams {
        m_cost_kib: 64 * 1024,
        t_cost: 3,
        lanes: 1,
    };

    /// Checks the parameters are within what this build accepts.
    pub fn check(&self) -> Result<()> {
        let ok = (1..=MAX_LANES).contains(&self.lanes)
            && (1..=MAX_T_COST).contains(&self.t_cost)
            && self.m_cost_kib >= 8 * self.lanes
            && self.m_cost_kib <= MAX_M_COST_KIB;
        if ok {
            Ok(())
        } else {
            Err(Error::malformed(
                "wrapped key",
                format!(
                    "Argon2id parameters out of range (memory {} KiB, passes {}, lanes {})",
                    self.m_cost_kib, self.t_cost, self.lanes
                ),
            ))
        }
    }

    fn wrapping_key(&self, passphrase: &[u8], salt: &[u8; 16]) -> Result<LessSafeKey> {
        self.check()?;
        let params = argon2::Params::new(self.m_cost_kib, self.t_cost, self.lanes, Some(32))
            .map_err(|e| Error::Invalid(format!("Argon2id parameters: {e}")))?;
        let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut k = [0u8; 32];
        kdf.hash_password_into(passphrase, salt, &mut k)
            .map_err(|e| Error::Invalid(format!("Argon2id failed: {e}")))?;
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("32-byte AES key"));
        k.fill(0);
        Ok(key)
    }
}

/// A master key wrapped under a passphrase.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    params: KdfParams,
    salt: [u8; 16],
    nonce: [u8; NONCE_LEN],
    sealed: [u8; MASTER_KEY_LEN + TAG_LEN],
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedKey({:?})", self.params)
    }
}

impl WrappedKey {
    /// Wraps `key` under `passphrase` with a fresh salt and nonce.
    pub fn wrap(key: &MasterKey, passphrase: &[u8], params: KdfParams) -> Result<Self> {
        if passphrase.is_empty() {
            return Err(Error::Invalid("the passphrase is empty".into()));
        }
        let salt: [u8; 16] = random_bytes();
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let aead = params.wrapping_key(passphrase, &salt)?;
        let mut w = WrappedKey {
            params,
            salt,
            nonce,
            sealed: [0; MASTER_KEY_LEN + TAG_LEN],
        };
        let header = w.header();
        let mut buf = key.as_bytes().to_vec();
        let tag = aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header[..]),
                &mut buf,
            )
            .map_err(|_| Error::Invalid("cannot wrap the key".into()))?;
        w.sealed[..MASTER_KEY_LEN].copy_from_slice(&buf);
        w.sealed[MASTER_KEY_LEN..].copy_from_slice(tag.as_ref());
        buf.fill(0);
        Ok(w)
    }

    /// The Argon2id parameters it was wrapped with.
    pub fn params(&self) -> KdfParams {
        self.params
    }

    /// Unwraps with `passphrase`; [`Error::WrongPassphrase`] when it does not fit.
    pub fn unwrap_key(&self, passphrase: &[u8]) -> Result<MasterKey> {
        let aead = self.params.wrapping_key(passphrase, &self.salt)?;
        let header = self.header();
        let mut buf = self.sealed.to_vec();
        let plain = aead
            .open_in_place(
                Nonce::assume_unique_for_key(self.nonce),
                Aad::from(&header[..]),
                &mut buf,
            )
            .map_err(|_| Error::WrongPassphrase)?;
        let mut k = [0u8; MASTER_KEY_LEN];
        k.copy_from_slice(plain);
        buf.fill(0);
        Ok(MasterKey::from_bytes(k))
    }

    fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&WRAPPED_MAGIC);
        h[8..10].copy_from_slice(&WRAPPED_VERSION.to_le_bytes());
        h[10] = KDF_ARGON2ID;
        h[11] = AEAD_AES_256_GCM;
        h[12..16].copy_from_slice(&self.params.m_cost_kib.to_le_bytes());
        h[16..20].copy_from_slice(&self.params.t_cost.to_le_bytes());
        h[20..24].copy_from_slice(&self.params.lanes.to_le_bytes());
        h[24..40].copy_from_slice(&self.salt);
        h[40..52].copy_from_slice(&self.nonce);
        h
    }

    /// The binary form (see the module docs).
    pub fn to_bytes(&self) -> [u8; WRAPPED_LEN] {
        let mut b = [0u8; WRAPPED_LEN];
        b[..HEADER_LEN].copy_from_slice(&self.header());
        b[HEADER_LEN..].copy_from_slice(&self.sealed);
        b
    }

    /// Parses the binary form; checks magic, version, algorithms and cost bounds.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() != WRAPPED_LEN || b[..8] != WRAPPED_MAGIC {
            return Err(Error::malformed(
                "wrapped key",
                format!("{} bytes without the wrapped-key magic", b.len()),
            ));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != WRAPPED_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "wrapped key",
                found: version,
                supported: WRAPPED_VERSION,
            });
        }
        if b[10] != KDF_ARGON2ID || b[11] != AEAD_AES_256_GCM {
            return Err(Error::malformed(
                "wrapped key",
                format!("unknown KDF {} or cipher {}", b[10], b[11]),
            ));
        }
        let le = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let params = KdfParams {
            m_cost_kib: le(12),
            t_cost: le(16),
            lanes: le(20),
        };
        params.check()?;
        let mut w = WrappedKey {
            params,
            salt: [0; 16],
            nonce: [0; NONCE_LEN],
            sealed: [0; MASTER_KEY_LEN + TAG_LEN],
        };
        w.salt.copy_from_slice(&b[24..40]);
        w.nonce.copy_from_slice(&b[40..52]);
        w.sealed.copy_from_slice(&b[52..]);
        Ok(w)
    }

    /// The text form: `sawkey1-` and hex.
    pub fn to_text(&self) -> String {
        format!("{WRAPPED_TEXT_PREFIX}{}", hex(&self.to_bytes()))
    }
}

/// What a key file holds.
#[derive(Debug)]
pub enum KeyFile {
    /// The master key in clear (its recovery text).
    Plain(MasterKey),
    /// The master key wrapped under a passphrase.
    Wrapped(WrappedKey),
}

impl KeyFile {
    /// Parses a key file's text.
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        match t.strip_prefix(WRAPPED_TEXT_PREFIX) {
            Some(h) => {
                let bytes = unhex(h.trim()).ok_or_else(|| {
                    Error::malformed("wrapped key", "the text after 'sawkey1-' is not hex")
                })?;
                Ok(KeyFile::Wrapped(WrappedKey::from_bytes(&bytes)?))
            }
            None => Ok(KeyFile::Plain(MasterKey::from_text(t)?)),
        }
    }

    /// The text to write to a key file (one line, with its newline).
    pub fn to_text(&self) -> String {
        match self {
            KeyFile::Plain(k) => format!("{}\n", k.to_text()),
            KeyFile::Wrapped(w) => format!("{}\n", w.to_text()),
        }
    }
}

/// Mode bits a key file must not have: any access for group or others.
pub const INSECURE_MODE_BITS: u32 = 0o077;

/// Refuses a key file that group or others may access (Unix).
///
/// Elsewhere a no-op, by design: Windows has no mode bits, and reading a file's ACL needs the
/// Win32 security API, which only `unsafe` bindings offer (forbidden here). The key file of
/// the owner lives on the Linux server; the agent's `identity.key` on a Windows PC is protected
/// by its directory, which `shard-agent service install` closes to everyone but SYSTEM and
/// Administrators.
pub fn check_key_file_mode(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::io(format!("cannot read key file {}", path.display()), e))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & INSECURE_MODE_BITS != 0 {
            return Err(Error::InsecureKeyFile {
                path: path.display().to_string(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Reads and parses a key file, refusing one that others may read.
pub fn read_key_file(path: &Path) -> Result<KeyFile> {
    check_key_file_mode(path)?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("cannot read key file {}", path.display()), e))?;
    KeyFile::parse(&text).map_err(|e| match e {
        Error::Invalid(why) => Error::Invalid(format!("key file {}: {why}", path.display())),
        Error::Malformed { what, why } => Error::Malformed {
            what,
            why: format!("key file {}: {why}", path.display()),
        },
        e => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap parameters: unit tests run unoptimised.
    const FAST: KdfParams = KdfParams {
        m_cost_kib: 64,
        t_cost: 1,
        lanes: 1,
    };

    #[test]
    fn wrap_round_trip_and_wrong_passphrase() {
        let key = MasterKey::from_bytes([3; 32]);
        let w = WrappedKey::wrap(&key, b"correct horse", FAST).unwrap();
        let text = KeyFile::Wrapped(w.clone()).to_text();
        assert!(text.starts_with(WRAPPED_TEXT_PREFIX));
        assert!(
            !text.contains(&hex(&[3; 32])),
            "the key is not in the clear"
        );
        let KeyFile::Wrapped(back) = KeyFile::parse(&text).unwrap() else {
            panic!("not parsed as wrapped")
        };
        assert_eq!(back, w);
        assert_eq!(
            back.unwrap_key(b"correct horse").unwrap().as_bytes(),
            &[3; 32]
        );
        assert!(matches!(
            back.unwrap_key(b"correct horsf"),
            Err(Error::WrongPassphrase)
        ));
        assert!(WrappedKey::wrap(&key, b"", FAST).is_err());
    }

    #[test]
    fn header_is_authenticated_and_bounded() {
        let key = MasterKey::from_bytes([4; 32]);
        let b = WrappedKey::wrap(&key, b"pw", FAST).unwrap().to_bytes();
        // Raising the memory cost (still in bounds) breaks the tag.
        let mut t = b;
        t[12..16].copy_from_slice(&128u32.to_le_bytes());
        let w = WrappedKey::from_bytes(&t).unwrap();
        assert!(matches!(w.unwrap_key(b"pw"), Err(Error::WrongPassphrase)));
        // Out-of-bounds costs are refused before Argon2 runs.
        for (at, v) in [(12, u32::MAX), (16, 0), (16, 1000), (20, 0), (20, u32::MAX)] {
            let mut t = b;
            t[at..at + 4].copy_from_slice(&v.to_le_bytes());
            assert!(WrappedKey::from_bytes(&t).is_err(), "field {at} = {v}");
        }
        let mut v = b;
        v[8] = 2;
        assert!(matches!(
            WrappedKey::from_bytes(&v),
            Err(Error::UnsupportedVersion { .. })
        ));
        assert!(WrappedKey::from_bytes(&b[..99]).is_err());
        assert!(KeyFile::parse("sawkey1-zz").is_err());
    }

    #[test]
    fn plain_key_files_parse() {
        let key = MasterKey::from_bytes([5; 32]);
        let text = KeyFile::Plain(key.clone()).to_text();
        assert!(
            matches!(KeyFile::parse(&text).unwrap(), KeyFile::Plain(k) if k.as_bytes() == &[5; 32])
        );
    }

    #[cfg(unix)]
    #[test]
    fn readable_key_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, MasterKey::from_bytes([6; 32]).to_text()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_key_file(&p).unwrap_err();
        assert!(matches!(e, Error::InsecureKeyFile { mode: 0o644, .. }));
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(read_key_file(&p).unwrap(), KeyFile::Plain(_)));
    }
}
