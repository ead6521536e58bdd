//! Exact probabilities over independent agents with unequal availabilities.
//!
//! * [`up_count`]: the distribution of how many of a set of agents are up (the Poisson-binomial
//!   distribution), by the usual dynamic programme over the agents, `O(n²)`.
//! * [`at_least`]: `P(at least k up)` from it; with equal availabilities it is the binomial tail
//!   [`binomial_at_least`] (the tests check one against the other).
//! * [`mean_over_subsets`]: `P(at least k of s up)` averaged over every `s`-subset of the agents,
//!   by a programme over (agents chosen, agents up), `O(n s²)`; no enumeration of subsets.
//! * [`all_groups_ok`]: `P(no group has more than m down)` for explicit groups (the distinct agent
//!   sets that the stripes of a snapshot use), by a depth-first walk that prunes a branch as soon
//!   as one group has lost too many.

/// `dist[j]` = P(exactly `j` of the agents are up), for independent agents up with `p[i]`.
pub fn up_count(p: &[f64]) -> Vec<f64> {
    let mut dist = vec![0.0; p.len() + 1];
    dist[0] = 1.0;
    for (i, &a) in p.iter().enumerate() {
        for j in (0..=i + 1).rev() {
            let stay = dist[j] * (1.0 - a);
            let moved = if j > 0 { dist[j - 1] * a } else { 0.0 };
            dist[j] = stay + moved;
        }
    }
    dist
}

/// P(at least `k` of the agents are up).
pub fn at_least(p: &[f64], k: usize) -> f64 {
    if k > p.len() {
        return 0.0;
    }
    // Sum the shorter tail for accuracy when the answer is close to 1.
    let dist = up_count(p);
    if k * 2 > p.len() {
        dist[k..].iter().sum::<f64>().clamp(0.0, 1.0)
    } else {
        (1.0 - dist[..k].iter().sum::<f64>()).clamp(0.0, 1.0)
    }
}

/// P(exactly `j` of the agents are up).
pub fn exactly(p: &[f64], j: usize) -> f64 {
    up_count(p).get(j).copied().unwrap_or(0.0)
}

