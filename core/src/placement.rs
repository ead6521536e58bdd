//! Placement weighted by free space: which agents take the shards of each stripe.
//!
//! [`crate::layout::rotate_placement`] gives every agent an equal share. Desk PCs are not equal:
//! one has a quota nearly used up, another a nearly full disk. [`Placement`] gives each agent a
//! share of the volume's shards proportional to the room it has, never more than it can take.
//!
//! # How
//!
//! Over the whole volume there are `N × S` shard positions (`N` stripes, `S = k + m` shards
//! each). Each agent gets a *quota* `q_i` of them ([`Placement::quotas`]): proportional to its
//! weight (its room), capped by what it can take, and by `c × N` where `c` is the most shards one
//! agent may hold of one stripe (1 normally; more only in degraded mode). The quotas sum to `N × S`.
//!
//! Lay the quotas end to end on a line `[0, N × S)`. Stripe `s` takes the `S` points
//! `r + j × N` (`j = 0..S`) where `r = σ(s)` and `σ(s) = s × g mod N` is a permutation of the
//! stripes (`g` coprime with `N`, near `N / φ`, so neighbouring stripes land far apart and any run
//! of stripes spreads over all agents). Each point names the agent whose stretch holds it.
//!
//! * **Exact shares.** Over all stripes the points are every integer of the line once, so agent
//!   `i` gets exactly `q_i` shards of the volume (fewer when stripes are all-zero or already
//!   stored).
//! * **Distinct agents.** Points of one stripe are `N` apart and a stretch is at most `c × N`
//!   long, so one agent holds at most `c` shards of a stripe: with `c = 1`, `S` distinct agents.
//! * **Deterministic.** The slots depend only on the stripe index and the quotas: a resumed run
//!   with the same fleet and room places every stripe where the interrupted one did.
//! * Shard index `j` of the points is rotated by the stripe index, so every agent holds data and
//!   parity shards alike (reads of data shards spread evenly).
//!
//! Room is only an estimate when the run starts; [`Budget`] is the safety net while it runs:
//! it counts what each agent took and moves a shard to the agent with the most room left when
//! the planned one has none.

use thiserror::Error;

/// Why no placement exists.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlacementError {
    /// The agents' room, in shards, is less than the shards to place.
    #[error(
        "the agents have room for {room} of the {need} shards needed \
         ({agents} agent(s) with room; each may hold at most {per_stripe} shard(s) of a stripe)"
    )]
    NoRoom {
        /// Shard positions the agents can take, in all.
        room: u128,
        /// Shard positions needed.
        need: u128,
        /// Agents with any room.
        agents: usize,
        /// The most shards of one stripe one agent may hold.
        per_stripe: usize,
    },
    /// Nothing to place on (no agent, or zero shards per stripe).
    #[error("no agents to place on")]
    Empty,
}

/// Where the shards of every stripe of a volume go; see the module docs.
#[derive(Debug, Clone)]
pub struct Placement {
    stripes: u64,
    shards: usize,
    stride: u64,
    /// `ends[i]`: end of agent `i`'s stretch on the line (cumulative quotas).
    ends: Vec<u128>,
}

