//! The `tether` binary: CLI, config, tracing, runtime, signals, exit codes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::Arc;

use anyhow::Context;
use base64::Engine;
use clap::{Parser, Subcommand, ValueEnum};
use rand::RngCore;
use tether::clock::SystemClock;
use tether::config::Config;
use tether::server::Inherited;
use tether::upgrade::{Pending, Upgrader};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "tether",
    version,
    about = "Sticky-session reverse proxy that restores conversation state on worker loss"
)]
struct Cli {
    /// Config file.
    #[arg(long, global = true, default_value = "config/tether.toml")]
    config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Validate the config file and exit (0 when valid).
    Check,
    /// Run tether (the default).
    Run,
    /// Start three local demo workers and tether in front of them.
    Demo {
        /// Proxy listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listen address.
        #[arg(long, default_value = "127.0.0.1:9900")]
        admin: SocketAddr,
        /// First worker port (workers use this and the next two).
        #[arg(long, default_value_t = 9001)]
        worker_port: u16,
        /// Data directory (SQLite store).
        #[arg(long, default_value = "data")]
        data: PathBuf,
    },
    /// Run one demo worker (what `demo` starts three of).
    Worker {
        /// Worker id, echoed in every answer.
        #[arg(long)]
        id: String,
        /// Listen address.
        #[arg(long)]
        listen: SocketAddr,
        /// Serve the demo's chat page at `/`.
        #[arg(long)]
        demo_page: bool,
        /// The dashboard URL the chat page links to.
        #[arg(long, requires = "demo_page")]
        dashboard: Option<String>,
        /// Let the chat page's "kill this worker" button end this process
        /// (demo only: anyone who reaches the page can use it).
        #[arg(long, requires = "demo_page")]
        allow_kill: bool,
    },
}

/// `tether worker`'s demo options.
struct WorkerDemo {
    page: bool,
    dashboard: Option<String>,
    allow_kill: bool,
}

fn main() -> ExitCode {
    // First, while no other thread runs: it clears LISTEN_FDS and friends
    // from the environment.
    let inherited = Inherited::from_env();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match &cli.command {
        Some(Cmd::Check) => check(&cli.config),
        None | Some(Cmd::Run) => inherited
            .context("cannot use the inherited sockets")
            .and_then(|inherited| run_file(&cli.config, inherited)),
        Some(Cmd::Demo {
            listen,
            admin,
            worker_port,
            data,
        }) => demo(*listen, *admin, *worker_port, data),
        Some(Cmd::Worker {
            id,
            listen,
            demo_page,
            dashboard,
            allow_kill,
        }) => worker(
            id.clone(),
            *listen,
            WorkerDemo {
                page: *demo_page,
                dashboard: dashboard.clone(),
                allow_kill: *allow_kill,
            },
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // rustls warns once per handshake with a malformed SNI name: a scanner
    // could flood the log. tether counts failed handshakes and logs them
    // at most once a minute instead (`tether_tls_handshake_failures_total`).
    if let Ok(quiet) = "rustls::msgs::handshake=error".parse() {
        filter = filter.add_directive(quiet);
    }
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    if let Some(tls) = &config.tls {
        tether::server::tls::server_config(tls)?;
    }
    println!(
        "{}: ok ({} backends)",
        path.display(),
        config.backends.len()
    );
    Ok(())
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread: the current-thread scheduler, which wakes tasks without
    // cross-thread signalling (measurably cheaper per request).
    let mut b = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all();
    b.build().context("cannot start the async runtime")
}

fn run_file(path: &Path, inherited: Inherited) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // Read now: a deploy may rename a new binary over this path later.
    let upgrader = match Upgrader::capture() {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::warn!(error = %e, "executable path unknown: SIGUSR2 upgrades disabled");
            None
        }
    };
    let rt = runtime(config.runtime.threads)?;
    rt.block_on(serve(
        config,
        Some(path.to_path_buf()),
        CancellationToken::new(),
        inherited,
        upgrader,
    ))
}

