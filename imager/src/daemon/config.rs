//! The daemon's settings: a TOML file (default `/etc/sa-image/config.toml`), every key also from
//! an `SA_IMAGE_*` environment variable ([`super::env`]), checked into [`Settings`].
//!
//! The file's top level holds what every command shares (`key`, `passphrase_file`, `agents`,
//! `connect_timeout`, `request_timeout`, `stall_timeout`, `cache_dir`, and the layout `data_shards`,
//! `parity_shards`, `stripe_size` as defaults for the volumes); other top-level keys of the
//! commands (`listen` of `serve`, ...) may be there and are passed over. The daemon's own settings
//! are in tables: `[daemon]` (state, checks, repair, scrub, absence), `[web]` (the status page),
//! `[alerts]` (webhooks, e-mail) and one `[volume.NAME]` per volume. A key no table knows is an
//! error that names it. `packaging/config.example.toml` shows and explains every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use sa_engine::retention::Policy;
use serde::Deserialize;

use super::schedule::Schedule;

pub mod drill;
use crate::config::{FleetArgs, KeyArgs};
use crate::exit::usage;

/// Where the daemon reads its settings unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/sa-image/config.toml";
/// Where the daemon keeps its job journal and alert state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sa-image";
/// The status page's address unless told otherwise (loopback: no TLS or token needed).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7711";

/// A list given as a TOML array or as one comma-separated string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List(pub Vec<String>);

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            One(String),
            Many(Vec<String>),
        }
        Ok(List(match Either::deserialize(d)? {
            Either::One(s) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            Either::Many(v) => v,
        }))
    }
}

/// The top level of the file as the daemon reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileConfig {
    key: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    agents: Option<List>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    stall_timeout: Option<String>,
    cache_dir: Option<PathBuf>,
    data_shards: Option<u8>,
    parity_shards: Option<u8>,
    stripe_size: Option<String>,
    wake_wait: Option<String>,
    /// The offsite table for every volume that has none of its own.
    offsite: Option<crate::config::OffsiteTable>,
    daemon: DaemonTable,
    web: WebTable,
    alerts: AlertsTable,
    volume: BTreeMap<String, VolumeTable>,
}

/// `[daemon]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DaemonTable {
    state_dir: Option<PathBuf>,
    check_interval: Option<String>,
    repair: Option<bool>,
    repair_interval: Option<String>,
    repair_after: Option<String>,
    scrub: Option<String>,
    max_absence: Option<String>,
    alert_repeat: Option<String>,
}

/// `[web]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct WebTable {
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    token_file: Option<PathBuf>,
    public_url: Option<String>,
}

/// `[alerts]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AlertsTable {
    webhook: Option<List>,
    email_to: Option<List>,
    email_from: Option<String>,
    smtp_host: Option<String>,
    smtp_port: Option<u16>,
    smtp_security: Option<String>,
    smtp_user: Option<String>,
    smtp_password_file: Option<PathBuf>,
    smtp_ca_file: Option<PathBuf>,
}

/// `[volume.NAME]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct VolumeTable {
    source: Option<PathBuf>,
    name: Option<String>,
    schedule: Option<String>,
    keep_last: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
    gc_grace: Option<String>,
    data_shards: Option<u8>,
    parity_shards: Option<u8>,
    stripe_size: Option<String>,
    allow_degraded: Option<bool>,
    pre_hook: Option<String>,
    post_hook: Option<String>,
    hook_timeout: Option<String>,
    max_age: Option<String>,
    min_margin: Option<i64>,
    healthcheck: Option<String>,
    drill: Option<drill::DrillTable>,
    offsite: Option<crate::config::OffsiteTable>,
}

/// How the mail is protected on its way to the SMTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// Plain connection, upgraded with STARTTLS (required), port 587 by default.
    StartTls,
    /// TLS from the first byte (SMTPS), port 465 by default.
    Tls,
    /// No encryption (a relay on this machine or a trusted network), port 25 by default.
    None,
}

