//! The model against a Monte Carlo simulation that knows nothing of its formulas: fleet states
//! drawn agent by agent for availability, and PCs failing and being rebuilt along a time line for
//! loss. Seeded, so every run draws the same numbers; the tolerances are four standard errors
//! of the simulation (or 10% where the model is an approximation).

use std::time::Duration;

use super::*;

/// SplitMix64 (a tiny, well-known generator; plenty for a test).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn exp(&mut self, rate: f64) -> f64 {
        -(1.0 - self.unit()).ln() / rate
    }
}

fn agents(avail: &[f64], wake: &[Option<f64>], bytes: &[u64]) -> Vec<AgentModel> {
    (0..avail.len())
        .map(|i| AgentModel {
            availability: avail[i],
            wake: wake[i % wake.len()],
            bytes: bytes[i % bytes.len()],
        })
        .collect()
}

/// Asserts `sim` (a frequency over `trials`) agrees with `model` within four standard errors.
fn close(what: &str, model: f64, sim: f64, trials: f64) {
    let sd = (model * (1.0 - model) / trials).sqrt().max(1e-9);
    eprintln!("{what}: model {model:.5}, simulation {sim:.5} (sd {sd:.5})");
    assert!(
        (sim - model).abs() <= 4.0 * sd,
        "{what}: model {model:.5}, simulation {sim:.5} (sd {sd:.5})"
    );
}

/// Draws which agents are up; woken agents that were down wake with their `wake` probability.
fn draw(rng: &mut Rng, fleet: &[AgentModel], woken: bool, up: &mut [bool]) {
    for (u, a) in up.iter_mut().zip(fleet) {
        *u = rng.unit() < a.availability;
        if !*u && woken {
            if let Some(w) = a.wake {
                *u = rng.unit() < w;
            }
        }
    }
}

#[test]
fn availability_matches_simulation() {
    let fleets: Vec<(Vec<AgentModel>, usize, usize)> = vec![
        (
            agents(&[0.9, 0.6, 0.75, 0.8, 0.95, 0.7], &[Some(0.7), None], &[1]),
            4,
            2,
        ),
        (
            agents(&[0.5, 0.9, 0.7, 0.8], &[None, Some(0.9)], &[1]),
            2,
            1,
        ),
        (
            agents(
                &[0.9, 0.8, 0.7, 0.95, 0.85, 0.6, 0.99, 0.75, 0.8, 0.9, 0.5],
                &[Some(0.8)],
                &[1],
            ),
            6,
            3,
        ),
        (
            agents(&[0.7, 0.8, 0.9, 0.6, 0.85, 0.75, 0.95], &[None], &[1]),
            3,
            2,
        ),
    ];
    const TRIALS: usize = 100_000;
    let mut rng = Rng(0x5eed);
    for (fleet, k, m) in fleets {
        let f = Fleet {
            agents: fleet.clone(),
            repair_throughput: 1.0,
            loss_rate: 0.1,
            replacement: Duration::from_secs(86_400),
        };
        let scheme = Scheme {
            k,
            m,
            repair_after: Duration::ZERO,
        };
        let r = assess(&f, &scheme).unwrap();
        let n = fleet.len();
        let s = k + m;
        let mut worst: Vec<usize> = (0..n).collect();
        worst.sort_by(|&a, &b| fleet[a].availability.total_cmp(&fleet[b].availability));
        worst.truncate(s);
        for (woken, model) in [(false, r.awake), (true, r.woken)] {
            let (mut snap, mut mean, mut bad) = (0usize, 0usize, 0usize);
            let mut up = vec![false; n];
            let mut idx: Vec<usize> = (0..n).collect();
            for _ in 0..TRIALS {
                draw(&mut rng, &fleet, woken, &mut up);
                let down = up.iter().filter(|u| !**u).count();
                snap += usize::from(down <= m);
                // A random placement: the first s of a partial shuffle.
                for j in 0..s {
                    let pick = j + rng.below(n - j);
                    idx.swap(j, pick);
                }
                mean += usize::from(idx[..s].iter().filter(|&&i| up[i]).count() >= k);
                bad += usize::from(worst.iter().filter(|&&i| up[i]).count() >= k);
            }
            let t = TRIALS as f64;
            let what = format!("{k}/{m} on {n}, woken {woken}");
            close(
                &format!("{what}: snapshot"),
                model.snapshot,
                snap as f64 / t,
                t,
            );
            close(
                &format!("{what}: stripe mean"),
                model.stripe_mean,
                mean as f64 / t,
                t,
            );
            close(
                &format!("{what}: stripe worst"),
                model.stripe_worst,
                bad as f64 / t,
                t,
            );
        }
    }
}

