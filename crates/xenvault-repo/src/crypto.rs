//! Keys and ciphers: chunk ids, the master key, per-purpose subkeys, AEAD, key slots.
//!
//! An encrypted repository has one random 32-byte master key. It is stored only
//! wrapped: each key slot (`keys/<slot>`) holds it sealed with AES-256-GCM under a
//! key derived from a password with Argon2id. Three subkeys are derived from the
//! master key with HKDF-SHA256 (salt = the repository id's 16 bytes):
//! `xenvault-repo v1 chunk-id` (keyed BLAKE3 chunk ids), `… data` (chunk blobs) and
//! `… metadata` (indexes, manifests, prune marks).

use std::fmt;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use serde::{Deserialize, Serialize};

use crate::error::{RepoError, Result};

/// Length of chunk ids and keys.
pub const KEY_LEN: usize = 32;
/// AEAD nonce length.
pub const NONCE_LEN: usize = 12;
/// AEAD tag length.
pub const TAG_LEN: usize = 16;

/// A chunk id: BLAKE3 of the chunk's plaintext (keyed in encrypted repositories).
/// All 32 bytes zero is reserved for "all-zero chunk, not stored".
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ChunkId(pub [u8; KEY_LEN]);

impl ChunkId {
    /// The reserved id of an all-zero chunk (never stored).
    pub const ZERO: ChunkId = ChunkId([0; KEY_LEN]);

    /// True for the reserved zero id.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; KEY_LEN]
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<ChunkId> {
        let mut out = [0u8; KEY_LEN];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkId(out))
    }

    /// The object key of the chunk: `chunks/<first 2 hex>/<64 hex>`.
    pub fn object_key(&self) -> String {
        let h = self.to_hex();
        format!("chunks/{}/{}", &h[..2], h)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The AEAD used for blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CipherKind {
    /// AES-256-GCM (fast with AES-NI; the default).
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305 (for CPUs without AES instructions).
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl CipherKind {
    /// Its code in the blob header.
    pub fn code(self) -> u8 {
        match self {
            CipherKind::Aes256Gcm => 1,
            CipherKind::ChaCha20Poly1305 => 2,
        }
    }

    /// The cipher for a header code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(CipherKind::Aes256Gcm),
            2 => Some(CipherKind::ChaCha20Poly1305),
            _ => None,
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            CipherKind::Aes256Gcm => &aead::AES_256_GCM,
            CipherKind::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// An AEAD key with random nonces.
pub struct Cipher {
    kind: CipherKind,
    key: LessSafeKey,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cipher({:?})", self.kind)
    }
}

/// Fills `buf` from the system's cryptographic RNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    aws_lc_rs::rand::fill(buf).map_err(|_| RepoError::Task("system random generator failed".into()))
}

impl Cipher {
    /// A cipher of `kind` with `key`.
    pub fn new(kind: CipherKind, key: &[u8; KEY_LEN]) -> Result<Self> {
        let unbound = UnboundKey::new(kind.algorithm(), key)
            .map_err(|_| RepoError::Task("AEAD key setup failed".into()))?;
        Ok(Cipher {
            kind,
            key: LessSafeKey::new(unbound),
        })
    }

    /// Which AEAD this is.
    pub fn kind(&self) -> CipherKind {
        self.kind
    }

    /// Encrypts `buf` in place with a fresh random nonce and appends the tag;
    /// returns the nonce.
    pub fn seal(&self, aad: &[u8], buf: &mut Vec<u8>) -> Result<[u8; NONCE_LEN]> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
            .map_err(|_| RepoError::Task("AEAD seal failed".into()))?;
        Ok(nonce)
    }

    /// Encrypts `buf` in place and returns the random nonce and the tag (to be
    /// stored after the ciphertext), so a caller can encrypt inside its output
    /// buffer without another copy.
    pub fn seal_detached(
        &self,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<([u8; NONCE_LEN], [u8; TAG_LEN])> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
            .map_err(|_| RepoError::Task("AEAD seal failed".into()))?;
        let mut t = [0u8; TAG_LEN];
        if tag.as_ref().len() != TAG_LEN {
            return Err(RepoError::Task("AEAD tag has an unexpected length".into()));
        }
        t.copy_from_slice(tag.as_ref());
        Ok((nonce, t))
    }

    /// Decrypts `buf` (ciphertext + tag) in place; returns the plaintext length,
    /// or `None` when authentication fails.
    pub fn open(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> Option<usize> {
        self.key
            .open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
            .ok()
            .map(|p| p.len())
    }
}

/// The keys of an unlocked encrypted repository.
pub struct RepoKeys {
    master: [u8; KEY_LEN],
    /// Key for BLAKE3 keyed chunk ids.
    pub id_key: [u8; KEY_LEN],
    /// Cipher of chunk blobs.
    pub data: Cipher,
    /// Cipher of indexes, manifests and other metadata.
    pub meta: Cipher,
}

impl fmt::Debug for RepoKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RepoKeys(..)")
    }
}

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        KEY_LEN
    }
}

