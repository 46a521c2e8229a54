//! Our client against the real `xapi-sim` binary: full exports. Raw exports equal the
//! disk as read over NBD; VHD exports decode (xenvault_formats::vhd) to the raw bytes
//! and `qemu-img compare` agrees; XVA exports (plain, gzip, zstd) decode to the raw bytes
//! of every disk; an exported XVA imports back (PUT /import with Content-Length) and the
//! imported VM's disks equal the originals.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod client_support;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::process::Command;

use client_support::{
    Ctx, STEP, SimProc, decode_vhd, decode_xva, image_of, require_tool, within, write_file,
};
use xenvault_formats::vhd::DiskType;
use xenvault_xapi::http::handler_url;
use xenvault_xapi::records::{PowerState, VmRef};
use xenvault_xapi::task::WaitOptions;

/// A halted VM with two disks of different sizes (one not a multiple of 2 MiB before
/// SM's rounding), and a running VM.
const SCENARIO: &str = r#"
[[vms]]
name = "two-disks"
power_state = "Halted"
[[vms.disks]]
size = "6M"
written = "30%"
[[vms.disks]]
size = "3M"
written = "50%"
[[vms.vifs]]
network = 0

[[vms]]
name = "busy"
power_state = "Running"
[[vms.disks]]
size = "4M"
written = "10%"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_vhd_and_xva_exports_equal_the_disks() {
    let sim = SimProc::spawn_scenario(SCENARIO, &[]);
    let ctx = Ctx::https(&sim).await;
    let (vm, record) = ctx.vm("two-disks").await;
    assert_eq!(record.power_state, PowerState::Halted);
    let disks = ctx.vm_disks(&vm).await;
    assert_eq!(disks.len(), 2);
    let tmp = tempfile::tempdir().unwrap();
    let qemu = require_tool("qemu-img");

    let mut raws = BTreeMap::new();
    for (vdi_ref, vdi) in &disks {
        let size = vdi.virtual_size as u64;
        assert_eq!(size % (2 << 20), 0, "SM rounds VDI sizes to 2 MiB");
        // Raw export through our client…
        let raw = ctx.export_raw(vdi).await;
        assert!(
            raw.iter().any(|b| *b != 0),
            "the scenario wrote data on {}",
            vdi.uuid
        );
        // …equals the disk as read over NBD (a second, independent path).
        let extents = ctx
            .nbd_read(vdi_ref, std::iter::once(0..size).collect(), 2)
            .await
            .unwrap();
        assert_eq!(image_of(&extents, size), raw, "NBD read of {}", vdi.uuid);

        // VHD export: a dynamic VHD whose content is the raw export.
        let vhd = ctx
            .fetch_ok(
                "/export_raw_vdi",
                &[("vdi", vdi.uuid.as_str()), ("format", "vhd")],
            )
            .await;
        let decoded = decode_vhd(&vhd);
        assert_eq!(decoded.disk_type, DiskType::Dynamic);
        assert!(decoded.parent.is_none());
        assert_eq!(decoded.virtual_size, size);
        assert_eq!(
            image_of(&decoded.extents, size),
            raw,
            "VHD export of {} decoded",
            vdi.uuid
        );
        if qemu {
            let raw_path = write_file(tmp.path(), &format!("{}.img", vdi.uuid), &raw);
            let vhd_path = write_file(tmp.path(), &format!("{}.vhd", vdi.uuid), &vhd);
            let out = Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "vpc"])
                .arg(&raw_path)
                .arg(&vhd_path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "qemu-img compare raw vs the simulator's VHD export: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        raws.insert(vdi.uuid.clone(), raw);
    }

    // XVA exports, plain and compressed: every disk equals its raw export.
    for compression in [None, Some("true"), Some("gzip"), Some("zstd")] {
        let mut params = vec![("ref", vm.as_str())];
        if let Some(c) = compression {
            params.push(("use_compression", c));
        }
        let body = ctx.fetch_ok("/export", &params).await;
        let tar = match compression {
            None => body,
            Some("zstd") => {
                assert_eq!(&body[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
                zstd::stream::decode_all(&body[..]).unwrap()
            }
            Some(_) => {
                assert_eq!(&body[..2], &[0x1f, 0x8b], "gzip magic");
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&body[..])
                    .read_to_end(&mut out)
                    .unwrap();
                out
            }
        };
        let xva = decode_xva(&tar);
        assert_eq!(
            xva.disks.keys().collect::<Vec<_>>(),
            raws.keys().collect::<Vec<_>>(),
            "disks of the XVA ({compression:?})"
        );
        for (uuid, image) in &xva.disks {
            assert!(
                *image == raws[uuid],
                "XVA ({compression:?}) disk {uuid} differs from its raw export"
            );
        }
        assert!(xva.ova.objects.iter().any(|o| o.class == "VM"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_xva_imports_back_with_equal_disks() {
    let sim = SimProc::spawn_scenario(SCENARIO, &[]);
    let ctx = Ctx::https(&sim).await;
    let (vm, _) = ctx.vm("two-disks").await;
    let originals = ctx.vm_disks(&vm).await;
    let mut original_raws = Vec::new();
    for (_, vdi) in &originals {
        original_raws.push(ctx.export_raw(vdi).await);
    }
    // A plain and a zstd-compressed export both import back (xapi sniffs the magic).
    for compression in [None, Some("zstd")] {
        let mut params = vec![("ref", vm.as_str())];
        if let Some(c) = compression {
            params.push(("use_compression", c));
        }
        let xva = ctx.fetch_ok("/export", &params).await;

        // PUT /import through our HttpTransfer (explicit Content-Length), inside a task.
        let task = ctx
            .session
            .create_task("client test import", "")
            .await
            .unwrap();
        let url = handler_url(
            &ctx.session.base_url(),
            "/import",
            ctx.session.session_ref().expose(),
            Some(task.id()),
            &[],
        );
        let len = xva.len() as u64;
        let body = futures::stream::iter(
            xva.chunks(1 << 20)
                .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        let upload = within(STEP, "XVA upload", ctx.transfer.put(url, body, len))
            .await
            .unwrap();
        assert_eq!(upload.bytes_sent, len);
        let imported: Vec<VmRef> = within(
            STEP,
            "import task",
            task.wait_result(&WaitOptions::with_timeout(STEP)),
        )
        .await
        .unwrap_or_else(|e| panic!("import of the {compression:?} XVA: {e}"));
        assert_eq!(imported.len(), 1, "the import task result names one VM");
        let new_vm = &imported[0];
        assert_ne!(new_vm, &vm);
        let record = ctx.session.vm().get_record(new_vm).await.unwrap();
        assert_eq!(record.name_label, "two-disks");
        assert_eq!(record.power_state, PowerState::Halted);

        let copies = ctx.vm_disks(new_vm).await;
        assert_eq!(copies.len(), originals.len());
        for ((_, copy), ((_, original), raw)) in
            copies.iter().zip(originals.iter().zip(&original_raws))
        {
            assert_ne!(copy.uuid, original.uuid, "the import makes new VDIs");
            assert_eq!(copy.virtual_size, original.virtual_size);
            let copied = ctx.export_raw(copy).await;
            assert!(
                copied == *raw,
                "imported disk {} ({compression:?}) differs from {}",
                copy.uuid,
                original.uuid
            );
        }
    }
}
