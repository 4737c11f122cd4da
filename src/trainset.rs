//! The prompts a gate is fitted on: every training instruction plain, wrapped
//! in jailbreak-style families (harmful and harmless alike), and as the last
//! turn of a conversation whose earlier turn is of the other class; and
//! questions of both classes written for this project, plain.

use std::ops::Range;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::llama::Model;
use crate::prompts::{check_length, tokenize, Template};
use crate::wrappers::Wrappers;

/// Family index of unwrapped single-turn prompts.
pub const PLAIN: usize = 0;

/// Whether examples of `family` are asked as plain requests: unwrapped, or
/// the built-in questions (family `question`), which are never wrapped.
pub fn asked_plain(family: usize, question: Option<usize>) -> bool {
    family == PLAIN || Some(family) == question
}

/// Questions written for this project (`data/train-questions-*.txt`), harmful
/// and harmless on the same topics. AdvBench holds only orders, so a gate
/// fitted on it alone read "a question" as harmless (it flagged 4 of 60
/// held-out harmful questions). The last 60 harmless ones only sound harmful
/// (figurative phrasing, homonyms, games, pests, history, safety advice):
/// without them the gate flagged 8 of 90 such held-out requests.
const QUESTIONS: [&str; 2] = [include_str!("../data/train-questions-harmful.txt"), include_str!("../data/train-questions-harmless.txt")];

/// The built-in questions of one class.
pub fn questions(harmful: bool) -> Vec<String> {
    QUESTIONS[usize::from(!harmful)].lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
}

#[derive(Clone, Debug)]
pub struct Example {
    pub harmful: bool,
    /// Index into [`TrainSet::families`].
    pub family: usize,
    /// The instruction this example asks (its class's list index); examples
    /// sharing one are held out together in cross-validation.
    pub instruction: usize,
    /// (role, content) turns, the last one the request.
    pub turns: Vec<(&'static str, String)>,
    /// Where the instruction (its last part, when a wrapper splits it) sits
    /// in the last turn's content.
    pub request: Range<usize>,
}

/// An example as the model reads it.
pub struct Templated {
    pub tokens: Vec<i32>,
    /// The tokens of [`Example::request`].
    pub instruction: Range<usize>,
}

pub struct TrainSet {
    /// `plain`, the wrapper families, `question` (when the built-in questions are asked), then `multi_turn`.
    pub families: Vec<String>,
    pub examples: Vec<Example>,
}

/// How the training instructions are dressed.
#[derive(Clone, Copy, Debug)]
pub struct Recipe {
    /// Wrapper families each instruction is wrapped in (each a separate example).
    pub wraps: usize,
    /// Every how many instructions one also ends a two-turn conversation (0: none).
    pub multi_turn_every: usize,
    /// Ask the built-in questions too, plain: wrapped as well, they cost the
    /// gate a sixth of its held-out plain TPR (commit 9da6e1a).
    pub questions: bool,
    pub seed: u64,
}

impl Default for Recipe {
    fn default() -> Recipe {
        Recipe { wraps: 3, multi_turn_every: 3, questions: true, seed: 0 }
    }
}

impl TrainSet {
    pub fn build(harmful: &[String], harmless: &[String], wrappers: &Wrappers, recipe: Recipe) -> TrainSet {
        let n_wrap = wrappers.families().len();
        let mut families = vec!["plain".to_string()];
        families.extend(wrappers.families().iter().map(|f| f.family.clone()));
        let question = recipe.questions.then(|| {
            families.push("question".into());
            families.len() - 1
        });
        families.push("multi_turn".into());
        let multi_turn = families.len() - 1;

        let mut rng = StdRng::seed_from_u64(recipe.seed);
        let mut examples = Vec::new();
        for (harmful_class, own, other) in [(true, harmful, harmless), (false, harmless, harmful)] {
            // Each class walks the families from its own offset so that both
            // classes meet every family equally often.
            let offset = if harmful_class { 0 } else { n_wrap / 2 };
            for (i, instruction) in own.iter().enumerate() {
                let mut push = |family, turns, request| examples.push(Example { harmful: harmful_class, family, instruction: i, turns, request });
                let whole = 0..instruction.len();
                push(PLAIN, vec![("user", instruction.clone())], whole.clone());
                for k in 0..recipe.wraps.min(n_wrap) {
                    let family = (i * recipe.wraps + k + offset) % n_wrap;
                    let (text, request) = wrappers.wrap(family, instruction, &mut rng);
                    push(1 + family, vec![("user", text)], request);
                }
                if recipe.multi_turn_every > 0 && i % recipe.multi_turn_every == 0 && !other.is_empty() {
                    let before = other.choose(&mut rng).expect("non-empty").clone();
                    let reply = wrappers.reply(!harmful_class, &mut rng).to_string();
                    push(multi_turn, vec![("user", before), ("assistant", reply), ("user", instruction.clone())], whole);
                }
            }
            if let Some(family) = question {
                for (j, asked) in questions(harmful_class).into_iter().enumerate() {
                    let request = 0..asked.len();
                    examples.push(Example { harmful: harmful_class, family, instruction: own.len() + j, turns: vec![("user", asked)], request });
                }
            }
        }
        TrainSet { families, examples }
    }

