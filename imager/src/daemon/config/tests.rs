//! The config file's checks, and the shipped example.

use super::*;

const EXAMPLE: &str = include_str!("../../../../packaging/config.example.toml");

fn load_text(text: &str) -> Result<Settings> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.toml");
    std::fs::write(&p, text).unwrap();
    load(&p, true, &Overrides::default())
}

/// The example with every commented-out key and table switched on.
fn example_all_on() -> String {
    EXAMPLE
        .lines()
        .map(|l| {
            let rest = l.strip_prefix("# ").unwrap_or(l);
            let key = rest.split(" = ").next().unwrap_or("");
            let is_key =
                !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            if l.starts_with("# ")
                && (is_key && rest.contains(" = ") || rest.starts_with("[volume."))
            {
                rest.to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_example_is_right_and_shows_every_key() {
    let s = load_text(EXAMPLE).unwrap();
    assert_eq!(s.volumes.len(), 1);
    assert_eq!(s.volumes[0].max_age, Duration::from_secs(26 * 3600));
    let all = example_all_on();
    let s = load_text(&all).unwrap();
    assert_eq!(s.volumes.len(), 2);
    assert!(s.alerts.email.is_some() && s.web.as_ref().unwrap().tls.is_some());
    for key in super::super::env::known_keys() {
        let leaf = key.rsplit('.').next().unwrap();
        assert!(
            all.lines().any(|l| l.starts_with(&format!("{leaf} = "))),
            "packaging/config.example.toml does not show `{key}`"
        );
    }
}

#[test]
fn wrong_settings_say_what_to_do() {
    let base = "key = '/k'\nagents = ['pc1']\n";
    for (extra, says) in [
        ("[volume.a]\nschedule = 'daily 02:00'\n", "has no `source`"),
        (
            "[volume.a]\nsource = '/dev/sda'\nschedule = 'dialy 2:00'\n",
            "volume.a.schedule",
        ),
        (
            "[volume.a]\nsource = '/dev/sda'\nschedul = 'daily'\n",
            "unknown field `schedul`",
        ),
        (
            "[web]\nlisten = '0.0.0.0:7711'\n",
            "reachable from the network",
        ),
        ("[web]\nlisten = 'everywhere'\n", "not an IP:PORT"),
        ("[daemon]\ncheck_interval = '0s'\n", "more than 0"),
        ("[alerts]\nemail_to = ['a@b.c']\n", "smtp_host"),
        ("[alerts]\nwebhook = 'ftp://x'\n", "not an http"),
        ("colour = 'blue'\n", "unknown key 'colour'"),
        (
            "[volume.a]\nsource = '/a'\n[volume.b]\nsource = '/b'\nname = 'a'\n",
            "two [volume.*] tables",
        ),
    ] {
        let e = load_text(&format!("{base}{extra}")).unwrap_err();
        assert!(format!("{e:#}").contains(says), "{extra}: {e:#}");
        assert_eq!(
            crate::exit::code_of(&e),
            crate::exit::USAGE,
            "{extra}: {e:#}"
        );
    }
    let e = load_text("agents = ['pc1']\n").unwrap_err();
    assert!(e.to_string().contains("no key file"), "{e}");
}
