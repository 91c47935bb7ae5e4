//! `trellis-demo`: a local Trellis mesh in one command.
//!
//! It starts a control plane, three sidecars and two small services on
//! loopback, makes one call across the mesh over mTLS, prints who talked to
//! whom and how to call it yourself, and stays up until Ctrl-C (a program
//! of the mesh that exits before then is named, with its exit status and
//! its log, and the rest stay up):
//!
//! ```text
//! you -> client sidecar =mTLS=> web sidecar -> web app
//!                                               | (web calls api through its route)
//!        web sidecar (route) =mTLS=> api sidecar -> api app
//! ```
//!
//! The caller's sidecar also has a route to api, which no policy allows, to
//! show what a denial looks like.
//!
//! The programs are the real ones, run as child processes: this executable
//! re-executes itself with a hidden first argument (`__trellis-control-plane`,
//! `__trellisctl`, `__trellis-proxy`) that `main` hands to the programs' own
//! entry points, so `cargo run --bin trellis-demo` needs nothing else built.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use trellis_tests::apps::Handler;
use trellis_tests::policy::{self, PolicyDoc};
use trellis_tests::{HttpApp, Launcher, Mesh, Program, Sidecar, http};

/// The sidecar's allocator, for when this program runs as the sidecar
/// (see [`trellis_alloc`]).
#[global_allocator]
static ALLOC: trellis_alloc::LineAligned = trellis_alloc::LineAligned;

const USAGE: &str = "\
trellis-demo: start a local Trellis mesh, show an mTLS call, stay up until Ctrl-C

Usage: trellis-demo [--exit-after-check]

Options:
  --exit-after-check  exit (0 on success) right after the first call instead of staying up
  -h, --help          print this help
";

/// The line printed when the first call crossed the mesh.
const SUCCESS: &str = "mTLS call succeeded";

const NAMESPACE: &str = "demo";

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if let Some(program) = args.get(1).and_then(|a| Program::from_self_exec_arg(a)) {
        // Run as that program: it sees its own name and its own arguments.
        args.remove(1);
        args[0] = program.binary_name().into();
        return match program {
            Program::ControlPlane => trellis_control_plane::cli_main(args),
            Program::Ctl => trellis_control_plane::ctl::cli_main(args),
            Program::Proxy => trellis_proxy::cli_main(args),
        };
    }

    let mut exit_after_check = false;
    for arg in &args[1..] {
        match arg.to_str() {
            Some("--exit-after-check") => exit_after_check = true,
            Some("-h" | "--help") => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("trellis-demo: unknown argument {arg:?}\n\n{USAGE}");
                return ExitCode::from(64);
            }
        }
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trellis-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(exit_after_check)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Everything the demo runs; dropping it tears the mesh down, sidecars
/// first.
struct Demo {
    client: Sidecar,
    web: Sidecar,
    api: Sidecar,
    web_app: HttpApp,
    api_app: HttpApp,
    mesh: Mesh,
}

