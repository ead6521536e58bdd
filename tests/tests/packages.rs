//! The Debian packages (packaging/debian/build.sh) installed on this machine the way an admin
//! would: `dpkg -i`, the systemd units verified, the installed binaries run, the man pages
//! rendered, the completions found by bash, zsh and fish, the example configs used as they
//! ship, the agent run as its own user over its state directory and holding real shards,
//! `dpkg -r` keeping them, and `dpkg -i` again serving them. Root on Debian only (it installs
//! system-wide; it says why when it skips); everything is purged at the end, also on failure.
//!
//! This machine may not run systemd as its PID 1, so the units are checked offline
//! (`systemd-analyze verify`, `security --offline`) and their `ExecStart` is run as the unit
//! says (user, config), without the sandbox systemd would add.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sa_tests::agent::fresh_ip;
use sa_tests::debian::{self, expect, files, run, status, Installed, AGENT_STATE, AGENT_USER};
use sa_tests::proc::Proc;
use sa_tests::{scan, Cluster, ImageSpec, MIB};

#[test]
fn debian_packages_install_work_and_remove_cleanly() {
    if let Some(why) = debian::skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    for tool in [
        "systemd-analyze",
        "man",
        "readelf",
        "setpriv",
        "zsh",
        "fish",
    ] {
        assert!(
            debian::on_path(tool),
            "{tool} is missing: ./test.sh installs it"
        );
    }
    let pkgs = Installed::new(debian::find_debs());
    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        scratch.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod scratch");

    installed_files();
    units_verify();
    binaries_run(scratch.path());
    man_pages();
    completions();

    // Five agents from the build plus the installed one, run from its example config as its
    // own user; a snapshot through the installed sa-image with its example config.
    let cluster = Cluster::start(5);
    let agent_conf = agent_config(scratch.path(), &cluster.key.owner);
    let mut agent = InstalledAgent::start(&agent_conf);
    let sa_conf = sa_image_config(scratch.path(), &cluster, &agent.addr);
    let image = ImageSpec::random(16 * MIB, 14).write(&scratch.path().join("disk.img"));
    let snap = expect(
        sa(&["snapshot", path(&image.path), "--config", path(&sa_conf)]),
        "the installed sa-image's snapshot with the example config",
    );
    let shards = scan::shard_files(Path::new(AGENT_STATE));
    assert!(
        !shards.is_empty(),
        "the installed agent got no shards:\n{snap}"
    );
    let identity = std::fs::read(Path::new(AGENT_STATE).join("identity.key")).expect("identity");
    daemon_starts(scratch.path(), &sa_conf);
    agent.stop();

    // dpkg -r: binaries and units gone; conffiles, user and shards stay.
    let units = unit_paths();
    let removed = pkgs.dpkg("-r");
    assert!(!removed.contains("warning"), "dpkg -r warned:\n{removed}");
    for p in debian::PACKAGES {
        assert_eq!(status(p), "deinstall ok config-files", "{p} after dpkg -r");
    }
    for gone in ["/usr/bin/sa-image", "/usr/bin/shard-agent"].map(PathBuf::from) {
        assert!(!gone.exists(), "{} left after dpkg -r", gone.display());
    }
    for unit in &units {
        assert!(!unit.exists(), "{} left after dpkg -r", unit.display());
    }
    for kept in [
        "/etc/sa-image/config.toml",
        "/etc/sa-image/shard-agent.toml",
    ] {
        assert!(
            Path::new(kept).exists(),
            "conffile {kept} removed by dpkg -r"
        );
    }
    assert!(debian::user_exists(AGENT_USER), "dpkg -r removed the user");
    assert_eq!(scan::shard_files(Path::new(AGENT_STATE)), shards);

    // dpkg -i again: the same agent (identity) serves the same shards; verify reads them all.
    pkgs.install();
    let mut agent = InstalledAgent::start(&agent_conf);
    let verify = run(sa(&["verify", "latest", "--config", path(&sa_conf)]));
    assert_eq!(
        verify.status.code(),
        Some(0),
        "verify after reinstall:\n{}",
        sa_tests::cluster::shown(&verify)
    );
    let again = std::fs::read(Path::new(AGENT_STATE).join("identity.key")).expect("identity");
    assert_eq!(
        again, identity,
        "the agent's identity changed over a reinstall"
    );
    agent.stop();

    // dpkg --purge: conffiles go, the shards (other machines' backups) still stay.
    let purged = pkgs.dpkg("--purge");
    assert!(
        purged.contains("the shards stay in /var/lib/shard-agent"),
        "purge did not say where the shards are:\n{purged}"
    );
    for p in debian::PACKAGES {
        assert_eq!(status(p), "", "{p} after dpkg --purge");
    }
    for gone in [
        "/etc/sa-image/config.toml",
        "/etc/sa-image/shard-agent.toml",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after dpkg --purge");
    }
    assert_eq!(scan::shard_files(Path::new(AGENT_STATE)), shards);
}

