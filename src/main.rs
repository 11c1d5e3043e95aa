//! The `hearth` binary: parse the command line, set up logging, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use hearth::cli::{Cli, Command};
use hearth::config::Config;

/// Logging to stderr: colour only on a terminal (and never with `NO_COLOR`), no timestamps under
/// systemd (journald adds its own), and for client commands only warnings unless `HEARTH_LOG`
/// says otherwise.
fn init_logging(command: &Command) {
    use std::io::IsTerminal;
    let client = matches!(command, Command::Build(_) | Command::FlakeUpdate(_) | Command::Mcp(_) | Command::Bucket(_));
    let default = if client { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        let format = tracing_subscriber::fmt::format().without_time();
        builder.event_format(Journald(format)).init();
    } else {
        builder.init();
    }
}

/// Under journald: each line starts with its syslog priority (`<3>` error, `<4>` warning, `<6>`
/// info, `<7>` debug), which journald reads, so `journalctl -p warning` finds the warnings.
/// journald stamps the time itself.
struct Journald<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Journald<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Raises the soft limit on open files to the hard one, as servers do (systemd's default soft
/// limit is 1024): every client connection and every NAR walk's open directory is a descriptor,
/// and the connection cap, not the soft limit, is what should bound them.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(err = %e, "cannot raise the open-file limit");
        }
    }
}

fn main() -> ExitCode {
    fix_mmap_threshold();
    let cli = Cli::parse();
    init_logging(&cli.command);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hearth: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve { config, bind } => {
            raise_fd_limit();
            let mut cfg = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            if let Some(b) = bind {
                match hearth::config::BindAddr::parse("--bind", &b) {
                    Ok(addr) => cfg.bind = addr,
                    Err(e) => return config_error(e),
                }
            }
            report(runtime.block_on(hearth::app::run(cfg)))
        }
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(cfg) => {
                for line in cfg.describe() {
                    println!("{line}");
                }
                let (keys, problem) = runtime.block_on(hearth::app::fleet_keys(&cfg));
                if let Some(problem) = problem {
                    println!("the fleet's keys: {problem}; the page of any hearth of the fleet lists them");
                }
                if !keys.is_empty() {
                    println!("clients of the fleet trust: trusted-public-keys = {}", keys.join(" "));
                }
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(e) => config_error(e),
        },
        Command::Keygen { name, secret_key_file, public_key_file } => {
            report(hearth::app::keygen(&name, &secret_key_file, &public_key_file))
        }
        Command::Nkey { seed_file } => report(hearth::app::nkey(&seed_file)),
        Command::Build(args) => runtime.block_on(hearth::builder::cli::run(args)),
        Command::FlakeUpdate(args) => runtime.block_on(hearth::flake_update::run(args)),
        Command::Mcp(args) => report(runtime.block_on(hearth::mcp::run(args))),
        Command::Bucket(hearth::cli::BucketCommand::Gc(args)) => {
            report(runtime.block_on(hearth::bucket::cli::gc(args)))
        }
        Command::Bucket(hearth::cli::BucketCommand::Push(args)) => {
            report(runtime.block_on(hearth::bucket::cli::push(args)))
        }
    }
}

fn config_error(e: hearth::config::ConfigError) -> ExitCode {
    eprintln!("hearth: configuration error: {e}");
    ExitCode::from(2)
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc serves allocations of 128 KiB and more with mmap of their own, but raises that
/// threshold to the largest block freed so far, after which large NAR chunks come from its
/// per-thread arenas, which keep what was freed: after a few concurrent toolchain downloads
/// hearth held about 50 MiB it no longer used. A fixed threshold returns large blocks to the
/// system when they are freed (NAR streams reuse their own large chunk buffers, so this costs
/// no page faults per chunk): about 18 MiB idle after the same downloads, and a peak under 256
/// concurrent downloads of about 35 MiB instead of 63 (docs/performance.md). An operator's own
/// `MALLOC_MMAP_THRESHOLD_` wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_mmap_threshold() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt(3) only sets an allocator parameter, and this runs first in `main`,
        // before any other thread exists.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_mmap_threshold() {}
