#![allow(clippy::unwrap_used)]
use std::time::Duration;
use xenvault_xapi::session::{Client, Credentials};
use xenvault_xapi::tls::{Fingerprint, TlsPolicy};
use xenvault_xapi::task::WaitOptions;
use xenvault_xapi::transport::{ConnectOptions, ProtocolChoice};
use xenvault_xapi::model::Ref;

#[tokio::test]
async fn smoke() {
    let Ok(line) = std::fs::read_to_string("/tmp/rpcsim/out.json") else { return };
    let j: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    for (url, tls, proto) in [
        (j["url"].as_str().unwrap(), TlsPolicy::Verify, ProtocolChoice::Auto),
        (j["url"].as_str().unwrap(), TlsPolicy::Verify, ProtocolChoice::XmlRpc),
        (j["https_url"].as_str().unwrap(), TlsPolicy::Pinned(j["fingerprint"].as_str().unwrap().parse::<Fingerprint>().unwrap()), ProtocolChoice::Auto),
    ] {
        let mut o = ConnectOptions::new(tls);
        o.protocol = proto;
        let s = Client::connect_with(url, Credentials::new("root", j["password"].as_str().unwrap()), o).await.unwrap();
        eprintln!("connected {url} {:?}", s.protocol());
        let vms = s.vm().get_all_records().await.unwrap();
        eprintln!("{} VM records", vms.len());
        let regular = s.vm().get_all_records_where(r#"field "is_a_template"="false" and field "is_control_domain"="false""#).await.unwrap();
        eprintln!("{} regular", regular.len());
        let (vm, rec) = regular.iter().find(|(_, r)| r.is_regular_vm()).unwrap();
        eprintln!("vm {} {:?} mem {} vbds {}", rec.name_label, rec.power_state, rec.memory_static_max, rec.vbds.len());
        let snap = s.vm().snapshot(vm, "smoke", &[]).await.unwrap();
        s.vm().set_is_a_template(&snap, false).await.unwrap();
        let srec = s.vm().get_record(&snap).await.unwrap();
        eprintln!("snap template={} snapshot={}", srec.is_a_template, srec.is_a_snapshot);
        for vbd in &srec.vbds {
            let b = s.vbd().get_record(vbd).await.unwrap();
            if b.vdi.is_null() { continue }
            let d = s.vdi().get_record(&b.vdi).await.unwrap();
            eprintln!(" vdi {} size {} type {:?} cbt {}", d.uuid, d.virtual_size, d.type_, d.cbt_enabled);
            let nbd = s.vdi().get_nbd_info(&b.vdi).await.unwrap();
            eprintln!(" nbd {:?}", nbd);
        }
        let clone = s.vm().clone_vm(&snap, "smoke-clone").run_async(&WaitOptions::with_timeout(Duration::from_secs(30))).await.unwrap();
        eprintln!("async clone {clone}");
        let g = s.create_task("smoke", "").await.unwrap();
        eprintln!("guard {}", g.id());
        g.abandon().await;
        let pool = s.pool_record().await.unwrap();
        let master = s.host().get_record(&pool.1.master).await.unwrap();
        eprintln!("master {} api {}.{}", master.address, master.api_version_major, master.api_version_minor);
        for h in s.host().get_all_records().await.unwrap().values() { eprintln!("host {}", h.address); }
        let _ = s.vm().destroy(&clone).await;
        s.vm().destroy(&snap).await.unwrap();
        let e = s.vm().get_record(&Ref::new("OpaqueRef:nope")).await.unwrap_err();
        eprintln!("err {e}");
        let e = s.call::<String>("VM.snapshot_with_quiesce", vec![vm.as_str().into(), "x".into()]).await.unwrap_err();
        eprintln!("err {e}");
        s.logout().await.unwrap();
    }
}
