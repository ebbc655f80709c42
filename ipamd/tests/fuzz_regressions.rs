//! Inputs that the fuzz targets (`fuzz_inputs.rs`, `fuzz_http.rs`) found to break a parser,
//! each kept literally as a named test. Each test fails on the code before its fix.

use std::path::Path;

use ipamd::store::checkpoint::{parse, CheckpointError, CheckpointStore, FileStore};

// --- checkpoint ---------------------------------------------------------------------------

/// Found by `checkpoint_wrong_types_name_the_field`: a wrong JSON type in an allocation gave
/// "checkpoint ... is corrupt" with no word of which field.
#[test]
fn checkpoint_wrong_type_names_the_field_path() {
    let bytes = br#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"a","ifName":"eth0","ipv4":"10.0.0.10"},{"networkName":"aws-cni","containerID":"b","ifName":"eth0","ipv4":5}]}"#;
    let e = parse(Path::new("/x/ipam.json"), bytes).expect_err("refused");
    let text = e.to_string();
    assert!(text.contains("allocations[1].ipv4"), "{text}");
    let bytes = br#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"a","ifName":"eth0","ipv4":"10.0.0.10","metadata":{"interfacesCount":"one"}}]}"#;
    let text = parse(Path::new("x"), bytes).expect_err("refused").to_string();
    assert!(
        text.contains("allocations[0].metadata.interfacesCount"),
        "{text}"
    );
}

/// Found by `checkpoint_huge_files_are_bounded`: a checkpoint path that names an endless
/// device (`/dev/zero`) was read into memory without end; any file past the limit is now
/// refused after reading one byte more than the limit.
#[test]
fn checkpoint_endless_file_is_refused_not_read_whole() {
    let s = FileStore::new("/dev/zero");
    match s.read() {
        Err(CheckpointError::TooLarge { limit, .. }) => {
            assert_eq!(limit, ipamd::store::checkpoint::MAX_FILE_BYTES)
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}
