//! `kakehashi`: the participant CLI. `host` is the customer's side (enter the code, say
//! yes or no), `view` the operator's, `ctl` drives the coordinator's SessionService the
//! way call-center software does.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand};
use kakehashi_agent::consent::parse_yes_no;
use kakehashi_agent::control::{
    self, CreatedView, EventView, SessionView, parse_mode, parse_permissions,
};
use kakehashi_agent::host::SyntheticSource;
use kakehashi_agent::stats::LatencyWindow;
use kakehashi_agent::{
    Consent, Host, HostConfig, HostEvent, HostOptions, SyntheticScreen, Viewer, ViewerConfig,
    ViewerEvent,
};
use kakehashi_proto::pb::session_service_client::SessionServiceClient;
use kakehashi_proto::{Mode, Permissions, pb};
use serde::Serialize;
use tokio::io::AsyncBufReadExt;

const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7700";

#[derive(Debug, Parser)]
#[command(name = "kakehashi", version, about = "Kakehashi remote-support agent")]
struct Cli {
    /// Log filter (tracing EnvFilter syntax); logs go to stderr.
    #[arg(long, env = "KAKEHASHI_LOG", default_value = "warn", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Share this screen (synthetic) with an operator: the customer's side.
    Host(HostArgs),
    /// Watch a customer's screen: the operator's side.
    View(ViewArgs),
    /// Manage sessions through the coordinator's SessionService.
    Ctl(CtlArgs),
}

