//! Which agents a drill withholds: by default `m` of them (the most a snapshot is built to
//! lose), rotating so that every agent is withheld over time.
//!
//! The candidates are the agents some stripe of the snapshot places a shard on. Each one's last
//! withholding is read from the volume's drill records ([`super::record`]); the agents withheld
//! least recently (never: first) are chosen, ties broken by their place in the snapshot's agent
//! table. With 6 agents and `m = 2`, three drills in a row withhold every agent once.

use std::collections::HashMap;

use super::record::DrillRecord;

/// An agent the drill may withhold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub id: [u8; 16],
    /// Its address in the snapshot's table.
    pub addr: String,
}

/// When each agent was last withheld (Unix seconds), from `records`.
pub fn last_withheld<'a>(
    records: impl IntoIterator<Item = &'a DrillRecord>,
) -> HashMap<[u8; 16], u64> {
    let mut last = HashMap::new();
    for r in records {
        for (id, _) in &r.withheld {
            let t = last.entry(*id).or_insert(0);
            *t = (*t).max(r.started);
        }
    }
    last
}

/// The `n` candidates withheld least recently according to `last` (see the module docs), in
/// table order.
pub fn choose(candidates: &[Candidate], last: &HashMap<[u8; 16], u64>, n: usize) -> Vec<Candidate> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|&i| (last.get(&candidates[i].id).copied().unwrap_or(0), i));
    let mut chosen: Vec<usize> = order.into_iter().take(n).collect();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| candidates[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(started: u64, ids: &[[u8; 16]]) -> DrillRecord {
        DrillRecord {
            started,
            passed: true,
            boot_ms: Some(1),
            total_ms: 1,
            stripes_rebuilt: 0,
            stripes_lost: 0,
            accel: "tcg".into(),
            reason: String::new(),
            criteria: String::new(),
            withheld: ids.iter().map(|id| (*id, "a:1".to_string())).collect(),
            screenshot: Vec::new(),
        }
    }

    #[test]
    fn three_drills_withhold_each_of_six_agents_once_then_start_over() {
        let cands: Vec<Candidate> = (0..6u8)
            .map(|i| Candidate {
                id: [i; 16],
                addr: format!("127.0.0.{i}:1"),
            })
            .collect();
        let mut records = Vec::new();
        let mut seen = Vec::new();
        for t in 1..=4u64 {
            let pick = choose(&cands, &last_withheld(&records), 2);
            assert_eq!(pick.len(), 2);
            let ids: Vec<[u8; 16]> = pick.iter().map(|c| c.id).collect();
            seen.push(ids.clone());
            records.push(record(t * 100, &ids));
        }
        let mut first_three: Vec<u8> = seen[..3].iter().flatten().map(|id| id[0]).collect();
        first_three.sort_unstable();
        assert_eq!(first_three, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(
            seen[3], seen[0],
            "the fourth drill starts the rotation over"
        );
    }

    #[test]
    fn an_agent_never_withheld_goes_first() {
        let cands: Vec<Candidate> = (0..3u8)
            .map(|i| Candidate {
                id: [i; 16],
                addr: String::new(),
            })
            .collect();
        let records = [record(50, &[[0; 16], [2; 16]])];
        let pick = choose(&cands, &last_withheld(&records), 1);
        assert_eq!(pick[0].id, [1; 16]);
    }
}
