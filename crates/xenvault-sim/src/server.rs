//! Starting and stopping a simulator: the state directory (load or build the
//! pool), the listeners of every host (HTTP, HTTPS, NBD on 127.0.0.1), the
//! debounced state saver, and the [`SimInfo`] line the binary prints.
//!
//! Used in-process by `xenvault demo` and tests:
//! `let sim = Simulator::start(SimConfig::new(dir)).await?; … sim.shutdown().await;`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use tokio::net::TcpListener;

use crate::db::Fields;
use crate::disk::DiskStore;
use crate::http::{ListenerSpec, Router};
use crate::pool::{HostEndpoint, Pool, PoolConfig};
use crate::scenario::{FlagScenario, Scenario, ScenarioError};
use crate::state::{StatePaths, save_db, write_atomic};

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The state directory (created if missing).
    pub state_dir: PathBuf,
    /// The coordinator's plain HTTP address (`127.0.0.1:0` picks a port).
    pub listen: SocketAddr,
    /// The user name (default `root`).
    pub user: String,
    /// The password; `None` keeps the one saved in the state directory, or
    /// generates one.
    pub password: Option<String>,
    /// The pool to build when the state directory has no pool yet.
    pub scenario: Scenario,
}

impl SimConfig {
    /// Defaults: `127.0.0.1:0`, `root`, a generated password, the default
    /// flags scenario (3 VMs with 64 MiB disks, 10% written, one host).
    pub fn new(state_dir: impl Into<PathBuf>) -> SimConfig {
        SimConfig {
            state_dir: state_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            user: "root".into(),
            password: None,
            scenario: Scenario::from_flags(&FlagScenario::default()),
        }
    }
}

