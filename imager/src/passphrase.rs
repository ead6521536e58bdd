//! Passphrases of wrapped key files: from a file, or asked for.
//!
//! On a terminal the passphrase is read without echo; from a pipe (scripts, tests) it is the first
//! line of standard input. A passphrase file, like a key file, must not be readable by others.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use sa_core::keyfile::{check_key_file_mode, read_key_file, KeyFile};
use sa_core::keys::MasterKey;

/// The first line of `path`, without its line end. Refuses an empty passphrase.
pub fn from_file(path: &Path) -> Result<Vec<u8>> {
    check_key_file_mode(path).map_err(|e| match e {
        sa_core::Error::InsecureKeyFile { mode, .. } => anyhow::anyhow!(
            "passphrase file {p} may be read by other users (mode {mode:03o}); refusing to use it: run `chmod 600 {p}`",
            p = path.display()
        ),
        e => e.into(),
    })?;
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read passphrase file {}", path.display()))?;
    let line = first_line(&bytes);
    if line.is_empty() {
        bail!("passphrase file {} is empty", path.display());
    }
    Ok(line.to_vec())
}

fn first_line(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == b'\n').unwrap_or(b.len());
    let line = &b[..end];
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Asks for a passphrase: without echo on a terminal, else the next line of standard input.
pub fn ask(prompt: &str) -> Result<Vec<u8>> {
    let line = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(prompt)
            .context("cannot read the passphrase from the terminal")?
    } else {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the passphrase from standard input")?;
        eprintln!();
        line
    };
    let p = first_line(line.as_bytes());
    if p.is_empty() {
        bail!("no passphrase given");
    }
    Ok(p.to_vec())
}

/// A new passphrase: from `file`, or asked for (twice on a terminal, to catch a typo).
pub fn new_passphrase(file: Option<&Path>) -> Result<Vec<u8>> {
    if let Some(f) = file {
        return from_file(f);
    }
    let p = ask("New passphrase for the key file: ")?;
    if std::io::stdin().is_terminal() {
        let again = ask("The same passphrase again: ")?;
        if again != p {
            bail!("the two passphrases differ; nothing was written");
        }
    }
    Ok(p)
}

/// Loads the master key from a key file, unwrapping it when it is passphrase-protected: with the
/// passphrase from `passphrase_file`, else asked for when standard input is a terminal.
pub fn load_key(path: &Path, passphrase_file: Option<&Path>) -> Result<MasterKey> {
    match read_key_file(path)? {
        KeyFile::Plain(k) => Ok(k),
        KeyFile::Wrapped(w) => {
            let pass = match passphrase_file {
                Some(f) => from_file(f)?,
                None if std::io::stdin().is_terminal() => {
                    ask(&format!("Passphrase for {}: ", path.display()))?
                }
                None => {
                    return Err(sa_core::Error::PassphraseNeeded(path.display().to_string()).into())
                }
            };
            w.unwrap_key(&pass)
                .with_context(|| format!("cannot unlock key file {}", path.display()))
        }
    }
}