/// Binaries stripped, conffiles registered, the agent's user and directory made.
fn installed_files() {
    for bin in ["/usr/bin/sa-image", "/usr/bin/shard-agent"] {
        let sections = expect(cmd("readelf", &["-S", "--wide", bin]), "readelf -S");
        assert!(
            !sections.contains(".debug_") && !sections.contains(".symtab"),
            "{bin} is not stripped:\n{sections}"
        );
        let size = std::fs::metadata(bin).expect("stat").len();
        eprintln!("{bin}: {size} bytes");
    }
    let conffiles = expect(
        cmd(
            "dpkg-query",
            &["-W", "-f=${Conffiles}\n", "sa-image", "shard-agent"],
        ),
        "dpkg-query Conffiles",
    );
    for conf in [
        "/etc/sa-image/config.toml",
        "/etc/sa-image/shard-agent.toml",
    ] {
        assert!(
            conffiles.contains(conf),
            "{conf} is no conffile:\n{conffiles}"
        );
    }
    let user = expect(cmd("getent", &["passwd", AGENT_USER]), "getent passwd");
    let fields: Vec<&str> = user.trim().split(':').collect();
    let uid: u32 = fields[2].parse().expect("uid");
    assert!(uid < 1000, "{AGENT_USER} is no system user: {user}");
    assert_eq!(fields[5], AGENT_STATE, "home: {user}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "shell: {user}");
    let dir = expect(cmd("stat", &["-c", "%U %a", AGENT_STATE]), "stat");
    assert_eq!(dir.trim(), format!("{AGENT_USER} 700"));
}

/// The installed unit files.
fn unit_paths() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = debian::PACKAGES
        .iter()
        .flat_map(|p| files(p))
        .filter(|f| f.extension().is_some_and(|e| e == "service"))
        .collect();
    units.sort();
    let names: Vec<_> = units.iter().filter_map(|u| u.file_name()).collect();
    assert_eq!(names, ["sa-image-daemon.service", "shard-agent.service"]);
    units
}

/// `systemd-analyze verify` on both units, and the agent's sandbox scored offline.
fn units_verify() {
    for unit in unit_paths() {
        let name = unit.file_name().unwrap().to_string_lossy().into_owned();
        // Documentation=man:shard-agent(1) is checked only when the package has the page.
        let man = if name == "shard-agent.service" && !has_man_page("shard-agent") {
            eprintln!("note: shard-agent has no man page yet (see build.sh); verify --man=no");
            "--man=no"
        } else {
            "--man=yes"
        };
        let out = run(cmd("systemd-analyze", &["verify", man, path(&unit)]));
        let said = sa_tests::cluster::shown(&out);
        assert!(out.status.success(), "verify {name}:\n{said}");
        assert!(out.stderr.is_empty(), "verify {name} complained:\n{said}");
    }
    let agent = unit_paths()
        .into_iter()
        .find(|u| u.ends_with("shard-agent.service"));
    let agent = agent.expect("agent unit");
    // Exposure 0 (locked down) to 10 (unsafe), threshold in tenths: 2.0 and more fails.
    let out = run(cmd(
        "systemd-analyze",
        &["security", "--offline=true", "--threshold=19", path(&agent)],
    ));
    let report = sa_tests::cluster::shown(&out);
    assert!(
        out.status.success(),
        "the agent's sandbox is weaker than 1.9:\n{report}"
    );
    let score = report
        .lines()
        .find(|l| l.contains("Overall exposure level"));
    eprintln!("{}", score.expect("no overall exposure level").trim());
}

