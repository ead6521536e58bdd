//! # sa-clidocs: shell completions and man pages from a binary's own clap definitions
//!
//! A binary adds [`DocsCommand`] to its subcommands (`#[command(flatten)]`) and runs it with its
//! own `clap::Command` (from `clap::CommandFactory::command()`), so what packages install can
//! never drift from the flags the binary really takes:
//!
//! - `BIN completions SHELL` prints the completion script for `bash`, `zsh`, `fish`, `elvish` or
//!   `powershell` to stdout ([`completions`]);
//! - `BIN manpages DIR` writes `BIN.1` and one page per visible subcommand (`BIN-SUB.1`, ...)
//!   into DIR ([`manpages`]).
//!
//! Both subcommands are hidden from `--help` and from the completions and pages themselves:
//! packaging runs them (`packaging/debian/build.sh`), people read the installed files. Nothing
//! generated is committed.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

/// The hidden subcommands that generate a binary's completions and man pages.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum DocsCommand {
    /// Print the shell completion script for SHELL (for packaging).
    #[command(hide = true)]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: Shell,
    },
    /// Write the man pages (the command's and one per subcommand) into DIR (for packaging).
    #[command(hide = true)]
    Manpages {
        /// Directory to write into (created if missing).
        dir: PathBuf,
    },
}

impl DocsCommand {
    /// Runs it for `cmd`, the binary's whole command line definition; writes to stdout or into
    /// the directory given.
    pub fn run(self, cmd: Command) -> io::Result<()> {
        match self {
            DocsCommand::Completions { shell } => {
                let mut out = io::stdout().lock();
                completions(cmd, shell, &mut out)?;
                out.flush()
            }
            DocsCommand::Manpages { dir } => {
                for page in manpages(cmd, &dir)? {
                    println!("{}", page.display());
                }
                Ok(())
            }
        }
    }
}

/// Writes `cmd`'s completion script for `shell` to `out`. Hidden subcommands are left out.
pub fn completions(cmd: Command, shell: Shell, out: &mut dyn Write) -> io::Result<()> {
    let mut cmd = visible_only(&cmd);
    let name = cmd.get_name().to_string();
    // clap_complete panics on a write error; render into memory, then write (and report) it.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    out.write_all(&script)
}

/// `cmd` rebuilt from its own arguments, aliases and visible subcommands (recursively).
/// clap_complete completes hidden subcommands too, and `clap::Command` cannot remove one; only
/// what completions never show (help texts' layout, usage overrides) is left behind.
fn visible_only(cmd: &Command) -> Command {
    let mut out = Command::new(cmd.get_name().to_string())
        .visible_aliases(cmd.get_visible_aliases().map(str::to_string))
        .subcommand_required(cmd.is_subcommand_required_set())
        .args_conflicts_with_subcommands(cmd.is_args_conflicts_with_subcommands_set());
    if let Some(v) = cmd.get_version() {
        out = out.version(v.to_string());
    }
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    for arg in cmd.get_arguments() {
        out = out.arg(arg.clone());
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        out = out.subcommand(visible_only(sub));
    }
    out
}

/// Writes `cmd`'s man pages into `dir` (created if missing): `NAME.1` and one `NAME-SUB.1` per
/// visible subcommand, recursively. Returns the files written.
pub fn manpages(cmd: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    // Built once from the top, every subcommand knows its full name (`NAME-SUB`), its usage
    // line (`NAME SUB ...`) and the global flags.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    // Every page names the program and version it documents (subcommands have no version of
    // their own).
    let source = format!(
        "{} {}",
        cmd.get_name(),
        cmd.get_version().unwrap_or_default()
    );
    let mut written = Vec::new();
    page(cmd, &source, dir, &mut written)?;
    Ok(written)
}

fn page(cmd: Command, source: &str, dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page(sub.clone(), source, dir, written)?;
    }
    let man = clap_mangen::Man::new(cmd).source(source);
    written.push(man.generate_to(dir)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn demo_cmd() -> Command {
        Command::new("tool")
            .version("1.2.3")
            .about("A tool")
            .arg(
                Arg::new("verbose")
                    .long("verbose")
                    .action(ArgAction::SetTrue),
            )
            .subcommand(
                Command::new("make")
                    .about("Make a thing")
                    .arg(Arg::new("size").long("size").help("How big")),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn bash_completion_names_the_subcommands_and_flags() {
        let mut out = Vec::new();
        completions(demo_cmd(), Shell::Bash, &mut out).unwrap();
        let script = String::from_utf8(out).unwrap();
        assert!(script.contains("complete -F"), "{script}");
        assert!(script.contains("make"), "{script}");
        assert!(script.contains("--size"), "{script}");
        assert!(script.contains("--verbose"), "{script}");
        assert!(
            !script.contains("secret"),
            "hidden subcommand completed:\n{script}"
        );
    }

    #[test]
    fn fish_completion_leaves_hidden_subcommands_out() {
        let mut out = Vec::new();
        completions(demo_cmd(), Shell::Fish, &mut out).unwrap();
        let script = String::from_utf8(out).unwrap();
        assert!(script.contains("-a \"make\""), "{script}");
        assert!(
            !script.contains("secret"),
            "hidden subcommand completed:\n{script}"
        );
    }

    #[test]
    fn one_page_per_visible_command() {
        let dir = std::env::temp_dir().join(format!("clidocs-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pages = manpages(demo_cmd(), &dir).unwrap();
        let mut names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["tool-make.1", "tool.1"]);
        let sub = std::fs::read_to_string(dir.join("tool-make.1")).unwrap();
        assert!(sub.contains("How big"), "{sub}");
        assert!(sub.contains(".TH tool-make 1"), "{sub}");
        assert!(sub.contains("tool 1.2.3"), "no source line: {sub}");
        assert!(sub.contains("tool make"), "no usage line: {sub}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