fn hkdf_expand(master: &[u8; KEY_LEN], salt: &[u8], info: &str) -> Result<[u8; KEY_LEN]> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(master);
    let info = [info.as_bytes()];
    let okm = prk
        .expand(&info, Len32)
        .map_err(|_| RepoError::Task("HKDF expand failed".into()))?;
    let mut out = [0u8; KEY_LEN];
    okm.fill(&mut out)
        .map_err(|_| RepoError::Task("HKDF fill failed".into()))?;
    Ok(out)
}

impl RepoKeys {
    /// Derives the subkeys from `master` for the repository `repo_id`.
    pub fn derive(master: [u8; KEY_LEN], repo_id: &uuid::Uuid, cipher: CipherKind) -> Result<Self> {
        let salt = repo_id.as_bytes();
        let id_key = hkdf_expand(&master, salt, "xenvault-repo v1 chunk-id")?;
        let data = Cipher::new(
            cipher,
            &hkdf_expand(&master, salt, "xenvault-repo v1 data")?,
        )?;
        let meta = Cipher::new(
            cipher,
            &hkdf_expand(&master, salt, "xenvault-repo v1 metadata")?,
        )?;
        Ok(RepoKeys {
            master,
            id_key,
            data,
            meta,
        })
    }

    /// The master key (to wrap it into a new key slot).
    pub fn master(&self) -> &[u8; KEY_LEN] {
        &self.master
    }
}

/// Computes the id of a chunk: plain or keyed BLAKE3; the zero id for all-zero data.
pub fn chunk_id(id_key: Option<&[u8; KEY_LEN]>, data: &[u8]) -> ChunkId {
    if xenvault_types::extent::is_all_zero(data) {
        return ChunkId::ZERO;
    }
    let h = match id_key {
        Some(k) => blake3::keyed_hash(k, data),
        None => blake3::hash(data),
    };
    ChunkId(*h.as_bytes())
}

/// Largest Argon2id memory cost accepted from a key slot (4 GiB).
const MAX_KDF_MEMORY_KIB: u32 = 4 * 1024 * 1024;

/// Argon2id cost parameters of a key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane (about 0.2 s on this project's reference machine).
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests only: never use them for a real repository.
    pub fn insecure_for_tests() -> Self {
        KdfParams {
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
        }
    }

    fn derive(&self, password: &[u8], salt: &[u8]) -> Result<[u8; KEY_LEN]> {
        let params = argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(KEY_LEN))
            .map_err(|e| RepoError::invalid("Argon2id parameters", e.to_string()))?;
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; KEY_LEN];
        a.hash_password_into(password, salt, &mut out)
            .map_err(|e| RepoError::invalid("password or salt", e.to_string()))?;
        Ok(out)
    }
}

/// A key slot (`keys/<id>`): the master key wrapped under a password-derived key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySlot {
    /// Slot format version (1).
    pub version: u32,
    /// Slot id (16 hex characters); also its object name.
    pub id: String,
    /// Free text: who or what this key is for.
    pub label: String,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Always `argon2id`.
    pub kdf: String,
    /// Argon2id cost.
    pub kdf_params: KdfParams,
    /// Argon2 salt, hex (32 bytes).
    pub salt: String,
    /// Always `aes-256-gcm`.
    pub wrap: String,
    /// Wrapping nonce, hex (12 bytes).
    pub nonce: String,
    /// Wrapped master key + tag, hex (48 bytes).
    pub wrapped_key: String,
}

fn slot_aad(repo_id: &uuid::Uuid, slot_id: &str) -> Vec<u8> {
    let mut aad = b"xenvault-repo v1 key slot\0".to_vec();
    aad.extend_from_slice(repo_id.as_bytes());
    aad.extend_from_slice(slot_id.as_bytes());
    aad
}

impl KeySlot {
    /// Wraps `master` under `password`.
    pub fn seal(
        repo_id: &uuid::Uuid,
        master: &[u8; KEY_LEN],
        password: &[u8],
        params: KdfParams,
        label: &str,
        created: String,
    ) -> Result<KeySlot> {
        if password.is_empty() {
            return Err(RepoError::invalid("password", "it is empty"));
        }
        let mut idb = [0u8; 8];
        random_bytes(&mut idb)?;
        let id = hex::encode(idb);
        let mut salt = [0u8; 32];
        random_bytes(&mut salt)?;
        let kek = params.derive(password, &salt)?;
        let cipher = Cipher::new(CipherKind::Aes256Gcm, &kek)?;
        let mut buf = master.to_vec();
        let nonce = cipher.seal(&slot_aad(repo_id, &id), &mut buf)?;
        Ok(KeySlot {
            version: 1,
            id,
            label: label.to_string(),
            created,
            kdf: "argon2id".into(),
            kdf_params: params,
            salt: hex::encode(salt),
            wrap: "aes-256-gcm".into(),
            nonce: hex::encode(nonce),
            wrapped_key: hex::encode(buf),
        })
    }