/// Simulates PCs lost for good at `rate` a year, agent `i` rebuilt `windows[i]` years later, for
/// `years` years. Returns (loss events, years with at least one loss event). A loss event is the
/// moment a failure brings some group over `m` agents lost at once (no groups: the whole fleet).
fn simulate_loss(
    rng: &mut Rng,
    rate: f64,
    windows: &[f64],
    m: usize,
    groups: Option<&[Vec<usize>]>,
    years: usize,
) -> (usize, usize) {
    let n = windows.len();
    // Start near the stationary state: each agent alive, with its next failure drawn.
    let mut lost = vec![false; n];
    let mut next: Vec<f64> = (0..n).map(|_| rng.exp(rate)).collect();
    let (mut events, mut bad_years, mut year_hit) = (0usize, 0usize, false);
    let mut current_year = 0usize;
    loop {
        let (i, t) =
            next.iter().enumerate().fold(
                (0, f64::INFINITY),
                |b, (i, &t)| if t < b.1 { (i, t) } else { b },
            );
        while t >= (current_year + 1) as f64 {
            bad_years += usize::from(year_hit);
            year_hit = false;
            current_year += 1;
            if current_year == years {
                return (events, bad_years);
            }
        }
        if lost[i] {
            lost[i] = false;
            next[i] = t + rng.exp(rate);
            continue;
        }
        lost[i] = true;
        next[i] = t + windows[i];
        let over = |g: &[usize]| g.iter().filter(|&&j| lost[j]).count() == m + 1;
        let hit = match groups {
            None => lost.iter().filter(|l| **l).count() == m + 1,
            // Over m in a group holding the agent that just failed, and in no group before.
            Some(gs) => {
                gs.iter().any(|g| g.contains(&i) && over(g)) && {
                    lost[i] = false;
                    let before = gs
                        .iter()
                        .any(|g| g.iter().filter(|&&j| lost[j]).count() > m);
                    lost[i] = true;
                    !before
                }
            }
        };
        if hit {
            events += 1;
            year_hit = true;
        }
    }
}

/// The windows `assess` uses for `fleet` under `scheme`, in years.
fn windows_of(f: &Fleet, r: &Report) -> Vec<f64> {
    f.agents
        .iter()
        .map(|a| {
            let rebuild = a.bytes as f64 / f.repair_throughput / r.awake.stripe_mean;
            let wait = if f.agents.len() == r.scheme.k + r.scheme.m {
                f.replacement.as_secs_f64()
            } else {
                0.0
            };
            (r.scheme.repair_after.as_secs_f64() + wait + rebuild) / SECS_PER_YEAR
        })
        .collect()
}

#[test]
fn loss_rate_matches_simulation() {
    let day = 86_400u64;
    type Case = (Vec<f64>, Vec<u64>, usize, usize, f64, u64);
    let cases: Vec<Case> = vec![
        // (availabilities, bytes, k, m, PCs lost per year, repair-after in days)
        (
            vec![0.9, 0.6, 0.75, 0.8, 0.95, 0.7],
            vec![1, 2, 3],
            4,
            2,
            3.0,
            5,
        ),
        (vec![0.5, 0.9, 0.7], vec![2, 1], 2, 1, 1.0, 3),
        (
            vec![0.9, 0.8, 0.7, 0.95, 0.85, 0.6, 0.99, 0.75, 0.8],
            vec![1, 3],
            6,
            3,
            6.0,
            4,
        ),
        (vec![0.7, 0.8, 0.9, 0.6, 0.85, 0.75], vec![2], 3, 2, 3.0, 4),
    ];
    let mut rng = Rng(0x105e);
    for (avail, bytes, k, m, rate, delay) in cases {
        // Rebuilds of one to three days at 1 "byte" per day.
        let bytes: Vec<u64> = bytes.iter().map(|b| b * day).collect();
        let f = Fleet {
            agents: agents(&avail, &[None], &bytes),
            repair_throughput: 1.0,
            loss_rate: rate,
            replacement: Duration::from_secs(86_400),
        };
        let scheme = Scheme {
            k,
            m,
            repair_after: Duration::from_secs(delay * day),
        };
        let r = assess(&f, &scheme).unwrap();
        let years = 3000;
        let (events, _) = simulate_loss(&mut rng, rate, &windows_of(&f, &r), m, None, years);
        let sim = events as f64 / years as f64;
        let model = r.loss.rate_per_year;
        // Poisson count: sd = sqrt(events).
        let sd = (model * years as f64).sqrt() / years as f64;
        eprintln!(
            "{k}/{m}: model {model:.4}/yr, simulation {sim:.4}/yr (sd {sd:.4}), {events} events"
        );
        assert!(
            (sim - model).abs() <= 4.0 * sd,
            "{k}/{m}: model {model:.4}/yr, simulation {sim:.4}/yr (sd {sd:.4})"
        );
        assert!(
            events > 200,
            "{k}/{m}: only {events} events, too few to judge"
        );
    }
}

