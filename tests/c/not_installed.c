/* A guard created but never installed in the context: the decode runs without
 * it, and the guard must say so (fail closed) instead of reporting a decision. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "llama.h"
#include "inferalign.h"

int main(int argc, char ** argv) {
    if (argc != 3) return 2;
    llama_backend_init();
    struct llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    char err[512];
    inferalign_guard * guard = inferalign_guard_new(model, argv[2], NULL, 4.0f, "12-14", INFERALIGN_GATED, 1, err, sizeof err);
    if (!guard) return 3;
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 512;
    struct llama_context * ctx = llama_init_from_model(model, cparams);
    llama_token tokens[8];
    int n = llama_tokenize(llama_model_get_vocab(model), "Hello there", 11, tokens, 8, true, true);
    struct llama_batch batch = llama_batch_get_one(tokens, n);
    /* Not installed: planning a batch is refused, and after a decode the guard reports it never ran. */
    printf("before_decode=%d\n", inferalign_guard_before_decode(guard, &batch));
    printf("begin_request=%d\n", inferalign_guard_begin_request(guard, 0));
    llama_decode(ctx, batch);
    int after = inferalign_guard_after_decode(guard);
    printf("after_decode=%d %s\n", after, inferalign_guard_last_error(guard));
    float score = NAN;
    printf("decision=%d\n", inferalign_guard_decision(guard, 0, &score));
    llama_free(ctx);
    inferalign_guard_free(guard);
    llama_model_free(model);
    return 0;
}