impl Placement {
    /// Plans `stripes` stripes of `shards` shards over the agents of `room`.
    ///
    /// `room[i]` is how many shards agent `i` can take in this run (0: none, `u64::MAX`: no
    /// limit known); shares follow it. `new_stripes` is how many stripes are expected to store
    /// shards (at most `stripes`): an agent's quota of the whole volume is scaled so that its
    /// part of `new_stripes` stripes fits its room. `per_stripe` is the most shards of one stripe
    /// one agent may hold: 1 for full redundancy.
    pub fn new(
        stripes: u64,
        new_stripes: u64,
        shards: usize,
        room: &[u64],
        per_stripe: usize,
    ) -> Result<Placement, PlacementError> {
        if room.is_empty() || shards == 0 || per_stripe == 0 {
            return Err(PlacementError::Empty);
        }
        let n = stripes.max(1) as u128;
        let new = (new_stripes.min(stripes)) as u128;
        let need = n * shards as u128;
        // Per agent: the most positions of the line it may take.
        let caps: Vec<u128> = room
            .iter()
            .map(|&r| {
                let by_stripe = per_stripe as u128 * n;
                let by_room = if r == 0 {
                    0
                } else if new == 0 || r == u64::MAX {
                    by_stripe
                } else {
                    // Its share of the `new` stripes must fit: q × new / n <= r.
                    (r as u128 * n) / new
                };
                by_stripe.min(by_room)
            })
            .collect();
        let have: u128 = caps.iter().sum();
        if have < need {
            return Err(PlacementError::NoRoom {
                room: have,
                need,
                agents: caps.iter().filter(|&&c| c > 0).count(),
                per_stripe,
            });
        }
        // Weights: the room; unknown room weighs as much as the roomiest known agent.
        let known_max = room
            .iter()
            .copied()
            .filter(|&r| r != u64::MAX)
            .max()
            .unwrap_or(1)
            .max(1);
        let weights: Vec<u128> = room
            .iter()
            .map(|&r| if r == u64::MAX { known_max } else { r } as u128)
            .collect();
        let quotas = water_fill(need, &weights, &caps);
        let mut ends = Vec::with_capacity(quotas.len());
        let mut end = 0u128;
        for q in quotas {
            end += q;
            ends.push(end);
        }
        debug_assert_eq!(end, need);
        Ok(Placement {
            stripes: stripes.max(1),
            shards,
            stride: stride(stripes.max(1)),
            ends,
        })
    }

    /// Shards of the whole volume each agent gets.
    pub fn quotas(&self) -> Vec<u64> {
        let mut prev = 0;
        self.ends
            .iter()
            .map(|&e| {
                let q = e - prev;
                prev = e;
                q as u64
            })
            .collect()
    }

    /// The agent (index into `room`) of each shard index of stripe `stripe`.
    pub fn slots(&self, stripe: u64) -> Vec<u16> {
        let n = self.stripes as u128;
        let r = ((stripe % self.stripes) as u128 * self.stride as u128) % n;
        let mut out = vec![0u16; self.shards];
        for j in 0..self.shards {
            let x = r + j as u128 * n;
            let agent = self.ends.partition_point(|&e| e <= x);
            out[(j + (stripe % self.shards as u64) as usize) % self.shards] = agent as u16;
        }
        out
    }
}

