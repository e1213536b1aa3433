//! The `x402d-load` program: its flags, and a bad one refused before any
//! work starts.

use std::process::Command;

fn load(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_x402d-load")).args(args).output().unwrap()
}

#[test]
fn help_lists_the_modes() {
    let out = load(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--verify-url", "--settle", "--scheme", "--rate", "--duration", "--watch-pid", "--json"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn a_bad_payer_key_is_refused_by_name_before_connecting() {
    // Nothing listens on port 9: a connection attempt would fail differently.
    let out = load(&["--endpoint", "http://127.0.0.1:9", "--payer-keys", "0x1234", "-n", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a payer key is not a 32-byte hex private key"), "{err}");
}
