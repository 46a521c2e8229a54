//! The simulator's NBD server as xapi-nbd behaves: libnbd tools (nbdinfo, nbdcopy) in
//! insecure mode, the xenvault client over STARTTLS, the option and read rules, the dom0
//! VBD while connected, and the connection limit.

#![allow(clippy::unwrap_used)] // tests may unwrap (project code rules)

mod handlers_util;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use handlers_util::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xenvault_sim::db::Fields;
use xenvault_xapi::nbd::client::{NbdConnection, NbdOptions, NbdTls};
use xenvault_xapi::nbd::proto;

const DISK: u64 = 8 * MIB;

fn nbd_addr(sim: &Sim) -> SocketAddr {
    sim.sim.info.nbd[0].parse().unwrap()
}

fn export_name(uuid: &str, session: &str) -> String {
    format!("/{uuid}?session_id={session}")
}

fn vbd_count(pool: &xenvault_sim::Pool, vdi: &str) -> usize {
    pool.db().get("VDI", vdi).unwrap().strs_of("VBDs").len()
}

async fn wait_vbds(pool: &xenvault_sim::Pool, vdi: &str, n: usize) {
    for _ in 0..100 {
        if vbd_count(pool, vdi) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "VDI {vdi} still has {} VBDs, expected {n}",
        vbd_count(pool, vdi)
    );
}

/// Reads the greeting and sends the fixed-newstyle client flags.
async fn handshake(s: &mut TcpStream) {
    let mut g = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(
        proto::decode_greeting(&g).unwrap(),
        proto::FLAG_FIXED_NEWSTYLE
    );
    s.write_all(&proto::CLIENT_FIXED_NEWSTYLE.to_be_bytes())
        .await
        .unwrap();
}

