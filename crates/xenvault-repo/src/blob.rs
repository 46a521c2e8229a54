//! The blob codec: how every stored object except `config` and key slots is framed.
//!
//! ```text
//! 0   3  magic "XVB"
//! 3   1  format version (1)
//! 4   1  kind: 1 chunk, 2 fixed index, 3 manifest, 4 other metadata
//! 5   1  compression: 0 none, 1 zstd
//! 6   1  encryption: 0 none, 1 AES-256-GCM, 2 ChaCha20-Poly1305
//! 7   1  reserved, 0
//! 8   8  plaintext length, u64 little-endian
//! 16  …  plain: payload, then CRC32 (IEEE) of bytes 0..end-4, u32 LE
//!        encrypted: 12-byte nonce, then ciphertext of the payload + 16-byte tag;
//!        associated data = bytes 0..16 ‖ context (the chunk id, or the object key)
//! ```
//! The payload is the zstd frame of the plaintext when compression is 1, else the
//! plaintext. Compression is skipped when it does not make the payload smaller.
//! No I/O here.

use crate::crypto::{Cipher, CipherKind, NONCE_LEN, TAG_LEN};
use crate::error::{RepoError, Result};

/// Length of the fixed blob header.
pub const HEADER_LEN: usize = 16;
const MAGIC: &[u8; 3] = b"XVB";
const VERSION: u8 = 1;

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// A data chunk.
    Chunk = 1,
    /// A fixed index.
    Index = 2,
    /// A restore point manifest.
    Manifest = 3,
    /// Other metadata (prune marks).
    Meta = 4,
}

/// Encodes `plain` as a blob: zstd at `level` (0 = no compression), then the
/// cipher's AEAD with `context` as associated data, or a CRC32 when plain.
pub fn encode(
    kind: BlobKind,
    plain: &[u8],
    level: i32,
    cipher: Option<&Cipher>,
    context: &[u8],
) -> Result<Vec<u8>> {
    let compressed = if level != 0 && looks_compressible(plain, level) {
        let c = zstd::bulk::compress(plain, level)
            .map_err(|e| RepoError::Task(format!("zstd compression failed: {e}")))?;
        (c.len() < plain.len()).then_some(c)
    } else {
        None
    };
    let (comp_code, payload): (u8, &[u8]) = match &compressed {
        Some(c) => (1, c),
        None => (0, plain),
    };
    let mut header = [0u8; HEADER_LEN];
    header[..3].copy_from_slice(MAGIC);
    header[3] = VERSION;
    header[4] = kind as u8;
    header[5] = comp_code;
    header[6] = cipher.map_or(0, |c| c.kind().code());
    header[8..16].copy_from_slice(&(plain.len() as u64).to_le_bytes());
    match cipher {
        Some(c) => {
            let mut aad = Vec::with_capacity(HEADER_LEN + context.len());
            aad.extend_from_slice(&header);
            aad.extend_from_slice(context);
            // One copy of the payload: header, nonce space, payload, then
            // encrypted in place, then the tag appended.
            let body_at = HEADER_LEN + NONCE_LEN;
            let mut out = Vec::with_capacity(body_at + payload.len() + TAG_LEN);
            out.extend_from_slice(&header);
            out.extend_from_slice(&[0u8; NONCE_LEN]);
            out.extend_from_slice(payload);
            let (nonce, tag) = c.seal_detached(&aad, &mut out[body_at..])?;
            out[HEADER_LEN..body_at].copy_from_slice(&nonce);
            out.extend_from_slice(&tag);
            Ok(out)
        }
        None => {
            let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
            out.extend_from_slice(&header);
            out.extend_from_slice(payload);
            let crc = crc32fast::hash(&out);
            out.extend_from_slice(&crc.to_le_bytes());
            Ok(out)
        }
    }
}

/// Data at least this long is sampled before it is compressed.
const SAMPLE_FROM: usize = 64 * 1024;
/// Size of one sampled piece, and how many pieces (spread evenly) are taken.
const SAMPLE_PIECE: usize = 4096;
const SAMPLE_PIECES: usize = 8;

