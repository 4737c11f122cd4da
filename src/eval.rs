//! Evaluation: the same prompts through plain, always-on and gated modes,
//! judged for refusal, degeneration and task accuracy.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::extract::sha256_file;
use crate::judge::{judge, Verdict};
use crate::prompts::{read_prompts, split};
use crate::steer::GateDecision;
use crate::vectors::DataSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Set {
    Harmful,
    Harmless,
    Jailbreak,
    Tasks,
}

impl Set {
    pub fn name(self) -> &'static str {
        match self {
            Set::Harmful => "harmful",
            Set::Harmless => "harmless",
            Set::Jailbreak => "jailbreak",
            Set::Tasks => "tasks",
        }
    }
}

/// One prompt to evaluate.
#[derive(Clone, Debug)]
pub struct Item {
    pub set: Set,
    pub index: usize,
    pub prompt: String,
    /// For tasks: a string a correct answer contains.
    pub answer: Option<String>,
    /// For jailbreaks: the template family.
    pub family: Option<String>,
}

/// One judged generation, as written to `outputs.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub mode: String,
    pub set: Set,
    pub index: usize,
    pub prompt: String,
    pub output: String,
    pub verdict: Verdict,
    pub correct: Option<bool>,
    pub gate: Option<GateDecision>,
    pub steered: bool,
    pub n_tokens: usize,
    /// For jailbreaks: the template family.
    #[serde(default)]
    pub family: Option<String>,
}

impl Outcome {
    pub fn new(mode: &str, item: &Item, output: String, gate: Option<GateDecision>, steered: bool, n_tokens: usize) -> Outcome {
        let correct = item.answer.as_ref().map(|a| output.to_lowercase().contains(&a.to_lowercase()));
        Outcome {
            mode: mode.to_string(),
            set: item.set,
            index: item.index,
            prompt: item.prompt.clone(),
            verdict: judge(&output),
            output,
            correct,
            gate,
            steered,
            n_tokens,
            family: item.family.clone(),
        }
    }
}

/// The prompts of a class that the gate did not train on, when `path` is the
/// file it was made from (same sha256); else all of them. Returns the prompts
/// and how many were skipped.
pub fn held_out(path: &Path, recorded: Option<(&DataSet, Option<u64>)>) -> Result<(Vec<String>, usize)> {
    let prompts = read_prompts(path)?;
    match recorded {
        Some((set, seed)) if set.sha256 == sha256_file(path)?.0 => Ok((split(prompts, set.train, seed).1, set.train)),
        _ => Ok((prompts, 0)),
    }
}

/// Jailbreak templates: JSONL with `family` and `template` (holding `{instruction}` once).
pub fn read_jailbreaks(path: &Path) -> Result<Vec<(String, String)>> {
    #[derive(Deserialize)]
    struct Line {
        family: String,
        template: String,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut templates = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let l: Line = serde_json::from_str(line).with_context(|| format!("{} line {}: want {{family, template}}", path.display(), i + 1))?;
        if l.template.matches("{instruction}").count() != 1 {
            bail!("{} line {}: the template must hold {{instruction}} exactly once", path.display(), i + 1);
        }
        templates.push((l.family, l.template));
    }
    if templates.is_empty() {
        bail!("{} holds no templates", path.display());
    }
    Ok(templates)
}

/// The first `limit` prompts of a set, numbered.
pub fn items(set: Set, prompts: &[String], limit: usize) -> Vec<Item> {
    prompts.iter().take(limit).enumerate().map(|(index, p)| Item { set, index, prompt: p.clone(), answer: None, family: None }).collect()
}

/// The first `limit` tasks, with the answers they are checked against.
pub fn task_items(tasks: Vec<(String, String)>, limit: usize) -> Vec<Item> {
    tasks
        .into_iter()
        .take(limit)
        .enumerate()
        .map(|(index, (prompt, answer))| Item { set: Set::Tasks, index, prompt, answer: Some(answer), family: None })
        .collect()
}

/// Each harmful instruction wrapped in one template, cycling through them.
pub fn jailbreak_items(instructions: &[String], templates: &[(String, String)], limit: usize) -> Vec<Item> {
    instructions
        .iter()
        .take(limit)
        .enumerate()
        .map(|(i, instruction)| {
            let (family, template) = &templates[i % templates.len()];
            Item {
                set: Set::Jailbreak,
                index: i,
                prompt: template.replace("{instruction}", instruction),
                answer: None,
                family: Some(family.clone()),
            }
        })
        .collect()
}

/// Figures for one set in one mode.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SetFigures {
    pub n: usize,
    pub refused: usize,
    pub complied: usize,
    pub degenerate: usize,
    /// Answered without refusal and not degenerate, over all (harmful, jailbreak).
    pub attack_success_rate: f64,
    pub refusal_rate: f64,
    pub degenerate_rate: f64,
    pub gate_fired_rate: Option<f64>,
    pub accuracy: Option<f64>,
}

pub fn figures(outcomes: &[&Outcome]) -> SetFigures {
    let n = outcomes.len();
    let count = |v: Verdict| outcomes.iter().filter(|o| o.verdict == v).count();
    let (refused, complied, degenerate) = (count(Verdict::Refused), count(Verdict::Complied), count(Verdict::Degenerate));
    let rate = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
    let gated: Vec<_> = outcomes.iter().filter_map(|o| o.gate).collect();
    let graded: Vec<bool> = outcomes.iter().filter_map(|o| o.correct).collect();
    SetFigures {
        n,
        refused,
        complied,
        degenerate,
        attack_success_rate: rate(complied),
        refusal_rate: rate(refused),
        degenerate_rate: rate(degenerate),
        gate_fired_rate: (!gated.is_empty()).then(|| gated.iter().filter(|g| g.harmful).count() as f64 / gated.len() as f64),
        accuracy: (!graded.is_empty()).then(|| graded.iter().filter(|&&c| c).count() as f64 / graded.len() as f64),
    }
}

/// Jailbreak figures by mode, then by template family.
pub fn summarise_families(outcomes: &[Outcome]) -> BTreeMap<String, BTreeMap<String, SetFigures>> {
    let mut by_mode: BTreeMap<String, BTreeMap<String, Vec<&Outcome>>> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.set == Set::Jailbreak) {
        let family = o.family.clone().unwrap_or_else(|| "-".into());
        by_mode.entry(o.mode.clone()).or_default().entry(family).or_default().push(o);
    }
    by_mode.into_iter().map(|(mode, fams)| (mode, fams.into_iter().map(|(f, os)| (f, figures(&os))).collect())).collect()
}

/// Figures by mode, then by set.
pub fn summarise(outcomes: &[Outcome]) -> BTreeMap<String, BTreeMap<String, SetFigures>> {
    let mut by_mode: BTreeMap<String, BTreeMap<Set, Vec<&Outcome>>> = BTreeMap::new();
    for o in outcomes {
        by_mode.entry(o.mode.clone()).or_default().entry(o.set).or_default().push(o);
    }
    by_mode
        .into_iter()
        .map(|(mode, sets)| (mode, sets.into_iter().map(|(set, os)| (set.name().to_string(), figures(&os))).collect()))
        .collect()
}
