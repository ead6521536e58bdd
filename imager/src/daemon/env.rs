//! Settings from the environment: every key of the config file also from an `SA_IMAGE_*`
//! variable, which wins over the file.
//!
//! **Naming rule**: `SA_IMAGE_` then the key's path in the file, upper-case, with `__` (two
//! underscores) between a table and its key:
//!
//! | file | environment |
//! |---|---|
//! | `key = ...` | `SA_IMAGE_KEY` |
//! | `[daemon] check_interval = ...` | `SA_IMAGE_DAEMON__CHECK_INTERVAL` |
//! | `[web] listen = ...` | `SA_IMAGE_WEB__LISTEN` |
//! | `[alerts] webhook = [...]` | `SA_IMAGE_ALERTS__WEBHOOK` (comma-separated) |
//! | `[volume.system] schedule = ...` | `SA_IMAGE_VOLUME__SYSTEM__SCHEDULE` |
//!
//! A volume named in a variable matches a `[volume.NAME]` table of the file regardless of case;
//! a volume only the environment names gets the lower-case name. Values are text: numbers and
//! `true`/`false` (also `yes`/`no`, `1`/`0`) where the key takes one, lists comma-separated. An
//! `SA_IMAGE_*` variable that names no key is an error, like an unknown key in the file.

use anyhow::Result;
use toml::Value;

use crate::exit::usage;

/// How a key's text becomes a TOML value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Int,
    Bool,
    List,
}

/// Every key the environment may set: `table.key` (`*` for a volume's name) and its kind.
const KEYS: &[(&str, Kind)] = &[
    ("key", Kind::Text),
    ("passphrase_file", Kind::Text),
    ("agents", Kind::List),
    ("connect_timeout", Kind::Text),
    ("request_timeout", Kind::Text),
    ("stall_timeout", Kind::Text),
    ("cache_dir", Kind::Text),
    ("data_shards", Kind::Int),
    ("parity_shards", Kind::Int),
    ("stripe_size", Kind::Text),
    ("daemon.state_dir", Kind::Text),
    ("daemon.check_interval", Kind::Text),
    ("daemon.repair", Kind::Bool),
    ("daemon.repair_interval", Kind::Text),
    ("daemon.repair_after", Kind::Text),
    ("daemon.scrub", Kind::Text),
    ("daemon.max_absence", Kind::Text),
    ("daemon.alert_repeat", Kind::Text),
    ("web.listen", Kind::Text),
    ("web.tls_cert", Kind::Text),
    ("web.tls_key", Kind::Text),
    ("web.token_file", Kind::Text),
    ("web.public_url", Kind::Text),
    ("alerts.webhook", Kind::List),
    ("alerts.email_to", Kind::List),
    ("alerts.email_from", Kind::Text),
    ("alerts.smtp_host", Kind::Text),
    ("alerts.smtp_port", Kind::Int),
    ("alerts.smtp_security", Kind::Text),
    ("alerts.smtp_user", Kind::Text),
    ("alerts.smtp_password_file", Kind::Text),
    ("alerts.smtp_ca_file", Kind::Text),
    ("volume.*.source", Kind::Text),
    ("volume.*.name", Kind::Text),
    ("volume.*.schedule", Kind::Text),
    ("volume.*.keep_last", Kind::Int),
    ("volume.*.keep_daily", Kind::Int),
    ("volume.*.keep_weekly", Kind::Int),
    ("volume.*.keep_monthly", Kind::Int),
    ("volume.*.gc_grace", Kind::Text),
    ("volume.*.data_shards", Kind::Int),
    ("volume.*.parity_shards", Kind::Int),
    ("volume.*.stripe_size", Kind::Text),
    ("volume.*.allow_degraded", Kind::Bool),
    ("volume.*.pre_hook", Kind::Text),
    ("volume.*.post_hook", Kind::Text),
    ("volume.*.hook_timeout", Kind::Text),
    ("volume.*.max_age", Kind::Text),
    ("volume.*.min_margin", Kind::Int),
    ("volume.*.healthcheck", Kind::Text),
];

/// The prefix of every variable.
pub const PREFIX: &str = "SA_IMAGE_";

/// Every key path the file and the environment know (`volume.*.source` for volumes).
#[cfg(test)]
pub fn known_keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|(k, _)| *k)
}

/// Sets the keys of `vars` that start with [`PREFIX`] in `table` (see the module docs).
pub fn apply(table: &mut toml::Table, vars: impl Iterator<Item = (String, String)>) -> Result<()> {
    let mut vars: Vec<(String, String)> = vars.filter(|(k, _)| k.starts_with(PREFIX)).collect();
    vars.sort();
    for (name, text) in vars {
        let parts: Vec<String> = name[PREFIX.len()..]
            .split("__")
            .map(str::to_lowercase)
            .collect();
        let (path, pattern) = resolve(table, &parts).ok_or_else(|| unknown(&name))?;
        let kind = KEYS
            .iter()
            .find(|(k, _)| *k == pattern)
            .map(|(_, kind)| *kind)
            .ok_or_else(|| unknown(&name))?;
        let value = convert(&name, &text, kind)?;
        set(table, &path, value, &name)?;
    }
    Ok(())
}

