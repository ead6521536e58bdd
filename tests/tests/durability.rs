//! The durability model's commands on six loopback agents: `status --durability` and
//! `plan --target`, values checked against the closed form, assumptions printed, bad values
//! refused. (The same commands with PCs that can be woken: `tests/tests/wake.rs`.)

use std::process::Output;

use sa_tests::cluster::{expect_fail, parse_json, shown};
use sa_tests::{Cluster, ImageSpec, MIB};
use serde_json::Value;

/// The model's commands on six loopback agents (no root needed; loopback reports no MAC, so
/// none can be woken): `status --durability` gives the closed-form availability for the
/// assumed 80% and says what it assumed; a measured-throughput flag drops that assumption and
/// a higher loss rate gives a higher yearly loss; `plan --target 1e-6` recommends a scheme
/// meeting the target on six agents; bad values are usage errors naming the flag.
#[test]
fn model_commands_on_loopback_agents() {
    let c = Cluster::start_with(sa_tests::cluster::ClusterOptions {
        agents: 6,
        agent_args: (0..6)
            .map(|i| (i, vec!["--min-free".into(), "0".into()]))
            .collect(),
        ..Default::default()
    });
    let img = ImageSpec::random(8 * MIB, 0x3a4e_0002).write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    let run = |args: &[&str]| -> (Output, Value) {
        let out = c.sa(args);
        assert!(out.status.success(), "{args:?}: {}", shown(&out));
        let v = parse_json(&String::from_utf8_lossy(&out.stdout), &shown(&out));
        (out, v)
    };
    let (_, d) = run(&["status", "--durability", "--json"]);
    let p = sa_tests::binomial_at_least(6, 4, 0.8);
    for f in ["snapshot", "stripe_mean", "stripe_worst"] {
        let got = d["report"]["awake"][f].as_f64().unwrap();
        assert!((got - p).abs() < 1e-9, "{f}: {got} != {p}");
        assert_eq!(
            d["report"]["woken"][f], d["report"]["awake"][f],
            "no MAC, no waking"
        );
    }
    assert_eq!(d["report"]["wakeable"], 0, "{d}");
    assert_eq!(
        (
            d["report"]["scheme"]["k"].as_u64(),
            d["report"]["scheme"]["m"].as_u64()
        ),
        (Some(4), Some(2))
    );
    let assumed: Vec<&str> = d["measured"]["assumptions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        assumed
            .iter()
            .any(|a| a.starts_with("availability 80% assumed")),
        "{assumed:?}"
    );
    assert!(
        assumed
            .iter()
            .any(|a| a.starts_with("repair throughput 10 MB/s assumed")),
        "{assumed:?}"
    );
    let loss10 = d["report"]["loss"]["per_year"].as_f64().unwrap();
    assert!(loss10 > 0.0 && loss10 < 1.0, "{d}");

    let (_, d) = run(&[
        "status",
        "--durability",
        "--json",
        "--repair-throughput",
        "40MiB/s",
        "--loss-rate",
        "20%",
    ]);
    assert_eq!(
        d["measured"]["fleet"]["repair_throughput"].as_f64(),
        Some(40.0 * 1048576.0)
    );
    assert!(
        !d["measured"]["assumptions"]
            .to_string()
            .contains("repair throughput"),
        "{d}"
    );
    let loss20 = d["report"]["loss"]["per_year"].as_f64().unwrap();
    assert!(
        loss20 > loss10,
        "twice the loss rate, less loss? {loss20} vs {loss10}"
    );

    let out = c.sa(&["status", "--durability"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("without waking:  whole snapshot {p:.6}")),
        "{text}"
    );
    assert!(text.contains("cannot be woken (MAC unknown)"), "{text}");
    assert!(text.contains("keep an offsite copy"), "{text}");

    let (_, pl) = run(&["plan", "--target", "1e-6", "--json"]);
    let best = &pl["plan"]["best"]["report"];
    assert!(best["loss"]["per_year"].as_f64().unwrap() <= 1e-6, "{pl}");
    let (k, m) = (
        best["scheme"]["k"].as_u64().unwrap(),
        best["scheme"]["m"].as_u64().unwrap(),
    );
    assert!(k >= 1 && m >= 1 && k + m <= 6, "{pl}");
    let out = c.sa(&["plan", "--target", "1e-6"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("recommended: k={k} m={m} ")),
        "{text}"
    );

    for (args, flag) in [
        (vec!["plan"], "--target"),
        (vec!["plan", "--target", "2"], "--target"),
        (
            vec!["plan", "--target", "1e-6", "--loss-rate", "150%"],
            "--loss-rate",
        ),
        (
            vec!["status", "--durability", "--repair-throughput", "0"],
            "--repair-throughput",
        ),
    ] {
        let err = expect_fail(&c.sa(&args), Some(64), &format!("{args:?}"));
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}
