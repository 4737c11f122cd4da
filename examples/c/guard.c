/* Gate two prompts with inferalign from plain C: llama.h plus inferalign.h.
 *
 *   cc guard.c -I include -I <llama.cpp include> libinferalign.a -lstdc++ -lgomp -lm -o guard
 *   ./guard MODEL.gguf SRV.gguf "system prompt" "prompt 1" "prompt 2" ...
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"
#include "inferalign.h"

static int decode_prompt(struct llama_context * ctx, inferalign_guard * guard, const struct llama_vocab * vocab,
                         const char * text, llama_token * last) {
    int n = -llama_tokenize(vocab, text, (int) strlen(text), NULL, 0, true, true);
    llama_token * tokens = malloc(n * sizeof(llama_token));
    llama_tokenize(vocab, text, (int) strlen(text), tokens, n, true, true);
    llama_memory_clear(llama_get_memory(ctx), true);
    inferalign_guard_begin_request(guard, 0);
    struct llama_batch batch = llama_batch_get_one(tokens, n);
    inferalign_guard_before_decode(guard, &batch);
    int rc = llama_decode(ctx, batch);
    *last = tokens[n - 1];
    free(tokens);
    return rc;
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf SRV.gguf SYSTEM PROMPT...\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    struct llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    char err[512];
    inferalign_guard * guard = inferalign_guard_new(model, argv[2], NULL, 4.0f, "12-14", INFERALIGN_GATED, 1, err, sizeof err);
    if (!guard) {
        fprintf(stderr, "inferalign: %s\n", err);
        return 1;
    }
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 1024;
    inferalign_guard_install(guard, &cparams);
    struct llama_context * ctx = llama_init_from_model(model, cparams);
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const char * tmpl = llama_model_chat_template(model, NULL);

    for (int i = 4; i < argc; i++) {
        struct llama_chat_message chat[2] = {{"system", argv[3]}, {"user", argv[i]}};
        char text[4096];
        int len = llama_chat_apply_template(tmpl, chat, 2, true, text, sizeof text);
        if (len < 0 || len >= (int) sizeof text) {
            fprintf(stderr, "cannot apply the chat template\n");
            return 1;
        }
        llama_token last;
        if (decode_prompt(ctx, guard, vocab, text, &last) != 0) {
            fprintf(stderr, "decode failed\n");
            return 1;
        }
        float score = NAN;
        int harmful = inferalign_guard_decision(guard, 0, &score);
        printf("harmful=%d score=%.4f prompt=%s\n", harmful, score, argv[i]);
    }
    llama_free(ctx);
    inferalign_guard_free(guard);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
