//! The simulator's serving speed: raw exports (HTTP, HTTPS) and NBD reads on
//! loopback, against `cat` of the same sparse file to `/dev/null`.
//!
//! Later benchmarks of xenvault read from the simulator; they only measure
//! xenvault if the simulator is not the bottleneck. The goal (issue 2): the
//! simulator serves every path (raw export, NBD) at least half as fast as
//! `cat` of the file it reads from; the server's rate is what a zero-copy
//! reader ([`crate::splice`]) gets, and real clients are measured beside it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt as _;
use xenvault_sim::scenario::{FlagScenario, Scenario};
use xenvault_sim::{SimConfig, Simulator};
use xenvault_xapi::http::{HttpTransfer, TransferOptions, handler_url};
use xenvault_xapi::nbd::client::{NbdMultiReader, NbdOptions, NbdTls};
use xenvault_xapi::records::VbdType;
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::tls::TlsPolicy;

/// Options of `xenvault-bench sim`.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Virtual size of the disk served.
    #[arg(long, default_value_t = 1 << 30)]
    disk_bytes: u64,
    /// Shares of the disk written with random data, in percent (one
    /// simulator and one group of rows per value).
    #[arg(long, value_delimiter = ',', default_values_t = [10.0, 50.0, 100.0])]
    written_percent: Vec<f64>,
    /// Runs per path; the best one counts (warm page cache for everyone).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Where to write the table (`-` for nowhere).
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: String,
}

/// Read requests of the zero-copy NBD reader (xapi-nbd and the simulator
/// take up to 32 MiB).
const NBD_REQUEST: u64 = 8 << 20;

/// How the zero-copy rows name their reader.
const ZERO_COPY: &str = "zero-copy reader (`splice` to /dev/null: the server's rate)";

struct Row {
    path: String,
    /// The row measures the server alone (a zero-copy reader): the goal's rows.
    server_rate: bool,
    best: Duration,
    bytes: u64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.bytes as f64 / self.best.as_secs_f64() / 1e6
    }
}

/// Runs the benchmark and prints (and writes) the table.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let mut table = String::new();
    table.push_str("| written | path | best of runs | MB/s | ÷ (cat ÷ 2) | goal ≥ 1.0 |\n|---:|---|---:|---:|---:|---|\n");
    let mut missed = 0;
    for &written in &args.written_percent {
        let rows = measure_one(&args, written).await?;
        let cat = rows
            .first()
            .ok_or_else(|| anyhow!("no measurement"))?
            .rate();
        for (i, row) in rows.iter().enumerate() {
            let ratio = row.rate() / (cat / 2.0);
            let verdict = if i == 0 {
                "baseline"
            } else if !row.server_rate {
                "(a client's rate)"
            } else if ratio >= 1.0 {
                "met"
            } else {
                missed += 1;
                "**missed**"
            };
            table.push_str(&format!(
                "| {written}% | {} | {:.3} s | {:.0} | {:.2} | {verdict} |\n",
                row.path,
                row.best.as_secs_f64(),
                row.rate(),
                ratio,
            ));
        }
    }
    let verdict = if missed == 0 {
        "**Goal met**: the simulator serves raw exports and NBD reads at least at `cat ÷ 2` on every disk measured."
    } else {
        "**Goal missed** on the rows marked so."
    };
    println!("{table}\n{verdict}");

    if args.out != "-" {
        let body = format!(
            "## Simulator serving speed\n\n\
             `cargo run --release -p xenvault-bench -- sim` (one {} MiB disk per row group, written with random data in 64 KiB blocks, best of {} runs, warm page cache for every path).\n\
             Measured {} on this project's machine kind (2 vCPUs, client and server sharing them). Every path reads the same sparse layer file the simulator keeps the disk in; \
             `cat` of that file to `/dev/null` is the baseline, and the goal is that the simulator serves at least half its rate, so later benchmarks of xenvault are not benchmarks of the simulator. \
             The goal is judged on the rows read by the zero-copy reader (`splice` from the socket into a pipe to `/dev/null`, implemented in `crates/xenvault-bench/src/splice.rs`): \
             it adds no copy of its own, so the only copy on the path is the server's (page cache into the socket), as `cat`'s only copy is the kernel's into its buffer. \
             The rows with real clients (xenvault's, curl, nbdcopy) also copy every byte into user space: they show what a reader gets, not what the server can give.\n\n{}\n{}\n",
            args.disk_bytes >> 20,
            args.runs,
            today(),
            table,
            verdict
        );
        crate::write_section(&PathBuf::from(&args.out), "sim-throughput", &body)?;
        eprintln!("wrote {}", args.out);
    }
    Ok(())
}

