//! Key files: passphrase-wrapped keys (from a file, or piped in as a terminal would be asked),
//! the recovery text typed back in with `key import`, and key files others may read refused.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use sa_tests::bins::bin;
use sa_tests::cluster::{expect_fail, expect_ok, run_sa, ClusterOptions};
use sa_tests::{json, Cluster, ImageSpec, MIB};

/// Runs `sa-image ARGS` with `input` on standard input.
fn sa_stdin<S: AsRef<OsStr>>(args: &[S], input: &str, dir: &Path) -> Output {
    let mut child = Command::new(bin("sa-image"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start sa-image");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .expect("cannot write to sa-image's stdin");
    child.wait_with_output().expect("cannot wait for sa-image")
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).expect("cannot write a test file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("cannot chmod a test file");
}

fn last_line(text: &str) -> String {
    text.lines().last().unwrap_or("").trim().to_string()
}

fn recovery_text(keygen_stdout: &str) -> String {
    keygen_stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("sakey1-"))
        .unwrap_or_else(|| panic!("no recovery text in:\n{keygen_stdout}"))
        .to_string()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn passphrase_wrapped_key_backs_up_and_restores() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let key = scratch.path().join("wrapped.key");
    let pass = scratch.path().join("pass");
    write_private(&pass, "correct horse battery staple\n");
    let out = run_sa(
        [
            OsStr::new("keygen"),
            OsStr::new("--out"),
            key.as_os_str(),
            OsStr::new("--passphrase-file"),
            pass.as_os_str(),
        ],
        scratch.path(),
    );
    let printed = expect_ok(&out, "keygen --passphrase-file");
    let owner = last_line(&printed);
    let recovery = recovery_text(&printed);
    assert_eq!(mode(&key), 0o600, "key file mode");
    let stored = std::fs::read_to_string(&key).expect("read key file");
    assert!(
        stored.starts_with("sawkey1-"),
        "not a wrapped key: {stored}"
    );
    let hex_digits: String = recovery["sakey1-".len()..]
        .chars()
        .filter(|c| *c != '-')
        .collect();
    assert!(
        !stored.contains(&hex_digits[..64]),
        "the wrapped key file holds the key in the clear"
    );

    // Without a passphrase (and no terminal to ask on): a clear error naming the flag.
    let out = run_sa(
        [OsStr::new("owner-id"), OsStr::new("--key"), key.as_os_str()],
        scratch.path(),
    );
    let msg = expect_fail(&out, Some(1), "owner-id without passphrase");
    assert!(msg.contains("--passphrase-file"), "{msg}");
    // A wrong passphrase is told apart from a broken file.
    let wrong = scratch.path().join("wrong");
    write_private(&wrong, "correct horse battery stapler\n");
    let out = run_sa(
        [
            OsStr::new("owner-id"),
            OsStr::new("--key"),
            key.as_os_str(),
            OsStr::new("--passphrase-file"),
            wrong.as_os_str(),
        ],
        scratch.path(),
    );
    let msg = expect_fail(&out, Some(1), "owner-id with a wrong passphrase");
    assert!(msg.contains("wrong passphrase"), "{msg}");

    // With it, the key works for a real snapshot and restore.
    let c = Cluster::start_with(ClusterOptions {
        agents: 3,
        owner: Some(owner.clone()),
        ..Default::default()
    });
    let image = ImageSpec::random(4 * MIB, 7).write(&c.path("disk.img"));
    let agents = c.agents_arg();
    let with_pass = |args: &[&OsStr]| {
        let mut all = args.to_vec();
        all.extend([OsStr::new("--passphrase-file"), pass.as_os_str()]);
        c.sa_with(&all, &key, &agents)
    };
    let snap = json(
        &with_pass(&[
            OsStr::new("snapshot"),
            image.path.as_os_str(),
            OsStr::new("--data-shards"),
            OsStr::new("2"),
            OsStr::new("--parity-shards"),
            OsStr::new("1"),
            OsStr::new("--json"),
        ]),
        "snapshot with a wrapped key",
    );
    let id = snap["snapshot"].as_str().expect("snapshot id").to_string();
    let target = c.path("restored.img");
    json(
        &with_pass(&[
            OsStr::new("restore"),
            OsStr::new(&id),
            OsStr::new("--to"),
            target.as_os_str(),
            OsStr::new("--json"),
        ]),
        "restore with a wrapped key",
    );
    assert_eq!(sa_tests::sha256(&target), image.sha256(), "restored bytes");

    // The recovery text alone (the passphrase forgotten) still opens the backups.
    let plain = c.path("from-recovery.key");
    let out = sa_stdin(
        &[
            OsStr::new("key"),
            OsStr::new("import"),
            OsStr::new("--out"),
            plain.as_os_str(),
        ],
        &format!("{recovery}\n"),
        c.dir(),
    );
    assert_eq!(last_line(&expect_ok(&out, "key import")), owner);
    let listed = json(
        &c.sa_with(&["list", "--json"], &plain, &agents),
        "list with the imported key",
    );
    assert!(listed.to_string().contains(&id), "{listed}");
}

#[test]
fn passphrase_can_be_piped_in() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let key = scratch.path().join("k");
    let out = sa_stdin(
        &[
            OsStr::new("keygen"),
            OsStr::new("--passphrase"),
            OsStr::new("--out"),
            key.as_os_str(),
        ],
        "s3cret words\n",
        scratch.path(),
    );
    let owner = last_line(&expect_ok(&out, "keygen --passphrase"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("passphrase"),
        "no prompt shown"
    );
    let pass = scratch.path().join("p");
    write_private(&pass, "s3cret words");
    let out = run_sa(
        [
            OsStr::new("owner-id"),
            OsStr::new("--key"),
            key.as_os_str(),
            OsStr::new("--passphrase-file"),
            pass.as_os_str(),
        ],
        scratch.path(),
    );
    assert_eq!(last_line(&expect_ok(&out, "owner-id")), owner);
    // An empty passphrase is refused and writes nothing.
    let none = scratch.path().join("none");
    let out = sa_stdin(
        &[
            OsStr::new("keygen"),
            OsStr::new("--passphrase"),
            OsStr::new("--out"),
            none.as_os_str(),
        ],
        "\n",
        scratch.path(),
    );
    expect_fail(&out, Some(1), "keygen with an empty passphrase");
    assert!(
        !none.exists(),
        "a key file was written without a passphrase"
    );
}

#[test]
fn recovery_text_imports_from_stdin_or_flag() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let dir = scratch.path();
    let key = dir.join("orig");
    let out = run_sa(
        [OsStr::new("keygen"), OsStr::new("--out"), key.as_os_str()],
        dir,
    );
    let printed = expect_ok(&out, "keygen");
    let owner = last_line(&printed);
    let text = recovery_text(&printed);

    // Typed back in over two lines, upper case: whitespace and case do not matter.
    let (a, b) = text.split_at(30);
    let from_stdin = dir.join("stdin.key");
    let out = sa_stdin(
        &[
            OsStr::new("key"),
            OsStr::new("import"),
            OsStr::new("--out"),
            from_stdin.as_os_str(),
        ],
        &format!("{}\n{}\n", a, b.to_uppercase()),
        dir,
    );
    assert_eq!(last_line(&expect_ok(&out, "key import (stdin)")), owner);
    assert_eq!(mode(&from_stdin), 0o600);
    assert_eq!(
        std::fs::read_to_string(&from_stdin).expect("read").trim(),
        text
    );

    // From --text, wrapped under a passphrase.
    let pass = dir.join("pass");
    write_private(&pass, "pw for import\n");
    let wrapped = dir.join("wrapped.key");
    let out = run_sa(
        [
            OsStr::new("key"),
            OsStr::new("import"),
            OsStr::new("--text"),
            OsStr::new(&text),
            OsStr::new("--out"),
            wrapped.as_os_str(),
            OsStr::new("--passphrase-file"),
            pass.as_os_str(),
        ],
        dir,
    );
    assert_eq!(last_line(&expect_ok(&out, "key import --text")), owner);
    assert!(std::fs::read_to_string(&wrapped)
        .expect("read")
        .starts_with("sawkey1-"));

    // A mistyped digit is caught by the checksum; nothing is written.
    let mut typo: Vec<char> = text.chars().collect();
    typo[10] = if typo[10] == '0' { '1' } else { '0' };
    let typo: String = typo.into_iter().collect();
    let bad = dir.join("bad.key");
    let out = sa_stdin(
        &[
            OsStr::new("key"),
            OsStr::new("import"),
            OsStr::new("--out"),
            bad.as_os_str(),
        ],
        &format!("{typo}\n"),
        dir,
    );
    let msg = expect_fail(&out, Some(1), "key import of a mistyped key");
    assert!(msg.contains("checksum"), "{msg}");
    assert!(!bad.exists());
    // An existing key file is never overwritten without --force.
    let out = run_sa(
        [
            OsStr::new("key"),
            OsStr::new("import"),
            OsStr::new("--text"),
            OsStr::new(&text),
            OsStr::new("--out"),
            key.as_os_str(),
        ],
        dir,
    );
    expect_fail(&out, Some(1), "key import over an existing key");
}