async fn start() -> anyhow::Result<Demo> {
    // Zero trust, as in production: nothing is allowed until a policy
    // allows it.
    let mesh = Mesh::builder()
        .launcher(Launcher::self_exec()?)
        .default_policy(Some("deny"))
        .log_tails_on_drop(false)
        .preferred_addrs(addr(15012), addr(15014))
        .start()
        .await
        .context("the control plane did not start")?;
    let id = |sa: &str| mesh.spiffe_id(NAMESPACE, sa);

    let api_app = HttpApp::start_preferring("api", addr(8081), greeter("api")).await?;
    let mut api = mesh
        .sidecar("api")
        .identity(&id("api"))
        .app(api_app.addr())
        .preferred_addrs(addr(15106), addr(15101), addr(15120))
        .start()
        .await?;

    // web answers with what api told it, asked through web's own route.
    let web_route: Arc<OnceLock<SocketAddr>> = Arc::default();
    let web_app =
        HttpApp::start_preferring("web", addr(8080), web_handler(web_route.clone())).await?;
    let mut web = mesh
        .sidecar("web")
        .identity(&id("web"))
        .app(web_app.addr())
        .route_at(addr(15081), api.identity(), api.inbound_addr())
        .preferred_addrs(addr(15006), addr(15001), addr(15020))
        .start()
        .await?;
    let _ = web_route.set(web.route_addr(api.identity()));

    // client may call web but not api: its route to api shows a denial.
    let client = mesh
        .sidecar("client")
        .identity(&id("client"))
        .route_at(addr(15080), web.identity(), web.inbound_addr())
        .route_at(addr(15082), api.identity(), api.inbound_addr())
        .preferred_addrs(addr(15206), addr(15201), addr(15220))
        .start()
        .await?;

    // client may call web, and web may call api; nobody else may call either.
    let policies = policy::stream(&[
        PolicyDoc::allow("client-to-web", web.identity()).from(client.identity()),
        PolicyDoc::allow("web-to-api", api.identity()).from(web.identity()),
    ]);
    let applied = policy::apply(&mesh, &policies)
        .await
        .context("applying the demo's policies")?;
    for sidecar in [&mut web, &mut api] {
        let acked = policy::wait_for_ack(&mesh, sidecar.identity(), applied.snapshot_version).await;
        if let Err(e) = acked {
            return Err(e.context(where_to_look(sidecar)));
        }
    }

    Ok(Demo {
        client,
        web,
        api,
        web_app,
        api_app,
        mesh,
    })
}

/// What a sidecar that let the start-up down said: whether it is still
/// running and the end of its log.
fn where_to_look(sidecar: &mut Sidecar) -> String {
    let process = sidecar.process();
    let state = match process.try_exit_status() {
        Some(status) => format!("exited ({status})"),
        None => "is running".to_string(),
    };
    format!(
        "{} {state}; the end of its log ({}):\n{}",
        process.name(),
        process.log_path().display(),
        process.log_tail(15)
    )
}

fn greeter(name: &str) -> Handler {
    let greeting = trellis_tests::greeting(name);
    Arc::new(move |_| {
        let greeting = greeting.clone();
        Box::pin(async move { (http::StatusCode::OK, greeting) })
    })
}

/// At most this many characters of what api answered are passed on.
const PASSED_ON: usize = 512;

/// What api (or its sidecar) answered, as web passes it on in its own
/// answer: its first [`PASSED_ON`] characters, on one line, control
/// characters escaped, so that no answer from upstream can make web's
/// unbounded or write to the caller's terminal what it did not mean to.
fn passed_on(body: &str) -> String {
    let body = body.trim_end();
    let mut text = String::with_capacity(body.len().min(PASSED_ON * 2));
    for c in body.chars().take(PASSED_ON) {
        match c {
            c if c.is_control() => text.extend(c.escape_default()),
            c => text.push(c),
        }
    }
    if body.chars().nth(PASSED_ON).is_some() {
        text.push_str(" ...");
    }
    text
}

fn web_handler(route: Arc<OnceLock<SocketAddr>>) -> Handler {
    Arc::new(move |request| {
        let route = route.get().copied();
        Box::pin(async move {
            let Some(route) = route else {
                return (
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "web is starting".to_string(),
                );
            };
            match http::get(route, &request.path).await {
                Ok(answer) if answer.status.is_success() => (
                    http::StatusCode::OK,
                    format!("hello from web; api answered: {}", answer.body),
                ),
                // What api's sidecar (or api) said, so that a denial on
                // the second hop shows as the sidecar worded it.
                Ok(answer) => (
                    http::StatusCode::BAD_GATEWAY,
                    format!(
                        "web could not reach api: status {}: {}",
                        answer.status,
                        passed_on(&answer.body)
                    ),
                ),
                Err(e) => (
                    http::StatusCode::BAD_GATEWAY,
                    format!("web could not reach api: {e:#}"),
                ),
            }
        })
    })
}