    /// Family index of the built-in questions, when they are asked.
    pub fn question_family(&self) -> Option<usize> {
        self.families.iter().position(|f| f == "question")
    }

    /// Cross-validation fold of each example: a wrapped or multi-turn example
    /// is validated with its family; a plain one with the first family its
    /// instruction is wrapped in, so an instruction is held out as a whole;
    /// one never wrapped (a built-in question) with a wrapper family by its
    /// index, so each is scored by a probe that saw the other questions, as
    /// the final gate has (a fold of their own scored them with none).
    pub fn folds(&self) -> Vec<usize> {
        let question = self.question_family();
        let undressed = |e: &Example| asked_plain(e.family, question);
        let n_wrap = self.families.len() - 2 - usize::from(question.is_some());
        let first_dressed = |e: &Example| {
            self.examples
                .iter()
                .find(|o| o.harmful == e.harmful && o.instruction == e.instruction && !undressed(o))
                .map_or(if n_wrap == 0 { PLAIN } else { 1 + e.instruction % n_wrap }, |o| o.family)
        };
        self.examples.iter().map(|e| if undressed(e) { first_dressed(e) } else { e.family }).collect()
    }

    /// Templated tokens of every example, and where its instruction sits.
    pub fn tokens(&self, model: &Model, template: &Template, n_ctx: usize) -> Result<Vec<Templated>> {
        self.examples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let turns: Vec<(&str, &str)> = e.turns.iter().map(|(r, c)| (*r, c.as_str())).collect();
                let text = template.apply_chat(model, &turns)?;
                let content = &e.turns.last().expect("a request").1;
                let tokens = tokenize(model, &text)?;
                check_length(i, content, tokens.len(), n_ctx)?;
                // Token positions of the instruction: the tokens of the text before it, and up to its end.
                let at = text.rfind(content.as_str()).unwrap_or(0);
                let upto = |end: usize| -> Result<usize> {
                    Ok(if at + end == 0 { 0 } else { tokenize(model, &text[..at + end])?.len().min(tokens.len()) })
                };
                let instruction = upto(e.request.start)?..upto(e.request.end)?;
                Ok(Templated { tokens, instruction })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn instructions(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix} request number {i}")).collect()
    }

    #[test]
    fn every_family_meets_both_classes_and_instructions_stay_in_one_fold() {
        let wrappers = Wrappers::builtin();
        let set = TrainSet::build(&instructions("bad", 64), &instructions("good", 64), &wrappers, Recipe::default());
        for family in 0..set.families.len() {
            for class in [true, false] {
                assert!(
                    set.examples.iter().any(|e| e.family == family && e.harmful == class),
                    "family {} lacks class {class}",
                    set.families[family]
                );
            }
        }
        let folds = set.folds();
        for (e, &fold) in set.examples.iter().zip(&folds) {
            assert_ne!(fold, PLAIN);
            if e.family == PLAIN {
                let dressed = set.examples.iter().zip(&folds).filter(|(o, _)| o.harmful == e.harmful && o.instruction == e.instruction && o.family != PLAIN);
                assert!(dressed.clone().any(|(_, &f)| f == fold));
            }
        }
        let multi = set.examples.iter().filter(|e| e.turns.len() == 3).count();
        assert_eq!(multi, 2 * 64usize.div_ceil(3));
    }

    #[test]
    fn built_in_questions_of_both_classes_are_asked_plain_and_spread_over_the_folds() {
        let wrappers = Wrappers::builtin();
        let set = TrainSet::build(&instructions("bad", 8), &instructions("good", 8), &wrappers, Recipe::default());
        let question = set.question_family().expect("questions are asked by default");
        let folds = set.folds();
        for class in [true, false] {
            let asked = questions(class);
            assert!(asked.len() >= 32 && asked.iter().all(|q| q.ends_with('?')), "class {class}: {asked:?}");
            let examples: Vec<(&Example, usize)> = set.examples.iter().zip(folds.iter().copied()).filter(|(e, _)| e.harmful == class && e.family == question).collect();
            assert_eq!(examples.len(), asked.len());
            assert!(examples.iter().all(|(e, fold)| e.instruction >= 8 && e.turns.len() == 1 && (1..question).contains(fold)));
            let spread: BTreeSet<usize> = examples.iter().map(|(_, fold)| *fold).collect();
            assert_eq!(spread.len(), wrappers.families().len(), "every wrapper fold validates some questions");
        }
        let without = TrainSet::build(&instructions("bad", 8), &instructions("good", 8), &wrappers, Recipe { questions: false, ..Recipe::default() });
        assert!(without.question_family().is_none());
        assert_eq!(without.families.len() + 1, set.families.len());
    }
}
