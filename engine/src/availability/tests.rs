use std::time::Duration;

use sa_core::keys::MasterKey;

use super::*;

/// Monday 2024-01-01 00:00 UTC.
const MONDAY: u64 = 1_704_067_200;
const CET: i32 = 3600;
const A: [u8; 16] = [1; 16];
const B: [u8; 16] = [2; 16];

/// Five weeks of hourly observations of an office PC: up Mon-Fri 08-18 local (CET), down
/// otherwise. Returns the history and the time of the last observation.
fn office_pc(weeks: u64) -> (History, u64) {
    let mut h = History::default();
    let start = MONDAY - CET as u64; // Monday 00:00 CET
    let mut last = 0;
    for hour in 0..weeks * 7 * 24 {
        let (day, hod) = (hour / 24 % 7, hour % 24);
        let up = day < 5 && (8..18).contains(&hod);
        last = start + hour * 3600 + 1800;
        assert!(h.observe(A, last, up));
    }
    (h, last)
}

#[test]
fn availability_and_usual_hours_of_an_office_pc() {
    let (h, now) = office_pc(5);
    let up = h.availability(&A, now).unwrap();
    assert_eq!(up.observed_hours, 30 * 24);
    // 30 days from a Saturday back: 4 whole weeks + 2 days, 20 + 0 or so working days; check
    // against a direct count of the last 720 hours.
    let start = MONDAY - CET as u64;
    let expected = (0..720u64)
        .map(|i| (now - 3600 * i - start) / 3600)
        .filter(|hour| hour / 24 % 7 < 5 && (8..18).contains(&(hour % 24)))
        .count() as f64
        / 720.0;
    assert!(
        (up.fraction - expected).abs() < 1e-12,
        "{} vs {expected}",
        up.fraction
    );
    let usual = h.usual_hours(&A, now, CET).unwrap();
    assert_eq!(usual.summary(), "usually up Mon-Fri 08-18");
    assert_eq!(usual.observed(), 168);
    let f = usual.fractions_or(0.5);
    assert_eq!(
        (f[9], f[20], f[5 * 24 + 9]),
        (1.0, 0.0, 0.0),
        "Mon 09, Mon 20, Sat 09"
    );
    // Friday 18:00 to Monday 08:00.
    assert_eq!(
        usual.longest_usual_absence(),
        Duration::from_secs(62 * 3600)
    );
    // Read in UTC, the same hours are 07-17.
    let utc = h.usual_hours(&A, now, 0).unwrap();
    assert_eq!(utc.summary(), "usually up Mon-Fri 07-17");
    assert!(h.availability(&B, now).is_none(), "never observed");
}

#[test]
fn summaries() {
    let mut h = History::default();
    let t0 = MONDAY;
    for hour in 0..3 * 168u64 {
        let (day, hod) = (hour / 24 % 7, hour % 24);
        // A: always up. B: Mon-Fri 08-12 and 13-18, Saturday 09-12.
        h.observe(A, t0 + hour * 3600, true);
        let b = (day < 5 && (8..18).contains(&hod) && hod != 12)
            || (day == 5 && (9..12).contains(&hod));
        h.observe(B, t0 + hour * 3600, b);
    }
    let now = t0 + 3 * 168 * 3600 - 1;
    assert_eq!(h.usual_hours(&A, now, 0).unwrap().summary(), "always up");
    assert_eq!(
        h.usual_hours(&A, now, 0).unwrap().longest_usual_absence(),
        Duration::ZERO
    );
    assert_eq!(
        h.usual_hours(&B, now, 0).unwrap().summary(),
        "usually up Mon-Fri 08-12,13-18, Sat 09-12"
    );
    let mut off = History::default();
    for hour in 0..168u64 {
        off.observe(A, t0 + hour * 3600, false);
    }
    let u = off.usual_hours(&A, t0 + 168 * 3600, 0).unwrap();
    assert_eq!(u.summary(), "rarely up");
    assert_eq!(u.longest_usual_absence(), Duration::from_secs(168 * 3600));
    let mut short = History::default();
    short.observe(A, t0, true);
    assert_eq!(
        short.usual_hours(&A, t0, 0).unwrap().summary(),
        "too little history yet (1 of the week's 168 hours seen)"
    );
}