/// `n choose r` as a float (exact for the sizes used here).
pub fn choose(n: usize, r: usize) -> f64 {
    if r > n {
        return 0.0;
    }
    let r = r.min(n - r);
    (0..r).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// The closed form for equal availabilities: `sum_{j>=k} C(n,j) a^j (1-a)^(n-j)`.
pub fn binomial_at_least(n: usize, a: f64, k: usize) -> f64 {
    (k..=n)
        .map(|j| choose(n, j) * a.powi(j as i32) * (1.0 - a).powi((n - j) as i32))
        .sum()
}

/// `P(at least k of s up)` for a stripe placed on `s` agents drawn uniformly among all `n`,
/// averaged over the `C(n, s)` choices. `None` when `s > n`.
pub fn mean_over_subsets(p: &[f64], s: usize, k: usize) -> Option<f64> {
    let n = p.len();
    if s > n {
        return None;
    }
    // f[c][u]: sum over the ways to choose c of the agents seen so far, of P(u of them up).
    let mut f = vec![vec![0.0f64; s + 1]; s + 1];
    f[0][0] = 1.0;
    for &a in p {
        for c in (1..=s).rev() {
            for u in (0..=c).rev() {
                let up = if u > 0 { f[c - 1][u - 1] * a } else { 0.0 };
                let down = if u < c { f[c - 1][u] * (1.0 - a) } else { 0.0 };
                f[c][u] += up + down;
            }
        }
    }
    let total: f64 = if k > s { 0.0 } else { f[s][k..].iter().sum() };
    Some((total / choose(n, s)).clamp(0.0, 1.0))
}

/// Most groups [`all_groups_ok`] accepts (bounds its memory).
pub const MAX_GROUPS: usize = 4096;
/// Most agents [`all_groups_ok`] walks (the walk is exponential in the worst case).
pub const MAX_GROUP_AGENTS: usize = 40;

/// P(no group has more than `m` of its agents down), agents independent with availability
/// `p[i]`. `groups` are agent index sets (a snapshot's distinct stripe placements). `None` when
/// there are more than [`MAX_GROUPS`] groups or [`MAX_GROUP_AGENTS`] agents, or an index is out
/// of range.
pub fn all_groups_ok(p: &[f64], groups: &[Vec<usize>], m: usize) -> Option<f64> {
    if groups.len() > MAX_GROUPS || p.len() > MAX_GROUP_AGENTS {
        return None;
    }
    // member_of[i]: the groups agent i belongs to.
    let mut member_of = vec![Vec::new(); p.len()];
    for (g, members) in groups.iter().enumerate() {
        for &i in members {
            member_of.get_mut(i)?.push(g);
        }
    }
    let mut down = vec![0usize; groups.len()];
    Some(walk(p, &member_of, &mut down, m, 0, 1.0).clamp(0.0, 1.0))
}

/// The probability mass of the assignments of agents `i..` that keep every group within `m`
/// down, times `weight` (the probability of the assignment of agents `..i`).
fn walk(
    p: &[f64],
    member_of: &[Vec<usize>],
    down: &mut [usize],
    m: usize,
    i: usize,
    weight: f64,
) -> f64 {
    if i == p.len() {
        return weight;
    }
    if weight == 0.0 {
        return 0.0;
    }
    let mut ok = walk(p, member_of, down, m, i + 1, weight * p[i]);
    if member_of[i].iter().all(|&g| down[g] < m) {
        for &g in &member_of[i] {
            down[g] += 1;
        }
        ok += walk(p, member_of, down, m, i + 1, weight * (1.0 - p[i]));
        for &g in &member_of[i] {
            down[g] -= 1;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_availabilities_give_the_binomial_tail() {
        for n in 1..=12 {
            for k in 0..=n {
                for a in [0.0, 0.3, 0.8, 0.95, 1.0] {
                    let dp = at_least(&vec![a; n], k);
                    let closed = binomial_at_least(n, a, k);
                    assert!(
                        (dp - closed).abs() < 1e-12,
                        "n={n} k={k} a={a}: {dp} vs {closed}"
                    );
                }
            }
        }
        // The figure of the brief: 4 of 6 PCs up 80% of the time.
        let p = at_least(&[0.8; 6], 4);
        assert!((p - 0.90112).abs() < 1e-5, "{p}");
    }

    #[test]
    fn mean_over_subsets_matches_enumeration() {
        let p = [0.9, 0.5, 0.75, 0.99, 0.6, 0.8, 0.3];
        for s in 1..=p.len() {
            for k in 0..=s {
                let mut sum = 0.0;
                let mut count = 0.0;
                for mask in 0u32..(1 << p.len()) {
                    if mask.count_ones() as usize != s {
                        continue;
                    }
                    let sub: Vec<f64> = (0..p.len())
                        .filter(|i| mask & (1 << i) != 0)
                        .map(|i| p[i])
                        .collect();
                    sum += at_least(&sub, k);
                    count += 1.0;
                }
                let dp = mean_over_subsets(&p, s, k).unwrap();
                assert!((dp - sum / count).abs() < 1e-12, "s={s} k={k}");
            }
        }
        assert_eq!(mean_over_subsets(&p, 8, 1), None);
    }

    #[test]
    fn groups_match_enumeration() {
        let p = [0.9, 0.5, 0.75, 0.99, 0.6, 0.8];
        let groups = vec![vec![0, 1, 2], vec![2, 3, 4], vec![4, 5, 0], vec![1, 3, 5]];
        for m in 0..=3 {
            let mut ok = 0.0;
            for mask in 0u32..(1 << p.len()) {
                // mask bit set = agent down
                let prob: f64 = (0..p.len())
                    .map(|i| {
                        if mask & (1 << i) != 0 {
                            1.0 - p[i]
                        } else {
                            p[i]
                        }
                    })
                    .product();
                let fine = groups
                    .iter()
                    .all(|g| g.iter().filter(|&&i| mask & (1 << i) != 0).count() <= m);
                if fine {
                    ok += prob;
                }
            }
            let walked = all_groups_ok(&p, &groups, m).unwrap();
            assert!((walked - ok).abs() < 1e-12, "m={m}: {walked} vs {ok}");
        }
        // One group holding everyone: the fleet-wide tail.
        let all = vec![(0..p.len()).collect::<Vec<_>>()];
        let fleet = at_least(&p, p.len() - 2);
        assert!((all_groups_ok(&p, &all, 2).unwrap() - fleet).abs() < 1e-12);
        assert_eq!(all_groups_ok(&p, &[vec![6]], 1), None, "index out of range");
    }
}
