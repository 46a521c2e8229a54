//! The repository handle: init, open (unlock), key slots, and typed object access.

use std::sync::Arc;

use bytes::Bytes;

use crate::blob::{self, BlobKind};
use crate::crypto::{self, ChunkId, CipherKind, KdfParams, KeySlot, RepoKeys};
use crate::error::{RepoError, Result};
use crate::index::FixedIndex;
use crate::manifest::{
    self, EncryptionConfig, FORMAT_VERSION, Manifest, RepoConfig, validate_chunk_size,
};
use crate::storage::Storage;

/// Default chunk size: 1 MiB. The benchmark (`benches/chunk_throughput.rs`) shows
/// no throughput difference between 1, 2 and 4 MiB, while 1 MiB rewrites 3.5× less
/// after scattered guest writes; see docs/design/0005-repository-format.md.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Largest metadata object (index or manifest) accepted when decoding: the index
/// of a 64 TiB disk at 1 MiB chunks is 2 GiB.
pub const MAX_METADATA_LEN: u64 = 3 << 30;

/// How to create a repository.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Chunk size: 256 KiB, 512 KiB, 1 MiB (the default), 2 MiB or 4 MiB (ADR 0009).
    pub chunk_size: u32,
    /// zstd level (1 recommended; 0 disables compression).
    pub zstd_level: i32,
    /// Encryption, or `None` for a plain repository.
    pub encryption: Option<EncryptionInit>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: 1,
            encryption: None,
        }
    }
}

/// Encryption settings at init.
#[derive(Clone)]
pub struct EncryptionInit {
    /// The first key slot's password.
    pub password: Vec<u8>,
    /// The first key slot's label.
    pub label: String,
    /// AEAD for blobs.
    pub cipher: CipherKind,
    /// Argon2id cost of the first key slot.
    pub kdf: KdfParams,
}

impl std::fmt::Debug for EncryptionInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionInit")
            .field("password", &"<secret>")
            .field("label", &self.label)
            .field("cipher", &self.cipher)
            .field("kdf", &self.kdf)
            .finish()
    }
}

/// An open repository. Cheap to clone; clones share storage and keys.
#[derive(Clone)]
pub struct Repository {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) config: Arc<RepoConfig>,
    pub(crate) keys: Option<Arc<RepoKeys>>,
    /// The slot that opened the repository (for `change_password`).
    pub(crate) opened_slot: Option<String>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("id", &self.config.id)
            .field("encrypted", &self.keys.is_some())
            .finish()
    }
}

/// Summary of a key slot (no secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Slot id.
    pub id: String,
    /// Label.
    pub label: String,
    /// Creation time.
    pub created: String,
}

pub(crate) fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

impl Repository {
    /// Creates a repository on `storage`. Key slots are written first and `config`
    /// last, so a half-created repository is not mistaken for a usable one.
    pub async fn init(storage: Arc<dyn Storage>, opts: InitOptions) -> Result<Repository> {
        validate_chunk_size(opts.chunk_size)?;
        match storage.stat("config").await {
            Ok(_) => return Err(RepoError::AlreadyInitialized),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let id = uuid::Uuid::new_v4();
        let created = manifest::rfc3339(now());
        let (encryption, keys, slot_id) = match &opts.encryption {
            None => (None, None, None),
            Some(enc) => {
                let mut master = [0u8; crypto::KEY_LEN];
                crypto::random_bytes(&mut master)?;
                let slot = KeySlot::seal(
                    &id,
                    &master,
                    &enc.password,
                    enc.kdf,
                    &enc.label,
                    created.clone(),
                )?;
                write_slot(storage.as_ref(), &slot).await?;
                let keys = RepoKeys::derive(master, &id, enc.cipher)?;
                (
                    Some(EncryptionConfig {
                        cipher: enc.cipher,
                        chunk_id: "blake3-keyed".into(),
                        subkeys: "hkdf-sha256".into(),
                    }),
                    Some(Arc::new(keys)),
                    Some(slot.id),
                )
            }
        };
        let config = RepoConfig {
            format: "xenvault-repository".into(),
            version: FORMAT_VERSION,
            id,
            created,
            chunk_size: opts.chunk_size,
            compression: "zstd".into(),
            zstd_level: opts.zstd_level,
            encryption,
        };
        let json = serde_json::to_vec_pretty(&config)
            .map_err(|e| RepoError::Task(format!("config encoding: {e}")))?;
        match storage.put_if_absent("config", Bytes::from(json)).await {
            Ok(()) => {}
            Err(e) if e.is_already_exists() => return Err(RepoError::AlreadyInitialized),
            Err(e) => return Err(e.into()),
        }
        Ok(Repository {
            storage,
            config: Arc::new(config),
            keys,
            opened_slot: slot_id,
        })
    }

    /// Opens the repository on `storage`; encrypted ones need `password`.
    pub async fn open(storage: Arc<dyn Storage>, password: Option<&[u8]>) -> Result<Repository> {
        let raw = match storage.get("config").await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Err(RepoError::NotARepository),
            Err(e) => return Err(e.into()),
        };
        let config: RepoConfig = serde_json::from_slice(&raw)
            .map_err(|e| RepoError::corrupt("config", format!("invalid JSON: {e}")))?;
        config.validate()?;
        let (keys, opened_slot) = match &config.encryption {
            None => (None, None),
            Some(enc) => {
                let password = password.ok_or(RepoError::PasswordRequired)?;
                let slots = read_slots(storage.as_ref()).await?;
                let count = slots.len();
                // Argon2id takes a core for a while: off the runtime's threads.
                let (repo_id, password) = (config.id, password.to_vec());
                let found = tokio::task::spawn_blocking(move || -> Result<_> {
                    for slot in &slots {
                        if let Some(master) = slot.open(&repo_id, &password)? {
                            return Ok(Some((master, slot.id.clone())));
                        }
                    }
                    Ok(None)
                })
                .await
                .map_err(|e| RepoError::Task(e.to_string()))??;
                let (master, slot_id) = found.ok_or(RepoError::WrongPassword { slots: count })?;
                (
                    Some(Arc::new(RepoKeys::derive(master, &config.id, enc.cipher)?)),
                    Some(slot_id),
                )
            }
        };
        Ok(Repository {
            storage,
            config: Arc::new(config),
            keys,
            opened_slot,
        })
    }

