//! The engine loop: one thread owns the llama.cpp context, admits queued
//! requests into free sequences and decodes every live one together.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;

use anyhow::{bail, Context as _, Result};
use axum::http::StatusCode;
use tokio::sync::mpsc;

use super::{ApiError, Input, Job, Metrics, Reply, Task};
use crate::generate::{Engine, Event, NewRequest, Sampling};
use crate::llama::{Context, Model};
use crate::prompts::{parsed, Template};
use crate::steer::{Mode, SteerHook};

/// A request in the engine: its replies and the text held back while it
/// could still be the start of a stop string.
struct Live {
    replies: mpsc::UnboundedSender<Reply>,
    stop: Vec<String>,
    text: String,
    sent: usize,
    stopped: bool,
    prompt_tokens: usize,
}

impl Live {
    /// Takes new text; sends what can no longer become part of a stop string.
    fn push(&mut self, text: &str) {
        if self.stopped {
            return;
        }
        self.text.push_str(text);
        // Text before `sent` held no stop string, nor the start of one.
        let unsent = &self.text[self.sent..];
        let end = match self.stop.iter().filter_map(|s| unsent.find(s.as_str())).min() {
            Some(at) => {
                self.stopped = true;
                self.sent + at
            }
            None => self.text.len() - self.held_back(),
        };
        if end > self.sent {
            let _ = self.replies.send(Reply::Text(self.text[self.sent..end].to_string()));
            self.sent = end;
        }
    }

    /// Length of the longest unsent tail of the text that begins some stop string.
    fn held_back(&self) -> usize {
        (self.sent..self.text.len())
            .filter(|&i| self.text.is_char_boundary(i))
            .find(|&i| self.stop.iter().any(|s| s.starts_with(&self.text[i..])))
            .map_or(0, |i| self.text.len() - i)
    }

    fn finish(mut self, finish_reason: &'static str, completion_tokens: usize) {
        if !self.stopped && self.sent < self.text.len() {
            let rest = self.text.split_off(self.sent);
            let _ = self.replies.send(Reply::Text(rest));
        }
        let _ = self.replies.send(Reply::Done { finish_reason, completion_tokens });
    }
}

/// llama.cpp's CPU matmuls round differently once a decode call has 8 rows
/// (measured: with 7, 16 greedy answers matched those served alone; with 8,
/// one or two changed). Decoding at most 4 requests per call keeps every
/// answer what it would be alone.
pub const BATCH_INVARIANT_ROWS: usize = 4;

/// Runs one short request before serving: proves that this model's graph shows
/// the guard its gate layer and every steered layer, or says why not.
pub fn warm_up<'m>(model: &'m Model, template: &Template, ctx: &mut Context<'m, SteerHook>) -> Result<()> {
    let tokens = prompt_tokens(model, template, &Input::Chat(vec![("user".into(), "Hello".into())]))?;
    let sampling = Sampling { max_tokens: 1, temperature: 0.0, ..Sampling::default() };
    Engine::new(model, ctx, 1).run(&[tokens], &sampling, |_| {}).context("the warm-up request failed, so the guard cannot be trusted on this model")?;
    Ok(())
}

/// Whether the engine keeps the template's opening decoded once for every
/// request: not in always mode, which shifts every row, nor with --deterministic.
pub fn caches_prefix(mode: Mode, deterministic: bool) -> bool {
    !deterministic && mode != Mode::Always
}

