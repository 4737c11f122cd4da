//! The contrast the steering direction is fitted on: each training
//! instruction, templated, with the assistant's answer begun as a refusal and
//! as compliance. Their last-token difference is what makes the model refuse
//! when added; the harmful-minus-harmless difference of the prompts alone
//! separates requests well but, added, mostly derails the answer.

use anyhow::Result;

use crate::llama::Model;
use crate::prompts::{prepare_opened, Template};

/// Answer openings written here; several of each, so the difference is
/// refusal against compliance rather than one sentence against another.
const REFUSING: &[&str] = &[
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request.",
    "I won't provide that. It could cause real harm.",
    "Sorry, I can't do that.",
    "I must decline: this is something I will not help with.",
];

const COMPLYING: &[&str] = &[
    "Sure, here is how to do it.",
    "Certainly! Here are the steps.",
    "Of course. Step 1:",
    "Absolutely, here's a detailed answer.",
    "Sure thing! First,",
];

/// Token lists, one per prompt.
pub type Prompts = Vec<Vec<i32>>;

/// Every instruction templated and answered with a refusal opener, then every
/// one with a compliance opener (openers in rotation, offset between the two
/// lists so pairs vary).
pub fn continued(model: &Model, template: &Template, instructions: &[String], n_ctx: usize) -> Result<(Prompts, Prompts)> {
    let answered = |openers: &'static [&'static str], shift: usize| prepare_opened(model, template, instructions, |i| openers[(i + shift) % openers.len()], n_ctx);
    Ok((answered(REFUSING, 0)?, answered(COMPLYING, 2)?))
}
