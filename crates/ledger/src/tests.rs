use ed25519_dalek::SigningKey;
use proptest::prelude::*;

use super::*;

fn authority() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn wallet(n: u8) -> WorkerId {
    WorkerId::of(&SigningKey::from_bytes(&[n; 32]))
}

fn name(account: &Account) -> String {
    match account {
        Account::Pool => "pool".into(),
        Account::Wallet(w) => (1..=9)
            .find(|&n| wallet(n) == *w)
            .map_or_else(|| w.to_string(), |n| format!("w{n}")),
    }
}

/// Appends each draft in turn; prints each outcome and the final balances.
#[track_caller]
fn check(drafts: &[Draft], expect: expect_test::Expect) {
    let key = authority();
    let mut ledger = Ledger::new(key.verifying_key());
    let mut out = String::new();
    for (t, d) in drafts.iter().enumerate() {
        let got = match ledger.append(d.clone(), t as u64, &key) {
            Ok(Appended::New(seq)) => format!("new {seq}"),
            Ok(Appended::Existing(seq)) => format!("repeat of {seq}"),
            Err(e) => (1..=9).fold(format!("error: {e}"), |m, n| {
                m.replace(&wallet(n).to_string(), &format!("w{n}"))
            }),
        };
        out.push_str(&format!("{} {}: {got}\n", d.kind.code(), d.reference));
    }
    let balances: Vec<String> = ledger
        .balances()
        .iter()
        .map(|(a, b)| format!("{}={b}", name(a)))
        .collect();
    out.push_str(&format!(
        "balances {} minted {} burned {}",
        balances.join(" "),
        ledger.minted(),
        ledger.burned()
    ));
    expect.assert_eq(&out);
    // Whatever was appended replays to the same state.
    let replayed = Ledger::replay(key.verifying_key(), ledger.entries().to_vec()).expect("replay");
    assert_eq!(replayed.balances(), ledger.balances());
}

