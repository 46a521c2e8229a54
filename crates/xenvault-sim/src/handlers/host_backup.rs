//! `GET /host_backup`: a gzip'd tar of a small synthetic dom0 root filesystem of the host
//! the client connected to (xen-api ocaml/xapi/xapi_host_backup.ml and the `host-backup`
//! script; xapi-facts §3.7). No redirect: each host backs itself up.

use std::io::Write;
use std::sync::Arc;

use super::begin;
use super::stream::{Progress, io_api_error, send_stream};
use crate::db::Fields;
use crate::error::ApiError;
use crate::http::{Conn, HandlerOutcome, Request};
use crate::pool::Pool;

/// The files of the synthetic dom0 tree of `host` (a ref): `(path, contents)`.
pub fn dom0_files(pool: &Pool, host: &str) -> Vec<(String, Vec<u8>)> {
    let coordinator = pool.coordinator();
    let db = pool.db();
    let rec = db.get("host", host).ok();
    let s = |f: &str| rec.map(|r| r.str_of(f).to_string()).unwrap_or_default();
    let (uuid, hostname, address) = (s("uuid"), s("hostname"), s("address"));
    let dom0_uuid = db
        .rows("VM")
        .find(|(_, vm)| vm.bool_of("is_control_domain") && vm.str_of("resident_on") == host)
        .map(|(_, vm)| vm.str_of("uuid").to_string())
        .unwrap_or_default();
    let master_address = db
        .get("host", &coordinator)
        .map(|r| r.str_of("address").to_string())
        .unwrap_or_default();
    drop(db);
    let pool_conf = if host == coordinator {
        "master".to_string()
    } else {
        format!("slave:{master_address}")
    };
    let date = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    );
    vec![
        ("etc/hostname".into(), format!("{hostname}\n").into_bytes()),
        (
            "etc/xensource-inventory".into(),
            format!(
                "PRODUCT_BRAND='xapi-sim'\nINSTALLATION_UUID='{uuid}'\n\
                 CONTROL_DOMAIN_UUID='{dom0_uuid}'\nMANAGEMENT_INTERFACE='xenbr0'\n\
                 MANAGEMENT_ADDRESS_TYPE='IPv4'\n"
            )
            .into_bytes(),
        ),
        ("etc/xensource/pool.conf".into(), pool_conf.into_bytes()),
        (
            "etc/sysconfig/network".into(),
            format!("NETWORKING=yes\nHOSTNAME={hostname}\n# {address}\n").into_bytes(),
        ),
        (
            "boot/efi/EFI/xenserver/grub.cfg".into(),
            b"set default=0\nset timeout=5\n".to_vec(),
        ),
        (
            format!("var/backup/pool-database-{stamp}"),
            super::dbdump::dump_xml(pool).into_bytes(),
        ),
    ]
}

/// `GET /host_backup`: 200, no Content-Length, gzip'd tar, close.
pub async fn handle(pool: Arc<Pool>, req: Request, mut conn: Conn) -> HandlerOutcome {
    let Some(begun) = begin(&pool, &req, &mut conn, "Host backup").await? else {
        return Ok(None);
    };
    let task = begun.task.clone();
    conn.write_head(
        "HTTP/1.1",
        200,
        "OK",
        &[
            ("Connection", "close"),
            ("task-id", &task),
            ("Content-Type", "application/octet-stream"),
        ],
    )
    .await?;
    let files = dom0_files(&pool, &req.host);
    let progress = Progress::new(pool.clone(), &task, 0);
    send_stream(&pool, &task, "host_backup", &mut conn, move |w| {
        let mtime = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0);
        let mut gz = flate2::write::GzEncoder::new(w, flate2::Compression::fast());
        let n = files.len();
        for (i, (path, data)) in files.iter().enumerate() {
            let h = xenvault_formats::tar::header(path, data.len() as u64, mtime)
                .map_err(|e| ApiError::new("BACKUP_SCRIPT_FAILED", [e.to_string()]))?;
            gz.write_all(&h).map_err(io_api_error)?;
            gz.write_all(data).map_err(io_api_error)?;
            gz.write_all(xenvault_formats::tar::padding(data.len() as u64))
                .map_err(io_api_error)?;
            // Synthetic progress, asymptotic to 0.9 as the real script's.
            progress.set(0.9 * (1.0 - 0.5f64.powi((i + 1) as i32)) * (n as f64) / (n as f64));
        }
        gz.write_all(&xenvault_formats::tar::end_of_archive())
            .map_err(io_api_error)?;
        gz.finish().map_err(io_api_error)?;
        Ok(String::new())
    })
    .await?;
    drop(begun);
    Ok(None)
}
