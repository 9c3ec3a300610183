//! The simulator in CI: the same seed gives the same run, and over several seeds, each
//! with an attack of its own, the defended network ends within 5% of the same network
//! with every worker honest, pays its attackers nothing and refuses at most 2% of the
//! honest units. The sweep over every attack and the claims on long runs are `cargo
//! xtask sim` (README, BENCHMARKS.md).

use std::path::PathBuf;

use sim::{Attack, Defense, Report, Scenario};

struct Inputs {
    dir: tempfile::TempDir,
    corpus: PathBuf,
    tokenizer: PathBuf,
}

fn inputs() -> Inputs {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(root.join("data/shakespeare.txt")).expect("corpus");
    let cut = text[..300_000].rfind('\n').unwrap_or(300_000);
    let corpus = dir.path().join("shakespeare-300k.txt");
    std::fs::write(&corpus, &text[..cut]).expect("write corpus");
    Inputs {
        dir,
        corpus,
        tokenizer: root.join("data/tokenizer.json"),
    }
}

fn run(inputs: &Inputs, scenario: &Scenario) -> Report {
    let dir = tempfile::tempdir_in(inputs.dir.path()).expect("run dir");
    match sim::run(scenario, dir.path(), &inputs.corpus, &inputs.tokenizer) {
        Ok(r) => r,
        Err(e) => panic!("seed {}: {e}", scenario.seed),
    }
}

/// A sweep's JSON names each attack as `--attacks` and the table do.
#[test]
fn reports_name_attacks_as_the_command_line_does() {
    for attack in Attack::ALL {
        let json = serde_json::to_value(attack).expect("serialize");
        assert_eq!(json, attack.name(), "{attack:?}");
    }
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let inputs = inputs();
    let scenario = Scenario {
        rounds: 3,
        ..Scenario::new(7, 4, Some((Attack::Copy, 1)))
    };
    let a = run(&inputs, &scenario);
    let b = run(&inputs, &scenario);
    assert_eq!(a, b, "seed {}", scenario.seed);
    let other = run(
        &inputs,
        &Scenario {
            seed: 8,
            ..scenario.clone()
        },
    );
    assert_ne!(a.final_loss, other.final_loss);
}

#[test]
fn seeds_each_with_an_attack_train_as_if_clean_and_pay_attackers_nothing() {
    let inputs = inputs();
    let cases = [
        (1, Attack::Scale100),
        (2, Attack::Alie),
        (3, Attack::Copy),
        (4, Attack::Sybil),
        (5, Attack::Ipm),
    ];
    // Honest units refused on their content, of those sent. The bound is 1%,
    // measured over the sweep's 66 runs (BENCHMARKS.md); these five runs send under 400
    // honest units, and one unit whose data teaches little (refused alike for every
    // worker that trains it, since training is deterministic) costs up to five, so the
    // test allows 2%.
    let mut refused = (0, 0);
    for (seed, attack) in cases {
        let (honest, attackers) = sim::matrix::workers(attack);
        let attacked = Scenario {
            rounds: 8,
            ..Scenario::new(seed, honest, Some((attack, attackers)))
        };
        let clean = run(
            &inputs,
            &Scenario {
                honest: honest + attackers,
                attack: None,
                ..attacked.clone()
            },
        );
        let defended = run(&inputs, &attacked);
        let ratio = defended.final_loss / clean.final_loss;
        let what = format!("seed {seed}, {}: {defended:?}", attack.name());
        assert!(
            defended.final_loss < clean.initial_loss - 2.0,
            "it learns: {what}"
        );
        assert!(ratio <= 1.05, "within 5% of clean ({ratio}): {what}");
        assert_eq!(defended.attackers.credited, 0, "no lie is credited: {what}");
        refused.0 += defended.honest.judged_false();
        refused.1 += defended.honest.submitted;
        assert!(
            defended.honest.accepted > 0 && defended.attackers.submitted > 0,
            "{what}"
        );
        if matches!(attack, Attack::Scale100 | Attack::Sybil) {
            // The attack bites the plain mean.
            let plain = run(
                &inputs,
                &Scenario {
                    defense: Defense::Plain,
                    ..attacked.clone()
                },
            );
            let bitten = plain.final_loss / clean.final_loss;
            assert!(
                bitten.is_nan() || bitten >= 1.2,
                "the plain mean ends {bitten} of clean: seed {seed}"
            );
        }
    }
    assert!(
        refused.0 * 50 <= refused.1,
        "honest units refused: {} of {}",
        refused.0,
        refused.1
    );
}

/// The plain mean takes a NaN as it comes and loses the model (its loss is infinite from
/// then on); the defended network refuses it and learns.
#[test]
fn a_nan_ruins_the_plain_mean_and_not_the_defended_network() {
    let inputs = inputs();
    let attacked = Scenario {
        rounds: 3,
        ..Scenario::new(9, 8, Some((Attack::NaN, 2)))
    };
    let plain = run(
        &inputs,
        &Scenario {
            defense: Defense::Plain,
            ..attacked.clone()
        },
    );
    assert!(plain.final_loss.is_infinite(), "{plain:?}");
    assert!(plain.attackers.credited > 0, "{plain:?}");
    let defended = run(&inputs, &attacked);
    assert!(
        defended.final_loss < defended.initial_loss - 1.0,
        "{defended:?}"
    );
    assert_eq!(defended.attackers.credited, 0, "{defended:?}");
    assert!(
        defended
            .attackers
            .rejected
            .get("non_finite")
            .copied()
            .unwrap_or(0)
            > 0,
        "{defended:?}"
    );
}