#[test]
fn the_ring_keeps_35_days_and_counts_30() {
    let mut h = History::default();
    // 35 days: the first five down, the last thirty up.
    for hour in 0..35 * 24u64 {
        h.observe(A, MONDAY + hour * 3600, hour >= 5 * 24);
    }
    let now = MONDAY + (35 * 24 - 1) * 3600;
    assert_eq!(h.availability(&A, now).unwrap().fraction, 1.0);
    assert_eq!(h.usual_hours(&A, now, 0).unwrap().observed(), 168);
    // Observations older than the ring are dropped.
    h.observe(A, MONDAY - 3600, false);
    assert_eq!(h.availability(&A, now).unwrap().fraction, 1.0);
    // Ten days later, after a gap: the old slots of those hours are cleared, not reused.
    let later = now + 10 * 86_400;
    h.observe(A, later, false);
    let up = h.availability(&A, later).unwrap();
    assert_eq!(up.observed_hours, 20 * 24 + 1, "{up:?}");
    assert!((up.fraction - 480.0 / 481.0).abs() < 1e-12);
    // An hour seen both up and down counts half.
    let mut both = History::default();
    both.observe(A, MONDAY, true);
    both.observe(A, MONDAY + 60, false);
    both.observe(A, MONDAY + 3600, true);
    assert_eq!(both.availability(&A, MONDAY + 3600).unwrap().fraction, 0.75);
}

#[test]
fn merge_is_the_union() {
    let (mut x, mut y) = (History::default(), History::default());
    for hour in 0..100u64 {
        let copy = if hour % 2 == 0 { &mut x } else { &mut y };
        copy.observe(A, MONDAY + hour * 3600, hour % 3 != 0);
    }
    y.observe(B, MONDAY, true);
    let mut xy = x.clone();
    xy.merge(&y);
    let mut yx = y.clone();
    yx.merge(&x);
    assert_eq!(xy, yx, "commutative");
    let mut again = xy.clone();
    again.merge(&x);
    assert_eq!(again, xy, "idempotent");
    let now = MONDAY + 99 * 3600;
    let up = xy.availability(&A, now).unwrap();
    assert_eq!(up.observed_hours, 100);
    assert!((up.fraction - 66.0 / 100.0).abs() < 1e-12);
    assert!(xy.availability(&B, now).is_some());
    // A copy far behind: its hours outside the newer ring are dropped.
    let mut old = History::default();
    old.observe(A, MONDAY - 40 * 86_400, false);
    let mut m = xy.clone();
    m.merge(&old);
    assert_eq!(m, xy);
    // Wake information: the newer report wins; counters keep the larger.
    let (mut p, mut q) = (xy.clone(), xy.clone());
    p.set_wake(A, Some([1; 6]), None, 10);
    q.set_wake(A, Some([2; 6]), Some(Ipv4Addr::new(10, 0, 0, 255)), 20);
    p.record_wake(A, true);
    p.record_wake(A, true);
    q.record_wake(A, false);
    p.merge(&q);
    let a = p.get(&A).unwrap();
    assert_eq!(a.wake.unwrap().mac, Some([2; 6]));
    assert_eq!((a.wake_tries, a.wake_ok), (2, 2));
}

#[test]
fn wake_success_and_the_model() {
    let (mut h, now) = office_pc(5);
    let m = h.agent_model(&A, now, 42).unwrap();
    assert_eq!((m.wake, m.bytes), (None, 42), "no MAC, no wake");
    h.set_wake(A, None, Some(Ipv4Addr::new(192, 168, 1, 255)), now);
    assert_eq!(
        h.get(&A).unwrap().wake_success(),
        None,
        "a broadcast alone cannot wake"
    );
    h.set_wake(
        A,
        Some([2, 0, 0, 0, 0, 1]),
        Some(Ipv4Addr::new(192, 168, 1, 255)),
        now,
    );
    assert_eq!(h.get(&A).unwrap().wake_success(), Some(0.8), "the prior");
    for i in 0..10 {
        h.record_wake(A, i != 0);
    }
    let w = h.agent_model(&A, now, 0).unwrap().wake.unwrap();
    assert!((w - 13.0 / 15.0).abs() < 1e-12, "{w}");
    assert!(h.agent_model(&B, now, 0).is_none());
}