#[derive(Debug, Args)]
struct HostArgs {
    #[arg(long, env = "KAKEHASHI_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// The session code the operator reads out.
    #[arg(long, env = "KAKEHASHI_CODE")]
    code: String,
    /// Answer every request without asking: grant these permissions, deny the rest.
    #[arg(long, env = "KAKEHASHI_APPROVE", value_parser = parse_permissions, conflicts_with = "deny_all")]
    approve: Option<Permissions>,
    /// Answer every request with no, without asking.
    #[arg(long, env = "KAKEHASHI_DENY_ALL")]
    deny_all: bool,
    #[arg(long, env = "KAKEHASHI_FPS", default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..=240))]
    fps: u32,
    #[arg(long, env = "KAKEHASHI_WIDTH", default_value_t = 1280)]
    width: u32,
    #[arg(long, env = "KAKEHASHI_HEIGHT", default_value_t = 720)]
    height: u32,
    /// Bytes per synthetic frame (at most 4 MiB less the tag).
    #[arg(long, env = "KAKEHASHI_FRAME_BYTES", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(0..=4_000_000))]
    frame_bytes: u32,
    /// A key frame every this many frames.
    #[arg(long, env = "KAKEHASHI_KEY_INTERVAL", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    key_interval: u32,
    /// Warn this many seconds before the session's time limit (comma-separated).
    #[arg(long, env = "KAKEHASHI_WARN_BEFORE", value_delimiter = ',', default_values_t = [300u64, 60])]
    warn_before: Vec<u64>,
    /// End the session when nothing was said, pointed at or typed for this long.
    #[arg(long, env = "KAKEHASHI_IDLE_TIMEOUT_SECS")]
    idle_timeout_secs: Option<u64>,
    /// Save files received from the operator in this directory (default: report them
    /// and keep nothing: the agent writes nothing to disk).
    #[arg(long, env = "KAKEHASHI_SAVE_DIR")]
    save_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct ViewArgs {
    #[arg(long, env = "KAKEHASHI_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    #[arg(long, env = "KAKEHASHI_SESSION")]
    session: String,
    /// The operator ticket from `ctl create`.
    #[arg(long, env = "KAKEHASHI_TICKET")]
    ticket: String,
    /// Ask the customer for these permissions once connected (e.g. control).
    #[arg(long, env = "KAKEHASHI_REQUEST", value_parser = parse_permissions)]
    request: Option<Permissions>,
    /// The note shown to the customer with --request.
    #[arg(long, env = "KAKEHASHI_NOTE", default_value = "")]
    note: String,
    /// Send this chat line once connected.
    #[arg(long, env = "KAKEHASHI_CHAT")]
    chat: Option<String>,
    /// Leave after receiving this many screen frames.
    #[arg(long, env = "KAKEHASHI_FRAMES")]
    frames: Option<u64>,
    /// Save files received from the customer in this directory (default: report them
    /// and keep nothing).
    #[arg(long, env = "KAKEHASHI_SAVE_DIR")]
    save_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct CtlArgs {
    #[arg(long, env = "KAKEHASHI_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// One JSON object per result or event instead of text.
    #[arg(long, env = "KAKEHASHI_JSON")]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Create a session; prints the code for the customer and the operator ticket.
    Create {
        #[arg(long, env = "KAKEHASHI_TENANT")]
        tenant: String,
        #[arg(long, env = "KAKEHASHI_OPERATOR")]
        operator: String,
        #[arg(long, env = "KAKEHASHI_MODE", value_parser = parse_mode)]
        mode: Mode,
        /// What the operator may ask for; default: the mode's default.
        #[arg(long, env = "KAKEHASHI_PERMISSIONS", value_parser = parse_permissions)]
        permissions: Option<Permissions>,
        /// Default: the coordinator's.
        #[arg(long, env = "KAKEHASHI_MAX_DURATION_SECS")]
        max_duration_secs: Option<u32>,
    },
    /// Show one session.
    Get { id: String },
    /// List sessions, newest first.
    List {
        #[arg(long, env = "KAKEHASHI_TENANT")]
        tenant: Option<String>,
        /// Include ended sessions.
        #[arg(long)]
        all: bool,
    },
    /// End a session now.
    End {
        id: String,
        #[arg(long, default_value = "")]
        detail: String,
    },
    /// Print a session's events as they happen, until it ends.
    Watch { id: String },
    /// Print a session's audit log: every event so far, with time and actor.
    Audit { id: String },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain; no backtrace for a person to wade through.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(async {
        match cli.command {
            Command::Host(args) => host(args).await,
            Command::View(args) => view(args).await,
            Command::Ctl(args) => ctl(args).await,
        }
    });
    // A consent prompt may still be blocked reading the terminal after the session
    // ended; do not wait for the customer to press a key before exiting.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

impl HostArgs {
    fn consent(&self) -> Consent {
        match (self.deny_all, self.approve) {
            (true, _) => Consent::Approve(Permissions::NONE),
            (false, Some(p)) => Consent::Approve(p),
            // Questions are answered on the same terminal as the line commands.
            (false, None) => Consent::Manual,
        }
    }

    fn options(&self) -> HostOptions {
        HostOptions {
            time_warnings: self
                .warn_before
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            idle_timeout: self.idle_timeout_secs.map(Duration::from_secs),
        }
    }

    fn screen(&self) -> SyntheticScreen {
        SyntheticScreen {
            width: self.width,
            height: self.height,
            fps: self.fps,
            frame_bytes: self.frame_bytes as usize,
            key_interval: self.key_interval,
        }
    }
}

const HOST_HELP: &str = "Commands: pause | resume | revoke PERMISSIONS (e.g. revoke control) | \
chat TEXT | send PATH | status | end [WHY] | help. Answer questions with y or n.";

/// A question waiting for the customer's y or n.
#[derive(Debug, Clone, Copy)]
enum Question {
    Permissions(Permissions),
    File(u64),
}

/// Reads a file to send, within the transfer limit.
fn read_for_sending(path: &str) -> Result<(String, Vec<u8>)> {
    use std::io::Read;
    let p = std::path::Path::new(path);
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{path:?} has no file name"))?
        .to_owned();
    let file = std::fs::File::open(p).with_context(|| format!("opening {path:?}"))?;
    let max = kakehashi_agent::files::MAX_FILE_BYTES;
    let mut data = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {path:?}"))?;
    if data.len() as u64 > max {
        anyhow::bail!("{path:?} is larger than the {max}-byte limit");
    }
    Ok((name, data))
}

/// Reports a received file, and saves it only where the person asked for it.
fn received_file(save_dir: Option<&std::path::Path>, from: &str, name: &str, data: &[u8]) {
    println!(
        "{from} sent the file {name:?} ({} bytes, SHA-256 checked).",
        data.len()
    );
    if let Some(dir) = save_dir {
        // The name was checked by the receiver: a plain name, no directory part.
        let path = dir.join(name);
        match std::fs::write(&path, data) {
            Ok(()) => println!("Saved as {}.", path.display()),
            Err(e) => println!("Could not save {}: {e}", path.display()),
        }
    }
}

async fn host(args: HostArgs) -> Result<()> {
    let config = HostConfig {
        consent: args.consent(),
    };
    let mut host = Host::join_with_options(&args.coordinator, &args.code, config, args.options())
        .await
        .context("could not join the session")?;
    println!(
        "Connected to session {}. Waiting for the operator...",
        host.session().session_id
    );
    println!("{HOST_HELP}");
    let mut source = SyntheticSource::new(args.screen());
    let mut tick = tokio::time::interval(args.screen().period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lines = Some(tokio::io::BufReader::new(tokio::io::stdin()).lines());
    // The questions waiting for a y/n, oldest first (Consent::Manual).
    let mut questions: std::collections::VecDeque<Question> = Default::default();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let frame = source.next_frame(host.wants_key_frame());
                match host.send_screen(frame).await {
                    Ok(true) => source.advance(),
                    Ok(false) => {}
                    Err(e) => tracing::debug!(error = %e, "screen frame not sent"),
                }
            }
            ev = host.next_event() => match ev {
                Some(HostEvent::Ended { reason, detail }) => {
                    print_end(reason, &detail);
                    // The event stream closes once the agent has told the coordinator
                    // how the session ended (each report is bounded): wait for that.
                    let drained = async { while host.next_event().await.is_some() {} };
                    let _ = tokio::time::timeout(Duration::from_secs(6), drained).await;
                    return Ok(());
                }
                Some(HostEvent::ConsentRequested { permissions, note }) => {
                    let sas = host.sas().unwrap_or_default();
                    println!("The operator (check the code {sas}) asks for: {permissions}{}. Allow? [y/n]",
                        if note.is_empty() { String::new() } else { format!(" (\"{note}\")") });
                    questions.push_back(Question::Permissions(permissions));
                    if lines.is_none() {
                        // No terminal to answer on: nothing is granted without a yes.
                        host.answer(Permissions::NONE)?;
                        questions.pop_back();
                    }
                }
                Some(HostEvent::FileOffered { transfer_id, name, size }) => {
                    println!("The operator wants to send you the file {name:?} ({size} bytes). Accept? [y/n]");
                    questions.push_back(Question::File(transfer_id));
                    if lines.is_none() {
                        host.answer_file(transfer_id, false)?;
                        questions.pop_back();
                    }
                }
                Some(HostEvent::FileReceived { name, data, .. }) => {
                    received_file(args.save_dir.as_deref(), "The operator", &name, &data);
                }
                Some(ev) => print_host_event(&ev),
                None => return Err(anyhow!("the session's event stream stopped")),
            },
            line = next_line(&mut lines) => match line {
                Some(line) => host_command(&host, &mut questions, &line).await?,
                None => {
                    lines = None;
                    while let Some(q) = questions.pop_front() {
                        match q {
                            Question::Permissions(_) => host.answer(Permissions::NONE)?,
                            Question::File(id) => host.answer_file(id, false)?,
                        }
                    }
                }
            },
            _ = &mut ctrl_c => {
                host.hangup(pb::EndReason::EndedByCustomer, "the customer pressed Ctrl-C")
                    .await
                    .context("hanging up")?;
                println!("You ended the session.");
                return Ok(());
            }
        }
    }
}

/// The next stdin line; pending forever once stdin is closed (`None` in `lines`).
async fn next_line(
    lines: &mut Option<tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>>,
) -> Option<String> {
    match lines {
        Some(l) => l.next_line().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

async fn host_command(
    host: &Host,
    questions: &mut std::collections::VecDeque<Question>,
    line: &str,
) -> Result<()> {
    let line = line.trim();
    if let Some(question) = questions.front().copied() {
        match parse_yes_no(line) {
            Some(yes) => {
                questions.pop_front();
                match question {
                    Question::Permissions(asked) => {
                        host.answer(if yes { asked } else { Permissions::NONE })?;
                    }
                    Question::File(id) => host.answer_file(id, yes)?,
                }
                return Ok(());
            }
            None if line.is_empty() => {
                println!("Please answer y or n.");
                return Ok(());
            }
            None => {}
        }
    }
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    let rest = rest.trim();
    let result = match cmd {
        "" => Ok(()),
        "pause" => host.pause_sharing().await.map(|()| {
            println!("Sharing paused: the operator sees nothing until you type resume.");
        }),
        "resume" => host
            .resume_sharing()
            .await
            .map(|()| println!("Sharing resumed.")),
        "revoke" => match parse_permissions(rest) {
            Ok(p) => host
                .revoke(p)
                .await
                .map(|left| println!("Withdrawn: {p}. Allowed now: {left}")),
            Err(e) => {
                println!("{e}");
                Ok(())
            }
        },
        "chat" | "say" => host.send_chat(rest).await,
        "send" => {
            match read_for_sending(rest) {
                Ok((name, data)) => {
                    println!("Sending {name:?} ({} bytes)...", data.len());
                    match host.send_file(&name, &data).await {
                        Ok(()) => println!("The operator received {name:?}."),
                        Err(e) => println!("{name:?} was not sent: {e}"),
                    }
                }
                Err(e) => println!("{e:#}"),
            }
            Ok(())
        }
        "status" => {
            println!(
                "Allowed: {}  paused: {}  SAS: {}",
                host.granted(),
                host.is_paused(),
                host.sas().unwrap_or_else(|| "(no operator yet)".into())
            );
            Ok(())
        }
        "end" | "hangup" => {
            let why = if rest.is_empty() {
                "the customer ended the session"
            } else {
                rest
            };
            host.hangup(pb::EndReason::EndedByCustomer, why).await
        }
        _ => {
            println!("{HOST_HELP}");
            Ok(())
        }
    };
    if let Err(e) = result {
        println!("could not {cmd}: {e}");
    }
    Ok(())
}

fn print_host_event(ev: &HostEvent) {
    match ev {
        HostEvent::PeerJoined { sas, .. } => println!(
            "The operator connected. Security code: {sas} (it must match the code the operator reads to you)."
        ),
        HostEvent::GrantsChanged(g) => println!("Allowed now: {g}"),
        HostEvent::Input(i) => println!("Operator input: {:?}", i.kind),
        HostEvent::Chat(t) => println!("Operator: {t}"),
        HostEvent::Pointer(p) if p.visible => println!("The operator points at ({}, {})", p.x, p.y),
        HostEvent::Pointer(_) => println!("The operator stopped pointing."),
        HostEvent::KeyDisplay { keys, note } => {
            println!(
                "The operator shows you the keys: {}{}",
                keys.join(" + "),
                if note.is_empty() {
                    String::new()
                } else {
                    format!(" ({note})")
                }
            );
        }
        HostEvent::TimeWarning { remaining_secs } => {
            println!("The session ends in {remaining_secs} s (time limit).");
        }
        HostEvent::FileCancelled { reason, .. } => println!("A file transfer stopped: {reason}"),
        HostEvent::FileOffered { .. } | HostEvent::FileReceived { .. } => {}
        HostEvent::ConsentRequested { permissions, note } => {
            println!("The operator asks for {permissions}: {note}")
        }
        HostEvent::KeyFrameRequested => tracing::debug!("key frame requested"),
        HostEvent::Resumed { relay_id, after_ms } => {
            println!(
                "The connection moved to relay {relay_id} after {after_ms} ms; nothing was lost."
            )
        }
        HostEvent::Ended { .. } => {}
    }
}

fn print_end(reason: pb::EndReason, detail: &str) {
    let name = control::end_reason_name(reason);
    if detail.is_empty() {
        println!("The session ended: {name}.");
    } else {
        println!("The session ended: {name} ({detail}).");
    }
}

const VIEW_HELP: &str = "Commands: chat TEXT | point X Y | point off | keys KEY+KEY [NOTE] | \
request PERMISSIONS [NOTE] (e.g. request control) | type TEXT | send PATH | status | end [WHY] | help.";

async fn view(args: ViewArgs) -> Result<()> {
    let config = ViewerConfig {
        request_on_join: args.request.map(|p| (p, args.note.clone())),
    };
    let mut viewer = Viewer::join(&args.coordinator, &args.session, &args.ticket, config)
        .await
        .context("could not join the session")?;
    println!(
        "Connected to session {} (mode {}). Waiting for the customer...",
        viewer.session().session_id,
        control::SessionView::from(viewer.session()).mode
    );
    println!("{VIEW_HELP}");
    let mut chat = args.chat.clone();
    let mut window = LatencyWindow::default();
    let mut total: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lines = Some(tokio::io::BufReader::new(tokio::io::stdin()).lines());
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            ev = viewer.next_event() => match ev {
                Some(ViewerEvent::PeerJoined { sas }) => {
                    println!("The customer connected. Security code: {sas} (read it to the customer).");
                    if let Some(text) = chat.take() {
                        viewer.send_chat(&text).await.context("sending chat")?;
                    }
                }
                Some(ViewerEvent::Screen { latency_us, .. }) => {
                    total += 1;
                    window.record(latency_us);
                    if args.frames.is_some_and(|n| total >= n) {
                        report(total, &mut window);
                        println!("Received {total} frames; leaving.");
                        return Ok(());
                    }
                }
                Some(ViewerEvent::Ended { reason, detail }) => {
                    report(total, &mut window);
                    print_end(reason, &detail);
                    return Ok(());
                }
                Some(ViewerEvent::FileReceived { name, data, .. }) => {
                    received_file(args.save_dir.as_deref(), "The customer", &name, &data);
                }
                Some(ev) => print_viewer_event(&ev),
                None => return Err(anyhow!("the session's event stream stopped")),
            },
            _ = tick.tick() => report(total, &mut window),
            line = next_line(&mut lines) => match line {
                Some(line) => view_command(&viewer, &line).await,
                None => lines = None,
            },
            _ = &mut ctrl_c => {
                viewer
                    .hangup(pb::EndReason::EndedByOperator, "the operator pressed Ctrl-C")
                    .await
                    .context("hanging up")?;
                println!("You ended the session.");
                return Ok(());
            }
        }
    }
}

fn print_viewer_event(ev: &ViewerEvent) {
    match ev {
        ViewerEvent::Chat(t) => println!("Customer: {t}"),
        ViewerEvent::GrantsChanged(g) => println!("Granted now: {g}"),
        ViewerEvent::SharingPaused => println!("The customer paused sharing (paused)."),
        ViewerEvent::SharingResumed => println!("The customer resumed sharing (resumed)."),
        ViewerEvent::ConsentAnswer {
            granted,
            denied,
            revoked,
        } => {
            if !denied.is_empty() {
                println!("The customer refused: {denied}");
            }
            if !revoked.is_empty() {
                println!("The customer withdrew: {revoked}");
            }
            tracing::debug!(%granted, "consent answer");
        }
        ViewerEvent::SystemInfo { info, full } => {
            println!(
                "System information ({}):",
                if *full { "full" } else { "view-only subset" }
            );
            println!("{}", kakehashi_agent::control::system_info_text(info));
        }
        ViewerEvent::TimeWarning { remaining_secs } => {
            println!("The session ends in {remaining_secs} s (time limit).");
        }
        ViewerEvent::Resumed { relay_id, after_ms } => {
            println!(
                "The session moved to relay {relay_id} after {after_ms} ms; nothing was lost."
            );
        }
        ViewerEvent::FileCancelled { reason, .. } => println!("A file transfer stopped: {reason}"),
        ViewerEvent::PeerJoined { .. }
        | ViewerEvent::Screen { .. }
        | ViewerEvent::Ended { .. }
        | ViewerEvent::FileReceived { .. } => {}
    }
}

async fn view_command(viewer: &Viewer, line: &str) {
    let line = line.trim();
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    let rest = rest.trim();
    let result: Result<(), kakehashi_agent::AgentError> = match cmd {
        "" => Ok(()),
        "chat" | "say" => viewer.send_chat(rest).await,
        "point" if rest == "off" => viewer
            .send_pointer(pb::PointerHint {
                x: 0,
                y: 0,
                visible: false,
            })
            .await
            .map(|_| ()),
        "point" => {
            let mut xy = rest.split_whitespace().map(str::parse::<i32>);
            match (xy.next(), xy.next()) {
                (Some(Ok(x)), Some(Ok(y))) => viewer
                    .send_pointer(pb::PointerHint {
                        x,
                        y,
                        visible: true,
                    })
                    .await
                    .map(|sent| {
                        if !sent {
                            println!("Not sent: the customer has not allowed view.");
                        }
                    }),
                _ => {
                    println!("usage: point X Y | point off");
                    Ok(())
                }
            }
        }
        "keys" => {
            let (keys, note) = rest.split_once(' ').unwrap_or((rest, ""));
            let keys: Vec<&str> = keys.split('+').filter(|k| !k.is_empty()).collect();
            viewer
                .send_key_display(&keys, note.trim())
                .await
                .map(|sent| {
                    if !sent {
                        println!("Not sent: the customer has not allowed view.");
                    }
                })
        }
        "request" => {
            let (perms, note) = rest.split_once(' ').unwrap_or((rest, ""));
            match parse_permissions(perms) {
                Ok(p) => viewer.request_permissions(p, note.trim()).await,
                Err(e) => {
                    println!("{e}");
                    Ok(())
                }
            }
        }
        "send" => {
            match read_for_sending(rest) {
                Ok((name, data)) => {
                    println!(
                        "Offering {name:?} ({} bytes) to the customer...",
                        data.len()
                    );
                    match viewer.send_file(&name, &data).await {
                        Ok(()) => println!("The customer received {name:?}."),
                        Err(e) => println!("{name:?} was not sent: {e}"),
                    }
                }
                Err(e) => println!("{e:#}"),
            }
            Ok(())
        }
        "type" => {
            let ev = pb::InputEvent {
                kind: Some(pb::input_event::Kind::Text(pb::TypeText {
                    text: rest.to_owned(),
                })),
            };
            viewer.send_input(ev).await.map(|sent| {
                if !sent {
                    println!("Not sent: control is not granted (or the session is view-only).");
                }
            })
        }
        "status" => {
            println!(
                "Granted: {}  paused: {}  SAS: {}",
                viewer.granted(),
                viewer.is_paused(),
                viewer.sas().unwrap_or_else(|| "(no customer yet)".into())
            );
            Ok(())
        }
        "end" | "hangup" => {
            let why = if rest.is_empty() {
                "the operator ended the session"
            } else {
                rest
            };
            viewer.hangup(pb::EndReason::EndedByOperator, why).await
        }
        _ => {
            println!("{VIEW_HELP}");
            Ok(())
        }
    };
    if let Err(e) = result {
        println!("could not {cmd}: {e}");
    }
}

fn report(total: u64, window: &mut LatencyWindow) {
    if let Some(p) = window.take() {
        println!(
            "frames {total} (+{}/s)  latency p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            p.count,
            p.p50 as f64 / 1000.0,
            p.p99 as f64 / 1000.0,
            p.max as f64 / 1000.0
        );
    }
}

fn rpc_error(call: &str, status: tonic::Status) -> anyhow::Error {
    anyhow!("{call} failed: {} ({:?})", status.message(), status.code())
}

fn emit<T: Serialize + std::fmt::Display>(json: bool, value: &T) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{value}");
    }
    Ok(())
}