/// The SPIFFE ID in a sidecar log line's `peer=` field.
fn peer_of(line: &str) -> Option<&str> {
    let start = line.find("peer=")? + "peer=".len();
    line[start..]
        .split_whitespace()
        .next()
        .map(|id| id.trim_matches('"'))
}

/// Calls web through the client's route and shows who authenticated whom.
async fn check(demo: &mut Demo) -> anyhow::Result<()> {
    let entry = demo.client.route_addr(demo.web.identity());
    let answer = http::get(entry, "/")
        .await
        .and_then(http::Response::success)
        .context("the first call through the mesh failed")?;
    let patience = Duration::from_secs(10);
    let web_saw = demo
        .web
        .wait_for_log(&format!("peer={}", demo.client.identity()), patience)
        .await?;
    let api_saw = demo
        .api
        .wait_for_log(&format!("peer={}", demo.web.identity()), patience)
        .await?;
    let web_config = demo.web.config().await?;
    let api_config = demo.api.config().await?;

    println!("{SUCCESS}: GET http://{entry}/ answered {:?}", answer.body);
    println!("  hop 1  client {}", peer_of(&web_saw).unwrap_or("?"));
    println!(
        "         server {}",
        web_config["identity"].as_str().unwrap_or("?")
    );
    println!("  hop 2  client {}", peer_of(&api_saw).unwrap_or("?"));
    println!(
        "         server {}",
        api_config["identity"].as_str().unwrap_or("?")
    );
    println!("  (each client ID as the server's sidecar authenticated it, from its log line;");
    println!("   each server ID as its /config reports it, which the client's route required)");
    Ok(())
}

fn print_instructions(demo: &Demo) {
    let mesh = &demo.mesh;
    let ctl = format!(
        "{} --control-plane {} --state-dir {}",
        mesh.launcher().describe(Program::Ctl),
        mesh.control_plane_addr(),
        mesh.state_dir().display()
    );
    let entry = demo.client.route_addr(demo.web.identity());
    let denied = demo.client.route_addr(demo.api.identity());
    let web_route = demo.web.route_addr(demo.api.identity());
    println!();
    println!("The mesh (state and logs in {}):", mesh.dir().display());
    println!(
        "  control plane  gRPC {}  admin http://{}",
        mesh.control_plane_addr(),
        mesh.control_plane_admin().addr()
    );
    for (sidecar, role) in [
        (
            &demo.client,
            format!("route {entry} -> web, route {denied} -> api"),
        ),
        (
            &demo.web,
            format!("app {}, route {web_route} -> api", demo.web_app.addr()),
        ),
        (&demo.api, format!("app {}", demo.api_app.addr())),
    ] {
        println!(
            "  {:<6} sidecar {}  inbound {}  admin http://{}  {role}",
            sidecar.name(),
            sidecar.identity(),
            sidecar.inbound_addr(),
            sidecar.admin().addr()
        );
    }
    println!();
    let web_admin = demo.web.admin().addr();
    let tries = [
        (
            format!("curl http://{entry}/hello"),
            "two mTLS hops: client -> web -> api",
        ),
        (
            format!("curl http://{web_route}/hello"),
            "web's route to api",
        ),
        (
            format!("curl -i http://{denied}/hello"),
            "denied (403): no policy lets client call api",
        ),
        (
            format!("curl http://{web_admin}/config"),
            "a sidecar's identity and certificate",
        ),
        (format!("curl http://{web_admin}/metrics"), "its metrics"),
        (
            format!("curl http://{}/", demo.web.inbound_addr()),
            "refused: the inbound port speaks only mTLS",
        ),
    ];
    let width = tries
        .iter()
        .map(|(command, _)| command.len())
        .max()
        .unwrap_or(0);
    println!("Try:");
    for (command, what) in &tries {
        println!("  {command:<width$}  # {what}");
    }
    println!(
        "trellisctl against this mesh (or `cargo run --bin trellisctl -- ...` with the same flags):"
    );
    println!("  {ctl} workloads");
    println!("  {ctl} check");
    println!("  {ctl} policy list");
    // Why the denied call above was denied.
    println!(
        "  {ctl} policy explain --from {} --to {} --port {}",
        demo.client.identity(),
        demo.api.identity(),
        demo.api_app.addr().port()
    );
    println!(
        "  {ctl} token create --spiffe-id {}",
        mesh.spiffe_id(NAMESPACE, "new")
    );
    println!();
    println!("Press Ctrl-C to stop.");
}

