//! `sa-image daemon` as an operator runs it: real agents, a real HTTP receiver for webhooks and
//! healthchecks pings, a real SMTP server requiring STARTTLS, the Prometheus project's own parser,
//! headless Chromium, `kill -9`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sa_tests::cluster::{expect_fail, json};
use sa_tests::daemon::{chromium, html_text, json_lines, py_json, Daemon, PyServer};
use sa_tests::pki::make_pki;
use sa_tests::{wait, Cluster, ImageSpec, MIB};
use serde_json::Value;

/// Long enough for a scheduled run (every 20 s) and what follows it.
const JOB_WAIT: Duration = Duration::from_secs(90);

/// The config file's start: key, agents, cache, state, the page on a free loopback port.
fn base_config(c: &Cluster, daemon_extra: &str) -> String {
    let agents: Vec<String> = c
        .agents
        .iter()
        .map(|a| format!("\"{}\"", a.addr_str()))
        .collect();
    format!(
        "key = \"{key}\"\nagents = [{agents}]\ncache_dir = \"{cache}\"\n\
         [daemon]\nstate_dir = \"{state}\"\ncheck_interval = \"1s\"\nrepair_interval = \"5s\"\n\
         repair_after = \"1h\"\nscrub = \"never\"\n{daemon_extra}\n\
         [web]\nlisten = \"127.0.0.1:0\"\n",
        key = c.key.path.display(),
        agents = agents.join(", "),
        cache = c.path("cache").display(),
        state = c.path("state").display(),
    )
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).expect("write config");
    path.to_path_buf()
}

/// The journal's lines folded by job id: (start line, end lines).
fn journal(c: &Cluster) -> BTreeMap<u64, (Vec<Value>, Vec<Value>)> {
    let mut jobs: BTreeMap<u64, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
    for line in json_lines(&c.path("state").join("jobs.jsonl")) {
        assert_eq!(line["v"], 1, "journal line version: {line}");
        if let Some(s) = line.get("start") {
            let id = s["id"].as_u64().expect("id");
            jobs.entry(id).or_default().0.push(s.clone());
        }
        if let Some(e) = line.get("end") {
            let id = e["id"].as_u64().expect("id");
            jobs.entry(id).or_default().1.push(e.clone());
        }
    }
    jobs
}

/// Finished jobs of `kind` with `outcome`.
fn count(c: &Cluster, kind: &str, outcome: &str) -> usize {
    journal(c)
        .values()
        .filter(|(s, _)| s.first().is_some_and(|s| s["kind"] == kind))
        .filter(|(_, e)| e.first().is_some_and(|e| e["outcome"] == outcome))
        .count()
}

