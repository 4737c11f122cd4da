"""Talks to `inferalign serve` with the official openai client, as a chat UI
would: a plain and a streamed chat, harmless and harmful. Prints one JSON
object for the Rust test to check."""
import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2])
harmless, harmful = sys.argv[3], sys.argv[4]


def chat(prompt):
    raw = client.chat.completions.with_raw_response.create(
        model="any", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0
    )
    completion = raw.parse()
    return {
        "content": completion.choices[0].message.content,
        "finish_reason": completion.choices[0].finish_reason,
        "completion_tokens": completion.usage.completion_tokens,
        "inferalign": completion.model_extra["inferalign"],
        "header_steered": raw.headers.get("x-inferalign-steered"),
    }


def stream(prompt):
    chunks = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0, stream=True
    )
    content, finish_reason, inferalign, n = "", None, None, 0
    for chunk in chunks:
        n += 1
        inferalign = inferalign or (chunk.model_extra or {}).get("inferalign")
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            finish_reason = chunk.choices[0].finish_reason or finish_reason
    return {"content": content, "finish_reason": finish_reason, "inferalign": inferalign, "chunks": n}


def moderate(inputs):
    response = client.moderations.create(model="any", input=inputs)
    return [{"flagged": r.flagged, "harmful": r.categories.model_extra["harmful"], "inferalign": r.model_extra["inferalign"]} for r in response.results]


print(json.dumps({
    "models": [m.id for m in client.models.list()],
    "moderations": moderate([harmless, harmful]),
    "plain": {"harmless": chat(harmless), "harmful": chat(harmful)},
    "streamed": {"harmless": stream(harmless), "harmful": stream(harmful)},
}))