    /// Unwraps the master key; `Ok(None)` when the password does not fit.
    pub fn open(&self, repo_id: &uuid::Uuid, password: &[u8]) -> Result<Option<[u8; KEY_LEN]>> {
        let where_ = format!("keys/{}", self.id);
        if self.version != 1 || self.kdf != "argon2id" || self.wrap != "aes-256-gcm" {
            return Err(RepoError::corrupt(
                &where_,
                "unknown key slot version or algorithm",
            ));
        }
        let p = &self.kdf_params;
        if p.m_cost_kib > MAX_KDF_MEMORY_KIB || p.t_cost > 64 || p.p_cost > 64 {
            return Err(RepoError::corrupt(
                &where_,
                "Argon2id cost is beyond sane limits (4 GiB, 64 passes, 64 lanes)",
            ));
        }
        let salt = hex::decode(&self.salt).map_err(|_| RepoError::corrupt(&where_, "bad salt"))?;
        let mut nonce = [0u8; NONCE_LEN];
        hex::decode_to_slice(&self.nonce, &mut nonce)
            .map_err(|_| RepoError::corrupt(&where_, "bad nonce"))?;
        let mut buf =
            hex::decode(&self.wrapped_key).map_err(|_| RepoError::corrupt(&where_, "bad key"))?;
        if buf.len() != KEY_LEN + TAG_LEN {
            return Err(RepoError::corrupt(
                &where_,
                "wrapped key has the wrong length",
            ));
        }
        let kek = self.kdf_params.derive(password, &salt)?;
        let cipher = Cipher::new(CipherKind::Aes256Gcm, &kek)?;
        match cipher.open(&nonce, &slot_aad(repo_id, &self.id), &mut buf) {
            Some(KEY_LEN) => {
                let mut master = [0u8; KEY_LEN];
                master.copy_from_slice(&buf[..KEY_LEN]);
                Ok(Some(master))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_plain_keyed_and_zero() {
        let data = b"hello chunk";
        let plain = chunk_id(None, data);
        assert_eq!(plain.0, *blake3::hash(data).as_bytes());
        let keyed = chunk_id(Some(&[7; 32]), data);
        assert_ne!(plain, keyed);
        assert_eq!(chunk_id(Some(&[7; 32]), &[0; 4096]), ChunkId::ZERO);
        assert!(ChunkId::ZERO.is_zero());
        let key = plain.object_key();
        assert!(key.starts_with(&format!("chunks/{}/", &plain.to_hex()[..2])));
        assert_eq!(ChunkId::from_hex(&plain.to_hex()), Some(plain));
        assert_eq!(ChunkId::from_hex("zz"), None);
    }

    #[test]
    fn aead_round_trip_and_tamper() {
        for kind in [CipherKind::Aes256Gcm, CipherKind::ChaCha20Poly1305] {
            let c = Cipher::new(kind, &[1; 32]).unwrap();
            let mut buf = b"secret".to_vec();
            let nonce = c.seal(b"ad", &mut buf).unwrap();
            assert_eq!(buf.len(), 6 + TAG_LEN);
            let mut copy = buf.clone();
            assert_eq!(c.open(&nonce, b"ad", &mut copy), Some(6));
            assert_eq!(&copy[..6], b"secret");
            let mut copy = buf.clone();
            assert_eq!(c.open(&nonce, b"other ad", &mut copy), None);
            let mut copy = buf.clone();
            copy[0] ^= 1;
            assert_eq!(c.open(&nonce, b"ad", &mut copy), None);
        }
    }

    #[test]
    fn key_slot_wraps_and_refuses_wrong_password() {
        let repo = uuid::Uuid::new_v4();
        let master = [9u8; 32];
        let p = KdfParams::insecure_for_tests();
        let slot = KeySlot::seal(&repo, &master, b"pw", p, "admin", "t".into()).unwrap();
        assert_eq!(slot.open(&repo, b"pw").unwrap(), Some(master));
        assert_eq!(slot.open(&repo, b"wrong").unwrap(), None);
        // Bound to its repository.
        assert_eq!(slot.open(&uuid::Uuid::new_v4(), b"pw").unwrap(), None);
        let json = serde_json::to_string(&slot).unwrap();
        let back: KeySlot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, slot);
    }

    #[test]
    fn subkeys_differ_per_purpose_and_repo() {
        let a = uuid::Uuid::new_v4();
        let b = uuid::Uuid::new_v4();
        let k1 = RepoKeys::derive([3; 32], &a, CipherKind::Aes256Gcm).unwrap();
        let k2 = RepoKeys::derive([3; 32], &b, CipherKind::Aes256Gcm).unwrap();
        assert_ne!(k1.id_key, k2.id_key);
        assert_ne!(k1.id_key, [3; 32]);
    }
}
