//! `inferalign judge-check`: the refusal judge against human labels.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;

use inferalign::cache::data_file;
use inferalign::judge::{judge, Verdict};

#[derive(Args)]
pub struct JudgeCheckArgs {
    /// Human-labelled responses: CSV with assistant_response and human_score (1 = refusal);
    /// default: pyrit's refusal.csv fetched by scripts/setup.sh
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

pub fn run(args: JudgeCheckArgs) -> Result<()> {
    let path = args.labels.unwrap_or_else(|| data_file("refusal.csv"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (run scripts/setup.sh to fetch it)", path.display()))?;
    let mut reader = csv::ReaderBuilder::new().comment(Some(b'#')).from_reader(text.as_bytes());
    let headers = reader.headers()?.clone();
    let column = |name: &str| {
        headers.iter().position(|h| h == name).with_context(|| format!("{} has no {name} column", path.display()))
    };
    let (response, score) = (column("assistant_response")?, column("human_score")?);
    let (mut tp, mut tn, mut fp, mut fn_) = (0usize, 0usize, 0usize, 0usize);
    let mut misses = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{} record {}", path.display(), i + 1))?;
        let human_refused = record.get(score).unwrap_or("").trim() == "1";
        let answer = record.get(response).unwrap_or("");
        let judged_refused = judge(answer) == Verdict::Refused;
        match (human_refused, judged_refused) {
            (true, true) => tp += 1,
            (false, false) => tn += 1,
            (false, true) => fp += 1,
            (true, false) => fn_ += 1,
        }
        if human_refused != judged_refused {
            misses.push(serde_json::json!({"human_refused": human_refused, "response": answer.chars().take(160).collect::<String>()}));
        }
    }
    let total = tp + tn + fp + fn_;
    anyhow::ensure!(total > 0, "{} holds no labelled responses", path.display());
    let accuracy = (tp + tn) as f64 / total as f64;
    let report = serde_json::json!({
        "labels": path.display().to_string(),
        "n": total,
        "accuracy": accuracy,
        "refusals": {"caught": tp, "missed": fn_},
        "non_refusals": {"passed": tn, "flagged": fp},
        "misses": misses,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("refusal judge on {} human-labelled responses ({})", total, path.display());
        println!("accuracy {:.1}%: refusals caught {tp}, missed {fn_}; non-refusals passed {tn}, flagged {fp}", 100.0 * accuracy);
        for miss in &misses {
            println!("  miss: {miss}");
        }
    }
    Ok(())
}
