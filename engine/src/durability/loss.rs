//! The loss model: PCs lost for good at a constant rate, each rebuilt elsewhere one repair
//! window after it is lost; a snapshot is lost when more than `m` PCs are lost at once.
//!
//! Each agent alternates between *alive* (for an exponential time of mean `1/λ`) and *lost, not
//! yet rebuilt* (for its window `W_i` = detection + rebuild). The agents are independent, so in
//! the long run agent `i` is in its window with probability `q_i = λW_i / (1 + λW_i)`, and a
//! failure of agent `i` (rate `λ` while it is alive) finds the others in that stationary state.
//! Data is lost when the number of agents in their windows goes from `m` to `m + 1`:
//!
//! ```text
//! L = Σ_i λ (1 - q_i) · P(exactly m of the other agents are in their windows)
//! ```
//!
//! (a Poisson-binomial term over the `q_j`, computed exactly by [`super::prob::up_count`]).
//! Loss events then come at rate `L` per year, so `P(loss within a year) = 1 - exp(-L)` and the
//! mean time to data loss is `1 / L`. That reading treats loss events as a Poisson process; they
//! cluster a little (a second failure inside the same window), which makes `1 - exp(-L)` slightly
//! pessimistic when `L` is large and exact as `L → 0`.
//!
//! With equal windows `W` on `n = k + m` agents and `λW ≪ 1` this is the textbook
//! `L ≈ n λ C(n-1, m) (λW)^m`.

/// `q = λW / (1 + λW)`: the long-run fraction of time an agent spends lost and not yet rebuilt.
pub fn in_window(rate_per_year: f64, window_years: f64) -> f64 {
    let x = rate_per_year * window_years;
    if x.is_infinite() {
        1.0
    } else {
        x / (1.0 + x)
    }
}

/// The rate (per year) at which more than `m` agents come to be lost at once, for agents lost for
/// good at `rate_per_year` each and rebuilt `windows_years[i]` after agent `i` is lost.
pub fn loss_rate(rate_per_year: f64, windows_years: &[f64], m: usize) -> f64 {
    let q: Vec<f64> = windows_years
        .iter()
        .map(|&w| in_window(rate_per_year, w))
        .collect();
    let mut total = 0.0;
    let mut others = Vec::with_capacity(q.len().saturating_sub(1));
    for i in 0..q.len() {
        others.clear();
        others.extend(
            q.iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &x)| x),
        );
        // "Up" in up_count is "in its window" here.
        let exactly_m = super::prob::exactly(&others, m);
        total += rate_per_year * (1.0 - q[i]) * exactly_m;
    }
    total
}

/// P(at least one loss event within `years`), loss events a Poisson process of rate `rate`.
pub fn within(rate: f64, years: f64) -> f64 {
    -(-rate * years).exp_m1()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durability::prob::choose;

    #[test]
    fn small_windows_give_the_textbook_form() {
        for (n, m) in [(6usize, 2usize), (3, 1), (9, 3), (5, 2), (4, 0)] {
            let (lambda, w) = (0.1, 3.0 / 365.25);
            let model = loss_rate(lambda, &vec![w; n], m);
            let textbook = n as f64 * lambda * choose(n - 1, m) * (lambda * w).powi(m as i32);
            let rel = (model - textbook).abs() / textbook;
            assert!(rel < 0.01, "n={n} m={m}: {model} vs {textbook}");
        }
    }

    #[test]
    fn scaling_with_rate_and_window() {
        let windows = [0.002, 0.004, 0.003, 0.01, 0.002, 0.005];
        for m in 0..=3usize {
            let base = loss_rate(0.01, &windows, m);
            // Twice the loss rate: 2^(m+1) times the data loss (for λW ≪ 1).
            let twice = loss_rate(0.02, &windows, m);
            let expect = 2f64.powi(m as i32 + 1);
            assert!((twice / base / expect - 1.0).abs() < 0.01, "m={m}");
            // Windows half as long: 2^m times less.
            let halved: Vec<f64> = windows.iter().map(|w| w / 2.0).collect();
            let half = loss_rate(0.01, &halved, m);
            let expect = 2f64.powi(m as i32);
            assert!((base / half / expect - 1.0).abs() < 0.01, "m={m}");
        }
        assert!(
            (within(1e-7, 1.0) / 1e-7 - 1.0).abs() < 1e-6,
            "no cancellation for tiny rates"
        );
    }
}