/// One simulator with one disk written to `written` percent, measured on every path.
async fn measure_one(args: &SimArgs, written: f64) -> anyhow::Result<Vec<Row>> {
    let work = tempfile::Builder::new()
        .prefix("xenvault-bench-sim")
        .tempdir_in(std::env::current_dir()?)
        .context("cannot make a scratch directory here")?;
    eprintln!(
        "starting the simulator: one {} MiB disk, {written}% written",
        args.disk_bytes >> 20
    );
    let mut config = SimConfig::new(work.path().join("pool"));
    config.scenario = Scenario::from_flags(&FlagScenario {
        vms: 1,
        disk_size: args.disk_bytes,
        written: written / 100.0,
        hosts: 1,
        nbd_purpose: "insecure_nbd".into(),
    });
    let sim = Simulator::start(config).await?;
    let result = measure(&sim, args, work.path()).await;
    sim.shutdown().await?;
    result
}

async fn measure(sim: &Simulator, args: &SimArgs, work: &Path) -> anyhow::Result<Vec<Row>> {
    let fingerprint = sim.info.fingerprint.parse()?;
    let policy = TlsPolicy::Pinned(fingerprint);
    let session = Client::connect(
        &sim.info.url,
        Credentials::new(sim.info.user.clone(), sim.info.password.clone()),
        policy.clone(),
    )
    .await?;
    let (vdi_ref, vdi_uuid, size) = first_disk(&session).await?;
    let file = layer_file(work, args.disk_bytes)?;
    eprintln!("serving VDI {vdi_uuid} from {}", file.display());

    let mut rows = Vec::new();
    rows.push(Row {
        path: "`cat` of the layer file > /dev/null".into(),
        best: best_of(args.runs, || async { time_cat(&file) }).await?,
        bytes: size,
        server_rate: false,
    });

    let transfer = HttpTransfer::new(&policy, TransferOptions::default())?;
    for (label, base) in [("HTTP", &sim.info.url), ("HTTPS", &sim.info.https_url)] {
        let base = reqwest_url(base)?;
        let session_ref = session.session_ref();
        rows.push(Row {
            path: format!("raw export (`/export_raw_vdi`), {label}, xenvault's client"),
            best: best_of(args.runs, || async {
                let url = handler_url(
                    &base,
                    "/export_raw_vdi",
                    session_ref.expose(),
                    None,
                    &[("vdi", vdi_uuid.as_str()), ("format", "raw")],
                );
                let t0 = Instant::now();
                let download = transfer.get(url).await?;
                let mut body = download.body;
                let mut n = 0u64;
                while let Some(piece) = body.next().await {
                    n += piece?.len() as u64;
                }
                if n != size {
                    bail!("raw export gave {n} bytes, expected {size}");
                }
                Ok(t0.elapsed())
            })
            .await?,
            bytes: size,
            server_rate: false,
        });
    }
    if Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok()
    {
        let base = reqwest_url(&sim.info.url)?;
        let url = handler_url(
            &base,
            "/export_raw_vdi",
            session.session_ref().expose(),
            None,
            &[("vdi", vdi_uuid.as_str()), ("format", "raw")],
        );
        rows.push(Row {
            path: "raw export, HTTP, `curl -o /dev/null`".into(),
            best: best_of(args.runs, || async {
                let t0 = Instant::now();
                let status = Command::new("curl")
                    .args(["-sS", "-f", "-o", "/dev/null", url.as_str()])
                    .status()?;
                if !status.success() {
                    bail!("curl failed: {status}");
                }
                Ok(t0.elapsed())
            })
            .await?,
            bytes: size,
            server_rate: false,
        });
    }

    {
        let base = reqwest_url(&sim.info.url)?;
        let url = handler_url(
            &base,
            "/export_raw_vdi",
            session.session_ref().expose(),
            None,
            &[("vdi", vdi_uuid.as_str()), ("format", "raw")],
        );
        let addr = format!(
            "{}:{}",
            url.host_str().unwrap_or("127.0.0.1"),
            url.port_or_known_default().unwrap_or(80)
        );
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        rows.push(Row {
            path: format!("raw export, HTTP, {ZERO_COPY}"),
            best: best_of_zero_copy(args.runs, size, move || {
                crate::splice::http_get(&addr, &target)
            })
            .await?,
            bytes: size,
            server_rate: true,
        });
    }

    let infos = session.vdi().get_nbd_info(&vdi_ref).await?;
    let info = infos
        .first()
        .ok_or_else(|| anyhow!("no NBD server listed for the disk"))?;
    for connections in [1usize, 4] {
        let mut options = NbdOptions::from_record(info)?;
        options.structured_replies = false;
        options.tls = NbdTls::Off; // the pool's NBD network is insecure_nbd
        rows.push(Row {
            path: format!(
                "NBD read of the whole disk, {connections} connection(s), xenvault's client"
            ),
            best: best_of(args.runs, || async {
                let t0 = Instant::now();
                let reader = NbdMultiReader::connect(&options, connections).await?;
                let mut extents = reader.read_ranges(std::iter::once(0..size));
                let mut n = 0u64;
                while let Some(extent) = extents.next().await {
                    n += extent?.len();
                }
                if n != size {
                    bail!("NBD read gave {n} bytes, expected {size}");
                }
                Ok(t0.elapsed())
            })
            .await?,
            bytes: size,
            server_rate: false,
        });
    }
    if Command::new("nbdcopy")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok()
    {
        let encoded: String = info
            .exportname
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let uri = format!("nbd://{}:{}/{encoded}", info.address, info.port);
        rows.push(Row {
            path: "NBD read of the whole disk, 1 connection, `nbdcopy … null:` (libnbd)".into(),
            best: best_of(args.runs, || async {
                let t0 = Instant::now();
                let status = Command::new("nbdcopy")
                    .args(["--connections=1", &uri, "null:"])
                    .status()?;
                if !status.success() {
                    bail!("nbdcopy failed: {status}");
                }
                Ok(t0.elapsed())
            })
            .await?,
            bytes: size,
            server_rate: false,
        });
    }
    for connections in [1usize, 4] {
        let addr = format!("{}:{}", info.address, info.port);
        let name = info.exportname.clone();
        rows.push(Row {
            path: format!(
                "NBD read of the whole disk, {connections} connection(s), {} MiB requests, {ZERO_COPY}",
                NBD_REQUEST >> 20
            ),
            best: best_of_zero_copy(args.runs, size, move || {
                crate::splice::nbd_read(&addr, &name, size, connections, NBD_REQUEST)
            })
            .await?,
            bytes: size,
            server_rate: true,
        });
    }
    let _ = session.logout().await;
    Ok(rows)
}