/// Serves jobs until every sender is gone and the last request is done.
/// With `deterministic`, at most [`BATCH_INVARIANT_ROWS`] requests share a decode call.
pub fn run_engine<'m>(
    model: &'m Model,
    template: &Template,
    ctx: &mut Context<'m, SteerHook>,
    parallel: usize,
    deterministic: bool,
    metrics: &Metrics,
    jobs: std_mpsc::Receiver<Job>,
) -> Result<()> {
    // The gate's opening is the template's, so the cached prefix never holds a request token.
    let opening = ctx.hook().opening().to_vec();
    let mut engine = Engine::new(model, ctx, parallel);
    if deterministic {
        engine.limit_rows(BATCH_INVARIANT_ROWS);
    }
    if caches_prefix(engine.mode(), deterministic) {
        engine.cache_prefix(&opening)?;
    }
    let mut live: HashMap<usize, Live> = HashMap::new();
    let mut next_id = 0;
    loop {
        // Every request that waits and fits joins now; their prompts share decode calls.
        let mut pending: Vec<(usize, Vec<i32>, Sampling)> = Vec::new();
        let mut moderations: Vec<(mpsc::UnboundedSender<Reply>, Vec<i32>)> = Vec::new();
        while pending.len() < engine.free_slots() {
            let job = if engine.is_idle() && pending.is_empty() && moderations.is_empty() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return Ok(()),
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            metrics.queue_depth.dec();
            let moderation = matches!(job.task, Task::Moderate);
            let Some((replies, tokens, sampling, stop)) = intake(model, template, &mut engine, metrics, job) else { continue };
            if moderation {
                moderations.push((replies, tokens));
                continue;
            }
            live.insert(next_id, Live { replies, stop, text: String::new(), sent: 0, stopped: false, prompt_tokens: tokens.len() });
            pending.push((next_id, tokens, sampling));
            next_id += 1;
        }
        moderate(&mut engine, metrics, moderations);
        let requests: Vec<NewRequest> = pending.iter().map(|(id, prompt, sampling)| NewRequest { id: *id, prompt, sampling }).collect();
        let results = engine.advance(&requests, &mut |event| on_event(&mut live, metrics, event))?;
        for ((id, _, _), result) in pending.iter().zip(results) {
            if let Err(e) = result {
                // A request the guard could not gate is answered with an error, never unguarded.
                engine.finish(*id);
                if let Some(l) = live.remove(id) {
                    let _ = l.replies.send(Reply::Rejected(guard_failed(e)));
                }
            }
        }
        // Requests that hit a stop string, or whose client went away, end now.
        let ended: Vec<usize> = live.iter().filter(|(_, l)| l.stopped || l.replies.is_closed()).map(|(&id, _)| id).collect();
        for id in ended {
            let generation = engine.finish(id);
            if let (Some(l), Some(g)) = (live.remove(&id), generation) {
                l.finish("stop", g.tokens.len());
            }
        }
    }
}

/// Gates every waiting moderation input together and answers each.
fn moderate(engine: &mut Engine, metrics: &Metrics, moderations: Vec<(mpsc::UnboundedSender<Reply>, Vec<i32>)>) {
    if moderations.is_empty() {
        return;
    }
    let prompts: Vec<&[i32]> = moderations.iter().map(|(_, tokens)| tokens.as_slice()).collect();
    for ((replies, _), result) in moderations.iter().zip(engine.moderate_all(&prompts)) {
        let _ = replies.send(match result {
            Ok(d) => {
                metrics.gated(Some(d));
                Reply::Moderated(d)
            }
            Err(e) => Reply::Rejected(guard_failed(e)),
        });
    }
}

/// Answers a job that is not a prompt to decode (a template render, a bad
/// prompt) at once; returns what a generation or a moderation needs.
fn intake(model: &Model, template: &Template, engine: &mut Engine, metrics: &Metrics, job: Job) -> Option<(mpsc::UnboundedSender<Reply>, Vec<i32>, Sampling, Vec<String>)> {
    if job.replies.is_closed() {
        return None;
    }
    let answer = |reply: Reply| {
        let _ = job.replies.send(reply);
        None
    };
    if let Task::Render = job.task {
        return answer(match render(model, template, &job.input) {
            Ok((text, tokens)) => Reply::Rendered { text, tokens },
            Err(e) => Reply::Rejected(ApiError::bad_request(format!("{e:#}")).with_code("invalid_prompt")),
        });
    }
    let tokens = match prompt_tokens(model, template, &job.input) {
        Ok(tokens) => tokens,
        Err(e) => return answer(Reply::Rejected(ApiError::bad_request(format!("{e:#}")).with_code("invalid_prompt"))),
    };
    if let Err(e) = engine.check_fits(tokens.len()) {
        return answer(Reply::Rejected(ApiError::bad_request(format!("{e:#}")).with_code("context_length_exceeded")));
    }
    metrics.request(job.task.kind(), tokens.len());
    match job.task {
        Task::Generate { sampling, stop } => Some((job.replies, tokens, sampling, stop)),
        Task::Moderate => Some((job.replies, tokens, Sampling::default(), Vec::new())),
        Task::Render => None,
    }
}

