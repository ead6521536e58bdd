//! Keys: one 32-byte master key (the recovery key) derives every other key by HKDF-SHA256.
//!
//! | derived key | label | use |
//! |---|---|---|
//! | data key | `sa-image v1 data` | AES-256-GCM over each stripe |
//! | stripe-id key | `sa-image v1 stripe-id` | keyed BLAKE3 of a stripe's plaintext: its id |
//! | nonce key | `sa-image v1 nonce` | keyed BLAKE3 of a stripe id: its synthetic nonce |
//! | catalog key | `sa-image v1 catalog` | AES-256-GCM over manifests |
//! | volume key | `sa-image v1 volume` | keyed BLAKE3 of a volume name: its id |
//! | identity seed | `sa-image v1 identity` | Ed25519 key pair that proves ownership to agents |
//!
//! Agents only ever learn the identity's public half (the owner id), which decrypts nothing.

use std::fmt;

use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::error::{Error, Result};

/// Length of the master key.
pub const MASTER_KEY_LEN: usize = 32;
/// Prefix of the text form of a master key.
const KEY_TEXT_PREFIX: &str = "sakey1";

/// The recovery key. Everything else derives from it.
#[derive(Clone)]
pub struct MasterKey([u8; MASTER_KEY_LEN]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A new random master key from the OS generator.
    pub fn generate() -> Result<Self> {
        let mut k = [0u8; MASTER_KEY_LEN];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| Error::Invalid("the system random generator failed".into()))?;
        Ok(MasterKey(k))
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; MASTER_KEY_LEN]) -> Self {
        MasterKey(bytes)
    }

    /// The text form to keep offline: `sakey1-` then 16 groups of 4 hex digits and a
    /// 4-digit checksum group, so a mistyped key is caught before it is used.
    pub fn to_text(&self) -> String {
        let hex = hex(&self.0);
        let mut out = String::from(KEY_TEXT_PREFIX);
        for chunk in hex.as_bytes().chunks(4) {
            out.push('-');
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        }
        out.push('-');
        out.push_str(&format!("{:04x}", crc32c::crc32c(&self.0) & 0xffff));
        out
    }

    /// Parses the text form (whitespace and case are ignored).
    pub fn from_text(text: &str) -> Result<Self> {
        let cleaned: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let cleaned = cleaned.to_ascii_lowercase();
        let body = cleaned.strip_prefix(KEY_TEXT_PREFIX).ok_or_else(|| {
            Error::Invalid(format!(
                "not an sa-image key: it must start with '{KEY_TEXT_PREFIX}-'"
            ))
        })?;
        let digits: String = body.chars().filter(|c| *c != '-').collect();
        if digits.len() != MASTER_KEY_LEN * 2 + 4 {
            return Err(Error::Invalid(format!(
                "an sa-image key has {} hex digits, this one has {}",
                MASTER_KEY_LEN * 2 + 4,
                digits.len()
            )));
        }
        let bytes = unhex(&digits[..MASTER_KEY_LEN * 2]).ok_or_else(|| {
            Error::Invalid("the key has a character that is not a hex digit".into())
        })?;
        let mut key = [0u8; MASTER_KEY_LEN];
        key.copy_from_slice(&bytes);
        let check = u32::from_str_radix(&digits[MASTER_KEY_LEN * 2..], 16)
            .map_err(|_| Error::Invalid("the key's checksum group is not hex".into()))?;
        if check != crc32c::crc32c(&key) & 0xffff {
            return Err(Error::Invalid(
                "the key's checksum does not match: a digit is mistyped".into(),
            ));
        }
        Ok(MasterKey(key))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; MASTER_KEY_LEN] {
        &self.0
    }

    /// Derives all working keys.
    pub fn derive(&self) -> Keys {
        Keys::derive(self)
    }

    fn expand(&self, label: &str) -> [u8; 32] {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"sa-image hkdf salt v1");
        let prk = salt.extract(&self.0);
        let info = [label.as_bytes()];
        let okm = prk
            .expand(&info, hkdf::HKDF_SHA256)
            .expect("HKDF-SHA256 can always expand 32 bytes");
        let mut out = [0u8; 32];
        okm.fill(&mut out)
            .expect("HKDF-SHA256 can always fill 32 bytes");
        out
    }
}

/// The public id of an owner: its Ed25519 public key. Agents are started with it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerId(pub [u8; 32]);

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerId({self})")
    }
}

