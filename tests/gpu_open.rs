//! `backend::open` (named gpu_* so the GPU bundle runs it too): `cpu` always works; `auto` picks CUDA exactly when the build has it and a
//! GPU is present; `cuda` without a GPU (or without the feature) is a one-line error, not a
//! panic. Runs on every machine: the expectations follow what this machine has.

use semshare::backend;

fn gpu_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        backend::cuda::available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[test]
fn cpu_and_auto() {
    assert!(backend::open("cpu").unwrap().name().starts_with("cpu ("));
    let auto = backend::open("auto").unwrap();
    assert_eq!(auto.name(), if gpu_present() { "cuda" } else { backend::open("cpu").unwrap().name() });
}

#[test]
fn cuda_is_the_gpu_or_a_clear_error() {
    match backend::open("cuda") {
        Ok(b) => {
            assert!(gpu_present(), "open(\"cuda\") succeeded without a GPU");
            assert_eq!(b.name(), "cuda");
        }
        Err(e) => {
            assert!(!gpu_present(), "a GPU is present but open(\"cuda\") failed: {e}");
            let msg = e.to_string();
            assert!(!msg.contains('\n') && msg.to_lowercase().contains("cuda"), "{msg}");
            if std::env::var("SEMSHARE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("SEMSHARE_REQUIRE_GPU=1 but: {msg}");
            }
        }
    }
}

#[test]
fn unknown_device_is_a_config_error() {
    let err = backend::open("tpu").err().expect("tpu is not a device").to_string();
    assert!(err.contains("tpu"), "{err}");
}
