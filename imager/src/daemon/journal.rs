//! The job journal: every job the daemon runs (start, end, result, figures), in a local file that
//! survives restarts and crashes (`jobs.jsonl` in the state directory).
//!
//! **Format** (version 1): one JSON object per line, appended and fsynced before the daemon goes
//! on: `{"v":1,"start":{JOB}}` when a job starts and `{"v":1,"end":{"id":N,...}}` when it ends. A
//! job is the fold of its two lines by id. Nothing is ever rewritten in place: a crash (or
//! `kill -9`) loses at most a line being written, and a torn last line is cut off at the next
//! start. A job that started and never ended (the daemon died meanwhile) is ended at the next
//! start as `interrupted`, by one appended line: so every job is recorded exactly once, with one
//! end. Ids count up from the highest one in the file.
//!
//! Only what the daemon shows is kept in memory: the last [`KEEP`] jobs and, per job kind and
//! volume, the last finished one (for the schedules) and counts by result (for the metrics).

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Jobs kept in memory (the page's 30-day timeline and recent events come from these).
pub const KEEP: usize = 5000;
/// The format version written in every line.
const VERSION: u32 = 1;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// A snapshot of one volume (with its hooks).
    Snapshot,
    /// The retention policy of one volume, and the collection that follows.
    Prune,
    /// A scrub asked of every agent.
    Scrub,
    /// A repair pass that rebuilt something or failed (quiet passes are not recorded).
    Repair,
    /// A recovery drill of one volume's newest snapshot.
    Drill,
    /// The offsite copy of one volume after its snapshot (`offsite push`).
    Offsite,
}

impl JobKind {
    /// Its name (`snapshot`, ...).
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Snapshot => "snapshot",
            JobKind::Prune => "prune",
            JobKind::Scrub => "scrub",
            JobKind::Repair => "repair",
            JobKind::Drill => "drill",
            JobKind::Offsite => "offsite",
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It did what it should.
    Ok,
    /// It failed (see the error).
    Failed,
    /// The daemon stopped (SIGTERM, or it died) before the job ended.
    Interrupted,
}

impl Outcome {
    /// Its name (`ok`, `failed`, `interrupted`).
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Interrupted => "interrupted",
        }
    }
}