/// Webhook notices received: (event, key).
fn notices(hooks: &Path) -> Vec<(String, String)> {
    json_lines(hooks)
        .iter()
        .filter(|r| r["path"] == "/alert")
        .map(|r| {
            let b: Value = serde_json::from_str(r["body"].as_str().unwrap_or("")).expect("JSON");
            assert_eq!(b["source"], "sa-image", "{b}");
            (
                b["event"].as_str().unwrap_or("").to_string(),
                b["key"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn has_notice(hooks: &Path, event: &str, key: &str) -> bool {
    notices(hooks).iter().any(|(e, k)| e == event && k == key)
}

/// Ping paths received.
fn pings(hooks: &Path) -> Vec<String> {
    json_lines(hooks)
        .iter()
        .filter_map(|r| r["path"].as_str().map(String::from))
        .filter(|p| p.starts_with("/hc/"))
        .collect()
}

/// Mails received (the SMTP server's files), in order.
fn mails(dir: &Path) -> Vec<String> {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let p = e.path();
                    let n = p.file_stem()?.to_str()?.parse().ok()?;
                    (p.extension()? == "eml").then_some((n, p))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .map(|(_, p)| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

/// The daemon snapshots on its schedule and prunes after each snapshot, with hooks and
/// healthchecks pings; an agent killed raises alerts by webhook and by e-mail (STARTTLS), one per
/// condition, each resolved once the agent is back; killed with -9 mid-job and started again, its
/// journal neither loses nor doubles a job, and the interrupted snapshot runs again at start.
#[test]
fn scheduled_backups_alerts_and_a_kill_9() {
    let mut c = Cluster::start(6);
    ImageSpec::random(8 * MIB, 0x5eed_da01).write(&c.path("disk.img"));
    let hooks_file = c.path("hooks.jsonl");
    let hooks = PyServer::start("webhook_receiver.py", &[&hooks_file]);
    let pki = c.path("pki");
    make_pki(&pki, "smtp");
    let maildir = c.path("mail");
    std::fs::create_dir_all(&maildir).unwrap();
    let smtp = PyServer::start(
        "smtp_server.py",
        &[
            &pki.join("server-cert.pem"),
            &pki.join("server-key.pem"),
            &maildir,
        ],
    );
    let text = format!(
        "{base}\n[alerts]\nwebhook = [\"http://127.0.0.1:{hp}/alert\"]\n\
         email_to = [\"office@example.com\"]\nemail_from = \"backup@example.com\"\n\
         smtp_host = \"127.0.0.1\"\nsmtp_port = {sp}\nsmtp_security = \"starttls\"\n\
         smtp_ca_file = \"{ca}\"\n\
         [volume.vm]\nsource = \"{img}\"\nschedule = \"*:*:0/20\"\nkeep_last = 1\n\
         gc_grace = \"0s\"\nmax_age = \"1h\"\npre_hook = \"sleep 2\"\n\
         post_hook = \"echo $SA_IMAGE_JOB $SA_IMAGE_RESULT >> {posts}\"\n\
         healthcheck = \"http://127.0.0.1:{hp}/hc/vm\"\n",
        base = base_config(&c, "max_absence = \"3s\""),
        hp = hooks.port,
        sp = smtp.port,
        ca = pki.join("ca-cert.pem").display(),
        img = c.path("disk.img").display(),
        posts = c.path("post-hook.log").display(),
    );
    let config = write(&c.path("config.toml"), &text);
    let log = c.path("daemon.log");
    let mut d = Daemon::start(&config, &log, &[]);

    // Two scheduled snapshots, each followed by a prune; keep_last = 1 leaves one.
    wait::until_true(
        JOB_WAIT * 2,
        "two snapshots and a prune that removed one",
        || {
            assert!(d.is_running(), "the daemon exited:\n{}", d.log());
            count(&c, "snapshot", "ok") >= 2
                && journal(&c).values().any(|(s, e)| {
                    s[0]["kind"] == "prune"
                        && e.first().is_some_and(|e| e["figures"]["removed"] == 1)
                })
        },
    );
    let listed = json(&c.sa(&["list", "--json"]), "sa-image list");
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "pruned to one: {listed}"
    );
    let p = pings(&hooks_file);
    assert!(
        p.contains(&"/hc/vm/start".to_string()) && p.contains(&"/hc/vm".to_string()),
        "{p:?}"
    );
    let posts = std::fs::read_to_string(c.path("post-hook.log")).unwrap_or_default();
    assert!(
        posts.lines().filter(|l| l.ends_with(" ok")).count() >= 2,
        "post hooks: {posts}"
    );

    // An agent dies: its absence, the lost redundancy and the failing snapshots are alerted once.
    let gone = c.agents[3].addr_str();
    c.agents[3].kill();
    let (_, st) = c.status_json(&c.agents_arg());
    let gone_id = st["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["addr"] == gone.as_str()))
        .and_then(|a| a["id"].as_str())
        .expect("the killed agent in status")
        .to_string();
    let absent_key = format!("agent_absent/{gone_id}");
    let keys = [
        "margin_low/vm",
        "job_failed/snapshot/vm",
        absent_key.as_str(),
    ];
    wait::until_true(JOB_WAIT, "three alerts by webhook", || {
        keys.iter().all(|k| has_notice(&hooks_file, "alert", k))
    });
    assert!(pings(&hooks_file).contains(&"/hc/vm/fail".to_string()));
    wait::until_true(JOB_WAIT, "alerts by e-mail", || {
        mails(&maildir)
            .iter()
            .filter(|m| m.contains("ALERT:"))
            .count()
            >= 3
    });
    for m in mails(&maildir) {
        assert!(
            m.contains("X-Test-TLS: yes"),
            "mail not sent over STARTTLS:\n{m}"
        );
        assert!(m.contains("X-Test-Rcpt: office@example.com"), "{m}");
    }

    // It comes back: every alert is resolved, once.
    c.agents[3].restart();
    wait::until_true(JOB_WAIT, "three resolutions by webhook", || {
        keys.iter().all(|k| has_notice(&hooks_file, "resolved", k))
    });
    wait::until_true(JOB_WAIT, "resolutions by e-mail", || {
        mails(&maildir)
            .iter()
            .filter(|m| m.contains("RESOLVED:"))
            .count()
            >= 3
    });
    for k in keys {
        let n: Vec<_> = notices(&hooks_file)
            .into_iter()
            .filter(|(_, key)| key == k)
            .collect();
        assert_eq!(n.len(), 2, "one alert and one resolution for {k}: {n:?}");
    }

    // kill -9 while a snapshot runs (in its 2 s pre hook).
    let running = wait::until(JOB_WAIT, "a snapshot job running", || {
        journal(&c)
            .into_iter()
            .find(|(_, (s, e))| s[0]["kind"] == "snapshot" && e.is_empty())
            .map(|(id, _)| id)
    });
    d.kill9();
    let before = journal(&c);
    assert!(before[&running].1.is_empty());
    let mut d = Daemon::start(&config, &log, &[]);
    wait::until_true(JOB_WAIT, "the interrupted job ended and run again", || {
        let j = journal(&c);
        j[&running].1.len() == 1
            && j.range(running + 1..)
                .any(|(_, (s, e))| s[0]["trigger"] == "missed" && !e.is_empty())
    });
    let after = journal(&c);
    for (id, (starts, ends)) in &after {
        assert_eq!(starts.len(), 1, "job {id} started once: {starts:?}");
        assert!(ends.len() <= 1, "job {id} ended at most once: {ends:?}");
    }
    for (id, (starts, ends)) in &before {
        assert_eq!(&after[id].0, starts, "job {id} kept as it was");
        if !ends.is_empty() {
            assert_eq!(&after[id].1, ends, "job {id} kept as it was");
        }
    }
    assert_eq!(after[&running].1[0]["outcome"], "interrupted");
    let ids: Vec<u64> = after.keys().copied().collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "ids without gaps"
    );
    // No alert went out twice because of the restart.
    for k in keys {
        let n = notices(&hooks_file)
            .into_iter()
            .filter(|(_, key)| key == k)
            .count();
        assert_eq!(n, 2, "{k}");
    }

    // SIGTERM: a clean stop.
    d.signal("TERM");
    let status = d.wait(Duration::from_secs(60));
    assert!(status.success(), "daemon on SIGTERM: {status}\n{}", d.log());
    drop(smtp);
}

/// `/metrics` read by prometheus_client with exact values, the page in headless Chromium with a
/// PC down (screenshot kept in the test's output directory), a reload by SIGHUP, and `status
/// --max-age/--max-absence`.
#[test]
fn metrics_page_and_status_limits() {
    let mut c = Cluster::start(6);
    ImageSpec::random(8 * MIB, 0x5eed_da02).write(&c.path("disk.img"));
    let volume = |schedule: &str| {
        format!(
            "[volume.vm]\nsource = \"{}\"\nschedule = \"{schedule}\"\nkeep_last = 3\nmax_age = \"1h\"\n",
            c.path("disk.img").display()
        )
    };
    let config = c.path("config.toml");
    write(
        &config,
        &format!("{}\n{}", base_config(&c, ""), volume("*:*:0/10")),
    );
    let mut d = Daemon::start(&config, &c.path("daemon.log"), &[]);
    wait::until_true(JOB_WAIT, "a snapshot and its prune", || {
        assert!(d.is_running(), "the daemon exited:\n{}", d.log());
        count(&c, "prune", "ok") >= 1
    });
    // No more runs: the schedule is switched off by a reload.
    write(
        &config,
        &format!("{}\n{}", base_config(&c, ""), volume("never")),
    );
    d.signal("HUP");
    wait::until_true(JOB_WAIT, "the reload", || {
        d.log().contains("settings reloaded")
    });
    let jobs = journal(&c);
    let snaps = count(&c, "snapshot", "ok");
    assert_eq!((snaps, count(&c, "prune", "ok")), (1, 1), "{jobs:?}");

    let gone = c.agents[5].addr_str();
    c.agents[5].kill();
    // A repair pass that was talking to the agent when it died fails (job_failed/repair) until
    // the next pass, 5 s later, goes around it: wait for the margin alert alone.
    wait::until_true(
        JOB_WAIT,
        "the daemon sees the agent down, with the margin alert only",
        || {
            let v = d.status_json();
            v["status"]["agents"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|a| a["addr"] == gone.as_str() && a["reachable"] == false)
            }) && v["alerts"]
                .as_object()
                .is_some_and(|a| a.len() == 1 && a.contains_key("margin_low/vm"))
        },
    );

    // Metrics, parsed by the Prometheus project's Python parser.
    let (code, text) = d.get("/metrics", &[]);
    assert_eq!(code, 200);
    let samples = py_json("parse_metrics.py", &[], &text);
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let hits: Vec<&Value> = samples
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] == name)
            .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
            .collect();
        assert_eq!(hits.len(), 1, "one sample {name} {labels:?} in:\n{text}");
        hits[0]["value"].as_f64().unwrap()
    };
    let (_, cli) = c.status_json(&c.agents_arg());
    let snap = &cli["snapshots"][0];
    let job = jobs
        .values()
        .find(|(s, _)| s[0]["kind"] == "snapshot")
        .map(|(_, e)| e[0].clone())
        .unwrap();
    assert_eq!(value("sa_image_up", &[]), 1.0);
    assert_eq!(value("sa_image_check_success", &[]), 1.0);
    assert_eq!(value("sa_image_agents", &[]), 6.0);
    assert_eq!(value("sa_image_agents_up", &[]), 5.0);
    assert_eq!(value("sa_image_agent_up", &[("addr", &gone)]), 0.0);
    assert_eq!(value("sa_image_volume_snapshots", &[("volume", "vm")]), 1.0);
    assert_eq!(value("sa_image_volume_margin", &[("volume", "vm")]), 1.0);
    assert_eq!(
        value("sa_image_volume_parity_shards", &[("volume", "vm")]),
        2.0
    );
    assert_eq!(
        value(
            "sa_image_volume_newest_snapshot_timestamp_seconds",
            &[("volume", "vm")]
        ),
        snap["created_unix"].as_f64().unwrap()
    );
    for a in cli["agents"].as_array().unwrap() {
        let addr = a["addr"].as_str().unwrap();
        if let Some(used) = a["used"].as_f64() {
            assert_eq!(
                value("sa_image_agent_used_bytes", &[("addr", addr)]),
                used,
                "{addr}"
            );
        }
    }
    let ok = [("kind", "snapshot"), ("volume", "vm"), ("outcome", "ok")];
    assert_eq!(value("sa_image_jobs_total", &ok), 1.0);
    let pruned = [("kind", "prune"), ("volume", "vm"), ("outcome", "ok")];
    assert_eq!(value("sa_image_jobs_total", &pruned), 1.0);
    assert_eq!(
        value("sa_image_snapshot_last_bytes_sent", &[("volume", "vm")]),
        job["figures"]["bytes_sent"].as_f64().unwrap()
    );
    assert_eq!(
        value(
            "sa_image_job_last_success",
            &[("kind", "snapshot"), ("volume", "vm")]
        ),
        1.0
    );
    assert_eq!(value("sa_image_scrub_bad_shards", &[]), 0.0);
    assert_eq!(value("sa_image_alerts_open", &[]), 1.0);

    // The page, in headless Chromium, on a phone-sized window.
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("daemon-page");
    std::fs::create_dir_all(&out).unwrap();
    let png = out.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let dom = chromium(&d.url, &png, &c.path("chromium-profile"));
    eprintln!("[page screenshot] {}", png.display());
    let page = html_text(&dom);
    assert!(page.contains("Backup status"), "{page}");
    assert!(page.contains("vm Last backup"), "{page}");
    assert!(page.contains("survives 1 more PC lost"), "{page}");
    assert!(page.contains("PCs (5 of 6 up)"), "{page}");
    let at = page.find(&gone).expect("the down PC on the page");
    let entry = &page[at..(at + 80).min(page.len())];
    assert!(entry.contains("DOWN · last seen"), "{entry}");
    assert!(
        entry.contains(" ago") || entry.contains("just now"),
        "{entry}"
    );

    // status --max-age / --max-absence (exit 4), against the same sightings.
    let cache = c.path("cache");
    let status = |extra: &[&str]| {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("status"),
            OsStr::new("--cache-dir"),
            cache.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        c.sa(&args).status.code()
    };
    assert_eq!(
        status(&["--max-age", "1h", "--max-absence", "1h"]),
        Some(2),
        "degraded only"
    );
    assert_eq!(status(&["--max-absence", "0s"]), Some(4), "absent too long");
    assert_eq!(status(&["--max-age", "0s"]), Some(4), "too old");
    let e = expect_fail(
        &c.sa(&["status", "--max-age", "soon"]),
        Some(64),
        "status --max-age soon",
    );
    assert!(e.contains("--max-age"), "{e}");

    d.signal("TERM");
    assert!(d.wait(Duration::from_secs(60)).success());
}

/// Beyond loopback the page needs HTTPS and a token; here (on loopback, with both configured)
/// a missing or wrong token gets 401, the right one (header or login form) gets the page; a
/// setting that would expose the page without them is refused before anything starts.
#[test]
fn login_token_over_https() {
    let c = Cluster::start(1);
    let pki = c.path("pki");
    make_pki(&pki, "web");
    let token = "correct-horse-battery-staple-42";
    let token_file = c.path("web-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\ntoken_file = \"{}\"\n",
        pki.join("server-cert.pem").display(),
        pki.join("server-key.pem").display(),
        token_file.display()
    );
    let config = write(
        &c.path("config.toml"),
        &format!("{}{tls}", base_config(&c, "")),
    );

    // Exposed without TLS and token: refused, with what to do.
    let open = write(
        &c.path("open.toml"),
        &base_config(&c, "").replace("127.0.0.1:0", "0.0.0.0:0"),
    );
    let args = [
        OsStr::new("daemon"),
        OsStr::new("--check"),
        OsStr::new("--config"),
        open.as_os_str(),
    ];
    let e = expect_fail(&c.sa_bare(&args), Some(64), "daemon on 0.0.0.0 without TLS");
    assert!(e.contains("tls_cert") && e.contains("token_file"), "{e}");
    // A wrong SA_IMAGE_* variable is named.
    let args = [
        OsStr::new("daemon"),
        OsStr::new("--check"),
        OsStr::new("--config"),
        config.as_os_str(),
    ];
    let mut cmd = std::process::Command::new(sa_tests::bins::bin("sa-image"));
    cmd.args(args).env("SA_IMAGE_DAEMON__CHECK_INTERVL", "5s");
    let out = sa_tests::proc::run(cmd, c.dir(), Duration::from_secs(30));
    let e = expect_fail(&out, Some(64), "a misspelt variable");
    assert!(
        e.contains("sa_image_daemon__check_intervl names no setting"),
        "{e}"
    );

    let d = Daemon::start(&config, &c.path("daemon.log"), &[]);
    assert!(d.url.starts_with("https://127.0.0.1:"), "{}", d.url);
    let ca = pki.join("ca-cert.pem");
    let get = |path: &str, extra: &[&str]| -> Value {
        let url = format!("{}{}", d.url, path.trim_start_matches('/'));
        let mut args = vec![url.as_str(), "--ca", ca.to_str().unwrap()];
        args.extend_from_slice(extra);
        py_json("http_get.py", &args, "")
    };
    let r = get("/", &[]);
    assert_eq!(r["status"], 401, "{r}");
    assert!(r["body"].as_str().unwrap().contains("Login token"), "{r}");
    let r = get(
        "/metrics",
        &["--header", "Authorization: Bearer wrong-token-0123456789"],
    );
    assert_eq!(r["status"], 401, "{r}");
    let bearer = format!("Authorization: Bearer {token}");
    let r = get("/metrics", &["--header", &bearer]);
    assert_eq!(r["status"], 200, "{r}");
    assert!(r["body"].as_str().unwrap().contains("sa_image_up 1"), "{r}");
    let r = get("/login", &["--form", "token=not-it-at-all-nope"]);
    assert_eq!(r["status"], 401, "{r}");
    let r = get("/login", &["--form", &format!("token={token}")]);
    assert_eq!(r["status"], 303, "{r}");
    let cookie = r["headers"]["set-cookie"]
        .as_str()
        .expect("a session cookie")
        .to_string();
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap();
    let r = get("/", &["--header", &format!("Cookie: {session}")]);
    assert_eq!(r["status"], 200, "{r}");
    assert!(r["body"].as_str().unwrap().contains("Backup status"), "{r}");
    assert!(
        !r["body"].as_str().unwrap().contains(token),
        "the token never appears"
    );
}

/// Under systemd (`Type=notify`): READY=1 once started; a SIGHUP with wrong settings keeps the
/// ones in force and says so; SIGTERM says STOPPING=1 and exits 0.
#[test]
fn systemd_readiness_reload_and_stop() {
    use std::os::unix::net::UnixDatagram;
    let c = Cluster::start(1);
    let sock_path = c.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let config = write(&c.path("config.toml"), &base_config(&c, ""));
    let sp = sock_path.to_str().unwrap();
    let mut d = Daemon::start(&config, &c.path("daemon.log"), &[("NOTIFY_SOCKET", sp)]);
    assert!(recv().contains("READY=1"));
    write(
        &config,
        &format!(
            "{}[volume.x]\nschedule = \"daily 02:00\"\n",
            base_config(&c, "")
        ),
    );
    d.signal("HUP");
    assert!(recv().contains("RELOADING=1"));
    assert!(recv().contains("READY=1"));
    wait::until_true(
        Duration::from_secs(30),
        "the reload error on the page",
        || {
            d.status_json()["events"].as_array().is_some_and(|e| {
                e.iter().any(|e| {
                    e["text"].as_str().is_some_and(|t| {
                        t.contains("settings are wrong") && t.contains("has no `source`")
                    })
                })
            })
        },
    );
    assert!(d.is_running());
    d.signal("TERM");
    assert!(recv().contains("STOPPING=1"));
    assert!(d.wait(Duration::from_secs(30)).success());
}