    /// The repository's config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// The storage backend.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// True when encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }

    // ---- key slots -------------------------------------------------------

    fn keys_for(&self, what: &'static str) -> Result<&Arc<RepoKeys>> {
        self.keys.as_ref().ok_or(RepoError::NotEncrypted(what))
    }

    /// Lists the key slots.
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        self.keys_for("list")?;
        Ok(read_slots(self.storage.as_ref())
            .await?
            .into_iter()
            .map(|s| KeyInfo {
                id: s.id,
                label: s.label,
                created: s.created,
            })
            .collect())
    }

    /// Adds a key slot opening with `password`; returns its id.
    pub async fn add_key(&self, password: &[u8], label: &str, kdf: KdfParams) -> Result<String> {
        let keys = self.keys_for("add")?;
        let slot = KeySlot::seal(
            &self.config.id,
            keys.master(),
            password,
            kdf,
            label,
            manifest::rfc3339(now()),
        )?;
        write_slot(self.storage.as_ref(), &slot).await?;
        Ok(slot.id)
    }

    /// Removes a key slot (never the last one).
    pub async fn remove_key(&self, slot_id: &str) -> Result<()> {
        self.keys_for("remove")?;
        let slots = read_slots(self.storage.as_ref()).await?;
        if !slots.iter().any(|s| s.id == slot_id) {
            return Err(RepoError::NoSuchKey(slot_id.to_string()));
        }
        if slots.len() == 1 {
            return Err(RepoError::LastKey(slot_id.to_string()));
        }
        self.storage.delete(&format!("keys/{slot_id}")).await?;
        Ok(())
    }

    /// Replaces the slot that opened this repository by one with `new_password`;
    /// returns the new slot's id.
    pub async fn change_password(&mut self, new_password: &[u8], kdf: KdfParams) -> Result<String> {
        let old = self
            .opened_slot
            .clone()
            .ok_or(RepoError::NotEncrypted("change"))?;
        let label = read_slots(self.storage.as_ref())
            .await?
            .into_iter()
            .find(|s| s.id == old)
            .map(|s| s.label)
            .unwrap_or_default();
        let new_id = self.add_key(new_password, &label, kdf).await?;
        self.storage.delete(&format!("keys/{old}")).await?;
        self.opened_slot = Some(new_id.clone());
        Ok(new_id)
    }

    /// Exports a key slot (still wrapped under its password) as JSON, to keep
    /// beside the repository; `import_key` puts it back.
    pub async fn export_key(&self, slot_id: &str) -> Result<String> {
        self.keys_for("export")?;
        let slot = read_slots(self.storage.as_ref())
            .await?
            .into_iter()
            .find(|s| s.id == slot_id)
            .ok_or_else(|| RepoError::NoSuchKey(slot_id.to_string()))?;
        let doc = serde_json::json!({ "repository": self.config.id, "slot": slot });
        serde_json::to_string_pretty(&doc).map_err(|e| RepoError::Task(e.to_string()))
    }

    /// Puts back an exported key slot after checking it opens with `password`.
    pub async fn import_key(&self, exported: &str, password: &[u8]) -> Result<String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            repository: uuid::Uuid,
            slot: KeySlot,
        }
        let doc: Doc = serde_json::from_str(exported)
            .map_err(|e| RepoError::invalid("exported key", e.to_string()))?;
        if doc.repository != self.config.id {
            return Err(RepoError::invalid(
                "exported key",
                format!(
                    "it belongs to repository {}, not {}",
                    doc.repository, self.config.id
                ),
            ));
        }
        if doc.slot.open(&self.config.id, password)?.is_none() {
            return Err(RepoError::WrongPassword { slots: 1 });
        }
        match write_slot(self.storage.as_ref(), &doc.slot).await {
            Ok(()) => {}
            Err(RepoError::Storage(e)) if e.is_already_exists() => {}
            Err(e) => return Err(e),
        }
        Ok(doc.slot.id)
    }

    // ---- typed objects ---------------------------------------------------

    /// Id of a chunk's plaintext in this repository (the zero id for all-zero data).
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        crypto::chunk_id(self.keys.as_ref().map(|k| &k.id_key), data)
    }

    pub(crate) fn encode_chunk(&self, id: &ChunkId, data: &[u8]) -> Result<Vec<u8>> {
        blob::encode(
            BlobKind::Chunk,
            data,
            self.config.zstd_level,
            self.keys.as_ref().map(|k| &k.data),
            &id.0,
        )
    }

    /// Decodes a chunk blob and checks that its content hashes to `id`.
    pub fn decode_chunk(&self, id: &ChunkId, blob: &[u8]) -> Result<Vec<u8>> {
        let key = id.object_key();
        let plain = blob::decode(
            &key,
            BlobKind::Chunk,
            blob,
            u64::from(self.config.chunk_size),
            self.keys.as_ref().map(|k| &k.data),
            &id.0,
        )?;
        if self.chunk_id(&plain) != *id {
            return Err(RepoError::corrupt(&key, "content does not match its id"));
        }
        Ok(plain)
    }

    /// Reads, decodes and verifies one chunk (not the zero id).
    pub async fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let key = id.object_key();
        let blob = match self.storage.get(&key).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(RepoError::corrupt(&key, "chunk is missing"));
            }
            Err(e) => return Err(e.into()),
        };
        let repo = self.clone();
        let id = *id;
        tokio::task::spawn_blocking(move || repo.decode_chunk(&id, &blob))
            .await
            .map_err(|e| RepoError::Task(e.to_string()))?
    }

    pub(crate) fn encode_meta(&self, kind: BlobKind, key: &str, plain: &[u8]) -> Result<Vec<u8>> {
        blob::encode(
            kind,
            plain,
            self.config.zstd_level.max(1),
            self.keys.as_ref().map(|k| &k.meta),
            key.as_bytes(),
        )
    }

    pub(crate) async fn read_meta(&self, kind: BlobKind, key: &str) -> Result<Vec<u8>> {
        let blob = self.storage.get(key).await?;
        blob::decode(
            key,
            kind,
            &blob,
            MAX_METADATA_LEN,
            self.keys.as_ref().map(|k| &k.meta),
            key.as_bytes(),
        )
    }

    /// Loads and checks a fixed index.
    pub async fn load_index(&self, key: &str) -> Result<FixedIndex> {
        let plain = self.read_meta(BlobKind::Index, key).await?;
        FixedIndex::from_bytes(key, &plain)
    }

    pub(crate) async fn write_index(&self, key: &str, index: &FixedIndex) -> Result<()> {
        let blob = self.encode_meta(BlobKind::Index, key, &index.to_bytes())?;
        self.storage.put_if_absent(key, Bytes::from(blob)).await?;
        Ok(())
    }

    /// Loads a restore point's manifest.
    pub async fn load_manifest(&self, vm_uuid: &str, id: &str) -> Result<Manifest> {
        let key = manifest::manifest_key(vm_uuid, id);
        let plain = match self.read_meta(BlobKind::Manifest, &key).await {
            Err(RepoError::Storage(e)) if e.is_not_found() => {
                return Err(RepoError::NotFound(format!("restore point {vm_uuid}/{id}")));
            }
            other => other?,
        };
        let m: Manifest = serde_json::from_slice(&plain)
            .map_err(|e| RepoError::corrupt(&key, format!("invalid manifest JSON: {e}")))?;
        if m.vm_uuid != vm_uuid || m.id != id {
            return Err(RepoError::corrupt(
                &key,
                "manifest names another restore point",
            ));
        }
        Ok(m)
    }

    /// Every restore point (complete by construction), optionally of one VM,
    /// as `(vm uuid, id)` sorted by VM then time.
    pub async fn list_restore_points(
        &self,
        vm_uuid: Option<&str>,
    ) -> Result<Vec<(String, String)>> {
        let prefix = match vm_uuid {
            Some(vm) => {
                manifest::validate_segment("VM uuid", vm)?;
                format!("manifests/{vm}/")
            }
            None => "manifests/".to_string(),
        };
        let mut out: Vec<(String, String)> = self
            .storage
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|m| {
                let rest = m.key.strip_prefix("manifests/")?;
                let (vm, id) = rest.split_once('/')?;
                (!id.contains('/')).then(|| (vm.to_string(), id.to_string()))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// The newest restore point of a VM, if any.
    pub async fn latest_restore_point(&self, vm_uuid: &str) -> Result<Option<Manifest>> {
        match self.list_restore_points(Some(vm_uuid)).await?.pop() {
            Some((vm, id)) => Ok(Some(self.load_manifest(&vm, &id).await?)),
            None => Ok(None),
        }
    }
}

async fn write_slot(storage: &dyn Storage, slot: &KeySlot) -> Result<()> {
    let json = serde_json::to_vec_pretty(slot).map_err(|e| RepoError::Task(e.to_string()))?;
    storage
        .put_if_absent(&format!("keys/{}", slot.id), Bytes::from(json))
        .await?;
    Ok(())
}

async fn read_slots(storage: &dyn Storage) -> Result<Vec<KeySlot>> {
    let mut slots = Vec::new();
    for meta in storage.list("keys/").await? {
        let raw = storage.get(&meta.key).await?;
        let slot: KeySlot = serde_json::from_slice(&raw)
            .map_err(|e| RepoError::corrupt(&meta.key, format!("invalid key slot: {e}")))?;
        slots.push(slot);
    }
    slots.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn enc(pw: &str) -> InitOptions {
        InitOptions {
            encryption: Some(EncryptionInit {
                password: pw.as_bytes().to_vec(),
                label: "first".into(),
                cipher: CipherKind::Aes256Gcm,
                kdf: KdfParams::insecure_for_tests(),
            }),
            ..InitOptions::default()
        }
    }

    #[tokio::test]
    async fn init_open_and_refuse_twice() {
        let mem: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let r = Repository::init(mem.clone(), InitOptions::default())
            .await
            .unwrap();
        assert!(!r.is_encrypted());
        assert!(matches!(
            Repository::init(mem.clone(), InitOptions::default()).await,
            Err(RepoError::AlreadyInitialized)
        ));
        let o = Repository::open(mem, None).await.unwrap();
        assert_eq!(o.config(), r.config());
        let empty: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        assert!(matches!(
            Repository::open(empty, None).await,
            Err(RepoError::NotARepository)
        ));
    }

    #[tokio::test]
    async fn key_slots_add_change_remove_export() {
        let mem: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let r = Repository::init(mem.clone(), enc("one")).await.unwrap();
        let id = r.chunk_id(b"abc");
        assert!(matches!(
            Repository::open(mem.clone(), None).await,
            Err(RepoError::PasswordRequired)
        ));
        let e = Repository::open(mem.clone(), Some(b"bad"))
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::WrongPassword { slots: 1 }));
        assert!(e.to_string().contains("wrong password"), "{e}");

        let kdf = KdfParams::insecure_for_tests();
        let two = r.add_key(b"two", "second", kdf).await.unwrap();
        let mut by_two = Repository::open(mem.clone(), Some(b"two")).await.unwrap();
        assert_eq!(by_two.chunk_id(b"abc"), id, "same master key");
        let exported = by_two.export_key(&two).await.unwrap();

        let three = by_two.change_password(b"three", kdf).await.unwrap();
        assert!(Repository::open(mem.clone(), Some(b"two")).await.is_err());
        Repository::open(mem.clone(), Some(b"three")).await.unwrap();
        assert_eq!(r.list_keys().await.unwrap().len(), 2);

        // The exported slot can be put back.
        assert_eq!(r.import_key(&exported, b"two").await.unwrap(), two);
        Repository::open(mem.clone(), Some(b"two")).await.unwrap();
        assert!(r.import_key(&exported, b"nope").await.is_err());

        let first = r.opened_slot.clone().unwrap();
        r.remove_key(&first).await.unwrap();
        r.remove_key(&two).await.unwrap();
        assert!(matches!(
            r.remove_key(&three).await,
            Err(RepoError::LastKey(_))
        ));
        assert!(matches!(
            r.remove_key("zz").await,
            Err(RepoError::NoSuchKey(_))
        ));
        assert!(Repository::open(mem.clone(), Some(b"one")).await.is_err());
    }
}
