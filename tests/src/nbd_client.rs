//! Standard NBD clients run from tests (with Debian's python3 first in PATH, which nbdsh
//! needs), and a random read/write workload through nbdsh checked against a model of the disk.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::cluster::expect_ok;
use crate::proc::run;
use crate::Cluster;

/// Longest a client run may take.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs a client command to the end (within [`CLIENT_TIMEOUT`]).
pub fn client(c: &Cluster, prog: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(prog);
    cmd.args(args).env(
        "PATH",
        format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
    );
    run(cmd, c.dir(), CLIENT_TIMEOUT)
}

/// Runs a client command and returns its stdout, failing the test if it fails.
pub fn client_ok(c: &Cluster, prog: &str, args: &[&str]) -> String {
    let out = client(c, prog, args);
    expect_ok(&out, &format!("{prog} {}", args.join(" ")))
}

/// Random writes (unaligned, partial blocks, across stripe boundaries, some write-zeroes and
/// FUA), flushes and reads through nbdsh, checked against (and applied to) a model of the disk.
const MODEL_SCRIPT: &str = r#"
import random, sys
url, model_path, seed, ops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
h.connect_uri(url)
size = h.get_size()
model = bytearray(open(model_path, 'rb').read())
assert len(model) == size, (len(model), size)
assert not h.is_read_only() and h.can_flush() and h.can_fua()
rnd = random.Random(seed)
S = 4194304
for n in range(ops):
    if rnd.random() < 0.4:
        off = rnd.randrange(size // S) * S + rnd.randrange(-5000, 5000)
    else:
        off = rnd.randrange(size)
    off = max(0, min(off, size - 1))
    ln = min(rnd.choice([1, 100, 511, 512, 4095, 4096, 4097, 65536, 300000, 5000000]), size - off)
    op = rnd.random()
    if op < 0.45:
        data = rnd.randbytes(ln)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0)
        model[off:off + ln] = data
    elif op < 0.5 and h.can_zero():
        h.zero(ln, off)
        model[off:off + ln] = bytes(ln)
    elif op < 0.55:
        h.flush()
    else:
        got = h.pread(ln, off)
        if got != model[off:off + ln]:
            sys.exit("op %d: read of %d at %d differs" % (n, ln, off))
h.flush()
open(model_path, 'wb').write(model)
"#;

/// Runs [`MODEL_SCRIPT`] in nbdsh against `url`: `ops` random operations from `seed`, checked
/// against (and applied to) the disk model in the file `model`.
pub fn model_run(c: &Cluster, url: &str, model: &Path, seed: u64, ops: u32) {
    let script = c.path("model.py");
    if !script.exists() {
        std::fs::write(&script, MODEL_SCRIPT).expect("cannot write the nbdsh script");
    }
    let utf8 = |p: &Path| p.to_str().expect("temp paths are UTF-8").to_string();
    let code = format!(
        "import sys; sys.argv = ['model', '{url}', '{}', '{seed}', '{ops}']; exec(open('{}').read())",
        utf8(model),
        utf8(&script)
    );
    client_ok(c, "nbdsh", &["-c", &code]);
}