/// E-mail settings.
#[derive(Debug, Clone)]
pub struct Email {
    /// Recipients.
    pub to: Vec<String>,
    /// Sender.
    pub from: String,
    /// SMTP server host name.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// STARTTLS, TLS or none.
    pub security: SmtpSecurity,
    /// Login user, with the password from a file.
    pub login: Option<(String, PathBuf)>,
    /// Extra CA certificate (PEM) to trust for the SMTP server.
    pub ca_file: Option<PathBuf>,
}

/// Where alerts go.
#[derive(Debug, Clone, Default)]
pub struct AlertSettings {
    /// Webhook URLs (JSON POST).
    pub webhooks: Vec<String>,
    /// E-mail, when configured.
    pub email: Option<Email>,
}

/// The status page.
#[derive(Debug, Clone)]
pub struct WebSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Certificate chain and key (PEM): HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// File whose first line is the login token (required beyond loopback).
    pub token_file: Option<PathBuf>,
    /// The page's address as people reach it (links in alerts).
    pub public_url: Option<String>,
}

/// One protected volume.
#[derive(Debug, Clone)]
pub struct VolumeSettings {
    /// Volume name in the catalog.
    pub name: String,
    /// Block device or image file.
    pub source: PathBuf,
    /// When to snapshot.
    pub schedule: Schedule,
    /// Retention after each snapshot (None: keep everything).
    pub retention: Option<Policy>,
    /// gc grace period of that prune.
    pub gc_grace: Duration,
    /// Layout.
    pub k: u8,
    /// Parity shards.
    pub m: u8,
    /// Stripe size, bytes.
    pub stripe_size: u32,
    /// `snapshot --allow-degraded`.
    pub allow_degraded: bool,
    /// Command run before each snapshot (`sh -c`).
    pub pre_hook: Option<String>,
    /// Command run after each snapshot whose pre hook ran.
    pub post_hook: Option<String>,
    /// How long a hook may run.
    pub hook_timeout: Duration,
    /// Alert when the newest snapshot is older.
    pub max_age: Duration,
    /// Alert when the newest snapshot's margin is below (None: its m).
    pub min_margin: Option<i64>,
    /// healthchecks-style ping URL (`/start`, `/fail` appended).
    pub healthcheck: Option<String>,
    /// Scheduled recovery drills (None: none).
    pub drill: Option<drill::DrillSettings>,
    /// The offsite copy pushed after each snapshot, and collected after each prune (None: none).
    pub offsite: Option<OffsiteSettings>,
}

/// A volume's `offsite` table, checked.
#[derive(Debug, Clone)]
pub struct OffsiteSettings {
    /// Where and how.
    pub config: sa_engine::offsite::OffsiteConfig,
    /// Upload rate (None: unlimited).
    pub rate: Option<u64>,
    /// Push on this schedule; None: after each snapshot.
    pub schedule: Option<Schedule>,
}

/// The repair watcher's settings.
#[derive(Debug, Clone, Copy)]
pub struct RepairSettings {
    /// Time between passes.
    pub interval: Duration,
    /// How long an agent may be missing before its shards are rebuilt elsewhere.
    pub after: Duration,
}

/// Everything the daemon runs with, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file read (or that would have been, when absent and the environment has it all).
    pub path: PathBuf,
    /// Key file and passphrase file.
    pub key: KeyArgs,
    /// Agents and timeouts.
    pub fleet: FleetArgs,
    /// Manifest cache and agent sightings.
    pub cache_dir: Option<PathBuf>,
    /// Sleeping members are woken before each backup, and waited for this long (`wake_wait`).
    pub wake: sa_engine::fleet::sleepers::WakeOptions,
    /// Job journal and alert state.
    pub state_dir: PathBuf,
    /// Time between status checks (metrics, page, alerts).
    pub check_interval: Duration,
    /// Repair watcher (None: off).
    pub repair: Option<RepairSettings>,
    /// When to ask the agents for a scrub (None: never).
    pub scrub: Option<Schedule>,
    /// Alert when an agent is absent longer.
    pub max_absence: Duration,
    /// An open alert is sent again after this long.
    pub alert_repeat: Duration,
    /// The status page (None: off).
    pub web: Option<WebSettings>,
    /// Where alerts go.
    pub alerts: AlertSettings,
    /// The volumes.
    pub volumes: Vec<VolumeSettings>,
}