/// [`best_of`] for a blocking zero-copy read that must return `size` bytes.
async fn best_of_zero_copy<F>(runs: u32, size: u64, read: F) -> anyhow::Result<Duration>
where
    F: Fn() -> anyhow::Result<u64> + Send + Sync + 'static,
{
    let read = std::sync::Arc::new(read);
    best_of(runs, || {
        let read = read.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let t0 = Instant::now();
                let n = read()?;
                if n != size {
                    bail!("the read gave {n} bytes, expected {size}");
                }
                Ok(t0.elapsed())
            })
            .await?
        }
    })
    .await
}

async fn best_of<F, Fut>(runs: u32, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Duration>>,
{
    let mut best = Duration::MAX;
    for _ in 0..runs.max(1) {
        best = best.min(f().await?);
    }
    Ok(best)
}

fn time_cat(file: &Path) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let status = Command::new("cat")
        .arg(file)
        .stdout(std::fs::File::create("/dev/null")?)
        .status()?;
    if !status.success() {
        bail!("cat failed: {status}");
    }
    Ok(t0.elapsed())
}

async fn first_disk(
    session: &Session,
) -> anyhow::Result<(xenvault_xapi::records::VdiRef, String, u64)> {
    for (_, vm) in session.vm().get_all_records().await? {
        if !vm.is_regular_vm() {
            continue;
        }
        for vbd_ref in &vm.vbds {
            let vbd = session.vbd().get_record(vbd_ref).await?;
            if vbd.type_ == VbdType::Disk && !vbd.vdi.is_null() {
                let vdi = session.vdi().get_record(&vbd.vdi).await?;
                return Ok((vbd.vdi.clone(), vdi.uuid, u64::try_from(vdi.virtual_size)?));
            }
        }
    }
    bail!("the simulated pool has no VM disk")
}

/// The sparse file holding the disk: the only layer data file of the store
/// (the pool has one VM with one disk and no snapshots).
fn layer_file(work: &Path, size: u64) -> anyhow::Result<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![work.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "data")
                && entry.metadata()?.len() >= size
            {
                found.push(path);
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => bail!("expected one layer data file of {size} bytes, found {n}"),
    }
}

fn reqwest_url(text: &str) -> anyhow::Result<reqwest::Url> {
    reqwest::Url::parse(text).with_context(|| format!("bad URL {text}"))
}

fn today() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%d"]).output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Err(_) => "(date unknown)".into(),
    }
}