/// The installed binaries run: the README's demo, and the agent's help.
fn binaries_run(scratch: &Path) {
    let mut demo = cmd("/usr/bin/sa-image", &["demo", "--size", "64MiB"]);
    demo.current_dir(scratch);
    let out = sa_tests::proc::run(demo, scratch, Duration::from_secs(300));
    let said = sa_tests::cluster::shown(&out);
    assert!(out.status.success(), "installed demo failed:\n{said}");
    assert!(said.contains("demo passed"), "{said}");
    let help = expect(
        cmd("/usr/bin/shard-agent", &["--help"]),
        "shard-agent --help",
    );
    assert!(help.contains("--owner") && help.contains("--dir"), "{help}");
}

fn has_man_page(package: &str) -> bool {
    files(package)
        .iter()
        .any(|f| f.to_string_lossy().contains("/man/man1/"))
}

/// `man` finds each program's page by name, and every page renders without a groff warning.
fn man_pages() {
    for package in debian::PACKAGES {
        if !has_man_page(package) {
            eprintln!("note: {package} has no man page yet (see build.sh): not rendered");
            continue;
        }
        let found = expect(cmd("man", &["-w", package]), "man -w");
        assert_eq!(found.trim(), format!("/usr/share/man/man1/{package}.1.gz"));
        let pages: Vec<PathBuf> = files(package)
            .into_iter()
            .filter(|f| f.to_string_lossy().contains("/man/man1/"))
            .collect();
        for page in &pages {
            let mut man = cmd("man", &["--warnings", "-l", path(page)]);
            man.env("MANPAGER", "cat").env("MANWIDTH", "100");
            let out = run(man);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "man -l {}", page.display());
            assert!(
                out.stderr.is_empty(),
                "man -l {} warned:\n{}",
                page.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                text.contains("SYNOPSIS") && text.contains(package),
                "{text}"
            );
        }
        eprintln!("{package}: {} man pages render", pages.len());
    }
    let main = run(man_cat("sa-image"));
    let text = String::from_utf8_lossy(&main.stdout);
    assert!(
        text.contains("sa-image-snapshot(1)"),
        "no subcommand pages:\n{text}"
    );
}

fn man_cat(name: &str) -> Command {
    let mut man = cmd("man", &[name]);
    man.env("MANPAGER", "cat");
    man
}

/// bash (through bash-completion's loader), zsh (compinit over its fpath) and fish each find
/// the installed completions by themselves and complete a subcommand from its start.
fn completions() {
    for program in debian::PACKAGES {
        let has = files(program)
            .iter()
            .any(|f| f.to_string_lossy().contains("bash-completion"));
        if !has {
            eprintln!("note: {program} has no completions yet (see build.sh)");
            continue;
        }
        let (word, want) = if program == "sa-image" {
            ("snap", "snapshot")
        } else {
            ("--ow", "--owner")
        };
        let bash = format!(
            "source /usr/share/bash-completion/bash_completion; _completion_loader {program}; \
             f=$(complete -p {program} | sed -E 's/.*-F ([^ ]+).*/\\1/'); \
             COMP_WORDS=({program} {word}); COMP_CWORD=1; COMP_LINE='{program} {word}'; \
             COMP_POINT=${{#COMP_LINE}}; \"$f\" {program} {word} {program}; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        let got = expect(cmd("bash", &["-c", &bash]), "bash completion");
        assert!(
            got.lines().any(|l| l == want),
            "bash completed {word} as:\n{got}"
        );

        let zsh =
            format!("autoload -Uz compinit && compinit -u -D && print -r -- $_comps[{program}]");
        let got = expect(cmd("zsh", &["-fc", &zsh]), "zsh compinit");
        assert_eq!(
            got.trim(),
            format!("_{program}"),
            "zsh found no completion function"
        );

        // fish finds vendor completions through its own config (not --no-config); an empty
        // home keeps a user's config out.
        let home = tempfile::tempdir().expect("tempdir");
        let mut fish = cmd("fish", &["-c", &format!("complete -C'{program} {word}'")]);
        fish.env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path())
            .env("XDG_DATA_HOME", home.path());
        let got = expect(fish, "fish complete");
        assert!(
            got.lines().any(|l| l.split('\t').next() == Some(want)),
            "fish completed {word} as:\n{got}"
        );
    }
}

/// A copy of the shipped agent config with every commented key turned on, the owner set and a
/// loopback address to listen on: what an admin gets by editing the file.
fn agent_config(scratch: &Path, owner: &str) -> PathBuf {
    let listen = format!("{}:0", fresh_ip());
    let text = edited(
        "/etc/sa-image/shard-agent.toml",
        &[
            ("owner", format!("{owner:?}")),
            ("listen", format!("{listen:?}")),
        ],
    );
    let conf = scratch.join("shard-agent.toml");
    std::fs::write(&conf, text).expect("write agent config");
    conf
}