/// Sends an option and returns the reply type.
async fn option(s: &mut TcpStream, option: u32, data: &[u8]) -> u32 {
    s.write_all(
        &proto::OptionRequest {
            option,
            data: data.to_vec(),
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h).await.unwrap();
    let hdr = proto::decode_option_reply_header(&h).unwrap();
    assert_eq!(hdr.option, option);
    let mut payload = vec![0u8; hdr.len as usize];
    s.read_exact(&mut payload).await.unwrap();
    hdr.reply
}

async fn read_cmd(s: &mut TcpStream, handle: u64, offset: u64, length: u32) -> (u32, Vec<u8>) {
    let req = proto::Request {
        flags: 0,
        command: proto::cmd::READ,
        handle,
        offset,
        length,
    };
    s.write_all(&req.encode()).await.unwrap();
    let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(&h[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    let mut rest = [0u8; 12];
    rest.copy_from_slice(&h[4..]);
    let r = proto::decode_simple_reply_rest(&rest);
    assert_eq!(r.handle, handle);
    let mut data = vec![0u8; if r.error == 0 { length as usize } else { 0 }];
    s.read_exact(&mut data).await.unwrap();
    (r.error, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_tools_read_the_disk_in_insecure_mode() {
    if !have_tool("nbdinfo") || !have_tool("nbdcopy") {
        return;
    }
    let sim = start(2, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let (vdi, uuid, size) = vm_disk(&pool, &vm);
    let name = export_name(&uuid, &sim.session);
    let enc: String = name
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let uri = format!("nbd://{}/{enc}", nbd_addr(&sim));
    let info = tokio::task::spawn_blocking({
        let uri = uri.clone();
        move || run(Command::new("nbdinfo").arg("--json").arg(&uri))
    })
    .await
    .unwrap();
    let j: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        j["exports"][0]["export-size"].as_u64(),
        Some(size),
        "{info}"
    );
    assert_eq!(
        j["exports"][0]["is_read_only"].as_bool(),
        Some(true),
        "{info}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.raw");
    let out2 = out.clone();
    tokio::task::spawn_blocking(move || run(Command::new("nbdcopy").arg(&uri).arg(&out2)))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), disk_bytes(&pool, &uuid));
    assert!(pool.stats.get(&format!("nbd_reads/{uuid}")) > 0);
    assert!(pool.stats.get(&format!("nbd_bytes/{uuid}")) >= size);
    wait_vbds(&pool, &vdi, 1).await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_reads_and_the_dom0_vbd_follow_xapi_nbd() {
    let sim = start(2, DISK, "insecure_nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let (vdi, uuid, size) = vm_disk(&pool, &vm);
    let mut s = TcpStream::connect(nbd_addr(&sim)).await.unwrap();
    handshake(&mut s).await;
    assert_eq!(
        option(&mut s, proto::opt::INFO, b"").await,
        proto::rep::ERR_UNSUP
    );
    assert_eq!(
        option(&mut s, proto::opt::GO, b"").await,
        proto::rep::ERR_UNSUP
    );
    assert_eq!(
        option(&mut s, proto::opt::STRUCTURED_REPLY, b"").await,
        proto::rep::ERR_UNSUP
    );
    assert_eq!(
        option(&mut s, proto::opt::LIST, b"").await,
        proto::rep::ERR_POLICY
    );
    assert_eq!(
        option(&mut s, proto::opt::STARTTLS, b"").await,
        proto::rep::ERR_POLICY
    );
    let name = export_name(&uuid, &sim.session);
    s.write_all(
        &proto::OptionRequest {
            option: proto::opt::EXPORT_NAME,
            data: name.into_bytes(),
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut reply = [0u8; 134];
    s.read_exact(&mut reply).await.unwrap();
    let mut ten = [0u8; 10];
    ten.copy_from_slice(&reply[..10]);
    let info = proto::decode_export_name_reply(&ten);
    assert_eq!(info.size, size);
    assert_eq!(
        info.flags,
        proto::tflag::HAS_FLAGS | proto::tflag::READ_ONLY
    );
    assert!(reply[10..].iter().all(|&b| b == 0));

    // A dom0 VBD exists while connected: destroying the VDI is refused.
    assert_eq!(vbd_count(&pool, &vdi), 2);
    let err = rpc(sim.addr, "VDI.destroy", vec![s_(&sim.session), s_(&vdi)])
        .await
        .unwrap_err();
    assert_eq!(err[0], "VDI_IN_USE", "{err:?}");

    let disk = disk_bytes(&pool, &uuid);
    let (e, data) = read_cmd(&mut s, 1, 3 * MIB, 65536).await;
    assert_eq!(e, 0);
    assert_eq!(data, &disk[3 * MIB as usize..3 * MIB as usize + 65536]);
    assert_eq!(read_cmd(&mut s, 2, 100, 512).await.0, proto::errno::EINVAL);
    assert_eq!(read_cmd(&mut s, 3, 0, 1000).await.0, proto::errno::EINVAL);
    assert_eq!(
        read_cmd(&mut s, 4, size - 512, 1024).await.0,
        proto::errno::EINVAL
    );
    let (e, data) = read_cmd(&mut s, 5, size - 512, 512).await;
    assert_eq!((e, data.as_slice()), (0, &disk[(size - 512) as usize..]));
    let disc = proto::Request {
        flags: 0,
        command: proto::cmd::DISC,
        handle: 6,
        offset: 0,
        length: 0,
    };
    s.write_all(&disc.encode()).await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    wait_vbds(&pool, &vdi, 1).await;

    // A bad session: the server closes without an export reply.
    let mut s = TcpStream::connect(nbd_addr(&sim)).await.unwrap();
    handshake(&mut s).await;
    let name = export_name(&uuid, "OpaqueRef:not-a-session");
    s.write_all(
        &proto::OptionRequest {
            option: proto::opt::EXPORT_NAME,
            data: name.into_bytes(),
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    assert_eq!(vbd_count(&pool, &vdi), 1);
    sim.stop().await;
}

fn s_(v: &str) -> xenvault_types::Value {
    s(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_required_when_the_network_purpose_is_nbd() {
    let sim = start(2, DISK, "nbd").await;
    let pool = sim.pool().clone();
    let vm = vm_by_name(&pool, "vm-02");
    let (_, uuid, size) = vm_disk(&pool, &vm);
    // Options before STARTTLS are refused; EXPORT_NAME in clear closes the connection.
    let mut s = TcpStream::connect(nbd_addr(&sim)).await.unwrap();
    handshake(&mut s).await;
    assert_eq!(
        option(&mut s, proto::opt::LIST, b"").await,
        proto::rep::ERR_TLS_REQD
    );
    let name = export_name(&uuid, &sim.session);
    s.write_all(
        &proto::OptionRequest {
            option: proto::opt::EXPORT_NAME,
            data: name.clone().into_bytes(),
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    assert!(rest.is_empty());

    // The xenvault client with the host certificate (VDI.get_nbd_info's `cert`) reads.
    let addr = nbd_addr(&sim);
    let mut opts = NbdOptions::from_nbd_info(
        &addr.ip().to_string(),
        addr.port(),
        &name,
        &pool.tls.cert_pem,
    );
    opts.structured_replies = false;
    let conn = NbdConnection::connect(&opts).await.unwrap();
    assert_eq!(conn.size(), size);
    let data = conn.read(2 * MIB, 2 * MIB as u32).await.unwrap();
    assert_eq!(
        data,
        disk_bytes(&pool, &uuid)[2 * MIB as usize..4 * MIB as usize]
    );
    conn.disconnect().await.unwrap();

    // A plain client gets nowhere.
    let mut plain = NbdOptions::new(addr.to_string(), name);
    plain.tls = NbdTls::Off;
    plain.structured_replies = false;
    plain.connect_timeout = Duration::from_secs(5);
    assert!(NbdConnection::connect(&plain).await.is_err());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_service_without_exactly_one_purpose_and_at_most_16_connections() {
    let sim = start(1, DISK, "").await;
    let mut s = TcpStream::connect(nbd_addr(&sim)).await.unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    assert!(buf.is_empty(), "no greeting without an NBD purpose");
    sim.stop().await;

    let sim = start(1, DISK, "insecure_nbd").await;
    let mut conns = Vec::new();
    for _ in 0..16 {
        let mut c = TcpStream::connect(nbd_addr(&sim)).await.unwrap();
        let mut g = [0u8; proto::GREETING_LEN];
        c.read_exact(&mut g).await.unwrap();
        conns.push(c);
    }
    let mut extra = TcpStream::connect(nbd_addr(&sim)).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut buf)).await;
    assert!(buf.is_empty(), "the 17th connection must be dropped");
    assert_eq!(sim.pool().stats.get("nbd/refused_busy"), 1);
    drop(conns);
    // Slots free up again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = TcpStream::connect(nbd_addr(&sim)).await.unwrap();
    let mut g = [0u8; proto::GREETING_LEN];
    c.read_exact(&mut g).await.unwrap();
    sim.stop().await;
}
