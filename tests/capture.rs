//! Capture through the eval callback on real models: a prompt's last-token
//! activations do not depend on which other prompts share its batch.

mod common;

use indicatif::ProgressBar;
use ndarray::{s, Array3};

use inferalign::capture::{capture, CaptureHook};
use inferalign::extract::steerable_layers;
use inferalign::llama::{Context, ContextParams, LoadOptions, Model};
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

/// Largest relative error over the captured layers of one prompt.
fn max_error(model: &Model, a: &Array3<f32>, ia: usize, b: &Array3<f32>, ib: usize) -> f32 {
    steerable_layers(model)
        .into_iter()
        .map(|layer| {
            let (x, y) = (a.slice(s![ia, layer, ..]), b.slice(s![ib, layer, ..]));
            assert!(y.iter().any(|&v| v != 0.0), "layer {layer} was not captured");
            relative_error(x.as_slice().unwrap(), y.as_slice().unwrap())
        })
        .fold(0.0, f32::max)
}

/// For each probe prompt: decoded alone (whole, by itself) and decoded first
/// in a batch with 32 others (shared prefix reused), twice with different
/// others. Returns the worst relative error between alone and batched.
fn alone_vs_batch(model: &Model, name: &str, params: &ContextParams) -> f32 {
    let all = prompts_for(model, name, 80);
    let layers = steerable_layers(model);
    let mut ctx = Context::new(
        model,
        params,
        CaptureHook::new(model, &layers).unwrap(),
        true,
    )
    .unwrap();
    let hidden = ProgressBar::hidden();
    let mut worst: f32 = 0.0;
    for probe in [0, 7, 13] {
        let (alone, _) = capture(&mut ctx, &all[probe..=probe], &[0], false, &hidden).unwrap();
        for others in [&all[20..52], &all[48..80]] {
            let batch: Vec<Vec<i32>> = std::iter::once(all[probe].clone()).chain(others.iter().cloned()).collect();
            let (batched, stats) = capture(&mut ctx, &batch, &[0], true, &hidden).unwrap();
            assert_eq!(stats.prompts, 33);
            worst = worst.max(max_error(model, &alone, 0, &batched, 0));
        }
    }
    worst
}

/// Where a prompt sits in a batch shifts llama.cpp's CPU kernels' rounding
/// (matmul tiling; flash attention and repacked weights too). With the prompt
/// first in the batch and weight repacking and flash attention off, nothing
/// but the batch's other prompts differs: the activations must then be the
/// ones the prompt has alone — the capture reads the right rows of the right
/// sequences and no sequence sees another. With llama.cpp's defaults the
/// difference is measured and must stay at rounding level.
fn batch_invariance(name: &str) {
    let exact_model = Model::load_with(&common::model(name), LoadOptions { weight_repack: false, ..LoadOptions::default() }).unwrap();
    let exact = ContextParams { flash_attn: Some(false), ..ContextParams::default() };
    let worst = alone_vs_batch(&exact_model, name, &exact);
    eprintln!("{name}: worst relative error alone vs in a batch of 33, shape-invariant kernels: {worst:e}");
    assert!(worst < 1e-3, "relative error {worst}");
    drop(exact_model);

    let model = Model::load(&common::model(name), 0).unwrap();
    let worst = alone_vs_batch(&model, name, &ContextParams::default());
    eprintln!("{name}: worst relative error alone vs in a batch of 33, llama.cpp default kernels: {worst:e}");
    assert!(worst < 5e-2, "relative error {worst}");
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
        let params = ContextParams {
            force_device_copy,
            ..ContextParams::default()
        };
        let mut ctx = Context::new(
            &model,
            &params,
            CaptureHook::new(&model, &layers).unwrap(),
            true,
        )
        .unwrap();
        capture(&mut ctx, &tokens, &[0], true, &hidden).unwrap().0
    };
    let (host, device) = (run(false), run(true));
    assert_eq!(host, device, "host and ggml_backend_tensor_get paths disagree");
}

#[test]
fn shared_prefix_is_decoded_once() {
    let model = Model::load(&common::model(common::QWEN), 0).unwrap();
    let tokens = prompts_for(&model, common::QWEN, 8);
    let prefix = inferalign::capture::shared_prefix_len(&tokens);
    assert!(
        prefix > 10,
        "Qwen's template should share a system prompt, got {prefix} tokens"
    );
    let mut ctx = Context::new(
        &model,
        &ContextParams::default(),
        CaptureHook::new(&model, &[1]).unwrap(),
        true,
    )
    .unwrap();
    let hidden = ProgressBar::hidden();
    let (_, reused) = capture(&mut ctx, &tokens, &[0], true, &hidden).unwrap();
    let (_, whole) = capture(&mut ctx, &tokens, &[0], false, &hidden).unwrap();
    let total: usize = tokens.iter().map(Vec::len).sum();
    assert_eq!(whole.tokens, total);
    assert_eq!(reused.tokens, total - prefix * (tokens.len() - 1));
}