/// Runs until SIGTERM/SIGINT or a finished upgrade; SIGHUP reloads
/// `path`; SIGUSR2 hands the listeners to a new process of `upgrader`.
async fn serve(
    config: Config,
    path: Option<PathBuf>,
    stop: CancellationToken,
    mut inherited: Inherited,
    upgrader: Option<Upgrader>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let ready = inherited.take_ready();
    let handle = tether::server::start_with(config, Arc::new(SystemClock), inherited).await?;
    if let Some(ready) = ready {
        tether::upgrade::announce_ready(&handle, ready).await;
    }
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("cannot watch SIGUSR2")?;
    let mut upgrade = Pending::default();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = stop.cancelled() => break,
            _ = usr2.recv() => match &upgrader {
                Some(u) if upgrade.start(u, &handle) => tracing::info!("upgrade: starting the new binary"),
                Some(_) => tracing::warn!("upgrade already under way: SIGUSR2 ignored"),
                None => tracing::error!("upgrade unavailable here: SIGUSR2 ignored"),
            },
            r = upgrade.done() => match r {
                Ok(pid) => {
                    tracing::info!(new_pid = pid, "upgrade: the new process is ready; this one drains");
                    break;
                }
                Err(e) => {
                    handle.count_upgrade(false);
                    tracing::error!(error = %format!("{e:#}"), "upgrade failed: this process keeps serving");
                }
            },
            _ = hup.recv() => {
                let Some(path) = &path else { continue };
                match Config::load(path).map_err(anyhow::Error::from).and_then(|c| handle.reload(c).map_err(Into::into)) {
                    Ok(()) => tracing::info!(config = %path.display(), "config reloaded"),
                    Err(e) => tracing::error!(config = %path.display(), error = %format!("{e:#}"), "reload refused: keeping the running config"),
                }
            }
        }
    }
    tracing::info!("shutting down: finishing in-flight requests");
    handle.stop().await;
    tracing::info!("stopped");
    Ok(())
}

fn worker(id: String, listen: SocketAddr, demo: WorkerDemo) -> anyhow::Result<()> {
    let rt = runtime(Some(1))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("worker {id}: cannot listen on {listen}"))?;
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            c.cancel();
        });
        let mut w = tether::worker::RefWorker::new(&id, None);
        if demo.page {
            w = w.with_demo_page(tether::worker::DemoPage {
                dashboard: demo.dashboard,
                kill: demo.allow_kill.then(|| cancel.clone()),
            });
        }
        w.serve(listener, cancel).await;
        Ok(())
    })
}

/// Kills the demo's worker processes when the demo ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn demo(
    listen: SocketAddr,
    admin: SocketAddr,
    worker_port: u16,
    data: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(data)
        .with_context(|| format!("cannot create data directory {}", data.display()))?;
    let exe = std::env::current_exe().context("cannot find the tether executable")?;
    let ids = ["worker-a", "worker-b", "worker-c"];
    let mut workers = Vec::new();
    let mut children = Children(Vec::new());
    for (i, id) in ids.iter().enumerate() {
        let port = worker_port
            .checked_add(i as u16)
            .context("--worker-port too high")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dashboard = format!("http://{admin}/");
        let child = Command::new(&exe)
            .args(["worker", "--id", id, "--listen", &addr.to_string()])
            .args(["--demo-page", "--allow-kill", "--dashboard", &dashboard])
            .spawn()
            .with_context(|| format!("cannot start demo worker {id}"))?;
        println!("  {id}: http://{addr}  (pid {})", child.id());
        children.0.push(child);
        workers.push((id.to_string(), addr));
    }
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let store = format!("sqlite://{}/tether.db", data.display());
    let text = tether::demo::config_text(listen, admin, &workers, &key, &store);
    let config = Config::from_toml_str(&text, Path::new("<demo>"))?;
    let pids: Vec<String> = ids
        .iter()
        .zip(&children.0)
        .map(|(id, c)| format!("{id}={}", c.id()))
        .collect();
    println!(
        "\ntether demo: proxy http://{listen}  admin http://{admin}  store {store}\n\n\
         In a browser:\n  \
         chat       http://{listen}/   (talk, then \"kill this worker\", then talk again)\n  \
         dashboard  http://{admin}/   (workers, store, moves, live)\n\n\
         Or with curl (the cookie jar keeps your pin):\n  \
         curl -s -c /tmp/jar -b /tmp/jar -X POST 'http://{listen}/chat?thread=main&message=hello'\n  \
         curl -s -c /tmp/jar -b /tmp/jar -X POST 'http://{listen}/chat?thread=main&message=again'\n\
         See the workers:\n  curl -s http://{admin}/backends\n\
         Kill the worker named in \"worker\" (pids: {}), then talk again:\n  \
         kill -9 <pid>\n  \
         curl -s -c /tmp/jar -b /tmp/jar -X POST 'http://{listen}/chat?thread=main&message=still-there'\n\
         Another worker answers, with the whole history restored first.\n\nCtrl-C stops everything.\n",
        pids.join(" ")
    );
    let rt = runtime(None)?;
    // No upgrade: the demo's arguments would start its workers again.
    let result = rt.block_on(serve(
        config,
        None,
        CancellationToken::new(),
        Inherited::default(),
        None,
    ));
    drop(children);
    result
}