/// `g` coprime with `n`, near `n / φ`: `s → s × g mod n` is a permutation that sends neighbours
/// far apart (golden-ratio spacing).
fn stride(n: u64) -> u64 {
    if n <= 2 {
        return 1;
    }
    let mut g = ((n as f64) * 0.618_033_988_749_894_9).round() as u64;
    g = g.clamp(1, n - 1);
    while gcd(g, n) != 1 {
        g += 1;
        if g >= n {
            g = 1;
        }
    }
    g
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Integer quotas summing to `total`, proportional to `weights` as far as `caps` allow (an agent
/// at its cap gives the excess to the others, in proportion), remainders to the largest
/// fractions (ties to the lower index). Needs `sum(caps) >= total`.
fn water_fill(total: u128, weights: &[u128], caps: &[u128]) -> Vec<u128> {
    let mut q = vec![0u128; weights.len()];
    let mut fixed = vec![false; weights.len()];
    for (i, &c) in caps.iter().enumerate() {
        if c == 0 {
            fixed[i] = true;
        }
    }
    let mut left = total;
    loop {
        let wsum: u128 = (0..q.len())
            .filter(|&i| !fixed[i])
            .map(|i| weights[i])
            .sum();
        if wsum == 0 {
            break;
        }
        // Agents whose proportional share reaches their cap take the cap; repeat without them.
        let mut capped = false;
        for i in 0..q.len() {
            if !fixed[i] && left * weights[i] >= caps[i] * wsum {
                q[i] = caps[i];
                fixed[i] = true;
                left -= caps[i];
                capped = true;
            }
        }
        if capped {
            continue;
        }
        let mut rems: Vec<(u128, usize)> = Vec::new();
        let mut given = 0;
        for i in 0..q.len() {
            if !fixed[i] {
                q[i] = left * weights[i] / wsum;
                given += q[i];
                rems.push((left * weights[i] % wsum, i));
            }
        }
        rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in rems.iter().take((left - given) as usize) {
            q[i] += 1;
        }
        left = 0;
        break;
    }
    // Left over only when every agent with weight is capped and zero-weight ones have room:
    // fill them in order (their room is real, their weight just rounds to nothing).
    for i in 0..q.len() {
        if left == 0 {
            break;
        }
        let more = (caps[i] - q[i]).min(left);
        q[i] += more;
        left -= more;
    }
    q
}

/// What each agent may still take during a run, in shards: the safety net under a
/// [`Placement`] made from estimates.
#[derive(Debug, Clone)]
pub struct Budget {
    left: Vec<u64>,
    per_stripe: usize,
}

impl Budget {
    /// A budget of `room[i]` shards for agent `i` (`u64::MAX`: no limit known), at most
    /// `per_stripe` shards of one stripe per agent.
    pub fn new(room: &[u64], per_stripe: usize) -> Budget {
        Budget {
            left: room.to_vec(),
            per_stripe,
        }
    }

    /// Takes one shard from each agent of `slots`; an agent with nothing left is replaced by
    /// the one with the most left that still holds fewer than `per_stripe` shards of the stripe.
    /// Returns the slots as taken (`slots` itself when every agent had room), or `None` when
    /// some shard fits nowhere (nothing is taken then).
    pub fn take(&mut self, slots: &[u16]) -> Option<Vec<u16>> {
        let mut left = self.left.clone();
        let mut out = slots.to_vec();
        for j in 0..out.len() {
            let a = out[j] as usize;
            if left.get(a).is_some_and(|&l| l > 0) {
                left[a] = left[a].saturating_sub(1);
                continue;
            }
            // `out[..j]` is settled; `out[j + 1..]` is still planned and keeps its places.
            let holds = |i: usize, out: &[u16]| out.iter().filter(|&&x| x as usize == i).count();
            let best = (0..left.len())
                .filter(|&i| left[i] > 0 && holds(i, &out) < self.per_stripe)
                .max_by_key(|&i| (left[i], std::cmp::Reverse(i)))?;
            out[j] = best as u16;
            left[best] = left[best].saturating_sub(1);
        }
        self.left = left;
        Some(out)
    }

    /// Gives agent `i` nothing more in this run (it failed, or said it is full).
    pub fn drop_agent(&mut self, i: usize) {
        if let Some(l) = self.left.get_mut(i) {
            *l = 0;
        }
    }

    /// A new agent for shard `j` of a stripe placed as `slots` (its agent failed): the one
    /// with the most left that holds fewer than `per_stripe` of the stripe's other shards;
    /// takes one shard from it. `None` when no agent fits.
    pub fn replace(&mut self, slots: &[u16], j: usize) -> Option<u16> {
        let others = |i: usize| {
            slots
                .iter()
                .enumerate()
                .filter(|&(x, &a)| x != j && a as usize == i)
                .count()
        };
        let best = (0..self.left.len())
            .filter(|&i| self.left[i] > 0 && others(i) < self.per_stripe && i != slots[j] as usize)
            .max_by_key(|&i| (self.left[i], std::cmp::Reverse(i)))?;
        self.left[best] = self.left[best].saturating_sub(1);
        Some(best as u16)
    }

    /// Shards agent `i` may still take.
    pub fn left(&self, i: usize) -> u64 {
        self.left.get(i).copied().unwrap_or(0)
    }
}

/// How many agents may be lost before a stripe placed as `slots` (agent per shard) loses data,
/// with `k` shards needed: the agents holding the most shards go first. Negative when fewer than
/// `k` shards exist at all.
pub fn stripe_margin<T: Ord + Copy>(slots: &[T], k: usize) -> i64 {
    let mut per: Vec<usize> = Vec::new();
    let mut sorted = slots.to_vec();
    sorted.sort();
    let mut i = 0;
    while i < sorted.len() {
        let j = sorted[i..].iter().take_while(|&&x| x == sorted[i]).count();
        per.push(j);
        i += j;
    }
    per.sort_unstable_by(|a, b| b.cmp(a));
    let mut left = slots.len() as i64;
    let k = k as i64;
    if left < k {
        return left - k;
    }
    let mut lost = 0;
    for n in per {
        if left - n as i64 >= k {
            left -= n as i64;
            lost += 1;
        } else {
            break;
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::rotate_placement;

    fn counts(p: &Placement, stripes: u64, agents: usize) -> Vec<u64> {
        let mut c = vec![0u64; agents];
        for s in 0..stripes {
            for a in p.slots(s) {
                c[a as usize] += 1;
            }
        }
        c
    }

    fn distinct(slots: &[u16]) -> bool {
        let mut s = slots.to_vec();
        s.sort();
        s.dedup();
        s.len() == slots.len()
    }

    #[test]
    fn distinct_agents_and_exact_quotas() {
        for (stripes, room) in [
            (1u64, vec![5u64, 5, 5, 5, 5, 5]),
            (7, vec![3, 4, 5, 6, 7, 7, 7, 7]),
            (100, vec![100, 120, 90, 300, 100, 150, 110]),
            (
                500,
                vec![u64::MAX, 3, 900, 900, 50, 2000, 0, 7000, u64::MAX],
            ),
            (257, vec![200, 300, 150, 257, 1000, 190, 180, 170, 160, 150]),
        ] {
            let need = stripes;
            let p = Placement::new(stripes, need, 6, &room, 1)
                .unwrap_or_else(|e| panic!("{stripes} stripes on {room:?}: {e}"));
            for s in 0..stripes {
                let slots = p.slots(s);
                assert_eq!(slots.len(), 6);
                assert!(distinct(&slots), "stripe {s}: {slots:?}");
                assert_eq!(p.slots(s), slots, "deterministic");
            }
            let c = counts(&p, stripes, room.len());
            assert_eq!(c, p.quotas(), "the quotas are exact");
            for (i, &r) in room.iter().enumerate() {
                assert!(c[i] <= r, "agent {i} given {} > room {r}: {c:?}", c[i]);
            }
        }
    }

    #[test]
    fn equal_room_balances_like_rotation() {
        for agents in 6..10 {
            let stripes = agents as u64 * 10 + 3;
            let p = Placement::new(stripes, stripes, 6, &vec![u64::MAX; agents], 1).unwrap();
            let c = counts(&p, stripes, agents);
            let mut r = vec![0u64; agents];
            for s in 0..stripes {
                for a in rotate_placement(s, 6, agents) {
                    r[a as usize] += 1;
                }
            }
            let spread = |v: &[u64]| v.iter().max().unwrap() - v.iter().min().unwrap();
            assert!(spread(&c) <= 1, "{c:?}");
            assert_eq!(
                spread(&c),
                spread(&r),
                "same balance as rotation: {c:?} {r:?}"
            );
            // Data and parity shards alike: shard 0 spreads over every agent.
            let firsts: std::collections::HashSet<u16> =
                (0..stripes).map(|s| p.slots(s)[0]).collect();
            assert_eq!(firsts.len(), agents);
        }
    }

    #[test]
    fn shares_follow_room() {
        // Twelve agents with room 1:2:...:12, 100 stripes of 6 shards: no one reaches its cap
        // (one shard per stripe), so the shares are the room's proportions, within one.
        let room: Vec<u64> = (1..=12).map(|i| i * 100).collect();
        let p = Placement::new(100, 100, 6, &room, 1).unwrap();
        let c = counts(&p, 100, 12);
        for (i, &got) in c.iter().enumerate() {
            let ideal = 600.0 * (i + 1) as f64 / 78.0;
            assert!(
                (got as f64 - ideal).abs() <= 1.0,
                "agent {i}: {got} vs {ideal}: {c:?}"
            );
        }
        // Seven agents, room 1:...:7, six shards a stripe: the roomiest are capped at one shard
        // per stripe and the excess goes to the others in proportion.
        let room: Vec<u64> = (1..=7).map(|i| i * 2000).collect();
        let p = Placement::new(1000, 1000, 6, &room, 1).unwrap();
        assert_eq!(
            counts(&p, 1000, 7),
            vec![333, 667, 1000, 1000, 1000, 1000, 1000]
        );
    }

    #[test]
    fn a_full_agent_gets_nothing_and_a_nearly_full_one_little() {
        let room = [
            u64::MAX,
            0,
            40,
            u64::MAX,
            u64::MAX,
            u64::MAX,
            u64::MAX,
            u64::MAX,
        ];
        let p = Placement::new(300, 300, 6, &room, 1).unwrap();
        let c = counts(&p, 300, room.len());
        assert_eq!(c[1], 0, "{c:?}");
        assert!(c[2] <= 40, "{c:?}");
        for s in 0..300 {
            assert!(distinct(&p.slots(s)));
        }
        // Only part of the volume is new: the quota scales up, the use stays within the room.
        let p = Placement::new(300, 30, 6, &room, 1).unwrap();
        let q = p.quotas()[2];
        assert!(q * 30 / 300 <= 40, "{q}");
    }

    #[test]
    fn too_little_room_is_refused_up_front() {
        // Five agents with room for k + m = 6 distinct shards: impossible.
        let e = Placement::new(10, 10, 6, &[u64::MAX; 5], 1).unwrap_err();
        assert!(matches!(e, PlacementError::NoRoom { agents: 5, .. }), "{e}");
        // Six agents, one nearly full: room for 59 of 60.
        let e = Placement::new(10, 10, 6, &[10, 10, 10, 10, 10, 9], 1).unwrap_err();
        assert_eq!(
            e,
            PlacementError::NoRoom {
                room: 59,
                need: 60,
                agents: 6,
                per_stripe: 1
            }
        );
        assert!(Placement::new(10, 10, 6, &[], 1).is_err());
    }

    #[test]
    fn degraded_places_all_shards_evenly_on_fewer_agents() {
        // k=4 m=2 on 4 agents, at most 2 shards of a stripe each.
        let p = Placement::new(100, 100, 6, &[u64::MAX; 4], 2).unwrap();
        for s in 0..100 {
            let slots = p.slots(s);
            for a in 0..4u16 {
                assert!(slots.iter().filter(|&&x| x == a).count() <= 2, "{slots:?}");
            }
            assert!(stripe_margin(&slots, 4) >= 1, "{slots:?}");
        }
        assert_eq!(p.quotas(), vec![150; 4]);
    }

    #[test]
    fn budget_moves_shards_off_agents_without_room() {
        let mut b = Budget::new(&[1, 0, 5, 5, 5, 5, 5, 5], 1);
        let got = b.take(&[0, 1, 2, 3, 4, 5]).unwrap();
        assert!(distinct(&got), "{got:?}");
        assert!(!got.contains(&1), "agent 1 has no room: {got:?}");
        assert_eq!(got[0], 0);
        assert_eq!(
            got[1], 6,
            "the agent with the most room left outside the stripe"
        );
        // Agent 0 used its one shard.
        let got = b.take(&[0, 2, 3, 4, 5, 6]).unwrap();
        assert!(!got.contains(&0) && distinct(&got), "{got:?}");
        assert_eq!(got[0], 7);
        // Six agents with room left for nothing more: none fits; nothing taken.
        let mut b = Budget::new(&[1, 1, 1, 1, 1, 0], 1);
        assert!(b.take(&[0, 1, 2, 3, 4, 5]).is_none());
        assert_eq!(b.left(0), 1);
    }

    #[test]
    fn budget_replaces_a_failed_agent_outside_the_stripe() {
        let mut b = Budget::new(&[9, 9, 9, 9, 9, 9, 3, 5], 1);
        b.drop_agent(2);
        assert_eq!(
            b.replace(&[0, 1, 2, 3, 4, 5], 2),
            Some(7),
            "most left, outside"
        );
        assert_eq!(b.left(7), 4);
        assert_eq!(b.left(2), 0);
        // Nobody outside the stripe with room: none.
        let mut b = Budget::new(&[9, 9, 9, 9, 9, 9, 0], 1);
        b.drop_agent(5);
        assert_eq!(b.replace(&[0, 1, 2, 3, 4, 5], 5), None);
        // Degraded (two per stripe): an agent holding one other shard may take it.
        let mut b = Budget::new(&[9, 9, 9, 9], 2);
        b.drop_agent(3);
        let got = b.replace(&[0, 0, 1, 1, 2, 3], 5).unwrap();
        assert_eq!(got, 2);
    }

    #[test]
    fn margins_count_agents_not_shards() {
        assert_eq!(stripe_margin(&[0, 1, 2, 3, 4, 5], 4), 2);
        assert_eq!(stripe_margin(&[0, 0, 1, 2, 3, 4], 4), 1);
        assert_eq!(stripe_margin(&[0, 0, 1, 1, 2, 3], 4), 1);
        assert_eq!(stripe_margin(&[0, 0, 0, 1, 2, 3], 4), 0);
        assert_eq!(stripe_margin(&[0, 1, 2], 4), -1);
        assert_eq!(stripe_margin(&[0, 0, 1, 1], 4), 0);
    }
}