/// One job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Id, from 1, never reused.
    pub id: u64,
    /// What it does.
    pub kind: JobKind,
    /// The volume (snapshot, prune).
    pub volume: Option<String>,
    /// Why it ran: `schedule`, `missed` (a run due while the daemon was off), `watch`.
    pub trigger: String,
    /// The scheduled time it ran for (Unix ms).
    pub due_ms: u64,
    /// When it started (Unix ms).
    pub started_ms: u64,
    /// When it ended (Unix ms).
    pub ended_ms: Option<u64>,
    /// How it ended.
    pub outcome: Option<Outcome>,
    /// Why it failed.
    pub error: Option<String>,
    /// Its figures (snapshot id, bytes sent, shards rebuilt, ...).
    #[serde(default)]
    pub figures: BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct End {
    id: u64,
    ended_ms: u64,
    outcome: Outcome,
    error: Option<String>,
    #[serde(default)]
    figures: BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct Line {
    v: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<Job>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<End>,
}

/// (kind, volume): the key of schedules and counters.
pub type Slot = (JobKind, Option<String>);

/// The journal file and what is kept of it in memory.
pub struct Journal {
    path: PathBuf,
    file: File,
    next_id: u64,
    /// The last [`KEEP`] jobs, oldest first (running ones included).
    pub recent: VecDeque<Job>,
    /// Per slot, the last job that finished (ok or failed; interrupted ones do not count).
    pub last_done: BTreeMap<Slot, Job>,
    /// Per slot and outcome, how many jobs ended so (all history).
    pub counts: BTreeMap<(Slot, Outcome), u64>,
}

impl Journal {
    /// Opens (or creates) `dir/jobs.jsonl`, cuts off a torn last line, and ends the jobs a dead
    /// daemon left running as interrupted at `now_ms`.
    pub fn open(dir: &Path, now_ms: u64) -> Result<Journal> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        let path = dir.join("jobs.jsonl");
        let mut j = Journal {
            file: open_append(&path)?,
            path,
            next_id: 1,
            recent: VecDeque::new(),
            last_done: BTreeMap::new(),
            counts: BTreeMap::new(),
        };
        let open_jobs = j.replay()?;
        for id in open_jobs {
            tracing::warn!(
                "job {id} was running when the daemon stopped (killed or crashed): recorded as \
                 interrupted"
            );
            j.end(
                id,
                now_ms,
                Outcome::Interrupted,
                Some(
                    "the daemon stopped while this job ran (it runs again as a missed run)".into(),
                ),
                BTreeMap::new(),
            )?;
        }
        Ok(j)
    }

    /// Reads the file; returns the ids of jobs with no end.
    fn replay(&mut self) -> Result<Vec<u64>> {
        let read = File::open(&self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let mut reader = BufReader::new(read);
        let mut open: BTreeMap<u64, Job> = BTreeMap::new();
        let (mut good_len, mut offset, mut buf) = (0u64, 0u64, Vec::new());
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("cannot read {}", self.path.display()))?;
            if n == 0 {
                break;
            }
            offset += n as u64;
            let complete = buf.last() == Some(&b'\n');
            match serde_json::from_slice::<Line>(&buf) {
                Ok(line) if complete && line.v == VERSION => {
                    good_len = offset;
                    self.fold(line, &mut open);
                }
                _ if !complete => break,
                _ => {
                    good_len = offset;
                    tracing::warn!(
                        "{}: skipping a line that is not a version-{VERSION} job record",
                        self.path.display()
                    );
                }
            }
        }
        if good_len < offset {
            tracing::warn!(
                "{}: cutting off a torn last line ({} bytes) left by a crash",
                self.path.display(),
                offset - good_len
            );
            self.file
                .set_len(good_len)
                .and_then(|()| self.file.sync_all())
                .with_context(|| format!("cannot repair {}", self.path.display()))?;
        }
        let ids: Vec<u64> = open.keys().copied().collect();
        for job in open.into_values() {
            self.remember(job);
        }
        Ok(ids)
    }

    fn fold(&mut self, line: Line, open: &mut BTreeMap<u64, Job>) {
        if let Some(job) = line.start {
            self.next_id = self.next_id.max(job.id + 1);
            open.insert(job.id, job);
        }
        if let Some(end) = line.end {
            if let Some(mut job) = open.remove(&end.id) {
                job.ended_ms = Some(end.ended_ms);
                job.outcome = Some(end.outcome);
                job.error = end.error;
                job.figures.extend(end.figures);
                self.finished(&job);
                self.remember(job);
            }
        }
    }

    fn remember(&mut self, job: Job) {
        if let Some(j) = self.recent.iter_mut().rev().find(|j| j.id == job.id) {
            *j = job;
            return;
        }
        self.recent.push_back(job);
        while self.recent.len() > KEEP {
            self.recent.pop_front();
        }
    }

    fn finished(&mut self, job: &Job) {
        let slot = (job.kind, job.volume.clone());
        if let Some(o) = job.outcome {
            *self.counts.entry((slot.clone(), o)).or_default() += 1;
            if o != Outcome::Interrupted {
                self.last_done.insert(slot, job.clone());
            }
        }
    }

    fn append(&mut self, line: &Line) -> Result<()> {
        let mut text = serde_json::to_vec(line)?;
        text.push(b'\n');
        self.file
            .write_all(&text)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("cannot write the job journal {}", self.path.display()))
    }

    /// Records a job's start (durably, before it does anything) and returns it with its id.
    pub fn start(
        &mut self,
        kind: JobKind,
        volume: Option<&str>,
        trigger: &str,
        due_ms: u64,
        now_ms: u64,
    ) -> Result<Job> {
        let job = Job {
            id: self.next_id,
            kind,
            volume: volume.map(String::from),
            trigger: trigger.into(),
            due_ms,
            started_ms: now_ms,
            ended_ms: None,
            outcome: None,
            error: None,
            figures: BTreeMap::new(),
        };
        self.append(&Line {
            v: VERSION,
            start: Some(job.clone()),
            end: None,
        })?;
        self.next_id += 1;
        self.remember(job.clone());
        Ok(job)
    }

    /// Records a job's end.
    pub fn end(
        &mut self,
        id: u64,
        now_ms: u64,
        outcome: Outcome,
        error: Option<String>,
        figures: BTreeMap<String, serde_json::Value>,
    ) -> Result<Job> {
        let mut job = self
            .recent
            .iter()
            .rev()
            .find(|j| j.id == id)
            .cloned()
            .with_context(|| format!("job {id} ended but was not started"))?;
        self.append(&Line {
            v: VERSION,
            start: None,
            end: Some(End {
                id,
                ended_ms: now_ms,
                outcome,
                error: error.clone(),
                figures: figures.clone(),
            }),
        })?;
        job.ended_ms = Some(now_ms);
        job.outcome = Some(outcome);
        job.error = error;
        job.figures.extend(figures);
        self.finished(&job);
        self.remember(job.clone());
        Ok(job)
    }
}

fn open_append(path: &Path) -> Result<File> {
    let existed = path.exists();
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .with_context(|| format!("cannot open the job journal {}", path.display()))?;
    if !existed {
        sa_core::durable::sync_parent(path)
            .with_context(|| format!("cannot create the job journal {}", path.display()))?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_loses_no_job_and_doubles_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), 1_000).unwrap();
        let a = j
            .start(JobKind::Snapshot, Some("sys"), "schedule", 900, 1_000)
            .unwrap();
        j.end(a.id, 2_000, Outcome::Ok, None, BTreeMap::new())
            .unwrap();
        let b = j
            .start(JobKind::Snapshot, Some("sys"), "schedule", 2_900, 3_000)
            .unwrap();
        drop(j); // killed while job b runs
                 // A torn half line, as a crash in the middle of an append leaves.
        let path = dir.path().join("jobs.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"v\":1,\"end\":{\"id\":2,\"ended_").unwrap();
        drop(f);
        let j = Journal::open(dir.path(), 5_000).unwrap();
        let ids: Vec<u64> = j.recent.iter().map(|x| x.id).collect();
        assert_eq!(ids, [a.id, b.id]);
        assert_eq!(j.recent[1].outcome, Some(Outcome::Interrupted));
        assert_eq!(j.recent[1].ended_ms, Some(5_000));
        // The interrupted job does not count as the slot's last run.
        let slot = (JobKind::Snapshot, Some("sys".to_string()));
        assert_eq!(j.last_done[&slot].id, a.id);
        assert_eq!(j.counts[&(slot.clone(), Outcome::Interrupted)], 1);
        drop(j);
        // Opened again: nothing new is added, the torn line is gone, ids go on.
        let mut j = Journal::open(dir.path(), 6_000).unwrap();
        assert_eq!(j.recent.len(), 2);
        let c = j
            .start(JobKind::Prune, Some("sys"), "schedule", 6_000, 6_000)
            .unwrap();
        assert_eq!(c.id, 3);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.ends_with('\n'));
    }
}