#[test]
fn key_files_others_can_read_are_refused() {
    let c = Cluster::start(1);
    let key = &c.key.path;
    assert_eq!(mode(key), 0o600, "keygen writes 0600");
    for bad_mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(bad_mode)).expect("chmod");
        for cmd in [&["owner-id"][..], &["list"][..]] {
            let out = if cmd[0] == "owner-id" {
                c.sa_bare(&["owner-id", "--key", &key.display().to_string()])
            } else {
                c.sa(cmd)
            };
            let msg = expect_fail(&out, Some(1), "a key file others may read");
            let fix = format!("chmod 600 {}", key.display()).to_lowercase();
            assert!(
                msg.contains(&fix),
                "the error must name the fix `{fix}`: {msg}"
            );
        }
    }
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    json(
        &c.sa(&["list", "--json"]),
        "list with the key made private again",
    );

    // A passphrase file others may read is refused the same way.
    let pass = c.path("pass");
    std::fs::write(&pass, "pw\n").expect("write");
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let wrapped = c.path("w.key");
    let out = c.sa_bare(&[
        OsStr::new("keygen"),
        OsStr::new("--out"),
        wrapped.as_os_str(),
        OsStr::new("--passphrase-file"),
        pass.as_os_str(),
    ]);
    let msg = expect_fail(&out, Some(1), "a passphrase file others may read");
    assert!(msg.contains("chmod 600"), "{msg}");
    assert!(!wrapped.exists());
}