/// How often the demo looks for a program of the mesh that has exited.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// Says so, once each, when the control plane or a sidecar exits on its
/// own while the demo is up: which one, how it exited, and where its log
/// is, with the log's last lines. The rest stay up (and the log stays where
/// it is) until Ctrl-C, so that what happened can be looked at; the exited
/// one is not restarted. Never returns.
async fn watch(demo: &mut Demo) {
    let mut told: Vec<String> = Vec::new();
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Demo {
            client,
            web,
            api,
            mesh,
            ..
        } = demo;
        let processes = [client.process(), web.process(), api.process()]
            .into_iter()
            .chain(mesh.control_plane().process());
        for process in processes {
            let Some(status) = process.try_exit_status() else {
                continue;
            };
            if told.iter().any(|name| name == process.name()) {
                continue;
            }
            told.push(process.name().to_string());
            eprintln!(
                "\ntrellis-demo: {} exited on its own ({status}); its log is {}, ending:\n{}\n\
                 The rest of the mesh stays up; press Ctrl-C to stop it.",
                process.name(),
                process.log_path().display(),
                process.log_tail(10)
            );
        }
    }
}

/// SIGINT (Ctrl-C) or SIGTERM, listened to from the start so that an
/// interrupted start-up still tears down what it started.
struct Shutdown {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn listen() -> anyhow::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Shutdown {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn requested(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

async fn run(exit_after_check: bool) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::listen()?;
    println!("Starting a local Trellis mesh...");
    // Whatever is running when a signal arrives is dropped, and with it
    // every child process started so far.
    let mut demo = tokio::select! {
        demo = start() => demo?,
        () = shutdown.requested() => {
            println!("Interrupted; stopped.");
            // As when interrupted during the check: a run that was to
            // check the mesh and exit did not.
            anyhow::ensure!(!exit_after_check, "interrupted before the check finished");
            return Ok(());
        }
    };
    let interrupted = tokio::select! {
        checked = check(&mut demo) => {
            checked?;
            false
        }
        () = shutdown.requested() => true,
    };
    if !interrupted && !exit_after_check {
        print_instructions(&demo);
        tokio::select! {
            () = shutdown.requested() => {}
            () = watch(&mut demo) => {}
        }
    }
    println!("\nStopping the mesh...");
    // Sidecars stop before the control plane (field order), then the
    // directory is removed.
    tokio::task::spawn_blocking(move || drop(demo)).await?;
    println!("Stopped.");
    anyhow::ensure!(
        !(interrupted && exit_after_check),
        "interrupted before the check finished"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// api's text is passed on as it is when short and plain, bounded
    /// and on one line otherwise.
    #[test]
    fn what_api_answered_is_passed_on_bounded_and_on_one_line() {
        assert_eq!(
            passed_on("trellis: denied by policy default:deny: no policy allows this request\n"),
            "trellis: denied by policy default:deny: no policy allows this request"
        );
        assert_eq!(passed_on("a\r\nb\u{1b}[2J"), "a\\r\\nb\\u{1b}[2J");
        let long = "é".repeat(PASSED_ON + 1);
        let shown = passed_on(&long);
        assert_eq!(shown, format!("{} ...", "é".repeat(PASSED_ON)));
        assert_eq!(passed_on(&"x".repeat(PASSED_ON)), "x".repeat(PASSED_ON));
    }
}
