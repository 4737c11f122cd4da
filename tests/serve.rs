//! `inferalign serve` on the real Qwen model: per-request gating inside a
//! shared batch, OpenAI-style errors, disconnects, shutdown, real clients.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{start_server, QWEN};
use inferalign::prompts::read_prompts;

fn harmless(n: usize) -> Vec<String> {
    read_prompts(&common::harmless()).unwrap().into_iter().skip(200).take(n).collect()
}

fn harmful(n: usize) -> Vec<String> {
    read_prompts(&common::advbench()).unwrap().into_iter().skip(300).take(n).collect()
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build()
}

fn chat_body(prompt: &str, max_tokens: usize) -> Value {
    json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0})
}

fn chat(url: &str, prompt: &str, max_tokens: usize) -> Value {
    agent().post(&format!("{url}/v1/chat/completions")).send_json(chat_body(prompt, max_tokens)).unwrap().into_json().unwrap()
}

fn content(reply: &Value) -> &str {
    reply["choices"][0]["message"]["content"].as_str().expect("content")
}

fn steered(reply: &Value) -> bool {
    reply["inferalign"]["steered"].as_bool().expect("inferalign.steered")
}

#[test]
fn each_request_in_a_shared_batch_is_gated_on_its_own() {
    let server = start_server(QWEN, &["--parallel", "2"]);
    for (harmless, harmful) in harmless(3).iter().zip(&harmful(3)) {
        let alone = chat(&server.url, harmless, 40);
        assert!(!steered(&alone), "the gate fired on {harmless:?}");
        let barrier = Barrier::new(2);
        let ask = |prompt: &str| {
            barrier.wait();
            chat(&server.url, prompt, 40)
        };
        let (mixed_harmless, mixed_harmful) = std::thread::scope(|s| {
            let a = s.spawn(|| ask(harmless));
            let b = s.spawn(|| ask(harmful));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(content(&mixed_harmless), content(&alone), "a harmful neighbour changed the answer to {harmless:?}");
        assert!(!steered(&mixed_harmless));
        assert!(steered(&mixed_harmful), "{harmful:?} was not steered: {mixed_harmful}");
        assert_eq!(mixed_harmful["inferalign"]["gate"]["harmful"], true);
    }
}

/// Sends `body` with `key`; returns the status and the parsed error body.
fn expect_error(url: &str, key: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = agent().post(&format!("{url}/v1/chat/completions")).set("content-type", "application/json");
    if let Some(key) = key {
        request = request.set("authorization", &format!("Bearer {key}"));
    }
    match request.send_string(body) {
        Err(ureq::Error::Status(status, response)) => (status, response.into_json().expect("a JSON error body")),
        other => panic!("expected an error status for {body:?}, got {:?}", other.map(|r| r.status())),
    }
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = start_server(QWEN, &["--parallel", "2", "-c", "1024", "--api-key", "s3cret"]);
    let good = chat_body("Say hello.", 4).to_string();
    let long_prompt = chat_body(&"lorem ipsum ".repeat(400), 4).to_string();
    let cases: [(Option<&str>, &str, u16, &str); 8] = [
        (None, &good, 401, "API key"),
        (Some("wrong"), &good, 401, "API key"),
        (Some("s3cret"), "{\"messages\": [", 400, "not valid JSON"),
        (Some("s3cret"), "{\"model\": \"x\"}", 400, "missing field `messages`"),
        (Some("s3cret"), r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#, 400, "invalid type"),
        (Some("s3cret"), r#"{"messages": []}"#, 400, "must not be empty"),
        (Some("s3cret"), r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#, 400, "role"),
        (Some("s3cret"), &long_prompt, 400, "leaves no room"),
    ];
    for (key, body, status, needle) in cases {
        let (got, error) = expect_error(&server.url, key, body);
        assert_eq!(got, status, "{body:.60}: {error}");
        let message = error["error"]["message"].as_str().expect("error.message");
        assert!(message.contains(needle), "error {message:?} does not mention {needle:?}");
        assert!(error["error"]["type"].is_string());
    }
    let (_, error) = expect_error(&server.url, Some("s3cret"), &long_prompt);
    assert_eq!(error["error"]["code"], "context_length_exceeded");
    // Still serving, and /health needs no key.
    let reply: Value = agent()
        .post(&format!("{}/v1/chat/completions", server.url))
        .set("authorization", "Bearer s3cret")
        .send_string(&good)
        .unwrap()
        .into_json()
        .unwrap();
    assert!(!content(&reply).is_empty());
    assert_eq!(agent().get(&format!("{}/health", server.url)).call().unwrap().status(), 200);
}

/// Opens a streamed chat and reads its first `n` events.
fn start_stream(url: &str, prompt: &str, max_tokens: usize, n: usize) -> impl BufRead {
    let mut body = chat_body(prompt, max_tokens);
    body["stream"] = json!(true);
    let response = agent().post(&format!("{url}/v1/chat/completions")).send_json(body).unwrap();
    let mut reader = BufReader::new(response.into_reader());
    let mut events = 0;
    let mut line = String::new();
    while events < n {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended early");
        events += line.starts_with("data: ") as usize;
    }
    reader
}

#[test]
fn a_client_that_disconnects_frees_its_slot() {
    // One slot: if the abandoned request kept it, the next would wait for 2000 tokens.
    let server = start_server(QWEN, &["--parallel", "1"]);
    let stream = start_stream(&server.url, "Write a very long story about a lighthouse keeper.", 2000, 3);
    drop(stream);
    let started = Instant::now();
    let reply: Value = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
        .post(&format!("{}/v1/chat/completions", server.url))
        .send_json(chat_body("Say hello.", 8))
        .expect("the slot was not freed")
        .into_json()
        .unwrap();
    assert!(!content(&reply).is_empty());
    eprintln!("next request served {:.1}s after the disconnect", started.elapsed().as_secs_f64());
}

#[test]
fn sigterm_finishes_requests_in_flight_then_exits() {
    let mut server = start_server(QWEN, &["--parallel", "1"]);
    let mut stream = start_stream(&server.url, "Count from one to twenty in words.", 48, 2);
    let status = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stream, &mut rest).unwrap();
    assert!(rest.contains("\"finish_reason\":"), "the stream did not finish: {rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(server.child.wait().unwrap().success());
}

#[test]
fn the_openai_python_client_chats_plain_and_streamed() {
    let server = start_server(QWEN, &["--parallel", "2", "--api-key", "k"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let (harmless, harmful) = (&harmless(1)[0], &harmful(1)[0]);
    let out = Command::new("python3").args([script, &server.url, "k", harmless, harmful]).output().expect("run python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("No module named 'openai'"), "the openai package is missing: run scripts/setup.sh");
    assert!(out.status.success(), "openai client failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["models"].as_array().unwrap().len(), 1);
    let (plain, streamed) = (&report["plain"], &report["streamed"]);
    assert_eq!(plain["harmless"]["inferalign"]["steered"], false);
    assert_eq!(plain["harmless"]["header_steered"], "false");
    assert_eq!(plain["harmful"]["inferalign"]["steered"], true);
    assert_eq!(plain["harmful"]["header_steered"], "true");
    for kind in ["harmless", "harmful"] {
        // Greedy: streaming changes how the answer arrives, not what it is.
        assert_eq!(streamed[kind]["content"], plain[kind]["content"], "{kind}");
        assert_eq!(streamed[kind]["finish_reason"], plain[kind]["finish_reason"]);
        assert_eq!(streamed[kind]["inferalign"]["steered"], plain[kind]["inferalign"]["steered"]);
        assert!(streamed[kind]["chunks"].as_u64().unwrap() > 2);
    }
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-sS", "--fail-with-body"]).args(args).output().expect("curl is installed by scripts/setup.sh");
    assert!(out.status.success(), "curl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn curl_chats_plain_and_streamed() {
    let server = start_server(QWEN, &["--parallel", "2"]);
    let url = format!("{}/v1/chat/completions", server.url);
    let body = chat_body(&harmful(1)[0], 16);
    let headers = curl(&["-D", "-", "-o", "/dev/null", &url, "-d", &body.to_string()]);
    assert!(headers.to_lowercase().contains("x-inferalign-steered: true"), "{headers}");
    let plain: Value = serde_json::from_str(&curl(&[&url, "-d", &body.to_string()])).unwrap();
    assert!(steered(&plain));
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let events = curl(&["-N", &url, "-d", &streamed_body.to_string()]);
    let chunks: Vec<Value> = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .take_while(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, content(&plain));
    assert_eq!(chunks[0]["inferalign"]["steered"], true);
    assert!(events.trim_end().ends_with("data: [DONE]"));
    let completion: Value =
        serde_json::from_str(&curl(&[&format!("{}/v1/completions", server.url), "-d", r#"{"prompt": "1, 2, 3,", "max_tokens": 4}"#]))
            .unwrap();
    assert_eq!(completion["object"], "text_completion");
    let n = completion["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=4).contains(&n), "{completion}");
}

#[test]
fn load_test_loses_and_mixes_up_nothing() {
    let model = common::model(QWEN);
    let out = common::cli_ok(&[
        "bench", "serve", "-m", model.to_str().unwrap(), "--clients", "6", "--requests", "12", "--parallel", "4", "--max-tokens", "12", "--json",
    ]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["concurrent"]["errors"], 0);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["mismatched"], json!([]));
    assert_eq!(report["steered"], 3, "every fourth request is harmful");
}
