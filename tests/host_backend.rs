//! A host that initialised llama.cpp through llama-cpp-2 before us: loading a
//! model through inferalign must work, not panic.

mod common;

#[test]
fn a_backend_the_host_initialised_is_used_not_a_panic() {
    let mut host = llama_cpp_2::llama_backend::LlamaBackend::init().expect("the host initialises first");
    // Logging is the host's to set; this one keeps the test output quiet.
    host.void_logs();
    let model = inferalign::llama::Model::load(&common::model(common::QWEN), 0).expect("load under the host's backend");
    assert_eq!(model.n_layer(), 24);
    drop(model);
    drop(host);
}
