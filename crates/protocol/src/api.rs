//! The JSON side of the HTTP API (`/v1/...`): request and reply types shared by the
//! coordinator and the worker. The update itself travels as the binary format of
//! [`crate::update`]; everything else is JSON.

use serde::{Deserialize, Serialize};

use crate::{Codec, WorkUnit};

/// What a worker needs to know to take part in a run (`GET /v1/run`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The model preset's name (`tiny`, `small`, ...). The exact shape travels in the
    /// checkpoint's metadata and in `model`.
    pub preset: String,
    /// Floats in an update: the model's trainable length (`model.trainable_len()`).
    pub n_params: u32,
    /// The run's model: architecture, shape and which tensors a delta carries. Workers
    /// build their backend from it and check the checkpoints they fetch against it.
    pub model: engine::ModelSpec,
    /// Sequences per local step.
    pub batch: u32,
    /// Tokens per sequence.
    pub seq: u32,
    /// Shards of the train stream that unit addresses refer to.
    pub n_shards: u32,
    /// The codec workers encode their updates with.
    pub codec: Codec,
    /// The corpus's file name (its extension says text or JSON lines).
    pub corpus_name: String,
    /// SHA-256 and length of the corpus (`GET /v1/run/corpus`).
    pub corpus_sha256: String,
    pub corpus_bytes: u64,
    /// SHA-256 of the tokenizer.json (`GET /v1/run/tokenizer`).
    pub tokenizer_sha256: String,
    /// How the corpus becomes training windows.
    #[serde(default)]
    pub data: DataFormat,
    /// The pretrained base a fine-tune starts from (`GET /v1/run/base`); none for a
    /// model trained from scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseInfo>,
    /// The newest model version.
    pub version: u64,
}

/// How a run's corpus becomes training windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Text (or JSON lines with a `text` field), tokenized into one stream; a window may
    /// start anywhere.
    #[default]
    Text,
    /// Chat JSON lines (`{"messages": [...]}`) rendered through the base model's chat
    /// template and packed whole into windows, the loss on the assistant's turns only.
    Chat,
}

/// The pretrained base of a fine-tune, named by its content: a worker fetches the file
/// once, checks its SHA-256 and keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseInfo {
    /// The file's name (a GGUF file).
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
}

/// `POST /v1/workers`: a worker introduces itself (the request is signed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub name: String,
    /// What it computes on, measured when it started (workers before this field send
    /// none: their class is unknown, so their re-runs are judged as another class's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
}

/// Longest `device` or `class` a worker may report, in bytes.
pub const MACHINE_TEXT_MAX: usize = 200;
/// Largest training throughput a worker may report, in tokens a second.
pub const MACHINE_TOKENS_PER_S_MAX: f64 = 1e9;

/// A worker's machine as it measured it when it started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// The device in words (`cpu (8 threads)`, `cuda:0 (NVIDIA H200, bf16)`).
    pub device: String,
    /// Its determinism class (`engine::cpu_class()`, `GpuInfo::class()`): machines of
    /// one class compute the same bits for the same unit, so re-runs compare bit for bit
    /// only within a class.
    pub class: String,
    /// Tokens a second of a training step of the run's model at the run's batch shape.
    pub tokens_per_s: f64,
}

impl Machine {
    /// What is wrong with a report, in a sentence; `None` when it is within bounds.
    pub fn problem(&self) -> Option<String> {
        for (what, text) in [("device", &self.device), ("class", &self.class)] {
            if text.is_empty()
                || text.len() > MACHINE_TEXT_MAX
                || text.chars().any(char::is_control)
            {
                return Some(format!(
                    "machine.{what} must be 1 to {MACHINE_TEXT_MAX} bytes of printable text"
                ));
            }
        }
        if !(self.tokens_per_s.is_finite()
            && self.tokens_per_s > 0.0
            && self.tokens_per_s <= MACHINE_TOKENS_PER_S_MAX)
        {
            return Some(format!(
                "machine.tokens_per_s must be a number above 0 and at most {MACHINE_TOKENS_PER_S_MAX:e}"
            ));
        }
        None
    }
}

/// `POST /v1/lease`: a unit, or come back later.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LeaseReply {
    Lease {
        /// Flat on the wire: the address's fields beside the unit's.
        #[serde(with = "crate::unit::FlatUnit")]
        unit: WorkUnit,
        /// blake3 of the base checkpoint's bytes.
        model_blake3: String,
        /// The lease ends this many ms from now unless a heartbeat extends it.
        lease_ms: u64,
        /// Send a heartbeat at least this often.
        heartbeat_ms: u64,
    },
    NoWork {
        retry_after_ms: u64,
    },
}

