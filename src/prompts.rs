//! Prompt files (text, JSONL, CSV) and chat templating.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;

use crate::llama::Model;

/// Fields that hold the instruction in JSONL files, in order of preference.
const JSON_FIELDS: [&str; 4] = ["prompt", "goal", "text", "instruction"];
/// Columns that hold the instruction in CSV files, in order of preference.
const CSV_COLUMNS: [&str; 2] = ["goal", "prompt"];

/// Reads prompts from plain text (one per line, trimmed), JSONL or CSV with a
/// header. A JSON or CSV string is kept as written: with `--template raw` its
/// trailing newline is the assistant header's last token.
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
        ensure!(!prompt.trim().is_empty(), "line {}: the prompt is empty; remove the line or fill in the prompt", i + 1);
        prompts.push(prompt.to_string());
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
        let prompt = record.get(column).unwrap_or("");
        if !prompt.trim().is_empty() {
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
    /// `model` (the GGUF's own Jinja template), a llama.cpp built-in name, or `raw`.
    pub name: String,
    kind: TemplateKind,
    pub system_prompt: Option<String>,
}

#[derive(Clone, Debug)]
enum TemplateKind {
    /// The model's Jinja template, rendered as llama.cpp's `--jinja` does, so
    /// model defaults such as a built-in system prompt are kept.
    Jinja(Arc<minijinja::Environment<'static>>),
    /// One of llama.cpp's built-in templates, by name.
    Builtin(LlamaChatTemplate),
    Raw,
}

impl Template {
    /// `requested`: a llama.cpp built-in template name, `raw` (no template), or
    /// None for the model's own. A model without a template is an error then,
    /// never a silent fallback.
    pub fn resolve(model: &Model, requested: Option<&str>, system_prompt: Option<String>) -> Result<Template> {
        let (name, kind) = match requested {
            Some("raw") => ("raw".to_string(), TemplateKind::Raw),
            Some(name) => {
                let chat = LlamaChatTemplate::new(name).context("template name contains a NUL byte")?;
                (name.to_string(), TemplateKind::Builtin(chat))
            }
            None => match model.meta("tokenizer.chat_template") {
                Some(source) => ("model".to_string(), TemplateKind::Jinja(Arc::new(jinja_env(source)?))),
                None => bail!(
                    "{} carries no chat template; pass --template NAME (a llama.cpp built-in such as gemma, chatml, llama3) or --template raw",
                    model.path.display()
                ),
            },
        };
        let template = Template { name, kind, system_prompt };
        template.apply(model, "test").with_context(|| format!("chat template '{}' cannot be applied", template.name))?;
        Ok(template)
    }

    /// Tokens the template puts after the last user turn's content (end of
    /// turn, assistant header): how far before the last prompt token the
    /// user's own last token sits. None when the template's tokens around the
    /// content do not split cleanly there.
    pub fn post_instruction_len(&self, model: &Model) -> Result<Option<usize>> {
        const PROBE: &str = "Say the word probe";
        let text = self.apply(model, PROBE)?;
        let Some(at) = text.rfind(PROBE) else { return Ok(None) };
        let head = &text[..at + PROBE.len()];
        let whole = tokenize(model, &text)?;
        let head = tokenize(model, head)?;
        Ok(whole.starts_with(&head).then(|| whole.len() - head.len()))
    }

    /// Tokens that open a user turn's content (the end of the turn before and
    /// the user header, as far as every user turn shares them): extraction
    /// fits the request probe on what follows their last occurrence. Empty for `raw`.
    pub fn user_header(&self, model: &Model) -> Result<Vec<i32>> {
        const FIRST: &str = "Say the word probe";
        const REPLY: &str = "The word probe";
        const SECOND: &str = "Say the word other";
        let one = self.apply(model, FIRST)?;
        let two = self.apply_chat(model, &[("user", FIRST), ("assistant", REPLY), ("user", SECOND)])?;
        let (Some(a), Some(b)) = (one.rfind(FIRST), two.rfind(SECOND)) else { return Ok(Vec::new()) };
        let (a, b) = (&one[..a], &two[..b]);
        let common = a.chars().rev().zip(b.chars().rev()).take_while(|(x, y)| x == y).map(|(c, _)| c.len_utf8()).sum::<usize>();
        let header = &a[a.len() - common..];
        if header.trim().is_empty() {
            return Ok(Vec::new());
        }
        Ok(model.llama().vocab().tokenize(header.as_bytes(), false, true).into_iter().map(|t| t.0).collect())
    }

