/* Gate prompts with inferalign from plain C: llama.h plus inferalign.h.
 *
 *   cc guard.c -I include -I <llama.cpp include> libinferalign.a -lstdc++ -lgomp -lm -o guard
 *   ./guard MODEL.gguf SRV.gguf "system prompt" "prompt 1" "prompt 2" ...
 *
 * Each prompt is gated twice: decoded alone ("alone ..." lines), then all
 * prompts together in one multi-sequence batch ("batch ..." lines).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"
#include "inferalign.h"

static int fail(inferalign_guard * guard, const char * what) {
    fprintf(stderr, "inferalign: %s: %s\n", what, inferalign_guard_last_error(guard));
    return 1;
}

/* The templated, tokenized prompt; *n gets its length and *request the
 * position where the user's message starts (what the gate reads). */
static llama_token * tokenize_chat(const struct llama_model * model, const char * system, const char * user, int * n, int * request) {
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const char * tmpl = llama_model_chat_template(model, NULL);
    struct llama_chat_message chat[2] = {{"system", system}, {"user", user}};
    int len = llama_chat_apply_template(tmpl, chat, 2, true, NULL, 0);
    char * text = malloc(len + 1);
    llama_chat_apply_template(tmpl, chat, 2, true, text, len + 1);
    *n = -llama_tokenize(vocab, text, len, NULL, 0, true, true);
    llama_token * tokens = malloc(*n * sizeof(llama_token));
    llama_tokenize(vocab, text, len, tokens, *n, true, true);
    const char * at = strstr(text, user);
    *request = at ? -llama_tokenize(vocab, text, (int) (at - text), NULL, 0, true, true) : 0;
    free(text);
    return tokens;
}

/* Appends `tokens` to `batch` as sequence `seq`, the last one asking for output. */
static void add_prompt(struct llama_batch * batch, const llama_token * tokens, int n, int seq) {
    for (int j = 0; j < n; j++) {
        int k = batch->n_tokens++;
        batch->token[k] = tokens[j];
        batch->pos[k] = j;
        batch->n_seq_id[k] = 1;
        batch->seq_id[k][0] = seq;
        batch->logits[k] = j == n - 1;
    }
}

/* Decodes `batch` under the guard; 0 when it was decoded and fully gated. */
static int guarded_decode(struct llama_context * ctx, inferalign_guard * guard, struct llama_batch batch) {
    if (inferalign_guard_before_decode(guard, &batch) != 0) return fail(guard, "before_decode");
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        return 1;
    }
    if (inferalign_guard_after_decode(guard) != 0) return fail(guard, "after_decode");
    return 0;
}

static void print_decision(inferalign_guard * guard, const char * how, int seq) {
    float score = NAN;
    int harmful = inferalign_guard_decision(guard, seq, &score);
    /* -1: the gate could not decide; a caller must refuse, never answer unguarded. */
    printf("%s harmful=%d score=%.4f\n", how, harmful, score);
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf SRV.gguf SYSTEM PROMPT...\n", argv[0]);
        return 2;
    }
    int n_prompts = argc - 4;
    llama_backend_init();
    struct llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    char err[512];
    inferalign_guard * guard = inferalign_guard_new(model, argv[2], NULL, 4.0f, "12-14", INFERALIGN_GATED, n_prompts, err, sizeof err);
    if (!guard) {
        fprintf(stderr, "inferalign: %s\n", err);
        return 1;
    }
    /* llama.cpp's default n_ubatch (512) is left as it is: install makes it n_batch. */
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 8192;
    cparams.n_batch = 4096;
    cparams.n_seq_max = n_prompts;
    if (inferalign_guard_install(guard, &cparams) != 0) return fail(guard, "install");
    if (inferalign_guard_install(guard, &cparams) == 0) {
        fprintf(stderr, "a guard installed twice must be refused\n");
        return 1;
    }
    struct llama_context * ctx = llama_init_from_model(model, cparams);

    int * lens = malloc(n_prompts * sizeof(int));
    int * starts = malloc(n_prompts * sizeof(int));
    llama_token ** prompts = malloc(n_prompts * sizeof(llama_token *));
    int total = 0;
    for (int i = 0; i < n_prompts; i++) {
        prompts[i] = tokenize_chat(model, argv[3], argv[4 + i], &lens[i], &starts[i]);
        total += lens[i];
    }
    struct llama_batch batch = llama_batch_init(total, 0, 1);
    for (int i = 0; i < n_prompts; i++) {
        llama_memory_clear(llama_get_memory(ctx), true);
        if (inferalign_guard_begin_request_at(guard, 0, starts[i]) != 0) return fail(guard, "begin_request_at");
        batch.n_tokens = 0;
        add_prompt(&batch, prompts[i], lens[i], 0);
        if (guarded_decode(ctx, guard, batch) != 0) return 1;
        print_decision(guard, "alone", 0);
    }

    llama_memory_clear(llama_get_memory(ctx), true);
    batch.n_tokens = 0;
    for (int i = 0; i < n_prompts; i++) {
        if (inferalign_guard_begin_request_at(guard, i, starts[i]) != 0) return fail(guard, "begin_request_at");
        add_prompt(&batch, prompts[i], lens[i], i);
    }
    if (guarded_decode(ctx, guard, batch) != 0) return 1;
    for (int i = 0; i < n_prompts; i++) print_decision(guard, "batch", i);
    if (inferalign_guard_begin_request(guard, n_prompts) == 0) {
        fprintf(stderr, "a sequence id beyond n_seq must be refused\n");
        return 1;
    }

    llama_batch_free(batch);
    for (int i = 0; i < n_prompts; i++) free(prompts[i]);
    free(prompts);
    free(lens);
    free(starts);
    llama_free(ctx);
    inferalign_guard_free(guard);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
