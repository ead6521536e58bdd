//! `sa-image daemon`: flags to the daemon's settings source (see [`crate::daemon`]); `--check`
//! prints what the settings say and exits.

use std::path::{Path, PathBuf};

use anyhow::Result;
use sa_core::duration::format_span;

use crate::daemon::config::{self, Overrides, Settings};
use crate::daemon::run::{run as run_daemon, Source};
use crate::daemon::shared::now_ms;

/// Flags of `daemon` (each also a key: `web.listen`, `daemon.state_dir`).
#[derive(clap::Args, Debug, Default)]
pub struct DaemonArgs {
    /// Address of the status page and /metrics, e.g. 0.0.0.0:7711; beyond loopback it needs
    /// web.tls_cert, web.tls_key and web.token_file; `none` for no page [default: 127.0.0.1:7711].
    #[arg(long)]
    pub listen: Option<String>,
    /// Where the job journal and the alert state live [default: /var/lib/sa-image].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Check the settings (file and SA_IMAGE_* variables), print what the daemon would do, and
    /// exit (0 when they are right, 64 when not).
    #[arg(long)]
    pub check: bool,
}

/// `sa-image daemon [--config FILE]`.
pub async fn run(args: DaemonArgs, cfg: Option<&Path>) -> Result<u8> {
    let src = Source {
        path: cfg
            .map(Path::to_path_buf)
            .unwrap_or_else(|| config::DEFAULT_PATH.into()),
        must_exist: cfg.is_some(),
        over: Overrides {
            listen: args.listen,
            state_dir: args.state_dir,
        },
    };
    if args.check {
        print_plan(&src.load()?);
        return Ok(0);
    }
    run_daemon(src).await
}

fn print_plan(s: &Settings) {
    let now = now_ms();
    println!("settings from {} are right", s.path.display());
    println!(
        "  agents: {}",
        s.fleet.agents.clone().unwrap_or_default().join(", ")
    );
    println!("  state: {}", s.state_dir.display());
    for v in &s.volumes {
        let next = v
            .schedule
            .next_after(now)
            .map(|t| format!("next in {}", format_span(t.saturating_sub(now) / 1000)))
            .unwrap_or_else(|| "never".into());
        println!(
            "  volume '{}': {} every '{}' ({next}); alert when older than {}; retention: {}",
            v.name,
            v.source.display(),
            v.schedule,
            format_span(v.max_age.as_secs()),
            match v.retention {
                Some(p) => format!(
                    "last {} daily {} weekly {} monthly {}",
                    p.last, p.daily, p.weekly, p.monthly
                ),
                None => "keep everything".into(),
            }
        );
    }
    match &s.scrub {
        Some(sc) => println!("  scrub: {sc}"),
        None => println!("  scrub: never"),
    }
    match s.repair {
        Some(r) => println!(
            "  repair: a pass every {}, rebuilding around an agent missing for {}",
            format_span(r.interval.as_secs()),
            format_span(r.after.as_secs())
        ),
        None => println!("  repair: off"),
    }
    match &s.web {
        Some(w) => println!(
            "  status page: {}://{}/{}",
            if w.tls.is_some() { "https" } else { "http" },
            w.listen,
            if w.token_file.is_some() {
                " (login token)"
            } else {
                ""
            }
        ),
        None => println!("  status page: none"),
    }
    println!(
        "  alerts: {} webhook(s), e-mail {}",
        s.alerts.webhooks.len(),
        match &s.alerts.email {
            Some(e) => format!("to {} via {}:{}", e.to.join(", "), e.host, e.port),
            None => "off".into(),
        }
    );
}