/// A copy of the shipped sa-image config with every commented key turned on, and the test's
/// key and agents.
fn sa_image_config(scratch: &Path, cluster: &Cluster, installed_agent: &str) -> PathBuf {
    let mut agents: Vec<String> = cluster.agents.iter().map(|a| a.addr_str()).collect();
    agents.push(installed_agent.to_string());
    let text = edited(
        "/etc/sa-image/config.toml",
        &[
            (
                "key",
                format!("{:?}", cluster.key.path.display().to_string()),
            ),
            ("agents", format!("{agents:?}")),
        ],
    );
    let conf = scratch.join("config.toml");
    std::fs::write(&conf, text).expect("write sa-image config");
    conf
}

/// `file` with `#key = value` lines uncommented and the values of `set` put in.
fn edited(file: &str, set: &[(&str, String)]) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut out = String::new();
    let mut seen = Vec::new();
    for line in text.lines() {
        let line = match line.strip_prefix('#') {
            Some(rest) if is_key_line(rest) => rest,
            _ => line,
        };
        let key = line.split(" = ").next().unwrap_or_default();
        match set.iter().find(|(k, _)| is_key_line(line) && *k == key) {
            Some((k, v)) => {
                out.push_str(&format!("{k} = {v}\n"));
                seen.push(*k);
            }
            None => out.push_str(&format!("{line}\n")),
        }
    }
    for (k, _) in set {
        assert!(
            seen.contains(k),
            "{file} has no `{k}` line to fill in:\n{text}"
        );
    }
    out
}

fn is_key_line(line: &str) -> bool {
    line.split_once(" = ").is_some_and(|(k, _)| {
        !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
    })
}

/// The installed shard-agent run as its unit runs it: as the user shard-agent, with the config.
struct InstalledAgent {
    proc: Proc,
    addr: String,
}

impl InstalledAgent {
    fn start(conf: &Path) -> InstalledAgent {
        let mut agent = cmd(
            "setpriv",
            &[
                "--reuid",
                AGENT_USER,
                "--regid",
                AGENT_USER,
                "--init-groups",
                "/usr/bin/shard-agent",
                "--config",
                path(conf),
            ],
        );
        agent.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut proc = Proc::spawn(agent, "installed shard-agent");
        let stdout = proc.child().stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the installed agent did not say `listening on` within 30s");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the installed agent said {line:?}"))
            .to_string();
        // Started again after a reinstall, it listens where the snapshot found it.
        pin_listen(conf, &addr);
        InstalledAgent { proc, addr }
    }

    fn stop(&mut self) {
        self.proc.kill();
    }
}

fn pin_listen(conf: &Path, addr: &str) {
    let text = std::fs::read_to_string(conf).expect("read config");
    let text: String = text
        .lines()
        .map(|l| match l.starts_with("listen = ") {
            true => format!("listen = {addr:?}\n"),
            false => format!("{l}\n"),
        })
        .collect();
    std::fs::write(conf, text).expect("write config");
}

/// The daemon unit's command, run as systemd would start it (readiness through NOTIFY_SOCKET,
/// stop with SIGTERM).
fn daemon_starts(scratch: &Path, conf: &Path) {
    let unit = std::fs::read_to_string("/lib/systemd/system/sa-image-daemon.service")
        .expect("daemon unit");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let words: Vec<String> = exec
        .split_whitespace()
        .map(|w| match w {
            "/etc/sa-image/config.toml" => path(conf).to_string(),
            w => w.to_string(),
        })
        .collect();
    let socket_path = scratch.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut daemon = Command::new(&words[0]);
    daemon
        .args(&words[1..])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("XDG_CACHE_HOME", scratch.join("cache"))
        .stdout(Stdio::null());
    let mut daemon = Proc::spawn(daemon, "sa-image daemon");
    sa_tests::wait::until(Duration::from_secs(60), "the daemon's READY=1", || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
            .then_some(())
    });
    expect(
        cmd("kill", &["-TERM", &daemon.id().to_string()]),
        "kill -TERM",
    );
    let status = daemon.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "the daemon did not stop cleanly on SIGTERM: {status}"
    );
}

fn sa(args: &[&str]) -> Command {
    cmd("/usr/bin/sa-image", args)
}

fn cmd(program: &str, args: &[&str]) -> Command {
    debian::command(program, args)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
