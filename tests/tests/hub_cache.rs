//! The Hugging Face hub path, offline: a hub cache laid out on disk exactly as `huggingface_hub` and
//! `hf-hub` write it (blobs, snapshot symlinks, refs/main), found through HF_HOME.

use std::path::Path;

use hat_model::manifest::Manifest;
use hat_splitter::{load_model, split_model, ModelSource, SplitError, SplitOptions};
use hat_tests::TinyLlama;

fn lay_out_hub_cache(home: &Path, repo: &str, revision: &str) {
    let repo_dir = home.join("hub").join(format!("models--{}", repo.replace('/', "--")));
    let staging = home.join("staging");
    TinyLlama::default().write_dir(&staging, 2);
    let snapshot = repo_dir.join("snapshots").join(revision);
    std::fs::create_dir_all(&snapshot).expect("snapshot dir");
    std::fs::create_dir_all(repo_dir.join("blobs")).expect("blobs dir");
    for entry in std::fs::read_dir(&staging).expect("ls") {
        let entry = entry.expect("entry");
        // Blobs are named by content hash in a real cache; the file name stands in for it here.
        let blob = repo_dir.join("blobs").join(format!("blob-{}", entry.file_name().to_string_lossy()));
        std::fs::rename(entry.path(), &blob).expect("move blob");
        std::os::unix::fs::symlink(&blob, snapshot.join(entry.file_name())).expect("symlink");
    }
    std::fs::create_dir_all(repo_dir.join("refs")).expect("refs");
    std::fs::write(repo_dir.join("refs/main"), revision).expect("ref");
}

// One test owns the process environment (HF_HOME, HF_HUB_OFFLINE), so nothing races on it.
#[test]
fn hub_model_splits_offline_from_the_cache_and_an_uncached_one_is_a_clear_error() {
    let home = tempfile::tempdir().expect("tmp");
    lay_out_hub_cache(home.path(), "test-org/tiny-llama", "0123456789abcdef0123456789abcdef01234567");
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let source = ModelSource::parse("test-org/tiny-llama").expect("parse");
    assert_eq!(source, ModelSource::Hub("test-org/tiny-llama".into()));
    let model = load_model(&source, false).expect("load from hub cache");
    let out = home.path().join("out");
    let opts = SplitOptions::new(1, 1, out.clone());
    let report = split_model(&model, &opts).expect("split");
    let device = Manifest::read(&out.join("device")).expect("device manifest");
    assert_eq!(device.source, "test-org/tiny-llama");
    assert_eq!(device.fingerprint, report.fingerprint);
    assert!(out.join("cloud/middle.safetensors").is_file());

    let missing = ModelSource::parse("test-org/not-downloaded").expect("parse");
    let err = load_model(&missing, false).expect_err("not cached");
    assert!(matches!(err, SplitError::HubOffline { .. }), "{err}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
}