#[test]
fn yearly_loss_matches_simulation() {
    // Short windows (q ≈ 1%) so that loss events barely cluster, and a high loss rate so that
    // a year often holds one: P(year) ≈ 15%.
    let f = Fleet {
        agents: agents(&[0.9, 0.8, 0.95, 0.7, 0.85, 0.9], &[None], &[3600, 7200]),
        repair_throughput: 1.0,
        loss_rate: 30.0,
        replacement: Duration::ZERO,
    };
    let scheme = Scheme {
        k: 4,
        m: 2,
        repair_after: Duration::from_secs(2 * 3600),
    };
    let r = assess(&f, &scheme).unwrap();
    let years = 6000;
    let mut rng = Rng(0x7ea5);
    let (_, bad) = simulate_loss(&mut rng, 30.0, &windows_of(&f, &r), 2, None, years);
    let sim = bad as f64 / years as f64;
    let model = r.loss.per_year;
    assert!(model > 0.05 && model < 0.5, "{model}");
    assert!(
        (sim / model - 1.0).abs() < 0.10,
        "P(loss in a year): model {model:.4}, simulation {sim:.4}"
    );
    close("P(loss in a year)", model, sim, years as f64);
}

#[test]
fn a_real_placement_loses_less_than_the_bound() {
    // Ten agents, 4/2, stripes on rotating groups of six (not every subset): the model counts
    // any three agents lost at once, the simulation only three in one group.
    let f = Fleet {
        agents: agents(&[0.9; 10], &[None], &[86_400]),
        repair_throughput: 1.0,
        loss_rate: 4.0,
        replacement: Duration::from_secs(86_400),
    };
    let scheme = Scheme {
        k: 4,
        m: 2,
        repair_after: Duration::from_secs(3 * 86_400),
    };
    let r = assess(&f, &scheme).unwrap();
    let groups: Vec<Vec<usize>> = (0..10)
        .map(|s| (0..6).map(|j| (s + j) % 10).collect())
        .collect();
    let years = 3000;
    let mut rng = Rng(0x9a0);
    let w = windows_of(&f, &r);
    let (grouped, _) = simulate_loss(&mut rng, 4.0, &w, 2, Some(&groups), years);
    let (spread, _) = simulate_loss(&mut rng, 4.0, &w, 2, None, years);
    let model = r.loss.rate_per_year * years as f64;
    eprintln!("spread {spread}, grouped {grouped}, model {model:.1} loss events in {years} years");
    assert!(
        (spread as f64 / model - 1.0).abs() < 0.1,
        "{spread} vs {model}"
    );
    assert!(
        (grouped as f64) < 0.9 * model,
        "grouped {grouped} vs bound {model}"
    );
}

#[test]
fn office_hours_are_correlated_and_the_weekly_model_sees_it() {
    // Six desk PCs, each with its own habits: on during office hours (Mon-Fri 08-18) with one
    // probability, left on at night and at weekends with another. The simulation draws a random
    // hour of the week, then each PC on or off by its habit for that hour, then whether a
    // sleeping one wakes; a restore needs four of the six.
    let habits = [
        (0.95, 0.10, None),
        (0.90, 0.05, Some(0.9)),
        (0.97, 0.30, Some(0.8)),
        (0.85, 0.02, None),
        (0.92, 0.15, Some(0.95)),
        (0.99, 0.90, None),
    ];
    let office = |h: usize| h / 24 < 5 && (8..18).contains(&(h % 24));
    let week: Vec<AgentWeek> = habits
        .iter()
        .map(|&(day, night, wake)| AgentWeek {
            fraction: std::array::from_fn(|h| if office(h) { day } else { night }),
            wake,
        })
        .collect();
    let (awake, woken) = weekly_availability(&week, 4, 2).unwrap();
    const TRIALS: usize = 100_000;
    let mut rng = Rng(0x0ff1ce);
    let (mut ok, mut ok_woken) = (0usize, 0usize);
    for _ in 0..TRIALS {
        let h = rng.below(WEEK_HOURS);
        let (mut up, mut up_woken) = (0, 0);
        for &(day, night, wake) in &habits {
            let on = rng.unit() < if office(h) { day } else { night };
            let woke = !on && wake.is_some_and(|w| rng.unit() < w);
            up += usize::from(on);
            up_woken += usize::from(on || woke);
        }
        ok += usize::from(up >= 4);
        ok_woken += usize::from(up_woken >= 4);
    }
    let t = TRIALS as f64;
    close("weekly, awake", awake.snapshot, ok as f64 / t, t);
    close("weekly, woken", woken.snapshot, ok_woken as f64 / t, t);
    // The same PCs taken as independent at all times, with their average availability, get the
    // chance of a restore badly wrong: the PCs are off together.
    let mean = |(day, night, _): (f64, f64, Option<f64>)| (50.0 * day + 118.0 * night) / 168.0;
    let naive: Vec<f64> = habits.iter().map(|&x| mean(x)).collect();
    let independent = prob::at_least(&naive, 4);
    let sim = ok as f64 / t;
    assert!(
        (independent - sim).abs() > 0.05,
        "independent {independent:.3} vs simulated {sim:.3}"
    );
    eprintln!("restore at a random hour: weekly model {:.4}, simulated {sim:.4}, independent model {independent:.4}", awake.snapshot);
    assert_eq!(
        weekly_availability(&week[..5], 4, 2),
        None,
        "five agents for six shards"
    );
}