    /// Tokens every conversation templated this way opens with (BOS, the
    /// template's own system prompt, the first user header): what the gate
    /// does not read. At most BOS for `raw`.
    pub fn opening(&self, model: &Model) -> Result<Vec<i32>> {
        let [a, b] = ["a", "b"].map(|text| self.apply(model, text).and_then(|t| tokenize(model, &t)));
        let (mut a, b) = (a?, b?);
        a.truncate(common_prefix(&a, &b));
        Ok(a)
    }

    /// The text the model sees for one user turn, with the generation prompt.
    pub fn apply(&self, model: &Model, instruction: &str) -> Result<String> {
        self.apply_chat(model, &[("user", instruction)])
    }

    /// The text and tokens the model reads for a conversation: the
    /// template's turn markers are special tokens, a message's text is text
    /// (see [`crate::markers`]).
    pub fn tokens(&self, model: &Model, conversation: &[(&str, &str)]) -> Result<(String, Vec<i32>)> {
        self.tokens_opened(model, conversation, "")
    }

    /// As [`Template::tokens`], with the assistant's answer begun with `opening`.
    pub fn tokens_opened(&self, model: &Model, conversation: &[(&str, &str)], opening: &str) -> Result<(String, Vec<i32>)> {
        let render = |turns: &[(&str, &str)]| Ok(self.apply_chat(model, turns)? + opening);
        if let TemplateKind::Raw = self.kind {
            // Raw text is the user's own templating, special tokens and all.
            return parsed(model, render(conversation)?);
        }
        crate::markers::tokens(model, conversation, render)
    }

    /// The text for a conversation of (role, content) turns (after the system
    /// prompt, if any), ending with the generation prompt.
    pub fn apply_chat(&self, model: &Model, conversation: &[(&str, &str)]) -> Result<String> {
        let mut turns = Vec::new();
        if let Some(system) = &self.system_prompt {
            turns.push(("system", system.as_str()));
        }
        turns.extend_from_slice(conversation);
        match &self.kind {
            TemplateKind::Raw => Ok(turns.iter().map(|(_, c)| *c).collect::<Vec<_>>().join("\n")),
            TemplateKind::Jinja(env) => {
                let messages: Vec<_> = turns.iter().map(|&(role, content)| minijinja::context! { role, content }).collect();
                let text = env.get_template("chat")?.render(minijinja::context! {
                    messages,
                    add_generation_prompt => true,
                    bos_token => token_text(model, model.llama().vocab().bos()),
                    eos_token => token_text(model, model.llama().vocab().eos()),
                })?;
                Ok(text)
            }
            TemplateKind::Builtin(chat) => {
                let messages = turns
                    .iter()
                    .map(|(role, content)| LlamaChatMessage::new(role.to_string(), content.to_string()))
                    .collect::<Result<Vec<_>, _>>()?;
                let text = model
                    .llama()
                    .apply_chat_template(chat, &messages, true)
                    .with_context(|| format!("llama.cpp does not know chat template '{}'", self.name))?;
                Ok(text)
            }
        }
    }
}

fn token_text(model: &Model, token: llama_cpp_2::token::LlamaToken) -> String {
    model.llama().vocab().text(token).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn jinja_env(source: String) -> Result<minijinja::Environment<'static>> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
    });
    env.add_template_owned("chat", source)
        .context("the model's chat template is not valid Jinja; pass --template NAME to use a llama.cpp built-in")?;
    Ok(env)
}

/// Tokens of a templated text; special tokens in the template are parsed, and
/// BOS is added unless the template already wrote it.
pub fn tokenize(model: &Model, text: &str) -> Result<Vec<i32>> {
    let tokens = model.llama().vocab().tokenize(text.as_bytes(), adds_special(model, text), true);
    anyhow::ensure!(!tokens.is_empty(), "the prompt tokenizes to nothing");
    Ok(tokens.into_iter().map(|t| t.0).collect())
}

/// `text` and its tokens, special tokens parsed (see [`tokenize`]).
pub fn parsed(model: &Model, text: String) -> Result<(String, Vec<i32>)> {
    let tokens = tokenize(model, &text)?;
    Ok((text, tokens))
}

/// Whether tokenizing `text` adds BOS (and EOS): not when the template wrote BOS.
pub fn adds_special(model: &Model, text: &str) -> bool {
    let bos = token_text(model, model.llama().vocab().bos());
    bos.is_empty() || !text.starts_with(&bos)
}

