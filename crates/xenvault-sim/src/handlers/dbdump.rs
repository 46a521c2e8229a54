//! `GET /pool/xmldbdump`: the whole pool database as xapi's XML dump
//! (xen-api ocaml/xapi/pool_db_backup.ml, ocaml/database/db_xml.ml; xapi-facts §3.6).
//! Secrets are included, as in xapi: the dump is sensitive.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::Arc;

use super::begin;
use super::stream::{io_api_error, send_stream};
use crate::db::{NON_PERSISTENT, db_string};
use crate::http::{Conn, HandlerOutcome, Request};
use crate::pool::Pool;

/// The schema version written in the manifest (xapi 1.249 / XCP-ng 8.2 writes 5.x).
pub const SCHEMA_MAJOR: u32 = 5;
/// See [`SCHEMA_MAJOR`].
pub const SCHEMA_MINOR: u32 = 786;

fn escape_attr(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c => out.push(c),
        }
    }
}

/// The XML dump of the pool database: a manifest, then one `<table>` per class with one
/// `<row>` per object whose attributes are the DB columns (`name__label`), values in DB
/// string form. Non-persistent tables (sessions, tasks) are empty.
pub fn dump_xml(pool: &Pool) -> String {
    let db = pool.db();
    let generation = db.generation();
    let mut out = String::with_capacity(1 << 16);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    let _ = write!(
        out,
        "<database><manifest><pair key=\"schema_major_vsn\" value=\"{SCHEMA_MAJOR}\"/>\
         <pair key=\"schema_minor_vsn\" value=\"{SCHEMA_MINOR}\"/>\
         <pair key=\"generation_count\" value=\"{generation}\"/></manifest>"
    );
    for (name, class) in &pool.dm.classes {
        let _ = write!(out, "<table name=\"{name}\">");
        if !NON_PERSISTENT.contains(&name.as_str()) {
            for (r, rec) in db.rows(name) {
                out.push_str("<row ref=\"");
                escape_attr(&mut out, r);
                let _ = write!(out, "\" __ctime=\"{generation}\" __mtime=\"{generation}\"");
                for f in &class.fields {
                    let Some(v) = rec.get(&f.name) else { continue };
                    let _ = write!(out, " {}=\"", f.db_name);
                    escape_attr(&mut out, &db_string(v));
                    out.push('"');
                }
                out.push_str("/>");
            }
        }
        out.push_str("</table>");
    }
    out.push_str("</database>");
    out
}

/// `GET /pool/xmldbdump`: 200, no Content-Length, the dump, close.
pub async fn handle(pool: Arc<Pool>, req: Request, mut conn: Conn) -> HandlerOutcome {
    let Some(begun) = begin(&pool, &req, &mut conn, "Dumping database as XML").await? else {
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
            ("Content-Type", "text/xml"),
        ],
    )
    .await?;
    let p = pool.clone();
    send_stream(&pool, &task, "xmldbdump", &mut conn, move |w| {
        let xml = dump_xml(&p);
        w.write_all(xml.as_bytes()).map_err(io_api_error)?;
        Ok(String::new())
    })
    .await?;
    drop(begun);
    Ok(None)
}