/// Flags of `sa-image daemon` that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
}

/// Reads the file (when it exists, or must), applies the environment and the flags, and checks
/// everything.
pub fn load(path: &Path, must_exist: bool, over: &Overrides) -> Result<Settings> {
    let mut table = match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str::<toml::Table>(&text).map_err(|e| {
            usage(format!(
                "config file {} is not valid TOML: {e}",
                path.display()
            ))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => toml::Table::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read config file {}", path.display()))
        }
    };
    super::env::apply(&mut table, std::env::vars())?;
    let shown = path.display();
    for k in table.keys() {
        let known = crate::config::KNOWN_KEYS.contains(&k.as_str())
            || crate::config::DAEMON_TABLES.contains(&k.as_str());
        if !known {
            return Err(usage(format!(
                "config file {shown}: unknown key '{k}' (the daemon's tables are [daemon], [web], \
                 [alerts] and [volume.NAME]; see packaging/config.example.toml)"
            )));
        }
    }
    let file: FileConfig = table
        .try_into()
        .map_err(|e| usage(format!("config file {shown}: {e}")))?;
    check(path, file, over)
}

fn dur(text: Option<&str>, key: &str, default: Duration) -> Result<Duration> {
    match text {
        Some(t) => crate::config::duration(t, key),
        None => Ok(default),
    }
}

fn positive(d: Duration, key: &str) -> Result<Duration> {
    if d.is_zero() {
        return Err(usage(format!("{key} must be more than 0")));
    }
    Ok(d)
}

fn check(path: &Path, f: FileConfig, over: &Overrides) -> Result<Settings> {
    let key = KeyArgs {
        key: f.key.clone(),
        passphrase_file: f.passphrase_file.clone(),
    };
    if key.key.is_none() {
        return Err(usage(format!(
            "no key file: set `key = \"/etc/sa-image/master.key\"` in {} (or SA_IMAGE_KEY); make \
             one with `sa-image keygen --out FILE`",
            path.display()
        )));
    }
    let fleet = FleetArgs {
        agents: f.agents.clone().map(|l| l.0),
        connect_timeout: f.connect_timeout.clone(),
        request_timeout: f.request_timeout.clone(),
        stall_timeout: f.stall_timeout.clone(),
        cache_dir: f.cache_dir.clone(),
    };
    fleet.addrs()?;
    let d = &f.daemon;
    let repair = if d.repair.unwrap_or(true) {
        Some(RepairSettings {
            interval: positive(
                dur(
                    d.repair_interval.as_deref(),
                    "daemon.repair_interval",
                    Duration::from_secs(900),
                )?,
                "daemon.repair_interval",
            )?,
            after: dur(
                d.repair_after.as_deref(),
                "daemon.repair_after",
                sa_engine::repair::watch::DEFAULT_REPAIR_AFTER,
            )?,
        })
    } else {
        None
    };
    let scrub = match Schedule::parse(d.scrub.as_deref().unwrap_or("Sun 04:00"))
        .map_err(|e| usage(format!("daemon.scrub: {e}")))?
    {
        Schedule::Never => None,
        s => Some(s),
    };
    let mut volumes = Vec::new();
    for (table_name, v) in &f.volume {
        volumes.push(volume(table_name, v, &f)?);
    }
    let mut names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(usage(format!(
            "two [volume.*] tables have the volume name '{}': each volume needs its own name",
            w[0]
        )));
    }
    let wake = crate::config::WakeArgs {
        wake_wait: f.wake_wait.clone(),
    }
    .options()?;
    Ok(Settings {
        path: path.to_path_buf(),
        key,
        fleet,
        cache_dir: f.cache_dir.clone(),
        wake,
        state_dir: over
            .state_dir
            .clone()
            .or_else(|| d.state_dir.clone())
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        check_interval: positive(
            dur(
                d.check_interval.as_deref(),
                "daemon.check_interval",
                Duration::from_secs(300),
            )?,
            "daemon.check_interval",
        )?,
        repair,
        scrub,
        max_absence: dur(
            d.max_absence.as_deref(),
            "daemon.max_absence",
            Duration::from_secs(7 * 86400),
        )?,
        alert_repeat: positive(
            dur(
                d.alert_repeat.as_deref(),
                "daemon.alert_repeat",
                Duration::from_secs(86400),
            )?,
            "daemon.alert_repeat",
        )?,
        web: web(&f.web, over)?,
        alerts: alerts(&f.alerts)?,
        volumes,
    })
}

