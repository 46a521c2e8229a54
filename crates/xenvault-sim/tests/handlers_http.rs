//! The HTTP data handlers over real sockets: auth, task semantics, raw/VHD/tar/XVA
//! exports checked by outside tools, imports, refusals and faults.

#![allow(clippy::unwrap_used)] // tests may unwrap (project code rules)

mod handlers_util;

use std::io::Read;
use std::process::Command;

use handlers_util::*;
use xenvault_formats::vhd::VhdDecoder;
use xenvault_formats::xva::{XvaDecoder, XvaEvent};
use xenvault_sim::db::Fields;
use xenvault_sim::faults::StreamFault;
use xenvault_types::ExtentData;

const DISK: u64 = 8 * MIB;

fn apply_extents(base: &mut [u8], extents: &[xenvault_types::Extent]) {
    for e in extents {
        if let ExtentData::Data(d) = &e.data {
            base[e.offset as usize..e.offset as usize + d.len()].copy_from_slice(d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_export_equals_the_disk_and_runs_in_the_given_task() {
    let sim = start(2, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let (vdi, uuid, size) = vm_disk(&pool, &vm);
    let t = pool.task_create("export test", "");
    let r = get(
        sim.addr,
        &format!(
            "/export_raw_vdi?session_id={}&vdi={vdi}&task_id={t}",
            sim.session
        ),
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(r.header("task-id"), Some(t.as_str()));
    assert!(r.header("content-length").is_none(), "{:?}", r.headers);
    assert_eq!(r.body.len() as u64, size);
    assert_eq!(r.body, disk_bytes(&pool, &uuid));
    let (status, _, err) = task(&pool, &t);
    assert_eq!(status, "success", "{err:?}");
    // By uuid, format=RAW (case-insensitive), cookie session, no task: a new task is named.
    let r = request(
        sim.addr,
        &format!(
            "GET /export_raw_vdi?vdi={uuid}&format=RAW HTTP/1.1\r\nCookie: session_id={}\r\n\r\n",
            sim.session
        ),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    let own = r.header("task-id").unwrap().to_string();
    assert_ne!(own, t);
    assert_eq!(task(&pool, &own).0, "success");
    assert_eq!(r.body, disk_bytes(&pool, &uuid));
    // The dom0 VBD of the transfer is gone afterwards.
    assert!(pool.db().get("VDI", &vdi).unwrap().strs_of("VBDs").len() == 1);
    assert!(pool.stats.get("bytes/export_raw_vdi") >= 2 * size);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_401_basic_auth_and_unknown_format() {
    let sim = start(1, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-01");
    let (vdi, _, _) = vm_disk(&pool, &vm);
    let t = pool.task_create("t", "");
    let r = get(sim.addr, &format!("/export_raw_vdi?vdi={vdi}&task_id={t}")).await;
    assert_eq!(r.status(), 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
    let (status, _, err) = task(&pool, &t);
    assert_eq!(
        (status.as_str(), err[0].as_str()),
        ("failure", "SESSION_AUTHENTICATION_FAILED")
    );
    let r = get(
        sim.addr,
        &format!("/export_raw_vdi?vdi={vdi}&session_id=OpaqueRef:bogus"),
    )
    .await;
    assert_eq!(r.status(), 401);

    // HTTP Basic with the pool's credentials works (a temporary session).
    use base64::Engine as _;
    let cred = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", sim.sim.info.user, sim.sim.info.password));
    let r = request(
        sim.addr,
        &format!("GET /pool/xmldbdump HTTP/1.1\r\nAuthorization: Basic {cred}\r\n\r\n"),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    let xml = String::from_utf8(r.body).unwrap();
    assert!(
        xml.contains("<database><manifest>"),
        "{}",
        &xml[..200.min(xml.len())]
    );
    assert!(xml.contains("<table name=\"VM\"><row ref=\"OpaqueRef:"));
    assert!(xml.contains("name__label=\"vm-01\""));
    assert!(xml.ends_with("</database>"));

    let t = pool.task_create("t", "");
    let r = get(
        sim.addr,
        &format!(
            "/export_raw_vdi?session_id={}&vdi={vdi}&format=qcow3&task_id={t}",
            sim.session
        ),
    )
    .await;
    assert_eq!(r.status(), 404);
    let (status, _, err) = task(&pool, &t);
    assert_eq!(status, "failure");
    assert_eq!(
        err,
        vec!["INTERNAL_ERROR".to_string(), "Unknown format qcow3".into()]
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhd_export_matches_raw_with_qemu_img() {
    if !have_tool("qemu-img") {
        return;
    }
    let sim = start(2, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let (vdi, uuid, _) = vm_disk(&pool, &vm);
    let r = get(
        sim.addr,
        &format!(
            "/export_raw_vdi?session_id={}&vdi={vdi}&format=vhd",
            sim.session
        ),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("content-type"), Some("application/vhd"));
    let dir = tempfile::tempdir().unwrap();
    let (vhd, raw) = (dir.path().join("d.vhd"), dir.path().join("d.raw"));
    write_file(&vhd, &r.body);
    write_file(&raw, &disk_bytes(&pool, &uuid));
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vpc"])
        .arg(&raw)
        .arg(&vhd));
    assert!(out.contains("identical"), "{out}");
    // Only allocated 2 MiB blocks are in the file: 10% written over 4 blocks can leave
    // none out, so check the count against the store instead.
    let alloc = pool.disks.allocated_blocks(&uuid).unwrap();
    let mut blocks: Vec<u64> = alloc.ones().map(|b| b / 32).collect();
    blocks.dedup();
    let expect_len = 2048 + 512 + 512 + 512 + blocks.len() as u64 * (512 + 2 * MIB);
    assert!(
        r.body.len() as u64 <= expect_len + 4096,
        "{} vs {expect_len}",
        r.body.len()
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhd_delta_with_base_applied_over_the_base_gives_the_new_disk() {
    let sim = start(2, 16 * MIB, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let (vdi, uuid, _) = vm_disk(&pool, &vm);
    let base = rpc(
        sim.addr,
        "VDI.snapshot",
        vec![
            s(&sim.session),
            s(&vdi),
            xenvault_types::Value::Struct(vec![]),
        ],
    )
    .await
    .unwrap();
    let base = base.as_str().unwrap().to_string();
    let base_uuid = pool
        .db()
        .get("VDI", &base)
        .unwrap()
        .str_of("uuid")
        .to_string();
    pool.disks.guest_write(&uuid, 4242, 7).unwrap();
    pool.disks
        .write_at(&uuid, 5 * MIB + 100, b"tiny change")
        .unwrap();
    let new = rpc(
        sim.addr,
        "VDI.snapshot",
        vec![
            s(&sim.session),
            s(&vdi),
            xenvault_types::Value::Struct(vec![]),
        ],
    )
    .await
    .unwrap();
    let new = new.as_str().unwrap().to_string();
    let new_uuid = pool
        .db()
        .get("VDI", &new)
        .unwrap()
        .str_of("uuid")
        .to_string();

    let r = get(
        sim.addr,
        &format!(
            "/export_raw_vdi?session_id={}&vdi={new}&format=vhd&base={base}",
            sim.session
        ),
    )
    .await;
    assert_eq!(r.status(), 200);
    let t = r.header("task-id").unwrap().to_string();
    assert_eq!(task(&pool, &t).0, "success");
    // Decode it: a differencing disk whose blocks are exactly the changed 2 MiB blocks.
    let mut dec = VhdDecoder::new();
    let mut extents = dec.feed(&r.body).unwrap();
    extents.extend(dec.finish().unwrap());
    let parent = dec.parent().expect("a differencing VHD");
    assert_ne!(
        parent.unique_id.to_string(),
        base_uuid,
        "xapi's parent uid is not the VDI uuid"
    );
    let mut rebuilt = disk_bytes(&pool, &base_uuid);
    apply_extents(&mut rebuilt, &extents);
    assert_eq!(rebuilt, disk_bytes(&pool, &new_uuid));
    let changed = pool.disks.differing_blocks(&new_uuid, &base_uuid).unwrap();
    let mut vhd_blocks: Vec<u64> = changed.ones().map(|b| b / 32).collect();
    vhd_blocks.dedup();
    assert_eq!(dec.layout().unwrap().allocated_count(), vhd_blocks.len());

    // And applied by the simulator itself onto a clone of the base (XO's delta restore).
    let clone = rpc(
        sim.addr,
        "VDI.clone",
        vec![
            s(&sim.session),
            s(&base),
            xenvault_types::Value::Struct(vec![]),
        ],
    )
    .await
    .unwrap();
    let clone = clone.as_str().unwrap().to_string();
    let clone_uuid = pool
        .db()
        .get("VDI", &clone)
        .unwrap()
        .str_of("uuid")
        .to_string();
    let t = pool.task_create("import", "");
    let r = put(
        sim.addr,
        &format!(
            "/import_raw_vdi?session_id={}&vdi={clone}&format=vhd&task_id={t}",
            sim.session
        ),
        &r.body,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("task-id"), Some(t.as_str()));
    let (status, result, err) = task(&pool, &t);
    assert_eq!(status, "success", "{err:?}");
    assert_eq!(result, format!("<value>{clone}</value>"));
    assert_eq!(disk_bytes(&pool, &clone_uuid), disk_bytes(&pool, &new_uuid));
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xva_export_unpacks_with_xva_img_and_imports_back() {
    let sim = start(2, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let (_, uuid, _) = vm_disk(&pool, &vm);
    let original = disk_bytes(&pool, &uuid);
    let vm_uuid = pool.db().get("VM", &vm).unwrap().str_of("uuid").to_string();
    let r = get(
        sim.addr,
        &format!("/export?session_id={}&uuid={vm_uuid}", sim.session),
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.0 200 OK");
    assert!(r.header("content-length").is_none());
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(task(&pool, r.header("task-id").unwrap()).0, "success");
    let xva = r.body;
    assert_eq!(&xva[..7], b"ova.xml");

    // Our own decoder sees the VM and the disk bytes.
    let mut dec = XvaDecoder::new();
    let mut disk = vec![0u8; original.len()];
    let mut vm_names = Vec::new();
    for ev in dec.feed(&xva).unwrap() {
        match ev {
            XvaEvent::OvaXml(ova) => {
                for o in ova.objects_of_class("VM") {
                    vm_names.push(
                        o.snapshot
                            .get("name_label")
                            .unwrap()
                            .as_str()
                            .unwrap()
                            .to_string(),
                    );
                    assert_eq!(
                        o.snapshot.get("power_state").unwrap().as_str().unwrap(),
                        "Halted"
                    );
                }
            }
            XvaEvent::Extent(e) => apply_extents(&mut disk, &[e]),
            _ => {}
        }
    }
    dec.finish().unwrap();
    assert_eq!(vm_names, vec!["vm-02".to_string()]);
    assert_eq!(disk, original);

    // xva-img 1.4 reads only SHA-1 `.checksum` files, which xapi < 1.170 wrote: make the
    // host an old one and check that its export unpacks with xva-img.
    if have_tool("xva-img") {
        let host = pool.coordinator();
        let set_xapi = |v: &str| {
            pool.db()
                .update("host", &host, |rec| {
                    if let Some(xenvault_types::Value::Struct(m)) = rec.get_mut("software_version")
                    {
                        m.retain(|(k, _)| k != "xapi");
                        m.push(("xapi".into(), s(v)));
                    }
                })
                .unwrap()
        };
        set_xapi("1.160");
        let old = get(
            sim.addr,
            &format!("/export?session_id={}&ref={vm}", sim.session),
        )
        .await;
        set_xapi("25.6");
        assert_eq!(old.status(), 200);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.xva");
        write_file(&path, &old.body);
        run(Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(dir.path()));
        let refdir = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("Ref:"))
            .unwrap()
            .path();
        assert!(refdir.join("00000000.checksum").exists());
        let out = dir.path().join("disk.raw");
        run(Command::new("xva-img")
            .arg("disk-export")
            .arg(format!("{}/", refdir.display()))
            .arg(&out));
        let mut exported = std::fs::read(&out).unwrap();
        exported.resize(original.len(), 0);
        assert!(
            exported == original,
            "xva-img disk-export differs from the disk"
        );
    }

    // Import it back (plain, gzip, zstd) and compare the disks.
    for comp in ["false", "gzip", "zstd"] {
        let r = get(
            sim.addr,
            &format!(
                "/export?session_id={}&ref={vm}&use_compression={comp}",
                sim.session
            ),
        )
        .await;
        assert_eq!(r.status(), 200);
        match comp {
            "gzip" => assert_eq!(&r.body[..2], &[0x1f, 0x8b]),
            "zstd" => assert_eq!(&r.body[..4], &[0x28, 0xB5, 0x2F, 0xFD]),
            _ => assert_eq!(&r.body[..7], b"ova.xml"),
        }
        let t = pool.task_create("import", "");
        let imp = put(
            sim.addr,
            &format!("/import?session_id={}&task_id={t}", sim.session),
            &r.body,
        )
        .await;
        assert_eq!(imp.status(), 200);
        let (status, result, err) = task(&pool, &t);
        assert_eq!(status, "success", "{comp}: {err:?}");
        let refs = xenvault_types::Value::from_xml(&result).unwrap();
        let refs = refs.as_array().unwrap();
        assert_eq!(refs.len(), 1);
        let new_vm = refs[0].as_str().unwrap().to_string();
        assert_ne!(new_vm, vm);
        let rec = pool.db().get("VM", &new_vm).unwrap().clone();
        assert_eq!(rec.str_of("name_label"), "vm-02");
        assert_ne!(rec.str_of("uuid"), vm_uuid);
        assert_eq!(rec.str_of("power_state"), "Halted");
        let (_, new_uuid, _) = vm_disk(&pool, &new_vm);
        assert_ne!(new_uuid, uuid);
        assert_eq!(disk_bytes(&pool, &new_uuid), original, "{comp}");
        assert_eq!(rec.strs_of("VIFs").len(), 1);
    }
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_running_vm_chunked_import_and_bad_checksum() {
    let sim = start(2, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let running = vm_by_name(&pool, "vm-01");
    assert_eq!(
        pool.db().get("VM", &running).unwrap().str_of("power_state"),
        "Running"
    );
    let t = pool.task_create("t", "");
    let r = get(
        sim.addr,
        &format!(
            "/export?session_id={}&ref={running}&task_id={t}",
            sim.session
        ),
    )
    .await;
    assert_eq!(r.status(), 500);
    let (status, _, err) = task(&pool, &t);
    assert_eq!(status, "failure");
    assert_eq!(
        err,
        vec![
            "VM_BAD_POWER_STATE".to_string(),
            running.clone(),
            "halted, suspended".into(),
            "running".into()
        ]
    );

    let t = pool.task_create("t", "");
    let r = request(
        sim.addr,
        &format!(
            "PUT /import?session_id={}&task_id={t} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            sim.session
        ),
        b"5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), 403);
    let (status, _, err) = task(&pool, &t);
    assert_eq!(
        (status.as_str(), err[0].as_str()),
        ("failure", "IMPORT_ERROR_CANNOT_HANDLE_CHUNKED")
    );

    // A corrupted chunk: the import fails and leaves no VM behind.
    let halted = vm_by_name(&pool, "vm-02");
    let mut xva = get(
        sim.addr,
        &format!("/export?session_id={}&ref={halted}", sim.session),
    )
    .await
    .body;
    let vms_before = pool.db().all("VM").len();
    let vdis_before = pool.db().all("VDI").len();
    // Flip a byte inside the first chunk's data (after ova.xml's header+data and the chunk header).
    let ova_len = usize::from_str_radix(
        std::str::from_utf8(&xva[124..135])
            .unwrap()
            .trim_end_matches('\0'),
        8,
    )
    .unwrap();
    let chunk_data = 512 + ova_len.div_ceil(512) * 512 + 512;
    xva[chunk_data + 10] ^= 0xFF;
    let t = pool.task_create("t", "");
    let r = put(
        sim.addr,
        &format!("/import?session_id={}&task_id={t}", sim.session),
        &xva,
    )
    .await;
    assert_eq!(r.status(), 200);
    let (status, _, err) = task(&pool, &t);
    assert_eq!(status, "failure");
    assert_eq!(err[0], "IMPORT_ERROR_GENERIC", "{err:?}");
    assert!(err[1].contains("checksum"), "{err:?}");
    assert_eq!(pool.db().all("VM").len(), vms_before);
    assert_eq!(pool.db().all("VDI").len(), vdis_before);
    // With force=true the same archive imports.
    let t = pool.task_create("t", "");
    let _ = put(
        sim.addr,
        &format!("/import?session_id={}&task_id={t}&force=true", sim.session),
        &xva,
    )
    .await;
    assert_eq!(task(&pool, &t).0, "success");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_imports_plain_chunked_and_new_vdi() {
    let sim = start(1, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let sr = pool.default_sr();
    // New VDI from sr_id + Content-Length.
    let data: Vec<u8> = (0..(3 * MIB) as u32).map(|i| (i / 7 % 251) as u8).collect();
    let t = pool.task_create("t", "");
    let r = put(
        sim.addr,
        &format!(
            "/import_raw_vdi?session_id={}&sr_id={sr}&task_id={t}",
            sim.session
        ),
        &data,
    )
    .await;
    assert_eq!(r.status(), 200);
    let (status, result, err) = task(&pool, &t);
    assert_eq!(status, "success", "{err:?}");
    let vdi = xenvault_types::Value::from_xml(&result)
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let rec = pool.db().get("VDI", &vdi).unwrap().clone();
    assert_eq!(rec.str_of("name_label"), "Imported VDI");
    // SM rounds the size up to 2 MiB: 3 MiB of data in a 4 MiB VDI.
    assert_eq!(rec.int_of("virtual_size") as u64, 4 * MIB);
    let mut data = data;
    data.resize((4 * MIB) as usize, 0);
    assert_eq!(disk_bytes(&pool, rec.str_of("uuid")), data);

    // `chunked` query framing onto that VDI: two pieces, then {0,0}.
    let mut body = Vec::new();
    for (off, piece) in [
        (4096u64, &b"first piece"[..]),
        (2 * MIB + 512, &b"second"[..]),
    ] {
        body.extend_from_slice(&off.to_le_bytes());
        body.extend_from_slice(&(piece.len() as u32).to_le_bytes());
        body.extend_from_slice(piece);
    }
    body.extend_from_slice(&[0u8; 12]);
    let t = pool.task_create("t", "");
    let r = put(
        sim.addr,
        &format!(
            "/import_raw_vdi?session_id={}&vdi={vdi}&chunked&task_id={t}",
            sim.session
        ),
        &body,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(task(&pool, &t).0, "success");
    let mut expect = data.clone();
    expect[4096..4096 + 11].copy_from_slice(b"first piece");
    expect[(2 * MIB + 512) as usize..(2 * MIB + 518) as usize].copy_from_slice(b"second");
    assert_eq!(disk_bytes(&pool, rec.str_of("uuid")), expect);

    // HTTP chunked encoding is refused.
    let t = pool.task_create("t", "");
    let r = request(
        sim.addr,
        &format!("PUT /import_raw_vdi?session_id={}&vdi={vdi}&task_id={t} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", sim.session),
        b"0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), 404);
    assert_eq!(task(&pool, &t).2[0], "INTERNAL_ERROR");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_export_host_backup_and_export_metadata() {
    let sim = start(2, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let (vdi, uuid, size) = vm_disk(&pool, &vm);
    let r = get(
        sim.addr,
        &format!(
            "/export_raw_vdi?session_id={}&vdi={vdi}&format=tar",
            sim.session
        ),
    )
    .await;
    assert_eq!(r.status(), 200);
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("d.tar");
    write_file(&tar, &r.body);
    let list = run(Command::new("tar").arg("-tf").arg(&tar));
    assert!(
        list.contains("vdi/00000000\n") && list.contains("vdi/00000000.xxhash"),
        "{list}"
    );
    let last = format!("vdi/{:08}\n", size / MIB - 1);
    assert!(list.contains(&last), "{list}");
    let _ = uuid;

    let r = get(
        sim.addr,
        &format!("/host_backup?session_id={}", sim.session),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.header("content-length").is_none());
    let mut tarbytes = Vec::new();
    flate2::read::GzDecoder::new(&r.body[..])
        .read_to_end(&mut tarbytes)
        .unwrap();
    write_file(&tar, &tarbytes);
    let list = run(Command::new("tar").arg("-tf").arg(&tar));
    assert!(list.contains("etc/xensource-inventory"), "{list}");
    assert!(list.contains("var/backup/pool-database-"), "{list}");
    assert!(pool.stats.get("bytes/host_backup") > 0);

    let r = get(
        sim.addr,
        &format!("/export_metadata?session_id={}&ref={vm}", sim.session),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap(),
        r.body.len()
    );
    assert_eq!(&r.body[..7], b"ova.xml");
    assert_eq!(r.body.len() % 512, 0);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_cut_an_export_and_fill_the_sr() {
    let sim = start(2, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let (vdi, _, _) = vm_disk(&pool, &vm);
    pool.faults.set_stream_fault(
        "export_raw_vdi",
        StreamFault {
            cut_after: Some(1_000_000),
            bytes_per_sec: None,
            times: Some(1),
        },
    );
    let t = pool.task_create("t", "");
    let r = get(
        sim.addr,
        &format!(
            "/export_raw_vdi?session_id={}&vdi={vdi}&task_id={t}",
            sim.session
        ),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.body.len(), 1_000_000);
    let (status, _, err) = task(&pool, &t);
    assert_eq!(
        (status.as_str(), err[0].as_str()),
        ("failure", "VDI_IO_ERROR")
    );

    // A slow stream still completes (64 MiB/s over 8 MiB: ~1/8 s).
    pool.faults.set_stream_fault(
        "export_raw_vdi",
        StreamFault {
            cut_after: None,
            bytes_per_sec: Some(64 * MIB),
            times: Some(1),
        },
    );
    let started = std::time::Instant::now();
    let r = get(
        sim.addr,
        &format!("/export_raw_vdi?session_id={}&vdi={vdi}", sim.session),
    )
    .await;
    assert_eq!(r.body.len() as u64, DISK);
    assert!(started.elapsed().as_millis() >= 100);

    pool.faults.set_sr_full(true);
    let xva = get(
        sim.addr,
        &format!("/export?session_id={}&ref={vm}", sim.session),
    )
    .await
    .body;
    let t = pool.task_create("t", "");
    let r = put(
        sim.addr,
        &format!("/import?session_id={}&task_id={t}", sim.session),
        &xva,
    )
    .await;
    assert_eq!(r.status(), 200);
    let (status, _, err) = task(&pool, &t);
    assert_eq!((status.as_str(), err[0].as_str()), ("failure", "SR_FULL"));
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_and_cbt_survive_a_restart_of_the_simulator() {
    let sim = start(2, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let (vdi, uuid, _) = vm_disk(&pool, &vm);
    pool.disks.enable_cbt(&uuid).unwrap();
    pool.disks.snapshot(&uuid, "restart-snap").unwrap();
    let written = pool.disks.guest_write(&uuid, 99, 5).unwrap();
    let before = disk_bytes(&pool, &uuid);
    let state = sim.dir.path().join("state");
    let Sim { sim, dir, .. } = sim;
    sim.shutdown().await.unwrap();
    drop(pool);

    let again = xenvault_sim::Simulator::start(xenvault_sim::SimConfig::new(&state))
        .await
        .unwrap();
    let addr: std::net::SocketAddr = again
        .info
        .url
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let pool = again.pool.clone();
    let session = pool.new_session("root", "t", &pool.coordinator());
    let r = get(
        addr,
        &format!("/export_raw_vdi?session_id={session}&vdi={vdi}"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.body, before);
    let bits = pool
        .disks
        .list_changed_blocks("restart-snap", &uuid)
        .unwrap();
    assert_eq!(bits.ones().collect::<Vec<_>>(), written);
    again.shutdown().await.unwrap();
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_with_xo_fake_length_finishes_at_the_tar_end() {
    // XO sends Content-Length: 1 PiB when it does not know the size and keeps the socket
    // open after the data: the import must finish at the tar end, not wait for more.
    let sim = start(2, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let xva = get(
        sim.addr,
        &format!(
            "/export?session_id={}&ref={vm}&use_compression=zstd",
            sim.session
        ),
    )
    .await
    .body;
    let t = pool.task_create("t", "");
    let head = format!(
        "PUT /import?session_id={}&task_id={t} HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        sim.session,
        1u64 << 50
    );
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        request(sim.addr, &head, &xva),
    )
    .await
    .expect("the import must not wait for the fake length");
    assert_eq!(r.status(), 200);
    let (status, _, err) = task(&pool, &t);
    assert_eq!(status, "success", "{err:?}");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_cancel_stops_a_running_export() {
    let sim = start(2, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let (vdi, _, _) = vm_disk(&pool, &vm);
    // 2 MiB/s over 8 MiB: about 4 s unless cancelled.
    pool.faults.set_stream_fault(
        "export_raw_vdi",
        StreamFault {
            cut_after: None,
            bytes_per_sec: Some(2 * MIB),
            times: Some(1),
        },
    );
    let t = pool.task_create("t", "");
    let (addr, session, t2) = (sim.addr, sim.session.clone(), t.clone());
    let download = tokio::spawn(async move {
        get(
            addr,
            &format!("/export_raw_vdi?session_id={session}&vdi={vdi}&task_id={t2}"),
        )
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    rpc(sim.addr, "task.cancel", vec![s(&sim.session), s(&t)])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let r = download.await.unwrap();
    assert!(
        started.elapsed().as_secs_f64() < 2.0,
        "the cancel did not stop the stream"
    );
    assert!((r.body.len() as u64) < DISK);
    let (status, _, err) = task(&pool, &t);
    assert_eq!(status, "cancelled", "{err:?}");
    assert_eq!(err, vec!["TASK_CANCELLED".to_string(), t.clone()]);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_of_a_member_local_sr_are_redirected_to_the_member() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = xenvault_sim::SimConfig::new(dir.path().join("state"));
    cfg.scenario =
        xenvault_sim::scenario::Scenario::from_flags(&xenvault_sim::scenario::FlagScenario {
            vms: 2,
            disk_size: 4 * MIB,
            written: 0.25,
            hosts: 2,
            nbd_purpose: "insecure_nbd".into(),
        });
    let sim = xenvault_sim::Simulator::start(cfg).await.unwrap();
    let pool = sim.pool.clone();
    let coordinator = pool.coordinator();
    let addr: std::net::SocketAddr = sim.info.url.trim_start_matches("http://").parse().unwrap();
    let session = pool.new_session("root", "t", &coordinator);
    let vm = vm_by_name(&pool, "vm-02"); // on the member, its disk on the member's local SR
    let (vdi, uuid, _) = vm_disk(&pool, &vm);
    let member = pool
        .db()
        .all("host")
        .into_iter()
        .find(|h| *h != coordinator)
        .unwrap();
    let ep = pool.endpoint(&member).unwrap();

    let t = pool.task_create("t", "");
    let target = format!("/export_raw_vdi?session_id={session}&vdi={vdi}&task_id={t}");
    let r = get(addr, &target).await;
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.header("location").unwrap(),
        format!("https://127.0.0.1:{}{target}", ep.https.port())
    );
    assert_eq!(
        task(&pool, &t).0,
        "pending",
        "the redirect leaves the task to the member"
    );
    // The member serves it (its plain port here; the Location names its HTTPS one).
    let r = get(ep.http, &target).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.body, disk_bytes(&pool, &uuid));
    assert_eq!(task(&pool, &t).0, "success");
    // /export of the VM and an upload to the VDI are redirected too; the coordinator's own
    // disks are not.
    let r = get(addr, &format!("/export?session_id={session}&ref={vm}")).await;
    assert_eq!(r.status(), 302);
    let r = put(
        addr,
        &format!("/import_raw_vdi?session_id={session}&vdi={vdi}"),
        &[],
    )
    .await;
    assert_eq!(r.status(), 302);
    let local = vm_by_name(&pool, "vm-01");
    let (local_vdi, _, _) = vm_disk(&pool, &local);
    let r = get(
        addr,
        &format!("/export_raw_vdi?session_id={session}&vdi={local_vdi}"),
    )
    .await;
    assert_eq!(r.status(), 200);
    sim.shutdown().await.unwrap();
}