/// What a client needs to reach the simulator (the JSON line of `xapi-sim serve`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SimInfo {
    /// The coordinator's plain HTTP URL.
    pub url: String,
    /// The coordinator's HTTPS URL.
    pub https_url: String,
    /// `sha256:<hex>` of the certificate.
    pub fingerprint: String,
    /// One NBD `address:port` per host, coordinator first.
    pub nbd: Vec<String>,
    /// The user.
    pub user: String,
    /// The password.
    pub password: String,
    /// The control API base URL.
    pub control: String,
}

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// File or socket trouble.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS identity.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
    /// The disk store.
    #[error("disk store: {0}")]
    Disk(#[from] crate::disk::DiskError),
    /// The scenario.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// The saved state is unusable.
    #[error(
        "state file {path} is unusable ({reason}); move the state directory aside to start afresh"
    )]
    State {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SimError {
    let what = what.into();
    move |source| SimError::Io { what, source }
}

/// A running simulator.
pub struct Simulator {
    /// How to reach it.
    pub info: SimInfo,
    /// The shared state (for in-process use: guest writes, faults, inspection).
    pub pool: Arc<Pool>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedConfig {
    user: String,
    password: String,
}

fn generate_password() -> String {
    const CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

impl Simulator {
    /// Opens (or creates) the state directory, builds the pool from the
    /// scenario if it has none, binds every listener and starts serving.
    pub async fn start(cfg: SimConfig) -> Result<Simulator, SimError> {
        let paths = StatePaths::new(&cfg.state_dir);
        std::fs::create_dir_all(&paths.root)
            .map_err(io_err(format!("creating {}", paths.root.display())))?;
        // Credentials: explicit, else saved, else generated (and saved).
        let saved: Option<SavedConfig> = std::fs::read(paths.config())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let password = match (&cfg.password, &saved) {
            (Some(p), _) => p.clone(),
            (None, Some(s)) => s.password.clone(),
            (None, None) => generate_password(),
        };
        let saved_now = SavedConfig {
            user: cfg.user.clone(),
            password: password.clone(),
        };
        let text = serde_json::to_vec_pretty(&saved_now).map_err(|e| SimError::State {
            path: paths.config().display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomic(&paths.config(), &text)
            .map_err(io_err(format!("writing {}", paths.config().display())))?;

        let tls = crate::tls::load_or_create(&paths.tls())?;
        let disks = Arc::new(DiskStore::open(paths.disks())?);
        let pool = Arc::new(Pool::new(
            PoolConfig {
                user: cfg.user.clone(),
                password: password.clone(),
                state_dir: paths.root.clone(),
            },
            disks,
            tls,
        ));
        let db_path = paths.db();
        if db_path.exists() {
            let bytes = std::fs::read(&db_path)
                .map_err(io_err(format!("reading {}", db_path.display())))?;
            let j: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| SimError::State {
                    path: db_path.display().to_string(),
                    reason: e.to_string(),
                })?;
            pool.db().load_json(&j).map_err(|reason| SimError::State {
                path: db_path.display().to_string(),
                reason,
            })?;
        } else {
            let p = pool.clone();
            let sc = cfg.scenario.clone();
            tokio::task::spawn_blocking(move || crate::scenario::build(&p, &sc))
                .await
                .map_err(|e| SimError::State {
                    path: db_path.display().to_string(),
                    reason: format!("building the pool panicked: {e}"),
                })??;
            save_db(&pool).map_err(io_err(format!("writing {}", db_path.display())))?;
        }
        // Hosts, coordinator first.
        let coordinator = pool.coordinator();
        let mut hosts: Vec<(String, String)> = pool
            .db()
            .rows("host")
            .map(|(r, h)| (r.clone(), h.str_of("name_label").to_string()))
            .collect();
        hosts.sort_by_key(|(r, name)| (*r != coordinator, name.clone()));
        if hosts.is_empty() {
            return Err(SimError::State {
                path: db_path.display().to_string(),
                reason: "the pool has no host".into(),
            });
        }

        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let mut api_router = Router::new();
        crate::rpc::register(&mut api_router);
        crate::handlers::register(&mut api_router);
        let mut control_router = api_router.clone();
        crate::control::register(&mut control_router);
        let api_router = Arc::new(api_router);
        let control_router = Arc::new(control_router);
        let acceptor = tokio_rustls::TlsAcceptor::from(pool.tls.server_config.clone());

        let mut tasks = Vec::new();
        let mut endpoints = Vec::new();
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        for (i, (host, _)) in hosts.iter().enumerate() {
            let http_addr = if i == 0 { cfg.listen } else { any };
            let http = TcpListener::bind(http_addr)
                .await
                .map_err(io_err(format!("binding {http_addr}")))?;
            let https = TcpListener::bind(any)
                .await
                .map_err(io_err("binding the HTTPS port"))?;
            let nbd = TcpListener::bind(any)
                .await
                .map_err(io_err("binding the NBD port"))?;
            let ep = HostEndpoint {
                host: host.clone(),
                http: http.local_addr().map_err(io_err("local address"))?,
                https: https.local_addr().map_err(io_err("local address"))?,
                nbd: nbd.local_addr().map_err(io_err("local address"))?,
            };
            // The control API is served on every plain HTTP listener of the
            // first host (the coordinator at start).
            let plain_router = if i == 0 {
                control_router.clone()
            } else {
                api_router.clone()
            };
            tasks.push(tokio::spawn(crate::http::serve(
                http,
                ListenerSpec {
                    host: host.clone(),
                    tls: None,
                },
                plain_router,
                pool.clone(),
                shutdown_rx.clone(),
            )));
            tasks.push(tokio::spawn(crate::http::serve(
                https,
                ListenerSpec {
                    host: host.clone(),
                    tls: Some(acceptor.clone()),
                },
                api_router.clone(),
                pool.clone(),
                shutdown_rx.clone(),
            )));
            tasks.push(tokio::spawn(crate::nbd_server::serve(
                nbd,
                host.clone(),
                pool.clone(),
                shutdown_rx.clone(),
            )));
            endpoints.push(ep);
        }
        pool.set_endpoints(endpoints.clone());
        tasks.push(tokio::spawn(persist_loop(
            pool.clone(),
            shutdown_rx.clone(),
        )));

        let first = endpoints.first().cloned().ok_or_else(|| SimError::State {
            path: db_path.display().to_string(),
            reason: "the pool has no host".into(),
        })?;
        let info = SimInfo {
            url: format!("http://{}", first.http),
            https_url: format!("https://{}", first.https),
            fingerprint: pool.tls.fingerprint.clone(),
            nbd: endpoints.iter().map(|e| e.nbd.to_string()).collect(),
            user: cfg.user.clone(),
            password,
            control: format!("http://{}/_sim", first.http),
        };
        tracing::info!(url = %info.url, https = %info.https_url, hosts = endpoints.len(), "xapi-sim listening");
        Ok(Simulator {
            info,
            pool,
            shutdown: shutdown_tx,
            tasks,
        })
    }

    /// Stops every listener and saves the state.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        // A background coalesce finishes before the state is left (a restart would
        // finish it too, but not while this process still writes the layers).
        let disks = self.pool.disks.clone();
        let _ = tokio::task::spawn_blocking(move || disks.wait_gc_idle()).await;
        save_db(&self.pool)
    }
}

/// Saves the DB 200 ms after changes (debounced) until shutdown.
async fn persist_loop(pool: Arc<Pool>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut changed = pool.changed.clone();
    changed.borrow_and_update();
    let mut saved_at = pool.db().persistent_generation();
    loop {
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        changed.borrow_and_update();
        let now = pool.db().persistent_generation();
        if now == saved_at {
            continue;
        }
        saved_at = now;
        let p = pool.clone();
        match tokio::task::spawn_blocking(move || save_db(&p)).await {
            Ok(Err(e)) => tracing::warn!("saving the state failed: {e}"),
            Err(e) => tracing::warn!("saving the state panicked: {e}"),
            Ok(Ok(())) => {}
        }
    }
}