#[test]
fn appends_follow_the_rules() {
    check(
        &[
            Draft::mint(wallet(1), 500, "update:1"),
            Draft::mint(wallet(2), 300, "update:2"),
            Draft::mint(wallet(1), 500, "update:1"),
            Draft::mint(wallet(1), 501, "update:1"),
            Draft::spend(wallet(1), 120, "req-a"),
            Draft::spend(wallet(1), 120, "req-a"),
            Draft::spend(wallet(2), 301, "req-b"),
            Draft::transfer(wallet(1), wallet(3), 80, "tx-1"),
            Draft::transfer(wallet(1), wallet(1), 1, "tx-2"),
            Draft::mint(wallet(1), 0, "update:3"),
            Draft::spend(wallet(1), 1, ""),
            Draft::dividend(wallet(2), 50, "period-1:w2"),
            Draft {
                kind: Kind::Clawback,
                from: Some(Account::Wallet(wallet(2))),
                to: None,
                amount: 300,
                reference: "update:1".into(),
            },
            Draft {
                kind: Kind::Clawback,
                from: Some(Account::Wallet(wallet(1))),
                to: None,
                amount: 300,
                reference: "update:1".into(),
            },
            Draft {
                kind: Kind::Clawback,
                from: Some(Account::Wallet(wallet(1))),
                to: None,
                amount: 1,
                reference: "update:9".into(),
            },
        ],
        expect_test::expect![[r#"
            mint update:1: new 0
            mint update:2: new 1
            mint update:1: repeat of 0
            mint update:1: error: a mint entry with reference "update:1" exists with other accounts or amount (entry 0)
            spend req-a: new 2
            spend req-a: repeat of 2
            spend req-b: error: w2 holds 300 micro-credits; 301 are needed
            transfer tx-1: new 3
            transfer tx-2: error: a transfer entry must move a positive amount between two different wallets
            mint update:3: error: a mint entry must credit a wallet from nowhere with a positive amount
            spend : error: a spend entry must have a reference of 1 to 256 bytes
            dividend period-1:w2: new 4
            clawback update:1: error: a clawback entry must take at most the mint's amount from the wallet it credited
            clawback update:1: new 5
            clawback update:9: error: no mint with reference "update:9" to claw back
            balances w2=350 w3=80 pool=70 minted 800 burned 300"#]],
    );
}

/// A small ledger of every kind of entry.
fn sample() -> (SigningKey, Ledger) {
    let key = authority();
    let mut ledger = Ledger::new(key.verifying_key());
    let drafts = [
        Draft::mint(wallet(1), 1_000, "update:1"),
        Draft::mint(wallet(2), 600, "update:2"),
        Draft::spend(wallet(1), 200, "req-1"),
        Draft::transfer(wallet(2), wallet(3), 100, "tx-1"),
        Draft::dividend(wallet(2), 50, "p1:w2"),
    ];
    for (t, d) in drafts.into_iter().enumerate() {
        ledger.append(d, 1000 + t as u64, &key).expect("append");
    }
    let claw = ledger.clawback_draft("update:2").expect("draft");
    ledger.append(claw, 2000, &key).expect("clawback");
    (key, ledger)
}

/// Each kind of tampering is caught at the entry it touches.
#[test]
fn replay_names_the_first_broken_entry() {
    let (key, ledger) = sample();
    let good = ledger.entries().to_vec();
    let replay = |entries: Vec<Entry>| match Ledger::replay(key.verifying_key(), entries) {
        Ok(l) => format!("ok, {} entries", l.len()),
        Err(e) => e.to_string(),
    };
    let tamper = |f: &dyn Fn(&mut Vec<Entry>)| {
        let mut entries = good.clone();
        f(&mut entries);
        replay(entries)
    };
    let got = [
        replay(good.clone()),
        tamper(&|e| e[3].amount += 1),
        tamper(&|e| e[2].reference.push('x')),
        tamper(&|e| {
            e[2].amount = 150;
            e[2].hash = e[2].compute_hash();
        }),
        tamper(&|e| {
            e[4].amount = 10_000;
            e[4].hash = e[4].compute_hash();
            e[4].signature = Sig(key.sign(&e[4].hash.0).to_bytes());
        }),
        tamper(&|e| {
            e.remove(1);
        }),
        tamper(&|e| e.swap(1, 2)),
        tamper(&|e| e[5].signature.0[0] ^= 1),
        tamper(&|e| {
            let copy = e[0].clone();
            e.push(Entry {
                seq: 6,
                prev: e[5].hash,
                ..copy
            });
            e[6].hash = e[6].compute_hash();
            e[6].signature = Sig(key.sign(&e[6].hash.0).to_bytes());
        }),
    ];
    expect_test::expect![[r#"
        ok, 6 entries
        entry 3: its hash does not match its contents
        entry 2: its hash does not match its contents
        entry 2: its signature is not the ledger authority's
        entry 4: pool holds 200 micro-credits; 10000 are needed
        entry 2: out of order: expected entry 1
        entry 2: out of order: expected entry 1
        entry 5: its signature is not the ledger authority's
        entry 6: it repeats the mint reference "update:1""#]]
    .assert_eq(&got.join("\n"));
    // Signed by another key: refused at the first entry.
    let other = SigningKey::from_bytes(&[7; 32]);
    let err = Ledger::replay(other.verifying_key(), good).expect_err("wrong authority");
    assert_eq!(err.seq, 0);
}

/// Signatures are checked in batches spread over the cores: the first bad entry is
/// named wherever it falls (in any batch, before or after other damage).
#[test]
fn a_long_replay_names_the_first_bad_signature() {
    let key = authority();
    let mut ledger = Ledger::new(key.verifying_key());
    for i in 0..1_500u64 {
        let draft = Draft::mint(wallet((i % 5) as u8 + 1), 10, format!("update:{i}"));
        ledger.append(draft, i, &key).expect("append");
    }
    let good = ledger.entries().to_vec();
    let replay = |damage: &[(usize, bool)]| {
        let mut entries = good.clone();
        for &(seq, signature) in damage {
            if signature {
                entries[seq].signature.0[5] ^= 1;
            } else {
                entries[seq].amount += 1;
            }
        }
        match Ledger::replay(key.verifying_key(), entries) {
            Ok(l) => format!("ok, {} entries", l.len()),
            Err(e) => e.to_string(),
        }
    };
    let got = [
        replay(&[]),
        replay(&[(1_499, true)]),
        replay(&[(1_200, true), (300, true)]),
        replay(&[(700, true), (256, false)]),
        replay(&[(255, true), (256, false)]),
    ];
    expect_test::expect![[r#"
        ok, 1500 entries
        entry 1499: its signature is not the ledger authority's
        entry 300: its signature is not the ledger authority's
        entry 256: its hash does not match its contents
        entry 255: its signature is not the ledger authority's"#]]
    .assert_eq(&got.join("\n"));
    let head = ledger.tree_head(9, &key);
    let replayed = Ledger::replay(key.verifying_key(), good).expect("replay");
    assert_eq!(replayed.tree_head(9, &key), head);
}

/// A signed head and an inclusion proof for every entry; JSON round trip of both.
#[test]
fn tree_heads_and_proofs_check_out() {
    let (key, ledger) = sample();
    let head = ledger.tree_head(5_000, &key);
    assert!(head.verify(&key.verifying_key()));
    assert!(!head.verify(&SigningKey::from_bytes(&[7; 32]).verifying_key()));
    let forged = TreeHead {
        size: head.size + 1,
        ..head.clone()
    };
    assert!(!forged.verify(&key.verifying_key()));
    for e in ledger.entries() {
        let proof = ledger.inclusion_proof(e.seq, head.size).expect("proof");
        let json = serde_json::to_string(&proof).expect("json");
        let proof: merkle::InclusionProof = serde_json::from_str(&json).expect("parse");
        assert!(merkle::verify_inclusion(
            &e.hash, &proof, head.size, &head.root
        ));
    }
    let json = serde_json::to_string(&ledger.entries()[0]).expect("json");
    let back: Entry = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, ledger.entries()[0]);
}

#[test]
fn credit_follows_the_flops_of_the_assigned_work() {
    // The small preset (5.29M parameters), one unit of 50 steps of 8 x 128 tokens.
    assert_eq!(credit_for_work(5_290_000, 50 * 8 * 128), 1_625);
    assert_eq!(format_credits(1_625), "0.001625");
    assert_eq!(format_credits(2_500_000), "2.500000");
    // A petaFLOP is one credit.
    assert_eq!(credit_for_work(1_000_000, 166_666_667), 1_000_000);
    assert_eq!(credit_for_work(u64::MAX, u64::MAX), u64::MAX);
    // The rule by FLOPs per token gives the same amounts at 6 per parameter.
    for (n_params, tokens) in [(5_290_000, 50 * 8 * 128), (1_000_000, 166_666_667), (7, 3)] {
        assert_eq!(
            credit_for_training(6 * n_params, tokens),
            credit_for_work(n_params, tokens)
        );
    }
    assert_eq!(credit_for_training(u64::MAX, u64::MAX), u64::MAX);
}

#[test]
fn dividends_pay_the_pool_in_proportion_to_credit_earned() {
    let key = authority();
    let mut ledger = Ledger::new(key.verifying_key());
    for d in [
        Draft::mint(wallet(1), 3_000, "update:1"),
        Draft::mint(wallet(2), 1_000, "update:2"),
        Draft::spend(wallet(1), 1_001, "req-1"),
    ] {
        ledger.append(d, 0, &key).expect("append");
    }
    let drafts = ledger.dividend_drafts(0, "period-0");
    let mut got: Vec<String> = drafts
        .iter()
        .map(|d| {
            format!(
                "{} {}",
                d.to.map(|a| name(&a)).unwrap_or_default(),
                d.amount
            )
        })
        .collect();
    got.sort();
    assert_eq!(got, ["w1 750", "w2 250"]);
    for d in drafts {
        ledger.append(d, 1, &key).expect("dividend");
    }
    // The remainder of the rounding stays in the pool.
    assert_eq!(ledger.balance(&Account::Pool), 1);
    assert!(ledger.dividend_drafts(3, "period-1").is_empty());
}

/// One operation of the property test; the model below says what it should do.
#[derive(Clone, Debug)]
enum Op {
    Mint(u8, u64),
    Spend(u8, u64),
    Transfer(u8, u8, u64),
    Clawback(usize),
    Dividends,
    Retry(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4u8, 0..5_000u64).prop_map(|(w, a)| Op::Mint(w, a)),
        (0..4u8, 0..3_000u64).prop_map(|(w, a)| Op::Spend(w, a)),
        (0..4u8, 0..4u8, 0..3_000u64).prop_map(|(a, b, x)| Op::Transfer(a, b, x)),
        (0..40usize).prop_map(Op::Clawback),
        Just(Op::Dividends),
        (0..40usize).prop_map(Op::Retry),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random mints, spends, transfers, clawbacks, dividends and retries: every
    /// invariant holds after each step, balances match a plain model of the rules, a
    /// refused draft changes nothing, and the entries replay to the same state.
    #[test]
    fn random_operations_keep_every_invariant(ops in proptest::collection::vec(op(), 1..60)) {
        let key = authority();
        let mut ledger = Ledger::new(key.verifying_key());
        let mut model: BTreeMap<Account, i128> = BTreeMap::new();
        let mut drafts: Vec<Draft> = Vec::new();
        let mut dividend_from = 0u64;
        for (t, op) in ops.iter().enumerate() {
            let w = |n: u8| wallet(n + 1);
            let batch: Vec<Draft> = match op {
                Op::Mint(n, a) => vec![Draft::mint(w(*n), *a, format!("update:{t}"))],
                Op::Spend(n, a) => vec![Draft::spend(w(*n), *a, format!("req:{t}"))],
                Op::Transfer(x, y, a) => vec![Draft::transfer(w(*x), w(*y), *a, format!("tx:{t}"))],
                Op::Clawback(i) => drafts
                    .iter()
                    .filter(|d| d.kind == Kind::Mint)
                    .nth(*i)
                    .and_then(|m| ledger.clawback_draft(&m.reference).ok())
                    .into_iter()
                    .collect(),
                Op::Dividends => {
                    let d = ledger.dividend_drafts(dividend_from, &format!("period:{t}"));
                    dividend_from = ledger.len() as u64;
                    d
                }
                Op::Retry(i) => drafts.get(*i).cloned().into_iter().collect(),
            };
            for d in batch {
                let before = ledger.len();
                let expect_ok = {
                    let funded = d.from.is_none_or(|f| model.get(&f).copied().unwrap_or(0) >= d.amount as i128);
                    funded && shape(&d).is_ok()
                };
                let repeat = ledger.find(d.kind, &d.reference).is_some();
                match ledger.append(d.clone(), t as u64, &key) {
                    Ok(Appended::New(_)) => {
                        prop_assert!(expect_ok && !repeat, "{d:?} was accepted");
                        if let Some(f) = d.from { *model.entry(f).or_default() -= d.amount as i128; }
                        if let Some(to) = d.to { *model.entry(to).or_default() += d.amount as i128; }
                        drafts.push(d);
                    }
                    Ok(Appended::Existing(_)) => {
                        prop_assert!(repeat);
                        prop_assert_eq!(ledger.len(), before);
                    }
                    Err(_) => {
                        prop_assert!(!expect_ok || repeat || d.kind == Kind::Clawback, "{d:?} was refused");
                        prop_assert_eq!(ledger.len(), before);
                    }
                }
                for (account, balance) in &model {
                    prop_assert!(*balance >= 0);
                    prop_assert_eq!(ledger.balance(account) as i128, *balance);
                }
                let sum: u128 = ledger.balances().values().map(|&b| b as u128).sum();
                prop_assert_eq!(sum, ledger.minted() - ledger.burned());
            }
        }
        let replayed = Ledger::replay(key.verifying_key(), ledger.entries().to_vec());
        let replayed = replayed.expect("replayed");
        prop_assert_eq!(replayed.balances(), ledger.balances());
        // The indexes agree with a scan of every entry, replayed or appended.
        for n in 1..=4u8 {
            let account = Account::Wallet(wallet(n));
            let scanned: Vec<u64> = ledger
                .entries()
                .iter()
                .filter(|e| e.from == Some(account) || e.to == Some(account))
                .map(|e| e.seq)
                .collect();
            for l in [&ledger, &replayed] {
                let indexed: Vec<u64> = l.entries_of(&account).map(|e| e.seq).collect();
                prop_assert_eq!(&indexed, &scanned);
            }
            let mints: Vec<u64> = ledger
                .entries()
                .iter()
                .filter(|e| e.kind == Kind::Mint && e.to == Some(account))
                .map(|e| e.amount)
                .collect();
            let want = (!mints.is_empty()).then(|| (mints.iter().sum::<u64>(), mints.len() as u64));
            prop_assert_eq!(ledger.earned().get(&wallet(n)).copied(), want);
            prop_assert_eq!(replayed.earned().get(&wallet(n)).copied(), want);
        }
    }
}
