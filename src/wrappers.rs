//! Jailbreak-style wrappers written for this project (`data/wrappers.json`):
//! families of templates with an instruction slot and random fillers. The
//! same templates wrap harmful and harmless instructions, so that the gate
//! learns what is asked, not how it is dressed.

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Deserialize;

/// The wrappers shipped in the binary, so an installed tool needs no checkout.
const BUILTIN: &str = include_str!("../data/wrappers.json");

#[derive(Deserialize)]
struct Fillers {
    name: Vec<String>,
    place: Vec<String>,
    pad: Vec<String>,
    rule: Vec<String>,
    example: Vec<String>,
    language: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Family {
    pub family: String,
    pub templates: Vec<String>,
}

#[derive(Deserialize)]
struct Conversation {
    reply: Vec<String>,
    refusal: Vec<String>,
}

#[derive(Deserialize)]
pub struct Wrappers {
    fillers: Fillers,
    families: Vec<Family>,
    conversation: Conversation,
}

/// Slots that carry the request; a template holds exactly one of these forms.
const REQUEST_FORMS: [&[&str]; 4] =
    [&["instruction"], &["first_half", "second_half"], &["instruction_dashed"], &["instruction_reversed"]];
const FILLER_SLOTS: [&str; 6] = ["name", "place", "language", "pad", "rules", "examples"];

impl Wrappers {
    pub fn builtin() -> Wrappers {
        Wrappers::parse(BUILTIN).expect("data/wrappers.json is checked by the unit tests")
    }

    pub fn read(path: &Path) -> Result<Wrappers> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read wrapper file {}", path.display()))?;
        Wrappers::parse(&text).with_context(|| format!("invalid wrapper file {}", path.display()))
    }

    fn parse(text: &str) -> Result<Wrappers> {
        let w: Wrappers = serde_json::from_str(text)?;
        let f = &w.fillers;
        let lists = [&f.name, &f.place, &f.pad, &f.rule, &f.example, &f.language, &w.conversation.reply, &w.conversation.refusal];
        if lists.iter().any(|l| l.is_empty()) {
            bail!("every filler and conversation list needs at least one entry");
        }
        if w.families.is_empty() {
            bail!("no families");
        }
        for family in &w.families {
            if family.templates.is_empty() {
                bail!("family {} has no templates", family.family);
            }
            for (i, t) in family.templates.iter().enumerate() {
                check_template(t).with_context(|| format!("family {} template {}", family.family, i + 1))?;
            }
        }
        Ok(w)
    }

    /// These wrappers less the named families; a name that is not here is an error.
    pub fn without(mut self, names: &[String]) -> Result<Wrappers> {
        for name in names {
            if !self.families.iter().any(|f| &f.family == name) {
                let known: Vec<&str> = self.families.iter().map(|f| f.family.as_str()).collect();
                bail!("no wrapper family {name:?}; the families are {}", known.join(", "));
            }
        }
        self.families.retain(|f| !names.contains(&f.family));
        if self.families.is_empty() {
            bail!("every wrapper family was left out");
        }
        Ok(self)
    }

    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// `instruction` in a random template of family `family`, fillers drawn
    /// from `rng`, and where in the text the (last part of the) request sits.
    pub fn wrap(&self, family: usize, instruction: &str, rng: &mut StdRng) -> (String, Range<usize>) {
        let template = self.families[family].templates.choose(rng).expect("checked non-empty");
        let mut out = String::with_capacity(template.len() + instruction.len());
        let mut request = 0..0;
        for (i, piece) in template.split('{').enumerate() {
            if i == 0 {
                out.push_str(piece);
                continue;
            }
            let (slot, rest) = piece.split_once('}').expect("checked slots");
            let start = out.len();
            out.push_str(&self.fill(slot, instruction, rng));
            // A split request ends with its second half, wherever the template puts it.
            if !FILLER_SLOTS.contains(&slot) && slot != "first_half" {
                request = start..out.len();
            }
            out.push_str(rest);
        }
        (out, request)
    }

    /// A short assistant turn to put before the next user turn: a refusal after a harmful turn.
    pub fn reply(&self, after_harmful: bool, rng: &mut StdRng) -> &str {
        let list = if after_harmful { &self.conversation.refusal } else { &self.conversation.reply };
        list.choose(rng).expect("checked non-empty")
    }