fn guard_failed(e: anyhow::Error) -> ApiError {
    ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")).with_code("guard_failed")
}

fn on_event(live: &mut HashMap<usize, Live>, metrics: &Metrics, event: Event) {
    match event {
        Event::Started { request, gate, steered } => {
            metrics.gated(gate);
            if let Some(l) = live.get(&request) {
                let _ = l.replies.send(Reply::Started { gate, steered, prompt_tokens: l.prompt_tokens });
            }
        }
        Event::Text { request, text } => {
            if let Some(l) = live.get_mut(&request) {
                l.push(text);
            }
        }
        Event::Done { request, generation } => {
            metrics.generated(generation.tokens.len());
            if let Some(l) = live.remove(&request) {
                l.finish(if generation.truncated { "length" } else { "stop" }, generation.tokens.len());
            }
        }
    }
}

fn prompt_tokens(model: &Model, template: &Template, input: &Input) -> Result<Vec<i32>> {
    render(model, template, input).map(|(_, tokens)| tokens)
}

/// The text the model reads for `input` (chat-templated unless raw) and its tokens.
fn render(model: &Model, template: &Template, input: &Input) -> Result<(String, Vec<i32>)> {
    let messages = match input {
        // A raw prompt is the client's own templating: its special tokens are parsed, as llama-server's /completion does.
        Input::Text(text) => return parsed(model, text.clone()),
        Input::Chat(messages) => messages,
    };
    let turns: Vec<(&str, &str)> = messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
    // The request's own system message replaces --system-prompt.
    let own_system = messages.iter().any(|(role, _)| role == "system");
    let (text, tokens) = if own_system {
        let mut without_default = template.clone();
        without_default.system_prompt = None;
        without_default.tokens(model, &turns)?
    } else {
        template.tokens(model, &turns)?
    };
    // A template without tool turns may drop them silently; the gate
    // would then not read what the model is asked.
    if messages.iter().any(|(role, content)| role == "tool" && !content.is_empty() && !text.contains(content.as_str())) {
        bail!("this model's chat template ({}) drops tool messages; send their content in a user message", template.name);
    }
    Ok((text, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(stop: &[&str]) -> (Live, mpsc::UnboundedReceiver<Reply>) {
        let (replies, rx) = mpsc::unbounded_channel();
        let stop = stop.iter().map(|s| s.to_string()).collect();
        (Live { replies, stop, text: String::new(), sent: 0, stopped: false, prompt_tokens: 0 }, rx)
    }

    fn sent(rx: &mut mpsc::UnboundedReceiver<Reply>) -> String {
        let mut text = String::new();
        while let Ok(reply) = rx.try_recv() {
            if let Reply::Text(t) = reply {
                text.push_str(&t);
            }
        }
        text
    }

    #[test]
    fn stop_strings_split_across_tokens_are_held_back_and_cut() {
        let (mut l, mut rx) = live(&["END", "\n\n"]);
        l.push("Hello E");
        assert_eq!(sent(&mut rx), "Hello ", "a possible stop start is held back");
        l.push("N");
        assert_eq!(sent(&mut rx), "");
        l.push("Dless");
        assert_eq!(sent(&mut rx), "");
        assert!(l.stopped, "the stop string ends the answer and is not sent");
        let (mut l, mut rx) = live(&["END"]);
        l.push("Ein");
        l.push("stein é");
        l.finish("length", 3);
        assert_eq!(sent(&mut rx), "Einstein é", "held-back text that was no stop string is sent at the end");
    }
}
