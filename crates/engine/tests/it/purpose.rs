//! Evaluation backends: no optimizer state, and the same forward bits as training ones.

use engine::{EngineError, LlamaConfig, ModelSpec, Preset, Purpose};

use crate::vocab_batch;

/// Losses and decoded logits of an evaluation backend equal a training backend's to the
/// bit, at one thread and two; an evaluation backend refuses to train.
#[track_caller]
fn check(spec: &ModelSpec) {
    let params = spec.init_params(3).expect("init");
    let vocab = spec.architecture.vocab_size();
    let batches = [vocab_batch(vocab, 3, 17, 1), vocab_batch(vocab, 2, 64, 2)];
    for threads in [1, 2] {
        let device = format!("cpu:{threads}");
        let open =
            |purpose| engine::open_model(&device, spec, params.clone(), purpose).expect("backend");
        let (mut train, mut eval) = (open(Purpose::Train), open(Purpose::Eval));
        for b in &batches {
            let want = train.eval_loss(&b.as_batch()).expect("train loss");
            let got = eval.eval_loss(&b.as_batch()).expect("eval loss");
            assert_eq!(got.to_bits(), want.to_bits(), "{threads} threads");
        }
        for token in [5u32, 11, 96] {
            let want = train.decode_step(token).expect("decode").to_vec();
            let got = eval.decode_step(token).expect("decode");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(got), bits(&want));
        }
        let b = batches[0].as_batch();
        assert!(matches!(eval.loss_and_grad(&b), Err(EngineError::EvalOnly)));
        let step = eval.train_step(&b, &engine::OptimizerConfig::default(), 1e-3);
        assert!(matches!(step, Err(EngineError::EvalOnly)));
        // A training backend's step still works after the comparison.
        train
            .train_step(&b, &engine::OptimizerConfig::default(), 1e-3)
            .expect("train step");
    }
}

#[test]
fn an_eval_backend_computes_the_same_forward_bits_and_refuses_to_train() {
    check(&ModelSpec::preset(Preset::Tiny, 97));
    let llama = LlamaConfig {
        vocab_size: 97,
        max_seq: 64,
        ..crate::micro_llama(false)
    };
    check(&ModelSpec::llama("micro-llama", llama));
    check(&ModelSpec::llama_lora(
        "micro-lora",
        llama,
        crate::micro_lora(),
    ));
}
