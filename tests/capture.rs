//! Capture through the eval callback on real models: a prompt's last-token
//! activations do not depend on which other prompts share its batch.

mod common;

use indicatif::ProgressBar;
use ndarray::{s, Array3};

use inferalign::capture::{capture, CaptureHook};
use inferalign::extract::steerable_layers;
use inferalign::llama::{Context, ContextParams, Model};
use inferalign::prompts::{prepare, read_prompts, Template};

fn prompts_for(model: &Model, name: &str, n: usize) -> Vec<Vec<i32>> {
    let template_name = (name == common::GEMMA).then_some("gemma");
    let template = Template::resolve(model, template_name, None).unwrap();
    let harmful = read_prompts(&common::advbench()).unwrap();
    let harmless = read_prompts(&common::harmless()).unwrap();
    let mixed: Vec<String> = harmful.into_iter().zip(harmless).flat_map(|(a, b)| [a, b]).take(n).collect();
    prepare(model, &template, &mixed, 4096).unwrap()
}

fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
    let norm: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
    diff / norm
}

fn assert_close(model: &Model, alone: &Array3<f32>, alone_index: usize, batched: &Array3<f32>, batch_index: usize) {
    for layer in steerable_layers(model) {
        let a = alone.slice(s![alone_index, layer, ..]);
        let b = batched.slice(s![batch_index, layer, ..]);
        let err = relative_error(a.as_slice().unwrap(), b.as_slice().unwrap());
        assert!(err < 1e-3, "prompt {batch_index}, layer {layer}: relative error {err}");
        assert!(b.iter().any(|&x| x != 0.0), "layer {layer} was not captured");
    }
}

fn batch_invariance(name: &str) {
    let model = Model::load(&common::model(name), 0).unwrap();
    let tokens = prompts_for(&model, name, 33);
    let layers = steerable_layers(&model);
    let mut ctx = Context::new(&model, &ContextParams::default(), CaptureHook::new(&model, &layers), true).unwrap();
    let hidden = ProgressBar::hidden();
    let (batched, stats) = capture(&mut ctx, &tokens, true, &hidden).unwrap();
    assert_eq!(stats.prompts, 33);
    for i in [0, 1, 16, 32] {
        let (alone, _) = capture(&mut ctx, &tokens[i..=i], true, &hidden).unwrap();
        assert_close(&model, &alone, 0, &batched, i);
    }
    // Without prefix reuse every prompt is decoded whole: same activations.
    let (whole, _) = capture(&mut ctx, &tokens, false, &hidden).unwrap();
    for i in [3, 30] {
        assert_close(&model, &whole, i, &batched, i);
    }
}

#[test]
fn qwen_prompt_alone_equals_prompt_in_batch_of_33() {
    batch_invariance(common::QWEN);
}

#[test]
fn gemma_prompt_alone_equals_prompt_in_batch_of_33() {
    batch_invariance(common::GEMMA);
}

#[test]
fn forced_device_copy_path_reads_the_same_activations() {
    let model = Model::load(&common::model(common::GEMMA), 0).unwrap();
    let tokens = prompts_for(&model, common::GEMMA, 6);
    let layers = steerable_layers(&model);
    let hidden = ProgressBar::hidden();
    let run = |force_device_copy: bool| {
        let params = ContextParams { force_device_copy, ..ContextParams::default() };
        let mut ctx = Context::new(&model, &params, CaptureHook::new(&model, &layers), true).unwrap();
        capture(&mut ctx, &tokens, true, &hidden).unwrap().0
    };
    let (host, device) = (run(false), run(true));
    assert_eq!(host, device, "host and ggml_backend_tensor_get paths disagree");
}

#[test]
fn shared_prefix_is_decoded_once() {
    let model = Model::load(&common::model(common::QWEN), 0).unwrap();
    let tokens = prompts_for(&model, common::QWEN, 8);
    let prefix = inferalign::capture::shared_prefix_len(&tokens);
    assert!(prefix > 10, "Qwen's template should share a system prompt, got {prefix} tokens");
    let mut ctx = Context::new(&model, &ContextParams::default(), CaptureHook::new(&model, &[1]), true).unwrap();
    let hidden = ProgressBar::hidden();
    let (_, reused) = capture(&mut ctx, &tokens, true, &hidden).unwrap();
    let (_, whole) = capture(&mut ctx, &tokens, false, &hidden).unwrap();
    let total: usize = tokens.iter().map(Vec::len).sum();
    assert_eq!(whole.tokens, total);
    assert_eq!(reused.tokens, total - prefix * (tokens.len() - 1));
}