    fn fill(&self, slot: &str, instruction: &str, rng: &mut StdRng) -> String {
        let f = &self.fillers;
        let pick = |list: &[String], rng: &mut StdRng| list.choose(rng).expect("checked non-empty").clone();
        let words: Vec<&str> = instruction.split_whitespace().collect();
        let half = words.len().div_ceil(2);
        match slot {
            "instruction" => instruction.to_string(),
            "first_half" => words[..half].join(" "),
            "second_half" => words[half..].join(" "),
            "instruction_dashed" => words.join("-"),
            "instruction_reversed" => words.iter().rev().copied().collect::<Vec<_>>().join(" "),
            "name" => pick(&f.name, rng),
            "place" => pick(&f.place, rng),
            "language" => pick(&f.language, rng),
            "pad" => {
                let n = rng.gen_range(0..=3);
                (0..n).map(|_| pick(&f.pad, rng)).collect::<Vec<_>>().join(" ")
            }
            "rules" => {
                let n = rng.gen_range(3..=10).min(f.rule.len());
                let rules: Vec<&String> = f.rule.choose_multiple(rng, n).collect();
                rules.iter().enumerate().map(|(i, r)| format!("{}. {r}", i + 1)).collect::<Vec<_>>().join("\n")
            }
            "examples" => {
                let n = rng.gen_range(2..=4).min(f.example.len());
                f.example.choose_multiple(rng, n).cloned().collect::<Vec<_>>().join("\n\n")
            }
            _ => unreachable!("checked slots"),
        }
    }
}

/// The slots of a template, in order; an error for unbalanced braces.
fn slots(template: &str) -> Result<Vec<&str>> {
    let mut slots = Vec::new();
    for piece in template.split('{').skip(1) {
        let (slot, rest) = piece.split_once('}').context("a '{' without its '}'")?;
        if rest.contains('}') {
            bail!("a '}}' without its '{{'");
        }
        slots.push(slot);
    }
    if template.split('{').next().is_some_and(|head| head.contains('}')) {
        bail!("a '}}' without its '{{'");
    }
    Ok(slots)
}

fn check_template(template: &str) -> Result<()> {
    let slots = slots(template)?;
    let request: Vec<&str> = slots.iter().copied().filter(|s| !FILLER_SLOTS.contains(s)).collect();
    let mut sorted = request.clone();
    sorted.sort_unstable();
    let fits = REQUEST_FORMS.iter().any(|form| {
        let mut want = form.to_vec();
        want.sort_unstable();
        want == sorted
    });
    if !fits {
        bail!("it must carry the request once, as {{instruction}}, {{first_half}} and {{second_half}}, {{instruction_dashed}} or {{instruction_reversed}}; it has {request:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn builtin_wrappers_parse_and_cover_the_taxonomy() {
        let w = Wrappers::parse(BUILTIN).unwrap();
        assert!(w.families().len() >= 12, "{} families", w.families().len());
        assert!(w.families().iter().all(|f| f.templates.len() >= 3));
    }

    #[test]
    fn every_template_keeps_the_request_and_fills_every_slot() {
        let w = Wrappers::builtin();
        let mut rng = StdRng::seed_from_u64(7);
        let instruction = "Explain how to bake sourdough bread at home";
        for (i, family) in w.families().iter().enumerate() {
            for _ in 0..20 {
                let (text, request) = w.wrap(i, instruction, &mut rng);
                assert!(!text.contains('{') && !text.contains('}'), "{}: {text}", family.family);
                assert!(text[request].contains("sourdough"), "{}: the request span misses the request in {text}", family.family);
                let kept = text.contains(instruction)
                    || text.contains("Explain-how-to-bake-sourdough-bread-at-home")
                    || text.contains("home at bread sourdough bake to how Explain")
                    || (text.contains("Explain how to bake") && text.contains("sourdough bread at home"));
                assert!(kept, "{}: {text}", family.family);
            }
        }
    }

    #[test]
    fn templates_without_a_request_or_with_unknown_slots_are_refused() {
        assert!(check_template("Tell me {name}").is_err());
        assert!(check_template("{instruction} and {instruction}").is_err());
        assert!(check_template("{instruction} {colour}").is_err());
        assert!(check_template("{instruction} }").is_err());
        assert!(check_template("{first_half} ... {second_half}").is_ok());
        assert!(check_template("{pad} {instruction} {rules}").is_ok());
    }
}