fn unknown(name: &str) -> anyhow::Error {
    usage(format!(
        "environment variable {name} names no setting: the rule is SA_IMAGE_ then the key's path, \
         upper-case, `__` between a table and its key (SA_IMAGE_AGENTS, \
         SA_IMAGE_DAEMON__CHECK_INTERVAL, SA_IMAGE_VOLUME__SYSTEM__SCHEDULE)"
    ))
}

/// The path in the table (volume names as the file spells them) and the [`KEYS`] pattern.
fn resolve(table: &toml::Table, parts: &[String]) -> Option<(Vec<String>, String)> {
    match parts {
        [key] => Some((vec![key.clone()], key.clone())),
        [t, key] if t != "volume" => Some((parts.to_vec(), format!("{t}.{key}"))),
        [t, name, key] if t == "volume" && !name.is_empty() => {
            let spelled = table
                .get("volume")
                .and_then(Value::as_table)
                .and_then(|v| v.keys().find(|k| k.to_lowercase() == *name).cloned())
                .unwrap_or_else(|| name.clone());
            Some((
                vec![t.clone(), spelled, key.clone()],
                format!("volume.*.{key}"),
            ))
        }
        _ => None,
    }
}

fn convert(name: &str, text: &str, kind: Kind) -> Result<Value> {
    Ok(match kind {
        Kind::Text => Value::String(text.to_string()),
        Kind::Int => Value::Integer(
            text.trim()
                .parse()
                .map_err(|_| usage(format!("{name}: '{text}' is not a whole number")))?,
        ),
        Kind::Bool => Value::Boolean(match text.trim().to_lowercase().as_str() {
            "true" | "yes" | "1" | "on" => true,
            "false" | "no" | "0" | "off" => false,
            _ => return Err(usage(format!("{name}: '{text}' is not true or false"))),
        }),
        Kind::List => Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
    })
}

fn set(table: &mut toml::Table, path: &[String], value: Value, name: &str) -> Result<()> {
    let (last, tables) = path.split_last().ok_or_else(|| unknown(name))?;
    let mut t = table;
    for p in tables {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| Value::Table(toml::Table::new()));
        t = entry.as_table_mut().ok_or_else(|| {
            usage(format!(
                "{name}: the config file's `{p}` is not a table, so it cannot take a key"
            ))
        })?;
    }
    t.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn the_naming_rule() {
        let mut t: toml::Table =
            toml::from_str("agents = ['a']\n[volume.System]\nsource = '/dev/sda'\nkeep_last = 3\n")
                .unwrap();
        apply(
            &mut t,
            vars(&[
                ("SA_IMAGE_AGENTS", "pc1, pc2:7000"),
                ("SA_IMAGE_DAEMON__CHECK_INTERVAL", "30s"),
                ("SA_IMAGE_DAEMON__REPAIR", "no"),
                ("SA_IMAGE_VOLUME__SYSTEM__KEEP_LAST", "7"),
                ("SA_IMAGE_VOLUME__DB__SOURCE", "/dev/sdb"),
                ("SA_IMAGE_ALERTS__SMTP_PORT", "2525"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        let want: toml::Table = toml::from_str(
            "agents = ['pc1', 'pc2:7000']\n\
             [daemon]\ncheck_interval = '30s'\nrepair = false\n\
             [alerts]\nsmtp_port = 2525\n\
             [volume.System]\nsource = '/dev/sda'\nkeep_last = 7\n\
             [volume.db]\nsource = '/dev/sdb'\n",
        )
        .unwrap();
        assert_eq!(t, want);
    }

    #[test]
    fn wrong_variables_are_named() {
        for (var, val, says) in [
            ("SA_IMAGE_AGNETS", "x", "names no setting"),
            ("SA_IMAGE_DAEMON__NOPE", "x", "names no setting"),
            ("SA_IMAGE_VOLUME__SOURCE", "x", "names no setting"),
            (
                "SA_IMAGE_VOLUME__A__KEEP_LAST",
                "many",
                "not a whole number",
            ),
            ("SA_IMAGE_DAEMON__REPAIR", "maybe", "not true or false"),
        ] {
            let mut t = toml::Table::new();
            let e = apply(&mut t, vars(&[(var, val)])).unwrap_err();
            assert!(e.to_string().contains(says), "{var}: {e}");
            assert!(e.to_string().contains(var), "{var}: {e}");
            assert_eq!(crate::exit::code_of(&e), crate::exit::USAGE);
        }
    }
}
