//! Test volumes: seeded pseudo-random data, runs of zeros, planted plaintext markers.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::MIB;

/// A marker planted in test images in plain text; no agent may ever hold it.
pub const MARKER: &str = "SA-TESTS-PLAINTEXT-MARKER-4f1c9e";

/// What to write into a test image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Size in bytes.
    pub size: u64,
    /// Seed of the pseudo-random data: equal seeds give equal images.
    pub seed: u64,
    /// Byte ranges that are zero.
    pub zeros: Vec<Range<u64>>,
    /// Text planted at `marker_at`.
    pub marker: Vec<u8>,
    /// Offsets of the marker copies.
    pub marker_at: Vec<u64>,
}

impl ImageSpec {
    /// `size` bytes of pseudo-random data from `seed`, no zeros, no marker.
    pub fn random(size: u64, seed: u64) -> ImageSpec {
        ImageSpec {
            size,
            seed,
            zeros: Vec::new(),
            marker: MARKER.as_bytes().to_vec(),
            marker_at: Vec::new(),
        }
    }

    /// Makes `range` (bytes) zero.
    pub fn zeros(mut self, range: Range<u64>) -> ImageSpec {
        self.zeros.push(range);
        self
    }

    /// Makes MiB `first..end` zero.
    pub fn zero_mib(self, mib: Range<u64>) -> ImageSpec {
        self.zeros(mib.start * MIB..mib.end * MIB)
    }

    /// Plants [`MARKER`] at each offset (planted after the zeros, so it wins).
    pub fn marker_at(mut self, offsets: &[u64]) -> ImageSpec {
        self.marker_at.extend_from_slice(offsets);
        self
    }

    /// Writes the image to `path`.
    pub fn write(&self, path: &Path) -> Image {
        let file =
            File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        let mut w = BufWriter::with_capacity(MIB as usize, file);
        let mut chunk_zero = Vec::new();
        let mut buf = vec![0u8; MIB as usize];
        let mut off = 0u64;
        while off < self.size {
            let len = (self.size - off).min(MIB) as usize;
            let chunk = &mut buf[..len];
            fill_random(
                chunk,
                self.seed ^ (off / MIB).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            for z in &self.zeros {
                let (s, e) = (z.start.max(off), z.end.min(off + len as u64));
                if s < e {
                    chunk[(s - off) as usize..(e - off) as usize].fill(0);
                }
            }
            for &at in &self.marker_at {
                let end = at + self.marker.len() as u64;
                let (s, e) = (at.max(off), end.min(off + len as u64));
                if s < e {
                    let m = &self.marker[(s - at) as usize..(e - at) as usize];
                    chunk[(s - off) as usize..(e - off) as usize].copy_from_slice(m);
                }
            }
            chunk_zero.push(chunk.iter().all(|&b| b == 0));
            w.write_all(chunk).expect("cannot write the image");
            off += len as u64;
        }
        w.into_inner()
            .expect("cannot flush the image")
            .sync_all()
            .expect("cannot sync the image");
        Image {
            path: path.to_path_buf(),
            size: self.size,
            chunk_zero,
        }
    }
}

/// An image written by [`ImageSpec::write`].
#[derive(Debug, Clone)]
pub struct Image {
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    chunk_zero: Vec<bool>,
}

impl Image {
    /// Number of stripes of `stripe` bytes (a multiple of 1 MiB), the last one maybe short.
    pub fn stripes(&self, stripe: u64) -> u64 {
        self.size.div_ceil(stripe)
    }

    /// Number of those stripes that are all zero.
    pub fn zero_stripes(&self, stripe: u64) -> u64 {
        assert_eq!(
            stripe % MIB,
            0,
            "stripe size must be a multiple of 1 MiB here"
        );
        let per = (stripe / MIB) as usize;
        self.chunk_zero
            .chunks(per)
            .filter(|c| c.iter().all(|&z| z))
            .count() as u64
    }

    /// SHA-256 of the image, hex.
    pub fn sha256(&self) -> String {
        sha256(&self.path)
    }
}

/// Fills `buf` with splitmix64 output seeded by `seed`.
fn fill_random(buf: &mut [u8], seed: u64) {
    let mut s = seed;
    let mut chunks = buf.chunks_exact_mut(8);
    for c in chunks.by_ref() {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        c.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    for b in chunks.into_remainder() {
        *b = 0xA5;
    }
}

/// SHA-256 of a file or block device, hex (with `sha256sum`).
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sha256sum: {e}"));
    assert!(
        out.status.success(),
        "sha256sum {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .expect("sha256sum printed nothing")
        .to_string()
}
