//! The sealed envelope shared by catalog blobs (manifests and small records).
//!
//! ```text
//! magic (8) | format version u16 | reserved u16 | nonce (12) | ciphertext + tag (16)
//! ```
//! AES-256-GCM under the catalog key with a random nonce (catalog blobs are never re-encrypted
//! deterministically); the 24-byte header and any `extra_aad` (records bind their blob name) are
//! authenticated.

use ring::aead::{Aad, Nonce, NONCE_LEN};

use crate::error::{Error, Result};
use crate::keys::{random_bytes, Keys};
use crate::seal::TAG_LEN;

/// Bytes before the ciphertext.
pub const HEADER_LEN: usize = 24;

/// What kind of envelope: its magic, version, and the name used in errors.
pub struct Kind {
    /// Magic at the start.
    pub magic: [u8; 8],
    /// Format version written and accepted.
    pub version: u16,
    /// Name of the object in errors.
    pub what: &'static str,
}

/// Seals `body` in an envelope of `kind`.
pub fn seal(keys: &Keys, kind: &Kind, extra_aad: &[u8], mut body: Vec<u8>) -> Result<Vec<u8>> {
    let nonce: [u8; NONCE_LEN] = random_bytes();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
    out.extend_from_slice(&kind.magic);
    out.extend_from_slice(&kind.version.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&nonce);
    let mut aad = out.clone();
    aad.extend_from_slice(extra_aad);
    let tag = keys
        .catalog
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad[..]),
            &mut body,
        )
        .map_err(|_| Error::Invalid(format!("{} too large to encrypt", kind.what)))?;
    out.extend_from_slice(&body);
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens an envelope of `kind` read from blob `name`, returning the plaintext body.
pub fn open(
    keys: &Keys,
    kind: &Kind,
    name: &str,
    extra_aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>> {
    if sealed.len() < HEADER_LEN + TAG_LEN || sealed[..8] != kind.magic {
        return Err(Error::malformed(
            kind.what,
            format!("{name} is not a sealed {}", kind.what),
        ));
    }
    let version = u16::from_le_bytes([sealed[8], sealed[9]]);
    if version != kind.version {
        return Err(Error::UnsupportedVersion {
            what: kind.what,
            found: version,
            supported: kind.version,
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[12..HEADER_LEN]);
    let mut aad = sealed[..HEADER_LEN].to_vec();
    aad.extend_from_slice(extra_aad);
    let mut ct = sealed[HEADER_LEN..].to_vec();
    let len = keys
        .catalog
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad[..]),
            &mut ct,
        )
        .map_err(|_| Error::AuthFailed(format!("catalog entry {name}")))?
        .len();
    ct.truncate(len);
    Ok(ct)
}
