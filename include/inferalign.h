/* inferalign: InferAligner's gate and safety shift inside llama.cpp's graph.
 *
 * Link your application against libinferalign.a (it carries llama.cpp) and:
 *   1. load a model as usual;
 *   2. g = inferalign_guard_new(model, "srv.gguf", NULL, NAN, NULL, INFERALIGN_GATED, n_seq, err, sizeof err);
 *   3. inferalign_guard_install(g, &ctx_params) before llama_init_from_model;
 *   4. per request: inferalign_guard_begin_request_at(g, seq, pos) before its prompt is
 *      decoded, pos being where the first message after the chat template's fixed
 *      opening starts in the prompt (the gate reads the conversation from there:
 *      start at the last user message and an earlier turn could hide a request;
 *      inferalign_guard_begin_request reads it all);
 *   5. before every llama_decode: inferalign_guard_before_decode(g, &batch);
 *      after it: inferalign_guard_after_decode(g);
 *   6. after the prompt's decode: inferalign_guard_decision(g, seq, &score);
 *   7. inferalign_guard_free(g) after llama_free(ctx).
 *
 * Rules (each broken one is an error code, never a silent guess):
 *   - one guard per context: a second install is refused;
 *   - install sets n_ubatch = n_batch and kv_unified = true, so llama.cpp
 *     neither splits a batch nor regroups its sequences; do not change them after;
 *   - sequence ids are 0..n_seq-1, one per token; several sequences (requests)
 *     may share a batch, prompts may be as long as n_batch; give each token its
 *     position (batch.pos), or the gate reads every token as the request;
 *   - functions returning int return 0 on success and -1 on an error, whose
 *     message inferalign_guard_last_error gives;
 *   - in gated mode, a request whose decision is -1 after its prompt was
 *     decoded, or a decode after which inferalign_guard_after_decode fails,
 *     was not gated: refuse it, never answer it unguarded.
 * The guard must outlive the context it is installed in. Not thread-safe:
 * call it from the thread that calls llama_decode.
 */
#ifndef INFERALIGN_H
#define INFERALIGN_H

#include <stddef.h>
#include <stdint.h>

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct InferalignGuard inferalign_guard;

enum inferalign_mode {
    INFERALIGN_PLAIN  = 0, /* never shift */
    INFERALIGN_GATED  = 1, /* shift requests the gate flags (InferAligner) */
    INFERALIGN_ALWAYS = 2, /* shift every request, like llama.cpp control vectors */
};

/* Creates a guard for `model` from an SRV file made by `inferalign extract`
 * (gate_path) and optional steering vectors of an aligned model with the same
 * width and depth (steer_path, NULL = self-guidance). alpha = NAN and
 * layers = NULL take the defaults stored in the vector file; layers is a list
 * like "12-14" or "10,12,14". n_seq bounds the sequence ids in use.
 * Returns NULL on error with a message in err (if err_len > 0). */
inferalign_guard * inferalign_guard_new(const struct llama_model * model,
                                        const char * gate_path,
                                        const char * steer_path,
                                        float alpha,
                                        const char * layers,
                                        int mode,
                                        int n_seq,
                                        char * err,
                                        size_t err_len);

/* Sets params->cb_eval, cb_eval_user_data, n_ubatch (= n_batch) and
 * kv_unified (true). -1 if the guard is already installed. */
int inferalign_guard_install(inferalign_guard * guard, struct llama_context_params * params);

/* A new request starts on `seq`: the next output token of `seq` is its last
 * prompt token, where the gate decides. Clears the previous decision.
 * -1 if seq is outside 0..n_seq-1. A gate that reads every token of the
 * request (files from `inferalign extract` do) reads the whole prompt. */
int inferalign_guard_begin_request(inferalign_guard * guard, int32_t seq);

/* As inferalign_guard_begin_request, where the request (the conversation
 * after the template's fixed opening: BOS, its default system prompt, the
 * first user header) starts at position
 * `request_pos` of the prompt: the gate reads the tokens from there on, every
 * turn alike (a file's context floor, which lets `serve` pass a new harmless
 * question after a refused harmful one, is not applied here). Every
 * one of them must be decoded after this call (none from a cache).
 * -1 if seq is outside 0..n_seq-1 or request_pos is negative. */
int inferalign_guard_begin_request_at(inferalign_guard * guard, int32_t seq, int32_t request_pos);

/* Tells the guard which sequence each token of the next batch belongs to.
 * A gate that reads the user's own last token (files from `inferalign
 * extract` may) needs that token in the same batch as the prompt's last one;
 * where it is not, the request is treated as harmful (the guard fails closed).
 * Call right before every llama_decode. -1 (do not decode) if the batch is
 * longer than n_batch, a token has several sequence ids, or a sequence id is
 * outside 0..n_seq-1. */
int inferalign_guard_before_decode(inferalign_guard * guard, const struct llama_batch * batch);

/* Call right after every llama_decode: 0 if the guard gated and steered the
 * batch as planned; -1 if it could not (a layer the model's graph never showed
 * it, rows that did not match the batch, an internal error). */
int inferalign_guard_after_decode(inferalign_guard * guard);

/* The message of the last -1 from this guard; valid until the next call. */
const char * inferalign_guard_last_error(const inferalign_guard * guard);

/* 1 if the gate flagged the request on `seq` as harmful, 0 if not, -1 if not
 * decided (refuse such a request in gated mode); the score (a . s_hat + b) goes to *score when not NULL. */
int inferalign_guard_decision(const inferalign_guard * guard, int32_t seq, float * score);

void inferalign_guard_free(inferalign_guard * guard);

#ifdef __cplusplus
}
#endif

#endif /* INFERALIGN_H */