#[test]
fn seal_round_trip_and_tamper() {
    let keys = MasterKey::generate().unwrap().derive();
    let (mut h, now) = office_pc(1);
    h.observe(B, now, false);
    h.set_wake(
        A,
        Some([2, 0, 0, 0, 0, 1]),
        Some(Ipv4Addr::new(10, 1, 2, 255)),
        now,
    );
    h.set_wake(B, None, None, now);
    h.record_wake(A, true);
    let sealed = h.seal(&keys).unwrap();
    assert_eq!(History::open(&keys, &sealed).unwrap(), h);
    assert_eq!(
        History::open(&keys, &History::default().seal(&keys).unwrap()).unwrap(),
        History::default()
    );
    let other = MasterKey::generate().unwrap().derive();
    assert!(History::open(&other, &sealed).is_err());
    for at in [0, sealed.len() / 2, sealed.len() - 1] {
        let mut bad = sealed.clone();
        bad[at] ^= 1;
        assert!(History::open(&keys, &bad).is_err(), "byte {at}");
    }
    // A record sealed under another blob name is not an availability record.
    let body = open_record(&keys, AVAILABILITY_BLOB, &sealed).unwrap();
    let moved = seal_record(&keys, "agents", &body).unwrap();
    assert!(History::open(&keys, &moved).is_err());
}

#[test]
fn hostile_bodies_are_refused() {
    let keys = MasterKey::generate().unwrap().derive();
    let head = |version: u16, hours: u16, n: u32| {
        let mut w = Writer::default();
        w.u16(version).u64(1000).u16(hours).u32(n);
        w.buf
    };
    let entry = |id: u8, flags: u8, tries: u32, ok: u32| {
        let mut w = Writer::default();
        w.bytes(&[id; 16])
            .bytes(&[0; 2 * BITS])
            .u8(flags)
            .bytes(&[0; 10])
            .u64(0)
            .u32(tries)
            .u32(ok);
        w.buf
    };
    let good = [head(1, 840, 1), entry(1, 1, 2, 1)].concat();
    let open =
        |body: &[u8]| History::open(&keys, &seal_record(&keys, AVAILABILITY_BLOB, body).unwrap());
    assert!(open(&good).is_ok());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (head(2, 840, 0), "format version 2"),
        (head(1, 24, 0), "24 hours"),
        (head(1, 840, u32::MAX), "agents in 0 bytes"),
        ([head(1, 840, 2), entry(1, 0, 0, 0)].concat(), "2 agents in"),
        (
            [head(1, 840, 1), entry(1, 0, 0, 0), vec![0]].concat(),
            "1 agents in",
        ),
        (
            [head(1, 840, 1), entry(1, 8, 0, 0)].concat(),
            "unknown flags",
        ),
        (
            [head(1, 840, 1), entry(1, 0, 1, 2)].concat(),
            "more wakes succeeded",
        ),
        (
            [head(1, 840, 2), entry(1, 0, 0, 0), entry(1, 0, 0, 0)].concat(),
            "twice",
        ),
        (vec![1, 0, 0], "truncated"),
    ];
    for (body, why) in cases {
        let err = open(&body).unwrap_err().to_string();
        assert!(err.contains(why), "{why}: {err}");
    }
}

#[test]
fn the_record_is_bounded() {
    let mut h = History::default();
    for i in 0..MAX_AGENTS as u32 {
        let mut id = [0; 16];
        id[..4].copy_from_slice(&i.to_le_bytes());
        assert!(h.observe(id, MONDAY, true));
    }
    assert!(!h.observe([0xff; 16], MONDAY, true), "full");
    assert!(
        h.observe([0; 16], MONDAY, false),
        "a known agent is still recorded"
    );
    let keys = MasterKey::generate().unwrap().derive();
    let sealed = h.seal(&keys).unwrap();
    assert!(sealed.len() < 1_100_000, "{}", sealed.len());
}