/// Whether compressing `plain` is worth trying: small data always is; larger
/// data is sampled (8 evenly spread 4 KiB pieces, 32 KiB in all, compressed at
/// `level`) and skipped when the sample does not shrink by at least 1/32
/// (random or already compressed data: its chunk is then stored raw, which the
/// format allows, instead of paying a full zstd pass for nothing).
fn looks_compressible(plain: &[u8], level: i32) -> bool {
    if plain.len() < SAMPLE_FROM {
        return true;
    }
    let stride = plain.len() / SAMPLE_PIECES;
    let mut sample = Vec::with_capacity(SAMPLE_PIECE * SAMPLE_PIECES);
    for i in 0..SAMPLE_PIECES {
        let at = i * stride;
        sample.extend_from_slice(&plain[at..(at + SAMPLE_PIECE).min(plain.len())]);
    }
    match zstd::bulk::compress(&sample, level) {
        Ok(c) => c.len() < sample.len() - sample.len() / 32,
        // Let the full compression report the error.
        Err(_) => true,
    }
}

/// Decodes a blob stored under `key`. `max_len` bounds the declared plaintext
/// length (a guard against decompression bombs). Refuses a blob of another kind,
/// an encrypted blob without `cipher` and a plain blob in an encrypted repository.
pub fn decode(
    key: &str,
    expected: BlobKind,
    blob: &[u8],
    max_len: u64,
    cipher: Option<&Cipher>,
    context: &[u8],
) -> Result<Vec<u8>> {
    if blob.len() < HEADER_LEN || &blob[..3] != MAGIC {
        return Err(RepoError::corrupt(key, "not a xenvault blob (bad magic)"));
    }
    if blob[3] != VERSION {
        return Err(RepoError::corrupt(
            key,
            format!("blob version {} is not supported", blob[3]),
        ));
    }
    if blob[4] != expected as u8 {
        return Err(RepoError::corrupt(
            key,
            format!(
                "blob kind {} where {} was expected",
                blob[4], expected as u8
            ),
        ));
    }
    let comp = blob[5];
    let enc = blob[6];
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&blob[8..16]);
    let plain_len = u64::from_le_bytes(len8);
    if plain_len > max_len {
        return Err(RepoError::corrupt(
            key,
            format!("declared length {plain_len} exceeds the limit {max_len}"),
        ));
    }
    let payload: Vec<u8> = match (enc, cipher) {
        (0, None) => {
            if blob.len() < HEADER_LEN + 4 {
                return Err(RepoError::corrupt(key, "truncated"));
            }
            let (body, crc) = blob.split_at(blob.len() - 4);
            let mut c4 = [0u8; 4];
            c4.copy_from_slice(crc);
            if crc32fast::hash(body) != u32::from_le_bytes(c4) {
                return Err(RepoError::corrupt(key, "CRC32 mismatch"));
            }
            body[HEADER_LEN..].to_vec()
        }
        (0, Some(_)) => {
            return Err(RepoError::Tampered {
                key: key.to_string(),
            });
        }
        (code, None) => {
            return Err(RepoError::corrupt(
                key,
                format!(
                    "blob is encrypted (cipher {code}) but the repository was opened without a key"
                ),
            ));
        }
        (code, Some(c)) => {
            if CipherKind::from_code(code) != Some(c.kind()) {
                return Err(RepoError::Tampered {
                    key: key.to_string(),
                });
            }
            if blob.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
                return Err(RepoError::corrupt(key, "truncated"));
            }
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&blob[HEADER_LEN..HEADER_LEN + NONCE_LEN]);
            let mut aad = Vec::with_capacity(HEADER_LEN + context.len());
            aad.extend_from_slice(&blob[..HEADER_LEN]);
            aad.extend_from_slice(context);
            let mut body = blob[HEADER_LEN + NONCE_LEN..].to_vec();
            let n = c
                .open(&nonce, &aad, &mut body)
                .ok_or_else(|| RepoError::Tampered {
                    key: key.to_string(),
                })?;
            body.truncate(n);
            body
        }
    };
    let plain = match comp {
        0 => payload,
        1 => zstd::bulk::decompress(&payload, plain_len as usize)
            .map_err(|e| RepoError::corrupt(key, format!("zstd: {e}")))?,
        other => {
            return Err(RepoError::corrupt(
                key,
                format!("unknown compression {other}"),
            ));
        }
    };
    if plain.len() as u64 != plain_len {
        return Err(RepoError::corrupt(
            key,
            format!(
                "decoded {} bytes where the header says {plain_len}",
                plain.len()
            ),
        ));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut v = b"compressible text ".repeat(1000);
        v.extend((0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
        v
    }

    #[test]
    fn plain_round_trip_and_crc() {
        let data = sample();
        let blob = encode(BlobKind::Chunk, &data, 1, None, b"").unwrap();
        assert_eq!(blob[5], 1, "compressible data is compressed");
        assert!(blob.len() < data.len());
        assert_eq!(
            decode("k", BlobKind::Chunk, &blob, 1 << 20, None, b"").unwrap(),
            data
        );
        let mut bad = blob.clone();
        bad[20] ^= 0x40;
        let e = decode("k", BlobKind::Chunk, &bad, 1 << 20, None, b"").unwrap_err();
        assert!(e.to_string().contains("CRC32"), "{e}");
        let e = decode("k", BlobKind::Index, &blob, 1 << 20, None, b"").unwrap_err();
        assert!(e.to_string().contains("kind"), "{e}");
        let e = decode("k", BlobKind::Chunk, &blob, 10, None, b"").unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let mut data = vec![0u8; 4096];
        crate::crypto::random_bytes(&mut data).unwrap();
        let blob = encode(BlobKind::Chunk, &data, 1, None, b"").unwrap();
        assert_eq!(blob[5], 0);
        assert_eq!(blob.len(), HEADER_LEN + 4096 + 4);
    }

    #[test]
    fn incompressible_large_data_skips_compression_and_round_trips() {
        let c = Cipher::new(CipherKind::ChaCha20Poly1305, &[9; 32]).unwrap();
        let mut data = vec![0u8; 1 << 20];
        crate::crypto::random_bytes(&mut data).unwrap();
        assert!(!looks_compressible(&data, 1));
        let blob = encode(BlobKind::Chunk, &data, 1, Some(&c), b"id").unwrap();
        assert_eq!(blob[5], 0, "random data is stored raw");
        assert_eq!(blob.len(), HEADER_LEN + NONCE_LEN + data.len() + TAG_LEN);
        assert_eq!(
            decode("k", BlobKind::Chunk, &blob, 1 << 20, Some(&c), b"id").unwrap(),
            data
        );
        // Half random, half text: the sample sees the text, the chunk is compressed.
        let text = b"some compressible words ".repeat(30000);
        data[..text.len().min(1 << 19)].copy_from_slice(&text[..text.len().min(1 << 19)]);
        assert!(looks_compressible(&data, 1));
        let blob = encode(BlobKind::Chunk, &data, 1, Some(&c), b"id").unwrap();
        assert_eq!(blob[5], 1);
        assert_eq!(
            decode("k", BlobKind::Chunk, &blob, 1 << 20, Some(&c), b"id").unwrap(),
            data
        );
    }

    #[test]
    fn encrypted_round_trip_tamper_and_swap() {
        let c = Cipher::new(CipherKind::Aes256Gcm, &[5; 32]).unwrap();
        let data = sample();
        let blob = encode(BlobKind::Chunk, &data, 1, Some(&c), b"id-a").unwrap();
        assert_eq!(blob[6], 1);
        assert_eq!(
            decode("k", BlobKind::Chunk, &blob, 1 << 20, Some(&c), b"id-a").unwrap(),
            data
        );
        // Another context (a blob moved to another chunk's name) is refused.
        assert!(matches!(
            decode("k", BlobKind::Chunk, &blob, 1 << 20, Some(&c), b"id-b"),
            Err(RepoError::Tampered { .. })
        ));
        // A flipped bit anywhere, header included, is refused.
        for pos in [5, 9, HEADER_LEN + 2, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[pos] ^= 1;
            assert!(
                decode("k", BlobKind::Chunk, &bad, 1 << 20, Some(&c), b"id-a").is_err(),
                "flip at {pos}"
            );
        }
        // A plain blob slipped into an encrypted repository is refused.
        let plain = encode(BlobKind::Chunk, &data, 1, None, b"").unwrap();
        assert!(matches!(
            decode("k", BlobKind::Chunk, &plain, 1 << 20, Some(&c), b"id-a"),
            Err(RepoError::Tampered { .. })
        ));
        assert!(decode("k", BlobKind::Chunk, &blob, 1 << 20, None, b"").is_err());
    }
}