async fn ctl(args: CtlArgs) -> Result<()> {
    let channel = kakehashi_agent::error::connect_coordinator(&args.coordinator).await?;
    let mut client = SessionServiceClient::new(channel);
    let json = args.json;
    match args.command {
        CtlCommand::Create {
            tenant,
            operator,
            mode,
            permissions,
            max_duration_secs,
        } => {
            let resp = client
                .create_session(pb::CreateSessionRequest {
                    tenant,
                    operator,
                    mode: mode.to_pb() as i32,
                    permissions: permissions.map_or(0, Permissions::bits),
                    max_duration_secs: max_duration_secs.unwrap_or(0),
                })
                .await
                .map_err(|s| rpc_error("CreateSession", s))?
                .into_inner();
            emit(json, &CreatedView::from(&resp))
        }
        CtlCommand::Get { id } => {
            let s = client
                .get_session(pb::GetSessionRequest { session_id: id })
                .await
                .map_err(|s| rpc_error("GetSession", s))?
                .into_inner();
            emit(json, &SessionView::from(&s))
        }
        CtlCommand::List { tenant, all } => {
            let resp = client
                .list_sessions(pb::ListSessionsRequest {
                    tenant: tenant.unwrap_or_default(),
                    limit: 0,
                    include_ended: all,
                })
                .await
                .map_err(|s| rpc_error("ListSessions", s))?
                .into_inner();
            if resp.sessions.is_empty() && !json {
                println!("no sessions");
            }
            for s in &resp.sessions {
                emit(json, &SessionView::from(s))?;
            }
            Ok(())
        }
        CtlCommand::End { id, detail } => {
            let s = client
                .end_session(pb::EndSessionRequest {
                    session_id: id,
                    detail,
                })
                .await
                .map_err(|s| rpc_error("EndSession", s))?
                .into_inner();
            emit(json, &SessionView::from(&s))
        }
        CtlCommand::Audit { id } => {
            let log = client
                .get_audit_log(pb::GetAuditLogRequest { session_id: id })
                .await
                .map_err(|s| rpc_error("GetAuditLog", s))?
                .into_inner();
            for ev in &log.events {
                emit(json, &EventView::from(ev))?;
            }
            Ok(())
        }
        CtlCommand::Watch { id } => {
            let mut stream = client
                .watch_session(pb::WatchSessionRequest { session_id: id })
                .await
                .map_err(|s| rpc_error("WatchSession", s))?
                .into_inner();
            while let Some(ev) = stream
                .message()
                .await
                .map_err(|s| rpc_error("WatchSession", s))?
            {
                emit(json, &EventView::from(&ev))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kakehashi").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn host_flags() {
        let cli = parse(&[
            "host",
            "--code",
            "1234",
            "--approve",
            "view,control",
            "--fps",
            "30",
        ])
        .expect("parses");
        let Command::Host(h) = cli.command else {
            panic!("not host");
        };
        assert_eq!(h.coordinator, DEFAULT_COORDINATOR);
        assert_eq!(
            h.consent(),
            Consent::Approve(Permissions::VIEW | Permissions::CONTROL)
        );
        assert_eq!(h.screen().fps, 30);
        assert_eq!(h.screen().frame_bytes, 20_000);
        let cli = parse(&["host", "--code", "1", "--deny-all"]).expect("parses");
        let Command::Host(h) = cli.command else {
            panic!("not host");
        };
        assert_eq!(h.consent(), Consent::Approve(Permissions::NONE));
        assert!(parse(&["host", "--code", "1", "--deny-all", "--approve", "view"]).is_err());
        assert!(parse(&["host", "--code", "1", "--approve", "everything"]).is_err());
        assert!(parse(&["host", "--code", "1", "--fps", "0"]).is_err());
    }

    #[test]
    fn view_flags() {
        let cli = parse(&[
            "view",
            "--session",
            "ab",
            "--ticket",
            "t",
            "--request",
            "control",
            "--frames",
            "10",
        ])
        .expect("parses");
        let Command::View(v) = cli.command else {
            panic!("not view");
        };
        assert_eq!(v.request, Some(Permissions::CONTROL));
        assert_eq!(v.frames, Some(10));
        assert!(parse(&["view", "--session", "ab"]).is_err());
    }

    #[test]
    fn ctl_flags() {
        let cli = parse(&[
            "ctl",
            "--json",
            "create",
            "--tenant",
            "t",
            "--operator",
            "o",
            "--mode",
            "control",
            "--permissions",
            "view,control",
        ])
        .expect("parses");
        let Command::Ctl(c) = cli.command else {
            panic!("not ctl");
        };
        assert!(c.json);
        assert!(matches!(
            c.command,
            CtlCommand::Create {
                mode: Mode::Control,
                ..
            }
        ));
        assert!(parse(&["ctl", "list", "--all"]).is_ok());
        assert!(parse(&["ctl", "end", "abc", "--detail", "done"]).is_ok());
        assert!(parse(&["ctl", "watch", "abc"]).is_ok());
        assert!(parse(&["ctl", "audit", "abc"]).is_ok());
        assert!(
            parse(&[
                "ctl",
                "create",
                "--tenant",
                "t",
                "--operator",
                "o",
                "--mode",
                "admin"
            ])
            .is_err()
        );
    }
}
