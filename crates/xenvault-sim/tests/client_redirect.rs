//! Our client against the real `xapi-sim` binary: data transfers of a VDI on a
//! member's local SR. xapi answers `/export_raw_vdi` (and `/export`, `/import`,
//! `/import_raw_vdi`) on a host that cannot see the SR with `302 Found` to
//! `https://<host.address>/<same path>?<same query>` (xapi-facts.md §3 "Redirects";
//! xen-api ocaml/xapi/importexport.ml `return_302_redirect`); our HttpTransfer follows it
//! keeping `task_id`. The test checks that the download really ended at the host owning
//! the SR and that the bytes are right.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod client_support;

use client_support::{Ctx, SimProc};
use futures::StreamExt as _;
use xenvault_xapi::http::handler_url;
use xenvault_xapi::task::WaitOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_of_a_member_local_vdi_is_redirected_to_its_host() {
    // vm-02 lives on the second host, its disk on that host's local SR.
    let sim = SimProc::spawn(&[
        "--vms",
        "2",
        "--hosts",
        "2",
        "--disk-size",
        "4M",
        "--written",
        "25%",
    ]);
    let ctx = Ctx::https(&sim).await;
    let (vm, _) = ctx.vm("vm-02").await;
    let (_, vdi) = ctx.only_disk(&vm).await;
    let sr = ctx.session.sr().get_record(&vdi.sr).await.unwrap();
    assert!(!sr.shared, "a local SR");
    let pbd = ctx.session.pbd().get_record(&sr.pbds[0]).await.unwrap();
    let owner = ctx.session.host().get_record(&pbd.host).await.unwrap();
    let hosts = sim
        .control("GET", "/_sim/hosts", serde_json::Value::Null)
        .await;
    let owner_entry = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["uuid"] == owner.uuid.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        owner_entry["coordinator"], false,
        "the scenario puts vm-02 on the member"
    );
    let owner_https = owner_entry["https_url"].as_str().unwrap().to_string();
    let owner_port: u16 = owner_https.rsplit(':').next().unwrap().parse().unwrap();

    // VDI.get_nbd_info lists only hosts with the SR's PBD attached (xapi-facts §2.4):
    // the member. The whole disk, read over NBD from there, is the reference.
    let size = vdi.virtual_size as u64;
    let (vdi_ref, _) = ctx.only_disk(&vm).await;
    let infos = ctx.session.vdi().get_nbd_info(&vdi_ref).await.unwrap();
    let listed: Vec<String> = infos
        .iter()
        .map(|i| format!("{}:{}", i.address, i.port))
        .collect();
    assert_eq!(
        listed,
        vec![owner_entry["nbd"].as_str().unwrap().to_string()],
        "NBD servers listed for a VDI on the member's local SR"
    );
    let reference = client_support::image_of(
        &ctx.nbd_read(&vdi_ref, std::iter::once(0..size).collect(), 1)
            .await
            .unwrap(),
        size,
    );

    let task = ctx
        .session
        .create_task("redirected export", "")
        .await
        .unwrap();
    let url = handler_url(
        &ctx.session.base_url(),
        "/export_raw_vdi",
        ctx.session.session_ref().expose(),
        Some(task.id()),
        &[("vdi", vdi.uuid.as_str()), ("format", "raw")],
    );
    let download = ctx.transfer.get(url).await.unwrap();
    let final_url = download.url.clone();
    let mut body = download.body;
    let mut raw = Vec::new();
    while let Some(piece) = body.next().await {
        raw.extend_from_slice(&piece.unwrap());
    }
    task.wait(&WaitOptions::with_timeout(client_support::STEP))
        .await
        .unwrap();
    assert!(
        raw == reference,
        "the redirected export has the disk's bytes"
    );
    assert!(
        final_url.starts_with(&format!("https://127.0.0.1:{owner_port}/export_raw_vdi")),
        "the coordinator must redirect the export of a VDI on the member's local SR to \
         that member ({owner_https}); the download ended at {final_url}"
    );
}
