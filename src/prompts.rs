//! Prompt files (text, JSONL, CSV) and chat templating.

use std::path::Path;

use anyhow::{bail, Context, Result};
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::llama::Model;

/// Fields that hold the instruction in JSONL files, in order of preference.
const JSON_FIELDS: [&str; 4] = ["prompt", "goal", "text", "instruction"];
/// Columns that hold the instruction in CSV files, in order of preference.
const CSV_COLUMNS: [&str; 2] = ["goal", "prompt"];

/// Reads prompts from plain text (one per line), JSONL or CSV with a header.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read prompt file {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let prompts = match ext.as_str() {
        "jsonl" | "ndjson" => parse_jsonl(&text),
        "csv" => parse_csv(&text),
        _ => Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()),
    }
    .with_context(|| format!("malformed prompt file {}", path.display()))?;
    if prompts.is_empty() {
        bail!("prompt file {} holds no prompts", path.display());
    }
    Ok(prompts)
}

fn parse_jsonl(text: &str) -> Result<Vec<String>> {
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("line {}: not valid JSON", i + 1))?;
        let prompt = JSON_FIELDS
            .iter()
            .find_map(|f| value.get(f).and_then(|v| v.as_str()))
            .with_context(|| format!("line {}: no string field among {}", i + 1, JSON_FIELDS.join(", ")))?;
        prompts.push(prompt.trim().to_string());
    }
    Ok(prompts)
}

fn parse_csv(text: &str) -> Result<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new().comment(Some(b'#')).from_reader(text.as_bytes());
    let headers = reader.headers().context("no CSV header")?.clone();
    let column = CSV_COLUMNS
        .iter()
        .find_map(|c| headers.iter().position(|h| h.trim() == *c))
        .with_context(|| format!("no column named {} in the header", CSV_COLUMNS.join(" or ")))?;
    let mut prompts = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("CSV record {}", i + 1))?;
        let prompt = record.get(column).unwrap_or("").trim();
        if !prompt.is_empty() {
            prompts.push(prompt.to_string());
        }
    }
    Ok(prompts)
}

/// Splits into (train, held out): the first `n_train` prompts train, the rest
/// calibrate. A seed shuffles the order first.
pub fn split(mut prompts: Vec<String>, n_train: usize, seed: Option<u64>) -> (Vec<String>, Vec<String>) {
    if let Some(seed) = seed {
        prompts.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    }
    let held = prompts.split_off(n_train.min(prompts.len()));
    (prompts, held)
}

/// How user instructions become model input.
#[derive(Clone, Debug)]
pub struct Template {
    /// `model` (the GGUF's own), a llama.cpp built-in name, or `raw`.
    pub name: String,
    chat: Option<LlamaChatTemplate>,
    pub system_prompt: Option<String>,
}

impl Template {
    /// `requested`: a llama.cpp built-in template name, `raw` (no template), or
    /// None for the model's own. A model without a template is an error then,
    /// never a silent fallback.
    pub fn resolve(model: &Model, requested: Option<&str>, system_prompt: Option<String>) -> Result<Template> {
        let (name, chat) = match requested {
            Some("raw") => ("raw".to_string(), None),
            Some(name) => {
                let chat = LlamaChatTemplate::new(name).context("template name contains a NUL byte")?;
                (name.to_string(), Some(chat))
            }
            None => match model.llama().chat_template(None) {
                Ok(chat) => ("model".to_string(), Some(chat)),
                Err(_) => bail!(
                    "{} carries no chat template; pass --template NAME (a llama.cpp built-in such as gemma, chatml, llama3) or --template raw",
                    model.path.display()
                ),
            },
        };
        let template = Template { name, chat, system_prompt };
        template.apply(model, "test").with_context(|| format!("chat template '{}' cannot be applied", template.name))?;
        Ok(template)
    }

    /// The text the model sees for one user turn, with the generation prompt.
    pub fn apply(&self, model: &Model, instruction: &str) -> Result<String> {
        let Some(chat) = &self.chat else { return Ok(instruction.to_string()) };
        let mut messages = Vec::new();
        if let Some(system) = &self.system_prompt {
            messages.push(LlamaChatMessage::new("system".into(), system.clone())?);
        }
        messages.push(LlamaChatMessage::new("user".into(), instruction.to_string())?);
        let text = model
            .llama()
            .apply_chat_template(chat, &messages, true)
            .with_context(|| format!("llama.cpp does not know chat template '{}'", self.name))?;
        Ok(text)
    }
}

/// Tokens of a templated text; special tokens in the template are parsed.
pub fn tokenize(model: &Model, text: &str) -> Result<Vec<i32>> {
    let tokens = model.llama().vocab().tokenize(text.as_bytes(), true, true);
    anyhow::ensure!(!tokens.is_empty(), "the prompt tokenizes to nothing");
    Ok(tokens.into_iter().map(|t| t.0).collect())
}

/// Template and tokenize every prompt; fails naming a prompt that does not fit `n_ctx`.
pub fn prepare(model: &Model, template: &Template, prompts: &[String], n_ctx: usize) -> Result<Vec<Vec<i32>>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let tokens = tokenize(model, &template.apply(model, prompt)?)?;
            if tokens.len() > n_ctx {
                bail!(
                    "prompt {} ({:?}) is {} tokens long, more than the context size {n_ctx}; shorten it or raise --ctx-size",
                    i + 1,
                    preview(prompt),
                    tokens.len()
                );
            }
            Ok(tokens)
        })
        .collect()
}

/// The first few words of a prompt, for error messages and tables.
pub fn preview(prompt: &str) -> String {
    const MAX: usize = 48;
    if prompt.chars().count() <= MAX {
        prompt.to_string()
    } else {
        format!("{}…", prompt.chars().take(MAX).collect::<String>())
    }
}
