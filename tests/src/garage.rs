//! A real Garage cluster (S3-compatible, distributed) for the offsite tests: three nodes on
//! fresh loopback addresses, each in its own directory, replication factor 3, one zone per node,
//! a bucket and an access key made with Garage's own CLI. Nodes are killed when dropped.
//!
//! The `garage` binary comes from `$GARAGE_BIN`, else `~/.cargo/bin/garage` (where `.ci/run`
//! installs it once per machine with `cargo install garage`), else `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::agent::fresh_ip;
use crate::proc::{run, Proc};

/// The region the nodes are configured with.
pub const REGION: &str = "garage";
/// The bucket made at start.
pub const BUCKET: &str = "sa-offsite";

/// The `garage` binary.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("GARAGE_BIN") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".cargo/bin/garage");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("garage")
}

/// One node.
#[derive(Debug)]
struct Node {
    config: PathBuf,
    ip: std::net::Ipv4Addr,
    log: PathBuf,
    proc: Option<Proc>,
}

/// A running three-node cluster with a bucket and a key.
#[derive(Debug)]
pub struct Garage {
    nodes: Vec<Node>,
    dir: PathBuf,
    /// Access key id.
    pub key_id: String,
    /// Secret key.
    pub secret: String,
}

impl Garage {
    /// Starts three nodes under `dir`, joins them, lays them out and makes [`BUCKET`] and a key
    /// allowed on it.
    pub fn start(dir: &Path) -> Garage {
        let dir = dir.join("garage");
        std::fs::create_dir_all(&dir).expect("cannot make the garage dir");
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + std::process::id() as usize) % 251))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let ip = fresh_ip();
            let home = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&home).expect("cannot make a node dir");
            let config = home.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{h}/meta\"\ndata_dir = \"{h}/data\"\ndb_engine = \"lmdb\"\n\
                     replication_factor = 3\nrpc_bind_addr = \"{ip}:3901\"\n\
                     rpc_public_addr = \"{ip}:3901\"\nrpc_secret = \"{secret}\"\n\
                     [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"{ip}:3900\"\n",
                    h = home.display()
                ),
            )
            .expect("cannot write a garage config");
            let mut n = Node {
                config,
                ip,
                log: home.join("log"),
                proc: None,
            };
            n.launch();
            nodes.push(n);
        }
        let mut g = Garage {
            nodes,
            dir,
            key_id: String::new(),
            secret: String::new(),
        };
        g.form_cluster();
        g
    }

    /// Runs the garage CLI against node `i`; panics with its output when it fails.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let mut cmd = Command::new(binary());
        cmd.arg("-c").arg(&self.nodes[i].config).args(args);
        let out = run(cmd, &self.dir, Duration::from_secs(60));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "garage {args:?} failed: {text}");
        text
    }

    fn try_cli(&self, i: usize, args: &[&str]) -> Option<String> {
        let mut cmd = Command::new(binary());
        cmd.arg("-c").arg(&self.nodes[i].config).args(args);
        let out = run(cmd, &self.dir, Duration::from_secs(60));
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).to_string())
    }

    fn form_cluster(&mut self) {
        // Every node answers its own CLI first.
        let ids: Vec<String> = (0..3)
            .map(|i| {
                crate::wait::until(Duration::from_secs(30), "a garage node to answer", || {
                    self.try_cli(i, &["node", "id", "-q"])
                        .map(|s| s.trim().to_string())
                        .filter(|s| s.contains('@'))
                })
            })
            .collect();
        for id in &ids[1..] {
            self.cli(0, &["node", "connect", id]);
        }
        for (i, id) in ids.iter().enumerate() {
            let short = &id[..16];
            self.cli(
                0,
                &[
                    "layout",
                    "assign",
                    "-z",
                    &format!("dc{i}"),
                    "-c",
                    "1G",
                    short,
                ],
            );
        }
        self.cli(0, &["layout", "apply", "--version", "1"]);
        crate::wait::until_true(
            Duration::from_secs(30),
            "the garage layout on every node",
            || {
                (0..3).all(|i| {
                    self.try_cli(i, &["status"])
                        .is_some_and(|s| s.matches("dc").count() >= 3)
                })
            },
        );
        self.cli(0, &["bucket", "create", BUCKET]);
        let key = self.cli(0, &["key", "create", "sa-key"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no '{name}' in garage key create's output: {key}"))
        };
        self.key_id = field("Key ID:");
        self.secret = field("Secret key:");
        self.cli(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "sa-key",
            ],
        );
    }

    /// The S3 endpoint of node `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}:3900", self.nodes[i].ip)
    }

    /// Writes an AWS-style credentials file for the key at `path` (mode 0600).
    pub fn credentials_file(&self, path: &Path) {
        std::fs::write(
            path,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.key_id, self.secret
            ),
        )
        .expect("cannot write the credentials file");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .expect("cannot chmod the credentials file");
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
    }

    /// The object keys in the bucket under `prefix`, as the AWS CLI (`aws s3api
    /// list-objects-v2`, from PyPI) lists them through node `i`: a client that is not ours.
    pub fn list(&self, i: usize, prefix: &str) -> Vec<String> {
        let out = self.aws(
            i,
            &[
                "s3api",
                "list-objects-v2",
                "--bucket",
                BUCKET,
                "--prefix",
                prefix,
                "--query",
                "Contents[].Key",
                "--output",
                "text",
            ],
        );
        assert!(
            out.status.success(),
            "aws s3api list-objects-v2 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|k| *k != "None")
            .map(str::to_string)
            .collect()
    }

    /// Runs the AWS CLI (`python3 -m awscli`) with this cluster's key against node `i`.
    pub fn aws(&self, i: usize, args: &[&str]) -> std::process::Output {
        // `python3 -m awscli`: the interpreter test.sh installed it for, whatever PATH holds.
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "awscli"])
            .args(args)
            .arg("--endpoint-url")
            .arg(self.endpoint(i))
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_DEFAULT_REGION", REGION)
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
        run(cmd, &self.dir, Duration::from_secs(120))
    }
}

impl Node {
    fn launch(&mut self) {
        let log = std::fs::File::create(&self.log).expect("cannot create the garage log");
        let mut cmd = Command::new(binary());
        cmd.arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cannot dup the log"))
            .stderr(log);
        self.proc = Some(Proc::spawn(cmd, "garage server"));
    }
}