fn volume(table_name: &str, v: &VolumeTable, f: &FileConfig) -> Result<VolumeSettings> {
    let at = |key: &str| format!("volume.{table_name}.{key}");
    let source = v.source.clone().ok_or_else(|| {
        usage(format!(
            "[volume.{table_name}] has no `source`: give the block device or image file to \
             protect, e.g. source = \"/dev/sda\""
        ))
    })?;
    let schedule_text = v.schedule.as_deref().unwrap_or("daily 02:00");
    let schedule =
        Schedule::parse(schedule_text).map_err(|e| usage(format!("{}: {e}", at("schedule"))))?;
    let policy = Policy {
        last: v.keep_last.unwrap_or(0),
        daily: v.keep_daily.unwrap_or(0),
        weekly: v.keep_weekly.unwrap_or(0),
        monthly: v.keep_monthly.unwrap_or(0),
    };
    let stripe_size = match v.stripe_size.as_deref().or(f.stripe_size.as_deref()) {
        Some(s) => u32::try_from(crate::config::size(s, &at("stripe_size"))?)
            .map_err(|_| usage(format!("{}: too large", at("stripe_size"))))?,
        None => sa_engine::DEFAULT_STRIPE_SIZE,
    };
    let max_age = match &v.max_age {
        Some(t) => positive(crate::config::duration(t, &at("max_age"))?, &at("max_age"))?,
        None => schedule.longest_gap() + Duration::from_secs(2 * 3600),
    };
    if let Some(url) = &v.healthcheck {
        check_url(url, &at("healthcheck"))?;
    }
    Ok(VolumeSettings {
        name: v.name.clone().unwrap_or_else(|| table_name.to_string()),
        source,
        schedule,
        retention: (policy != Policy::default()).then_some(policy),
        gc_grace: crate::config::gc_grace(v.gc_grace.as_deref())?,
        k: v.data_shards
            .or(f.data_shards)
            .unwrap_or(sa_engine::DEFAULT_K),
        m: v.parity_shards
            .or(f.parity_shards)
            .unwrap_or(sa_engine::DEFAULT_M),
        stripe_size,
        allow_degraded: v.allow_degraded.unwrap_or(false),
        pre_hook: v.pre_hook.clone(),
        post_hook: v.post_hook.clone(),
        hook_timeout: positive(
            dur(
                v.hook_timeout.as_deref(),
                &at("hook_timeout"),
                Duration::from_secs(600),
            )?,
            &at("hook_timeout"),
        )?,
        max_age,
        min_margin: v.min_margin,
        healthcheck: v.healthcheck.clone(),
        drill: match &v.drill {
            Some(t) => drill::check(t, &format!("volume.{table_name}.drill"))?,
            None => None,
        },
        offsite: match (&v.offsite, &f.offsite) {
            (Some(t), _) => Some(offsite(t, &at("offsite"))?),
            (None, Some(t)) => Some(offsite(t, "offsite")?),
            (None, None) => None,
        },
    })
}

