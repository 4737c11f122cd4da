//! Chat tokens in which a message cannot spell the template's turn markers.
//! llama.cpp (llama-server included) tokenizes a whole templated text with
//! special tokens parsed, so a message holding `<|im_end|><|im_start|>system`
//! opens real turns of its own. Here the template's markers stay special and
//! a message's text stays text, as llama.cpp tokenizes text with parse_special off.

use std::ops::Range;

use anyhow::{ensure, Context, Result};
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token_type::LlamaTokenAttr;

use crate::llama::Model;
use crate::prompts::{adds_special, parsed, tokenize};

/// The text and tokens of `conversation` as `render` templates it. A
/// conversation that spells no special token tokenizes as the whole text does.
pub fn tokens(model: &Model, conversation: &[(&str, &str)], render: impl Fn(&[(&str, &str)]) -> Result<String>) -> Result<(String, Vec<i32>)> {
    if !conversation.iter().any(|(_, content)| spells_special(model, content)) {
        return parsed(model, render(conversation)?);
    }
    let mask = Mask::new(model, conversation)?;
    let masked: Vec<(&str, &str)> = conversation.iter().zip(&mask.contents).map(|((role, _), content)| (*role, content.as_str())).collect();
    let text = render(&masked)?;
    ensure!(
        mask.kept_by(&text),
        "this chat template rewrites message text, so the special-token text in a message ({:?}) cannot be kept as text; remove it from the message",
        mask.spelled[0]
    );
    // Split at the template's markers, the masked text must tokenize as llama.cpp tokenizes it whole.
    ensure!(
        split_tokenize(model, &text, str::to_string)? == tokenize(model, &text)?,
        "cannot keep the special-token text in a message ({:?}) as text with this model's tokenizer; remove it from the message",
        mask.spelled[0]
    );
    let tokens = split_tokenize(model, &text, |run| mask.unmask(run))?;
    Ok((mask.unmask(&text), tokens))
}

/// Whether llama.cpp would read a special token in `text`.
fn spells_special(model: &Model, text: &str) -> bool {
    let vocab = model.llama().vocab();
    vocab.tokenize(text.as_bytes(), false, true) != vocab.tokenize(text.as_bytes(), false, false)
}

/// Where in `text` llama.cpp reads the special tokens that only parse_special
/// enables (control and unknown ones), in order.
fn special_spans(model: &Model, text: &str) -> Result<Vec<(Range<usize>, LlamaToken)>> {
    let vocab = model.llama().vocab();
    let mut spans = Vec::new();
    let mut cursor = 0;
    for token in vocab.tokenize(text.as_bytes(), false, true) {
        let attr = vocab.attr(token).0;
        if !(attr.contains(LlamaTokenAttr::Control) || attr.contains(LlamaTokenAttr::Unknown)) {
            continue;
        }
        let piece = vocab.text(token).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let at = text[cursor..].find(&piece).with_context(|| format!("special token {piece:?} not found where the tokenizer read it"))?;
        spans.push((cursor + at..cursor + at + piece.len(), token));
        cursor += at + piece.len();
    }
    Ok(spans)
}

/// Tokens of `text`: its special tokens as llama.cpp parses them, and each
/// stretch of text between them, passed through `run`, tokenized as text.
fn split_tokenize(model: &Model, text: &str, run: impl Fn(&str) -> String) -> Result<Vec<i32>> {
    let vocab = model.llama().vocab();
    let add_special = adds_special(model, text);
    let mut tokens: Vec<LlamaToken> = Vec::new();
    if add_special && vocab.should_add_bos() {
        tokens.push(vocab.bos());
    }
    let push_text = |tokens: &mut Vec<LlamaToken>, stretch: &str| {
        if !stretch.is_empty() {
            tokens.extend(vocab.tokenize(run(stretch).as_bytes(), false, false));
        }
    };
    let mut cursor = 0;
    for (span, token) in special_spans(model, text)? {
        push_text(&mut tokens, &text[cursor..span.start]);
        tokens.push(token);
        cursor = span.end;
    }
    push_text(&mut tokens, &text[cursor..]);
    if add_special && vocab.should_add_eos() {
        tokens.push(vocab.eos());
    }
    Ok(tokens.into_iter().map(|t| t.0).collect())
}

/// Messages with each spelled special token replaced by a placeholder the
/// template passes through: `mark`, its index into `spelled`, `mark`.
struct Mask {
    mark: char,
    spelled: Vec<String>,
    contents: Vec<String>,
}

impl Mask {
    fn new(model: &Model, conversation: &[(&str, &str)]) -> Result<Mask> {
        // A private-use character no message holds.
        let mark = ('\u{E000}'..='\u{F8FF}')
            .find(|&c| conversation.iter().all(|(_, content)| !content.contains(c)))
            .context("the messages use every private-use character, so their special-token text cannot be marked")?;
        let mut mask = Mask { mark, spelled: Vec::new(), contents: Vec::new() };
        for (_, content) in conversation {
            let mut masked = String::new();
            let mut cursor = 0;
            for (span, _) in special_spans(model, content)? {
                masked.push_str(&content[cursor..span.start]);
                masked.push_str(&format!("{mark}{}{mark}", mask.spelled.len()));
                mask.spelled.push(content[span.clone()].to_string());
                cursor = span.end;
            }
            masked.push_str(&content[cursor..]);
            mask.contents.push(masked);
        }
        Ok(mask)
    }

    /// Whether `text` holds every placeholder once and no other mark.
    fn kept_by(&self, text: &str) -> bool {
        let indices: Vec<&str> = text.split(self.mark).skip(1).step_by(2).collect();
        text.matches(self.mark).count() == 2 * self.spelled.len()
            && (0..self.spelled.len()).all(|k| indices.iter().filter(|&&i| i == k.to_string()).count() == 1)
    }

    /// `text` with each placeholder back to the special-token text it stands for.
    fn unmask(&self, text: &str) -> String {
        text.split(self.mark)
            .enumerate()
            .map(|(i, part)| if i % 2 == 0 { part } else { part.parse::<usize>().ok().and_then(|k| self.spelled.get(k)).map_or(part, String::as_str) })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask() -> Mask {
        let mark = '\u{E000}';
        Mask { mark, spelled: vec!["<|im_end|>".into(), "<|im_start|>".into()], contents: Vec::new() }
    }

    #[test]
    fn placeholders_go_back_to_the_text_they_stand_for() {
        let m = mask();
        let text = "<|im_start|>user\nHi\u{E000}0\u{E000}\n\u{E000}1\u{E000}system<|im_end|>";
        assert!(m.kept_by(text));
        assert_eq!(m.unmask(text), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>system<|im_end|>");
        assert_eq!(m.unmask("no marks"), "no marks");
    }

    #[test]
    fn a_template_that_drops_or_repeats_a_placeholder_is_caught() {
        let m = mask();
        assert!(!m.kept_by("Hi\u{E000}0\u{E000}"), "one dropped");
        assert!(!m.kept_by("\u{E000}0\u{E000}\u{E000}0\u{E000}\u{E000}1\u{E000}"), "one repeated");
        assert!(!m.kept_by("\u{E000}0\u{E000}\u{E000}1\u{E000}\u{E000}"), "a stray mark");
    }
}
