//! `inferalign chat`: interactive multi-turn chat; each user turn is gated
//! with the conversation before it, and the answer streams as it is generated.

use std::io::{BufRead, Write};

use anyhow::Result;
use clap::Args;

use inferalign::generate::{Engine, Event};
use inferalign::llama::Context;
use inferalign::steer::Mode;

use super::generate::SessionArgs;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    session: SessionArgs,
}

pub fn run(ChatArgs { session: args }: ChatArgs) -> Result<()> {
    let (model, resolved, template) = args.guard.open()?;
    let mut ctx = Context::new(&model, &args.guard.model.context_params(), resolved.hook(1)?, resolved.mode != Mode::Plain)?;
    let mut engine = Engine::new(&model, &mut ctx, 1);
    let sampling = args.sampling.sampling();
    eprintln!("type a message and press Enter; an empty line or Ctrl-D ends the chat");

    let mut history: Vec<(String, String)> = Vec::new();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        print!("\n> ");
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        history.push(("user".into(), line.trim().to_string()));
        let turns: Vec<(&str, &str)> = history.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
        // The whole conversation is decoded again each turn, so a turn the gate
        // lets through is exactly what the plain model would see.
        let mut answer = None;
        let result = template.tokens(&model, &turns).and_then(|(_, tokens)| {
            engine.run(std::slice::from_ref(&tokens), &sampling, |event| match event {
                Event::Text { text, .. } => {
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                }
                Event::Done { generation, .. } => answer = Some(generation),
                Event::Started { .. } => {}
            })
        });
        if let Err(e) = result {
            eprintln!("\nerror: {e:#}");
            history.pop();
            continue;
        }
        let answer = answer.expect("the request finishes");
        if let Some(gate) = answer.gate {
            let verdict = if gate.harmful { "fired: answer steered" } else { "closed" };
            eprintln!("\n[gate {verdict} (score {:.3})]", gate.score);
        }
        history.push(("assistant".into(), answer.output));
    }
    Ok(())
}