/// `POST /v1/heartbeat`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub unit: u64,
}

/// `POST /v1/updates` accepted the update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubmitReply {
    pub unit: u64,
    pub norm: f32,
    /// Updates accepted in the unit's round so far, this one included.
    pub round_accepted: u32,
    /// Micro-credits minted to the sender's wallet for the unit.
    #[serde(default)]
    pub credit: u64,
}

/// The body of every 4xx and 5xx reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable machine code (`bad_signature`, `stale`, `body_too_large`, ...).
    pub code: String,
    /// A sentence that says what happened and what to do.
    pub message: String,
}

/// One round in `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundStatus {
    pub round: u64,
    pub base_version: u64,
    /// The version the round was aggregated into, once it was.
    pub version: Option<u64>,
    /// Holdout loss of `version`.
    pub holdout_loss: Option<f32>,
    pub accepted: u64,
    pub rejected: u64,
    pub tokens: u64,
    /// Bytes of the accepted updates.
    pub bytes: u64,
    /// From the round's start to its aggregation (or to now).
    pub seconds: f64,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub round: u64,
    pub version: u64,
    /// Holdout loss of the initial version.
    pub initial_holdout_loss: f32,
    pub workers: u64,
    pub units_queued: u32,
    pub units_leased: u32,
    pub units_accepted: u32,
    pub rounds: Vec<RoundStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_reports_are_bounded() {
        let ok = Machine {
            device: "cpu (2 threads)".into(),
            class: "cpu/x86-v4/l1-48k-l2-2m-l3-32m".into(),
            tokens_per_s: 6500.0,
        };
        let cases: Vec<(Machine, Option<&str>)> = vec![
            (ok.clone(), None),
            (
                Machine {
                    device: String::new(),
                    ..ok.clone()
                },
                Some("machine.device"),
            ),
            (
                Machine {
                    class: "x".repeat(MACHINE_TEXT_MAX + 1),
                    ..ok.clone()
                },
                Some("machine.class"),
            ),
            (
                Machine {
                    class: "a\nb".into(),
                    ..ok.clone()
                },
                Some("machine.class"),
            ),
            (
                Machine {
                    tokens_per_s: f64::NAN,
                    ..ok.clone()
                },
                Some("machine.tokens_per_s"),
            ),
            (
                Machine {
                    tokens_per_s: 0.0,
                    ..ok.clone()
                },
                Some("machine.tokens_per_s"),
            ),
            (
                Machine {
                    tokens_per_s: 2e9,
                    ..ok.clone()
                },
                Some("machine.tokens_per_s"),
            ),
        ];
        for (machine, want) in cases {
            let got = machine.problem();
            match want {
                None => assert_eq!(got, None, "{machine:?}"),
                Some(start) => assert!(
                    got.as_deref().is_some_and(|p| p.starts_with(start)),
                    "{machine:?}: {got:?}"
                ),
            }
        }
        // An old worker's request, without the field, still parses.
        let old: RegisterRequest = serde_json::from_str(r#"{"name":"w"}"#).expect("old request");
        assert_eq!(old.machine, None);
    }

    #[track_caller]
    fn check(info: &RunInfo, expect: expect_test::Expect) {
        let json = serde_json::to_string(info).expect("json");
        expect.assert_eq(&json);
        let back: RunInfo = serde_json::from_str(&json).expect("parse");
        assert_eq!(&back, info);
    }

    /// `GET /v1/run` names the model by its whole spec, next to the fields workers of
    /// earlier versions read.
    #[test]
    fn run_info_carries_the_model_spec() {
        let model = engine::ModelSpec::preset(engine::Preset::Tiny, 300);
        check(
            &RunInfo {
                preset: "tiny".into(),
                n_params: model.trainable_len() as u32,
                model,
                batch: 4,
                seq: 64,
                n_shards: 8,
                codec: Codec::Fp32,
                corpus_name: "corpus.txt".into(),
                corpus_sha256: "ab".into(),
                corpus_bytes: 10,
                tokenizer_sha256: "cd".into(),
                data: DataFormat::Text,
                base: None,
                version: 3,
            },
            expect_test::expect![[
                r#"{"preset":"tiny","n_params":37120,"model":{"name":"tiny","architecture":{"gpt2":{"n_layer":2,"n_head":2,"n_embd":32,"n_ctx":64,"vocab_size":300}},"trainable":"all"},"batch":4,"seq":64,"n_shards":8,"codec":{"kind":"fp32"},"corpus_name":"corpus.txt","corpus_sha256":"ab","corpus_bytes":10,"tokenizer_sha256":"cd","data":"text","version":3}"#
            ]],
        );
    }
}