impl std::str::FromStr for OwnerId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bytes = unhex(s.trim()).filter(|b| b.len() == 32).ok_or_else(|| {
            Error::Invalid(format!(
                "'{s}' is not an owner id (64 hex digits; get it with `sa-image owner-id --key KEYFILE`)"
            ))
        })?;
        let mut id = [0u8; 32];
        id.copy_from_slice(&bytes);
        Ok(OwnerId(id))
    }
}

/// The working keys derived from a master key.
pub struct Keys {
    pub(crate) data: LessSafeKey,
    pub(crate) catalog: LessSafeKey,
    pub(crate) stripe_id: [u8; 32],
    pub(crate) stripe_id_chunked: [u8; 32],
    pub(crate) nonce: [u8; 32],
    pub(crate) volume: [u8; 32],
    identity: Ed25519KeyPair,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys(owner {})", self.owner_id())
    }
}

impl Keys {
    fn derive(master: &MasterKey) -> Self {
        let aes = |label: &str| {
            let k = master.expand(label);
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("32-byte AES key"))
        };
        let seed = master.expand("sa-image v1 identity");
        Keys {
            data: aes("sa-image v1 data"),
            catalog: aes("sa-image v1 catalog"),
            stripe_id: master.expand("sa-image v1 stripe-id"),
            stripe_id_chunked: master.expand("sa-image v2 stripe-id"),
            nonce: master.expand("sa-image v1 nonce"),
            volume: master.expand("sa-image v1 volume"),
            identity: Ed25519KeyPair::from_seed_unchecked(&seed).expect("32-byte Ed25519 seed"),
        }
    }

    /// The owner id agents must be started with.
    pub fn owner_id(&self) -> OwnerId {
        let mut id = [0u8; 32];
        id.copy_from_slice(self.identity.public_key().as_ref());
        OwnerId(id)
    }

    /// Signs an agent's authentication challenge.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut sig = [0u8; 64];
        sig.copy_from_slice(self.identity.sign(message).as_ref());
        sig
    }

    /// The id of a volume name: keyed, so agents cannot tell which name it is.
    pub fn volume_id(&self, name: &str) -> [u8; 16] {
        let h = blake3::keyed_hash(&self.volume, name.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.as_bytes()[..16]);
        id
    }
}

/// Checks an owner's signature over a challenge (used by agents; needs no secret).
pub fn verify_owner(owner: &OwnerId, message: &[u8], signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &owner.0)
        .verify(message, signature)
        .is_ok()
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Bytes of a hex string, or `None` when it is not even-length hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Random bytes from the OS generator.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system random generator failed");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_typo_detection() {
        let k = MasterKey::generate().unwrap();
        let text = k.to_text();
        let back = MasterKey::from_text(&text.to_uppercase().replace("SAKEY1", "sakey1")).unwrap();
        assert_eq!(back.0, k.0);
        // Change one digit of the body: the checksum must catch it.
        let mut chars: Vec<char> = text.chars().collect();
        let pos = 8;
        chars[pos] = if chars[pos] == '0' { '1' } else { '0' };
        let typo: String = chars.into_iter().collect();
        assert!(MasterKey::from_text(&typo).is_err());
        assert!(MasterKey::from_text("hello").is_err());
    }

    #[test]
    fn derivation_is_deterministic_and_separated() {
        let k = MasterKey::from_bytes([7; 32]);
        let a = k.derive();
        let b = k.derive();
        assert_eq!(a.owner_id(), b.owner_id());
        assert_eq!(a.stripe_id, b.stripe_id);
        // Different labels give different keys.
        assert_ne!(a.stripe_id, a.nonce);
        assert_ne!(a.nonce, a.volume);
        let other = MasterKey::from_bytes([8; 32]).derive();
        assert_ne!(a.owner_id(), other.owner_id());
        assert_ne!(a.stripe_id, other.stripe_id);
        assert_eq!(a.volume_id("sda"), b.volume_id("sda"));
        assert_ne!(a.volume_id("sda"), other.volume_id("sda"));
    }

    #[test]
    fn owner_signatures_verify() {
        let keys = MasterKey::from_bytes([1; 32]).derive();
        let sig = keys.sign(b"challenge");
        assert!(verify_owner(&keys.owner_id(), b"challenge", &sig));
        assert!(!verify_owner(&keys.owner_id(), b"challengf", &sig));
        let stranger = MasterKey::from_bytes([2; 32]).derive();
        assert!(!verify_owner(&stranger.owner_id(), b"challenge", &sig));
        let parsed: OwnerId = keys.owner_id().to_string().parse().unwrap();
        assert_eq!(parsed, keys.owner_id());
    }
}
