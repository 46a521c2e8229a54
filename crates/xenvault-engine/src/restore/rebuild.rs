//! A whole VM from a per-disk restore point (`disk-N.vhd` / `disk-N.raw`):
//! an XVA is built on the fly from the VM's records in `vm.json` and the
//! disks' extents (decoded from the files), so `PUT /import` can create the
//! VM as from any export. Every chunk is written (zero chunks too), which
//! makes the length a function of the disk sizes: a dry run of the encoder
//! over zeros gives the Content-Length before the upload.

use std::collections::BTreeSet;
use std::io::{self, Read as _};

use bytes::Bytes;
use futures::Stream;
use xenvault_formats::raw::RawDecoder;
use xenvault_formats::vhd::VhdDecoder;
use xenvault_formats::xva::{
    ChecksumKind, ExportRecords, OvaBuilder, OvaXml, XvaDisk, XvaEncoder, XvaEncoderOptions,
};
use xenvault_types::{Extent, ExtentData, Value};

use super::content::open_content;
use super::point::{ArchivePoint, DataFile, DataKind};
use super::{ProgressFn, RestoreError, RestorePhase, RestoreProgress};

/// The encoder settings of rebuilt XVAs: every chunk written, fixed mtime.
fn encoder_options() -> XvaEncoderOptions {
    XvaEncoderOptions {
        omit_zero_chunks: false,
        ova_mtime: Some(0),
        ..XvaEncoderOptions::default()
    }
}

/// What is needed to stream a rebuilt XVA.
#[derive(Debug, Clone)]
pub struct RebuiltXva {
    /// The `ova.xml` (edit it before [`measure`]).
    pub ova: OvaXml,
    /// The data file of each disk of `ova.disks()`, in that order.
    pub files: Vec<DataFile>,
}

fn unusable(point: &ArchivePoint, reason: impl Into<String>) -> RestoreError {
    RestoreError::Unusable {
        dir: point.dir.clone(),
        reason: reason.into(),
    }
}

/// The records of `vm.json`.
fn export_records(point: &ArchivePoint) -> Result<ExportRecords, RestoreError> {
    let meta = point.metadata.as_ref().ok_or_else(|| {
        unusable(
            point,
            "vm.json is missing or unreadable: the VM's records are needed to rebuild it",
        )
    })?;
    records_from_json(meta).map_err(|e| unusable(point, e))
}