/// Checks a volume's `offsite` table (the bucket is not contacted here).
fn offsite(t: &crate::config::OffsiteTable, key: &str) -> Result<OffsiteSettings> {
    let args = crate::config::OffsiteArgs {
        offsite: Some(t.clone()),
        ..Default::default()
    };
    let mut merged = crate::config::OffsiteArgs::default();
    merged.merge(&mut args.clone());
    let config = merged
        .config()
        .map_err(|e| usage(format!("{key}: {e}")))?
        .ok_or_else(|| {
            usage(format!(
                "{key} has no `url`: give url = \"s3://BUCKET/PREFIX\""
            ))
        })?;
    let schedule = match &t.schedule {
        Some(text) => {
            Some(Schedule::parse(text).map_err(|e| usage(format!("{key}.schedule: {e}")))?)
        }
        None => None,
    };
    Ok(OffsiteSettings {
        config,
        rate: merged.rate().map_err(|e| usage(format!("{key}: {e}")))?,
        schedule,
    })
}

fn check_url(url: &str, key: &str) -> Result<()> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(usage(format!(
            "{key}: '{url}' is not an http:// or https:// URL"
        )));
    }
    Ok(())
}

fn web(w: &WebTable, over: &Overrides) -> Result<Option<WebSettings>> {
    let text = over
        .listen
        .clone()
        .or_else(|| w.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.into());
    if text == "none" || text == "off" {
        return Ok(None);
    }
    let listen: SocketAddr = text.parse().map_err(|_| {
        usage(format!(
            "web.listen: '{text}' is not an IP:PORT address (e.g. 127.0.0.1:7711, 0.0.0.0:7711), \
             or `none`"
        ))
    })?;
    let tls =
        match (&w.tls_cert, &w.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => return Err(usage(
                "web.tls_cert and web.tls_key go together: the certificate chain and its private \
                 key (PEM)",
            )),
        };
    if !listen.ip().is_loopback() && (tls.is_none() || w.token_file.is_none()) {
        return Err(usage(format!(
            "the status page on {listen} would be reachable from the network: give web.tls_cert \
             and web.tls_key (HTTPS) and web.token_file (the login token), or listen on \
             127.0.0.1"
        )));
    }
    Ok(Some(WebSettings {
        listen,
        tls,
        token_file: w.token_file.clone(),
        public_url: w.public_url.clone(),
    }))
}

fn alerts(a: &AlertsTable) -> Result<AlertSettings> {
    let webhooks = a.webhook.clone().map(|l| l.0).unwrap_or_default();
    for u in &webhooks {
        check_url(u, "alerts.webhook")?;
    }
    let to = a.email_to.clone().map(|l| l.0).unwrap_or_default();
    let email = if to.is_empty() {
        if a.smtp_host.is_some() {
            return Err(usage(
                "alerts.smtp_host is set but alerts.email_to is not: whom should alerts go to?",
            ));
        }
        None
    } else {
        let host = a.smtp_host.clone().ok_or_else(|| {
            usage("alerts.email_to needs alerts.smtp_host: the mail server to send through")
        })?;
        let security = match a.smtp_security.as_deref().unwrap_or("starttls") {
            "starttls" => SmtpSecurity::StartTls,
            "tls" => SmtpSecurity::Tls,
            "none" => SmtpSecurity::None,
            other => {
                return Err(usage(format!(
                    "alerts.smtp_security: '{other}' is not one of starttls, tls, none"
                )))
            }
        };
        let port = a.smtp_port.unwrap_or(match security {
            SmtpSecurity::StartTls => 587,
            SmtpSecurity::Tls => 465,
            SmtpSecurity::None => 25,
        });
        let login = match (&a.smtp_user, &a.smtp_password_file) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (None, None) => None,
            _ => {
                return Err(usage(
                    "alerts.smtp_user and alerts.smtp_password_file go together",
                ))
            }
        };
        Some(Email {
            to,
            from: a
                .email_from
                .clone()
                .unwrap_or_else(|| format!("sa-image@{}", super::host_name())),
            host,
            port,
            security,
            login,
            ca_file: a.smtp_ca_file.clone(),
        })
    };
    Ok(AlertSettings { webhooks, email })
}

#[cfg(test)]
mod tests;