/// Where the request starts in templated `tokens`: after the last
/// `header` (see [`Template::user_header`]); 0 (the whole prompt) without one.
/// The header's last token may merge with the content's first characters
/// (a newline before a newline): then the request starts at the merged token.
pub fn request_start(tokens: &[i32], header: &[i32]) -> usize {
    let last = |h: &[i32]| (h.len() <= tokens.len() && !h.is_empty()).then(|| (0..=tokens.len() - h.len()).rev().find(|&i| tokens[i..i + h.len()] == *h)).flatten();
    match (last(header), header.split_last()) {
        (Some(i), _) => i + header.len(),
        (None, Some((_, head))) if head.len() >= 2 => last(head).map_or(0, |i| i + head.len()),
        _ => 0,
    }
}

/// How many leading tokens `a` and `b` share.
pub fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Template and tokenize every prompt; fails naming a prompt that does not fit `n_ctx`.
pub fn prepare(model: &Model, template: &Template, prompts: &[String], n_ctx: usize) -> Result<Vec<Vec<i32>>> {
    prepare_opened(model, template, prompts, |_| "", n_ctx)
}

/// As [`prepare`], with the assistant's answer to prompt `i` begun with `opening(i)`.
pub fn prepare_opened<'a>(model: &Model, template: &Template, prompts: &[String], opening: impl Fn(usize) -> &'a str, n_ctx: usize) -> Result<Vec<Vec<i32>>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let (_, tokens) = template.tokens_opened(model, &[("user", prompt)], opening(i))?;
            check_length(i, prompt, tokens.len(), n_ctx)?;
            Ok(tokens)
        })
        .collect()
}

/// An error naming prompt `index` (0-based) when its `n_tokens` exceed `n_ctx`.
pub fn check_length(index: usize, prompt: &str, n_tokens: usize, n_ctx: usize) -> Result<()> {
    if n_tokens > n_ctx {
        bail!(
            "prompt {} ({:?}) is {n_tokens} tokens long, more than the context size {n_ctx}; shorten it or raise --ctx-size",
            index + 1,
            preview(prompt)
        );
    }
    Ok(())
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

#[derive(Deserialize)]
struct Pair {
    prompt: String,
    answer: String,
}

/// (prompt, answer) pairs from JSONL, one `{"prompt": ..., "answer": ...}` per line
/// (other fields ignored): fine-tuning data and utility tasks.
pub fn read_pairs(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let pair: Pair = serde_json::from_str(line).with_context(|| {
            format!("{} line {}: expected a JSON object with string fields \"prompt\" and \"answer\"", path.display(), i + 1)
        })?;
        pairs.push((pair.prompt, pair.answer));
    }
    ensure!(!pairs.is_empty(), "{} holds no (prompt, answer) pairs", path.display());
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_prompt_keeps_its_whitespace_and_a_blank_one_is_an_error() {
        let prompts = parse_jsonl("{\"prompt\": \"<|im_start|>assistant\\n\"}\n\n{\"goal\": \" Hi \"}\n").unwrap();
        assert_eq!(prompts, ["<|im_start|>assistant\n", " Hi "]);
        let err = parse_jsonl("{\"prompt\": \"a\"}\n{\"prompt\": \" \"}\n").unwrap_err();
        assert!(err.to_string().starts_with("line 2: the prompt is empty"), "{err}");
    }

    #[test]
    fn a_request_starts_after_the_last_user_header() {
        let header = [7, 8, 9];
        assert_eq!(request_start(&[1, 7, 8, 9, 4, 5, 7, 8, 9, 6, 2], &header), 9);
        // The header's last token merged into the content: start at the merged token.
        assert_eq!(request_start(&[1, 7, 8, 10, 4], &header), 3);
        assert_eq!(request_start(&[1, 2, 3], &header), 0, "no header: the whole prompt");
        assert_eq!(request_start(&[1, 2, 3], &[]), 0);
    }

    #[test]
    fn the_common_prefix_ends_where_the_tokens_part() {
        assert_eq!(common_prefix(&[1, 5, 6, 7, 4, 7, 8, 2], &[1, 5, 6, 7]), 4);
        assert_eq!(common_prefix(&[1, 5, 9, 7, 4], &[1, 5, 6, 7]), 2);
        assert_eq!(common_prefix(&[1, 5, 6, 7, 4], &[]), 0);
    }
}