/// The VM's records from a `vm.json` document (`"VM": {ref, record}`,
/// `"VBDs": {ref: record}`, …): the archive's `vm.json` and a repository
/// manifest's `vm_records` alike.
pub fn records_from_json(meta: &serde_json::Value) -> Result<ExportRecords, String> {
    let vm = meta
        .get("VM")
        .and_then(|v| {
            Some((
                v.get("ref")?.as_str()?.to_string(),
                Value::from_json(v.get("record")?),
            ))
        })
        .ok_or_else(|| "the VM's records have no VM record".to_string())?;
    let map = |key: &str| -> Vec<(String, Value)> {
        meta.get(key)
            .and_then(|m| m.as_object())
            .map(|m| {
                m.iter()
                    .map(|(r, v)| (r.clone(), Value::from_json(v)))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(ExportRecords {
        vm,
        vbds: map("VBDs"),
        vdis: map("VDIs"),
        vifs: map("VIFs"),
        networks: map("networks"),
        srs: map("SRs"),
    })
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(|v| v.as_str().ok()).unwrap_or_default()
}

/// The `ova.xml` of the VM of `records`, keeping only the disks whose VDI
/// uuid (lower case) is in `kept` (CD drives stay).
pub fn ova_from_records(
    mut records: ExportRecords,
    kept: &BTreeSet<String>,
) -> Result<OvaXml, String> {
    let kept_refs: BTreeSet<String> = records
        .vdis
        .iter()
        .filter(|(_, v)| kept.contains(&str_of(v, "uuid").to_ascii_lowercase()))
        .map(|(r, _)| r.clone())
        .collect();
    records
        .vbds
        .retain(|(_, vbd)| str_of(vbd, "type") != "Disk" || kept_refs.contains(str_of(vbd, "VDI")));
    let kept_vbds: Vec<Value> = records
        .vbds
        .iter()
        .map(|(r, _)| Value::str(r.as_str()))
        .collect();
    super::content::set_field(&mut records.vm.1, "VBDs", Value::Array(kept_vbds));
    OvaBuilder::default()
        .build(&records)
        .map_err(|e| format!("cannot rebuild the VM from its records: {e}"))
}

/// Builds the `ova.xml` of the VM from `vm.json`, keeping only the disks the
/// restore point holds (a boot-disk-only backup restores a one-disk VM), and
/// pairs each disk with its file.
pub fn rebuild(point: &ArchivePoint) -> Result<RebuiltXva, RestoreError> {
    let records = export_records(point)?;
    let kept: BTreeSet<String> = point
        .disks
        .iter()
        .map(|d| d.vdi_uuid.to_ascii_lowercase())
        .collect();
    let ova = ova_from_records(records, &kept).map_err(|e| unusable(point, e))?;
    let disks = ova
        .disks()
        .map_err(|e| unusable(point, format!("the rebuilt ova.xml: {e}")))?;
    let mut files = Vec::new();
    for d in &disks {
        let meta = point
            .disks
            .iter()
            .find(|m| m.vdi_uuid.eq_ignore_ascii_case(&d.vdi_uuid))
            .ok_or_else(|| {
                unusable(
                    point,
                    format!("disk {} is not described in vm.json", d.vdi_uuid),
                )
            })?;
        let file = point
            .disk_files()
            .into_iter()
            .find(|f| {
                let stem = f.stem();
                stem == format!("disk-{}", meta.userdevice)
                    || stem == format!("disk-i{}", meta.index)
            })
            .ok_or_else(|| {
                unusable(
                    point,
                    format!(
                        "no data file for disk {} (position {})",
                        d.vdi_uuid, meta.userdevice
                    ),
                )
            })?;
        files.push(file.clone());
    }
    Ok(RebuiltXva { ova, files })
}

/// The length of the XVA [`xva_stream`] will produce.
pub fn measure(rebuilt: &RebuiltXva) -> Result<u64, RestoreError> {
    measure_ova(&rebuilt.ova).map_err(|reason| RestoreError::Unusable {
        dir: Default::default(),
        reason,
    })
}

/// The length of the XVA [`encode_xva`] produces for `ova` (every chunk
/// written, so it depends on the disk sizes only).
pub fn measure_ova(ova: &OvaXml) -> Result<u64, String> {
    let bad = |e: xenvault_formats::xva::XvaError| format!("cannot encode the rebuilt XVA: {e}");
    let mut enc = XvaEncoder::new(ova, encoder_options()).map_err(bad)?;
    let disks = enc.disks().to_vec();
    let mut len = 0u64;
    let mut drain = |enc: &mut XvaEncoder| -> Result<(), String> {
        while let Some(piece) = enc.next_output().map_err(bad)? {
            len += piece.len() as u64;
        }
        Ok(())
    };
    for d in &disks {
        enc.start_disk(&d.id).map_err(bad)?;
        enc.end_disk().map_err(bad)?;
        drain(&mut enc)?;
    }
    enc.finish().map_err(bad)?;
    drain(&mut enc)?;
    Ok(len)
}

/// The XVA of `ova` with every disk left empty: only the first and last
/// chunk of each disk (zeros) are written, as XAPI's own exports do for
/// blank disks, so `/import` creates the VM and blank VDIs of the right
/// sizes from a few MiB. The disks' data then goes through
/// `/import_raw_vdi`.
pub fn blank_disks_xva(ova: &OvaXml) -> Result<Vec<u8>, String> {
    let bad = |e: xenvault_formats::xva::XvaError| format!("cannot encode the VM's XVA: {e}");
    let options = XvaEncoderOptions {
        omit_zero_chunks: true,
        ..encoder_options()
    };
    let mut enc = XvaEncoder::new(ova, options).map_err(bad)?;
    let disks = enc.disks().to_vec();
    for d in &disks {
        enc.start_disk(&d.id).map_err(bad)?;
        enc.end_disk().map_err(bad)?;
    }
    enc.finish().map_err(bad)?;
    let mut out = Vec::new();
    while let Some(piece) = enc.next_output().map_err(bad)? {
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// Where [`encode_xva`] gets a disk's extents: called once per disk of the
/// `ova.xml` (in its order, with its position) with a sink for the disk's
/// extents in increasing offset order, clipped to the disk's size.
pub type DiskExtentSource<'a> =
    dyn FnMut(usize, &XvaDisk, &mut dyn FnMut(Extent) -> io::Result<()>) -> io::Result<()> + 'a;

/// Encodes the XVA of `ova` (every chunk written, as [`measure_ova`]
/// counts; both checksum kinds give the same length) with each disk's extents from `disks`, handing the output to
/// `emit` piece by piece; returns the bytes produced. Blocking: run it on a
/// blocking thread.
pub fn encode_xva(
    ova: &OvaXml,
    checksum: ChecksumKind,
    disks: &mut DiskExtentSource<'_>,
    emit: &mut dyn FnMut(Vec<u8>) -> io::Result<()>,
) -> io::Result<u64> {
    let bad = |e: xenvault_formats::xva::XvaError| io::Error::other(format!("rebuilt XVA: {e}"));
    let options = XvaEncoderOptions {
        checksum,
        ..encoder_options()
    };
    let mut enc = XvaEncoder::new(ova, options).map_err(bad)?;
    let list = enc.disks().to_vec();
    let mut done = 0u64;
    let mut drain = |enc: &mut XvaEncoder| -> io::Result<()> {
        while let Some(piece) = enc.next_output().map_err(bad)? {
            done += piece.len() as u64;
            emit(piece)?;
        }
        Ok(())
    };
    for (i, disk) in list.iter().enumerate() {
        enc.start_disk(&disk.id).map_err(bad)?;
        drain(&mut enc)?;
        disks(i, disk, &mut |extent| {
            enc.push(extent).map_err(bad)?;
            drain(&mut enc)
        })?;
        enc.end_disk().map_err(bad)?;
        drain(&mut enc)?;
    }
    enc.finish().map_err(bad)?;
    drain(&mut enc)?;
    Ok(done)
}

/// Decodes a disk file into extents, calling `sink` for each (clipped to
/// `size`).
fn disk_extents(
    file: &DataFile,
    size: u64,
    sink: &mut dyn FnMut(Extent) -> io::Result<()>,
) -> io::Result<()> {
    let bad = |e: String| io::Error::other(format!("{}: {e}", file.path.display()));
    let mut reader = open_content(file).map_err(io::Error::other)?;
    let mut buf = vec![0u8; 1 << 20];
    let clip = |e: Extent, sink: &mut dyn FnMut(Extent) -> io::Result<()>| -> io::Result<()> {
        if e.offset >= size {
            return Ok(());
        }
        let e = if e.end() > size {
            let keep = size - e.offset;
            match e.data {
                ExtentData::Data(mut d) => {
                    d.truncate(keep as usize);
                    Extent::data(e.offset, d)
                }
                ExtentData::Zero(_) => Extent::zero(e.offset, keep),
            }
        } else {
            e
        };
        sink(e)
    };
    match file.kind {
        DataKind::Vhd => {
            let mut dec = VhdDecoder::new();
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                for e in dec.feed(&buf[..n]).map_err(|e| bad(e.to_string()))? {
                    clip(e, sink)?;
                }
            }
            for e in dec.finish().map_err(|e| bad(e.to_string()))? {
                clip(e, sink)?;
            }
        }
        _ => {
            let mut dec = RawDecoder::new();
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                for e in dec.feed(&buf[..n]) {
                    clip(e, sink)?;
                }
            }
            for e in dec.finish() {
                clip(e, sink)?;
            }
        }
    }
    Ok(())
}

/// The rebuilt XVA as an upload body of exactly `total` bytes.
pub fn xva_stream(
    rebuilt: RebuiltXva,
    total: u64,
    progress: ProgressFn,
    cancel: super::Cancel,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    super::content::blocking_stream(cancel, move |tx| {
        let mut done = 0u64;
        let files = &rebuilt.files;
        let produced = encode_xva(
            &rebuilt.ova,
            ChecksumKind::XxHash,
            &mut |i, disk, sink| {
                let file = files.get(i).ok_or_else(|| {
                    io::Error::other(format!("no data file for disk {}", disk.vdi_uuid))
                })?;
                disk_extents(file, disk.virtual_size, sink)
            },
            &mut |piece| {
                done += piece.len() as u64;
                super::content::send(tx, Bytes::from(piece))?;
                progress(RestoreProgress {
                    phase: RestorePhase::Uploading,
                    done,
                    total,
                });
                Ok(())
            },
        )?;
        if produced != total {
            return Err(io::Error::other(format!(
                "the rebuilt XVA has {produced} bytes, {total} were announced"
            )));
        }
        Ok(())
    })
}
