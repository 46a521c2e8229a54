//! Our client against the real `xapi-sim` binary: an incremental backup over NBD. The
//! changed blocks of snapshot B (from `VDI.list_changed_blocks(A, B)`) are read through
//! `VDI.get_nbd_info` + `NbdMultiReader`, plain (`insecure_nbd`) and TLS (`nbd`, pinned
//! to the certificate XAPI hands out), and laid over A's image they give B. The
//! simulator's counters prove that exactly the changed bytes crossed the wire, and the
//! wrong TLS choice for the network purpose is refused with a typed error.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod client_support;

use std::collections::BTreeSet;

use client_support::{Ctx, STEP, SimProc, apply, within};
use xenvault_xapi::cbt::ChangedBlocks;
use xenvault_xapi::nbd::client::{NbdConnection, NbdError, NbdTls};
use xenvault_xapi::tls::Fingerprint;

const DISK: u64 = 8 << 20;

async fn incremental_over_nbd(purpose: &str) {
    let sim = SimProc::spawn(&[
        "--vms",
        "1",
        "--disk-size",
        "8M",
        "--written",
        "20%",
        "--nbd-purpose",
        purpose,
    ]);
    let ctx = Ctx::https(&sim).await;
    let (vm, _) = ctx.vm("vm-01").await;
    let (live_ref, live) = ctx.only_disk(&vm).await;
    ctx.session.vdi().enable_cbt(&live_ref).await.unwrap();
    let snap_a = ctx.snapshot(&vm, "nbd A").await;
    let (_, a) = ctx.only_disk(&snap_a).await;
    let written = sim.guest_write(&live.uuid, 31, 9).await;
    let snap_b = ctx.snapshot(&vm, "nbd B").await;
    let (b_ref, b) = ctx.only_disk(&snap_b).await;
    let a_ref = ctx.only_disk(&snap_a).await.0;

    let text = ctx
        .session
        .vdi()
        .list_changed_blocks(&a_ref, &b_ref)
        .await
        .unwrap();
    let changed = ChangedBlocks::from_base64(&text, DISK).unwrap();
    assert_eq!(changed.changed_blocks().collect::<BTreeSet<u64>>(), written);
    let raw_a = ctx.export_raw(&a).await;
    let raw_b = ctx.export_raw(&b).await;

    // The options follow the pool's purpose: TLS pinned to XAPI's certificate, or plain.
    let options = ctx.nbd_options(&b_ref).await;
    match purpose {
        "nbd" => match &options.tls {
            // The certificate XAPI hands out is the one the pool presents.
            NbdTls::PinnedPem(pem) => assert_eq!(
                Fingerprint::of_pem(pem).unwrap().to_string(),
                sim.info.fingerprint
            ),
            other => panic!("TLS options for purpose nbd: {other:?}"),
        },
        _ => assert!(matches!(options.tls, NbdTls::Off), "plain for insecure_nbd"),
    }

    sim.control("POST", "/_sim/stats/reset", serde_json::json!({}))
        .await;
    let extents = ctx
        .nbd_read(&b_ref, changed.ranges().collect(), 2)
        .await
        .unwrap();
    let read: u64 = extents.iter().map(|e| e.len()).sum();
    assert_eq!(read, changed.changed_bytes());
    let mut image = raw_a.clone();
    apply(&mut image, &extents);
    assert!(
        image == raw_b,
        "A + NBD reads of the changed blocks differs from B"
    );

    // Exactly the changed bytes were read from B, nothing from A.
    assert_eq!(
        sim.stat("nbd_bytes", &b.uuid).await,
        changed.changed_bytes(),
        "NBD bytes the simulator served for B"
    );
    assert_eq!(sim.stat("nbd_bytes", &a.uuid).await, 0);
    assert!(sim.stat("nbd", "connections").await >= 1);

    // The other TLS choice is refused with a typed error, without hanging.
    let mut wrong = options.clone();
    wrong.tls = match purpose {
        "nbd" => NbdTls::Off,
        _ => NbdTls::PinnedPem(
            ctx.session.vdi().get_nbd_info(&b_ref).await.unwrap()[0]
                .cert
                .clone(),
        ),
    };
    let err = within(STEP, "NBD connect", NbdConnection::connect(&wrong))
        .await
        .expect_err("the wrong TLS mode must be refused");
    eprintln!("{purpose}, wrong TLS mode: {err}");
    match purpose {
        // Options in clear get NBD_REP_ERR_TLS_REQD (or EXPORT_NAME in clear: closed).
        "nbd" => assert!(
            matches!(
                &err,
                NbdError::OptionRefused { reply, .. } if reply.contains("TLS_REQD")
            ) || matches!(err, NbdError::ConnectionLost(_)),
            "plain client on a TLS-only server: {err:?}"
        ),
        _ => assert!(
            matches!(
                &err,
                NbdError::OptionRefused { option, reply, .. }
                    if option.contains("STARTTLS") && reply.contains("POLICY")
            ),
            "STARTTLS on an insecure_nbd server: {err:?}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_plain_reads_only_the_changed_blocks() {
    incremental_over_nbd("insecure_nbd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_tls_reads_only_the_changed_blocks() {
    incremental_over_nbd("nbd").await;
}
